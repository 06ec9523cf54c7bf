"""A zarr v3 shard file as a :class:`~streamconv.storage.base.TensorFormat`: :data:`ZARR`, plans name it ``"zarr"``.

A zarr store is a directory of small JSON documents and shard files; streamconv writes the JSON documents as
``text`` files and each shard as one file of this format, so the executor, the journal, resume and ``verify``
treat a store like any other set of files (see :mod:`streamconv.storage.zarr_store` for the store layout).

File layout (zarr's ``sharding_indexed`` with ``index_location: end``, plus a header zarr never reads)::

    [0, H)            b"SCZARR\\0\\1" | u32 LE length | JSON {"entries": [[name, dtype, shape]...],
                      "attrs": [[key, value]...]} | zero padding to 64 bytes.  No chunk offset points here, so
                      zarr-python ignores it; it makes the file self-describing (index, sniff, verify).
    [H, ...)          the inner chunks, entry by entry, in index order
    [end - 16n - 4,)  the shard index: n x (offset u64 LE, nbytes u64 LE), then its CRC32C (u32 LE)

Entries are what the plan writes (tensors with names); with the attr ``stacked`` each entry is a stack of inner
chunks along its dim 0 (a band of chunk rows of the array, ``[k, chunk rows, chunk cols]``) and holds
``shape[0]`` of the index's chunks; otherwise each entry is one chunk.  The attr ``codec`` (``none``, ``zstd``,
``blosc``) with ``level`` says how chunks are stored; other attrs are kept as they are.

Uncompressed, every byte is fixed by the layout, and the protocol is the one safetensors follows (the header
and the index are written at ``create``, pieces land at their offsets).  Compressed, chunk sizes are known only
from the data: pieces land raw in the temporary file at the uncompressed layout, and ``finish`` encodes it chunk
by chunk into a second temporary file, then renames that.  Each shard is its own file, so these finishes run as
separate tasks, in parallel, while other shards are still being written.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import torch

from .. import types
from ..errors import ExecutionError, FormatError, ValidationError
from . import fileio
from . import pieces as _pieces
from .base import FileCheck, FileIndex, IndexEntry, Piece, TensorFormat, row_major_stride
from .zarr_store import Codec, crc32c, decompress, read_region

MAGIC = b"SCZARR\x00\x01"
ALIGN = 64
_SCALARS = (str, int, float, bool, type(None))
RESERVED = {"codec": str, "level": int, "stacked": bool}


@dataclass(frozen=True)
class ShardLayout:
    """Every byte of an uncompressed shard (the temporary file's layout when compressed).

    ``spans``: each entry's raw ``(start, end)``; ``chunks``: each index record's raw ``(entry, start, end)``, in
    index order; ``trailer``: the index of the uncompressed file."""

    header: bytes = field(repr=False)
    entries: tuple[_pieces.FlatEntry, ...]
    attrs: tuple[tuple[str, object], ...]
    codec: Codec
    stacked: bool
    spans: tuple[tuple[int, int], ...] = field(repr=False)
    chunks: tuple[tuple[int, int, int], ...] = field(repr=False)
    trailer: bytes = field(repr=False)
    size: int


def _trailer(records: Iterable[tuple[int, int]]) -> bytes:
    body = b"".join(struct.pack("<QQ", offset, nbytes) for offset, nbytes in records)
    return body + struct.pack("<I", crc32c(body))


def compute_layout(entries: Iterable[tuple[str, str, tuple[int, ...]]],
                   attrs: Iterable[tuple[str, object]] = ()) -> ShardLayout:
    """Fix the layout of a shard holding ``entries`` (name, dtype, shape) in this order; raises
    :class:`ValidationError` listing every bad entry or attr."""
    rows = _pieces.flat_entries(entries)
    pairs = tuple(attrs)
    bad = [f"attr {k!r}: {type(v).__name__} (expected a str key and a JSON scalar value)." for k, v in pairs
           if type(k) is not str or not isinstance(v, _SCALARS)]
    if bad:
        raise ValidationError(bad)
    return _layout_cached(rows, pairs)


@functools.lru_cache(maxsize=256)
def _layout_cached(entries: tuple[_pieces.FlatEntry, ...], attrs: tuple[tuple[str, object], ...]) -> ShardLayout:
    problems = []
    seen: set[str] = set()
    for e in entries:
        label = e.name if type(e.name) is str and e.name else repr(e.name)
        if type(e.name) is not str or not e.name:
            problems.append(f"{label}: entry name must be a non-empty str.")
        elif e.name in seen:
            problems.append(f"{label}: listed twice. Each entry must appear once in a shard.")
        seen.add(e.name)
        if e.dtype not in types.DTYPES:
            problems.append(f"{label}: unknown dtype {e.dtype!r} (expected one of {', '.join(types.DTYPES)}).")
        if not all(type(s) is int and s >= 0 for s in e.shape):
            problems.append(f"{label}: shape {e.shape} is not a tuple of non-negative ints.")
    given = dict(attrs)
    for key, kind in RESERVED.items():
        if key in given and type(given[key]) is not kind:
            problems.append(f"attr {key!r}: {given[key]!r} (expected a {kind.__name__}).")
    codec = None
    if not problems:
        try:
            codec = Codec(given.get("codec", "none"), given.get("level", 3))
        except ValidationError as exc:
            problems += exc.problems
    if problems:
        raise ValidationError(problems)
    stacked = bool(given.get("stacked", False))
    doc = json.dumps({"entries": [[e.name, e.dtype, list(e.shape)] for e in entries],
                      "attrs": [[k, v] for k, v in attrs]}, separators=(",", ":")).encode()
    header = MAGIC + struct.pack("<I", len(doc)) + doc
    header += b"\0" * (-len(header) % ALIGN)
    spans, chunks = [], []
    pos = len(header)
    for i, e in enumerate(entries):
        n = types.nbytes(e.dtype, e.shape)
        spans.append((pos, pos + n))
        count = e.shape[0] if stacked and e.shape else 1
        step = n // count if count else 0
        chunks += [(i, pos + j * step, pos + (j + 1) * step) for j in range(count)]
        pos += n
    trailer = _trailer((start, end - start) for _, start, end in chunks)
    return ShardLayout(header, entries, attrs, codec, stacked, tuple(spans), tuple(chunks), trailer,
                       pos + len(trailer))


def packed_name(path: str) -> str:
    """Where ``finish`` encodes a compressed shard before renaming it into place."""
    return fileio.temp_name(path) + ".packed"


# --- reading a shard file back --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ShardFile:
    """A shard read from disk: its layout (from its header), its index records and its size."""

    path: str
    layout: ShardLayout
    records: tuple[tuple[int, int], ...]
    size: int


def _read_header(path: str, fd: int, size: int) -> tuple[bytes, dict]:
    if size < len(MAGIC) + 4:
        raise FormatError(f"{path}: {size} bytes is too short for a zarr shard written by streamconv (truncated?). "
                          f"Re-create it.")
    head = bytearray(len(MAGIC) + 4)
    fileio.pread_into(fd, head, 0, path=path)
    if bytes(head[:len(MAGIC)]) != MAGIC:
        raise FormatError(f"{path}: not a zarr shard written by streamconv (no {MAGIC!r} header).")
    (n,) = struct.unpack("<I", head[len(MAGIC):])
    total = len(head) + n + (-(len(head) + n) % ALIGN)
    if total > size:
        raise FormatError(f"{path}: header claims {n} bytes but the file has {size} (truncated?). Re-create it.")
    raw = bytearray(total)
    fileio.pread_into(fd, raw, 0, path=path)
    try:
        doc = json.loads(bytes(raw[len(head):len(head) + n]))
        if not isinstance(doc, dict):
            raise ValueError
    except (ValueError, UnicodeDecodeError):
        raise FormatError(f"{path}: shard header is not a JSON object. The file is corrupt.") from None
    return bytes(raw), doc


def read_shard(path: str) -> ShardFile:
    """Header and index of a shard file, checked against each other; one-line :class:`FormatError` otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise FormatError(f"{path}: file not found.") from None
    except OSError as exc:
        raise FormatError(f"{path}: cannot open ({exc.strerror}).") from None
    try:
        size = os.fstat(fd).st_size
        header, doc = _read_header(path, fd, size)
        try:
            layout = compute_layout([(n, d, tuple(s)) for n, d, s in doc["entries"]],
                                    [(k, v) for k, v in doc.get("attrs", [])])
        except (KeyError, TypeError, ValueError, ValidationError) as exc:
            raise FormatError(f"{path}: shard header does not describe a valid shard ({exc}).") from None
        if layout.header != header:
            raise FormatError(f"{path}: shard header is not in canonical form. The file is corrupt.")
        tail = len(layout.trailer)
        if size < len(header) + tail or (not layout.codec.compressed and size != layout.size):
            raise FormatError(f"{path}: {size} bytes (expected {layout.size if not layout.codec.compressed else 'more'}"
                              f"). The file is truncated; re-create it.")
        raw = bytearray(tail)
        fileio.pread_into(fd, raw, size - tail, path=path)
    finally:
        os.close(fd)
    body = bytes(raw[:-4])
    if crc32c(body) != struct.unpack("<I", raw[-4:])[0]:
        raise FormatError(f"{path}: shard index checksum mismatch (truncated or corrupted). Re-create it.")
    records = tuple(struct.iter_unpack("<QQ", body))
    if layout.codec.compressed:
        bad = [r for r in records if r[0] < len(header) or r[0] + r[1] > size - tail]
    else:
        bad = [r for r, (_, s, e) in zip(records, layout.chunks) if r != (s, e - s)]
    if bad:
        raise FormatError(f"{path}: shard index record {bad[0]} does not fit the file. The file is corrupt.")
    return ShardFile(path, layout, records, size)


def entry_bytes(shard: ShardFile, fd: int, index: int) -> np.ndarray:
    """The raw (decoded) bytes of entry ``index``."""
    layout = shard.layout
    e = layout.entries[index]
    out = np.empty(types.nbytes(e.dtype, e.shape), dtype=np.uint8)
    pos = 0
    for (i, start, end), (offset, nbytes) in zip(layout.chunks, shard.records):
        if i != index:
            continue
        if not layout.codec.compressed:
            fileio.pread_into(fd, out[pos:pos + end - start], offset, path=shard.path)
        elif end > start:
            blob = np.empty(nbytes, dtype=np.uint8)
            fileio.pread_into(fd, blob, offset, path=shard.path)
            raw = np.frombuffer(decompress(layout.codec.name, blob, types.dtype(e.dtype).itemsize,
                                           f"{shard.path}: {e.name}"), dtype=np.uint8)
            if raw.size != end - start:
                raise FormatError(f"{shard.path}: {e.name}: a chunk decodes to {raw.size} bytes (expected "
                                  f"{end - start}). The file is corrupt.")
            out[pos:pos + raw.size] = raw
        pos += end - start
    return out


# --- the format object -------------------------------------------------------------------------------------------

class ZarrFormat(TensorFormat):
    """One shard file of a zarr v3 array (see the module docstring); also reads bands of whole arrays
    (:meth:`read_region`), which is how plans read from a store."""

    name = "zarr"
    supports_attrs = True   # float8: yes (raw bytes); groups: no
    sniff_bytes = len(MAGIC)

    @classmethod
    def sniff(cls, head: bytes) -> bool:
        return head[:len(MAGIC)] == MAGIC

    def digest(self, path: str) -> str:
        """sha256 of the header (entries and attrs): fixed by the layout, whatever the data."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise FormatError(f"{path}: cannot open ({exc.strerror or exc}).") from None
        try:
            header, _ = _read_header(path, fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        return hashlib.sha256(header).hexdigest()

    def index(self, path: str) -> FileIndex:
        shard = read_shard(path)
        layout = shard.layout
        tensors = []
        for i, e in enumerate(layout.entries):
            records = [r for (j, _, _), r in zip(layout.chunks, shard.records) if j == i]
            start = records[0][0] if records else layout.spans[i][0]
            stride = row_major_stride(e.shape) if not layout.codec.compressed else (0,) * len(e.shape)
            tensors.append(IndexEntry("", e.name, e.dtype, e.shape, start, stride, tuple(records)))
        return FileIndex(path, shard.size, hashlib.sha256(layout.header).hexdigest(), tuple(tensors), layout.attrs)

    def compute_layout(self, entries, attrs=(), groups=(), *, text=None) -> ShardLayout:
        rows = [tuple(e) for e in entries]
        problems = [f"{r[1]}: group {r[0]!r} (expected ''). zarr shards are flat." for r in rows if r[0]]
        if tuple(groups):
            problems.append(f"groups {list(groups)} (expected none). zarr shards are flat.")
        if text is not None:
            problems.append("text content given (expected none). Only a text format holds text.")
        if problems:
            raise ValidationError(problems)
        return compute_layout([(r[1], r[2], r[3]) for r in rows], attrs)

    def create(self, path: str, layout: ShardLayout) -> None:
        """The temporary file at the uncompressed size, with the header and (uncompressed) the index."""
        _pieces.create_temp(path, layout.size, layout.header)
        fd = _pieces.open_temp(path, os.O_WRONLY)
        try:
            fileio.pwrite_all(fd, layout.trailer, layout.size - len(layout.trailer), path=path, write_behind=False)
        except ExecutionError:
            os.close(fd)
            self.abort(path)
            raise
        os.close(fd)

    def write_piece(self, path: str, layout: ShardLayout, index: int, data, offset: int = 0) -> Piece:
        # compressed: finish reads the raw bytes back soon, so they stay in the page cache (one shard's worth)
        return _pieces.write_piece(path, layout, index, data, offset, write_behind=not layout.codec.compressed)

    def finish(self, path: str, layout: ShardLayout, pieces: Iterable[Piece]) -> list[int]:
        """Check the tiling; uncompressed: fsync and rename; compressed: encode the chunks into
        :func:`packed_name`, then rename that.  Returns one CRC32 per entry, of its raw bytes."""
        crcs = _pieces.entry_crcs(path, layout, pieces)
        if not layout.codec.compressed:
            _pieces.commit(path, layout.size)
        else:
            _pack(path, layout)
        return crcs

    def abort(self, path: str) -> None:
        _pieces.abort(path)
        try:
            os.unlink(packed_name(path))
        except FileNotFoundError:
            pass

    def check_file(self, path: str, record: dict, layout: ShardLayout | None = None) -> FileCheck:
        """Header (against the plan's layout when given), size, index, and each entry's decoded bytes against
        the journaled CRC32."""
        try:
            shard = read_shard(path)
        except FormatError as exc:
            return FileCheck(0, [str(exc)])
        n = len(shard.layout.entries)
        if layout is not None and shard.layout.header != layout.header:
            return FileCheck(0, [f"{path}: header differs from the one the plan implies. Delete the file and run "
                                 f"the plan again."])
        if shard.size != record.get("size"):
            return FileCheck(0, [f"{path}: size {shard.size} (journaled {record.get('size')})."])
        crcs = record.get("crc32") or []
        if len(crcs) != n:
            return FileCheck(n, [f"{path}: {n} entries in the header but {len(crcs)} checksums in the journal. "
                                 f"Delete the file and run the plan again."])
        problems = []
        fd = os.open(path, os.O_RDONLY)
        try:
            for i, e in enumerate(shard.layout.entries):
                try:
                    ok = fileio.crc32(entry_bytes(shard, fd, i)) == crcs[i]
                except FormatError:
                    ok = False
                if not ok:
                    problems.append(f"{path}: {e.name}: checksum differs from the journal (corrupted on disk?). "
                                    f"Delete the file and run the plan again.")
        finally:
            os.close(fd)
        return FileCheck(n, problems)

    def read_entry(self, path: str, layout: ShardLayout, index: int) -> np.ndarray:
        """Entry ``index``'s raw bytes, decoded when the shard is compressed."""
        shard = read_shard(path)
        fd = os.open(path, os.O_RDONLY)
        try:
            return entry_bytes(shard, fd, index)
        finally:
            os.close(fd)

    def read_region(self, path: str, dtype: str, shape: tuple[int, ...], offsets: tuple[int, ...],
                    lengths: tuple[int, ...]) -> torch.Tensor:
        """A band of the zarr array whose directory is ``path`` (any zarr v3 array, ours or zarr-python's)."""
        return read_region(path, dtype, shape, offsets, lengths)


def _pack(path: str, layout: ShardLayout) -> None:
    """Encode the raw temporary file chunk by chunk into :func:`packed_name`, fsync, rename, drop the raw file."""
    tmp = fileio.temp_name(path)
    packed = packed_name(path)
    src = _pieces.open_temp(path, os.O_RDONLY)
    try:
        found = os.fstat(src).st_size
        if found != layout.size:
            raise ExecutionError(f"{tmp}: size {found} (expected {layout.size}). It was created with another "
                                 f"layout; abort and start again.")
        try:
            dst = os.open(packed, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as exc:
            raise fileio.write_error(packed, exc) from exc
        try:
            fileio.pwrite_all(dst, layout.header, 0, path=packed)
            pos, records = len(layout.header), []
            for i, e in enumerate(layout.entries):
                start, end = layout.spans[i]
                raw = np.empty(end - start, dtype=np.uint8)
                fileio.pread_into(src, raw, start, path=tmp)
                itemsize = types.dtype(e.dtype).itemsize
                blobs = [layout.codec.encode(raw[a - start:b - start], itemsize) if b > a else b""
                         for j, a, b in layout.chunks if j == i]
                for blob in blobs:
                    records.append((pos, len(blob)))
                    pos += len(blob)
                data = b"".join(blobs)
                if data:
                    fileio.pwrite_all(dst, data, records[-len(blobs)][0], path=packed)
            fileio.pwrite_all(dst, _trailer(records), pos, path=packed)
            os.fsync(dst)
        except OSError as exc:
            raise fileio.write_error(packed, exc) from exc
        finally:
            os.close(dst)
    finally:
        os.close(src)
    os.replace(packed, path)
    fileio.fsync_dir(os.path.dirname(os.path.abspath(path)))
    _pieces.abort(path)  # the raw temporary file


ZARR = ZarrFormat()
