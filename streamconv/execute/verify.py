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

from ..plan.plan import OutputTensor, Plan
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
    digests, journaled = journal.read(root)
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
            report.problems.append(f"{path}: missing. Run the plan again to resume.")
            continue
        rec = journaled.get(f.path)
        if rec is None:
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
    """Check a save dir from its journal alone: each journaled file exists at its journaled size, and its
    format (sniffed from its first bytes) re-checks it against the journaled checksums with the file's own
    index: per tensor for safetensors (header order, the order ``finish`` journals), per zip record for .pt
    (``zipfile.testzip`` too), the whole file for text."""
    report = Report()
    digests, journaled = journal.read(root)
    if not digests:
        report.problems.append(f"{journal.path_of(root)}: no run journal; was this directory written by streamconv?")
    for rel, rec in sorted(journaled.items()):
        path = os.path.join(root, *rel.split("/"))
        report.files += 1
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
