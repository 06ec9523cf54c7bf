"""streamconv.mapping.rules: every split rule and the grouped-GEMM stacks, materialized on small real data and
compared with the same layout written plainly in torch."""

from __future__ import annotations

import pytest
import torch

from streamconv.errors import GraphError
from streamconv.execute.kernels import materialize
from streamconv.graph.node import Node
from streamconv.mapping.rules import (Split, apply_split, grouped_weight1, grouped_weight2, head_part,
                                      merge_head_parts, merge_split, ungroup_weight1, ungroup_weight2)
from tests.st_file import write_with_reads

NE, H, C, F = 4, 6, 8, 5   # experts, hidden, fc1 rows (2 * ffn) per expert, ffn per expert


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "x": torch.randn(12, 8, generator=g).to(torch.bfloat16),
        "gate": torch.randn(8, 6, generator=g).to(torch.bfloat16),
        "up": torch.randn(8, 6, generator=g).to(torch.bfloat16),
        "a": torch.randn(3, 6, generator=g).to(torch.bfloat16),
        "b": torch.randn(5, 6, generator=g).to(torch.bfloat16),
        "f": torch.randn(12, 8, generator=g),
    }
    for q in range(NE):
        tensors[f"fc1.{q}"] = torch.randn(C, H, generator=g).to(torch.bfloat16)
        tensors[f"fc2.{q}"] = torch.randn(H, F, generator=g).to(torch.bfloat16)
    root = str(tmp_path_factory.mktemp("rules"))
    return root, tensors, write_with_reads(root, "m.safetensors", tensors)


def same(got: torch.Tensor, want: torch.Tensor) -> bool:
    return (got.dtype == want.dtype and got.shape == want.shape
            and torch.equal(got.contiguous().reshape(-1).view(torch.uint8),
                            want.contiguous().reshape(-1).view(torch.uint8)))


def run(node: Node, root: str) -> torch.Tensor:
    return materialize(node, root)


SPLITS = [
    # (split, source names, plain torch for rank t of tp)
    (Split.REPLICATED, ["x"], lambda s, tp, t: s[0]),
    (Split.REPLICATED, ["f"], lambda s, tp, t: s[0]),
    (Split.COLUMN, ["x"], lambda s, tp, t: torch.chunk(s[0], tp, 0)[t]),
    (Split.COLUMN, ["f"], lambda s, tp, t: torch.chunk(s[0], tp, 0)[t]),
    (Split.ROW, ["x"], lambda s, tp, t: torch.chunk(s[0], tp, 1)[t]),
    (Split.GATED_COLUMN, ["gate", "up"],
     lambda s, tp, t: torch.cat([torch.chunk(s[0], tp, 0)[t], torch.chunk(s[1], tp, 0)[t]], 0)),
    (Split.FUSED_ROWS, ["a", "b"], lambda s, tp, t: torch.cat([s[0], s[1]], 0)),
    (Split.FUSED_ROWS, ["a", "b", "a"], lambda s, tp, t: torch.cat([s[0], s[1], s[2]], 0)),
]


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("split, names, want", SPLITS,
                         ids=[f"{s[0].value}-{'+'.join(s[1])}" for s in SPLITS])
def test_split_matches_torch(data, split, names, want, tp):
    root, tensors, nodes = data
    src = [tensors[n] for n in names]
    for t in range(tp):
        node = apply_split(split, [nodes[n] for n in names], tp, t)
        assert same(run(node, root), want(src, tp, t)), (split, tp, t)


@pytest.mark.parametrize("split, dim", [(Split.COLUMN, 0), (Split.ROW, 1)])
def test_split_pieces_reassemble(data, split, dim):
    root, tensors, nodes = data
    pieces = [run(apply_split(split, [nodes["x"]], 4, t), root) for t in range(4)]
    assert same(torch.cat(pieces, dim), tensors["x"])
    assert not same(pieces[0], pieces[1])


def test_gated_column_is_not_a_plain_column_split(data):
    """Each rank holds its gate slice then its up slice: not a chunk of cat(gate, up)."""
    root, tensors, nodes = data
    got = run(apply_split(Split.GATED_COLUMN, [nodes["gate"], nodes["up"]], 2, 0), root)
    naive = torch.chunk(torch.cat([tensors["gate"], tensors["up"]], 0), 2, 0)[0]
    assert not same(got, naive)


@pytest.mark.parametrize("split, names, tp", [(Split.COLUMN, ["x"], 5), (Split.ROW, ["x"], 3),
                                              (Split.GATED_COLUMN, ["gate", "up"], 3)])
