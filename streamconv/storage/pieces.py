"""The part of the stateless write protocol that every fixed-layout format shares.

A format (torchzip, safetensors) fixes every byte offset up front in a frozen *layout* that has:

* ``size``: bytes of the whole file;
* ``entries``: one per tensor, each with ``.dtype`` (our dtype name) and ``.label`` (the name errors use);
* ``spans``: the absolute ``(start, end)`` of each entry's bytes.

The format module keeps its own ``create``/``write_piece``/``finish``/``abort`` (that is where its contract is
documented) and calls these helpers for what does not depend on the format: making the temporary file,
validating and writing one piece, checking that the pieces tile every entry and combining their CRCs, and
committing the file (fsync, rename, fsync of the directory).  Nothing here holds state between calls, so any
thread or process may call any function, in any order the protocol allows.
"""

from __future__ import annotations

import os
from typing import Iterable, NamedTuple, Protocol, Sequence

import numpy as np
import torch

from .. import types
from ..errors import ExecutionError, ValidationError
from . import fileio
from .base import Piece


class FlatEntry(NamedTuple):
    """One tensor of a flat file format (safetensors, a zarr shard): its name, our dtype name and its shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def label(self) -> str:
        return self.name


def flat_entries(entries: Iterable[tuple[str, str, tuple[int, ...]]]) -> tuple[FlatEntry, ...]:
    """``(name, dtype, shape)`` rows as hashable :class:`FlatEntry` rows (layouts are cached by them): numpy
    integers in a shape (from a header or a size computation) become ints; anything else is left for the
    format's validation."""
    return tuple(FlatEntry(n, d, tuple(int(x) if isinstance(x, np.integer) else x for x in s)) for n, d, s in entries)


class _Entry(Protocol):
    dtype: str

    @property
    def label(self) -> str: ...


class Layout(Protocol):
    """What the helpers read from a format's layout (see the module docstring)."""

    size: int
    entries: Sequence[_Entry]
    spans: Sequence[tuple[int, int]]


def tensor_bytes(t: torch.Tensor) -> np.ndarray:
    """The raw bytes of a tensor in row-major order, as a uint8 numpy array (no copy when contiguous)."""
    t = t.detach().contiguous().cpu()
    if t.numel() == 0:
        return np.empty(0, dtype=np.uint8)
    return t.reshape(-1).view(torch.uint8).numpy()


def create_temp(path: str, size: int, head: bytes = b"") -> None:
    """Make ``fileio.temp_name(path)`` at ``size`` bytes (sparse) with ``head`` written at offset 0.

    It must not exist: a new run never trusts (or shares) the bytes of another one."""
    tmp = fileio.temp_name(path)
    try:
        # Exclusive: two writers can never share a temporary file.  The executor removes the leftovers of a
        # killed run (under its lock) before creating anew.
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    except FileExistsError:
        raise ExecutionError(f"{tmp}: already exists: another writer is producing this file. Only one run may "
                             f"write a save dir at a time.") from None
    except OSError as exc:
        raise fileio.write_error(tmp, exc) from exc
    try:
        os.ftruncate(fd, size)
        if head:
            fileio.pwrite_all(fd, head, 0, path=tmp, write_behind=False)
    except (OSError, ExecutionError) as exc:
        os.close(fd)
        abort(path)
        if isinstance(exc, ExecutionError):
            raise
        raise fileio.write_error(tmp, exc) from exc
    os.close(fd)


def open_temp(path: str, flags: int) -> int:
    try:
        return os.open(fileio.temp_name(path), flags)
    except FileNotFoundError:
        raise ExecutionError(f"{fileio.temp_name(path)}: not found. Call create() first; finish() or abort() "
                             f"may have run already.") from None


def write_piece(path: str, layout: Layout, index: int, data: torch.Tensor | np.ndarray | bytes,
                offset: int = 0, *, write_behind: bool = True) -> Piece:
    """Check ``data`` against entry ``index`` (dtype for tensors, bounds always), pwrite it at its absolute
    offset in the temporary file, and return ``(index, offset, length, crc32)``.  ``write_behind=False`` leaves
    the bytes in the page cache (a file that ``finish`` reads back, such as a compressed zarr shard's)."""
    if not 0 <= index < len(layout.entries):
        raise ExecutionError(f"{path}: entry index {index} out of range (the layout has {len(layout.entries)}).")
    entry = layout.entries[index]
    if isinstance(data, torch.Tensor):
        want = types.dtype(entry.dtype).torch
        if data.dtype != want:
            raise ExecutionError(f"{path}: {entry.label}: piece has dtype {data.dtype} (expected {want}). "
                                 f"Cast it, or pass raw bytes as a uint8 numpy array.")
        raw = memoryview(tensor_bytes(data))
    elif isinstance(data, np.ndarray):
        raw = memoryview(np.ascontiguousarray(data)).cast("B")
    else:
        raw = memoryview(data).cast("B")
    start, end = layout.spans[index]
    if offset < 0 or start + offset + len(raw) > end:
        raise ExecutionError(f"{path}: {entry.label}: piece [{offset}, {offset + len(raw)}) lies outside the "
                             f"tensor's {end - start} bytes. The plan's byte ranges are wrong.")
    crc = fileio.crc32(raw)
    if len(raw):
        fd = open_temp(path, os.O_WRONLY)
        try:
            fileio.pwrite_all(fd, raw, start + offset, path=path, write_behind=write_behind)
        finally:
            os.close(fd)
    return index, offset, len(raw), crc


