"""Conformance tests that every streaming tensor writer passes (modelled on zarr's ``StoreTests``).

A writer's test class subclasses :class:`WriterTests` and supplies five hooks:

1. ``begin(path, specs)``: start a file holding the tensors in ``specs`` (name -> (torch dtype, shape), in
   file order). It returns a session object that the other hooks receive.
2. ``put(session, name, data, offset)``: write ``data`` (a tensor of the right dtype, or a uint8 numpy array
   of raw bytes) at byte ``offset`` of tensor ``name``. It may be called in any order.
3. ``finish(session)``: complete the file under its final name.
4. ``abort(session)``: give up, leaving nothing behind.
5. ``load(path)``: read the file back as name -> tensor with the writer's reference reader.

Set ``supports_float8 = False`` when the format cannot hold float8.  The suite builds ``write`` (all tensors,
in a given order, optionally in several pieces each) from these hooks.

Formats that follow the stateless write protocol (a :class:`~streamconv.storage.base.TensorFormat`: ``create``,
``write_piece``, ``finish`` and ``abort`` over a frozen layout) subclass :class:`ProtocolTests` instead and
supply only ``fmt`` (the format object); ``group``, ``attrs`` and ``load(path)`` have defaults (``load`` reads
the file back through ``fmt.index``; override it to check with an independent reader). They get every test
above with the hooks built from the protocol, plus the protocol's own: pieces from other processes (the
format object and the layout are pickled to them), tiling errors, disk-full and fsync errors, the returned
CRCs, cached hashable layouts.

This module imports pytest: only tests import it.
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import pickle
import random
import zlib
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from .. import types
from ..errors import ExecutionError, ValidationError
from ..storage import fileio
from ..storage.base import TensorEntry, TensorFormat
from ..storage.safetensors import bytes_to_tensor

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int64, torch.int32, torch.uint8,
          torch.bool, torch.float8_e4m3fn]


def make_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random bytes viewed as ``dtype`` (NaNs included for floats); bools are 0 or 1."""
    rng = np.random.default_rng(seed)
    numel = int(np.prod(shape, dtype=np.int64))
    if dtype == torch.bool:
        return torch.from_numpy(rng.integers(0, 2, numel, dtype=np.uint8)).view(torch.bool).reshape(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = rng.integers(0, 256, numel * itemsize, dtype=np.uint8)
    return torch.from_numpy(raw).view(dtype).reshape(shape)


def raw_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Names, dtypes, shapes and bytes equal (bitwise, so NaN payloads count)."""
    assert list(got) == list(want)
    for name, w in want.items():
        g = got[name]
        assert g.dtype == w.dtype, name
        assert tuple(g.shape) == tuple(w.shape), name
        assert raw_bytes(g) == raw_bytes(w), name


class WriterTests:
    supports_float8 = True

    # --- hooks ------------------------------------------------------------------------------------------------
    def begin(self, path: str, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]]):
        raise NotImplementedError

    def put(self, session, name: str, data, offset: int) -> None:
        raise NotImplementedError

    def finish(self, session) -> None:
        raise NotImplementedError

    def abort(self, session) -> None:
        raise NotImplementedError

    def load(self, path: str) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # --- helpers ----------------------------------------------------------------------------------------------
    def write(self, path: str, tensors: dict[str, torch.Tensor], order: str = "forward", pieces: int = 1,
              threads: int = 0) -> None:
        """Write ``tensors`` whole (``pieces=1``) or as ``pieces`` uint8 byte ranges each, in ``order``
        (``forward``, ``reverse`` or ``random``), serially or from a thread pool."""
        session = self.begin(path, {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()})
        jobs = []
        for name, t in tensors.items():
            if pieces == 1:
                jobs.append((name, t, 0))
                continue
            raw = np.frombuffer(raw_bytes(t), dtype=np.uint8)
            cuts = sorted({0, len(raw), *(len(raw) * k // pieces for k in range(1, pieces))})
            jobs += [(name, raw[a:b], a) for a, b in zip(cuts, cuts[1:])]
        if order == "reverse":
            jobs.reverse()
        elif order == "random":
            random.Random(1234).shuffle(jobs)
        if threads:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(lambda job: self.put(session, *job), jobs))
        else:
            for job in jobs:
                self.put(session, *job)
        self.finish(session)

    def dtypes(self) -> list[torch.dtype]:
        return [d for d in DTYPES if self.supports_float8 or d != torch.float8_e4m3fn]

    def mixed(self) -> dict[str, torch.Tensor]:
        """Odd sizes in every dtype, so that alignment and padding are exercised."""
        return {f"t{i}.{str(d).split('.')[-1]}": make_tensor(d, (3, 5 + i), seed=i)
                for i, d in enumerate(self.dtypes())}

    # --- tests ------------------------------------------------------------------------------------------------
    @pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
    def test_round_trip_dtype(self, tmp_path, dtype):
        if dtype not in self.dtypes():
            pytest.skip("format has no float8")
        tensors = {"a": make_tensor(dtype, (4, 7), seed=1), "b": make_tensor(dtype, (33,), seed=2)}
        path = str(tmp_path / "f")
        self.write(path, tensors)
        assert_same(self.load(path), tensors)

    def test_mixed_dtypes_one_file(self, tmp_path):
        tensors = self.mixed()
        path = str(tmp_path / "f")
        self.write(path, tensors)
        assert_same(self.load(path), tensors)

    def test_empty_and_zero_dim(self, tmp_path):
        tensors = {"empty": torch.empty(0, 4, dtype=torch.bfloat16), "scalar": torch.tensor(2.5),
                   "empty_mid": torch.empty(2, 0, 3, dtype=torch.int32), "after": make_tensor(torch.float16, (5,))}
        path = str(tmp_path / "f")
        self.write(path, tensors)
        assert_same(self.load(path), tensors)

    def test_non_contiguous_input(self, tmp_path):
        base = make_tensor(torch.float32, (6, 8))
        tensors = {"transposed": base.t(), "strided": base[:, ::3], "offset": base[2:4, 1:]}
        assert not any(t.is_contiguous() for t in tensors.values())
        path = str(tmp_path / "f")
        self.write(path, tensors)
        assert_same(self.load(path), {n: t.contiguous() for n, t in tensors.items()})

    def test_order_does_not_change_bytes(self, tmp_path):
        tensors = self.mixed()
        files = []
        for order in ("forward", "reverse", "random"):
            files.append(str(tmp_path / order))
            self.write(files[-1], tensors, order=order)
        data = [open(f, "rb").read() for f in files]
        assert data[0] == data[1] == data[2]
        assert_same(self.load(files[2]), tensors)

    def test_pieces_equal_whole(self, tmp_path):
        tensors = self.mixed()
        whole, pieces = str(tmp_path / "whole"), str(tmp_path / "pieces")
        self.write(whole, tensors)
        self.write(pieces, tensors, order="random", pieces=3)
        assert open(whole, "rb").read() == open(pieces, "rb").read()
        assert_same(self.load(pieces), tensors)

    def test_threads_equal_serial(self, tmp_path):
        tensors = {f"w{i}": make_tensor(torch.bfloat16, (64, 96), seed=i) for i in range(12)}
        serial, threaded = str(tmp_path / "serial"), str(tmp_path / "threaded")
        self.write(serial, tensors)
        self.write(threaded, tensors, order="random", pieces=4, threads=6)
        assert open(serial, "rb").read() == open(threaded, "rb").read()

    def test_absent_until_finish(self, tmp_path):
        tensors = self.mixed()
        path = str(tmp_path / "f")
        session = self.begin(path, {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()})
        for name, t in tensors.items():
            self.put(session, name, t, 0)
        assert not os.path.exists(path)
        self.finish(session)
        assert os.listdir(tmp_path) == ["f"]
        assert_same(self.load(path), tensors)

    def test_abort_leaves_nothing(self, tmp_path):
        tensors = self.mixed()
        path = str(tmp_path / "f")
        session = self.begin(path, {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()})
        name, t = next(iter(tensors.items()))
        self.put(session, name, t, 0)
        self.abort(session)
        assert os.listdir(tmp_path) == []

    def test_finish_replaces_existing_file(self, tmp_path):
        path = str(tmp_path / "f")
        with open(path, "wb") as f:
            f.write(b"stale")
        tensors = self.mixed()
        self.write(path, tensors)
        assert_same(self.load(path), tensors)


# --- the stateless write protocol ---------------------------------------------------------------------------------

@dataclass
class ProtocolSession:
    path: str
    layout: object
    index: dict[str, int]
    pieces: list = field(default_factory=list)


def _write_in_child(args):
    """A piece written by another process: the format object, path, layout and bytes are pickled over."""
    fmt, path, layout, index, offset, data = args
    return fmt.write_piece(path, layout, index, data, offset)


def _raise_errno(code: int):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))
    return fail


class ProtocolTests(WriterTests):
    fmt: TensorFormat = None  # the format under test
    group: str | None = None  # the tensors' group; None: "g" if the format supports groups, else ""
    attrs: tuple = ()         # top-level attrs of every file written

    @property
    def supports_float8(self) -> bool:
        return self.fmt.supports_float8

    def group_name(self) -> str:
        if self.group is not None:
            return self.group
        return "g" if self.fmt.supports_groups else ""

    def make_layout(self, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]]):
        """The format's layout for ``specs`` (name -> (torch dtype, shape), in file order)."""
        group = self.group_name()
        entries = [TensorEntry(group, n, types.from_torch(d).name, tuple(s)) for n, (d, s) in specs.items()]
        return self.fmt.compute_layout(entries, self.attrs)

    def load(self, path: str) -> dict[str, torch.Tensor]:
        """The file read back through the format's own index: name -> tensor, in file order."""
        return {e.name: bytes_to_tensor(fileio.read_range(path, e.start, e.nbytes), e.dtype, e.shape)
                for e in self.fmt.index(path).tensors}

    # --- WriterTests hooks from the protocol -------------------------------------------------------------------
    def begin(self, path, specs):
        layout = self.make_layout(specs)
        self.fmt.create(path, layout)
        return ProtocolSession(path, layout, {n: i for i, n in enumerate(specs)})

    def put(self, session, name, data, offset):
        # list.append is atomic, so threads may share the list
        piece = self.fmt.write_piece(session.path, session.layout, session.index[name], data, offset)
        session.pieces.append(piece)

    def finish(self, session):
        return self.fmt.finish(session.path, session.layout, session.pieces)

    def abort(self, session):
        self.fmt.abort(session.path)

    # --- helpers ------------------------------------------------------------------------------------------------
    def specs_of(self, tensors):
        return {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()}

    def three(self):
        return {"a": make_tensor(torch.float32, (8,), 1), "b": make_tensor(torch.bfloat16, (4, 8), 2),
                "c": make_tensor(torch.int64, (6,), 3)}

    # --- protocol tests -----------------------------------------------------------------------------------------
    def test_layout_is_cached_hashable_and_picklable(self):
        specs = self.specs_of(self.mixed())
        layout = self.make_layout(specs)
        assert self.make_layout(dict(specs)) is layout
        assert hash(layout) == hash(pickle.loads(pickle.dumps(layout)))
        assert pickle.loads(pickle.dumps(layout)) == layout
        assert type(pickle.loads(pickle.dumps(self.fmt))) is type(self.fmt)  # tasks may carry the format
        assert len(layout.entries) == len(layout.spans) == len(specs)
        assert all(end - start == raw_nbytes(*spec) for (start, end), spec in zip(layout.spans, specs.values()))

    def test_spans_and_crcs_describe_the_file(self, tmp_path):
        tensors = self.mixed()
        path = str(tmp_path / "f")
        session = self.begin(path, self.specs_of(tensors))
        for name, t in tensors.items():
            self.put(session, name, t, 0)
        crcs = self.finish(session)
        data = open(path, "rb").read()
        assert len(data) == session.layout.size
        assert crcs == [zlib.crc32(raw_bytes(t)) for t in tensors.values()]
        for (start, end), t in zip(session.layout.spans, tensors.values()):
            assert data[start:end] == raw_bytes(t)

    def test_pieces_from_other_processes(self, tmp_path):
        tensors = {f"w{i}": make_tensor(torch.float32, (32, 48), seed=i) for i in range(4)}
        path, ref = str(tmp_path / "f"), str(tmp_path / "ref")
        self.write(ref, tensors)
        layout = self.make_layout(self.specs_of(tensors))
        self.fmt.create(path, layout)
        jobs = []
        for i, t in enumerate(tensors.values()):
            raw = np.frombuffer(raw_bytes(t), dtype=np.uint8)
            jobs += [(self.fmt, path, layout, i, lo, raw[lo:lo + 1000]) for lo in range(0, len(raw), 1000)]
        with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork")) as pool:
            pieces = list(pool.map(_write_in_child, jobs[::-1]))
        crcs = self.fmt.finish(path, layout, pieces)
        assert open(path, "rb").read() == open(ref, "rb").read()
        assert crcs == [zlib.crc32(raw_bytes(t)) for t in tensors.values()]

    def test_bad_tiling_names_tensors_and_keeps_the_temp_file(self, tmp_path):
        tensors = self.three()
        path = str(tmp_path / "f")
        session = self.begin(path, self.specs_of(tensors))
        raw_b = np.frombuffer(raw_bytes(tensors["b"]), dtype=np.uint8)
        self.put(session, "a", tensors["a"], 0)
        self.put(session, "b", raw_b[:16], 0)
        self.put(session, "c", tensors["c"], 0)
        self.put(session, "c", np.zeros(8, dtype=np.uint8), 4)
        with pytest.raises(ValidationError) as info:
            self.finish(session)
        problems = info.value.problems
        assert len(problems) == 2
        assert "b: bytes [16, 64) were never written" in problems[0]
        assert "c: pieces overlap at byte 4" in problems[1]
        assert not os.path.exists(path) and os.path.exists(fileio.temp_name(path))
        # Write what is missing, rewrite the damaged tensor, and finish; a duplicate piece (a retry) is fine.
        session.pieces = session.pieces[:2]
        self.put(session, "b", raw_b[16:], 16)
        self.put(session, "c", tensors["c"], 0)
        self.put(session, "a", tensors["a"], 0)
        self.finish(session)
        assert_same(self.load(path), tensors)

    def test_finish_rejects_pieces_of_unknown_entries(self, tmp_path):
        tensors = self.three()
        path = str(tmp_path / "f")
        session = self.begin(path, self.specs_of(tensors))
        for name, t in tensors.items():
            self.put(session, name, t, 0)
        session.pieces.append((7, 0, 4, 0))
        with pytest.raises(ValidationError, match="piece of entry 7"):
            self.finish(session)
        assert not os.path.exists(path)

    def test_write_piece_rejects_bad_pieces(self, tmp_path):
        layout = self.make_layout({"w": (torch.bfloat16, (4, 4))})
        path = str(tmp_path / "f")
        with pytest.raises(ExecutionError, match="Call create"):
            self.fmt.write_piece(path, layout, 0, torch.zeros(4, 4, dtype=torch.bfloat16))
        self.fmt.create(path, layout)
        with pytest.raises(ExecutionError, match=r"w: piece \[28, 36\) lies outside the tensor's 32 bytes"):
            self.fmt.write_piece(path, layout, 0, np.zeros(8, dtype=np.uint8), 28)
        with pytest.raises(ExecutionError, match="outside"):
            self.fmt.write_piece(path, layout, 0, b"xx", -2)
        with pytest.raises(ExecutionError, match="w: piece has dtype torch.float32 .expected torch.bfloat16"):
            self.fmt.write_piece(path, layout, 0, torch.zeros(4, 4))
        with pytest.raises(ExecutionError, match="out of range"):
            self.fmt.write_piece(path, layout, 1, b"")
        self.fmt.abort(path)
        assert os.listdir(tmp_path) == []

    def test_finish_twice_or_after_abort(self, tmp_path):
        tensors = self.three()
        path = str(tmp_path / "f")
        session = self.begin(path, self.specs_of(tensors))
        for name, t in tensors.items():
            self.put(session, name, t, 0)
        self.finish(session)
        with pytest.raises(ExecutionError, match="not found. Call create"):
            self.finish(session)
        assert_same(self.load(path), tensors)  # the finished file is untouched
        self.fmt.abort(path)  # nothing to remove: the final name is never touched
        assert os.listdir(tmp_path) == ["f"]

    def test_finish_refuses_a_temp_file_of_another_layout(self, tmp_path):
        path = str(tmp_path / "f")
        small = self.make_layout({"w": (torch.float32, (4,))})
        big = self.make_layout({"w": (torch.float32, (400,))})
        self.fmt.create(path, small)
        with pytest.raises(ExecutionError, match="created with another layout"):
            self.fmt.finish(path, big, [(0, 0, 1600, 0)])
        assert not os.path.exists(path)

    def test_disk_full_during_a_write(self, tmp_path, monkeypatch):
        tensors = self.three()
        path = str(tmp_path / "f")
        session = self.begin(path, self.specs_of(tensors))
        monkeypatch.setattr(fileio.os, "pwrite", _raise_errno(errno.ENOSPC))
        with pytest.raises(ExecutionError, match="disk full while writing. Free space and run the plan again"):
            self.put(session, "b", tensors["b"], 0)
        monkeypatch.undo()
        assert not os.path.exists(path)
        self.abort(session)
        assert os.listdir(tmp_path) == []

    def test_disk_full_at_create_leaves_nothing(self, tmp_path, monkeypatch):
        layout = self.make_layout(self.specs_of(self.three()))
        monkeypatch.setattr(os, "ftruncate", _raise_errno(errno.ENOSPC))
        with pytest.raises(ExecutionError, match="disk full"):
            self.fmt.create(str(tmp_path / "f"), layout)
        assert os.listdir(tmp_path) == []

    def test_fsync_failure_at_finish_never_shows_the_final_name(self, tmp_path, monkeypatch):
        tensors = self.three()
        path = str(tmp_path / "f")
        session = self.begin(path, self.specs_of(tensors))
        for name, t in tensors.items():
            self.put(session, name, t, 0)
        monkeypatch.setattr(os, "fsync", _raise_errno(errno.EIO))
        with pytest.raises(ExecutionError, match="write failed"):
            self.finish(session)
        monkeypatch.undo()
        assert not os.path.exists(path)
        self.finish(session)  # the pieces are still there: finishing again works
        assert_same(self.load(path), tensors)


def raw_nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return torch.empty((), dtype=dtype).element_size() * int(np.prod(shape, dtype=np.int64))
