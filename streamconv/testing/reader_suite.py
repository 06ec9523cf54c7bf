"""Conformance tests for the reading side of a :class:`~streamconv.storage.base.TensorFormat`.

A format's test class subclasses :class:`ReaderTests` and sets ``fmt``; files are written through the format's
own write protocol, then read back:

1. ``index`` lists what was written: groups, names, dtypes, shapes, byte ranges (the layout's spans), attrs;
   the bytes at those ranges (whole, or a band of rows) are the tensors' bytes.
2. ``digest`` is stable, equals the index's, ignores tensor data and changes with the layout.
3. ``sniff`` claims the format's own files and no other registered format's, no text file and no garbage;
   the registry's ``format_of_file`` finds the format.
4. A missing, truncated or garbage file is one :class:`FormatError` of one line naming the file.
5. ``check_file`` passes an intact file, with and without its layout, and names a flipped byte's tensor.

This module imports pytest: only tests import it.
"""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from .. import types
from ..errors import FormatError
from ..storage import fileio, registry
from ..storage.base import TensorEntry, TensorFormat
from .writer_suite import make_tensor, raw_bytes

# (name, torch dtype, shape): odd sizes so that alignment and padding show; the last one is not empty, so that
# cutting the file's last byte always cuts a tensor
_SPECS = [("w.bf16", torch.bfloat16, (5, 7)), ("scalar", torch.float32, ()), ("empty", torch.float16, (0, 3)),
          ("fp8", torch.float8_e4m3fn, (3, 9)), ("ids", torch.int64, (4,)), ("mask", torch.bool, (2, 3)),
          ("last", torch.float32, (6, 5))]


def write_file(fmt: TensorFormat, path: str, tensors: dict[tuple[str, str], torch.Tensor],
               attrs: tuple = ()) -> tuple[object, list[int]]:
    """Write ``tensors`` ((group, name) -> tensor, in file order) through ``fmt``'s protocol, pieces in a
    shuffled order; returns the layout and the CRCs ``finish`` returned."""
    entries = [TensorEntry(g, n, types.from_torch(t.dtype).name, tuple(t.shape)) for (g, n), t in tensors.items()]
    layout = fmt.compute_layout(entries, attrs)
    fmt.create(path, layout)
    jobs = list(enumerate(tensors.values()))
    random.Random(7).shuffle(jobs)
    pieces = [fmt.write_piece(path, layout, i, t, 0) for i, t in jobs]
    return layout, fmt.finish(path, layout, pieces)


