"""The run journal: which output files of a plan are complete, so a killed run can be resumed.

``<target>/.streamconv_journal.jsonl``, one JSON object per line, appended with a single ``write`` on an
``O_APPEND`` descriptor and fsynced (safe from several threads or processes):

    {"kind": "run", "plan_sha256": "...", "time": 1795868498.2, "files": ["iter_0000001/...", ...]}
    {"kind": "file", "path": "iter_0000001/mp_rank_00/model_optim_rng.pt", "size": 123, "crc32": [..],
     "file_crc32": 4026531840}

A file is journaled only after it was renamed to its final name, so a final name listed here is complete.
``files`` is every output of the run's plan (so ``verify DIR`` can tell a complete output from an interrupted
one).  ``crc32`` lists the CRC32 of each tensor record (.pt), of each tensor's data (safetensors, header order)
or of the whole file (text); ``file_crc32`` is the CRC32 of every byte of the file (headers, pickle, zip
directory included): ``verify`` recomputes both.  Paths are relative to the save dir; a journal naming a path
outside it is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time

from ..errors import ExecutionError, FormatError
from ..plan.plan import Plan
from ..plan.trust import JOURNAL, safe_name
from ..storage import fileio

NAME = JOURNAL


def plan_digest(plan: Plan) -> str:
    return hashlib.sha256(json.dumps(plan.to_json(), sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# A part of a split plan (``streamconv plan split``) journals into its own file, so parts running on several
# hosts never append to one file over a shared filesystem; ``run --finish`` merges them into NAME.
PART_NAME = re.compile(r"^\.streamconv_journal\.(part-(\d+)-of-(\d+))\.jsonl$")


def part_name(tag: str) -> str:
    """The journal of the part tagged ``tag`` (``part-03-of-08``)."""
    return f".streamconv_journal.{tag}.jsonl"


def path_of(target_root: str, name: str = NAME) -> str:
    return os.path.join(target_root, name)


def append(target_root: str, record: dict, name: str = NAME) -> None:
    path = path_of(target_root, name)
    line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        raise ExecutionError(f"{path}: cannot open the run journal ({exc.strerror}); it must be a "
                             f"regular file.") from None
    try:
        os.write(fd, line)
        os.fsync(fd)
    except OSError as exc:
        raise ExecutionError(f"{path}: cannot write the run journal ({exc.strerror}).") from exc
    finally:
        os.close(fd)


def start(target_root: str, digest: str, files: list[str] | None = None, name: str = NAME,
          part: dict | None = None) -> None:
    rec = {"kind": "run", "plan_sha256": digest, "time": time.time(), "files": list(files or [])}
    if part is not None:
        rec["part"] = part
    append(target_root, rec, name)


def record_file(target_root: str, rel_path: str, size: int, crcs: list[int], file_crc: int | None = None,
                name: str = NAME) -> None:
    rec = {"kind": "file", "path": rel_path, "size": size, "crc32": list(crcs)}
    if file_crc is not None:
        rec["file_crc32"] = file_crc
    append(target_root, rec, name)


MAX_BYTES = 1 << 30   # a 671B conversion journals a few MB


def read(target_root: str, name: str = NAME) -> tuple[set[str], dict[str, dict]]:
    """(plan digests of every run recorded, completed files by path with the digest of the run that wrote
    them).  A torn last line is ignored; a line that is not a journal record, or names a path outside the save
    dir, is an error (the journal is read before anything is trusted)."""
    return read_runs(target_root, name)[:2]


def last_run(target_root: str, name: str = NAME) -> dict | None:
    """The last run record of a journal (its ``plan_sha256``, ``files``, a part's ``part``), or None."""
    return read_runs(target_root, name, with_run=True)[3]


def read_runs(target_root: str, name: str = NAME, *, with_run: bool = False):
    """:func:`read`, and the output list of the last run recorded (None when the journal has no run); with
    ``with_run``, also that run's record."""
    digests: set[str] = set()
    files: dict[str, dict] = {}
    planned = None
    current = None
    run = None
    path = path_of(target_root, name)
    if not os.path.lexists(path):
        return (digests, files, planned, run) if with_run else (digests, files, planned)
    data = fileio.read_small(path, MAX_BYTES, what="run journal")
    lines = data.split(b"\n")
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except (ValueError, RecursionError):
            if n == len(lines) or (n == len(lines) - 1 and not lines[-1]):
                continue  # a line cut by a crash mid-write: that file is simply redone
            raise FormatError(f"{path}: line {n} is not JSON. The journal is damaged; delete it to start afresh "
                              f"(complete files will be rewritten).") from None
        if not isinstance(rec, dict):
            raise FormatError(f"{path}: line {n} is not a journal record. Delete the journal to start afresh.")
        if rec.get("kind") == "run":
            run = rec
            current = rec.get("plan_sha256")
            digests.add(current)
            listed = rec.get("files")
            planned = [p for p in listed if isinstance(p, str)] if isinstance(listed, list) else None
        elif rec.get("kind") == "file" and isinstance(rec.get("path"), str):
            if not safe_name(rec["path"]):
                raise FormatError(f"{path}: line {n} names {rec['path']!r}, outside the save dir. The journal is "
                                  f"not streamconv's; delete it.")
            files[rec["path"]] = dict(rec, plan_sha256=current)
    return (digests, files, planned, run) if with_run else (digests, files, planned)


def completed(target_root: str, digest: str, name: str = NAME) -> dict[str, dict] | None:
    """Files a run of the plan with ``digest`` completed, still present at their journaled size; None when
    the directory holds no journal of this plan."""
    digests, files = read(target_root, name)
    if digest not in digests:
        return None
    out = {}
    for rel, rec in files.items():
        final = os.path.join(target_root, *rel.split("/"))
        if rec.get("plan_sha256") == digest and os.path.isfile(final) and os.path.getsize(final) == rec.get("size"):
            out[rel] = rec
    return out
