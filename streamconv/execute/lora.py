"""The LoRA merge kernel: ``W + dtype(float32(left) @ float32(right)) * (alpha / rank)``.

MindSpeed's ``_merge_lora`` (spec §5.2) computes, per rank shard, ``base + (alpha / r) * matmul(B.float(),
A.float()).to(base.dtype)``: the product in float32, rounded once to the base dtype, multiplied by the Python
float ``alpha / r`` (a result in the base dtype), then added to the base in the base dtype.  This kernel runs
those steps in that order, on bands of rows.

The float32 product needs one more decision to be reproducible: BLAS picks its kernel by matrix shape, so
``torch.matmul`` of a band of rows can round differently from the whole matrix (a 5-row band does; a 500-row
one does not).  Here every product element is one fused multiply-add chain over the rank in order,
``acc = fma(left[i, k], right[k, j], acc)`` for k = 0 .. r-1 from ``acc = 0``, which is what torch's float32
matmul computes for matrices of a few dozen rows and more (tested), and the same whatever band the executor
cuts.  When the factors' products are exact (the tests' factors) every method agrees, and the merged bytes are
the reference's whatever its hardware.

The chain runs in a numba kernel (``llvm.fma``, nogil); without numba, in torch, accumulating each step in
float64 and rounding to float32 (a product of floats is exact in float64, so this differs from a true FMA only
in rare double-rounding ties).
"""

from __future__ import annotations

import logging
import threading

import numpy as np
import torch

log = logging.getLogger(__name__)

_BAND_ELEMENTS = 1 << 22   # float32 temporaries of 16 MiB per step


def lora_scale(alpha: str, rank: int) -> float:
    """The Python float the reference multiplies by, ``alpha / r``: an int alpha below 2**53 converts to float
    exactly, so ``float(alpha) / rank`` is the same correctly rounded quotient as ``int / int``."""
    return float(alpha) / rank


def _kernels(njit, fma, as_bits, as_float):
    """The numba kernels, from the float32 fused multiply-add ``fma`` and the float32 <-> uint32 bit casts.

    ``chain``: row by row, ``out[i] = fma(left[i, r-1], right[r-1], ... fma(left[i, 0], right[0], 0))``; the
    inner loop is a separate 1-D function, which LLVM vectorizes (a 2-D loop body is left scalar).
    ``merge_bf16``: the whole merge for a bf16 weight in one pass over each row (bf16 as uint16 bits): the
    chain, then ``bf16(acc)``, ``bf16(float(d) * scale)``, ``bf16(float(w) + float(s))``, each rounding to
    nearest even as torch does, so the bytes are those of the torch ops of :func:`merge_lora`'s general path
    without their float32 temporaries.  A NaN becomes 0xFFFF, as torch's vectorized conversion makes it (its
    scalar one gives 0x7FC0; which one torch uses depends on the position in the tensor)."""

    @njit
    def axpy(x, y, a):
        for j in range(x.shape[0]):
            y[j] = fma(a, x[j], y[j])

    @njit
    def chain(left, right, out):
        rows, rank = left.shape
        for i in range(rows):
            acc = out[i]
            acc[:] = 0.0
            for k in range(rank):
                axpy(right[k], acc, left[i, k])

    @njit
    def bf16(x):
        if x != x:
            return np.uint16(0xFFFF)
        bits = as_bits(x)
        return np.uint16((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))

    @njit
    def widen(h):
        return as_float(np.uint32(h) << np.uint32(16))

    @njit
    def combine(w, acc, out, scale):
        for j in range(acc.shape[0]):
            scaled = bf16(widen(bf16(acc[j])) * scale)
            out[j] = bf16(widen(w[j]) + widen(scaled))

    @njit
    def merge_bf16(w, left, right, out, scale):
        rows, rank = left.shape
        acc = np.empty(right.shape[1], np.float32)
        for i in range(rows):
            acc[:] = 0.0
            for k in range(rank):
                axpy(right[k], acc, left[i, k])
            combine(w[i], acc, out[i], scale)

    return chain, merge_bf16


