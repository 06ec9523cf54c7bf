"""Run a saved plan on Dask, out of core.

The plan's output tensors are cut into *pieces* (bands of rows no bigger than ``band_bytes``; the band is
pushed down the graph by :func:`streamconv.graph.narrow`, so a band reads only its rows).  The Dask graph is
raw (a dict of tasks, as dask's spec describes), keyed by content:

    ("node", key, w)     one graph node (read, slice, cat, dequant...) made in wave w; shared sub-graphs run
                         once per pair of waves (see :func:`schedule`)
    ("create", f)        make output file f under its temporary name, at its final size
    ("write", f, i, b)   materialise piece b of tensor i of file f and pwrite it at its fixed offset
    ("wave", w)          barrier: every write of wave w is done
    ("finish", f)        headers, fsync, rename file f into place
    ("text", f)          small text files (config, index, tracker), written after every tensor file
    "done"

Every file goes through its storage format's steps (:class:`streamconv.storage.base.TensorFormat`); tasks
carry the format's name, not the object, and look it up in the registry on whichever worker runs them.

Memory is bounded in the graph itself, so it holds on any scheduler: pieces are grouped, in the plan's write
order, into waves of at most ~``max_memory / 3`` bytes, and every read first needed by wave w also depends
on barrier w-2, which completes when every write of waves <= w-2 is done.  At most two waves (plus one piece
per worker) are in flight.  Writers accept pieces in
any order, so no task ever gathers a whole file.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass

import dask
from dask.callbacks import Callback

from ..errors import ExecutionError, FormatError, ValidationError
from ..graph.node import READS, Node, Op, toposort
from ..graph.rewrite import narrow, push_slices
from ..plan.plan import OutputFile, Plan
from ..storage import fileio
from ..storage.registry import digest_of_file, get_format
from . import copy as fastcopy
from . import journal
from .formats import format_of, layout_of
from .kernels import materialize, run_node
from .progress import Progress

log = logging.getLogger(__name__)

GiB = 1 << 30
MiB = 1 << 20


@dataclass(frozen=True)
class RunOptions:
    max_memory: int = 1 * GiB          # bytes in flight (pieces and the reads feeding them)
    band_bytes: int = 64 * MiB         # largest piece written at once
    num_workers: int = 2               # threads of the local scheduler
    scheduler: str = "threads"         # "threads", "sync", or a dask.distributed address
    overwrite: bool = False
    progress: bool = False


@dataclass(frozen=True)
class Piece:
    file: int
    index: int          # tensor index within the file
    band: int
    offset: int         # bytes within the tensor
    node: Node
    seq: int


@dataclass(frozen=True)
class RunResult:
    files: int
    bytes_written: int
    seconds: float


# --- preflight -------------------------------------------------------------------------------------------------

def source_problems(plan: Plan) -> list[str]:
    """Source files named by the plan that are missing or changed since it was made (one line each)."""
    problems = []
    for s in plan.source_files:
        path = os.path.join(plan.source_root, s.name)
        try:
            size = os.path.getsize(path)
        except OSError:
            problems.append(f"{path}: source file named by the plan is missing. Restore it or re-plan.")
            continue
        try:
            digest = digest_of_file(path)
        except FormatError:
            digest = None
        if size != s.size or digest != s.header_sha256:
            problems.append(f"{path}: changed since the plan was made (size {size}, planned {s.size}, or "
                            f"header differs). Re-create the plan.")
    return problems


def preflight(plan: Plan, opts: RunOptions, done: dict[str, dict] | None = None) -> None:
    """Every check that can fail before a byte is written: sources unchanged, target usable, space enough.

    ``done``: files a previous run of this plan completed (resume); None when there is nothing to resume."""
    problems = source_problems(plan)
    root = plan.target_root
    if os.path.exists(root) and not os.path.isdir(root):
        problems.append(f"{root}: target exists and is not a directory.")
    elif os.path.isdir(root) and os.listdir(root) and not opts.overwrite and done is None:
        other = " (it holds the output of a different plan)" if os.path.exists(journal.path_of(root)) else ""
        problems.append(f"{root}: output directory is not empty{other}. Choose an empty --save-dir or pass "
                        f"--overwrite.")
    probe = root
    while not os.path.exists(probe):
        probe = os.path.dirname(probe) or "."
    free = shutil.disk_usage(probe).free
    need = sum(f.nbytes for f in plan.files if f.path not in (done or {}))
    if need > free:
        problems.append(f"{root}: the plan writes {need / 1e9:.2f} GB but only {free / 1e9:.2f} GB are free. "
                        f"Free space or choose another --save-dir.")
    if opts.max_memory < 4 * MiB or opts.band_bytes < 1 or opts.num_workers < 1:
        problems.append("--max-memory must be at least 4 MiB; band size and workers must be positive.")
    if problems:
        raise ValidationError(problems)


# --- pieces and waves ---------------------------------------------------------------------------------------------

def plan_pieces(plan: Plan, band_bytes: int) -> list[Piece]:
    """Cut every output tensor into row bands of at most ``band_bytes``, in the plan's write order."""
    pieces = []
    memo: dict = {}
    for fi, f in enumerate(plan.files):
        for ti, t in enumerate(f.tensors):
            node = push_slices(t.node, memo)
            rows = node.shape[0] if node.shape else 1
            row_bytes = node.nbytes // rows if rows else 0
            if not node.shape or rows <= 1 or node.nbytes <= band_bytes:
                pieces.append(Piece(fi, ti, 0, 0, node, t.seq))
                continue
            step = max(1, band_bytes // max(row_bytes, 1))
            for b, r0 in enumerate(range(0, rows, step)):
                r1 = min(rows, r0 + step)
                pieces.append(Piece(fi, ti, b, r0 * row_bytes, narrow(node, 0, r0, r1), t.seq))
    # Tensors sharing a write-order number are replicas or slices of the same sources: interleave their
    # bands (band 0 of every file, then band 1...) so each shared source value is consumed while it is fresh.
    pieces.sort(key=lambda p: (p.seq, p.band, p.file))
    return pieces


@dataclass(frozen=True)
class Scheduled:
    """Where a piece went: its wave, the node tasks it adds (``(task key, node, source task keys)``), and
    the task key of its value."""

    wave: int
    tasks: tuple[tuple[tuple, Node, tuple], ...]
    value: tuple        # task key of the piece's value


def schedule(pieces: list[Piece], wave_bytes: int) -> list[Scheduled]:
    """Place pieces (one :class:`Scheduled` each, same order) into waves of about ``wave_bytes``, and name the node tasks each one needs.

    A node value is shared by the pieces of its own wave and of the next one.  A piece that needs a value
    made two or more waves earlier gets a fresh instance, task key ``("node", key, wave)``, recomputed from
    the sources: otherwise that one late use would pin the old value (an output written twice under two
    names far apart in the write order, a stack of experts written one expert at a time) for the waves in
    between, and memory would grow with the model.  A piece costs its own bytes plus every node it makes."""
    made: dict[str, int] = {}   # node key -> wave of its live instance
    out = []
    wave, used = 0, 0
    for p in pieces:
        todo = _to_make(p.node, made, wave)
        cost = _cost(p, todo)
        if used and used + cost > wave_bytes:
            wave, used = wave + 1, 0
            todo = _to_make(p.node, made, wave)
            cost = _cost(p, todo)
        used += cost
        tasks = []
        for n in todo:
            made[n.key] = wave
            tasks.append((("node", n.key, wave), n, tuple(("node", s.key, made[s.key]) for s in n.src)))
        out.append(Scheduled(wave, tuple(tasks), ("node", p.node.key, made[p.node.key])))
    return out


def _cost(p: Piece, todo: list[Node]) -> int:
    return p.node.nbytes + sum(n.nbytes for n in todo if n.op not in (Op.SLICE, Op.TRANSPOSE))


def _to_make(root: Node, made: dict[str, int], wave: int) -> list[Node]:
    """Nodes of ``root``'s graph without a live instance (none, or one made before ``wave - 1``), sources
    first; a live node's sources are not visited (its value exists)."""
    return toposort([root], skip=lambda n: made.get(n.key, -2) >= wave - 1)


# --- task functions (module level: picklable for dask.distributed) -------------------------------------------------

def _read_after(root: str, op: Op, arg, _barrier) -> object:
    return run_node(root, op, arg)


def _write(fmt: str, path: str, layout, index: int, offset: int, value, _created):
    return get_format(fmt).write_piece(path, layout, index, fastcopy.contiguous(value), offset)


def _compute_and_write(fmt: str, path: str, layout, index: int, offset: int, root: str, node: Node, _created):
    return get_format(fmt).write_piece(path, layout, index, materialize(node, root), offset)


def _barrier(_done) -> None:
    return None


def _finish(fmt: str, root: str, rel: str, layout, pieces) -> str:
    path = os.path.join(root, *rel.split("/"))
    crcs = get_format(fmt).finish(path, layout, pieces)
    journal.record_file(root, rel, os.path.getsize(path), crcs)
    return path


def _text(fmt: str, root: str, rel: str, layout, _finished) -> str:
    """A text file in one task: its content is its layout, so create then finish."""
    _create(fmt, os.path.join(root, *rel.split("/")), layout)
    return _finish(fmt, root, rel, layout, [])


def _create(fmt: str, path: str, layout) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    get_format(fmt).create(path, layout)


# --- the graph ------------------------------------------------------------------------------------------------------

def build_graph(plan: Plan, opts: RunOptions, *, fused: bool = False,
                skip: frozenset[str] = frozenset()) -> tuple[dict, dict[tuple, int]]:
    """The raw Dask graph of a plan, and the byte count of each write task (for progress).

    ``fused``: one task per piece that computes its whole graph and writes it (for dask.distributed, where a
    task costs milliseconds and intermediate tensors would cross the network; workers then hold nothing
    between tasks, so no waves are needed).  Otherwise one task per graph node, shared reads run once.
    Files in ``skip`` (completed by an earlier run) get no tasks."""
    dsk: dict = {}
    pieces = [p for p in plan_pieces(plan, min(opts.band_bytes, max(opts.max_memory // 8, 1)))
              if plan.files[p.file].path not in skip]
    scheduled = schedule(pieces, max(opts.max_memory // 3, 1)) if not fused else None
    layouts = {fi: layout_of(f) for fi, f in enumerate(plan.files) if f.path not in skip}
    texts = [fi for fi, f in enumerate(plan.files) if format_of(f).is_text]   # in plan order: the last marks done
    is_text = set(texts)
    for fi, f in enumerate(plan.files):
        if fi in layouts and fi not in is_text:
            dsk[("create", fi)] = (_create, f.format, _target(plan, f), layouts[fi])

    root = plan.source_root
    write_bytes: dict[tuple, int] = {}
    by_file: dict[int, list] = {fi: [] for fi in layouts if fi not in is_text}
    by_wave: dict[int, list] = {}
    for i, p in enumerate(pieces):
        f = plan.files[p.file]
        wkey = ("write", p.file, p.index, p.band)
        write_bytes[wkey] = p.node.nbytes
        by_file[p.file].append(wkey)
        if fused:
            dsk[wkey] = (_compute_and_write, f.format, _target(plan, f), layouts[p.file], p.index, p.offset,
                         root, p.node, ("create", p.file))
            continue
        s = scheduled[i]
        by_wave.setdefault(s.wave, []).append(wkey)
        for key, n, srcs in s.tasks:
            if n.op in READS and s.wave >= 2:
                dsk[key] = (_read_after, root, n.op, n.arg, ("wave", s.wave - 2))
            else:
                dsk[key] = (run_node, root, n.op, n.arg) + srcs
        dsk[wkey] = (_write, f.format, _target(plan, f), layouts[p.file], p.index, p.offset, s.value,
                     ("create", p.file))
    if not fused:
        # Barriers are cumulative (wave w also waits for barrier w-1): "reads of wave w wait for barrier
        # w-2" must mean every earlier write is done, or one late write can pin old values indefinitely.
        for w, keys in sorted(by_wave.items()):
            dsk[("wave", w)] = (_barrier, keys + ([("wave", w - 1)] if w else []))
    finish_keys = []
    for fi, keys in by_file.items():
        f = plan.files[fi]
        dsk[("finish", fi)] = (_finish, f.format, plan.target_root, f.path, layouts[fi], keys)
        finish_keys.append(("finish", fi))
    # Text files come after every tensor file, and the plan's last text file (the tracker, the HF index)
    # after the other text files too: its presence marks the output complete.
    text_keys = []
    for fi in texts:
        f = plan.files[fi]
        if f.path in skip:
            continue
        after = finish_keys + (text_keys if fi == texts[-1] else [])
        dsk[("text", fi)] = (_text, f.format, plan.target_root, f.path, layouts[fi], list(after))
        text_keys.append(("text", fi))
    dsk["done"] = (_barrier, text_keys + finish_keys)
    return dsk, write_bytes


def _target(plan: Plan, f: OutputFile) -> str:
    return os.path.join(plan.target_root, *f.path.split("/"))


class _ProgressCallback(Callback):
    def __init__(self, progress: Progress, write_bytes: dict):
        super().__init__()
        self.progress = progress
        self.write_bytes = write_bytes

    def _posttask(self, key, result, dsk, state, worker_id):
        n = self.write_bytes.get(key)
        if n:
            self.progress.add(n)


def run_plan(plan: Plan, opts: RunOptions = RunOptions()) -> RunResult:
    """Execute ``plan``: preflight, then every piece on the chosen scheduler; temp files removed on failure.

    Resumable: when the target holds the journal of a run of this same plan, files it completed (present
    at their journaled size) are skipped and the rest are written again; the result is byte-identical to an
    uninterrupted run, because every file's layout is fixed by the plan."""
    fileio.release_large_allocations()
    digest = journal.plan_digest(plan)
    done = journal.completed(plan.target_root, digest) if os.path.isdir(plan.target_root) else None
    preflight(plan, opts, done)
    if plan.checks:  # before any write: a diverged replica is bad input
        from .replicas import check_replicas

        check_replicas(plan, band_bytes=min(opts.band_bytes, max(opts.max_memory // 8, 1)),
                       num_workers=opts.num_workers)
    if done:
        log.info("resuming: %d of %d files already complete", len(done), len(plan.files))
    distributed = opts.scheduler not in ("threads", "sync")
    dsk, write_bytes = build_graph(plan, opts, fused=distributed, skip=frozenset(done or ()))
    os.makedirs(plan.target_root, exist_ok=True)
    if done is None and os.path.exists(journal.path_of(plan.target_root)):
        os.remove(journal.path_of(plan.target_root))  # --overwrite of another plan's output: start afresh
    journal.start(plan.target_root, digest)
    progress = Progress(sum(write_bytes.values()), enabled=opts.progress)
    start = time.monotonic()
    try:
        if not distributed:
            get = dask.get if opts.scheduler == "sync" else dask.threaded.get
            kwargs = {} if opts.scheduler == "sync" else {"num_workers": opts.num_workers}
            with _ProgressCallback(progress, write_bytes):
                get(dsk, "done", **kwargs)
        else:
            _run_distributed(dsk, opts.scheduler, progress, write_bytes)
    except BaseException:
        _cleanup(plan)
        raise
    finally:
        progress.close()
    seconds = time.monotonic() - start
    total = sum(write_bytes.values())
    log.info("wrote %d files, %.2f GB in %.1f s (%.2f GB/s)", len(plan.files), total / 1e9, seconds,
             total / 1e9 / max(seconds, 1e-9))
    return RunResult(len(plan.files), total, seconds)


def _run_distributed(dsk: dict, address: str, progress: Progress, write_bytes: dict) -> None:
    try:
        from distributed import Client, as_completed
    except ImportError:
        raise ExecutionError("--scheduler ADDRESS needs dask.distributed: pip install 'streamconv[distributed]'.") from None
    with Client(address) as client:
        futures = client.get(dsk, list(write_bytes) + ["done"], sync=False)
        for fut in as_completed(futures[:-1]):
            fut.result()  # re-raises a task's error here
            progress.add(write_bytes.get(fut.key, 0))
        futures[-1].result()


def _cleanup(plan: Plan) -> None:
    """After a failure, remove temporary files; complete files stay (they are whole and correct)."""
    for f in plan.files:
        try:
            format_of(f).abort(_target(plan, f))
        except OSError:
            pass
