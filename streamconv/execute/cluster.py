"""A plan on a dask.distributed cluster: one coarse task per group of output files, exact under worker loss.

The *client* is the ``streamconv run --scheduler ADDRESS`` process: it holds the save dir's lock, audits the
plan, and is the only process that renames files into their final names and journals them.  Workers need the
shared filesystem (sources and save dir at the same paths) and nothing else.

1. The client groups the plan's tensor files (:func:`streamconv.plan.split.group_files`, one slot per worker
   thread: files that share source bytes go together, so a source read by many ranks is read by one worker)
   and submits one task per group, largest first.  A task's argument is its group's sub-plan as JSON (data,
   never code); its result is a few numbers per file (size, CRCs).  No tensor ever crosses the network.
2. On a worker, :func:`run_group` first removes whatever an earlier attempt at these files left (a worker
   that died mid-file), draws a fresh *attempt token*, and writes every file of the group as
   ``<final>.<token>`` (temporary name ``<final>.<token>.partial``) with the local threaded executor: reads
   shared between the group's files, at most ``--max-memory`` bytes in flight, ``--workers`` threads.
3. The client, for each result it receives, renames ``<final>.<token>`` to ``<final>``, fsyncs the directory
   and journals the file.  A file is journaled only once whole, by the lock holder.

Why this is exact when a worker dies at any point: the scheduler runs the dead worker's task again elsewhere,
and the new attempt writes new files under a new token, from scratch; no two attempts ever share a file, so
nothing a dead (or presumed dead, still running) worker half-wrote can reach a final name, and only results
the client received are renamed.  Leftover attempt files are removed by the retry, at the end of the run, and
by the next run (all under the lock).

Failures: a task that raises (bad input, a read error) fails the run at once (``retries=0``); a task whose
worker dies is retried up to the scheduler's ``distributed.scheduler.allowed-failures`` times (default 3), then
fails as :class:`distributed.KilledWorker`; a lost scheduler stops the run with one error, and the same command
resumes (completed files are journaled).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import socket
import time
from dataclasses import dataclass

from ..errors import ExecutionError
from ..plan.plan import Plan
from ..plan.split import Group, group_files, imbalance, sub_plan
from ..storage import fileio
from . import journal

log = logging.getLogger(__name__)

WAIT_FOR_WORKERS = 60   # seconds a run waits for a first worker before giving up

TOKEN = re.compile(r"\.[0-9a-f]{32}(?:\.partial)?$")   # the suffix of an attempt file


@dataclass(frozen=True)
class ClusterReport:
    groups: int
    bytes_written: int
    by_worker: tuple[tuple[str, int], ...]   # (worker address, bytes written), busiest first
    read_bytes: int                          # distinct source bytes the groups read, summed over groups

    @property
    def imbalance(self) -> float:
        return imbalance([b for _, b in self.by_worker])


# --- attempt files ---------------------------------------------------------------------------------------------------

def attempt_path(final: str, token: str) -> str:
    return f"{final}.{token}"


def remove_attempts(plan: Plan, files: list[int] | None = None) -> list[str]:
    """Remove ``<final>.<token>`` and ``<final>.<token>.partial`` of the plan's files (``files``: indexes; default
    all), never a planned output.  Returns the removed paths."""
    root = plan.target_root
    planned = {f.path for f in plan.files}
    by_dir: dict[str, set[str]] = {}
    for fi in (range(len(plan.files)) if files is None else files):
        rel = plan.files[fi].path
        d, base = os.path.split(rel)
        by_dir.setdefault(d, set()).add(base)
    removed = []
    for d, bases in by_dir.items():
        try:
            names = os.listdir(os.path.join(root, d))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for name in names:
            m = TOKEN.search(name)
            if not m or name[:m.start()] not in bases:
                continue
            rel = f"{d}/{name}" if d else name
            if rel in planned:
                continue
            path = os.path.join(root, d, name)
            if os.path.islink(path) or os.path.isfile(path):
                try:
                    os.unlink(path)
                    removed.append(path)
                except FileNotFoundError:
                    pass
    return removed


# --- the worker's task -----------------------------------------------------------------------------------------------

def run_group(plan_json: dict, opts) -> dict:
    """Write every file of one group (``plan_json``: its sub-plan) under a fresh attempt token; return, per file,
    its path, token, size and CRCs.  Runs on a worker; touches only the attempt files of its own outputs."""
    from .executor import build_graph  # the executor imports this module
    import dask

    start = time.monotonic()
    fileio.release_large_allocations()
    plan = Plan.from_json(plan_json, path="cluster task")
    remove_attempts(plan)   # an earlier attempt's bytes are never reused
    token = secrets.token_hex(16)
    dsk, _ = build_graph(plan, opts, attempt=token)
    keys = [k for k in dsk if isinstance(k, tuple) and k[0] == "finish"]
    try:
        records = dask.threaded.get(dsk, keys, num_workers=opts.num_workers)
    except BaseException:
        remove_attempts(plan)
        raise
    return {"files": list(records), "worker": _worker_address(), "host": socket.gethostname(), "pid": os.getpid(),
            "seconds": time.monotonic() - start}


def _worker_address() -> str:
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return f"{socket.gethostname()}:{os.getpid()}"


# --- the client ------------------------------------------------------------------------------------------------------

def run_groups(client, plan: Plan, opts, *, skip: frozenset[str], journal_name: str, progress) -> ClusterReport:
    """Run every tensor file of ``plan`` not in ``skip`` on the cluster of ``client``; journal each file once
    renamed into place.  Raises one :class:`ExecutionError` (or the task's own error) on failure."""
    from distributed import as_completed

    if not client.nthreads():
        try:
            client.wait_for_workers(1, timeout=WAIT_FOR_WORKERS)
        except (TimeoutError, OSError):
            raise ExecutionError(f"cluster: no worker joined the scheduler in {WAIT_FOR_WORKERS} s. Start workers with "
                                 f"`dask worker ADDRESS` (see docs/distributed.md), then run again.") from None
    slots = max(1, sum(client.nthreads().values()))
    groups = group_files(plan, slots, skip=skip)
    run_id = secrets.token_hex(4)
    pending: dict = {}
    for i, g in enumerate(groups):
        sub = sub_plan(plan, list(g.files))
        fut = client.submit(run_group, sub.to_json(), opts, key=f"streamconv-group-{i:05d}-{run_id}",
                            priority=g.cost, retries=0, pure=False)
        pending[fut] = (i, g)
    log.info("cluster: %d groups of %d files on %d worker threads", len(groups), sum(len(g.files) for g in groups),
             slots)
    by_worker: dict[str, int] = {}
    try:
        for fut in as_completed(list(pending)):
            i, g = pending.pop(fut)
            result = _result(fut, plan, g)
            fut.release()   # the client has the result: nothing may recompute it now
            _commit(plan, result, journal_name)
            by_worker[result["worker"]] = by_worker.get(result["worker"], 0) + g.write_bytes
            progress.add(g.write_bytes)
    except BaseException:
        if pending:
            try:
                client.cancel(list(pending), force=True)
            except Exception:  # noqa: BLE001  (a lost scheduler: nothing left to cancel)
                pass
        raise
    finally:
        remove_attempts(plan)
    report = ClusterReport(len(groups), sum(g.write_bytes for g in groups),
                           tuple(sorted(by_worker.items(), key=lambda kv: (-kv[1], kv[0]))),
                           sum(g.read_bytes for g in groups))
    if report.by_worker:
        log.info("cluster: bytes written per worker %s; imbalance (max/mean) %.2f",
                 ", ".join(f"{w}={b}" for w, b in report.by_worker), report.imbalance)
    return report


def _result(fut, plan: Plan, g: Group) -> dict:
    """The task's result, or one error naming the group's files and what to do.

    A task's own exception (bad input, a write error) is re-raised as it is: it fails the run once.  Anything
    else while waiting for a result (the future cancelled, the connection closed) means the client lost its
    scheduler: a worker that dies is handled by the scheduler itself (the task runs again elsewhere)."""
    from distributed import KilledWorker

    first = plan.files[g.files[0]].path
    what = f"{first}" + (f" and {len(g.files) - 1} more file(s)" if len(g.files) > 1 else "")
    try:
        return fut.result()
    except KilledWorker as exc:
        raise ExecutionError(f"cluster: the task writing {what} was running on workers that died too often "
                             f"({_one_line(exc)}); out of memory? Lower --max-memory or give workers more "
                             f"memory, then run the same command again to resume.") from None
    except Exception as exc:  # noqa: BLE001
        if fut.status == "error":
            raise
        raise ExecutionError(f"cluster: lost the scheduler ({_one_line(exc)}). Files completed so far are "
                             f"journaled: restart the scheduler and workers, then run the same command again "
                             f"to resume.") from None


def _commit(plan: Plan, result: dict, journal_name: str) -> None:
    """Rename each file of a finished group into place (fsync its directory), then journal it."""
    root = plan.target_root
    planned = {f.path for f in plan.files}
    for rec in result["files"]:
        rel, token = rec["path"], rec["attempt"]
        if rel not in planned or not re.fullmatch(r"[0-9a-f]{32}", token):
            raise ExecutionError(f"cluster: a task returned {rel!r} (token {token!r}), which this plan does not write.")
        final = os.path.join(root, *rel.split("/"))
        try:
            os.replace(attempt_path(final, token), final)
        except FileNotFoundError:
            raise ExecutionError(f"{attempt_path(final, token)}: a finished task's file is gone (removed by another "
                                 f"attempt at it, or by another run). Run the same command again to "
                                 f"resume.") from None
        fileio.fsync_dir(os.path.dirname(final))
        journal.record_file(root, rel, rec["size"], rec["crc32"], rec["file_crc32"], name=journal_name)


@contextlib.contextmanager
def quiet_logs():
    """While a client runs and closes, distributed's own log lines (a lost scheduler logs its reconnection
    tracebacks) are shown only with ``-v``: the run reports a failure in one line of its own."""
    if logging.getLogger().isEnabledFor(logging.INFO):
        yield
        return
    names = ["distributed"] + [n for n in logging.root.manager.loggerDict if n.startswith("distributed.")]
    loggers = [logging.getLogger(n) for n in names]   # children set their own levels (dask's logging config)
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
