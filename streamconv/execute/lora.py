"""The LoRA merge kernel: ``W + dtype(float32(left) @ float32(right)) * (alpha / rank)``.

MindSpeed's ``_merge_lora`` (spec §5.2) computes, per rank shard, ``base + (alpha / r) * matmul(B.float(),
A.float()).to(base.dtype)``: the product in float32, rounded once to the base dtype, multiplied by the Python
float ``alpha / r`` (a bf16 result), then added to the base in bf16.  This kernel runs exactly those torch ops,
in that order, on bands of rows, so the merged bytes are the reference's wherever the float32 product is the
same; every step after the matmul is elementwise, and each product element is one dot product over the rank
(no band changes which terms it sums).

Memory: the float32 product is bounded by ``_BAND_ELEMENTS`` per step, whatever the band the executor hands in.
"""

from __future__ import annotations

import torch

_BAND_ELEMENTS = 1 << 22   # float32 temporaries of 16 MiB per step


def lora_scale(alpha: str, rank: int) -> float:
    """The Python float the reference multiplies by, ``alpha / r``: an int alpha below 2**53 converts to float
    exactly, so ``float(alpha) / rank`` is the same correctly rounded quotient as ``int / int``."""
    return float(alpha) / rank


def merge_lora(w: torch.Tensor, left: torch.Tensor, right: torch.Tensor, *, alpha: str, rank: int) -> torch.Tensor:
    """``w`` [R, C] plus the scaled product of ``left`` [R, k] and ``right`` [k, C], in ``w``'s dtype."""
    scale = lora_scale(alpha, rank)
    rows, cols = w.shape
    out = torch.empty((rows, cols), dtype=w.dtype)
    if rows == 0 or cols == 0:
        return out
    right32 = right.to(torch.float32)
    step = max(1, _BAND_ELEMENTS // cols)
    for a in range(0, rows, step):
        b = min(rows, a + step)
        delta = torch.matmul(left[a:b].to(torch.float32), right32).to(w.dtype)
        torch.add(w[a:b], delta * scale, out=out[a:b])
    return out
