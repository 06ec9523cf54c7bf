"""Grouping and splitting a plan (streamconv/plan/split.py), checked against a deliberately simple reference:
which source bytes a set of output files reads is recounted here with one boolean mask per source file, marked
by walking the read nodes of the executor's own pieces (no interval arithmetic)."""

from __future__ import annotations

import dataclasses
import itertools
import os

import numpy as np
import pytest

from streamconv import synth
from streamconv.errors import PlanError
from streamconv.execute import journal
from streamconv.execute.executor import plan_pieces
from streamconv.graph.node import Op, read_chunked, toposort
from streamconv.layout.options import McoreOptions
from streamconv.layout.parallel import ParallelSizes
from streamconv.plan import split
from streamconv.plan.plan import Plan
from streamconv.plan.planner import plan_hf_to_mcore

OPTIONS = McoreOptions(moe_grouped_gemm=True, mtp_num_layers=1)


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    root = tmp_path_factory.mktemp("split")
    hf = str(root / "hf")
    synth.synth_checkpoint(hf, dataclasses.replace(synth.TINY, fp8=True, max_shard_bytes=200_000))
    return {sizes: plan_hf_to_mcore(hf, str(root / "out"), ParallelSizes(*sizes), OPTIONS)
            for sizes in ((2, 2, 2), (2, 1, 2), (1, 2, 4), (4, 1, 1))}


def bytes_read(plan: Plan, files) -> int:
    """Distinct source bytes the executor's pieces of ``files`` read (one mask per source file)."""
    sizes = {s.name: s.size for s in plan.source_files}
    masks = {}
    for p in plan_pieces(plan, 1 << 40):
        if p.file not in files:
            continue
        for n in toposort([p.node]):
            if n.op is Op.READ:
                a = n.arg
                row = int(np.prod(a.shape[1:], dtype=np.int64)) * ITEMSIZE[a.dtype]
                mask = masks.setdefault(a.file, np.zeros(sizes[a.file], dtype=bool))
                mask[a.offset + a.rows[0] * row:a.offset + a.rows[1] * row] = True
    return int(sum(m.sum() for m in masks.values()))


ITEMSIZE = {"bfloat16": 2, "float32": 4, "float16": 2, "float8_e4m3fn": 1, "int64": 8, "int32": 4}


def tensor_files(plan: Plan) -> list[int]:
    return [i for i, f in enumerate(plan.files) if f.tensors]


@pytest.mark.parametrize("sizes", [(2, 2, 2), (2, 1, 2), (1, 2, 4), (4, 1, 1)])
@pytest.mark.parametrize("n", [1, 2, 3, 8])
def test_groups_partition_the_tensor_files_and_count_their_reads(plans, sizes, n):
    plan = plans[sizes]
    groups = split.group_files(plan, n)
    assert sorted(fi for g in groups for fi in g.files) == tensor_files(plan)
    for g in groups:
        assert g.write_bytes == sum(plan.files[fi].nbytes for fi in g.files)
        assert g.read_bytes == bytes_read(plan, set(g.files))
    assert [g.cost for g in groups] == sorted((g.cost for g in groups), reverse=True)
    assert split.group_files(plan, n) == groups   # a pure function of the plan and n


@pytest.mark.parametrize("sizes", [(2, 2, 2), (2, 1, 2), (1, 2, 4), (4, 1, 1)])
def test_one_host_reads_each_byte_once(plans, sizes):
    plan = plans[sizes]
    ideal = bytes_read(plan, set(tensor_files(plan)))
    assert split.ideal_read_bytes(plan) == ideal
    assert sum(g.read_bytes for g in split.group_files(plan, 1)) == ideal
    # file by file (what one task per piece or per file reads) is far more
    assert sum(bytes_read(plan, {fi}) for fi in tensor_files(plan)) > 1.5 * ideal


def test_ranks_that_share_sources_go_together(plans):
    """TP 4, one stage: every rank slices the same weights, so with room for it they form one group."""
    plan = plans[(4, 1, 1)]
    groups = split.group_files(plan, 1)
    assert len(groups) == 1 and groups[0].read_bytes == split.ideal_read_bytes(plan)


def test_a_cap_below_a_file_keeps_files_whole(plans):
    plan = plans[(2, 2, 2)]
    groups = split.group_files(plan, 2, max_bytes=1)
    assert sorted(len(g.files) for g in groups) == [1] * len(tensor_files(plan))


