"""Cutting a plan into coarse units of work for several hosts: groups of output files that share source reads,
packed into parts.

Two consumers, one rule:

* a dask.distributed run sends each :class:`Group` to a worker as one task (``execute/cluster.py``);
* ``streamconv plan split PLAN --hosts N`` writes one sub-plan per part (:func:`split_plan`), each run on its own
  host by ``streamconv run SUBPLAN``; ``streamconv run PLAN --finish`` then checks and completes the whole.

A group is read-once by construction: output files whose graphs read the same source bytes (the TP ranks of a
row-parallel weight, the EP ranks that all hold a stage's attention) are merged, heaviest sharing first, as long
as the group stays under a cap of output bytes (several caps are tried; see :func:`group_files`).  Within a
group the executor shares reads between files, so a source byte read by several ranks of a group is read once.  Bytes shared by two groups are read by both:
:func:`read_report` counts them against the plan's ideal (each distinct source byte read once).

Only tensor files are grouped: text files (config, tracker, index) are written last by the process that holds
the save dir's lock, so the tracker never appears before every rank file is complete.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
import re
from dataclasses import dataclass, replace

from .. import types
from ..errors import PlanError
from ..graph.node import Op, toposort
from ..graph.rewrite import push_slices
from ..storage.registry import get_format
from .plan import Plan, sources_read

Extents = dict[str, list[tuple[int, int]]]   # source file -> sorted, disjoint [start, end) byte ranges


@dataclass(frozen=True)
class Group:
    """Output files written by one task: indexes into ``plan.files`` (plan order), the bytes they write and the
    distinct source bytes they read."""

    files: tuple[int, ...]
    write_bytes: int
    read_bytes: int

    @property
    def cost(self) -> int:
        """What balancing weighs: bytes moved (read once + written)."""
        return self.write_bytes + self.read_bytes


@dataclass(frozen=True)
class PartInfo:
    """``options["part"]`` of a sub-plan: part ``index`` of ``count``, cut from the plan whose digest is ``of``."""

    index: int
    count: int
    of: str

    @property
    def tag(self) -> str:
        width = max(2, len(str(self.count)))
        return f"part-{self.index:0{width}d}-of-{self.count:0{width}d}"


# --- what each file reads ------------------------------------------------------------------------------------------

def read_extents(plan: Plan, files: list[int] | None = None) -> dict[int, Extents]:
    """The source byte ranges each output file's graphs read (slices pushed to the reads, as the executor runs
    them), merged per source file.  ``files``: indexes into ``plan.files`` (default: every tensor file)."""
    memo: dict = {}
    out: dict[int, Extents] = {}
    for fi in (range(len(plan.files)) if files is None else files):
        roots = [push_slices(t.node, memo) for t in plan.files[fi].tensors]
        spans: dict[str, list[tuple[int, int]]] = {}
        for n in toposort(roots):
            if n.op is Op.READ:
                spans.setdefault(n.arg.file, []).append(_read_span(n.arg))
            elif n.op is Op.READ_CHUNKED:
                spans.setdefault(n.arg.file, []).extend(_chunked_spans(n.arg))
        out[fi] = {name: _merge(s) for name, s in spans.items()}
    return out


MAX_RUNS = 4096   # runs per chunked read beyond which its covering span stands in (an over-count, never under)


def _chunked_spans(a) -> list[tuple[int, int]]:
    """The byte ranges of the array's row-major layout that a chunked read's hypercube covers (the array as if
    stored flat; its file is the array's directory): one run per index of the dims before the last one the
    read restricts, or the covering span when that would be more than :data:`MAX_RUNS` runs."""
    item = types.dtype(a.dtype).itemsize
    if not a.shape:
        return [(0, item)]
    if any(n == 0 for n in a.lengths):
        return []
    cut = max((d for d, (n, size) in enumerate(zip(a.lengths, a.shape)) if n != size), default=0)
    stride = [item * math.prod(a.shape[d + 1:]) for d in range(len(a.shape))]
    run = a.lengths[cut] * stride[cut]
    starts = [sum(o * s for o, s in zip(a.offsets, stride))]
    if math.prod(a.lengths[:cut]) > MAX_RUNS:
        last = sum((o + n - 1) * s for o, n, s in zip(a.offsets, a.lengths, stride))
        return [(starts[0], last + item)]
    for d in range(cut):   # every index of the outer dims: one run of the contiguous inner block
        starts = [s + i * stride[d] for s in starts for i in range(a.lengths[d])]
    return [(s, s + run) for s in starts]


def _read_span(a) -> tuple[int, int]:
    """The absolute byte range a read node reads (as the read kernel computes it)."""
    dt = types.dtype(a.dtype)
    row = dt.nbytes(tuple(a.shape[1:])) if a.shape else dt.itemsize
    r0, r1 = a.rows
    return a.offset + r0 * row, a.offset + r1 * row


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in sorted(spans):
        if e <= s:
            continue
        if out and s <= out[-1][1]:
            if e > out[-1][1]:
                out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


def extent_bytes(ext: Extents) -> int:
    return sum(e - s for spans in ext.values() for s, e in spans)


def union(exts: list[Extents]) -> Extents:
    out: dict[str, list[tuple[int, int]]] = {}
    for ext in exts:
        for name, spans in ext.items():
            out.setdefault(name, []).extend(spans)
    return {name: _merge(s) for name, s in out.items()}


def _shared_bytes(extents: dict[int, Extents]) -> dict[tuple[int, int], int]:
    """Bytes read by pairs of files: every elementary source range read by files R (|R| >= 2) adds its length to
    the pairs of consecutive members of R in plan order, a path that keeps the count linear in |R| (a norm
    replicated in 64 rank files adds 63 pairs, not 2016) and lets a cap cut R into runs of neighbours."""
    events: dict[str, list[tuple[int, int, int]]] = {}
    for fi, ext in extents.items():
        for name, spans in ext.items():
            ev = events.setdefault(name, [])
            for s, e in spans:
                ev.append((s, 1, fi))
                ev.append((e, -1, fi))
    shared: dict[tuple[int, int], int] = {}
    for name in sorted(events):
        ev = sorted(events[name])
        active: set[int] = set()
        pos = None
        i = 0
        while i < len(ev):
            at = ev[i][0]
            if pos is not None and len(active) >= 2 and at > pos:
                members = sorted(active)
                for a, b in zip(members, members[1:]):
                    shared[(a, b)] = shared.get((a, b), 0) + at - pos
            while i < len(ev) and ev[i][0] == at:
                _, d, fi = ev[i]
                if d > 0:
                    active.add(fi)
                else:
                    active.discard(fi)
                i += 1
            pos = at
    return shared


# --- groups --------------------------------------------------------------------------------------------------------

def tensor_files(plan: Plan, skip: frozenset[str] = frozenset()) -> list[int]:
    """Indexes of the plan's tensor (non-text) files not in ``skip``, in plan order."""
    return [fi for fi, f in enumerate(plan.files) if not get_format(f.format).is_text and f.path not in skip]


# Group caps tried, as multiples of an even share of the output (total / n): the smallest estimated makespan
# wins (a stage bigger than a share is cut in two, or kept whole, whichever loads the busiest host least).
CAPS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0)


