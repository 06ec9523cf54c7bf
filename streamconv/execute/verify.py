"""``streamconv verify``: are the outputs of a plan complete and correct?

Three levels, cheapest first:
1. every output file exists at its planned size and is journaled as complete;
2. the CRC32 of every tensor record (read back from disk) equals the one recorded while writing;
3. ``rederive`` tensors chosen at random are computed again from the sources and compared byte for byte.

Without a plan (``verify_dir``), levels 1-2 run from the journal and the files' own indexes: a safetensors
header, or a zip directory.
"""

from __future__ import annotations

import os
import random
import zipfile
import zlib
from dataclasses import dataclass, field

import numpy as np

from ..errors import FormatError
from ..plan.plan import OutputTensor, Plan
from ..storage import fileio
from ..storage.safetensors import read_header, tensor_bytes
from . import journal, writers
from .executor import source_problems
from .kernels import materialize

_CHUNK = 64 << 20


@dataclass
class Report:
    files: int = 0
    records: int = 0
    rederived: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _crc_of_range(path: str, start: int, end: int) -> int:
    crc = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = np.empty(min(_CHUNK, max(end - start, 1)), dtype=np.uint8)
        pos = start
        while pos < end:
            n = min(len(buf), end - pos)
            fileio.pread_into(fd, buf[:n], pos, path=path)
            crc = zlib.crc32(buf[:n], crc)
            pos += n
    finally:
        os.close(fd)
    return crc


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
        size = os.path.getsize(path)
        if f.format == "text":
            with open(path, "rb") as fh:
                content = fh.read()
            if content != (f.text or "").encode():
                report.problems.append(f"{path}: content {content[:20]!r} differs from the plan's {f.text!r}.")
            continue
        layout = writers.LAYOUTS[f.format](f)
        if size != layout.size or size != rec.get("size"):
            report.problems.append(f"{path}: size {size} (planned {layout.size}, journaled {rec.get('size')}).")
            continue
        if f.format == "safetensors":
            # The journaled CRCs cover tensor bytes only; the header is fixed by the plan, so compare it whole.
            if fileio.read_range(path, 0, len(layout.header)).tobytes() != layout.header:
                report.problems.append(f"{path}: header differs from the one the plan implies (corrupted on "
                                       f"disk?). Delete the file and run the plan again.")
        crcs = rec.get("crc32") or []
        for i, (t, (start, end)) in enumerate(zip(f.tensors, layout.spans)):
            report.records += 1
            if i >= len(crcs) or _crc_of_range(path, start, end) != crcs[i]:
                report.problems.append(f"{path}: {_label(t)}: checksum differs from the journal "
                                       f"(corrupted on disk?). Delete the file and run the plan again.")
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
        start, end = writers.LAYOUTS[f.format](f).spans[i]
        want = tensor_bytes(materialize(f.tensors[i].node, plan.source_root))
        got = fileio.read_range(path, start, end - start)
        report.rederived += 1
        if not np.array_equal(got, want):
            t = f.tensors[i]
            report.problems.append(f"{path}: {_label(t)}: bytes differ from the tensor re-derived from "
                                   f"the source. Delete the file and run the plan again.")


def verify_dir(root: str) -> Report:
    """Check a save dir from its journal alone: sizes, and the checksums journaled while writing against the
    files: per tensor for safetensors (data ranges from the file's own header, in header order, which is the
    order ``finish`` journals), per zip record for .pt (``zipfile.testzip`` too), whole file otherwise."""
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
        # safetensors first: a zip never parses as a safetensors header (its first 8 bytes give a length far
        # over the limit), but tensor bytes near a safetensors file's end might look like a zip end record.
        tensors = _safetensors_tensors(path)
        if tensors is not None:
            report.records += len(tensors)
            got = [_crc_of_range(path, t.start, t.end) for t in tensors]
            want = rec.get("crc32") or []
            bad = [t.name for t, g, w in zip(tensors, got, want) if g != w]
            if len(want) != len(tensors):
                report.problems.append(f"{path}: {len(tensors)} tensors in the header but {len(want)} checksums "
                                       f"in the journal. Delete the file and run the plan again.")
            elif bad:
                report.problems.append(f"{path}: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}: checksum "
                                       f"differs from the journal (corrupted on disk?). Delete the file and run "
                                       f"the plan again.")
            continue
        if not zipfile.is_zipfile(path):
            if [_crc_of_range(path, 0, rec["size"])] != rec.get("crc32"):
                report.problems.append(f"{path}: checksum differs from the journal.")
            continue
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
            data = sorted((i for i in z.infolist() if "/data/" in i.filename),
                          key=lambda i: int(i.filename.rsplit("/", 1)[1]))
            report.records += len(data)
            if bad is not None:
                report.problems.append(f"{path}: record {bad} fails its CRC (corrupted on disk?).")
            elif [i.CRC for i in data] != rec.get("crc32"):
                report.problems.append(f"{path}: record checksums differ from the journal.")
    return report


def _safetensors_tensors(path: str) -> list | None:
    """The tensors of a safetensors file in header order, or None when ``path`` is not one."""
    try:
        return list(read_header(path).tensors.values())
    except FormatError:
        return None