def test_pack_is_lpt_and_within_four_thirds_of_optimal():
    costs = [7, 7, 6, 6, 5, 5, 4, 4, 4, 3, 2, 2, 1]
    groups = [split.Group((i,), c, 0) for i, c in enumerate(costs)]
    for n in (2, 3, 4):
        bins = split.pack(groups, n)
        assert sorted(g.files[0] for b in bins for g in b) == list(range(len(costs)))
        loads = [sum(g.cost for g in b) for b in bins]
        best = min(max(sum(c for c, k in zip(costs, assign) if k == j) for j in range(n))
                   for assign in itertools.product(range(n), repeat=len(costs))) if n == 2 else sum(costs) / n
        assert max(loads) <= 4 / 3 * best + 1e-9
    assert split.imbalance([10, 10]) == 1.0 and split.imbalance([15, 5]) == 1.5 and split.imbalance([]) == 1.0


def test_split_plan_partitions_and_round_trips(plans, tmp_path):
    plan = plans[(2, 2, 2)]
    parts = split.split_plan(plan, 3)
    assert sorted(f.path for p in parts for f in p.files) == sorted(plan.files[i].path for i in tensor_files(plan))
    digest = split.whole_digest(plan)
    assert digest == journal.plan_digest(plan)
    for k, p in enumerate(parts):
        assert split.part_of(p) == split.PartInfo(k, 3, digest)
        assert not any(f.text is not None for f in p.files)
        read = {n.arg.file for f in p.files for t in f.tensors for n in toposort([t.node]) if n.op is Op.READ}
        assert {s.name for s in p.source_files} == read
        path = os.path.join(tmp_path, f"{k}.json")
        p.save(path)
        assert journal.plan_digest(Plan.load(path)) == journal.plan_digest(p)   # --finish re-derives this
    assert [journal.plan_digest(p) for p in split.split_plan(plan, 3)] == [journal.plan_digest(p) for p in parts]
    assert split.part_of(plan) is None
    with pytest.raises(PlanError, match="already a part"):
        split.split_plan(parts[0], 2)
    with pytest.raises(PlanError, match="at least 1"):
        split.group_files(plan, 0)


@pytest.mark.parametrize("bad", [
    {"index": 2, "count": 2, "of": "0" * 64},
    {"index": 0, "count": 0, "of": "0" * 64},
    {"index": "0", "count": 2, "of": "0" * 64},
    {"index": 0, "count": 2, "of": "xyz"},
    {"index": 0, "count": 2},
    [0, 2],
])
def test_bad_part_options_are_one_error(plans, bad):
    plan = dataclasses.replace(split.split_plan(plans[(2, 1, 2)], 2)[0])
    plan.options["part"] = bad
    with pytest.raises(PlanError, match="options.part"):
        split.part_of(plan)


def test_a_part_with_a_text_file_is_refused(plans):
    plan = plans[(2, 1, 2)]
    text = [f for f in plan.files if f.text is not None]
    part = split.split_plan(plan, 2)[0]
    bad = dataclasses.replace(part, files=part.files + tuple(text[:1]))
    with pytest.raises(PlanError, match="no text files"):
        split.part_of(bad)


def test_chunked_read_spans_are_the_elements_of_the_hypercube():
    """A chunked read counts the bytes of the elements it covers, in the array's row-major order: checked
    against enumerating the elements, over random hypercubes of 1- to 3-d arrays."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        shape = tuple(int(x) for x in rng.integers(1, 6, rng.integers(1, 4)))
        off = tuple(int(rng.integers(0, s)) for s in shape)
        ln = tuple(int(rng.integers(1, s - o + 1)) for s, o in zip(shape, off))
        a = read_chunked("x", "x", "zarr", "bfloat16", shape, offsets=off, lengths=ln).arg
        want = set()
        for idx in itertools.product(*[range(o, o + n) for o, n in zip(off, ln)]):
            flat = int(np.ravel_multi_index(idx, shape))
            want.update((2 * flat, 2 * flat + 1))
        got = {b for s, e in split._merge(split._chunked_spans(a)) for b in range(s, e)}
        assert got == want, (shape, off, ln)
    # a column band of a tall matrix: more runs than MAX_RUNS, so the covering span stands in (never less)
    a = read_chunked("x", "x", "zarr", "float32", (10_000, 8), offsets=(0, 2), lengths=(10_000, 3)).arg
    assert split._chunked_spans(a) == [(8, 4 * (9_999 * 8 + 4) + 4)]
