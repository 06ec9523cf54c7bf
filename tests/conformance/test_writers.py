"""Every streaming writer against the conformance suite in writer_suite.py."""

from __future__ import annotations

from dataclasses import dataclass, field

import safetensors.torch
import torch

from streamconv import types
from streamconv.storage import torchzip
from streamconv.storage.safetensors import SafetensorsWriter

from .writer_suite import WriterTests


@dataclass
class _TorchZipSession:
    path: str
    layout: torchzip.TorchZipLayout
    index: dict[str, int]
    pieces: list = field(default_factory=list)


class TestTorchZipWriter(WriterTests):
    mmap = False

    def begin(self, path, specs):
        entries = tuple(torchzip.PtEntry("model", n, types.from_torch(d).name, s) for n, (d, s) in specs.items())
        layout = torchzip.compute_layout(entries, {"checkpoint_version": 3.0, "iteration": 1})
        torchzip.create(path, layout)
        return _TorchZipSession(path, layout, {n: i for i, n in enumerate(specs)})

    def put(self, session, name, data, offset):
        # list.append is atomic, so threads may share the list
        session.pieces.append(torchzip.write_piece(session.path, session.layout, session.index[name], data, offset))

    def finish(self, session):
        torchzip.finish(session.path, session.layout, session.pieces)

    def abort(self, session):
        torchzip.abort(session.path)

    def load(self, path):
        return dict(torch.load(path, weights_only=True, mmap=self.mmap)["model"])


class TestTorchZipWriterMmap(TestTorchZipWriter):
    mmap = True


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
