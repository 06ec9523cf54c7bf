"""The built-in writers against the writer suite (streamconv.testing.writer_suite), read back by independent
readers.

The torch-zip and safetensors formats run the protocol suite (:class:`ProtocolTests`), each read back by
every reader that matters: torch.load with and without mmap; safetensors.torch.load_file, safe_open, and our own
read_header/read_tensor.  The object-based SafetensorsWriter runs the generic suite.  (test_formats.py runs the
suites once more for every registered format, read back through the format's own index.)
"""

from __future__ import annotations

import safetensors
import safetensors.torch
import torch

from streamconv import types
from streamconv.storage import safetensors as st
from streamconv.storage.megatron_pt import MEGATRON_PT
from streamconv.storage.safetensors import SafetensorsWriter
from streamconv.testing.writer_suite import ProtocolTests, WriterTests


class TestTorchZipWriter(ProtocolTests):
    fmt = MEGATRON_PT
    group = "model"
    attrs = (("checkpoint_version", 3.0), ("iteration", 1))
    mmap = False

    def load(self, path):
        return dict(torch.load(path, weights_only=True, mmap=self.mmap)["model"])


class TestTorchZipWriterMmap(TestTorchZipWriter):
    mmap = True


class TestSafetensorsProtocol(ProtocolTests):
    fmt = st.SAFETENSORS
    attrs = (("format", "pt"),)

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