def _build():
    try:
        import numba
        from llvmlite import ir
        from numba import types
        from numba.core import cgutils
        from numba.extending import intrinsic
    except ImportError as e:  # optional: the torch path below is exact up to rare double-rounding ties
        log.debug("numba not available (%s): the LoRA product accumulates in torch", e)
        return None, None

    f32, i32 = ir.FloatType(), ir.IntType(32)

    @intrinsic
    def fma32(typingctx, a, b, c):
        def codegen(context, builder, signature, args):
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f32, [f32, f32, f32]),
                                                "llvm.fma.f32")
            return builder.call(fn, args)

        return types.float32(types.float32, types.float32, types.float32), codegen

    @intrinsic
    def as_bits(typingctx, x):
        return types.uint32(types.float32), lambda context, builder, signature, args: builder.bitcast(args[0], i32)

    @intrinsic
    def as_float(typingctx, x):
        return types.float32(types.uint32), lambda context, builder, signature, args: builder.bitcast(args[0], f32)

    return _kernels(numba.njit(nogil=True), fma32, as_bits, as_float)


_fma_chain = _merge_bf16 = None   # the compiled kernels, once have_numba() has run and found numba
HAVE_NUMBA: bool | None = None    # None until a LoRA product is first computed (numba is imported then)
_COMPILE = threading.Lock()


def have_numba() -> bool:
    """Whether the numba kernels are available, importing numba on the first call (not at import)."""
    global _fma_chain, _merge_bf16, HAVE_NUMBA
    if HAVE_NUMBA is None:
        with _COMPILE:
            if HAVE_NUMBA is None:
                _fma_chain, _merge_bf16 = _build()
                HAVE_NUMBA = _fma_chain is not None
    return HAVE_NUMBA


def product(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """float32 ``left @ right`` as an in-order FMA chain over the inner dimension (see the module docstring)."""
    l32 = left.to(torch.float32).contiguous()
    r32 = right.to(torch.float32).contiguous()
    out = torch.empty(l32.shape[0], r32.shape[1], dtype=torch.float32)
    if out.numel() == 0:
        return out
    global _fma_chain
    if have_numba() and _fma_chain is not None:
        try:
            _fma_chain(l32.numpy(), r32.numpy(), out.numpy())   # compiled on first use
            return out
        except Exception as e:  # noqa: BLE001  (a numba that cannot lower the intrinsic: use torch from now on)
            log.warning("the numba LoRA kernel failed to compile (%s); the product accumulates in torch", e)
            _fma_chain = None
    acc = torch.zeros(out.shape, dtype=torch.float64)
    for k in range(l32.shape[1]):
        acc = (l32[:, k:k + 1].double() * r32[k:k + 1].double() + acc).to(torch.float32).double()
    return acc.to(torch.float32)


def merge_lora(w: torch.Tensor, left: torch.Tensor, right: torch.Tensor, *, alpha: str, rank: int) -> torch.Tensor:
    """``w`` [R, C] plus the scaled product of ``left`` [R, k] and ``right`` [k, C], in ``w``'s dtype."""
    global _merge_bf16
    scale = lora_scale(alpha, rank)
    rows, cols = w.shape
    out = torch.empty((rows, cols), dtype=w.dtype)
    if rows == 0 or cols == 0:
        return out
    if w.dtype == torch.bfloat16 and have_numba() and _merge_bf16 is not None:
        try:   # one fused pass (the bytes of the torch path below, without its float32 temporaries)
            _merge_bf16(w.view(torch.uint16).numpy(), left.to(torch.float32).contiguous().numpy(),
                        right.to(torch.float32).contiguous().numpy(), out.view(torch.uint16).numpy(),
                        np.float32(scale))
            return out
        except Exception as e:  # noqa: BLE001  (a numba that cannot lower the intrinsics: use torch from now on)
            log.warning("the numba LoRA merge kernel failed (%s); merging with torch ops", e)
            _merge_bf16 = None
    step = max(1, _BAND_ELEMENTS // cols)
    for a in range(0, rows, step):
        b = min(rows, a + step)
        delta = product(left[a:b], right).to(w.dtype)
        torch.add(w[a:b], delta * scale, out=out[a:b])
    return out