def group_files(plan: Plan, n: int = 1, *, skip: frozenset[str] = frozenset(),
                max_bytes: int | None = None) -> list[Group]:
    """Group the plan's tensor files (those not in ``skip``) for ``n`` hosts or task slots.

    Files are merged along the source bytes they share, heaviest sharing first (Kruskal's rule), while a group
    writes at most ``max_bytes`` (never less than the largest file).  Without ``max_bytes``, each cap of
    :data:`CAPS` is tried and the grouping whose :func:`pack` into ``n`` bins loads the busiest bin least (bytes
    written plus bytes read, so a re-read counts against a cut) wins; ties go to fewer bytes read, then fewer
    groups.  Groups come largest first (by :attr:`Group.cost`), ties in plan order: the result is a pure
    function of the plan and ``n``."""
    if n < 1:
        raise PlanError(f"cannot split a plan for {n} hosts; give at least 1.")
    files = tensor_files(plan, skip)
    if not files:
        return []
    extents = read_extents(plan, files)
    size = {fi: plan.files[fi].nbytes for fi in files}
    edges = sorted(_shared_bytes(extents).items(), key=lambda kv: (-kv[1], kv[0]))
    share = sum(size.values()) / n
    caps = [max_bytes] if max_bytes is not None else sorted({math.ceil(m * share) for m in CAPS})
    best, best_key = None, None
    reads: dict[tuple[int, ...], int] = {}   # members -> distinct bytes read (caps often give the same groups)
    for cap in caps:
        groups = _kruskal(files, size, extents, edges, max(cap, max(size.values())), reads)
        loads = [sum(g.cost for g in b) for b in pack(groups, n)]
        key = (max(loads), sum(g.read_bytes for g in groups), len(groups))
        if best_key is None or key < best_key:
            best, best_key = groups, key
    return best


def _kruskal(files: list[int], size: dict[int, int], extents: dict[int, Extents], edges, cap: int,
             reads: dict[tuple[int, ...], int]) -> list[Group]:
    parent = {fi: fi for fi in files}
    total = dict(size)

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for (a, b), _ in edges:
        ra, rb = find(a), find(b)
        if ra != rb and total[ra] + total[rb] <= cap:
            ra, rb = min(ra, rb), max(ra, rb)
            parent[rb] = ra
            total[ra] += total.pop(rb)
    members: dict[int, list[int]] = {}
    for fi in files:
        members.setdefault(find(fi), []).append(fi)
    groups = []
    for m in map(tuple, members.values()):
        if m not in reads:
            reads[m] = extent_bytes(union([extents[fi] for fi in m]))
        groups.append(Group(m, sum(size[fi] for fi in m), reads[m]))
    return sorted(groups, key=lambda g: (-g.cost, g.files))


