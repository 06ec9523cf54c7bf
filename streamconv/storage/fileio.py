"""Low-level file I/O: exact positional reads, positional writes with write-behind, CRC32 combining,
and atomic finishing.

Why positional reads instead of mmap: mapped pages count in a process's resident set as the OS reports it,
and a lazy mmap slice over-reads through readahead.  ``os.preadv`` of the exact byte range reads what is
needed into a buffer we own, so resident memory is the buffers we hold and nothing else.

Why write-behind: buffered writes pile up dirty pages, which count against a cgroup's memory and then flush
several times slower on the virtual disks we run on.  After each positional write we start writeback of
that range, wait for it, and drop it from the page cache.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import zlib

import numpy as np

from ..errors import ExecutionError, FormatError

log = logging.getLogger(__name__)

_SYNC_FILE_RANGE_WAIT_BEFORE = 1
_SYNC_FILE_RANGE_WRITE = 2
_SYNC_FILE_RANGE_WAIT_AFTER = 4
_MAX_IO = 1 << 30  # Linux caps one read/write at ~2 GiB; stay well under it.

_libc = None
if hasattr(os, "posix_fadvise"):
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    except (OSError, AttributeError):  # not glibc/Linux: plain writes, fsync at the end
        _libc = None


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def release_large_allocations(threshold: int = 1 << 20) -> bool:
    """Ask glibc to serve allocations of ``threshold`` bytes or more with their own mappings, returned to the
    OS when freed.

    Why: by default glibc raises its mmap threshold after large blocks are freed (up to 32 MiB), so later
    buffers come from the heap, whose freed holes are rarely given back.  A long conversion then sees its
    resident memory creep up with the amount of data processed (measured: +35% between a 4 GB and an 8 GB
    source) although what is live stays bounded.  Returns False where mallopt is unavailable.
    """
    if _libc is None or not hasattr(_libc, "mallopt"):
        return False
    ok = _libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)) == 1
    ok &= _libc.mallopt(_M_TRIM_THRESHOLD, int(threshold)) == 1
    return bool(ok)


def pread_into(fd: int, buf: memoryview | np.ndarray, offset: int, *, path: str = "?") -> None:
    """Fill ``buf`` with the bytes of ``fd`` starting at ``offset``; short files raise FormatError."""
    view = memoryview(buf).cast("B")
    done = 0
    total = len(view)
    while done < total:
        n = os.preadv(fd, [view[done : done + _MAX_IO]], offset + done)
        if n == 0:
            raise FormatError(
                f"{path}: file ends at byte {offset + done}, but {total - done} more bytes were expected "
                f"(truncated download?). Re-copy the file."
            )
        done += n


def read_range(path: str, start: int, length: int) -> np.ndarray:
    """Read ``length`` bytes at ``start`` of ``path`` into a fresh uint8 array."""
    out = np.empty(length, dtype=np.uint8)
    fd = os.open(path, os.O_RDONLY)
    try:
        if hasattr(os, "posix_fadvise") and length:
            os.posix_fadvise(fd, start, length, os.POSIX_FADV_SEQUENTIAL)
        pread_into(fd, out, start, path=path)
    finally:
        os.close(fd)
    return out


def pwrite_all(fd: int, data: memoryview | bytes | np.ndarray, offset: int, *, path: str = "?",
               write_behind: bool = True) -> None:
    """Write all of ``data`` at ``offset``; then (Linux) flush that range and drop it from the page cache."""
    view = memoryview(data).cast("B") if not isinstance(data, bytes) else memoryview(data)
    done = 0
    total = len(view)
    try:
        while done < total:
            done += os.pwrite(fd, view[done : done + _MAX_IO], offset + done)
    except OSError as exc:
        raise write_error(path, exc) from exc
    if write_behind and total and _libc is not None:
        flags = _SYNC_FILE_RANGE_WAIT_BEFORE | _SYNC_FILE_RANGE_WRITE | _SYNC_FILE_RANGE_WAIT_AFTER
        if _libc.sync_file_range(fd, offset, total, flags) != 0:
            err = ctypes.get_errno()
            raise write_error(path, OSError(err, os.strerror(err)))
        os.posix_fadvise(fd, offset, total, os.POSIX_FADV_DONTNEED)


def write_error(path: str, exc: OSError) -> ExecutionError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ExecutionError(f"{path}: disk full while writing. Free space and run the plan again to resume.")
    return ExecutionError(f"{path}: write failed ({exc.strerror or exc}).")


def fsync_dir(path: str) -> None:
    """fsync a directory so that a rename inside it is durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_small(path: str, limit: int, *, what: str = "file") -> bytes:
    """The bytes of a small regular file, refusing what is not one: a directory, a FIFO or device (a
    symlink to /dev/zero), or a file over ``limit`` bytes.  One-line :class:`FormatError` naming the path."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise FormatError(f"{path}: cannot read the {what} ({exc.strerror}).") from None
    import stat as _stat

    if _stat.S_ISDIR(st.st_mode):
        raise FormatError(f"{path}: is a directory, expected the {what}. Point at the file itself.")
    if not _stat.S_ISREG(st.st_mode):
        raise FormatError(f"{path}: not a regular file (a FIFO, device or socket), expected the {what}.")
    if st.st_size > limit:
        raise FormatError(f"{path}: {st.st_size} bytes, more than any {what} holds (at most {limit}). Is it the "
                          f"right file?")
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise FormatError(f"{path}: cannot read the {what} ({exc.strerror}).") from None
    if len(data) > limit:
        raise FormatError(f"{path}: more than {limit} bytes, more than any {what} holds.")
    return data


def read_json(path: str, limit: int, *, what: str = "file", kind: type = dict):
    """A small JSON file of type ``kind`` (object by default), with one-line errors for every way it can be
    wrong: not a regular file, too big, not UTF-8, not JSON, nested too deep, not of that type."""
    import json

    data = read_small(path, limit, what=what)
    try:
        obj = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise FormatError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); expected the {what}.") from None
    except RecursionError:
        raise FormatError(f"{path}: JSON nested too deeply to be the {what}.") from None
    except ValueError as exc:
        raise FormatError(f"{path}: not valid JSON ({exc}); expected the {what}.") from None
    if not isinstance(obj, kind):
        raise FormatError(f"{path}: a JSON {type(obj).__name__}, expected the {what} as a JSON "
                          f"{'object' if kind is dict else kind.__name__}.")
    return obj


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write a small file under a temporary name, fsync it, and rename it into place."""
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise write_error(path, exc) from exc
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def temp_name(path: str) -> str:
    """The name a file is written under until it is complete."""
    return path + ".partial"


