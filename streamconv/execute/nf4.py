"""bitsandbytes NF4 (QLoRA's 4-bit NormalFloat) in plain torch: quantization with double-quantized statistics,
and dequantization, bit-exact with bitsandbytes' CPU path and streamable in bands of rows.

The format (``Params4bit(quant_type="nf4", blocksize=64, compress_statistics=True)``, spec §6.1), for a weight
of N elements taken in row-major order and cut into blocks of 64:

* ``absmax[b]`` = max |x| over block b, in float32 (exact: |x| and max are exact in the input dtype);
* codes: ``s = clamp(float32(x) * (1 / max(absmax[b], 1e-38)), -1, 1)`` (float32 reciprocal, then product),
  ``index = bucketize(s, midpoints)`` with the float32 midpoints of the ascending NF4 table (ties go to the
  lower index) -- bitsandbytes' default (CPU) ``quantize_4bit`` kernel, op for op;
* packing, two codes a byte: ``cuda`` puts element 2i in the high nibble and stores the index itself
  (bitsandbytes' CUDA and CPU order); ``npu`` puts element 2i in the low nibble and stores (index + 8) mod 16
  (the Ascend backend's ``backends/npu/ops.py``). Both use the index chosen as above;
* double quantization of the absmax (``quantize_blockwise(absmax - offset, blocksize=256)``, bitsandbytes' CPU
  kernel as of 0.50): ``offset = mean(absmax)`` (torch's float32 mean of the whole vector), per block of 256
  the scale ``m = max |absmax - offset|``, ``v = clamp((absmax - offset) * (1 / m), -1, 1)`` and the code
  ``lut[int((v + 1) * 0.5 * 65535 + 0.5)]`` from a 65536-entry table mapping ``-1 + 2i / 65535`` to the
  number of midpoints of the dynamic map below it (float32 throughout; a zero scale gives code 0).  This is
  the kernel's own approximation of "nearest entry" (about 0.3% of codes differ from the exact nearest), so
  the bytes are bitsandbytes'; older bitsandbytes builds searched the map exactly and can differ in those;
* dequantization: ``absmax = dynamic[code] * m[b // 256] + offset`` and ``x = dtype(nf4[index] *
  absmax[b])``, float32 operations in that order.

Every step is elementwise once the absmax of a block is known, so a band of rows is quantized on its own with
the absmax of the blocks it touches; only ``offset`` needs the whole absmax vector (N / 64 floats).
"""

from __future__ import annotations

import json

import torch

# The 16 NF4 values, ascending (bitsandbytes ``get_4bit_type("nf4")``): normal quantiles scaled to [-1, 1].
NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
NF4 = torch.tensor(NF4_VALUES, dtype=torch.float32)
_MIDPOINTS = (NF4[:-1] + NF4[1:]) / 2
_BAND_ELEMENTS = 1 << 22


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (``create_dynamic_map()``: 7 exponent bits), 256 sorted float32
    values."""
    data = []
    max_exp, non_sign = 7, 7
    for i in range(max_exp):
        items = 2 ** (i + non_sign - max_exp) + 1
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-(max_exp - 1) + i)) * means).tolist()   # float32 products, as bitsandbytes
        data += (-(10 ** (-(max_exp - 1) + i)) * means).tolist()
    data += [0, 1.0]
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


_LUT_SIZE = 65536


def _dynamic_lut() -> torch.Tensor:
    """bitsandbytes' CPU quantization table: entry i = how many midpoints of the map lie below -1 + 2i/65535."""
    code = dynamic_map()
    midpoints = 0.5 * (code[:-1] + code[1:])
    grid = -1.0 + (2.0 * torch.arange(_LUT_SIZE, dtype=torch.float32)) / float(_LUT_SIZE - 1)
    return torch.searchsorted(midpoints, grid, side="left").to(torch.uint8)


_LUT = _dynamic_lut()


def table(name: str) -> torch.Tensor:
    return NF4.clone() if name == "nf4" else dynamic_map()


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().reshape(-1)


