"""Accelerators for the training-time loader: naming a device, and decoding block FP8 on it.

    dev = resolve_device("npu:0")            # imports torch_npu here, and only here
    decode = DeviceDequant(dev, "table")     # or "cast" (CUDA: the native fp8 -> float32 cast)
    y = decode(arg, w, scale_inv)            # w, scale_inv: host tensors of a dequant node's sources

Two ways to decode on a device, both bit-exact with the host kernel (:mod:`streamconv.execute.dequant`):

- ``table``: the per-block 256-entry tables are built on the host by the host kernel's own function
  (``dequant._tables``: torch's float32 multiply and rounding), the fp8 codes move to the device as uint8
  bytes, and the device only gathers ``table[block, code]``.  No device arithmetic touches a value, so the
  result is the host's bit for bit whatever the device's float units do (Ascend NPUs cannot cast FP8 at all).
- ``cast``: the device casts fp8 -> float32, multiplies by its block scale and rounds, as CUDA does natively.
  IEEE float32 multiply and round-to-nearest-even agree everywhere except in the bits of a NaN, which each
  implementation spells its own way (the host's vectorised bf16 cast gives 0xFFFF, CUDA's 0x7FFF; a NaN
  operand's payload propagates differently), so the few NaN outputs are taken from the table decode.

Either way, :meth:`DeviceDequant.self_check` decodes every code of both fp8 formats under several scales and
real blocks on the device and compares the bits with the host kernel; the loader falls back to the host (and
logs why) when they differ.
"""

from __future__ import annotations

import importlib
import logging

import numpy as np
import torch

from .. import types
from ..errors import ExecutionError
from ..graph.node import DequantArg
from .dequant import _VALUES, _check_scale, _tables, dequant_fp8_block

log = logging.getLogger(__name__)

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
METHODS = ("table", "cast")
_CHUNK_ELEMENTS = 1 << 24   # elements decoded per device step: bounds the int64 index buffer to 128 MiB


class DeviceError(ExecutionError):
    """A device that was asked for is not there (no driver, no such index, unknown type)."""


def resolve_device(device: str | torch.device) -> torch.device:
    """The torch device named by ``device``, checked to exist.  ``npu`` devices import ``torch_npu`` here
    (never at import time of streamconv); a missing backend or index is one :class:`DeviceError` naming it."""
    text = str(device)
    kind = text.split(":", 1)[0]
    if kind == "npu":
        try:
            importlib.import_module("torch_npu")
        except ImportError as exc:
            raise DeviceError(f"device {text!r}: torch_npu is not importable ({exc}). Install the torch_npu "
                              f"build matching torch {torch.__version__}, or load on 'cpu'.") from None
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError) as exc:
        raise DeviceError(f"device {text!r}: not a device torch knows ({exc}). Use 'cpu', 'cuda[:N]' or "
                          f"'npu[:N]'.") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "meta":
        raise DeviceError(f"device {text!r}: the meta device holds no data. Use check_against() for a shape-only "
                          f"check, and a real device to load.")
    backend = getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if backend is None or available is None or not available():
        raise DeviceError(f"device {text!r}: no {dev.type} device is available in this process "
                          f"(torch {torch.__version__}). Check the driver and visible devices, or load on 'cpu'.")
    count = backend.device_count()
    if dev.index is not None and not 0 <= dev.index < count:
        raise DeviceError(f"device {text!r}: index out of range ({count} {dev.type} device(s) visible).")
    if dev.index is None:
        dev = torch.device(dev.type, backend.current_device())
    return dev


def default_method(dev: torch.device) -> str:
    """``cast`` where the device casts fp8 natively (CUDA), else ``table`` (NPU, CPU)."""
    return "cast" if dev.type == "cuda" else "table"


def _output(w: torch.Tensor, scale: torch.Tensor, block, origin, dtype: torch.dtype,
            device: torch.device) -> torch.Tensor:
    """The decode's destination on ``device``; the scale grid is checked against ``w`` unless it is empty."""
    out = torch.empty(tuple(w.shape), dtype=dtype, device=device)
    if out.numel():
        _check_scale(w, scale, block, origin)
    return out


