"""Pipeline placement, table-driven from the worked examples of the MindSpeed layouts (spec §4.3-4.5)."""

import pytest

from streamconv.errors import ValidationError
from streamconv.layout.pipeline import PipelineLayout, place_slots, validate


def placement(p):
    """{(stage, group): [(local, hf index)]}: the i-th real slot receives HF layer i."""
    out = {}
    for i, s in enumerate(place_slots(p)):
        out.setdefault((s.pp_rank, s.group), []).append((s.local, i))
    return out


CASES = [
    # even PP, noop keeps its local index (§4.3): L=8, PP=2, noop {3}
    (PipelineLayout(8, 2, noop_layers=(3,)),
     {(0, "model"): [(0, 0), (1, 1), (2, 2)], (1, "model"): [(0, 3), (1, 4), (2, 5), (3, 6)]}),
    # VPP (§4.4, the code's own comment): L=8, PP=2, s=2
    (PipelineLayout(8, 2, vpp_layers=2),
     {(0, "model0"): [(0, 0), (1, 1)], (0, "model1"): [(0, 4), (1, 5)],
      (1, "model0"): [(0, 2), (1, 3)], (1, "model1"): [(0, 6), (1, 7)]}),
    # dualpipev (§4.5): PP=2, L=8 -> pp0 = [0,1 | 6,7], pp1 = [2,3 | 4,5]
    (PipelineLayout(8, 2, dualpipev=True),
     {(0, "model0"): [(0, 0), (1, 1)], (1, "model0"): [(0, 2), (1, 3)],
      (1, "model1"): [(0, 4), (1, 5)], (0, "model1"): [(0, 6), (1, 7)]}),
    # PP=4, L=8 dualpipev: pp0 = [0 | 7], pp1 = [1 | 6]
    (PipelineLayout(8, 4, dualpipev=True),
     {(0, "model0"): [(0, 0)], (1, "model0"): [(0, 1)], (2, "model0"): [(0, 2)], (3, "model0"): [(0, 3)],
      (3, "model1"): [(0, 4)], (2, "model1"): [(0, 5)], (1, "model1"): [(0, 6)], (0, "model1"): [(0, 7)]}),
    # num-layer-list (§4.3)
    (PipelineLayout(5, 2, num_layer_list=(2, 3)),
     {(0, "model"): [(0, 0), (1, 1)], (1, "model"): [(0, 2), (1, 3), (2, 4)]}),
]


@pytest.mark.parametrize("layout,expected", CASES)
def test_worked_examples(layout, expected):
    assert placement(layout) == expected


def test_vpp_pretrain_example():
    """R-sh: L=64, PP=8, s=2, noop {47,62,63}."""
    p = PipelineLayout(64, 8, vpp_layers=2, noop_layers=(47, 62, 63))
    got = placement(p)
    assert got[(0, "model0")] == [(0, 0), (1, 1)] and got[(0, "model1")] == [(0, 16), (1, 17)]
    assert got[(0, "model2")] == [(0, 32), (1, 33)] and got[(0, "model3")] == [(0, 47), (1, 48)]
    assert got[(7, "model2")] == [(0, 46)] and (7, "model3") not in got
    assert p.last_chunk() == (7, "model3") and p.first_chunk() == (0, "model0")


def test_dualpipev_production_example():
    """L=64, PP=8, noop {61,62,63}: pp0 model1 holds only local 0 <- HF 60 (plus final norm, output, MTP)."""
    p = PipelineLayout(64, 8, dualpipev=True, noop_layers=(61, 62, 63))
    got = placement(p)
    assert got[(0, "model0")] == [(i, i) for i in range(4)]
    assert got[(0, "model1")] == [(0, 60)]
    assert got[(1, "model0")] == [(i, 4 + i) for i in range(4)] and got[(1, "model1")] == [(i, 56 + i) for i in range(4)]
    assert got[(7, "model0")] == [(i, 28 + i) for i in range(4)] and got[(7, "model1")] == [(i, 32 + i) for i in range(4)]
    assert p.last_chunk() == (0, "model1")


@pytest.mark.parametrize("layout,match", [
    (PipelineLayout(8, 2, vpp_layers=2, dualpipev=True), "mutually exclusive"),
    (PipelineLayout(8, 2, vpp_layers=3), "does not divide the 4 layers of a stage"),
    (PipelineLayout(8, 2, num_layer_list=(4, 4), vpp_layers=2), "cannot be combined"),
    (PipelineLayout(8, 2, num_layer_list=(3, 4)), "summing to --num-layers 8"),
    (PipelineLayout(8, 3, dualpipev=True), "2 x --target-pipeline-parallel-size"),
    (PipelineLayout(8, 3), "not divisible by --target-pipeline-parallel-size 3"),
    (PipelineLayout(8, 2, noop_layers=(8,)), "outside the 8 layer slots"),
])
def test_contradictions(layout, match):
    assert any(__import__("re").search(match, p) for p in validate(layout)), validate(layout)
    with pytest.raises(ValidationError):
        place_slots(layout)