def test_uneven_split_raises(data, split, names, tp):
    _, _, nodes = data
    with pytest.raises(GraphError):
        apply_split(split, [nodes[n] for n in names], tp, 0)


@pytest.mark.parametrize("split, names", [(Split.COLUMN, ["x", "f"]), (Split.REPLICATED, []),
                                          (Split.GATED_COLUMN, ["gate"])])
def test_wrong_source_count_raises(data, split, names):
    _, _, nodes = data
    with pytest.raises((ValueError, GraphError)):
        apply_split(split, [nodes[n] for n in names], 1, 0)


def test_fused_rows_shape_mismatch_raises(data):
    _, _, nodes = data
    with pytest.raises(GraphError):
        apply_split(Split.FUSED_ROWS, [nodes["a"], nodes["x"]], 1, 0)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_grouped_weight1_is_expert_major(data, n):
    root, tensors, nodes = data
    fc1 = [tensors[f"fc1.{q}"] for q in range(n)]
    node = grouped_weight1([nodes[f"fc1.{q}"] for q in range(n)])
    assert node.shape == (H, n * C)
    w1 = run(node, root)
    assert w1.shape == (H, n * C)
    for q in range(n):
        assert same(w1.view(n, H, -1)[q], fc1[q].T)
    if n > 1:
        assert not same(w1, torch.cat([p.T for p in fc1], dim=1))


def test_grouped_weight1_with_tp_gated_pieces(data):
    """What the expert tables build: per expert, its TP slice of [gate; up], then the expert-major stack."""
    root, tensors, nodes = data
    tp, t, n = 2, 1, 3
    pairs = [(f"fc1.{q}", f"fc1.{q + 1}") for q in range(n)]      # (gate, up) of expert q: distinct data
    pieces = [apply_split(Split.GATED_COLUMN, [nodes[g], nodes[u]], tp, t) for g, u in pairs]
    w1 = run(grouped_weight1(pieces), root)
    plain = [torch.cat([torch.chunk(tensors[g], tp, 0)[t], torch.chunk(tensors[u], tp, 0)[t]], 0) for g, u in pairs]
    assert same(w1, torch.stack([p.T for p in plain]).reshape(H, -1))
    for q in range(n):
        assert same(w1.view(n, H, -1)[q], plain[q].T)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_grouped_weight2_is_cat_of_transposes(data, n):
    root, tensors, nodes = data
    fc2 = [tensors[f"fc2.{q}"] for q in range(n)]
    node = grouped_weight2([nodes[f"fc2.{q}"] for q in range(n)])
    assert node.shape == (n * F, H)
    w2 = run(node, root)
    assert same(w2, torch.cat([p.T for p in fc2], 0))
    for q in range(n):
        assert same(w2.view(n, -1, H)[q], fc2[q].T)


# --- the inverse rules (mcore -> HF) -----------------------------------------------------------------------------------

@pytest.mark.parametrize("split, names, tp", [
    (Split.REPLICATED, ("x",), 2), (Split.COLUMN, ("x",), 4), (Split.ROW, ("x",), 2),
    (Split.GATED_COLUMN, ("gate", "up"), 2), (Split.GATED_COLUMN, ("gate", "up"), 4),
    (Split.FUSED_ROWS, ("a", "b"), 2),
])
def test_merge_split_inverts_apply_split(data, split, names, tp):
    root, tensors, nodes = data
    pieces = [apply_split(split, [nodes[n] for n in names], tp, t) for t in range(tp)]
    merged = merge_split(split, pieces, tuple(tensors[n].shape[0] for n in names))
    assert len(merged) == len(names)
    for n, node in zip(names, merged):
        assert same(run(node, root), tensors[n]), n


def test_merge_head_parts_inverts_head_part(data):
    root, tensors, nodes = data
    heads, parts = 3, (2, 2)                 # x is [12, 8] = [3 heads * (2 + 2), 8]
    split = [head_part(nodes["x"], heads, parts, i) for i in range(len(parts))]
    assert same(run(merge_head_parts(split, heads), root), tensors["x"])


def test_ungroup_inverts_grouped_weights(data):
    root, tensors, nodes = data
    w1 = grouped_weight1([nodes[f"fc1.{q}"] for q in range(NE)])
    w2 = grouped_weight2([nodes[f"fc2.{q}"] for q in range(NE)])
    for q, (fc1, fc2) in enumerate(zip(ungroup_weight1(w1, NE), ungroup_weight2(w2, NE))):
        assert same(run(fc1, root), tensors[f"fc1.{q}"]) and same(run(fc2, root), tensors[f"fc2.{q}"])
