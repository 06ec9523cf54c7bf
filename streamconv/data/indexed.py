"""Megatron's indexed dataset format (MMIDIDX version 1): a streaming writer and a small reader.

``P.bin`` is the concatenation of every sequence's tokens (little-endian, no header).  ``P.idx``:

    offset  size      field
    0       9         magic b"MMIDIDX\\x00\\x00"
    9       8         uint64 version = 1
    17      1         uint8 dtype code (4 = int32, see DTYPE_CODES)
    18      8         uint64 sequence count S
    26      8         uint64 document count D (= documents + 1)
    34      4*S       int32 sequence lengths (tokens)
    .       8*S       int64 sequence pointers (byte offset of each sequence in .bin)
    .       8*D       int64 document indices: 0, then the running sequence count after each document

Every document here holds exactly one sequence, so the document indices are ``0..S``.

The writer appends tokens to ``P.bin.partial`` and each sequence's length to a side file ``P.len.partial``
(int32), so nothing grows in memory with the corpus.  :meth:`IndexedWriter.finish` streams the side file into
``P.idx.partial``; :func:`commit` renames a group of datasets into place, every ``.idx`` last (Megatron opens
the ``.idx`` first, so a dataset without one never looks complete).  A resumed run truncates both partial
files to the lengths its journal recorded and appends from there.
"""

from __future__ import annotations

import os
import struct
import threading
from dataclasses import dataclass

import numpy as np

from ..errors import FormatError
from ..storage import fileio

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_BYTES = 34
# Megatron's DType codes (megatron/core/datasets/indexed_dataset.py); one table for writer and reader.
DTYPE_CODES: dict[int, np.dtype] = {1: np.dtype(np.uint8), 2: np.dtype(np.int8), 3: np.dtype(np.int16),
                                    4: np.dtype(np.int32), 5: np.dtype(np.int64), 6: np.dtype(np.float64),
                                    7: np.dtype(np.float32), 8: np.dtype(np.uint16)}
CODE_OF = {dt: code for code, dt in DTYPE_CODES.items()}
_CHUNK = 1 << 20  # sequences per step when streaming the side file into the .idx


def header(dtype: np.dtype, sequence_count: int, document_count: int) -> bytes:
    """The 34-byte ``.idx`` header."""
    return (MAGIC + struct.pack("<Q", VERSION) + struct.pack("<B", CODE_OF[np.dtype(dtype)])
            + struct.pack("<Q", sequence_count) + struct.pack("<Q", document_count))


def paths(prefix: str) -> dict[str, str]:
    """Final and temporary file names of the dataset at ``prefix``."""
    return {"bin": prefix + ".bin", "idx": prefix + ".idx", "bin_tmp": fileio.temp_name(prefix + ".bin"),
            "idx_tmp": fileio.temp_name(prefix + ".idx"), "len_tmp": fileio.temp_name(prefix + ".len")}


