"""Completing a split plan: ``streamconv run PLAN --finish`` after every part ran.

``streamconv plan split PLAN --hosts N --output DIR`` writes N sub-plans (:func:`streamconv.plan.split.split_plan`);
each host runs one with ``streamconv run SUBPLAN``.  A part writes only its own tensor files, journals them in
its own journal (``.streamconv_journal.part-K-of-N.jsonl``: no two hosts ever append to one file) and holds the
save dir's lock shared plus its own part lock.  Then, on any one host, ``--finish``:

1. takes the save dir's lock exclusively (no part may still be running);
2. re-derives the N parts from the whole plan and accepts a part journal's files only when the journal was
   written by exactly that part (same sub-plan digest), and each file is present at its journaled size;
3. refuses, naming the parts to run again, when any tensor file of the plan is missing;
4. refuses checkpoint files the plan does not write (``--overwrite`` removes them);
5. merges the part journals into the save dir's journal, writes the text files (config, index, the tracker
   last), and removes the part journals.

Running ``--finish`` again is harmless: the merged journal already lists every file.
"""

from __future__ import annotations

import os
import time

from ..errors import ValidationError
from ..plan.plan import Plan
from ..plan.split import split_plan, tensor_files
from . import journal


def part_journals(root: str) -> list[tuple[str, int, int]]:
    """``(journal name, index, count)`` of every part journal in ``root``, by name."""
    out = []
    for name in sorted(os.listdir(root)):
        m = journal.PART_NAME.match(name)
        if m:
            out.append((name, int(m.group(2)), int(m.group(3))))
    return out


def other_splits(root: str, part) -> list[str]:
    """Journals in ``root`` of parts of another split (another part count, or another whole plan) than
    ``part``'s: mixing two splits in one save dir is refused (their parts would write the same files)."""
    out = []
    for name, _, count in part_journals(root):
        run = journal.last_run(root, name)
        of = (run or {}).get("part", {}).get("of") if isinstance((run or {}).get("part"), dict) else None
        if count != part.count or (of is not None and of != part.of):
            out.append(name)
    return out


def collect(plan: Plan) -> dict[str, dict]:
    """Journal records of every tensor file of ``plan``: from the save dir's journal (an earlier ``--finish``)
    and from the journals of its parts.  Raises one :class:`ValidationError` naming the parts whose files are
    missing, incomplete, or journaled by a part that is not this plan's."""
    root = plan.target_root
    records = dict(journal.completed(root, journal.plan_digest(plan)) or {})
    parts: dict[int, list[Plan]] = {}
    foreign = []
    for name, index, count in part_journals(root):
        if count > max(1, len(plan.files)) or index >= count:
            foreign.append(name)
            continue
        if count not in parts:
            parts[count] = split_plan(plan, count)
        done = journal.completed(root, journal.plan_digest(parts[count][index]), name)
        if done is None:
            foreign.append(name)
            continue
        records.update(done)
    wanted = [plan.files[fi].path for fi in tensor_files(plan)]
    missing = [p for p in wanted if p not in records]
    if not missing:
        return {p: records[p] for p in wanted}
    problems = []
    for count, subs in sorted(parts.items()):
        for k, sub in enumerate(subs):
            lacking = [f.path for f in sub.files if f.path not in records]
            if lacking:
                problems.append(f"part {k} of {count}: {len(lacking)} of its {len(sub.files)} file(s) are not complete "
                                f"(e.g. {lacking[0]}). Run that part (again) with `streamconv run SUBPLAN`; it "
                                f"resumes.")
    if not parts:
        problems.append(f"{root}: no part of this plan has run here ({len(missing)} of {len(wanted)} tensor files "
                        f"missing, e.g. {missing[0]}). Run every part written by `streamconv plan split` first.")
    for name in foreign:
        problems.append(f"{os.path.join(root, name)}: journal of a part of another plan (or another split); its "
                        f"files were not counted.")
    raise ValidationError(problems)


def stale_outputs(plan: Plan) -> list[str]:
    """Checkpoint files in the save dir that the plan does not write (relative paths, sorted)."""
    from .cluster import TOKEN
    from .executor import _CHECKPOINT_FILES

    root = plan.target_root
    ours = {f.path for f in plan.files}
    out = []
    for dirpath, _, filenames in os.walk(root, followlinks=False):
        rel_dir = os.path.relpath(dirpath, root)
        for name in filenames:
            rel = name if rel_dir == "." else f"{rel_dir.replace(os.sep, '/')}/{name}"
            m = TOKEN.search(rel)
            if m and rel[:m.start()] in ours:
                continue   # an attempt file of a cluster run, removed under the lock
            if rel not in ours and _CHECKPOINT_FILES.match(rel) and not name.endswith(".partial"):
                out.append(rel)
    return sorted(out)


def remove_part_journals(root: str) -> None:
    for name, _, _ in part_journals(root):
        try:
            os.unlink(os.path.join(root, name))
        except FileNotFoundError:
            pass


def finish_locked(plan: Plan, opts, accepted=None):
    """``run PLAN --finish`` under the save dir's exclusive lock (see the module docstring)."""
    from .executor import RunResult, _cleanup, _write_texts, clear_earlier_output, preflight

    root = plan.target_root
    digest = journal.plan_digest(plan)
    start = time.monotonic()
    main = journal.completed(root, digest)          # an earlier --finish of this plan
    merged = collect(plan)                          # every tensor file, or one error naming what is missing
    problems = []
    if not opts.overwrite:
        stale = stale_outputs(plan)
        if stale:
            problems.append(f"{root}: holds {len(stale)} checkpoint file(s) this plan does not write "
                            f"({', '.join(stale[:3])}{' ...' if len(stale) > 3 else ''}). Pass --overwrite to "
                            f"remove them.")
        if main is None and os.path.exists(journal.path_of(root)):
            problems.append(f"{root}: holds the journal of a different plan's output. Pass --overwrite to replace it.")
    if problems:
        raise ValidationError(problems)
    preflight(plan, opts, merged)
    if accepted is not None:
        accepted()
    _cleanup(plan)
    removed = clear_earlier_output(plan) if opts.overwrite else []
    if main is None:
        if os.path.exists(journal.path_of(root)):
            os.remove(journal.path_of(root))
        journal.start(root, digest, [f.path for f in plan.files])
    for rel in sorted(set(merged) - set(main or {})):
        rec = merged[rel]
        journal.record_file(root, rel, rec["size"], rec["crc32"], rec.get("file_crc32"))
    done = frozenset(merged) | frozenset(main or ())
    texts = _write_texts(plan, opts, done, journal.NAME)
    remove_part_journals(root)
    text_bytes = sum(f.nbytes for f in plan.files if f.path not in done)
    return RunResult(texts, text_bytes, time.monotonic() - start, tuple(removed))
