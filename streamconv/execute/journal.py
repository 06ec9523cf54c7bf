"""The run journal: which output files of a plan are complete, so a killed run can be resumed.

``<target>/.streamconv_journal.jsonl``, one JSON object per line, appended with a single ``write`` on an
``O_APPEND`` descriptor and fsynced (safe from several threads or processes):

    {"kind": "run", "plan_sha256": "...", "time": 1795868498.2}
    {"kind": "file", "path": "iter_0000001/mp_rank_00/model_optim_rng.pt", "size": 123, "crc32": [..]}

A file is journaled only after it was renamed to its final name, so a final name listed here is complete.
``crc32`` lists the CRC32 of each tensor record (.pt), of each tensor's data (safetensors, header order) or of the whole file
(text): ``verify`` recomputes them.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

from ..errors import ExecutionError
from ..plan.plan import Plan

NAME = ".streamconv_journal.jsonl"


def plan_digest(plan: Plan) -> str:
    return hashlib.sha256(json.dumps(plan.to_json(), sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def path_of(target_root: str) -> str:
    return os.path.join(target_root, NAME)


def append(target_root: str, record: dict) -> None:
    line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
    fd = os.open(path_of(target_root), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    except OSError as exc:
        raise ExecutionError(f"{path_of(target_root)}: cannot write the run journal ({exc.strerror}).") from exc
    finally:
        os.close(fd)


def start(target_root: str, digest: str) -> None:
    append(target_root, {"kind": "run", "plan_sha256": digest, "time": time.time()})


def record_file(target_root: str, rel_path: str, size: int, crcs: list[int]) -> None:
    append(target_root, {"kind": "file", "path": rel_path, "size": size, "crc32": list(crcs)})


def read(target_root: str) -> tuple[set[str], dict[str, dict]]:
    """(plan digests of every run recorded, completed files by path with the digest of the run that wrote
    them).  A torn last line is ignored."""
    digests: set[str] = set()
    files: dict[str, dict] = {}
    current = None
    try:
        with open(path_of(target_root), "rb") as f:
            lines = f.read().split(b"\n")
    except FileNotFoundError:
        return digests, files
    for raw in lines:
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except ValueError:
            continue  # a line cut by a crash mid-write: that file is simply redone
        if rec.get("kind") == "run":
            current = rec.get("plan_sha256")
            digests.add(current)
        elif rec.get("kind") == "file" and isinstance(rec.get("path"), str):
            files[rec["path"]] = dict(rec, plan_sha256=current)
    return digests, files


def completed(target_root: str, digest: str) -> dict[str, dict] | None:
    """Files a run of the plan with ``digest`` completed, still present at their journaled size; None when
    the directory holds no journal of this plan."""
    digests, files = read(target_root)
    if digest not in digests:
        return None
    out = {}
    for rel, rec in files.items():
        final = os.path.join(target_root, *rel.split("/"))
        if rec.get("plan_sha256") == digest and os.path.isfile(final) and os.path.getsize(final) == rec.get("size"):
            out[rel] = rec
    return out
