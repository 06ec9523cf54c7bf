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

On a dask.distributed cluster (``--scheduler ADDRESS``) this graph runs inside coarse tasks, one per group of
files, each on one worker (:mod:`streamconv.execute.cluster`).  The parts of a split plan
(:mod:`streamconv.plan.split`) run here as ordinary plans, each with its own journal and lock;
``run_plan(..., finish=True)`` checks and completes the whole.

Memory is bounded in the graph itself, so it holds on any scheduler: pieces are grouped, in the plan's write
order, into waves of at most ~``max_memory / 3`` bytes, and every read first needed by wave w also depends
on barrier w-2, which completes when every write of waves <= w-2 is done.  At most two waves (plus one piece
per worker) are in flight.  Writers accept pieces in
any order, so no task ever gathers a whole file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass

import dask
from dask.callbacks import Callback

from ..errors import ExecutionError, StreamconvError, ValidationError
from ..graph.node import READS, Node, Op, toposort
from ..graph.rewrite import narrow, push_slices
from ..plan.plan import OutputFile, Plan
from ..plan.split import PartInfo, part_of, tensor_files
from ..plan.trust import audit
from ..storage import fileio
from ..storage.pieces import file_crc32
from ..storage.registry import get_format
from ..storage.lock import NAME as LOCK_NAME
from ..storage.lock import TargetLock, lock_for_dir
from . import copy as fastcopy
from . import journal
from .formats import format_of, layout_of
from .kernels import run_node
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
    removed: tuple[str, ...] = ()   # --overwrite: files of an earlier checkpoint removed first
    cluster: object = None          # a dask.distributed run: its ClusterReport (groups, bytes per worker)


# --- preflight -------------------------------------------------------------------------------------------------

def source_problems(plan: Plan) -> list[str]:
    """Everything a plan claims about its sources, checked against the disk (:func:`streamconv.plan.trust.audit`:
    paths inside the source root, files unchanged, every read a real tensor of its file, outputs sane)."""
    return audit(plan)


def _symlinked_outputs(plan: Plan) -> list[str]:
    """Outputs whose path inside the save dir runs through a symlink (a directory or the file itself): writing
    there would land outside the save dir."""
    seen: set[str] = set()
    for f in plan.files:
        parts = f.path.split("/")
        for i in range(1, len(parts) + 1):
            rel = "/".join(parts[:i])
            if rel in seen:
                continue
            seen.add(rel)
            if os.path.islink(os.path.join(plan.target_root, *parts[:i])):
                return [f"{os.path.join(plan.target_root, rel)}: is a symlink; the outputs under it would be written "
                        f"outside the save dir. Remove it, or choose another --save-dir."]
    return []


def _contents(root: str) -> list[str]:
    return [n for n in os.listdir(root) if n != LOCK_NAME]


def preflight(plan: Plan, opts: RunOptions, done: dict[str, dict] | None = None, *,
              part: PartInfo | None = None) -> None:
    """Every check that can fail before a byte is written: sources unchanged, target usable, space enough.

    ``done``: files a previous run of this plan completed (resume); None when there is nothing to resume.
    ``part``: the plan is that part of a split plan, which shares its save dir with the other parts: it refuses
    existing files at its own output paths (``--overwrite`` replaces them) and the parts of another split;
    ``run --finish`` checks the rest."""
    problems = source_problems(plan)
    root = plan.target_root
    if os.path.exists(root) and not os.path.isdir(root):
        problems.append(f"{root}: target exists and is not a directory.")
    elif part is not None:
        from .parts import other_splits

        others = other_splits(root, part)
        if others and not opts.overwrite:
            problems.append(f"{root}: holds parts of another split or of another plan ({', '.join(others[:2])}). "
                            f"Run the parts of one split only; pass --overwrite to go on regardless.")
        clash = [f for f in plan.files if f.path not in (done or {}) and os.path.lexists(_target(plan, f))]
        if clash and not opts.overwrite:
            problems.append(f"{_target(plan, clash[0])}: exists, and this part's journal does not list it "
                            f"({len(clash)} such file(s)). Pass --overwrite to replace them, or choose an empty "
                            f"--save-dir.")
    elif os.path.isdir(root) and _contents(root) and not opts.overwrite and done is None:
        other = " (it holds the output of a different plan)" if os.path.exists(journal.path_of(root)) else ""
        if any(journal.PART_NAME.match(n) for n in os.listdir(root)):
            other = " (it holds parts of a split plan: complete them with `streamconv run PLAN --finish`)"
        problems.append(f"{root}: output directory is not empty{other}. Choose an empty --save-dir or pass "
                        f"--overwrite.")
    problems += _symlinked_outputs(plan)
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


