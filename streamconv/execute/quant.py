"""Block-scaled FP8 quantization, the inverse of :mod:`.dequant`: the ``amax / fp8_max`` weight recipe of
block-scaled FP8 releases.

Two kernels, one per op:

* :func:`fp8_block_scale`: ``scale_inv[i, j] = amax(|float32(x[block i, j])|) / fp8_max`` in float32 (IEEE
  division), ``fp8_max`` = 448 for float8_e4m3fn, 57344 for float8_e5m2.  An all-zero block gets
  ``scale_inv = 0``; a block holding a NaN gets NaN, one holding an infinity gets inf (amax propagates them).
* :func:`quant_fp8_block`: ``out[r, c] = fp8(float32(x[r, c]) / scale_inv[(r + r0) // br, (c + c0) // bc])``,
  except ``+0`` (code 0x00) wherever that scale is zero (of either sign).

Exactness: the quotient is torch's float32 division and the rounding is torch's own float32 -> fp8 cast, the
very operations of :func:`quant_reference`, applied to one band of rows at a time; banding changes which
elements share a torch call, never the value of one, so the kernel is bit-identical to the reference by
construction (tests check it on every fp8 code, NaN/inf/-0 and random data).  The cast semantics are those of
torch 2.13 on CPU (pinned by ``tests/unit/test_quant.py``): round to nearest even; float8_e4m3fn has no
infinity and **saturates**: finite quotients beyond 448 and +-inf become +-448 (0x7E/0xFE); float8_e5m2
overflows to +-inf; NaN stays NaN with its sign (0x7F/0xFF).

Why torch rather than a numba kernel like the dequant gather: the band loop quantizes ~0.5-0.6 Gelem/s per
core (one thread, bf16 [2048, 7168]; block scales ~1.4 Gelem/s), enough for a conversion that is bound by
reading and writing; torch releases the GIL inside each call; and a hand-written float32 -> fp8 rounding would
be a second definition of the cast to keep in step with torch's.

Memory: float32 temporaries are bounded by ``_BAND_ELEMENTS`` per call whatever the input's size.
"""

from __future__ import annotations

import torch

from ..errors import GraphError

FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}
# Midpoints between the largest finite value and the next step: quotients below them round to at most FP8_MAX.
KEEP_LIMIT = {torch.float8_e4m3fn: 464.0, torch.float8_e5m2: 61440.0}

# Elements per torch call: bounds the float32 temporaries (4 MiB) while keeping each call long enough that
# the per-call overhead stays small next to the arithmetic.
_BAND_ELEMENTS = 1 << 20


def _check_geometry(name: str, block, origin) -> None:
    if min(block) < 1 or min(origin) < 0:
        raise GraphError(f"{name}: bad geometry (expected block >= 1 and origin >= 0, got block {block}, "
                         f"origin {origin}).")


def _fp8_max(dtype: torch.dtype) -> float:
    try:
        return FP8_MAX[dtype]
    except KeyError:
        raise GraphError(f"fp8 block quantization: unsupported dtype {dtype} (expected torch.float8_e4m3fn or "
                         "torch.float8_e5m2).") from None


