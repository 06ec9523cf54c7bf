"""Copies that are fast on CPU where torch's are not.

torch copies a transposed bf16 view at ~0.2-0.6 GB/s on our machines (its strided kernel walks the source
column by column).  Copying it in bands of rows of the underlying contiguous tensor, through an integer
view of the same width, runs at ~1.5 GB/s: each band's transpose fits in cache.  Grouped-GEMM expert
stacks (``weight1``/``weight2``) are made of exactly such transposes.

Other strided views (a zarr shard's stack of chunks, ``[n, rows, cols]`` out of ``[rows, n * cols]``) copy at
0.1-0.2 GB/s in torch for 1- and 2-byte types, and at ~2 GB/s through numpy on an integer view of the same
width, which is what :func:`contiguous` and :func:`cat` use for them.
"""

from __future__ import annotations

import numpy as np
import torch

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_BAND = 128  # rows of the underlying tensor per step: 128 x 7168 x 2 bytes = 1.8 MB, fits in L2/L3


def _is_transposed_2d(t: torch.Tensor) -> bool:
    return t.dim() == 2 and t.shape[0] > 1 and t.shape[1] > 1 and t.stride() == (1, t.shape[0])


def copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)``, fast when ``src`` is the transpose of a contiguous 2-D tensor."""
    if not _is_transposed_2d(src) or dst.dtype != src.dtype or dst.element_size() not in _INT_VIEW:
        dst.copy_(src)
        return
    iv = _INT_VIEW[dst.element_size()]
    base = src.t()                       # contiguous [C, R]
    d = dst.view(iv)  # same width: allowed for any strides
    b = base.view(iv)
    for i in range(0, base.shape[0], _BAND):
        d[:, i:i + _BAND].copy_(b[i:i + _BAND].t())


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    """The same elements (and strides) as an integer numpy array of the same width."""
    return t.view(_INT_VIEW[t.element_size()]).numpy()


def _from_numpy(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(a).view(dtype)


def _numpy_ok(parts) -> bool:
    return all(p.element_size() in _INT_VIEW and p.device.type == "cpu" and p.numel() for p in parts)


def contiguous(t: torch.Tensor) -> torch.Tensor:
    if t.is_contiguous():
        return t
    if t.device.type != "cpu":  # the banded copy is a host-cache trick; devices copy strided views well
        return t.contiguous()
    if not _is_transposed_2d(t) and _numpy_ok([t]):
        return _from_numpy(np.ascontiguousarray(_as_numpy(t)), t.dtype)
    out = torch.empty(t.shape, dtype=t.dtype)
    copy_into(out, t)
    return out


def cat(parts: tuple[torch.Tensor, ...], dim: int) -> torch.Tensor:
    """``torch.cat`` that copies transposed parts with :func:`copy_into` and other strided parts through
    numpy."""
    if parts[0].device.type != "cpu":  # the banded copy is a host-cache trick; devices copy strided views well
        return torch.cat(parts, dim=dim)
    if not any(_is_transposed_2d(p) for p in parts):
        if all(p.is_contiguous() for p in parts) or not _numpy_ok(parts):
            return torch.cat(parts, dim=dim)
        return _from_numpy(np.concatenate([_as_numpy(p) for p in parts], axis=dim), parts[0].dtype)
    shape = list(parts[0].shape)
    shape[dim] = sum(p.shape[dim] for p in parts)
    out = torch.empty(shape, dtype=parts[0].dtype)
    pos = 0
    for p in parts:
        copy_into(out.narrow(dim, pos, p.shape[dim]), p)
        pos += p.shape[dim]
    return out