def _barrier(_done) -> None:
    return None


def _finish(fmt: str, root: str, rel: str, layout, pieces, journal_name: str = journal.NAME) -> str:
    path = os.path.join(root, *rel.split("/"))
    crcs = get_format(fmt).finish(path, layout, pieces)
    size = os.path.getsize(path)
    journal.record_file(root, rel, size, crcs, file_crc32(path, size, layout.spans, crcs), name=journal_name)
    return path


def _finish_attempt(fmt: str, path: str, rel: str, token: str, layout, pieces) -> dict:
    """Finish an attempt file (``<final>.<token>``) and return its journal record; the client renames it."""
    crcs = get_format(fmt).finish(path, layout, pieces)
    size = os.path.getsize(path)
    return {"path": rel, "attempt": token, "size": size, "crc32": list(crcs),
            "file_crc32": file_crc32(path, size, layout.spans, crcs)}


def _text(fmt: str, root: str, rel: str, layout, _finished, journal_name: str = journal.NAME) -> str:
    """A text file in one task: its content is its layout, so create then finish."""
    _create(fmt, os.path.join(root, *rel.split("/")), layout)
    return _finish(fmt, root, rel, layout, [], journal_name)


def _create(fmt: str, path: str, layout) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    get_format(fmt).create(path, layout)


# --- the graph ------------------------------------------------------------------------------------------------------

