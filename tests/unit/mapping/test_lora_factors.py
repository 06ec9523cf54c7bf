"""streamconv.mapping.lora: ``split_factors`` places HF LoRA factors per TP rank as the table of spec §5.1 says
(checked against plain torch), ``gather_factors`` undoes it, and ``grouped_factors`` / ``gemm_expert_factors``
are each other's inverse on Megatron's grouped-GEMM memory layouts."""

import pytest
import torch

from streamconv.execute.kernels import materialize
from streamconv.mapping.lora import gather_factors, gemm_expert_factors, grouped_factors, split_factors, wrapped
from streamconv.mapping.rules import Row, Split, row
from tests.st_file import write_with_reads
from tests.unit.mapping.test_rows import NG, NH, D, qkv_plain  # the spec's GQA interleave, written out there

R, H = 2, 8    # LoRA rank, input width


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    g = torch.Generator().manual_seed(3)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(torch.bfloat16)

    tensors = {"a": rnd(R, H), "b": rnd(16, R), "b2": rnd(16, R), "bk": rnd(NG * D, R), "bv": rnd(NG * D, R),
               "bq": rnd(NH * D, R), "bparts": rnd(NH * 3, R)}
    for q in range(4):   # four experts: fc1 (gate+up rows 2*6) and fc2 (6 columns) factors
        tensors[f"a1_{q}"], tensors[f"b1_{q}"] = rnd(R, H), rnd(12, R)
        tensors[f"a2_{q}"], tensors[f"b2_{q}"] = rnd(R, 6), rnd(H, R)
    root = str(tmp_path_factory.mktemp("lora"))
    return root, tensors, write_with_reads(root, "f.safetensors", tensors)


def spec_table(rule: Row, a, bs, tp, t):
    """Spec §5.1, written out: rank t's (A, B) per target."""
    s = rule.split
    if s is Split.REPLICATED:
        return [(a, bs[0])]
    if s is Split.COLUMN:
        return [(a, torch.chunk(bs[0], tp, 0)[t])]
    if s is Split.ROW:
        return [(torch.chunk(a, tp, 1)[t], bs[0])]
    if s is Split.GATED_COLUMN:
        return [(a, torch.cat([torch.chunk(bs[0], tp, 0)[t], torch.chunk(bs[1], tp, 0)[t]], 0))]
    if s is Split.FUSED_ROWS:
        return [(a, torch.cat(bs, 0))]
    if s is Split.QKV_GROUPS:
        return [(a, qkv_plain(*bs, tp, t))]
    per_head = bs[0].view(NH, 3, R)                                   # HEAD_PARTS (2, 1)
    return [(a, torch.chunk(per_head[:, :2].reshape(-1, R), tp, 0)[t]),
            (a, torch.chunk(per_head[:, 2:].reshape(-1, R), tp, 0)[t])]


RULES = [(row("x", "w", Split.REPLICATED), ["b"]), (row("x", "w", Split.COLUMN), ["b"]),
         (row("x", "w", Split.ROW), ["b"]), (row("x", ("g", "u"), Split.GATED_COLUMN), ["b", "b2"]),
         (row("x", ("p", "q"), Split.FUSED_ROWS), ["b", "bk"]),
         (Row(("x",), ("q", "k", "v"), Split.QKV_GROUPS, NG, (NH // NG, D)), ["bq", "bk", "bv"]),
         (Row(("nope", "rope"), ("qb",), Split.HEAD_PARTS, NH, (2, 1)), ["bparts"])]


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("rule,bs", RULES, ids=[r.split.value for r, _ in RULES])
def test_split_factors_is_the_spec_table_and_gathers_back(data, rule, bs, tp):
    root, t, reads = data
    pairs = [(reads["a"], reads[b]) for b in bs]
    per_rank = [split_factors(rule, pairs, tp, rank) for rank in range(tp)]
    for rank, got in enumerate(per_rank):
        want = spec_table(rule, t["a"], [t[b] for b in bs], tp, rank)
        assert len(got) == len(want)
        for (ga, gb), (wa, wb) in zip(got, want):
            assert torch.equal(materialize(ga, root), wa) and torch.equal(materialize(gb, root), wb)
    if rule.split is Split.HEAD_PARTS:
        return   # one module per part: nothing to gather into a single HF pair
    rows = tuple(t[b].shape[0] for b in bs)
    back = gather_factors(rule, [p[0][0] for p in per_rank], [p[0][1] for p in per_rank], rows)
    for (ga, gb), b in zip(back, bs):
        assert torch.equal(materialize(ga, root), t["a"]) and torch.equal(materialize(gb, root), t[b])


def test_fused_sources_with_different_a_are_refused(data):
    _, _, reads = data
    with pytest.raises(ValueError, match="different LoRA A"):
        split_factors(row("x", ("g", "u"), Split.GATED_COLUMN),
                      [(reads["a"], reads["b"]), (reads["a1_0"], reads["b2"])], 1, 0)


@pytest.mark.parametrize("which", [1, 2])
def test_grouped_factors_are_megatrons_memory_layout_and_ungroup_back(data, which):
    root, t, reads = data
    pairs = [(reads[f"a{which}_{q}"], reads[f"b{which}_{q}"]) for q in range(4)]
    lora_a, lora_b = grouped_factors(pairs, which)
    a_q = [t[f"a{which}_{q}"].T for q in range(4)]      # expert q's delta is a_q @ b_q ([in, out])
    b_q = [t[f"b{which}_{q}"].T for q in range(4)]
    got_a, got_b = materialize(lora_a, root), materialize(lora_b, root)
    if which == 1:   # weight1_lora_a [H, r*n] with memory [n, H, r]; weight1_lora_b [r, n*C] with memory [n, r, C]
        assert got_a.shape == (H, R * 4) and torch.equal(got_a.reshape(4, H, R), torch.stack(a_q))
        assert got_b.shape == (R, 4 * 12) and torch.equal(got_b.reshape(4, R, 12), torch.stack(b_q))
    else:            # weight2_lora_a [n*F, r]; weight2_lora_b [r*n, H]
        assert torch.equal(got_a, torch.cat(a_q, 0)) and torch.equal(got_b, torch.cat(b_q, 0))
    for (ga, gb), (wa, wb) in zip(gemm_expert_factors(lora_a, lora_b, 4, which), pairs):
        assert torch.equal(materialize(ga, root), materialize(wa, root))
        assert torch.equal(materialize(gb, root), materialize(wb, root))


def test_wrapped_names(data):
    _, _, reads = data
    a, b = reads["a"], reads["b"]
    assert [n for n, _ in wrapped("decoder.layers.0.self_attention.linear_proj.weight", b, a, b)] == [
        "decoder.layers.0.self_attention.linear_proj.base_layer.weight",
        "decoder.layers.0.self_attention.linear_proj.lora_A.default.weight",
        "decoder.layers.0.self_attention.linear_proj.lora_B.default.weight"]
    assert [n for n, _ in wrapped("decoder.layers.1.mlp.experts.weight2", b, a, b)] == [
        "decoder.layers.1.mlp.experts.weight2", "decoder.layers.1.mlp.experts.weight2_lora_a",
        "decoder.layers.1.mlp.experts.weight2_lora_b"]