class IndexedWriter:
    """Append-only writer of one dataset, one sequence per document, under temporary names.

    Protocol (one caller at a time; ``close`` may come from another thread, after which ``append`` fails
    instead of writing to a descriptor number the OS may have reused):
      1) ``IndexedWriter(prefix)`` opens ``.bin.partial`` and ``.len.partial``; ``resume_at=(bin_bytes, count)``
         keeps that much of them (and fails if they are shorter) instead of starting empty;
      2) ``append(tokens, lengths)`` any number of times (tokens of consecutive sequences, concatenated);
      3) ``sync()`` makes everything appended so far durable (call before journaling ``state``);
      4) ``finish()`` writes ``.idx.partial`` from the side file and closes; then :func:`commit`.
    """

    def __init__(self, prefix: str, *, dtype=np.int32, resume_at: tuple[int, int] | None = None):
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        self.paths = paths(prefix)
        self._lock = threading.Lock()
        flags = os.O_RDWR | os.O_CREAT | (0 if resume_at else os.O_TRUNC)
        self._bin = os.open(self.paths["bin_tmp"], flags, 0o644)
        self._len = os.open(self.paths["len_tmp"], flags, 0o644)
        self.bin_bytes, self.count = resume_at or (0, 0)
        if resume_at:
            for fd, want, name in ((self._bin, self.bin_bytes, "bin_tmp"), (self._len, 4 * self.count, "len_tmp")):
                have = os.fstat(fd).st_size
                if have < want:
                    self.close()
                    raise FormatError(f"{self.paths[name]}: {have} bytes, but the journal recorded {want} "
                                      f"(expected at least that). Delete the .partial files to start afresh.")
                os.ftruncate(fd, want)

    @property
    def state(self) -> tuple[int, int]:
        """(bytes in .bin, sequences): what a journal records to resume here."""
        return self.bin_bytes, self.count

    def append(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        lengths = np.ascontiguousarray(lengths, dtype=np.int32)
        if int(lengths.sum(dtype=np.int64)) != tokens.size:
            raise ValueError(f"lengths sum to {int(lengths.sum())}, but {tokens.size} tokens were given")
        with self._lock:
            self._check_open()
            fileio.pwrite_all(self._bin, tokens, self.bin_bytes, path=self.paths["bin_tmp"])
            fileio.pwrite_all(self._len, lengths, 4 * self.count, path=self.paths["len_tmp"], write_behind=False)
            self.bin_bytes += tokens.nbytes
            self.count += lengths.size

    def sync(self) -> None:
        with self._lock:
            self._check_open()
            for fd, name in ((self._bin, "bin_tmp"), (self._len, "len_tmp")):
                try:
                    os.fsync(fd)
                except OSError as exc:
                    raise fileio.write_error(self.paths[name], exc) from exc

    def _check_open(self) -> None:
        if self._bin < 0:
            raise ValueError(f"{self.paths['bin_tmp']}: writer already closed")

    def finish(self) -> None:
        """Write ``.idx.partial`` (header, lengths, pointers, document indices), fsync, and close."""
        self.sync()
        count, itemsize = self.count, self.dtype.itemsize
        idx = self.paths["idx_tmp"]
        try:
            with open(idx, "wb") as out:
                out.write(header(self.dtype, count, count + 1))
                for start in range(0, count, _CHUNK):  # lengths, copied from the side file
                    out.write(self._read_lengths(start, min(count, start + _CHUNK)).tobytes())
                offset = 0
                for start in range(0, count, _CHUNK):  # pointers: exclusive running sum of lengths * itemsize
                    lengths = self._read_lengths(start, min(count, start + _CHUNK)).astype(np.int64)
                    ends = np.cumsum(lengths * itemsize) + offset
                    out.write((ends - lengths * itemsize).tobytes())
                    offset = int(ends[-1])
                for start in range(0, count + 1, _CHUNK):
                    out.write(np.arange(start, min(count + 1, start + _CHUNK), dtype=np.int64).tobytes())
                out.flush()
                os.fsync(out.fileno())
        except OSError as exc:
            raise fileio.write_error(idx, exc) from exc
        if offset != self.bin_bytes:
            raise FormatError(f"{self.paths['len_tmp']}: lengths sum to {offset} bytes but .bin holds "
                              f"{self.bin_bytes} (expected equal). Delete the .partial files and run again.")
        self.close()

    def _read_lengths(self, start: int, end: int) -> np.ndarray:
        out = np.empty(end - start, dtype=np.int32)
        fileio.pread_into(self._len, out, 4 * start, path=self.paths["len_tmp"])
        return out

    def close(self) -> None:
        with self._lock:
            for fd in (self._bin, self._len):
                if fd >= 0:
                    os.close(fd)
            self._bin = self._len = -1


def commit(prefixes: list[str]) -> None:
    """Rename finished datasets into place: old ``.idx`` files removed first, then every ``.bin``, then every
    ``.idx``, then the side files dropped.  Idempotent: a step already done is skipped, so a run killed here
    finishes the commit when resumed."""
    for prefix in prefixes:
        p = paths(prefix)
        if os.path.exists(p["idx_tmp"]) and os.path.exists(p["idx"]):
            os.remove(p["idx"])  # a stale .idx must never pair with the new .bin
    for key in ("bin", "idx"):
        for prefix in prefixes:
            p = paths(prefix)
            if os.path.exists(p[key + "_tmp"]):
                os.replace(p[key + "_tmp"], p[key])
    for prefix in prefixes:
        p = paths(prefix)
        if os.path.exists(p["len_tmp"]):
            os.remove(p["len_tmp"])
    for d in {os.path.dirname(os.path.abspath(p)) for p in prefixes}:
        fileio.fsync_dir(d)


def remove_partials(prefix: str) -> None:
    for key in ("bin_tmp", "idx_tmp", "len_tmp"):
        try:
            os.remove(paths(prefix)[key])
        except FileNotFoundError:
            pass


# --- reading ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class IndexInfo:
    dtype: np.dtype
    lengths: np.ndarray          # int32[S]
    pointers: np.ndarray         # int64[S]
    document_indices: np.ndarray  # int64[D]


def read_index(idx_path: str) -> IndexInfo:
    """Parse and check an ``.idx`` file (whole arrays in memory: S x 20 bytes)."""
    with open(idx_path, "rb") as f:
        head = f.read(HEADER_BYTES)
        if len(head) < HEADER_BYTES or head[:9] != MAGIC:
            raise FormatError(f"{idx_path}: not an MMIDIDX index (bad magic or shorter than 34 bytes). "
                              f"Pass the prefix of a Megatron indexed dataset.")
        version, = struct.unpack("<Q", head[9:17])
        code = head[17]
        s, d = struct.unpack("<QQ", head[18:34])
        if version != VERSION or code not in DTYPE_CODES:
            raise FormatError(f"{idx_path}: version {version}, dtype code {code} (expected version 1 and a "
                              f"code in {sorted(DTYPE_CODES)}).")
        want = HEADER_BYTES + 4 * s + 8 * s + 8 * d
        size = os.fstat(f.fileno()).st_size
        if size < want:
            raise FormatError(f"{idx_path}: {size} bytes, but its header needs {want} (truncated?).")
        lengths = np.fromfile(f, dtype="<i4", count=s)
        pointers = np.fromfile(f, dtype="<i8", count=s)
        docs = np.fromfile(f, dtype="<i8", count=d)
    return IndexInfo(DTYPE_CODES[code], lengths, pointers, docs)


class IndexedReader:
    """``len(r)``, ``r[i]`` (sequence i as a numpy array, read with an exact positional read)."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.index = read_index(prefix + ".idx")
        self.bin_path = prefix + ".bin"
        lengths, pointers = self.index.lengths, self.index.pointers
        need = int(pointers[-1]) + int(lengths[-1]) * self.index.dtype.itemsize if len(lengths) else 0
        have = os.path.getsize(self.bin_path)
        if have < need:
            raise FormatError(f"{self.bin_path}: {have} bytes, but the index points up to byte {need} (truncated?).")

    def __len__(self) -> int:
        return len(self.index.lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        n = int(self.index.lengths[i])
        raw = fileio.read_range(self.bin_path, int(self.index.pointers[i]), n * self.index.dtype.itemsize)
        return raw.view(self.index.dtype.newbyteorder("<"))