def build_graph(plan: Plan, opts: RunOptions, *, skip: frozenset[str] = frozenset(),
                journal_name: str = journal.NAME, attempt: str | None = None) -> tuple[dict, dict[tuple, int]]:
    """The raw Dask graph of a plan, and the byte count of each write task (for progress).

    One task per graph node, shared reads run once.  Files in ``skip`` (completed by an earlier run) get no
    tasks.  ``journal_name``: the journal finished files are recorded in.  ``attempt`` (a cluster task's
    token): every file is written as ``<final>.<attempt>`` and its ``("finish", f)`` task returns its journal
    record instead of journaling it (:mod:`streamconv.execute.cluster`)."""
    dsk: dict = {}
    pieces = [p for p in plan_pieces(plan, min(opts.band_bytes, max(opts.max_memory // 8, 1)))
              if plan.files[p.file].path not in skip]
    scheduled = schedule(pieces, max(opts.max_memory // 3, 1))
    layouts = {fi: layout_of(f) for fi, f in enumerate(plan.files) if f.path not in skip}
    texts = [fi for fi, f in enumerate(plan.files) if format_of(f).is_text]   # in plan order: the last marks done
    is_text = set(texts)

    def target(f: OutputFile) -> str:
        return _target(plan, f) + (f".{attempt}" if attempt else "")

    for fi, f in enumerate(plan.files):
        if fi in layouts and fi not in is_text:
            dsk[("create", fi)] = (_create, f.format, target(f), layouts[fi])

    root = plan.source_root
    write_bytes: dict[tuple, int] = {}
    by_file: dict[int, list] = {fi: [] for fi in layouts if fi not in is_text}
    by_wave: dict[int, list] = {}
    for i, p in enumerate(pieces):
        f = plan.files[p.file]
        wkey = ("write", p.file, p.index, p.band)
        write_bytes[wkey] = p.node.nbytes
        by_file[p.file].append(wkey)
        s = scheduled[i]
        by_wave.setdefault(s.wave, []).append(wkey)
        for key, n, srcs in s.tasks:
            if n.op in READS and s.wave >= 2:
                dsk[key] = (_read_after, root, n.op, n.arg, ("wave", s.wave - 2))
            else:
                dsk[key] = (run_node, root, n.op, n.arg) + srcs
        dsk[wkey] = (_write, f.format, target(f), layouts[p.file], p.index, p.offset, s.value,
                     ("create", p.file))
    # Barriers are cumulative (wave w also waits for barrier w-1): "reads of wave w wait for barrier
    # w-2" must mean every earlier write is done, or one late write can pin old values indefinitely.
    for w, keys in sorted(by_wave.items()):
        dsk[("wave", w)] = (_barrier, keys + ([("wave", w - 1)] if w else []))
    finish_keys = []
    for fi, keys in by_file.items():
        f = plan.files[fi]
        if attempt:
            dsk[("finish", fi)] = (_finish_attempt, f.format, target(f), f.path, attempt, layouts[fi], keys)
        else:
            dsk[("finish", fi)] = (_finish, f.format, plan.target_root, f.path, layouts[fi], keys, journal_name)
        finish_keys.append(("finish", fi))
    # Text files come after every tensor file, and the plan's last text file (the tracker, the HF index)
    # after the other text files too: its presence marks the output complete.
    text_keys = []
    for fi in texts:
        f = plan.files[fi]
        if f.path in skip:
            continue
        after = finish_keys + (text_keys if fi == texts[-1] else [])
        dsk[("text", fi)] = (_text, f.format, plan.target_root, f.path, layouts[fi], list(after), journal_name)
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


def run_plan(plan: Plan, opts: RunOptions = RunOptions(), *, accepted=None, finish: bool = False) -> RunResult:
    """Execute ``plan``: under the save dir's lock, preflight (the plan audited against its sources), then every
    piece on the chosen scheduler; temp files removed on failure.

    Resumable: when the target holds the journal of a run of this same plan, files it completed (present
    at their journaled size) are skipped and the rest are written again; the result is byte-identical to an
    uninterrupted run, because every file's layout is fixed by the plan.  With ``overwrite`` over another
    output, the files of the earlier checkpoint this plan does not write are removed first (and listed).
    ``accepted()`` is called once every check passed, before the first write (``--plan-output``).

    A part of a split plan (``plan split``) holds the save dir's lock shared and its own part lock, journals
    into its own journal and writes no text file.  ``finish``: ``plan`` is the whole plan whose parts ran;
    check that each of its tensor files is journaled by its part and complete, merge the journals, and write
    the text files (the tracker last)."""
    fileio.release_large_allocations()
    part = part_of(plan)
    if finish and part is not None:
        raise ValidationError(f"--finish takes the whole plan (the one given to `plan split`), not {part.tag}.")
    root = plan.target_root
    if os.path.lexists(root) and not os.path.isdir(root):
        raise ValidationError(f"{root}: target exists and is not a directory. Choose another --save-dir.")
    made = not os.path.exists(root)
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as exc:
        raise ValidationError(f"{root}: cannot create the save dir ({exc.strerror}).") from None
    try:
        with _run_lock(root, part):
            if finish:
                from .parts import finish_locked

                return finish_locked(plan, opts, accepted)
            return _run_locked(plan, opts, accepted, part)
    except BaseException:
        if made and not _contents(root):  # a refused run leaves nothing behind
            shutil.rmtree(root, ignore_errors=True)
        raise


@contextlib.contextmanager
def _run_lock(root: str, part: PartInfo | None):
    """The save dir's lock: exclusive for a whole plan; for a part, shared (other parts write other files of
    the same dir) plus its own part lock, exclusive (the same part never runs twice at once)."""
    if part is None:
        with lock_for_dir(root):
            yield
        return
    with TargetLock(os.path.join(root, LOCK_NAME), shared=True), TargetLock(os.path.join(root, part_lock_name(part))):
        yield


def part_lock_name(part: PartInfo) -> str:
    return f".streamconv.{part.tag}.lock"


def _run_locked(plan: Plan, opts: RunOptions, accepted=None, part: PartInfo | None = None) -> RunResult:
    root = plan.target_root
    jname = journal.part_name(part.tag) if part is not None else journal.NAME
    digest = journal.plan_digest(plan)
    done = journal.completed(root, digest, jname)
    preflight(plan, opts, done, part=part)
    if plan.checks:  # before any write: a diverged replica is bad input
        from .replicas import check_replicas

        check_replicas(plan, band_bytes=min(opts.band_bytes, max(opts.max_memory // 8, 1)),
                       num_workers=opts.num_workers)
    if done:
        log.info("resuming: %d of %d files already complete", len(done), len(plan.files))
    distributed = opts.scheduler not in ("threads", "sync")
    skip = frozenset(done or ())
    if distributed:
        total = sum(plan.files[fi].nbytes for fi in tensor_files(plan, skip))
    else:
        dsk, write_bytes = build_graph(plan, opts, skip=skip, journal_name=jname)
        total = sum(write_bytes.values())
    client = connect(opts.scheduler) if distributed else None  # an unreachable scheduler fails before any write
    if accepted is not None:
        accepted()
    _cleanup(plan)  # temporary files of a killed run: nobody else can be writing them, we hold the lock
    removed: list[str] = []
    if done is None and part is None:
        if opts.overwrite:
            removed = clear_earlier_output(plan)
        if os.path.exists(journal.path_of(root)):
            os.remove(journal.path_of(root))  # --overwrite of another plan's output: start afresh
    journal.start(root, digest, [f.path for f in plan.files], name=jname,
                  part=None if part is None else {"index": part.index, "count": part.count, "of": part.of})
    progress = Progress(total, enabled=opts.progress)
    start = time.monotonic()
    report = None
    try:
        if not distributed:
            get = dask.get if opts.scheduler == "sync" else dask.threaded.get
            kwargs = {} if opts.scheduler == "sync" else {"num_workers": opts.num_workers}
            with _ProgressCallback(progress, write_bytes):
                get(dsk, "done", **kwargs)
        else:
            from .cluster import quiet_logs, run_groups

            with quiet_logs():
                try:
                    report = run_groups(client, plan, opts, skip=skip, journal_name=jname, progress=progress)
                finally:
                    _close(client)
            _write_texts(plan, opts, skip, jname)
    except BaseException:
        _cleanup(plan)
        raise
    finally:
        progress.close()
    seconds = time.monotonic() - start
    log.info("wrote %d files, %.2f GB in %.1f s (%.2f GB/s)", len(plan.files), total / 1e9, seconds,
             total / 1e9 / max(seconds, 1e-9))
    return RunResult(len(plan.files), total, seconds, tuple(removed), report)


def _write_texts(plan: Plan, opts: RunOptions, skip: frozenset[str], journal_name: str) -> int:
    """The plan's text files (config, index, tracker last), here, after every tensor file is journaled."""
    tensors = frozenset(plan.files[fi].path for fi in tensor_files(plan))
    dsk, _ = build_graph(plan, opts, skip=skip | tensors, journal_name=journal_name)
    dask.get(dsk, "done")
    return sum(1 for f in plan.files if f.path not in skip and f.path not in tensors)


def _close(client) -> None:
    try:
        client.close(timeout=5)
    except Exception:  # noqa: BLE001  (a lost scheduler: closing fails too, and the run already has its error)
        pass


# Files of a checkpoint tree an earlier conversion (ours or another tool's) may have left: weights, their
# indexes and trackers.  Anything else in the save dir is not ours to delete.
_CHECKPOINT_FILES = re.compile(r"^(?:(?:iter_\d+|release)/.+|latest_checkpointed_iteration\.txt|"
                               r"streamconv_source\.json|model\.safetensors\.index\.json|[^/]+\.safetensors|"
                               r".+\.partial)$")


def clear_earlier_output(plan: Plan) -> list[str]:
    """``--overwrite``: remove, from the save dir, the files of an earlier checkpoint that this plan does not
    write (files an earlier streamconv run journaled, and weight/index/tracker files of any checkpoint tree),
    so old rank files never sit beside the new ones.  Symlinks are removed, never followed; other files are
    left and logged.  Returns the removed paths, relative to the save dir."""
    root = plan.target_root
    ours = {f.path for f in plan.files}
    try:
        _, journaled = journal.read(root)
    except StreamconvError:
        journaled = {}
    removed, left = [], []
    for dirpath, dirnames, filenames in os.walk(root, topdown=True, followlinks=False):
        rel_dir = os.path.relpath(dirpath, root)
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            rel = name if rel_dir == "." else f"{rel_dir.replace(os.sep, '/')}/{name}"
            if rel in ours or rel in (journal.NAME, LOCK_NAME):
                continue
            if rel in journaled or _CHECKPOINT_FILES.match(rel):
                os.unlink(os.path.join(dirpath, name))
                removed.append(rel)
            else:
                left.append(rel)
    for dirpath, _, _ in sorted(os.walk(root, topdown=False, followlinks=False), reverse=True):
        if dirpath != root and not os.listdir(dirpath):
            os.rmdir(dirpath)
    if removed:
        log.warning("--overwrite: removed %d file(s) of an earlier checkpoint from %s (%s%s)", len(removed), root,
                    ", ".join(removed[:5]), " ..." if len(removed) > 5 else "")
    if left:
        log.warning("--overwrite: left %d file(s) that are not checkpoint files in %s (%s%s)", len(left), root,
                    ", ".join(left[:5]), " ..." if len(left) > 5 else "")
    return sorted(removed)


def connect(address: str):
    """A dask.distributed client of the scheduler at ``address``; one-line errors for a bad or dead address."""
    try:
        from distributed import Client
    except ImportError:
        raise ExecutionError("--scheduler ADDRESS needs dask.distributed: pip install 'streamconv[distributed]'.") from None
    try:
        return Client(address, timeout="10s")
    except (OSError, ValueError, TypeError, TimeoutError) as exc:
        why = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ExecutionError(f"--scheduler {address}: cannot connect ({why}). Start `dask scheduler` there and pass "
                             f"its tcp://host:port, or use --scheduler threads.") from None


def _cleanup(plan: Plan) -> None:
    """After a failure, remove temporary files (and a cluster run's attempt files); complete files stay (they
    are whole and correct)."""
    from .cluster import remove_attempts

    for f in plan.files:
        try:
            format_of(f).abort(_target(plan, f))
        except OSError:
            pass
    try:
        remove_attempts(plan)
    except OSError:
        pass