def absmax(x: torch.Tensor, *, blocksize: int, origin: int) -> torch.Tensor:
    """float32 max |x| per block of the row-major elements; the first block starts ``origin`` elements before
    ``x``'s first element (the missing ones count as 0, which leaves the max unchanged)."""
    flat = _flat(x)
    n = flat.numel()
    nblocks = -(-(origin + n) // blocksize) if n else 0
    out = torch.zeros(nblocks, dtype=torch.float32)
    if not n:
        return out
    padded = torch.nn.functional.pad(flat, (origin, nblocks * blocksize - origin - n)).view(nblocks, blocksize)
    step = max(1, _BAND_ELEMENTS // blocksize)
    for a in range(0, nblocks, step):
        out[a:a + step] = padded[a:a + step].abs().amax(dim=1).to(torch.float32)
    return out


def _indices(x: torch.Tensor, amax: torch.Tensor, blocksize: int, origin: int) -> torch.Tensor:
    """NF4 table index (int64) of each element: bitsandbytes' reciprocal-multiply, clamp and bucketize."""
    flat = _flat(x)
    block = (torch.arange(flat.numel()) + origin) // blocksize
    recip = 1.0 / amax.clamp(min=1e-38)
    scaled = torch.clamp(flat.to(torch.float32) * recip[block], -1, 1)
    return torch.bucketize(scaled, _MIDPOINTS)


def quantize(x: torch.Tensor, amax: torch.Tensor, *, blocksize: int, origin: int, layout: str) -> torch.Tensor:
    """Packed NF4 codes, uint8 [numel / 2, 1] (see the module docstring for ``layout``)."""
    n = x.numel()
    out = torch.empty(n // 2, dtype=torch.uint8)
    flat = _flat(x)
    step = max(2, (_BAND_ELEMENTS // 2) * 2)
    for a in range(0, n, step):
        b = min(n, a + step)
        q = _indices(flat[a:b], amax, blocksize, origin + a).to(torch.uint8)
        if layout == "npu":
            q = (q + 8) % 16
            out[a // 2:b // 2] = q[0::2] | (q[1::2] << 4)
        else:
            out[a // 2:b // 2] = (q[0::2] << 4) | q[1::2]
    return out.view(-1, 1)


def offset(amax: torch.Tensor) -> torch.Tensor:
    """The double quantization's offset: torch's float32 mean of the whole absmax vector (as bitsandbytes)."""
    return amax.mean()


def nested(amax: torch.Tensor, part: str, *, blocksize: int) -> torch.Tensor:
    """Double quantization of ``amax``: uint8 codes (``part="codes"``) or float32 block scales (``"scales"``)."""
    centred = amax - offset(amax)
    n = centred.numel()
    nblocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(centred, (0, nblocks * blocksize - n)).view(nblocks, blocksize)
    scales = padded.abs().amax(dim=1) if n else torch.zeros(0, dtype=torch.float32)
    if part == "scales":
        return scales
    inv = (1.0 / scales).repeat_interleave(blocksize)[:n]
    v = torch.clamp(centred * inv, -1.0, 1.0)
    index = ((v + 1.0) * 0.5 * float(_LUT_SIZE - 1) + 0.5).to(torch.int64)
    codes = _LUT[index]
    return torch.where(scales.repeat_interleave(blocksize)[:n] == 0, torch.zeros_like(codes), codes)


def state_json(amax: torch.Tensor, *, shape, dtype: str, blocksize: int, nested_blocksize: int,
               width: int) -> torch.Tensor:
    """The packed quant state (bitsandbytes' ``pack_dict_to_tensor``), space-padded to ``width`` bytes."""
    text = json.dumps({"quant_type": "nf4", "blocksize": blocksize, "dtype": dtype, "shape": list(shape),
                       "nested_blocksize": nested_blocksize, "nested_dtype": "float32",
                       "nested_offset": offset(amax).item()}).encode()
    if len(text) > width:
        raise ValueError(f"nf4 quant state: {len(text)} bytes do not fit the planned {width}")
    return torch.frombuffer(bytearray(text.ljust(width)), dtype=torch.uint8)


def scales(codes: torch.Tensor, nested_scales: torch.Tensor, dynamic: torch.Tensor, state: torch.Tensor, *,
           nested_blocksize: int) -> torch.Tensor:
    """The float32 block absmax of a double-quantized weight (``dequantize_blockwise`` then ``+= offset``)."""
    meta = json.loads(bytes(state.contiguous().numpy()).decode("utf-8"))
    off = torch.tensor(float(meta["nested_offset"]), dtype=torch.float32)
    block = torch.arange(codes.numel()) // nested_blocksize
    return dynamic[codes.to(torch.int64)] * nested_scales[block] + off


def dequantize(data: torch.Tensor, amax: torch.Tensor, codes_table: torch.Tensor, *, blocksize: int, origin: int,
               layout: str, dtype: torch.dtype, cols: int) -> torch.Tensor:
    """``dtype(table[index] * absmax[block])`` for every element, as [numel / cols, cols]."""
    packed = _flat(data)
    n = 2 * packed.numel()
    out = torch.empty(n, dtype=dtype)
    step = max(1, _BAND_ELEMENTS // 2)
    for a in range(0, packed.numel(), step):
        b = min(packed.numel(), a + step)
        p = packed[a:b].to(torch.int64)
        hi, lo = p >> 4, p & 15
        even, odd = (lo, hi) if layout == "npu" else (hi, lo)
        index = torch.stack([even, odd], dim=1).reshape(-1)
        if layout == "npu":
            index = (index + 8) % 16
        block = (torch.arange(2 * a, 2 * b) + origin) // blocksize
        out[2 * a:2 * b] = (codes_table[index] * amax[block]).to(dtype)
    return out.view(n // cols, cols)