def _row_bands(lo: int, hi: int, cols: int):
    """``[a, b)`` pieces of rows ``[lo, hi)`` of at most ``_BAND_ELEMENTS`` elements (at least one row)."""
    step = max(1, _BAND_ELEMENTS // max(cols, 1))
    for a in range(lo, hi, step):
        yield a, min(hi, a + step)


def fp8_block_scale(x: torch.Tensor, *, block: tuple[int, int],
                    dtype: torch.dtype = torch.float8_e4m3fn, prefer: torch.Tensor | None = None) -> torch.Tensor:
    """Per-block ``scale_inv`` (float32, ``[ceil(R/br), ceil(C/bc)]``) of a 2-D floating tensor ``x``.

    ``scale_inv[i, j] = amax(|x|) / fp8_max`` over block (i, j); edge blocks cover only the rows and columns
    that exist (as if zero-padded, which leaves the maximum unchanged).
    """
    _check_geometry("fp8_block_scale", block, (0, 0))
    fmax = _fp8_max(dtype)
    rows, cols = x.shape
    br, bc = block
    nr, nc = -(-rows // br), -(-cols // bc)
    out = torch.zeros(nr, nc, dtype=torch.float32)
    if rows == 0 or cols == 0:
        return out
    pad = nc * bc - cols
    for i in range(nr):
        colmax = None
        for a, b in _row_bands(i * br, min(rows, (i + 1) * br), cols):
            # |x| and its maximum are exact in x's own dtype, so the float32 conversion can wait until the
            # column maxima; torch.maximum and amax both propagate NaN, as the recipe's amax does.
            m = x[a:b].abs().amax(dim=0)
            colmax = m if colmax is None else torch.maximum(colmax, m)
        colmax = torch.nn.functional.pad(colmax.to(torch.float32), (0, pad))
        out[i] = colmax.view(nc, bc).amax(dim=1)
    fresh = out / fmax
    if prefer is None:
        return fresh
    if tuple(prefer.shape) != (nr, nc) or prefer.dtype != torch.float32:
        raise ValueError(f"fp8_block_scale: preferred scales {prefer.dtype}{list(prefer.shape)}, expected "
                         f"float32{[nr, nc]}")
    # Keep the preferred scale while quantizing with it rounds into range (amax < limit * prefer; an all-zero
    # block keeps a zero scale); a NaN on either side compares false and takes the fresh scale.
    keep = (out < KEEP_LIMIT[dtype] * prefer) | ((out == 0) & (prefer == 0))
    return torch.where(keep, prefer, fresh)


def quant_fp8_block(x: torch.Tensor, scale: torch.Tensor, *, block: tuple[int, int],
                    origin: tuple[int, int] = (0, 0), dtype: torch.dtype = torch.float8_e4m3fn) -> torch.Tensor:
    """Quantize a 2-D floating tensor with per-block float32 ``scale`` (``scale_inv``; see ``QuantArg`` for
    ``origin``).  Bit-identical to :func:`quant_reference`; zero scales give +0."""
    _check_geometry("quant_fp8_block", block, origin)
    _fp8_max(dtype)
    rows, cols = x.shape
    br, bc = block
    r0, c0 = origin
    out = torch.empty(rows, cols, dtype=dtype)
    if rows == 0 or cols == 0:
        return out
    need = ((rows - 1 + r0) // br + 1, (cols - 1 + c0) // bc + 1)
    if scale.dim() != 2 or scale.shape[0] < need[0] or scale.shape[1] < need[1]:
        raise GraphError(f"quant_fp8_block: scale grid too small for a {rows}x{cols} tensor with block {block} "
                         f"and origin {origin} (expected at least {need[0]}x{need[1]}, got {tuple(scale.shape)}). "
                         "Pass the scale blocks that cover the tensor.")
    scale = scale.to(torch.float32)
    col_block = (torch.arange(cols) + c0) // bc
    tmp = torch.empty(min(rows, max(1, _BAND_ELEMENTS // cols)), cols, dtype=torch.float32)
    start = 0
    while start < rows:
        i = (start + r0) // br
        stop = min(rows, (i + 1) * br - r0)
        srow = scale[i].index_select(0, col_block)   # this block row's scale for every column
        zero = srow == 0
        fill = bool(zero.any())
        for a, b in _row_bands(start, stop, cols):
            q = tmp[: b - a]
            # bf16/fp16 -> float32 is exact, so dividing x by float32 scales is the float32 quotient itself
            torch.div(x[a:b], srow, out=q)
            if fill:
                q.masked_fill_(zero, 0.0)
            out[a:b].copy_(q)
        start = stop
    return out


def quant_reference(x: torch.Tensor, scale: torch.Tensor, block: tuple[int, int],
                    origin: tuple[int, int] = (0, 0), dtype: torch.dtype = torch.float8_e4m3fn) -> torch.Tensor:
    """The formula written out (slow; tests and benchmarks): expand the scales, divide, cast once."""
    br, bc = block
    r0, c0 = origin
    rows, cols = x.shape
    s = scale.to(torch.float32).repeat_interleave(br, 0).repeat_interleave(bc, 1)[r0:r0 + rows, c0:c0 + cols]
    q = x.to(torch.float32) / s
    return q.masked_fill(s == 0, 0.0).to(dtype)
