"""The safetensors format, owned end to end: header parsing, exact-range reads, and a streaming writer.

File layout: ``u64 little-endian N`` | ``N bytes of JSON header`` (space padded) | the byte buffer.  Each
header entry is ``{"dtype": "BF16", "shape": [..], "data_offsets": [begin, end]}`` relative to the buffer;
``__metadata__`` is an optional str -> str map.

Reads never load a whole file: :func:`read_header` reads the first ``8 + N`` bytes, and :func:`read_tensor`
reads exactly the byte range of a tensor (or of a band of its rows) with positional reads.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import types
from ..errors import FormatError
from . import fileio

MAX_HEADER_BYTES = 100 * 1024 * 1024  # what the reference implementation accepts
ALIGN = 8


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live: absolute ``[start, end)`` in ``path``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    def row_range(self, r0: int, r1: int) -> tuple[int, int]:
        """Absolute byte range of rows ``[r0, r1)`` (dim 0) of this tensor."""
        row = types.nbytes(self.dtype, self.shape[1:]) if self.shape else self.nbytes
        return self.start + r0 * row, self.start + r1 * row


@dataclass(frozen=True)
class Header:
    path: str
    file_size: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)


def read_header(path: str) -> Header:
    """Parse and check a safetensors header; every inconsistency is a :class:`FormatError` naming ``path``."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise FormatError(f"{path}: file not found. Check --load-dir and model.safetensors.index.json.") from None
    except OSError as exc:
        raise FormatError(f"{path}: cannot open ({exc.strerror}).") from None
    try:
        size = os.fstat(fd).st_size
        if size < 8:
            raise FormatError(f"{path}: {size} bytes is too short for a safetensors file (truncated?). Re-copy it.")
        head = bytearray(8)
        fileio.pread_into(fd, head, 0, path=path)
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES:
            raise FormatError(f"{path}: header length {n} exceeds {MAX_HEADER_BYTES} bytes (corrupt file?).")
        if 8 + n > size:
            raise FormatError(f"{path}: header claims {n} bytes but the file has {size} (truncated?). Re-copy it.")
        raw = bytearray(n)
        fileio.pread_into(fd, raw, 8, path=path)
    finally:
        os.close(fd)
    return parse_header(bytes(raw), path=path, file_size=size)


def parse_header(raw: bytes, *, path: str, file_size: int) -> Header:
    """Check a header's JSON against the file size; offsets are returned absolute."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{path}: header is not valid JSON ({exc.__class__.__name__}). The file is corrupt.") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{path}: header is not a JSON object. The file is corrupt.")
    base = 8 + len(raw)
    buffer_len = file_size - base
    metadata = obj.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise FormatError(f"{path}: __metadata__ is not an object.")
    tensors: dict[str, TensorInfo] = {}
    spans = []
    for name, entry in obj.items():
        if not isinstance(entry, dict):
            raise FormatError(f"{path}: {name}: header entry is not an object.")
        code = entry.get("dtype")
        dt = types.from_safetensors(code) if isinstance(code, str) else None
        if dt is None:
            raise FormatError(f"{path}: {name}: unsupported dtype {code!r}; supported: "
                              f"{', '.join(d.safetensors for d in types.DTYPES.values())}.")
        shape = entry.get("shape")
        offsets = entry.get("data_offsets")
        if (not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape)):
            raise FormatError(f"{path}: {name}: shape {shape!r} is not a list of non-negative integers.")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and o >= 0 for o in offsets)):
            raise FormatError(f"{path}: {name}: data_offsets {offsets!r} is not [begin, end].")
        begin, end = offsets
        want = dt.itemsize * math.prod(shape)
        if end - begin != want:
            raise FormatError(f"{path}: {name}: data_offsets span {end - begin} bytes but "
                              f"{dt.safetensors}{shape} needs {want}. The header is corrupt.")
        if end > buffer_len:
            raise FormatError(f"{path}: {name}: bytes [{begin}, {end}) lie outside the file's {buffer_len}-byte "
                              f"data buffer (truncated?). Re-copy the file.")
        tensors[name] = TensorInfo(name, dt.name, tuple(shape), base + begin, base + end)
        if end > begin:
            spans.append((begin, end, name))
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise FormatError(f"{path}: tensors {n0} and {n1} overlap (bytes {b1}..{e0}). The header is corrupt.")
    return Header(path, file_size, tensors, {str(k): str(v) for k, v in metadata.items()})


def read_tensor(path: str, info: TensorInfo, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Read a tensor, or rows ``[r0, r1)`` of it, into a fresh CPU tensor (exact positional read)."""
    dt = types.dtype(info.dtype)
    if rows is None:
        start, end, shape = info.start, info.end, info.shape
    else:
        r0, r1 = rows
        start, end = info.row_range(r0, r1)
        shape = (r1 - r0,) + tuple(info.shape[1:])
    buf = fileio.read_range(path, start, end - start)
    return bytes_to_tensor(buf, dt.name, shape)


