"""FP8 (e4m3fn / e5m2) -> bf16 block dequantization, bit-exact with the reference rule.

The reference ``weight_dequant`` kernel of block-scaled FP8 checkpoints computes ``bf16(float32(w) * s)`` per element, ``s`` being the float32 scale of
the element's 128x128 block.  An fp8 element has only 256 possible values, so for each block the result is
one of 256 values: we build, per band of block rows, a table ``lut[block_row, col_block, code] = bf16(float32(code) * s)``
with torch (the very same float32 multiply and round-to-nearest-even cast as the reference), and gather.
That is bit-exact by construction (NaN payloads, infinities, subnormals and signed zeros included: every
output bit pattern was produced by torch itself) and needs no float32 temporary of the weight's size.

The gather runs in a small numba kernel when numba imports (about 5x numpy's ``take``, see
``benchmarks/dequant.py``), else in numpy.  numba is imported and the kernel compiled (or loaded from numba's
cache) on the first dequantization, not at import: a bf16 job never pays for numba's ~60 MiB.  The kernel is compiled with ``nogil=True``: the executor runs
several worker threads in one process, and a kernel that kept the GIL (as ``np.take`` does) would
serialise them, leaving the second core idle on what is the CPU bottleneck of an FP8 conversion.
"""

from __future__ import annotations

import logging
import threading

import numpy as np
import torch

from ..errors import GraphError

log = logging.getLogger(__name__)

_CODES = torch.arange(256, dtype=torch.int32).to(torch.uint8)

# Bound on the table built per kernel call (entries): a band of block rows shares one table, so tiny
# blocks (e.g. 1x1) still make few calls, while a 128x128-blocked 7168x18432 weight builds 4 tables of 1 MiB.
_LUT_ENTRIES = 1 << 19


def _code_values(fp8: torch.dtype) -> torch.Tensor:
    return _CODES.view(fp8).to(torch.float32)


_VALUES = {torch.float8_e4m3fn: _code_values(torch.float8_e4m3fn), torch.float8_e5m2: _code_values(torch.float8_e5m2)}


