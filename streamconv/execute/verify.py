"""``streamconv verify``: are the outputs of a plan complete and correct?

Three levels, cheapest first:
1. every output file exists at its planned size and is journaled as complete;
2. the CRC32 of every tensor record (read back from disk) equals the one recorded while writing;
3. ``rederive`` tensors chosen at random are computed again from the sources and compared byte for byte.

Levels 1-2 are each file's storage format's :meth:`~streamconv.storage.base.TensorFormat.check_file`: with
the layout the plan implies (``verify_plan``), or without a plan (``verify_dir``) from the journal and the
file's own index (a safetensors header, a zip directory), the format being sniffed from the file's first bytes.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field

import numpy as np

from ..errors import StreamconvError
from ..plan.plan import OutputTensor, Plan
from ..plan.trust import TEMP_SUFFIX, is_inside
from ..storage.pieces import tensor_bytes
from ..storage.registry import format_names, format_of_file
from . import journal
from .executor import source_problems
from .formats import format_of, layout_of
from .kernels import materialize


@dataclass
class Report:
    files: int = 0
    records: int = 0
    rederived: int = 0
    problems: list[str] = field(default_factory=list)
    incomplete: bool = False   # planned files missing or temporary files left: an interrupted run

    @property
    def ok(self) -> bool:
        return not self.problems


def _label(t: OutputTensor) -> str:
    return f"{t.group}.{t.name}" if t.group else t.name


def verify_plan(plan: Plan, *, sample: int | None = None, rederive: int = 0, seed: int = 0) -> Report:
    """Check a plan's outputs; ``sample`` limits the CRC check to that many random files."""
    report = Report()
    rng = random.Random(seed)
    root = plan.target_root
    try:
        digests, journaled = journal.read(root)
    except StreamconvError as exc:
        report.problems.append(str(exc))
        return report
    if journal.plan_digest(plan) not in digests:
        report.problems.append(f"{journal.path_of(root)}: no run of this plan is journaled here. Run the plan "
                               f"(or pass the save dir that it wrote).")
    files = [f for f in plan.files]
    if sample is not None and sample < len(files):
        files = rng.sample(files, sample)
    for f in files:
        path = os.path.join(root, *f.path.split("/"))
        report.files += 1
        if not os.path.isfile(path):
            report.incomplete = True
            report.problems.append(f"{path}: missing (incomplete output). Run the plan again to resume.")
            continue
        rec = journaled.get(f.path)
        if rec is None:
            report.incomplete = True
            report.problems.append(f"{path}: not journaled as complete. Run the plan again to resume.")
            continue
        check = format_of(f).check_file(path, rec, layout_of(f))
        report.records += check.records
        report.problems += check.problems
    if rederive:
        _rederive(plan, rederive, rng, report)
    return report


def _rederive(plan: Plan, k: int, rng: random.Random, report: Report) -> None:
    stale = source_problems(plan)
    if stale:
        report.problems.append(f"cannot re-derive tensors: {stale[0]}")
        return
    candidates = [(f, i) for f in plan.files if f.tensors for i in range(len(f.tensors))]
    for f, i in rng.sample(candidates, min(k, len(candidates))):
        path = os.path.join(plan.target_root, *f.path.split("/"))
        if not os.path.isfile(path):
            continue
        want = tensor_bytes(materialize(f.tensors[i].node, plan.source_root))
        got = format_of(f).read_entry(path, layout_of(f), i)   # decoded, for formats that compress
        report.rederived += 1
        if not np.array_equal(got, want):
            t = f.tensors[i]
            report.problems.append(f"{path}: {_label(t)}: bytes differ from the tensor re-derived from "
                                   f"the source. Delete the file and run the plan again.")


def verify_dir(root: str) -> Report:
    """Check a save dir from its journal alone: the last run's every planned file is there and journaled as
    complete (else the output is *incomplete*: a killed run, leftover temporary files), each journaled file
    exists at its journaled size, and its format (sniffed from its first bytes) re-checks every byte against
    the journal: per tensor, then the bytes between tensors (headers, pickle, zip directory) through the
    journaled whole-file CRC.  Nothing outside ``root`` is read: a journal path that leaves it is refused."""
    report = Report()
    try:
        digests, journaled, planned = journal.read_runs(root)
    except StreamconvError as exc:
        report.problems.append(str(exc))
        return report
    if not digests:
        parts = [n for n in os.listdir(root) if journal.PART_NAME.match(n)] if os.path.isdir(root) else []
        if parts:
            report.incomplete = True
            report.problems.append(f"{root}: holds {len(parts)} part(s) of a split plan and no merged journal: run "
                                   f"`streamconv run PLAN --finish` once every part is done, then verify.")
        else:
            report.problems.append(f"{journal.path_of(root)}: no run journal; was this directory written by "
                                   f"streamconv?")
    real_root = os.path.realpath(root)
    missing = [p for p in (planned or []) if p not in journaled]
    partial = sorted(os.path.relpath(os.path.join(d, n), root) for d, _, names in os.walk(root)
                     for n in names if n.endswith(TEMP_SUFFIX))
    if missing or partial:
        report.incomplete = True
        what = []
        if missing:
            what.append(f"{len(planned) - len(missing)} of {len(planned)} planned files complete (missing "
                        f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''})")
        if partial:
            what.append(f"temporary files of an interrupted run ({', '.join(partial[:3])}"
                        f"{' ...' if len(partial) > 3 else ''})")
        report.problems.append(f"{root}: incomplete: {'; '.join(what)}. Run the plan again to resume.")
    for rel, rec in sorted(journaled.items()):
        path = os.path.join(root, *rel.split("/"))
        report.files += 1
        if not is_inside(os.path.realpath(path), real_root):
            report.problems.append(f"{path}: leaves the save dir through a symlink; not read.")
            continue
        if not os.path.isfile(path) or os.path.getsize(path) != rec.get("size"):
            report.problems.append(f"{path}: missing or not at its journaled size {rec.get('size')}.")
            continue
        fmt = format_of_file(path)
        if fmt is None:
            report.problems.append(f"{path}: not a file of any known format (expected one of "
                                   f"{', '.join(format_names())}; corrupted on disk?). Delete the file and run "
                                   f"the plan again.")
            continue
        check = fmt.check_file(path, rec)
        report.records += check.records
        report.problems += check.problems
    return report
