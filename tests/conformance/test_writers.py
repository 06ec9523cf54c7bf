"""Every streaming writer against the conformance suite in writer_suite.py.

The torch-zip and safetensors formats run the protocol suite (:class:`ProtocolTests`), each read back by
every reader that matters: torch.load with and without mmap; safetensors.torch.load_file, safe_open, and our own
read_header/read_tensor.  The object-based SafetensorsWriter runs the generic suite.
"""

from __future__ import annotations

import safetensors
import safetensors.torch
import torch

from streamconv import types
from streamconv.storage import safetensors as st
from streamconv.storage import torchzip
from streamconv.storage.safetensors import SafetensorsWriter

from .writer_suite import ProtocolTests, WriterTests


class TestTorchZipWriter(ProtocolTests):
    module = torchzip
    mmap = False

    def make_layout(self, specs):
        entries = tuple(torchzip.PtEntry("model", n, types.from_torch(d).name, s) for n, (d, s) in specs.items())
        return torchzip.compute_layout(entries, {"checkpoint_version": 3.0, "iteration": 1})

    def load(self, path):
        return dict(torch.load(path, weights_only=True, mmap=self.mmap)["model"])


class TestTorchZipWriterMmap(TestTorchZipWriter):
    mmap = True


class TestSafetensorsProtocol(ProtocolTests):
    module = st

    def make_layout(self, specs):
        return st.compute_layout([(n, types.from_torch(d).name, s) for n, (d, s) in specs.items()], {"format": "pt"})

    def load(self, path):
        return safetensors.torch.load_file(path)


class TestSafetensorsProtocolSafeOpen(TestSafetensorsProtocol):
    def load(self, path):
        with safetensors.safe_open(path, "pt") as f:
            assert f.metadata() == {"format": "pt"}
            tensors = {n: f.get_tensor(n) for n in f.keys()}
        # safe_open lists keys in its own order; the suite compares in file order, which our header keeps
        return {n: tensors[n] for n in st.read_header(path).tensors}


class TestSafetensorsProtocolOwnReader(TestSafetensorsProtocol):
    def load(self, path):
        header = st.read_header(path)
        assert header.metadata == {"format": "pt"}
        return {n: st.read_tensor(path, info) for n, info in header.tensors.items()}


class TestSafetensorsWriter(WriterTests):
    def begin(self, path, specs):
        return SafetensorsWriter(path, [(n, types.from_torch(d).name, s) for n, (d, s) in specs.items()])

    def put(self, session, name, data, offset):
        session.write(name, data, offset)

    def finish(self, session):
        session.close()

    def abort(self, session):
        session.abort()

    def load(self, path):
        return safetensors.torch.load_file(path)