def _gather_py(codes, lut, r0, br, c0, bc, out):
    """``out[r, c] = lut[(r + r0) // br - r0 // br, (c + c0) // bc, codes[r, c]]`` on 2-D C-contiguous
    uint8 codes and an integer view of the output.  Rows first, then column blocks, then the columns of
    one block, so the innermost loop is a plain 256-entry table lookup (the numba kernel's source)."""
    rows, cols = codes.shape
    first = r0 // br
    for r in range(rows):
        tables = lut[(r + r0) // br - first]
        src = codes[r]
        dst = out[r]
        c = 0
        while c < cols:
            j = (c + c0) // bc
            stop = min(cols, (j + 1) * bc - c0)
            table = tables[j]
            # Unsigned indices: numba then drops its negative-index wraparound code, which doubles the
            # speed of this loop (it becomes load byte, load table entry, store).
            for k in range(np.uint64(c), np.uint64(stop)):
                dst[k] = table[src[k]]
            c = stop


def _jit(fn):
    """numba-compile ``fn`` without the GIL, cached on disk where numba finds a writable cache directory;
    None when numba is missing.  A read-only install only loses the cache (numba raises at decoration
    when no cache locator fits), never the kernel."""
    try:
        import numba
    except ImportError as e:  # optional dependency: the numpy path is exact too, only slower
        log.debug("numba not available (%s): FP8 dequant uses the numpy gather", e)
        return None
    try:
        return numba.njit(nogil=True, cache=True)(fn)
    except RuntimeError as e:
        log.debug("numba cannot cache the dequant kernel (%s): compiling it per process", e)
        return numba.njit(nogil=True)(fn)


_gather_numba = None          # the compiled gather, once have_numba() has run and found numba
HAVE_NUMBA: bool | None = None  # whether the fast path is in use; None until the first dequantization asks
_COMPILE = threading.Lock()   # several executor threads may ask at once: compile once


def have_numba() -> bool:
    """Whether the numba gather is in use, importing numba and compiling the kernel on the first call."""
    global _gather_numba, HAVE_NUMBA
    if HAVE_NUMBA is None:
        with _COMPILE:
            if HAVE_NUMBA is None:
                _gather_numba = _jit(_gather_py)
                HAVE_NUMBA = _gather_numba is not None
    return HAVE_NUMBA


def dequant_fp8_block(w: torch.Tensor, scale: torch.Tensor, *, block: tuple[int, int],
                      origin: tuple[int, int] = (0, 0), dtype: torch.dtype = torch.bfloat16,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize a 2-D fp8 tensor with per-block float32 scales (see ``DequantArg`` for ``origin``).

    ``out``: a CPU tensor of ``w``'s shape and ``dtype`` to write into, any strides (the loader's destination;
    a transposed slot of a grouped-GEMM stack is written directly, without a second, transposing copy)."""
    _check_scale(w, scale, block, origin)
    if out is not None and (tuple(out.shape) != tuple(w.shape) or out.dtype != dtype or out.device.type != "cpu"):
        raise GraphError(f"dequant_fp8_block: out must be a CPU {dtype}{list(w.shape)} tensor (got "
                         f"{out.dtype}{list(out.shape)} on {out.device}).")
    if have_numba():
        return _dequant_numba(w, scale, block=block, origin=origin, dtype=dtype, out=out)
    return _dequant_numpy(w, scale, block=block, origin=origin, dtype=dtype, out=out)


def _check_scale(w, scale, block, origin):
    """The kernel indexes the tables unchecked, so a scale grid that misses blocks must fail here."""
    rows, cols = w.shape
    if min(block) < 1 or min(origin) < 0:
        raise GraphError(f"dequant_fp8_block: bad geometry (expected block >= 1 and origin >= 0, got block {block}, "
                         f"origin {origin}).")
    if rows == 0 or cols == 0:
        return
    need = ((rows - 1 + origin[0]) // block[0] + 1, (cols - 1 + origin[1]) // block[1] + 1)
    if scale.dim() != 2 or scale.shape[0] < need[0] or scale.shape[1] < need[1]:
        raise GraphError(f"dequant_fp8_block: scale grid too small for a {rows}x{cols} weight with block {block} "
                         f"and origin {origin} (expected at least {need[0]}x{need[1]}, got {tuple(scale.shape)}). "
                         "Pass the scale blocks that cover the weight.")


def _tables(values: torch.Tensor, scale: torch.Tensor, b0: int, b1: int, dtype: torch.dtype) -> np.ndarray:
    """``lut[b - b0, j, code] = dtype(values[code] * scale[b, j])`` for block rows ``b0 <= b < b1``, as
    integers: torch's own multiply and rounding, hence bit-exact."""
    lut = (values * scale[b0:b1, :, None]).to(dtype)  # [b1 - b0, n_col_blocks, 256]
    return lut.view(_int_view(dtype)).numpy()


def _prepare(w, scale, dtype, out=None):
    """What both paths start from: the output (torch and integer numpy views), the fp8 codes as uint8, the
    float32 value of each code, float32 scales.  ``codes`` is None for an empty weight."""
    rows, cols = w.shape
    if out is None:
        out, out_np = _empty(rows, cols, dtype)
    else:
        out_np = out.view(_int_view(dtype)).numpy()
    # A column slice of a read (a TP share cut from whole stored rows) is gathered in place: the kernel walks
    # rows, so only the elements within a row need to be adjacent.
    w = w if w.stride(-1) == 1 else w.contiguous()
    codes = w.view(torch.uint8).numpy() if rows and cols else None
    return out, out_np, codes, _VALUES[w.dtype], scale.to(torch.float32)


def _dequant_numba(w, scale, *, block, origin, dtype, out=None):
    rows, cols = w.shape
    br, bc = block
    r0, c0 = origin
    out, out_np, codes, values, scale = _prepare(w, scale, dtype, out)
    if codes is None:
        return out
    per_call = max(1, _LUT_ENTRIES // (256 * scale.shape[1]))  # block rows per table
    start = 0
    while start < rows:
        b0 = (start + r0) // br
        b1 = min(b0 + per_call, (rows - 1 + r0) // br + 1)
        stop = min(rows, b1 * br - r0)
        lut = _tables(values, scale, b0, b1, dtype)
        _gather_numba(codes[start:stop], lut, start + r0, br, c0, bc, out_np[start:stop])
        start = stop
    return out


def _dequant_numpy(w, scale, *, block, origin, dtype, out=None):
    rows, cols = w.shape
    br, bc = block
    r0, c0 = origin
    out, out_np, codes, values, scale = _prepare(w, scale, dtype, out)
    if codes is None:
        return out
    # Column c uses scale column (c + c0) // bc; its table row starts at that block's index * 256.
    col_base = (((np.arange(cols) + c0) // bc) * 256).astype(np.int32)
    start = 0
    while start < rows:
        block_row = (start + r0) // br
        stop = min(rows, (block_row + 1) * br - r0)
        lut_np = _tables(values, scale, block_row, block_row + 1, dtype).ravel()
        index = np.add(col_base[None, :], codes[start:stop], dtype=np.int32)
        np.take(lut_np, index, out=out_np[start:stop])
        start = stop
    return out


def _int_view(dtype: torch.dtype) -> torch.dtype:
    return {2: torch.int16, 4: torch.int32}[torch.empty((), dtype=dtype).element_size()]


def _empty(rows: int, cols: int, dtype: torch.dtype) -> tuple[torch.Tensor, np.ndarray]:
    """A new ``dtype`` tensor and an integer numpy view of it.  Allocated by numpy, which asks the kernel
    for transparent huge pages on large arrays: first-touch page faults cost ~3x less than in a
    ``torch.empty`` buffer, and a whole-weight output is written exactly once, into fresh pages."""
    ints = np.empty((rows, cols), dtype={2: np.int16, 4: np.int32}[torch.empty((), dtype=dtype).element_size()])
    return torch.from_numpy(ints).view(dtype), ints


def dequant_reference(w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """The plain torch formulation (slow; used by tests and benchmarks as the baseline)."""
    br, bc = block
    s = scale.repeat_interleave(br, 0).repeat_interleave(bc, 1)[: w.shape[0], : w.shape[1]]
    return (w.to(torch.float32) * s).to(torch.bfloat16)