class ReaderTests:
    fmt: TensorFormat = None  # the format under test

    # --- helpers ------------------------------------------------------------------------------------------------
    def tensors(self, seed: int = 0) -> dict[tuple[str, str], torch.Tensor]:
        """Every dtype the format holds; split over two groups (in group order) when it has groups."""
        specs = [s for s in _SPECS if self.fmt.supports_float8 or s[1] != torch.float8_e4m3fn]
        groups = ("g0", "g1") if self.fmt.supports_groups else ("",)
        return {(groups[i * len(groups) // len(specs)], name):
                make_tensor(dtype, shape, seed=seed + i) if all(shape) else torch.empty(shape, dtype=dtype)
                for i, (name, dtype, shape) in enumerate(specs)}

    def attrs(self) -> tuple:
        return (("format", "pt"), ("note", "streamconv")) if self.fmt.supports_attrs else ()

    def write(self, path: str, seed: int = 0, **changes) -> tuple[object, list[int]]:
        tensors = self.tensors(seed)
        tensors.update(changes.get("extra", {}))
        return write_file(self.fmt, path, tensors, self.attrs())

    def head(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read(self.fmt.sniff_bytes)

    def assert_one_line_error(self, path: str) -> None:
        with pytest.raises(FormatError) as info:
            self.fmt.index(path)
        message = str(info.value)
        assert path in message and "\n" not in message, message

    # --- 1. index -----------------------------------------------------------------------------------------------
    def test_index_lists_what_was_written(self, tmp_path):
        path = str(tmp_path / "f")
        layout, _ = self.write(path)
        index = self.fmt.index(path)
        tensors = self.tensors()
        got = [(e.group, e.name, e.dtype, e.shape) for e in index.tensors]
        assert got == [(g, n, types.from_torch(t.dtype).name, tuple(t.shape)) for (g, n), t in tensors.items()]
        assert [(e.start, e.end) for e in index.tensors] == list(layout.spans)
        assert all(e.row_major for e in index.tensors)
        assert index.size == layout.size == os.path.getsize(path) and index.path == path
        assert dict(index.attrs) == dict(self.attrs())

    def test_bytes_read_back_equal(self, tmp_path):
        path = str(tmp_path / "f")
        self.write(path)
        for e, t in zip(self.fmt.index(path).tensors, self.tensors().values()):
            assert fileio.read_range(path, e.start, e.end - e.start).tobytes() == raw_bytes(t), e.name
            if len(e.shape) == 2 and e.shape[0] > 2:  # a band of rows is a contiguous sub-range
                row = e.nbytes // e.shape[0]
                band = fileio.read_range(path, e.start + row, 2 * row).tobytes()
                assert band == raw_bytes(t[1:3]), e.name

    # --- 2. digest ----------------------------------------------------------------------------------------------
    def test_digest_is_stable_and_follows_the_layout(self, tmp_path):
        a, b, c = (str(tmp_path / n) for n in "abc")
        self.write(a)
        self.write(b, seed=100)  # same layout, other data
        group = "g9" if self.fmt.supports_groups else ""
        self.write(c, extra={(group, "one.more"): make_tensor(torch.float32, (2,))})
        digest = self.fmt.digest(a)
        assert digest and digest == self.fmt.digest(a) == self.fmt.index(a).digest
        assert self.fmt.digest(b) == digest
        assert self.fmt.digest(c) != digest

    # --- 3. sniffing --------------------------------------------------------------------------------------------
    def test_sniff_claims_own_files_only(self, tmp_path):
        path = str(tmp_path / "own")
        self.write(path)
        assert self.fmt.sniff(self.head(path))
        for name in registry.format_names():
            other = registry.get_format(name)
            if name == self.fmt.name or other.is_text:
                continue
            theirs = str(tmp_path / name)
            group = "g" if other.supports_groups else ""
            write_file(other, theirs, {(group, "w"): make_tensor(torch.float32, (3, 4))})
            assert not self.fmt.sniff(self.head(theirs)), f"{self.fmt.name} claims a {name} file"
        text = str(tmp_path / "config.json")
        with open(text, "w") as f:
            f.write('{"architectures": ["X"], "hidden_size": 7168}\n')
        assert not self.fmt.sniff(self.head(text))
        garbage = np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8).tobytes()
        assert not self.fmt.sniff(garbage[: self.fmt.sniff_bytes])
        assert not self.fmt.sniff(b"")

    def test_registry_finds_the_format(self, tmp_path):
        if registry.format_names().count(self.fmt.name) == 0:
            pytest.skip("format not registered")
        path = str(tmp_path / "f")
        self.write(path)
        assert registry.format_of_file(path) is registry.get_format(self.fmt.name)
        assert registry.digest_of_file(path) == self.fmt.digest(path)

    # --- 4. read errors ---------------------------------------------------------------------------------------
    @pytest.mark.parametrize("keep", ["none", "five", "half", "all_but_one"])
    def test_truncated_file_is_one_line_error(self, tmp_path, keep):
        path = str(tmp_path / "f")
        self.write(path)
        size = os.path.getsize(path)
        os.truncate(path, {"none": 0, "five": 5, "half": size // 2, "all_but_one": size - 1}[keep])
        self.assert_one_line_error(path)

    def test_garbage_file_is_one_line_error(self, tmp_path):
        path = str(tmp_path / "f")
        with open(path, "wb") as f:
            f.write(np.random.default_rng(5).integers(0, 256, 4096, dtype=np.uint8).tobytes())
        self.assert_one_line_error(path)

    def test_missing_file_is_one_line_error(self, tmp_path):
        self.assert_one_line_error(str(tmp_path / "missing"))

    # --- 5. checks ----------------------------------------------------------------------------------------------
    def test_check_file_passes_then_names_a_flipped_tensor(self, tmp_path):
        path = str(tmp_path / "f")
        layout, crcs = self.write(path)
        record = {"size": os.path.getsize(path), "crc32": crcs}
        n = len(layout.spans)
        assert self.fmt.check_file(path, record, layout) == (n, [])
        checked = self.fmt.check_file(path, record)
        assert checked.problems == [] and checked.records == n
        victim = max(range(n), key=lambda i: layout.spans[i][1] - layout.spans[i][0])
        start, _ = layout.spans[victim]
        with open(path, "r+b") as f:
            f.seek(start)
            byte = f.read(1)
            f.seek(start)
            f.write(bytes([byte[0] ^ 0xFF]))
        with_layout = self.fmt.check_file(path, record, layout).problems
        assert len(with_layout) == 1 and path in with_layout[0]
        assert layout.entries[victim].name in with_layout[0]
        without = self.fmt.check_file(path, record).problems
        assert len(without) == 1 and path in without[0]

    def test_check_file_refuses_a_wrong_size(self, tmp_path):
        path = str(tmp_path / "f")
        layout, crcs = self.write(path)
        problems = self.fmt.check_file(path, {"size": layout.size + 1, "crc32": crcs}, layout).problems
        assert len(problems) == 1 and "size" in problems[0]
