"""Value types shared by every layer: the one dtype table and shapes.

This module imports nothing from streamconv, and nothing heavier than torch and numpy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import torch

Shape = Tuple[int, ...]


@dataclass(frozen=True)
class DType:
    """One row of the dtype table: our name, its size, and its names in torch and safetensors."""

    name: str
    itemsize: int
    torch: torch.dtype
    safetensors: str
    # Legacy typed-storage class name used by torch's pickle format, or None where the dtype only
    # exists as an UntypedStorage (_rebuild_tensor_v3 form, torch >= 2.1.x loaders vary).
    legacy_storage: str | None

    def nbytes(self, shape: Shape) -> int:
        return self.itemsize * math.prod(shape)


_TABLE = [
    DType("bfloat16", 2, torch.bfloat16, "BF16", "BFloat16Storage"),
    DType("float16", 2, torch.float16, "F16", "HalfStorage"),
    DType("float32", 4, torch.float32, "F32", "FloatStorage"),
    DType("float64", 8, torch.float64, "F64", "DoubleStorage"),
    DType("float8_e4m3fn", 1, torch.float8_e4m3fn, "F8_E4M3", None),
    DType("float8_e5m2", 1, torch.float8_e5m2, "F8_E5M2", None),
    DType("bool", 1, torch.bool, "BOOL", "BoolStorage"),
    DType("uint8", 1, torch.uint8, "U8", "ByteStorage"),
    DType("int8", 1, torch.int8, "I8", "CharStorage"),
    DType("int16", 2, torch.int16, "I16", "ShortStorage"),
    DType("int32", 4, torch.int32, "I32", "IntStorage"),
    DType("int64", 8, torch.int64, "I64", "LongStorage"),
]

DTYPES: dict[str, DType] = {d.name: d for d in _TABLE}
_BY_SAFETENSORS = {d.safetensors: d for d in _TABLE}
_BY_TORCH = {d.torch: d for d in _TABLE}


def dtype(name: str) -> DType:
    """Look up a dtype by our name (``"bfloat16"``); raises ``KeyError`` listing the known names."""
    try:
        return DTYPES[name]
    except KeyError:
        raise KeyError(f"unknown dtype {name!r}; known: {', '.join(DTYPES)}") from None


def from_safetensors(code: str) -> DType | None:
    """The dtype for a safetensors header code (``"BF16"``), or None if streamconv does not support it."""
    return _BY_SAFETENSORS.get(code)


def from_torch(t: torch.dtype) -> DType:
    try:
        return _BY_TORCH[t]
    except KeyError:
        raise KeyError(f"unsupported torch dtype {t}") from None


def nbytes(dtype_name: str, shape: Shape) -> int:
    return DTYPES[dtype_name].nbytes(shape)
