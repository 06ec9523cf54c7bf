"""FP8 (e4m3fn / e5m2) -> bf16 block dequantization, bit-exact with the reference rule.

The reference ``weight_dequant`` kernel of block-scaled FP8 checkpoints computes ``bf16(float32(w) * s)`` per element, ``s`` being the float32 scale of
the element's 128x128 block.  An fp8 element has only 256 possible values, so for each block the result is
one of 256 values: we build, per band of block rows, a table ``lut[col_block, code] = bf16(float32(code) * s)``
with torch (the very same float32 multiply and round-to-nearest-even cast as the reference), and gather.
That is bit-exact by construction (NaN payloads included) and needs no float32 temporary of the weight's size.
"""

from __future__ import annotations

import numpy as np
import torch

_CODES = torch.arange(256, dtype=torch.int32).to(torch.uint8)


def _code_values(fp8: torch.dtype) -> torch.Tensor:
    return _CODES.view(fp8).to(torch.float32)


_VALUES = {torch.float8_e4m3fn: _code_values(torch.float8_e4m3fn), torch.float8_e5m2: _code_values(torch.float8_e5m2)}


def dequant_fp8_block(w: torch.Tensor, scale: torch.Tensor, *, block: tuple[int, int] = (128, 128),
                      origin: tuple[int, int] = (0, 0), dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Dequantize a 2-D fp8 tensor with per-block float32 scales (see ``DequantArg`` for ``origin``)."""
    rows, cols = w.shape
    br, bc = block
    r0, c0 = origin
    values = _VALUES[w.dtype]
    out = torch.empty((rows, cols), dtype=dtype)
    if rows == 0 or cols == 0:
        return out
    codes = w.contiguous().view(torch.uint8).numpy()
    out_np = out.view(_int_view(dtype)).numpy()
    scale = scale.to(torch.float32)
    # Column c uses scale column (c + c0) // bc; its table row starts at that block's index * 256.
    col_base = (((np.arange(cols) + c0) // bc) * 256).astype(np.int32)
    start = 0
    while start < rows:
        block_row = (start + r0) // br
        stop = min(rows, (block_row + 1) * br - r0)
        lut = (values[None, :] * scale[block_row][:, None]).to(dtype)          # [n_col_blocks, 256]
        lut_np = lut.view(_int_view(dtype)).numpy().ravel()
        index = np.add(col_base[None, :], codes[start:stop], dtype=np.int32)
        np.take(lut_np, index, out=out_np[start:stop])
        start = stop
    return out


def _int_view(dtype: torch.dtype) -> torch.dtype:
    return {2: torch.int16, 4: torch.int32}[torch.empty((), dtype=dtype).element_size()]


def dequant_reference(w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """The plain torch formulation (slow; used by tests and benchmarks as the baseline)."""
    br, bc = block
    s = scale.repeat_interleave(br, 0).repeat_interleave(bc, 1)[: w.shape[0], : w.shape[1]]
    return (w.to(torch.float32) * s).to(torch.bfloat16)