# --- CRC32 of a concatenation from the CRCs of its parts (zlib's crc32_combine) ----------------------------------
#
# CRC32 is a polynomial remainder, so crc(A + B) = crc(A) * x^(8 len B) + crc(B) (mod P).  x^(2^k) mod P is
# tabulated once; multiplying by x^(8n) is then one table product per set bit of n (zlib >= 1.2.12's method).

_POLY = 0xEDB88320  # reflected CRC-32 polynomial


def _multmodp(a: int, b: int) -> int:
    """a * b modulo the CRC polynomial (reflected bit order: bit 31 is x^0)."""
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if not a & (m - 1):
                return p
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1


_X2N = [1 << 30]  # x^1
for _ in range(31):
    _X2N.append(_multmodp(_X2N[-1], _X2N[-1]))  # x^(2^k)


def _x2nmodp(n: int, k: int) -> int:
    """x^(n * 2^k) modulo the CRC polynomial."""
    p = 1 << 31  # x^0
    while n:
        if n & 1:
            p = _multmodp(_X2N[k & 31], p)
        n >>= 1
        k += 1
    return p


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC32 of ``A + B`` given ``crc32(A)``, ``crc32(B)`` and ``len(B)``."""
    if len2 <= 0:
        return crc1
    return _multmodp(_x2nmodp(len2, 3), crc1) ^ crc2


def crc32_of_range(path: str, start: int, end: int, chunk: int = 64 << 20) -> int:
    """CRC32 of bytes ``[start, end)`` of ``path``, read in chunks of at most ``chunk`` bytes."""
    crc = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = np.empty(min(chunk, max(end - start, 1)), dtype=np.uint8)
        pos = start
        while pos < end:
            n = min(len(buf), end - pos)
            pread_into(fd, buf[:n], pos, path=path)
            crc = zlib.crc32(buf[:n], crc)
            pos += n
    finally:
        os.close(fd)
    return crc


def crc32(data) -> int:
    return zlib.crc32(memoryview(data).cast("B") if not isinstance(data, bytes) else data)
