"""streamconv.layout.parallel: rank directory names (spec deepseek_v3_mindspeed.md §2.1), rank file order,
pipeline placement of layers (§4.3) and expert ranges (§3.6)."""

from __future__ import annotations

import pytest

from streamconv.errors import ValidationError
from streamconv.layout.pipeline import PipelineLayout, place_slots
from streamconv.layout.parallel import (LayerSlot, ParallelSizes, RankFile, expert_range, iter_dir,
                                        rank_dir, rank_files)

RANK_DIRS = [
    # (tp, pp, ep sizes), (tp, pp, ep ranks), name
    ((1, 1, 1), (0, 0, 0), "mp_rank_00"),
    ((8, 1, 1), (7, 0, 0), "mp_rank_07"),
    ((2, 4, 1), (1, 3, 0), "mp_rank_01_003"),          # PP > 1, EP = 1
    ((2, 1, 8), (1, 0, 5), "mp_rank_01_005"),          # PP = 1, EP > 1
    ((4, 16, 32), (3, 15, 31), "mp_rank_03_015_031"),  # PP > 1, EP > 1
    ((16, 2, 2), (12, 1, 0), "mp_rank_12_001_000"),
    ((1, 1000, 1), (0, 999, 0), "mp_rank_00_999"),
    ((1, 2, 256), (0, 0, 128), "mp_rank_00_000_128"),
]


@pytest.mark.parametrize("sizes, ranks, name", RANK_DIRS, ids=[r[2] for r in RANK_DIRS])
def test_rank_dir(sizes, ranks, name):
    assert rank_dir(RankFile(*ranks), ParallelSizes(*sizes)) == name


def test_iter_dir():
    assert iter_dir(1) == "iter_0000001"
    assert iter_dir(1234567) == "iter_1234567"


@pytest.mark.parametrize("tp, pp, ep", [(1, 1, 1), (2, 1, 1), (1, 3, 1), (1, 1, 4), (2, 3, 4), (8, 2, 2)])
def test_rank_files_count_order_and_unique_dirs(tp, pp, ep):
    sizes = ParallelSizes(tp, pp, ep)
    files = rank_files(sizes)
    assert len(files) == tp * pp * ep
    # pipeline stage major, then EP, then TP (TP varies fastest)
    assert [(f.pp_rank, f.ep_rank, f.tp_rank) for f in files] == sorted(
        (p, e, t) for p in range(pp) for e in range(ep) for t in range(tp))
    assert len({rank_dir(f, sizes) for f in files}) == len(files)


def test_rank_files_explicit_order():
    files = rank_files(ParallelSizes(tp=2, pp=2, ep=2))
    assert files == [RankFile(0, 0, 0), RankFile(1, 0, 0), RankFile(0, 0, 1), RankFile(1, 0, 1),
                     RankFile(0, 1, 0), RankFile(1, 1, 0), RankFile(0, 1, 1), RankFile(1, 1, 1)]


def test_place_layers_even_split():
    slots = place_slots(PipelineLayout(8, 2))
    assert [s.slot for s in slots] == list(range(8))
    assert [s.pp_rank for s in slots] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [s.local for s in slots] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert all(s.group == "model" for s in slots)
    assert slots[5] == LayerSlot(5, 1, "model", 1)


@pytest.mark.parametrize("layers, pp", [(1, 1), (61, 1), (8, 8), (60, 4), (64, 16)])
def test_place_layers_properties(layers, pp):
    slots = place_slots(PipelineLayout(layers, pp))
    per = layers // pp
    assert len(slots) == layers
    for stage in range(pp):
        mine = [s for s in slots if s.pp_rank == stage]
        assert [s.local for s in mine] == list(range(per))
        assert [s.slot for s in mine] == list(range(stage * per, (stage + 1) * per))


@pytest.mark.parametrize("layers, pp", [(7, 2), (61, 4), (3, 4)])
def test_place_layers_uneven_raises(layers, pp):
    with pytest.raises(ValidationError, match="not divisible"):
        place_slots(PipelineLayout(layers, pp))


@pytest.mark.parametrize("experts, ep", [(1, 1), (8, 1), (8, 8), (256, 8), (256, 32), (12, 3)])
def test_expert_ranges_cover_every_expert_once(experts, ep):
    ranges = [expert_range(e, ep, experts) for e in range(ep)]
    flat = [x for r in ranges for x in r]
    assert flat == list(range(experts))
    assert all(len(r) == experts // ep for r in ranges)
    assert all(r.step == 1 for r in ranges)


def test_expert_range_refuses_uneven_split():
    with pytest.raises(ValidationError, match="does not divide the 10 experts"):
        expert_range(0, 4, 10)


def test_expert_range_values():
    assert expert_range(3, 8, 256) == range(96, 128)
    assert expert_range(0, 4, 8) == range(0, 2)


@pytest.mark.parametrize("kw, bad", [(dict(tp=0), 1), (dict(pp=-1), 1), (dict(ep=0), 1),
                                     (dict(tp=0, pp=0, ep=-3), 3), (dict(tp=1.5), 1), (dict(pp="2"), 1)])
def test_parallel_sizes_rejects_non_positive(kw, bad):
    with pytest.raises(ValidationError) as info:
        ParallelSizes(**kw)
    assert len(info.value.problems) == bad   # every problem listed, raised once


def test_parallel_sizes_defaults_and_frozen():
    s = ParallelSizes()
    assert (s.tp, s.pp, s.ep) == (1, 1, 1)
    with pytest.raises(AttributeError):
        s.tp = 2  # type: ignore[misc]