def decode_fp8_table(w: torch.Tensor, scale: torch.Tensor, *, block: tuple[int, int], origin: tuple[int, int],
                     dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Dequantize host fp8 ``w`` with host float32 block scales on ``device`` by a table gather (see the
    module docstring); same contract as :func:`streamconv.execute.dequant.dequant_fp8_block`."""
    out = _output(w, scale, block, origin, dtype, device)
    if out.numel() == 0:
        return out
    rows, cols = w.shape
    br, bc = block
    r0, c0 = origin
    n_rb, n_cb = (rows - 1 + r0) // br + 1, scale.shape[1]
    lut = torch.from_numpy(np.ascontiguousarray(_tables(_VALUES[w.dtype], scale.to(torch.float32), 0, n_rb, dtype)))
    lut = lut.reshape(-1).to(device)                                   # [n_rb * n_cb * 256] integers
    codes = w.contiguous().view(torch.uint8).to(device)
    col_base = ((torch.arange(cols, device=device) + c0) // bc) * 256   # table offset of each column's block
    iv = out.view(lut.dtype)
    step = max(1, _CHUNK_ELEMENTS // cols)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        row_base = ((torch.arange(start, stop, device=device) + r0) // br) * (n_cb * 256)
        index = row_base[:, None] + col_base[None, :] + codes[start:stop].long()
        iv[start:stop] = torch.take(lut, index)
    return out


def decode_fp8_cast(w: torch.Tensor, scale: torch.Tensor, *, block: tuple[int, int], origin: tuple[int, int],
                    dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Dequantize host fp8 ``w`` on ``device`` with the device's own fp8 -> float32 cast, multiply and rounding.
    Where the result is NaN (a NaN code, or a non-finite scale), its bits are the host's: NaN payloads are
    where float implementations differ, so those few elements are taken from the table decode."""
    out = _output(w, scale, block, origin, dtype, device)
    if out.numel() == 0:
        return out
    rows, cols = w.shape
    br, bc = block
    r0, c0 = origin
    codes = w.contiguous().view(torch.uint8).to(device)
    s = scale.to(torch.float32).to(device)
    cb = (torch.arange(cols, device=device) + c0) // bc
    step = max(1, _CHUNK_ELEMENTS // cols)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        rb = (torch.arange(start, stop, device=device) + r0) // br
        value = (codes[start:stop].view(w.dtype).to(torch.float32) * s[rb][:, cb]).to(dtype)
        nan = torch.isnan(value)
        if bool(nan.any()):
            first = (start + r0) // br
            exact = decode_fp8_table(w[start:stop], scale[first:], block=block, origin=((start + r0) % br, c0),
                                     dtype=dtype, device=device)
            value = torch.where(nan, exact, value)
        out[start:stop] = value
    return out


DECODERS = {"table": decode_fp8_table, "cast": decode_fp8_cast}


class DeviceDequant:
    """The ``dequant`` hook of :func:`streamconv.execute.kernels.materialize`: runs DEQUANT_FP8_BLOCK nodes on
    ``device`` with ``method`` (``table`` or ``cast``)."""

    def __init__(self, device: torch.device, method: str | None = None):
        method = method or default_method(device)
        if method not in DECODERS:
            raise DeviceError(f"dequant method {method!r}: expected one of {', '.join(METHODS)}.")
        self.device = device
        self.method = method

    def __call__(self, arg, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return DECODERS[self.method](w.cpu(), scale.cpu(), block=tuple(arg.block), origin=tuple(arg.origin),
                                     dtype=types.dtype(arg.dtype).torch, device=self.device)

    def self_check(self, blocks: list[tuple[object, torch.Tensor, torch.Tensor]] = ()) -> str | None:
        """Decode every code of both fp8 formats (under tiny, ordinary and huge scales, at an offset origin)
        and ``blocks`` (``(DequantArg, w, scale)`` triples read from the source) on the device; None when every
        bit agrees with the host kernel, else a one-line description of the first difference."""
        cases = list(blocks)
        # 32 x 16 codes (every code twice) in 8 x 8 blocks at origin (3, 5): a 5 x 3 scale grid with ordinary,
        # tiny (subnormal results), huge (overflow to inf) and zero scales
        codes = torch.arange(512, dtype=torch.int32).remainder(256).to(torch.uint8).reshape(32, 16)
        scales = torch.tensor([[1.0, 2.0 ** -20, 3.0e38], [0.013671875, 1.0 / 448, 1e-45], [0.0, -2.5, 7.0],
                               [65504.0, 2.0 ** -126, 1.5], [0.1, 10.0, 1e-30]], dtype=torch.float32)
        for fp8 in FP8_DTYPES:
            for dtype in ("bfloat16", "float32"):
                cases.append((DequantArg((8, 8), (3, 5), dtype), codes.view(fp8), scales))
        for arg, w, s in cases:
            want = dequant_fp8_block(w, s, block=tuple(arg.block), origin=tuple(arg.origin),
                                     dtype=types.dtype(arg.dtype).torch)
            try:
                got = self(arg, w, s).cpu()
            except Exception as exc:  # a device that cannot run the decode at all: fall back the same way
                return f"the {self.method} decode failed on {self.device} ({exc.__class__.__name__}: {exc})"
            if got.dtype != want.dtype or got.shape != want.shape:
                return (f"the {self.method} decode gave {got.dtype}{list(got.shape)}, the host "
                        f"{want.dtype}{list(want.shape)}")
            iv = {2: torch.int16, 4: torch.int32}[want.element_size()]
            diff = (got.view(iv) != want.view(iv)).nonzero()
            if len(diff):
                r, c = (int(x) for x in diff[0])
                return (f"{w.dtype} code {int(w.view(torch.uint8)[r, c])} at [{r}, {c}]: the {self.method} decode "
                        f"on {self.device} gave bits {int(got.view(iv)[r, c]) & 0xFFFFFFFF:#x}, the host "
                        f"{int(want.view(iv)[r, c]) & 0xFFFFFFFF:#x}")
        return None
