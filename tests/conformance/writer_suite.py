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
"""

from __future__ import annotations

import os
import random
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

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
