"""The safetensors format, owned end to end: header parsing, exact-range reads, a streaming writer, and
:data:`SAFETENSORS`, the :class:`~streamconv.storage.base.TensorFormat` object plans name ``"safetensors"``.

File layout: ``u64 little-endian N`` | ``N bytes of JSON header`` (space padded) | the byte buffer.  Each
header entry is ``{"dtype": "BF16", "shape": [..], "data_offsets": [begin, end]}`` relative to the buffer;
``__metadata__`` is an optional str -> str map.

Reads never load a whole file: :func:`read_header` reads the first ``8 + N`` bytes, and :func:`read_tensor`
reads exactly the byte range of a tensor (or of a band of its rows) with positional reads.

Writes follow the same stateless protocol as :mod:`torchzip` (shared helpers in :mod:`pieces`), so threads and
processes can share a file:

1. :func:`compute_layout` fixes the header and every offset from ``(name, dtype, shape)`` alone.
2. :func:`create` once (coordinator): makes ``fileio.temp_name(path)`` at its final size and writes the header.
3. :func:`write_piece` any number of times, from any thread or process, in any order; each call returns a
   ``Piece`` ``(index, offset, length, crc32)``. The pieces of one tensor must tile it exactly; the file comes
   out byte-identical whatever the order.
4. :func:`finish` once (coordinator), after every write returned: checks the tiling (raising before touching
   the file if it is wrong), fsyncs, renames, and returns one CRC32 per tensor in header order. Or :func:`abort`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import stat
import struct
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

from .. import types
from ..errors import ExecutionError, FormatError, ValidationError
from . import fileio
from . import pieces as _pieces
from .base import FileCheck, FileIndex, IndexEntry, TensorEntry, TensorFormat, row_major_stride
from .pieces import FlatEntry, Piece, flat_entries, tensor_bytes  # noqa: F401  (tensor_bytes: re-exported, readers use it)

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
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not block the open
    except FileNotFoundError:
        raise FormatError(f"{path}: file not found. Check --load-dir and model.safetensors.index.json.") from None
    except OSError as exc:
        raise FormatError(f"{path}: cannot open ({exc.strerror}).") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            what = "a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO, device or socket"
            raise FormatError(f"{path}: not a regular file ({what}); expected a safetensors shard. Put the shard "
                              f"file there.")
        size = st.st_size
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


# --- the write protocol ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SafetensorsLayout:
    """Every byte offset of one safetensors file, fixed before any data is written (:func:`compute_layout`).

    ``header`` is the file's first bytes: the u64 length and the space-padded JSON.  ``spans`` are the absolute
    ``(start, end)`` of each entry's bytes, in entry order, which is also the header's key order.
    """

    header: bytes = field(repr=False)
    entries: tuple[FlatEntry, ...]
    metadata: tuple[tuple[str, str], ...]
    spans: tuple[tuple[int, int], ...] = field(repr=False)
    size: int  # of the whole file


def compute_layout(entries: Iterable[tuple[str, str, Sequence[int]]],
                   metadata: Mapping[str, str] | Iterable[tuple[str, str]] | None = None) -> SafetensorsLayout:
    """Fix the layout of a safetensors file holding ``entries`` in this order, back to back.

    Args:
        entries: ``(name, dtype, shape)`` per tensor, with our dtype names (``"bfloat16"``). The header lists
            them in this order and the data buffer holds them in this order, without gaps.
        metadata: the header's ``__metadata__`` (str -> str; HF writes ``{"format": "pt"}``), placed first.
            None or empty: no ``__metadata__`` key.

    Returns:
        A frozen, hashable :class:`SafetensorsLayout`. Equal inputs give the same cached object.

    Raises:
        ValidationError: listing every bad entry or metadata item (unknown dtype, duplicate name, ...).

    Example:
        >>> compute_layout([("w", "bfloat16", (2, 3))], {"format": "pt"}).spans
        ((104, 116),)
    """
    pairs = tuple(metadata.items() if isinstance(metadata, Mapping) else (metadata or ()))
    bad = [f"metadata {k!r}: {type(k).__name__} -> {type(v).__name__} (expected str -> str). Convert it, "
           f"e.g. str(x); safetensors readers refuse other metadata." for k, v in pairs
           if type(k) is not str or type(v) is not str]
    if bad:  # before the cache: an unhashable value would fail there with a bare TypeError
        raise ValidationError(bad)
    return _layout_cached(flat_entries(entries), pairs)


@functools.lru_cache(maxsize=32)
def _layout_cached(entries: tuple[FlatEntry, ...], metadata: tuple[tuple[str, str], ...]) -> SafetensorsLayout:
    _validate(entries)
    header: dict = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    rel = []
    pos = 0
    for e in entries:
        n = types.nbytes(e.dtype, e.shape)
        header[e.name] = {"dtype": types.dtype(e.dtype).safetensors, "shape": list(e.shape),
                          "data_offsets": [pos, pos + n]}
        rel.append((pos, pos + n))
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * ((-(8 + len(raw))) % ALIGN)  # the data buffer starts 8-byte aligned, as the reference pads
    head = struct.pack("<Q", len(raw)) + raw
    base = len(head)
    return SafetensorsLayout(head, entries, metadata, tuple((base + s, base + e) for s, e in rel), base + pos)


def _validate(entries: tuple[FlatEntry, ...]) -> None:
    problems = []
    seen: set[str] = set()
    for e in entries:
        label = e.name if type(e.name) is str and e.name else repr(e.name)
        if type(e.name) is not str or not e.name or e.name == "__metadata__":
            problems.append(f"{label}: tensor name must be a non-empty str other than '__metadata__'.")
        elif e.name in seen:
            problems.append(f"{label}: listed twice. Each tensor must appear once in a file.")
        seen.add(e.name)
        if e.dtype not in types.DTYPES:
            problems.append(f"{label}: unknown dtype {e.dtype!r} (expected one of {', '.join(types.DTYPES)}).")
        if not all(type(s) is int and s >= 0 for s in e.shape):
            problems.append(f"{label}: shape {e.shape} is not a tuple of non-negative ints.")
    if problems:
        raise ValidationError(problems)


def create(path: str, layout: SafetensorsLayout) -> None:
    """Create the temporary file at its final size and write the header (the data stays sparse)."""
    _pieces.create_temp(path, layout.size, layout.header)


def write_piece(path: str, layout: SafetensorsLayout, index: int, data: torch.Tensor | np.ndarray | bytes,
                offset: int = 0) -> Piece:
    """Write ``data`` at byte ``offset`` of entry ``index`` and return ``(index, offset, length, crc32)``.

    ``data`` is a tensor of the entry's dtype (made contiguous here), or raw bytes (``bytes``, a uint8 array).
    Thread- and process-safe: it opens the temp file, writes with write-behind and closes it.
    """
    return _pieces.write_piece(path, layout, index, data, offset)


def finish(path: str, layout: SafetensorsLayout, pieces: Iterable[Piece]) -> list[int]:
    """Check that ``pieces`` cover every entry exactly, fsync, rename into place. Returns each entry's CRC32
    in entry order, which is the header's order (the run journal records them; ``verify`` re-computes them).

    Exact duplicate pieces (a retried task) count once. Raises :class:`ValidationError` naming every tensor
    with a gap or an overlap; the temporary file is then left as it is.
    """
    crcs = _pieces.entry_crcs(path, layout, pieces)
    _pieces.commit(path, layout.size)
    return crcs


def abort(path: str) -> None:
    """Remove the temporary file, if any. The final name is never touched."""
    _pieces.abort(path)


def layout(entries: Iterable[tuple[str, str, Sequence[int]]], metadata: Mapping[str, str] | None = None
           ) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """Header bytes and absolute ``(start, end)`` by name: :func:`compute_layout` as a (header, dict) pair."""
    lay = compute_layout(entries, metadata)
    return lay.header, {e.name: span for e, span in zip(lay.entries, lay.spans)}


class SafetensorsWriter:
    """Write one safetensors file tensor by tensor from one process: the protocol above, with names.

    Protocol: 1) construct with every tensor's (name, dtype, shape) so the header and all offsets are fixed
    (:func:`create`); 2) :meth:`write` each tensor (or pieces of it, ``offset`` in bytes within the tensor),
    from any thread, in any order (:func:`write_piece`); 3) :meth:`close` fsyncs and renames the temporary
    file into place. Until close, the file exists only under :func:`fileio.temp_name`.

    Unlike :func:`finish`, close does not require every byte to be written: bytes never written read as
    zeros (the file is created sparse), which is how headers-only checkpoints are made. Use the free
    functions when every byte must be accounted for and checksummed.
    """

    def __init__(self, path: str, entries: Iterable[tuple[str, str, Sequence[int]]],
                 metadata: Mapping[str, str] | None = None):
        self.path = path
        self.layout = compute_layout(entries, metadata)
        self._index = {e.name: i for i, e in enumerate(self.layout.entries)}
        create(path, self.layout)

    @property
    def header(self) -> bytes:
        return self.layout.header

    @property
    def size(self) -> int:
        return self.layout.size

    def write(self, name: str, data: torch.Tensor | np.ndarray | bytes, offset: int = 0) -> None:
        index = self._index.get(name)
        if index is None:
            raise ExecutionError(f"{self.path}: {name}: not a tensor of this file. List it in the entries "
                                 f"given to SafetensorsWriter.")
        write_piece(self.path, self.layout, index, data, offset)

    def close(self) -> None:
        _pieces.commit(self.path, self.layout.size)

    def abort(self) -> None:
        abort(self.path)

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# --- the format object ---------------------------------------------------------------------------------------

class SafetensorsFormat(TensorFormat):
    """safetensors as a :class:`TensorFormat`: the free functions above, plus sniffing, digests and checks.

    Flat (one HF name per tensor, no groups); ``attrs`` are the header's ``__metadata__`` (str -> str).
    """

    name = "safetensors"
    supports_attrs = True   # float8: yes; groups: no (the defaults)
    sniff_bytes = 9

    @classmethod
    def sniff(cls, head: bytes) -> bool:
        # u64 header length within the reference limit, then the JSON object's "{" (the reference reader
        # refuses any other first byte); a zip or a text file never starts like this.
        return (len(head) >= 9 and struct.unpack("<Q", head[:8])[0] <= MAX_HEADER_BYTES
                and head[8:9] == b"{")

    def digest(self, path: str) -> str:
        """sha256 of the 8-byte length and the JSON header ("" for a file too short to have one)."""
        try:
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    return ""
                (n,) = struct.unpack("<Q", head)
                return hashlib.sha256(head + f.read(min(n, MAX_HEADER_BYTES))).hexdigest()
        except OSError as exc:
            raise FormatError(f"{path}: cannot read the header ({exc.strerror or exc}).") from None

    def index(self, path: str) -> FileIndex:
        header = read_header(path)
        tensors = tuple(IndexEntry("", i.name, i.dtype, i.shape, i.start, row_major_stride(i.shape), i)
                        for i in header.tensors.values())
        return FileIndex(path, header.file_size, self.digest(path), tensors, tuple(header.metadata.items()))

    def compute_layout(self, entries, attrs=(), groups=(), *, text=None) -> SafetensorsLayout:
        """Tensors by name in entry order; ``attrs`` (str pairs) become ``__metadata__``."""
        rows = [TensorEntry(*e) for e in entries]
        problems = [f"{e.name}: group {e.group!r} (expected ''). safetensors files are flat; put the full HF "
                    f"name in the tensor name." for e in rows if e.group]
        groups = tuple(groups)
        if groups:
            problems.append(f"groups {list(groups)} (expected none). safetensors files are flat.")
        if text is not None:
            problems.append("text content given (expected none). Only a text format holds text.")
        if problems:
            raise ValidationError(problems)
        return compute_layout([(e.name, e.dtype, e.shape) for e in rows], dict(attrs))

    def create(self, path: str, layout: SafetensorsLayout) -> None:
        create(path, layout)

    def write_piece(self, path: str, layout: SafetensorsLayout, index: int, data, offset: int = 0) -> Piece:
        return write_piece(path, layout, index, data, offset)

    def finish(self, path: str, layout: SafetensorsLayout, pieces: Iterable[Piece]) -> list[int]:
        return finish(path, layout, pieces)

    def abort(self, path: str) -> None:
        abort(path)

    def check_file(self, path: str, record: dict, layout: SafetensorsLayout | None = None) -> FileCheck:
        """With a layout: size, the whole header (the journaled CRCs cover tensor bytes only, and the plan
        fixes the header), then each tensor's CRC.  Without: the tensors of the file's own header, in header
        order (the order :func:`finish` journals), against the journaled CRCs."""
        if layout is not None:
            problem = _pieces.size_problem(path, layout, record)
            if problem:
                return FileCheck(0, [problem])
            problems = []
            if fileio.read_range(path, 0, len(layout.header)).tobytes() != layout.header:
                problems.append(f"{path}: header differs from the one the plan implies (corrupted on disk?). "
                                f"Delete the file and run the plan again.")
            problems += _pieces.crc_problems(path, layout, record, [e.name for e in layout.entries])
            return FileCheck(len(layout.spans), problems)
        try:
            tensors = list(read_header(path).tensors.values())
        except FormatError as exc:
            return FileCheck(0, [str(exc)])
        got = [fileio.crc32_of_range(path, t.start, t.end) for t in tensors]
        want = record.get("crc32") or []
        bad = [t.name for t, g, w in zip(tensors, got, want) if g != w]
        if len(want) != len(tensors):
            return FileCheck(len(tensors), [f"{path}: {len(tensors)} tensors in the header but {len(want)} "
                                            f"checksums in the journal. Delete the file and run the plan again."])
        if bad:
            return FileCheck(len(tensors), [f"{path}: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}: "
                                            f"checksum differs from the journal (corrupted on disk?). Delete the "
                                            f"file and run the plan again."])
        problem = _pieces.file_crc_problem(path, record, [(t.start, t.end) for t in tensors])  # the header too
        return FileCheck(len(tensors), [problem] if problem else [])


SAFETENSORS = SafetensorsFormat()