def bytes_to_tensor(buf: np.ndarray, dtype_name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """View a uint8 numpy buffer as a torch tensor of ``dtype_name`` and ``shape`` (no copy)."""
    dt = types.dtype(dtype_name).torch
    if buf.size == 0:  # torch cannot reinterpret an empty uint8 array (its stride is 0): nothing to view
        return torch.empty(shape, dtype=dt)
    return torch.from_numpy(buf).view(dt).reshape(shape)


def tensor_bytes(t: torch.Tensor) -> np.ndarray:
    """The raw bytes of a tensor in row-major order, as a uint8 numpy array (no copy when contiguous)."""
    t = t.detach().contiguous().cpu()
    if t.numel() == 0:
        return np.empty(0, dtype=np.uint8)
    return t.reshape(-1).view(torch.uint8).numpy()


# --- streaming writer ------------------------------------------------------------------------------------------

def layout(entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None
           ) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """Header bytes and absolute ``(start, end)`` of every tensor for tensors written in ``entries`` order."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    rel = {}
    pos = 0
    for name, dtype_name, shape in entries:
        if name in rel:
            raise ValueError(f"{name}: tensor listed twice in one safetensors file")
        n = types.nbytes(dtype_name, tuple(shape))
        header[name] = {"dtype": types.dtype(dtype_name).safetensors, "shape": list(shape),
                        "data_offsets": [pos, pos + n]}
        rel[name] = (pos, pos + n)
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * ((-(8 + len(raw))) % ALIGN)
    head = struct.pack("<Q", len(raw)) + raw
    base = len(head)
    return head, {k: (base + s, base + e) for k, (s, e) in rel.items()}


class SafetensorsWriter:
    """Write one safetensors file tensor by tensor, in any order, with bounded memory.

    Protocol: 1) construct with every tensor's (name, dtype, shape) so the header and all offsets are fixed;
    2) :meth:`write` each tensor (or consecutive pieces of it, ``offset`` in bytes within the tensor), from
    any thread, in any order; 3) :meth:`close` fsyncs and renames the temporary file into place.  Until
    close, the file exists only under :func:`fileio.temp_name`.
    """

    def __init__(self, path: str, entries: list[tuple[str, str, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = path
        self.header, self.offsets = layout(entries, metadata)
        self.size = len(self.header) + sum(e - s for s, e in self.offsets.values())
        self._tmp = fileio.temp_name(path)
        self._fd = os.open(self._tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(self._fd, self.size)
            fileio.pwrite_all(self._fd, self.header, 0, path=path)
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, data: torch.Tensor | np.ndarray | bytes, offset: int = 0) -> None:
        start, end = self.offsets[name]
        raw = tensor_bytes(data) if isinstance(data, torch.Tensor) else data
        if start + offset + len(memoryview(raw).cast("B")) > end:
            raise ValueError(f"{name}: write of {len(raw)} bytes at {offset} overruns the tensor's {end - start} bytes")
        fileio.pwrite_all(self._fd, raw, start + offset, path=self.path)

    def close(self) -> None:
        try:
            os.fsync(self._fd)
        except OSError as exc:
            raise fileio.write_error(self.path, exc) from exc
        finally:
            os.close(self._fd)
        os.replace(self._tmp, self.path)
        fileio.fsync_dir(os.path.dirname(os.path.abspath(self.path)))

    def abort(self) -> None:
        try:
            os.close(self._fd)
        except OSError:
            pass
        try:
            os.unlink(self._tmp)
        except OSError:
            pass

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
