"""Plans are untrusted input: :func:`audit` checks one against the files it names before anything is read.

A plan is JSON anyone can edit or share.  Before a run (and before ``verify --rederive`` or a loader reads a
byte) every claim it makes is checked against the disk as it is now, with the planner's own cheap header
index (one header parse per source file, the same work as the staleness digest):

1. every source file is named relative to the plan's source root, normalised, without ``..``; a path through
   a symlinked directory that leaves the root is refused (a file that is itself a symlink to a regular file,
   as in the Hugging Face hub cache, is accepted); the file is a regular file of a known format, at its
   planned size and header digest (else the plan is stale);
2. every ``read`` node names a listed source file, and its byte offset, dtype and shape are those of a tensor
   in that file's header (row-major): a tampered offset, a relabelled dtype or a moved shape cannot make the
   run copy other bytes than a tensor's;
3. output paths are unique, relative, inside the target, never a directory of another output, and never one
   of the run's own bookkeeping files (journal, lock, temporary names).

Every problem is listed at once, each naming the plan field, file or tensor.
"""

from __future__ import annotations

import os
import posixpath

from ..errors import FormatError
from ..graph.node import Op, toposort
from ..storage.registry import format_of_file
from .plan import Plan

JOURNAL = ".streamconv_journal.jsonl"
LOCK = ".streamconv.lock"
BOOKKEEPING = (JOURNAL, LOCK)
PREFIX = ".streamconv"   # every bookkeeping name starts so (the journals and locks of a split plan's parts too)
TEMP_SUFFIX = ".partial"


