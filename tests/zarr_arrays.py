"""An independent writer of sharded zarr arrays for the tests: numpy reshapes over the format's write protocol
(each shard's entries are its chunk rows), not the planner's graphs."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from streamconv.storage.zarr_shard import ZARR
from streamconv.storage.zarr_store import Codec, array_json


def tensor(shape, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    if dtype in (torch.float8_e4m3fn,):
        return (x * 8).to(dtype)
    return x.to(dtype)


def raw(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.uint8).numpy().reshape(-1)


def write_array(root, name, t, chunk, shard, codec="none", order=None, pieces=1):
    """An independent writer of one sharded array through the format's protocol: each shard's entries are its
    chunk rows, ``[n, chunk rows, chunk cols]`` (numpy reshapes written here, not the planner's graphs)."""
    dtype = str(t.dtype).split(".")[-1]
    path = os.path.join(root, name)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "zarr.json"), "w") as f:
        f.write(array_json(tuple(t.shape), dtype, tuple(shard), tuple(chunk), Codec(codec)))
    (R, C), (cr, cc), (sr, sc) = t.shape, chunk, shard
    attrs = (("codec", codec), ("level", 3), ("stacked", True))
    for i in range(R // sr):
        for j in range(C // sc):
            block = t[i * sr:(i + 1) * sr, j * sc:(j + 1) * sc]
            entries, datas = [], []
            for k in range(sr // cr):
                rows = block[k * cr:(k + 1) * cr]
                stack = rows.reshape(cr, sc // cc, cc).transpose(0, 1).contiguous()
                entries.append(("", f"r{k}", dtype, tuple(stack.shape)))
                datas.append(stack)
            file = os.path.join(path, "c", str(i), str(j))
            os.makedirs(os.path.dirname(file), exist_ok=True)
            layout = ZARR.compute_layout(entries, attrs)
            ZARR.create(file, layout)
            jobs = []
            for e, d in enumerate(datas):
                b = raw(d)
                cuts = sorted({0, len(b), *(len(b) * q // pieces for q in range(1, pieces))})
                jobs += [(e, b[a:z], a) for a, z in zip(cuts, cuts[1:])]
            if order == "random":
                random.Random(3).shuffle(jobs)
            got = [ZARR.write_piece(file, layout, e, b, a) for e, b, a in jobs]
            ZARR.finish(file, layout, got)
    return path


def as_stored(t):
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else raw(t).reshape(t.shape)