def entry_crcs(path: str, layout: Layout, pieces: Iterable[Piece]) -> list[int]:
    """Each entry's CRC32 from its pieces' CRCs, in offset order; raises once listing every bad entry.

    Exact duplicate pieces (a retried task) count once; any other overlap, and any gap, is an error."""
    n = len(layout.entries)
    by_entry: list[set[tuple[int, int, int]]] = [set() for _ in range(n)]
    problems = []
    for index, offset, length, crc in pieces:
        if not 0 <= index < n:
            problems.append(f"{path}: piece of entry {index} (the layout has {n} entries).")
        elif length:
            by_entry[index].add((offset, length, crc))
    crcs = []
    for entry, (start, end), found in zip(layout.entries, layout.spans, by_entry):
        size, pos, crc = end - start, 0, 0
        for offset, length, piece_crc in sorted(found):
            if offset != pos:
                what = "overlap" if offset < pos else "leave a gap"
                problems.append(f"{path}: {entry.label}: pieces {what} at byte {min(offset, pos)} (expected "
                                f"a piece at {pos}, got one at {offset}). Write each byte exactly once.")
                break
            # crc32(b"") == 0, so the first piece needs no combining (the slow part at ~2 ms a call).
            crc = fileio.crc32_combine(crc, piece_crc, length) if pos else piece_crc
            pos += length
        else:
            if pos != size:
                problems.append(f"{path}: {entry.label}: bytes [{pos}, {size}) were never written. "
                                f"Write the missing pieces, then call finish again.")
        crcs.append(crc)
    if problems:
        raise ValidationError(problems)
    return crcs


def commit(path: str, size: int, patches: Iterable[tuple[int, bytes]] = ()) -> None:
    """Write ``patches`` ((offset, bytes): headers known only now), fsync, rename the temporary file to
    ``path`` and fsync the directory, so that the final name appears only with every byte durable."""
    tmp = fileio.temp_name(path)
    fd = open_temp(path, os.O_RDWR)
    try:
        found = os.fstat(fd).st_size
        if found != size:
            raise ExecutionError(f"{tmp}: size {found} (expected {size}). It was created with another layout; "
                                 f"abort and start again.")
        for offset, data in patches:
            fileio.pwrite_all(fd, data, offset, path=path, write_behind=False)
        os.fsync(fd)
    except OSError as exc:
        raise fileio.write_error(path, exc) from exc
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fileio.fsync_dir(os.path.dirname(os.path.abspath(path)))


def abort(path: str) -> None:
    """Remove the temporary file, if any. The final name is never touched."""
    try:
        os.unlink(fileio.temp_name(path))
    except FileNotFoundError:
        pass


def file_crc32(path: str, size: int, spans: Sequence[tuple[int, int]], crcs: Sequence[int]) -> int:
    """CRC32 of the whole file from the CRCs of its data spans (``crcs[i]`` for ``spans[i]``, as ``finish``
    returns them) and the bytes between them, which are read (headers, pickles, directories: small)."""
    parts = sorted(zip(spans, crcs))
    total, pos = 0, 0
    for (start, end), crc in parts + [((size, size), 0)]:
        if start > pos:
            total = fileio.crc32_combine(total, fileio.crc32_of_range(path, pos, start), start - pos)
        if end > start:
            total = fileio.crc32_combine(total, crc, end - start)
        pos = max(pos, end)
    return total


def file_crc_problem(path: str, record: dict, spans: Sequence[tuple[int, int]]) -> str | None:
    """The whole file against the journaled ``file_crc32``: with the data spans already checked against their
    journaled CRCs, this reads only the bytes between them, so every byte of the file is covered."""
    want = record.get("file_crc32")
    if want is None:
        return None  # journaled by a version that did not record it
    got = file_crc32(path, os.path.getsize(path), spans, record.get("crc32") or [])
    if got != want:
        return (f"{path}: bytes outside the tensor data (headers, pickle, zip directory) differ from the journal "
                f"(corrupted on disk?). Delete the file and run the plan again.")
    return None


# --- checking a finished file (``check_file`` with a layout) ---------------------------------------------------

def size_problem(path: str, layout: Layout, record: dict) -> str | None:
    """The file's size against the layout's and the journal's, or None when all three agree."""
    size = os.path.getsize(path)
    if size != layout.size or size != record.get("size"):
        return f"{path}: size {size} (planned {layout.size}, journaled {record.get('size')})."
    return None


def crc_problems(path: str, layout: Layout, record: dict, labels: Sequence[str]) -> list[str]:
    """Each entry's bytes (read back from disk) against the CRC32 the journal recorded for it."""
    crcs = record.get("crc32") or []
    problems = []
    for i, (label, (start, end)) in enumerate(zip(labels, layout.spans)):
        if i >= len(crcs) or fileio.crc32_of_range(path, start, end) != crcs[i]:
            problems.append(f"{path}: {label}: checksum differs from the journal (corrupted on disk?). Delete "
                            f"the file and run the plan again.")
    return problems