def is_inside(path: str, root: str) -> bool:
    """Whether ``path`` is ``root`` or below it (both already absolute and resolved)."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def safe_name(name: str) -> bool:
    """A relative, normalised, '/'-separated path without '..' components."""
    return (isinstance(name, str) and bool(name) and not name.startswith("/") and "\\" not in name
            and "\x00" not in name and posixpath.normpath(name) == name and name not in (".", "..")
            and not name.startswith("../"))


def source_path_problem(root: str, name: str) -> str | None:
    """Why ``name`` may not be read under ``root`` (None when it may)."""
    if not safe_name(name):
        return f"source file {name!r} must be relative to the source root, normalised, without '..'"
    real_root = os.path.realpath(root)
    parent = os.path.realpath(os.path.join(root, os.path.dirname(name)))
    if not is_inside(parent, real_root):
        return f"source file {name!r} leaves the source root {root} through a symlinked directory"
    return None


def audit(plan: Plan) -> list[str]:
    """Every way ``plan`` disagrees with the disk or breaks the rules above; [] when it may run."""
    problems: list[str] = []
    root = plan.source_root
    indexes = {}
    for s in plan.source_files:
        bad = source_path_problem(root, s.name)
        if bad:
            problems.append(f"plan source.files: {bad}. The plan cannot be trusted; re-create it.")
            continue
        path = os.path.join(root, s.name)
        try:
            size = os.path.getsize(path)
            if size != s.size:
                problems.append(f"{path}: changed since the plan was made (size {size}, planned {s.size}). "
                                f"Re-create the plan.")
                continue
            fmt = format_of_file(path)
            if fmt is None or fmt.is_text:
                # a metadata document (a zarr array's zarr.json): no tensors to index, its size and digest must hold
                digest = fmt.digest(path) if fmt is not None else ""
                if digest != s.header_sha256:
                    problems.append(f"{path}: changed since the plan was made (size {size}, planned {s.size}). "
                                    f"Re-create the plan.")
                continue
            index = fmt.index(path)
        except FileNotFoundError:
            problems.append(f"{path}: source file named by the plan is missing. Restore it or re-plan.")
            continue
        except (OSError, FormatError) as exc:
            problems.append(f"{path}: source file named by the plan cannot be read ({_one_line(exc)}). Restore it "
                            f"or re-plan.")
            continue
        if index.size != s.size or index.digest != s.header_sha256:
            problems.append(f"{path}: changed since the plan was made (size {index.size}, planned {s.size}, or "
                            f"header differs). Re-create the plan.")
            continue
        by_start: dict[int, list] = {}
        for e in index.tensors:
            if e.row_major:
                by_start.setdefault(e.start, []).append(e)
        indexes[s.name] = by_start
    listed = {s.name for s in plan.source_files}
    problems += _read_problems(plan, listed, indexes)
    problems += output_problems(plan)
    problems += overlap_problems(plan)
    return problems


def overlap_problems(plan: Plan) -> list[str]:
    """A run never writes where it reads: no source file may lie inside the target directory."""
    target = os.path.realpath(plan.target_root)
    for s in plan.source_files:
        path = os.path.realpath(os.path.join(plan.source_root, s.name))
        if is_inside(path, target):
            return [f"{plan.target_root}: the target directory holds the plan's source file {s.name}; writing there "
                    f"would overwrite its input. Choose a --save-dir outside the sources."]
    return []


def _read_problems(plan: Plan, listed: set[str], indexes: dict) -> list[str]:
    roots = [t.node for f in plan.files for t in f.tensors] + [n for c in plan.checks for n in c.nodes]
    problems = []
    dirs = {posixpath.dirname(name) for name in listed}
    for node in toposort(roots):
        if node.op is Op.READ_CHUNKED:  # a chunked array (a directory): its files must be listed sources
            a = node.arg
            if not safe_name(a.file) or a.file not in dirs and not any(d.startswith(a.file + "/") for d in dirs):
                problems.append(f"plan node read_chunked({a.file!r}, {a.tensor!r}): the array is not among the "
                                f"plan's source files. The plan cannot be trusted.")
            continue
        if node.op is not Op.READ:
            continue
        a = node.arg
        where = f"plan node read({a.file!r}, {a.tensor!r})"
        if a.file not in listed:
            problems.append(f"{where}: file is not among the plan's source files. The plan cannot be trusted.")
            continue
        entries = indexes.get(a.file)
        if entries is None:
            continue  # the file itself is already reported
        found = entries.get(a.offset)
        if not found:
            problems.append(f"{where}: no tensor of {a.file} starts at byte {a.offset}. The plan was edited or "
                            f"the file changed; re-create the plan.")
        elif not any(e.dtype == a.dtype and tuple(e.shape) == tuple(a.shape) for e in found):
            e = found[0]
            problems.append(f"{where}: reads {a.dtype}{list(a.shape)} but {a.file} holds {e.name!r} as "
                            f"{e.dtype}{list(e.shape)} there. The plan was edited; re-create it.")
        if len(problems) >= 20:
            problems.append("... (further read problems not listed)")
            break
    return problems


def output_problems(plan: Plan) -> list[str]:
    """Duplicate output paths, outputs that are directories of other outputs, and outputs named like the run's
    own bookkeeping files."""
    problems = []
    seen: set[str] = set()
    dirs: set[str] = set()
    for f in plan.files:
        base = posixpath.basename(f.path)
        if f.path in seen:
            problems.append(f"plan target.files: {f.path!r} listed twice. Each output is written once.")
        if base in BOOKKEEPING or base.endswith(TEMP_SUFFIX) or base.startswith(LOCK) or base.startswith(PREFIX):
            problems.append(f"plan target.files: {f.path!r} is named like streamconv's own bookkeeping files "
                            f"({', '.join(BOOKKEEPING)}, *{TEMP_SUFFIX}). The plan cannot be trusted.")
        seen.add(f.path)
        parts = f.path.split("/")
        dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))
    for path in sorted(seen & dirs):
        problems.append(f"plan target.files: {path!r} is both a file and the directory of another output.")
    return problems


def check_disjoint(save_dir: str, inputs: list[tuple[str, str | None]]) -> None:
    """Refuse a ``--save-dir`` that is, contains or lies inside one of the conversion's inputs (``(flag, path)``
    pairs): writing it, or ``--overwrite``-clearing it, would destroy what the conversion reads."""
    from ..errors import ValidationError

    out = os.path.realpath(save_dir)
    problems = []
    for flag, path in inputs:
        if not path:
            continue
        real = os.path.realpath(path)
        if is_inside(out, real) or is_inside(real, out):
            problems.append(f"--save-dir {save_dir}: overlaps {flag} {path} (one holds the other); the output would "
                            f"overwrite the conversion's input. Choose a separate --save-dir.")
    if problems:
        raise ValidationError(problems)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
