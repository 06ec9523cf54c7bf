"""One writer per output: an advisory lock held for a whole run.

``<dir>/.streamconv.lock`` (or ``<prefix>.streamconv.lock`` for dataset outputs) is opened without following
symlinks and locked with ``flock(LOCK_EX | LOCK_NB)``; the holder writes its pid into it.  A second writer
fails at once with one line naming that pid.  The kernel drops the lock when its holder dies however it dies
(kill -9 included), so a stale lock file is simply taken over by the next run, which says so.

The holder removes the file when it is done, so a run leaves no trace; a taker therefore checks, once it holds
the lock, that the path still names the file it locked (else the holder removed it meanwhile: try again).

Shared mode (``shared=True``, ``LOCK_SH``) is for the parts of a split plan: parts on several hosts write
disjoint files of one save dir, so they hold the save dir's lock *shared* (each also holds its own part lock
exclusively), and a whole-plan run or ``run --finish``, which needs it exclusively, cannot start while any part
runs.  A shared holder neither writes its pid nor removes the file (others may hold it too).  Across hosts this
needs a filesystem whose ``flock`` is coherent between clients (NFSv4, Lustre mounted with ``flock``, GPFS,
CephFS); see docs/distributed.md.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os

from ..errors import ExecutionError

log = logging.getLogger(__name__)

NAME = ".streamconv.lock"


class TargetLock:
    """``with TargetLock(path):`` holds the lock file ``path`` for the block (the caller makes the directory)."""

    def __init__(self, path: str, shared: bool = False):
        self.path = path
        self.shared = shared
        self.fd: int | None = None

    def __enter__(self) -> "TargetLock":
        for _ in range(100):
            fd = self._open()
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except OSError as exc:
                holder = _read_pid(fd)
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    who = f"pid {holder}" if holder else "another process, or parts of a split plan"
                    raise ExecutionError(f"{os.path.dirname(self.path) or '.'}: another streamconv run ({who}) is "
                                         f"writing here (lock {self.path}). Wait for it to finish, or choose another "
                                         f"--save-dir.") from None
                raise ExecutionError(f"{self.path}: cannot take the run lock ({exc.strerror}).") from None
            try:
                same = os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder removed the file between our open and our lock: take the new one
        else:
            raise ExecutionError(f"{self.path}: the run lock keeps being replaced; is another run looping here?")
        self.fd = fd
        if self.shared:
            return self
        previous = _read_pid(fd)
        if previous and previous != os.getpid() and not _alive(previous):
            log.warning("%s: taking over the lock of pid %d, which is gone", self.path, previous)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return self

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            why = "it is a symlink" if exc.errno == errno.ELOOP else exc.strerror
            raise ExecutionError(f"{self.path}: cannot open the run lock ({why}). Remove it if it is not "
                                 f"streamconv's, or choose another --save-dir.") from None

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            if not self.shared:
                try:
                    os.unlink(self.path)  # still ours: we hold the lock, and takers re-check the path
                except OSError:
                    pass
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_for_dir(root: str) -> TargetLock:
    return TargetLock(os.path.join(root, NAME))