def pack(groups: list[Group], n: int) -> list[list[Group]]:
    """Deal groups into ``n`` bins, largest first onto the lightest bin (LPT; ties to the lowest bin)."""
    bins: list[list[Group]] = [[] for _ in range(n)]
    heap = [(0, i) for i in range(n)]
    for g in sorted(groups, key=lambda g: (-g.cost, g.files)):
        load, i = heapq.heappop(heap)
        bins[i].append(g)
        heapq.heappush(heap, (load + g.cost, i))
    return bins


def imbalance(loads: list[int]) -> float:
    """max / mean of per-host loads (1.0: perfectly even; hosts with no work count as 0)."""
    if not loads or not sum(loads):
        return 1.0
    return max(loads) / (sum(loads) / len(loads))


def ideal_read_bytes(plan: Plan) -> int:
    """Distinct source bytes the plan's tensor files read: what a conversion reading every byte once reads."""
    return extent_bytes(union(list(read_extents(plan).values())))


# --- sub-plans -----------------------------------------------------------------------------------------------------

def sub_plan(plan: Plan, files: list[int], checks=(), part: PartInfo | None = None) -> Plan:
    """``plan`` restricted to ``files`` (indexes, kept in plan order), the replica ``checks`` given, and the
    source files those read; ``part`` marks it as a part of a split plan."""
    keep = sorted(files)
    roots = [t.node for fi in keep for t in plan.files[fi].tensors] + [n for c in checks for n in c.nodes]
    options = dict(plan.options)
    if part is not None:
        options["part"] = {"index": part.index, "count": part.count, "of": part.of}
    return replace(plan, files=tuple(plan.files[fi] for fi in keep),
                   source_files=sources_read(plan, roots),
                   checks=tuple(checks), options=options)


def split_plan(plan: Plan, n: int) -> list[Plan]:
    """``n`` sub-plans whose tensor files partition the plan's (text files are left to ``run --finish``),
    balanced by bytes moved; each replica check goes to the part that reads its first copy.  Deterministic:
    ``run --finish`` re-derives the parts to check the journals they wrote."""
    if part_of(plan) is not None:
        raise PlanError("this plan is already a part of a split plan; split the whole plan instead.")
    digest = whole_digest(plan)
    bins = pack(group_files(plan, n), n)
    files_of = [sorted(fi for g in b for fi in g.files) for b in bins]
    checks: list[list] = [[] for _ in range(n)]
    if plan.checks:
        extents = read_extents(plan, [fi for fs in files_of for fi in fs])
        part_ext = [union([extents[fi] for fi in fs]) for fs in files_of]
        for c in plan.checks:
            checks[_reading_part(part_ext, c.nodes[0])].append(c)
    return [sub_plan(plan, files_of[k], checks[k], PartInfo(k, n, digest)) for k in range(n)]


def _reading_part(part_ext: list[Extents], node) -> int:
    """The first part whose reads overlap those of ``node`` (part 0 when none does)."""
    reads = [(n.arg.file, _read_span(n.arg)) for n in toposort([node]) if n.op is Op.READ]
    reads += [(n.arg.file, span) for n in toposort([node]) if n.op is Op.READ_CHUNKED for span in _chunked_spans(n.arg)]
    for k, ext in enumerate(part_ext):
        for name, (s, e) in reads:
            if any(a < e and s < b for a, b in ext.get(name, ())):
                return k
    return 0


def whole_digest(plan: Plan) -> str:
    """The digest that names a plan: the journal's ``plan_sha256`` of a run of it (the same formula as
    ``execute.journal.plan_digest``, which the tests check)."""
    return hashlib.sha256(json.dumps(plan.to_json(), sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def part_of(plan: Plan) -> PartInfo | None:
    """The :class:`PartInfo` of a sub-plan written by ``plan split`` (checked: plans are untrusted), or None."""
    raw = plan.options.get("part")
    if raw is None:
        return None
    ok = (isinstance(raw, dict) and set(raw) == {"index", "count", "of"}
          and all(type(raw[k]) is int for k in ("index", "count")) and isinstance(raw["of"], str)
          and 1 <= raw["count"] <= 100_000 and 0 <= raw["index"] < raw["count"]
          and re.fullmatch(r"[0-9a-f]{64}", raw["of"]) is not None)
    if not ok:
        raise PlanError(f"plan options.part: expected {{'index': k, 'count': n, 'of': <sha256>}} with 0 <= k < n, got "
                        f"{str(raw)[:80]!r}. Re-create the parts with `streamconv plan split`.")
    if any(get_format(f.format).is_text for f in plan.files):
        raise PlanError("plan options.part: a part of a split plan writes no text files (the tracker and index are "
                        "written by `run --finish`). Re-create the parts with `streamconv plan split`.")
    return PartInfo(raw["index"], raw["count"], raw["of"])
