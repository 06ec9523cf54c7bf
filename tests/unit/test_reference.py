"""Checks of the eager reference converter (tests/reference.py) against the spec, on tiny checkpoints.

The reference is the oracle for the streaming converter, so it is itself checked here from a second
angle: per-rank shapes follow the Appendix A formulas, TP pieces put back together restore the HF
tensors, the grouped-GEMM buffers have the Megatron view semantics, EP covers every expert once, MTP
lands on the last stage, FP8 dequantization matches the per-element rule, and bad sizes raise.
Layer placement (noop layers, num-layer-list, VPP, dualpipev) is checked against the worked examples of
spec 4.3-4.5 and end to end on the tiny checkpoint.
"""

import json
import math
import os
import re
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.hf_tiny import build_tiny_hf, tiny_config
from tests.reference import (
    assert_same_checkpoint,
    load_hf,
    load_mcore_dir,
    reference_final_chunk,
    reference_hf_to_mcore,
    reference_placement,
)

ITER = "iter_0000001"


# --------------------------------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_bf16")
    build_tiny_hf(path)
    return str(path)


@pytest.fixture(scope="module")
def hf(bf16_dir):
    return load_hf(bf16_dir)


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_fp8")
    build_tiny_hf(path, fp8=True)
    return str(path)


@pytest.fixture(scope="module")
def special_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_special")
    build_tiny_hf(path, special_values=True, seed=1)
    return str(path)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def rank_path(name):
    return f"{ITER}/{name}/model_optim_rng.pt"


def state(out, name):
    return out[rank_path(name)]["model"]


def same(actual, expected):
    """Byte equality with dtype and shape (NaN-safe)."""
    def raw(t):
        return t.contiguous().view(-1).view(torch.uint8)

    return actual.dtype == expected.dtype and actual.shape == expected.shape and torch.equal(raw(actual), raw(expected))


def halves(x):
    return torch.chunk(x, 2, 0)


def block_loop_dequant(w, s):
    """Second, independent form of spec 1.4: loop over 128x128 blocks, edge blocks partial."""
    out = torch.empty(w.shape, dtype=torch.bfloat16)
    for bi in range(s.shape[0]):
        for bj in range(s.shape[1]):
            rows = slice(bi * 128, (bi + 1) * 128)
            cols = slice(bj * 128, (bj + 1) * 128)
            out[rows, cols] = (w[rows, cols].to(torch.float32) * s[bi, bj].item()).to(torch.bfloat16)
    return out


# --------------------------------------------------------------------------------------------------
# Appendix A shape formulas


def appendix_a_shapes(c, tp, ep):
    h, v, nh = c["hidden_size"], c["vocab_size"], c["num_attention_heads"]
    dn, dr, dv = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    rq, rkv = c["q_lora_rank"], c["kv_lora_rank"]
    f, fm, e = c["intermediate_size"], c["moe_intermediate_size"], c["n_routed_experts"]
    fs = fm * c["n_shared_experts"]
    n = e // ep
    return {
        "embedding": (v // tp, h),
        "output_layer": (v // tp, h),
        "linear_qkv": (rq + rkv + dr, h),
        "q_layernorm": (rq,),
        "kv_layernorm": (rkv,),
        "linear_q_up_proj": (nh * (dn + dr) // tp, rq),
        "linear_kv_up_proj": (nh * (dn + dv) // tp, rkv),
        "linear_proj": (h, nh * dv // tp),
        "dense_fc1": (2 * f // tp, h),
        "dense_fc2": (h, f // tp),
        "router": (e, h),
        "expert_bias": (e,),
        "shared_fc1": (2 * fs // tp, h),
        "shared_fc2": (h, fs // tp),
        "weight1": (h, n * 2 * fm // tp),
        "weight2": (n * fm // tp, h),
        "local_fc1": (2 * fm // tp, h),
        "local_fc2": (h, fm // tp),
        "eh_proj": (h // tp, 2 * h),
        "hidden_norm": (h,),
    }


ROLE_PATTERNS = [
    (r"^embedding\.word_embeddings\.weight$", "embedding"),
    (r"^output_layer\.weight$", "output_layer"),
    (r"\.self_attention\.linear_qkv\.weight$", "linear_qkv"),
    (r"\.self_attention\.q_layernorm\.weight$", "q_layernorm"),
    (r"\.self_attention\.kv_layernorm\.weight$", "kv_layernorm"),
    (r"\.self_attention\.linear_q_up_proj\.weight$", "linear_q_up_proj"),
    (r"\.self_attention\.linear_kv_up_proj\.weight$", "linear_kv_up_proj"),
    (r"\.self_attention\.linear_proj\.weight$", "linear_proj"),
    (r"\.mlp\.linear_fc1\.weight$", "dense_fc1"),
    (r"\.mlp\.linear_fc2\.weight$", "dense_fc2"),
    (r"\.mlp\.router\.weight$", "router"),
    (r"\.mlp\.router\.expert_bias$", "expert_bias"),
    (r"\.mlp\.shared_experts\.linear_fc1\.weight$", "shared_fc1"),
    (r"\.mlp\.shared_experts\.linear_fc2\.weight$", "shared_fc2"),
    (r"\.mlp\.experts\.weight1$", "weight1"),
    (r"\.mlp\.experts\.weight2$", "weight2"),
    (r"\.mlp\.experts\.local_experts\.\d+\.linear_fc1\.weight$", "local_fc1"),
    (r"\.mlp\.experts\.local_experts\.\d+\.linear_fc2\.weight$", "local_fc2"),
    (r"^mtp\.layers\.\d+\.eh_proj\.weight$", "eh_proj"),
    (
        r"(\.input_layernorm|\.pre_mlp_layernorm|final_layernorm|\.enorm|\.hnorm|"
        r"^mtp\.final_layernorms\.\d+)\.weight$",
        "hidden_norm",
    ),
]


def role(key):
    for pattern, name in ROLE_PATTERNS:
        if re.search(pattern, key):
            return name
    raise AssertionError(f"unexpected key {key}")


def test_appendix_a_formulas_match_the_table_for_671b():
    c = tiny_config(
        hidden_size=7168, vocab_size=129280, intermediate_size=18432, moe_intermediate_size=2048,
        n_routed_experts=256, num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
    )
    s = appendix_a_shapes(c, tp=2, ep=32)
    assert s["embedding"] == (64640, 7168)
    assert s["linear_qkv"] == (2112, 7168)
    assert (s["q_layernorm"], s["kv_layernorm"]) == ((1536,), (512,))
    assert s["linear_q_up_proj"] == (12288, 1536)
    assert s["linear_kv_up_proj"] == (16384, 512)
    assert s["linear_proj"] == (7168, 8192)
    assert (s["dense_fc1"], s["dense_fc2"]) == ((18432, 7168), (7168, 9216))
    assert (s["router"], s["expert_bias"]) == ((256, 7168), (256,))
    assert (s["shared_fc1"], s["shared_fc2"]) == ((2048, 7168), (7168, 1024))
    assert (s["weight1"], s["weight2"]) == ((7168, 16384), (8192, 7168))
    assert s["eh_proj"] == (3584, 14336)
    s1 = appendix_a_shapes(c, tp=1, ep=32)
    assert (s1["weight1"], s1["weight2"]) == ((7168, 32768), (16384, 7168))


@pytest.mark.parametrize("gemm", [False, True])
@pytest.mark.parametrize("tp,pp,ep", [(1, 1, 1), (2, 1, 2), (4, 2, 1), (2, 2, 4), (1, 4, 8)])
def test_per_rank_shapes_and_dtypes_follow_appendix_a(bf16_dir, tp, pp, ep, gemm):
    config = read_json(os.path.join(bf16_dir, "config.json"))
    shapes = appendix_a_shapes(config, tp, ep)
    out = reference_hf_to_mcore(bf16_dir, tp=tp, pp=pp, ep=ep, moe_grouped_gemm=gemm, mtp_num_layers=1)
    assert len(out) == 1 + tp * pp * ep
    for path, obj in out.items():
        if path.endswith(".txt"):
            continue
        for key, tensor in obj["model"].items():
            r = role(key)
            assert tuple(tensor.shape) == shapes[r], key
            want = torch.float32 if r == "expert_bias" else torch.bfloat16
            assert tensor.dtype == want, key
            assert tensor.is_contiguous(), key


# --------------------------------------------------------------------------------------------------
# files, key sets, placement


@pytest.mark.parametrize(
    "tp,pp,ep,dirs",
    [
        (1, 1, 1, ["mp_rank_00"]),
        (2, 1, 1, ["mp_rank_00", "mp_rank_01"]),
        (1, 2, 1, ["mp_rank_00_000", "mp_rank_00_001"]),
        (1, 1, 2, ["mp_rank_00_000", "mp_rank_00_001"]),
        (2, 2, 2, [f"mp_rank_{t:02d}_{p:03d}_{e:03d}" for t in range(2) for p in range(2) for e in range(2)]),
    ],
)
def test_file_set_and_top_level(bf16_dir, tp, pp, ep, dirs):
    out = reference_hf_to_mcore(bf16_dir, tp=tp, pp=pp, ep=ep)
    assert set(out) == {"latest_checkpointed_iteration.txt"} | {rank_path(d) for d in dirs}
    assert out["latest_checkpointed_iteration.txt"] == b"1"
    for d in dirs:
        obj = out[rank_path(d)]
        assert set(obj) == {"model", "checkpoint_version", "iteration"}
        assert type(obj["checkpoint_version"]) is float and obj["checkpoint_version"] == 3.0
        assert type(obj["iteration"]) is int and obj["iteration"] == 1
        assert isinstance(obj["model"], OrderedDict)


def _attn_mlp_keys(prefix, dense, n_local=None, gemm=True):
    keys = [prefix + k for k in (
        "input_layernorm.weight",
        "self_attention.linear_qkv.weight",
        "self_attention.q_layernorm.weight",
        "self_attention.kv_layernorm.weight",
        "self_attention.linear_q_up_proj.weight",
        "self_attention.linear_kv_up_proj.weight",
        "self_attention.linear_proj.weight",
        "pre_mlp_layernorm.weight",
    )]
    if dense:
        return keys + [prefix + "mlp.linear_fc1.weight", prefix + "mlp.linear_fc2.weight"]
    keys += [prefix + k for k in (
        "mlp.router.weight",
        "mlp.router.expert_bias",
        "mlp.shared_experts.linear_fc1.weight",
        "mlp.shared_experts.linear_fc2.weight",
    )]
    if gemm:
        return keys + [prefix + "mlp.experts.weight1", prefix + "mlp.experts.weight2"]
    for q in range(n_local):
        keys += [prefix + f"mlp.experts.local_experts.{q}.linear_fc1.weight",
                 prefix + f"mlp.experts.local_experts.{q}.linear_fc2.weight"]
    return keys


def test_exact_key_lists_pp2_ep2_gemm_mtp(bf16_dir):
    out = reference_hf_to_mcore(bf16_dir, pp=2, ep=2, moe_grouped_gemm=True, mtp_num_layers=1)
    stage0 = (["embedding.word_embeddings.weight"]
              + _attn_mlp_keys("decoder.layers.0.", dense=True)
              + _attn_mlp_keys("decoder.layers.1.", dense=False))
    stage1 = (["embedding.word_embeddings.weight"]
              + _attn_mlp_keys("decoder.layers.0.", dense=False)
              + _attn_mlp_keys("decoder.layers.1.", dense=False)
              + ["final_layernorm.weight", "output_layer.weight",
                 "mtp.layers.0.enorm.weight", "mtp.layers.0.hnorm.weight", "mtp.layers.0.eh_proj.weight"]
              + _attn_mlp_keys("mtp.layers.0.transformer_layer.", dense=False)
              + ["mtp.final_layernorms.0.weight"])
    for e in range(2):
        assert list(state(out, f"mp_rank_00_000_{e:03d}")) == stage0
        assert list(state(out, f"mp_rank_00_001_{e:03d}")) == stage1


def test_exact_key_list_local_experts_no_mtp(bf16_dir):
    out = reference_hf_to_mcore(bf16_dir, ep=4)
    want = ["embedding.word_embeddings.weight"] + _attn_mlp_keys("decoder.layers.0.", dense=True)
    for layer in (1, 2, 3):
        want += _attn_mlp_keys(f"decoder.layers.{layer}.", dense=False, n_local=2, gemm=False)
    want += ["decoder.final_layernorm.weight", "output_layer.weight"]
    assert list(state(out, "mp_rank_00_003")) == want


@pytest.mark.parametrize("pp", [1, 2, 4])
def test_pp_stages_restart_local_indices(bf16_dir, hf, pp):
    _, w = hf
    out = reference_hf_to_mcore(bf16_dir, pp=pp)
    per = 4 // pp
    for p in range(pp):
        name = "mp_rank_00" if pp == 1 else f"mp_rank_00_{p:03d}"
        sd = state(out, name)
        layers = sorted({int(k.split(".")[2]) for k in sd if k.startswith("decoder.layers.")})
        assert layers == list(range(per))
        for local in range(per):
            g = p * per + local
            assert same(sd[f"decoder.layers.{local}.input_layernorm.weight"],
                        w[f"model.layers.{g}.input_layernorm.weight"])
            assert same(sd[f"decoder.layers.{local}.pre_mlp_layernorm.weight"],
                        w[f"model.layers.{g}.post_attention_layernorm.weight"])
            assert (f"decoder.layers.{local}.mlp.linear_fc1.weight" in sd) == (g < 1)
        assert ("embedding.word_embeddings.weight" in sd) == (p == 0)
        assert ("output_layer.weight" in sd) == ("decoder.final_layernorm.weight" in sd) == (p == pp - 1)


@pytest.mark.parametrize("pp", [1, 2])
def test_mtp_placement_and_sources(bf16_dir, hf, pp):
    _, w = hf
    out = reference_hf_to_mcore(bf16_dir, tp=2, pp=pp, mtp_num_layers=1)
    last = "mp_rank_{t:02d}" if pp == 1 else "mp_rank_{t:02d}_001"
    if pp == 2:
        for t in range(2):
            first = state(out, f"mp_rank_{t:02d}_000")
            assert not any(k.startswith("mtp.") or "final_layernorm" in k for k in first)
    for t in range(2):
        sd = state(out, last.format(t=t))
        assert "decoder.final_layernorm.weight" not in sd
        assert same(sd["final_layernorm.weight"], w["model.norm.weight"])
        assert same(sd["output_layer.weight"], torch.chunk(w["lm_head.weight"], 2, 0)[t])
        # MTP module 0 is HF layer num_hidden_layers + 0 = 4 (not 61)
        src = "model.layers.4."
        assert same(sd["mtp.layers.0.enorm.weight"], w[src + "enorm.weight"])
        assert same(sd["mtp.layers.0.hnorm.weight"], w[src + "hnorm.weight"])
        assert same(sd["mtp.layers.0.eh_proj.weight"], torch.chunk(w[src + "eh_proj.weight"], 2, 0)[t])
        assert same(sd["mtp.final_layernorms.0.weight"], w[src + "shared_head.norm.weight"])
        assert same(sd["mtp.layers.0.transformer_layer.input_layernorm.weight"], w[src + "input_layernorm.weight"])
        assert same(sd["mtp.layers.0.transformer_layer.mlp.router.expert_bias"],
                    w[src + "mlp.gate.e_score_correction_bias"])
        main_chunk = torch.chunk(w["model.embed_tokens.weight"], 2, 0)[t]
        mtp_chunk = torch.chunk(w[src + "embed_tokens.weight"], 2, 0)[t]
        assert same(sd["embedding.word_embeddings.weight"], main_chunk if pp == 1 else mtp_chunk)
        assert not any("shared_head" in k or k.startswith("mtp_layers") for k in sd)


def test_mtp_source_ignores_num_layers_truncation(bf16_dir, hf):
    _, w = hf
    out = reference_hf_to_mcore(bf16_dir, num_layers=2, mtp_num_layers=1)
    sd = state(out, "mp_rank_00")
    assert sorted({k.split(".")[2] for k in sd if k.startswith("decoder.layers.")}) == ["0", "1"]
    assert same(sd["mtp.layers.0.transformer_layer.input_layernorm.weight"], w["model.layers.4.input_layernorm.weight"])


def test_no_mtp_means_decoder_final_norm_and_no_mtp_keys(bf16_dir):
    out = reference_hf_to_mcore(bf16_dir, pp=2, mtp_num_layers=0)
    sd = state(out, "mp_rank_00_001")
    assert "decoder.final_layernorm.weight" in sd and "final_layernorm.weight" not in sd
    assert "embedding.word_embeddings.weight" not in sd
    assert not any(k.startswith("mtp.") for k in sd)


def test_first_k_dense_replace_remap(tmp_path):
    build_tiny_hf(tmp_path, first_k_dense_replace=2)
    _, w = load_hf(str(tmp_path))

    def hf_source(sd, local):
        norm = sd[f"decoder.layers.{local}.input_layernorm.weight"]
        for i in range(4):
            if same(norm, w[f"model.layers.{i}.input_layernorm.weight"]):
                return i
        raise AssertionError("no source")

    def is_dense(sd, local):
        return f"decoder.layers.{local}.mlp.linear_fc1.weight" in sd

    sd = state(reference_hf_to_mcore(str(tmp_path), first_k_dense_replace=1, num_layers=3), "mp_rank_00")
    assert [hf_source(sd, l) for l in range(3)] == [0, 2, 3]
    assert [is_dense(sd, l) for l in range(3)] == [True, False, False]
    sd = state(reference_hf_to_mcore(str(tmp_path), first_k_dense_replace=0, num_layers=2), "mp_rank_00")
    assert [hf_source(sd, l) for l in range(2)] == [2, 3]
    assert [is_dense(sd, l) for l in range(2)] == [False, False]
    sd = state(reference_hf_to_mcore(str(tmp_path)), "mp_rank_00")
    assert [hf_source(sd, l) for l in range(4)] == [0, 1, 2, 3]
    assert [is_dense(sd, l) for l in range(4)] == [True, True, False, False]
    with pytest.raises(ValueError, match="first_k_dense_replace"):
        reference_hf_to_mcore(str(tmp_path), first_k_dense_replace=1, num_layers=4)


# --------------------------------------------------------------------------------------------------
# TP pieces restore the HF tensors


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_pieces_restore_hf_tensors(bf16_dir, hf, tp):
    _, w = hf
    out = reference_hf_to_mcore(bf16_dir, tp=tp, mtp_num_layers=1)
    sds = [state(out, f"mp_rank_{t:02d}") for t in range(tp)]

    def cat(key, dim):
        return torch.cat([sd[key] for sd in sds], dim)

    def gated(key):
        gates, ups = zip(*(halves(sd[key]) for sd in sds))
        return torch.cat(gates, 0), torch.cat(ups, 0)

    assert same(cat("embedding.word_embeddings.weight", 0), w["model.embed_tokens.weight"])
    assert same(cat("output_layer.weight", 0), w["lm_head.weight"])
    assert same(cat("mtp.layers.0.eh_proj.weight", 0), w["model.layers.4.eh_proj.weight"])
    rq = 48
    for prefix, i in [(f"decoder.layers.{i}.", i) for i in range(4)] + [("mtp.layers.0.transformer_layer.", 4)]:
        src = f"model.layers.{i}."
        a = prefix + "self_attention."
        for sd in sds:  # replicated (LinearNoTP), split at Rq into q_a / kv_a
            assert same(sd[a + "linear_qkv.weight"][:rq], w[src + "self_attn.q_a_proj.weight"])
            assert same(sd[a + "linear_qkv.weight"][rq:], w[src + "self_attn.kv_a_proj_with_mqa.weight"])
            assert same(sd[a + "q_layernorm.weight"], w[src + "self_attn.q_a_layernorm.weight"])
            assert same(sd[a + "kv_layernorm.weight"], w[src + "self_attn.kv_a_layernorm.weight"])
        assert same(cat(a + "linear_q_up_proj.weight", 0), w[src + "self_attn.q_b_proj.weight"])
        assert same(cat(a + "linear_kv_up_proj.weight", 0), w[src + "self_attn.kv_b_proj.weight"])
        assert same(cat(a + "linear_proj.weight", 1), w[src + "self_attn.o_proj.weight"])
        m = prefix + "mlp."
        if i == 0:
            gate, up = gated(m + "linear_fc1.weight")
            assert same(gate, w[src + "mlp.gate_proj.weight"]) and same(up, w[src + "mlp.up_proj.weight"])
            assert same(cat(m + "linear_fc2.weight", 1), w[src + "mlp.down_proj.weight"])
            continue
        for sd in sds:
            assert same(sd[m + "router.weight"], w[src + "mlp.gate.weight"])
            assert same(sd[m + "router.expert_bias"], w[src + "mlp.gate.e_score_correction_bias"])
        gate, up = gated(m + "shared_experts.linear_fc1.weight")
        assert same(gate, w[src + "mlp.shared_experts.gate_proj.weight"])
        assert same(up, w[src + "mlp.shared_experts.up_proj.weight"])
        assert same(cat(m + "shared_experts.linear_fc2.weight", 1), w[src + "mlp.shared_experts.down_proj.weight"])
        for j in range(8):
            gate, up = gated(m + f"experts.local_experts.{j}.linear_fc1.weight")
            assert same(gate, w[src + f"mlp.experts.{j}.gate_proj.weight"])
            assert same(up, w[src + f"mlp.experts.{j}.up_proj.weight"])
            assert same(cat(m + f"experts.local_experts.{j}.linear_fc2.weight", 1),
                        w[src + f"mlp.experts.{j}.down_proj.weight"])


def test_tp_interleave_is_not_plain_chunk(bf16_dir, hf):
    """Rank 0's fc1 is [gate_0; up_0], not the first half of [gate; up] (spec 3.5, 10.5)."""
    _, w = hf
    sd = state(reference_hf_to_mcore(bf16_dir, tp=2), "mp_rank_00")
    fc1 = sd["decoder.layers.0.mlp.linear_fc1.weight"]
    assert same(fc1[:48], w["model.layers.0.mlp.gate_proj.weight"][:48])
    assert same(fc1[48:], w["model.layers.0.mlp.up_proj.weight"][:48])


# --------------------------------------------------------------------------------------------------
# grouped GEMM memory layout and EP


@pytest.mark.parametrize("tp,ep", [(1, 1), (2, 2), (1, 4), (2, 8)])
def test_weight1_weight2_view_semantics(bf16_dir, hf, tp, ep):
    _, w = hf
    h, fm, n = 64, 32, 8 // ep
    gemm = reference_hf_to_mcore(bf16_dir, tp=tp, ep=ep, moe_grouped_gemm=True)
    local = reference_hf_to_mcore(bf16_dir, tp=tp, ep=ep, moe_grouped_gemm=False)
    for t in range(tp):
        for e in range(ep):
            name = f"mp_rank_{t:02d}" + (f"_{e:03d}" if ep > 1 else "")
            sd, sd_local = state(gemm, name), state(local, name)
            for layer in (1, 2, 3):
                p = f"decoder.layers.{layer}.mlp.experts."
                w1, w2 = sd[p + "weight1"], sd[p + "weight2"]
                c = 2 * fm // tp
                flat = w1.view(-1)
                for q in range(n):
                    j = e * n + q
                    src = f"model.layers.{layer}.mlp.experts.{j}."
                    gate = torch.chunk(w[src + "gate_proj.weight"], tp, 0)[t]
                    up = torch.chunk(w[src + "up_proj.weight"], tp, 0)[t]
                    down = torch.chunk(w[src + "down_proj.weight"], tp, 1)[t]
                    w1_q = torch.cat([gate, up], 0).t()
                    assert same(w1.view(n, h, -1)[q], w1_q)
                    assert same(w2.view(n, -1, h)[q], down.t())
                    assert same(w1.view(n, h, -1)[q], sd_local[p + f"local_experts.{q}.linear_fc1.weight"].t())
                    # closed form: flat index ((q*H + h)*C + c) holds W1_q[h, c]
                    for hh, cc in ((0, 0), (h - 1, c // 2 - 1), (h // 2, c // 2), (3, c - 1)):
                        assert same(flat[(q * h + hh) * c + cc], w1_q[hh, cc])
                if n > 1:  # the naive column concatenation is a different memory order
                    naive = torch.cat([w1.view(n, h, -1)[q] for q in range(n)], 1)
                    assert not same(w1, naive)


@pytest.mark.parametrize("gemm", [False, True])
@pytest.mark.parametrize("ep", [1, 2, 4, 8])
def test_ep_union_covers_every_expert_once(bf16_dir, hf, ep, gemm):
    _, w = hf
    n = 8 // ep
    out = reference_hf_to_mcore(bf16_dir, ep=ep, moe_grouped_gemm=gemm, mtp_num_layers=1)
    names = ["mp_rank_00"] if ep == 1 else [f"mp_rank_00_{e:03d}" for e in range(ep)]
    for prefix, layer in [("decoder.layers.3.", 3), ("mtp.layers.0.transformer_layer.", 4)]:
        experts = {j: w[f"model.layers.{layer}.mlp.experts.{j}.down_proj.weight"] for j in range(8)}
        seen = []
        for e, name in enumerate(names):
            sd = state(out, name)
            for q in range(n):
                if gemm:
                    down = sd[prefix + "mlp.experts.weight2"].view(n, -1, 64)[q].t()
                else:
                    down = sd[prefix + f"mlp.experts.local_experts.{q}.linear_fc2.weight"]
                found = [j for j, x in experts.items() if same(down, x)]
                assert found == [e * n + q]  # contiguous blocks, local renumbering
                seen += found
        assert sorted(seen) == list(range(8))
    # every non-expert tensor is identical on all EP ranks
    ref = state(out, names[0])
    for name in names[1:]:
        sd = state(out, name)
        common = [k for k in ref if ".experts." not in k]
        assert common == [k for k in sd if ".experts." not in k]
        assert all(same(sd[k], ref[k]) for k in common)


def test_tensors_own_their_storage(bf16_dir):
    out = reference_hf_to_mcore(bf16_dir, tp=2, ep=2, moe_grouped_gemm=True, mtp_num_layers=1)
    pointers = set()
    for path, obj in out.items():
        if path.endswith(".txt"):
            continue
        for key, tensor in obj["model"].items():
            storage = tensor.untyped_storage()
            assert storage.nbytes() == tensor.numel() * tensor.element_size(), key
            assert storage.data_ptr() not in pointers, key
            pointers.add(storage.data_ptr())


# --------------------------------------------------------------------------------------------------
# FP8


def _write_single(path, tensors, with_index):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({}, f)
    if with_index:
        names = sorted(tensors)
        first = {k: tensors[k] for k in names[::2]}
        second = {k: tensors[k] for k in names[1::2]}  # weight and scale in different shards
        save_file(first, os.path.join(path, "a.safetensors"))
        save_file(second, os.path.join(path, "b.safetensors"))
        weight_map = {**{k: "a.safetensors" for k in first}, **{k: "b.safetensors" for k in second}}
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
    else:
        save_file(tensors, os.path.join(path, "model.safetensors"))


@pytest.mark.parametrize("with_index", [False, True])
def test_fp8_dequant_hand_made_blocks(tmp_path, with_index):
    gen = torch.Generator().manual_seed(3)
    w = (torch.randn(130, 260, generator=gen) * 4).to(torch.float8_e4m3fn)  # blocks [2, 3], edges 2 rows / 4 cols
    s = torch.rand(2, 3, generator=gen) + 0.5
    # hand-checked corner in the partial edge block (row 129, col 259 -> block (1, 2)):
    w[129, 259] = 1.0
    w[129, 258] = 1.0
    w[0, 0] = 1.5
    s[1, 2] = 1.0 + 2.0**-8 + 2.0**-20  # bf16 round-to-nearest-even: above the halfway point -> 1 + 2^-7
    s[0, 0] = 0.25
    bias = torch.randn(7, generator=gen)
    plain = torch.randn(3, 5, generator=gen).to(torch.bfloat16)
    _write_single(tmp_path, {"x.weight": w, "x.weight_scale_inv": s, "bias": bias, "plain": plain}, with_index)

    config, tensors = load_hf(str(tmp_path))
    assert config == {}
    assert set(tensors) == {"x.weight", "bias", "plain"}
    x = tensors["x.weight"]
    assert x.dtype == torch.bfloat16 and x.shape == (130, 260)
    assert same(x, block_loop_dequant(w, s))
    assert x[129, 259].item() == 1.0 + 2.0**-7
    assert x[0, 0].item() == 0.375
    # per-element rule on a sample of positions across every block
    for r in (0, 127, 128, 129):
        for c in (0, 127, 128, 255, 256, 259):
            want = (w[r, c].to(torch.float32) * s[r // 128, c // 128]).to(torch.bfloat16)
            assert same(x[r, c], want)
    assert same(tensors["bias"], bias) and same(tensors["plain"], plain)


def test_fp8_round_to_nearest_even_at_the_halfway_point(tmp_path):
    w = torch.ones(1, 1).to(torch.float8_e4m3fn)
    s = torch.tensor([[1.0 + 2.0**-8]])  # exactly halfway between bf16 1.0 and 1 + 2^-7: ties to even
    _write_single(tmp_path, {"w": w, "w_scale_inv": s}, with_index=False)
    assert load_hf(str(tmp_path))[1]["w"].item() == 1.0


def test_fp8_tiny_model_loads_and_converts(fp8_dir):
    raw = {}
    index = read_json(os.path.join(fp8_dir, "model.safetensors.index.json"))["weight_map"]
    for file_name in sorted(set(index.values())):
        raw.update(load_file(os.path.join(fp8_dir, file_name)))
    config, w = load_hf(fp8_dir)
    assert "quantization_config" in config
    scaled = [k for k in raw if k.endswith("_scale_inv")]
    assert scaled and not any(k.endswith("_scale_inv") for k in w)
    assert set(w) == set(raw) - set(scaled)
    edge = 0
    for k in scaled:
        name = k[: -len("_scale_inv")]
        assert raw[name].dtype == torch.float8_e4m3fn
        assert same(w[name], block_loop_dequant(raw[name], raw[k]))
        m, n = raw[name].shape
        edge += (m % 128 != 0 and m > 128) or (n % 128 != 0 and n > 128)
    assert edge > 0  # partial edge blocks next to full ones are exercised
    for name, tensor in w.items():
        if name + "_scale_inv" not in raw:
            assert same(tensor, raw[name])
    out = reference_hf_to_mcore(fp8_dir, tp=2, ep=2, moe_grouped_gemm=True, mtp_num_layers=1)
    sd = state(out, "mp_rank_01_001")
    assert sd["decoder.layers.1.mlp.router.expert_bias"].dtype == torch.float32
    assert all(t.dtype == torch.bfloat16 for k, t in sd.items() if not k.endswith("expert_bias"))
    q_a = w["model.layers.0.self_attn.q_a_proj.weight"]
    assert same(sd["decoder.layers.0.self_attention.linear_qkv.weight"][: q_a.shape[0]], q_a)


# --------------------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"tp": 3}, "num_attention_heads"),
        ({"tp": 8}, "num_attention_heads"),
        ({"tp": 0}, "tp"),
        ({"ep": 3}, "n_routed_experts"),
        ({"ep": 16}, "n_routed_experts"),
        ({"pp": 3}, "num_layers"),
        ({"mtp_num_layers": 2}, "mtp_num_layers"),
        ({"mtp_num_layers": -1}, "mtp_num_layers"),
        ({"num_layers": 5}, "num_layers"),
        ({"num_layers": 0}, "num_layers"),
        ({"num_layers": 2, "pp": 4}, "num_layers"),
        ({"first_k_dense_replace": 2}, "first_k_dense_replace"),
    ],
)
def test_validation_errors(bf16_dir, kwargs, match):
    with pytest.raises(ValueError, match=match):
        reference_hf_to_mcore(bf16_dir, **kwargs)


@pytest.mark.parametrize(
    "overrides,kwargs,match",
    [
        ({"vocab_size": 250}, {"tp": 4}, "vocab_size"),
        ({"intermediate_size": 90}, {"tp": 4}, "intermediate_size"),
        ({"moe_intermediate_size": 30}, {"tp": 4}, "moe_intermediate_size"),
        ({"hidden_size": 66}, {"tp": 4, "mtp_num_layers": 1}, "hidden_size"),
    ],
)
def test_validation_errors_by_tp(tmp_path, overrides, kwargs, match):
    build_tiny_hf(tmp_path, num_shards=1, **overrides)
    reference_hf_to_mcore(str(tmp_path), tp=2)  # fine at TP 2
    with pytest.raises(ValueError, match=match):
        reference_hf_to_mcore(str(tmp_path), **kwargs)


def test_checkpoint_not_matching_config_is_rejected(tmp_path):
    build_tiny_hf(tmp_path, num_shards=1)
    config_path = tmp_path / "config.json"
    config = json.loads(config_path.read_text())
    config["q_lora_rank"] = 40
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="q_a_proj"):
        reference_hf_to_mcore(str(tmp_path))


# --------------------------------------------------------------------------------------------------
# load_mcore_dir and assert_same_checkpoint


def _write(out, save_dir):
    for path, obj in out.items():
        full = os.path.join(save_dir, path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        if isinstance(obj, bytes):
            with open(full, "wb") as f:
                f.write(obj)
        else:
            torch.save(obj, full)


def _copy(out):
    return {
        p: v if isinstance(v, bytes) else {**v, "model": OrderedDict((k, t.clone()) for k, t in v["model"].items())}
        for p, v in out.items()
    }


@pytest.fixture(scope="module")
def written(special_dir, tmp_path_factory):
    out = reference_hf_to_mcore(special_dir, tp=2, ep=2, moe_grouped_gemm=True, mtp_num_layers=1)
    save_dir = tmp_path_factory.mktemp("mcore")
    _write(out, str(save_dir))
    return out, str(save_dir)


def test_written_checkpoint_loads_back_identical(written):
    out, save_dir = written
    loaded = load_mcore_dir(save_dir)
    assert loaded["latest_checkpointed_iteration.txt"] == b"1"
    assert_same_checkpoint(loaded, out)
    assert_same_checkpoint(loaded, out, check_order=True)
    emb = loaded[rank_path("mp_rank_00_000")]["model"]["embedding.word_embeddings.weight"]
    assert torch.isnan(emb.view(-1)[2]) and math.copysign(1.0, emb.view(-1)[1].item()) == -1.0


def test_stray_file_is_reported(written, tmp_path):
    out, _ = written
    _write(out, str(tmp_path))
    (tmp_path / ITER / "mp_rank_00_000" / "model_optim_rng.pt.tmp").write_bytes(b"")
    with pytest.raises(AssertionError, match=r"unexpected \['iter_0000001/mp_rank_00_000/model_optim_rng.pt.tmp'\]"):
        assert_same_checkpoint(load_mcore_dir(str(tmp_path)), out)


EMB = "embedding.word_embeddings.weight"
PT = rank_path("mp_rank_01_001")


def _mutate_zero_sign(a):
    a[PT]["model"][EMB].view(-1)[1] = 0.0


def _mutate_nan_payload(a):
    a[PT]["model"][EMB].view(-1)[2:3].view(torch.int16)[0] = 0x7FC1


def _mutate_dtype(a):
    a[PT]["model"][EMB] = a[PT]["model"][EMB].to(torch.float16)


def _mutate_shape(a):
    a[PT]["model"][EMB] = a[PT]["model"][EMB][:-1].clone()


def _mutate_missing_key(a):
    del a[PT]["model"]["output_layer.weight"]


def _mutate_version_type(a):
    a[PT]["checkpoint_version"] = 3


def _mutate_tracker(a):
    a["latest_checkpointed_iteration.txt"] = b"1\n"


def _mutate_missing_file(a):
    del a[PT]


def _mutate_last_element(a):
    t = a[PT]["model"]["output_layer.weight"]
    t[-1, -1] = t[-1, -1] + 1


@pytest.mark.parametrize(
    "mutate,message",
    [
        (_mutate_zero_sign, f"{PT}['model']['{EMB}']: first differing element at index (0, 1) (flat 1)"),
        (_mutate_nan_payload, f"{PT}['model']['{EMB}']: first differing element at index (0, 2)"),
        (_mutate_dtype, f"{PT}['model']['{EMB}']: dtype torch.float16 != expected torch.bfloat16"),
        (_mutate_shape, f"{PT}['model']['{EMB}']: shape (127, 64) != expected (128, 64)"),
        (_mutate_missing_key, f"{PT}['model']: keys differ; missing ['output_layer.weight']"),
        (_mutate_version_type, f"{PT}['checkpoint_version']: value 3 (int) != expected 3.0 (float)"),
        (_mutate_tracker, "latest_checkpointed_iteration.txt: content"),
        (_mutate_missing_file, f"missing ['{PT}']"),
        (_mutate_last_element, f"{PT}['model']['output_layer.weight']: first differing element at index (127, 63)"),
    ],
)
def test_assert_same_checkpoint_names_file_key_and_index(written, mutate, message):
    out, _ = written
    actual = _copy(out)
    assert_same_checkpoint(actual, out)
    mutate(actual)
    with pytest.raises(AssertionError) as info:
        assert_same_checkpoint(actual, out)
    assert message in str(info.value)


def test_key_order_checked_only_on_request(written):
    out, _ = written
    actual = _copy(out)
    sd = actual[PT]["model"]
    actual[PT]["model"] = OrderedDict(reversed(list(sd.items())))
    assert_same_checkpoint(actual, out)
    with pytest.raises(AssertionError, match="key order differs at position 0"):
        assert_same_checkpoint(actual, out, check_order=True)


# --------------------------------------------------------------------------------------------------
# layer placement: noop layers, num-layer-list, VPP, dualpipev (spec 4.2-4.5)


def _slots(*hf):
    """[(local, hf)] with local indices 0, 1, ... (a chunk without gaps)."""
    return list(enumerate(hf))


@pytest.mark.parametrize(
    "num_layers,pp,kwargs,want",
    [
        # 4.3 even split, noop {3}: stage 0 keeps local 0..2, stage 1 local 0..3 <- HF 3..6
        (8, 2, {"noop_layers": [3]}, {(0, 0): _slots(0, 1, 2), (1, 0): _slots(3, 4, 5, 6)}),
        # 4.3 gaps stay: noop {1} on stage 0 leaves local 0 and 2
        (6, 2, {"noop_layers": [1]}, {(0, 0): [(0, 0), (2, 1)], (1, 0): _slots(2, 3, 4)}),
        # 4.3 num-layer-list, any L
        (4, 2, {"num_layer_list": [1, 3]}, {(0, 0): _slots(0), (1, 0): _slots(1, 2, 3)}),
        (5, 3, {"num_layer_list": [2, 1, 2]}, {(0, 0): _slots(0, 1), (1, 0): _slots(2), (2, 0): _slots(3, 4)}),
        # 4.4 the code's own example: L = 8, PP = 2, s = 2
        (8, 2, {"vpp_layers": 2}, {(0, 0): _slots(0, 1), (0, 1): _slots(4, 5),
                                   (1, 0): _slots(2, 3), (1, 1): _slots(6, 7)}),
        (4, 2, {"vpp_layers": 1}, {(0, 0): _slots(0), (0, 1): _slots(2), (1, 0): _slots(1), (1, 1): _slots(3)}),
        # 4.5 dualpipev examples
        (8, 2, {"dualpipev": True}, {(0, 0): _slots(0, 1), (0, 1): _slots(6, 7),
                                     (1, 0): _slots(2, 3), (1, 1): _slots(4, 5)}),
        (8, 4, {"dualpipev": True}, {(0, 0): _slots(0), (0, 1): _slots(7), (1, 0): _slots(1), (1, 1): _slots(6),
                                     (2, 0): _slots(2), (2, 1): _slots(5), (3, 0): _slots(3), (3, 1): _slots(4)}),
        (4, 1, {"dualpipev": True, "noop_layers": [1]}, {(0, 0): _slots(0), (0, 1): _slots(1, 2)}),
    ],
)
def test_placement_small_examples(num_layers, pp, kwargs, want):
    assert reference_placement(num_layers, pp, **kwargs) == want


def test_placement_vpp_rsh_example():
    """Spec 4.4 worked example (R-sh): L = 64, PP = 8, s = 2, noop {47, 62, 63}, MTP 1."""
    place = reference_placement(64, 8, vpp_layers=2, noop_layers=[47, 62, 63])
    assert sorted(place) == [(p, v) for p in range(8) for v in range(4)]
    assert place[(0, 0)] == _slots(0, 1)
    assert place[(0, 1)] == _slots(16, 17)
    assert place[(0, 2)] == _slots(32, 33)
    assert place[(0, 3)] == _slots(47, 48)  # slots 48, 49
    assert place[(7, 0)] == _slots(14, 15)
    assert place[(7, 1)] == _slots(30, 31)
    assert place[(7, 2)] == [(0, 46)]  # slot 47 is noop
    assert place[(7, 3)] == []  # slots 62, 63 are noop
    assert reference_final_chunk(64, 8, vpp_layers=2) == (7, 3)  # final norm, output_layer, MTP (HF 61)
    assert sorted(hf for chunk in place.values() for _, hf in chunk) == list(range(61))


def test_placement_dualpipev_production_example():
    """Spec 4.5 production pretrain script: L = 64, PP = 8, noop {61, 62, 63}, s = 4."""
    place = reference_placement(64, 8, dualpipev=True, noop_layers=[61, 62, 63])
    assert sorted(place) == [(p, v) for p in range(8) for v in range(2)]
    assert place[(0, 0)] == _slots(0, 1, 2, 3)
    assert place[(0, 1)] == [(0, 60)]  # slots 60..63, only local 0 is real
    assert place[(1, 0)] == _slots(4, 5, 6, 7)
    assert place[(1, 1)] == _slots(56, 57, 58, 59)
    assert place[(7, 0)] == _slots(28, 29, 30, 31)
    assert place[(7, 1)] == _slots(32, 33, 34, 35)
    # final norm, output_layer and MTP (HF num_hidden_layers + 0 = 61) go next to HF 60
    assert reference_final_chunk(64, 8, dualpipev=True) == (0, 1)
    assert sorted(hf for chunk in place.values() for _, hf in chunk) == list(range(61))


def test_placement_num_layer_list_sft_example():
    counts = [7, 7, 7, 8, 8, 8, 8, 8]
    place = reference_placement(61, 8, num_layer_list=counts)
    start = 0
    for p, a in enumerate(counts):
        assert place[(p, 0)] == _slots(*range(start, start + a))
        start += a
    assert reference_final_chunk(61, 8) == (7, 0)


def test_placement_uses_the_given_hf_list():
    # the first_k_dense_replace remap (K' = 1 of K = 3): HF 1, 2 skipped
    place = reference_placement(6, 2, [0, 3, 4, 5, 6], noop_layers=[2])
    assert place == {(0, 0): [(0, 0), (1, 3)], (1, 0): _slots(4, 5, 6)}


@pytest.mark.parametrize(
    "num_layers,pp,kwargs",
    [
        (8, 2, {"vpp_layers": 2}),
        (12, 3, {"vpp_layers": 2, "noop_layers": [0, 5, 11]}),
        (24, 2, {"vpp_layers": 3}),
        (12, 3, {"dualpipev": True, "noop_layers": [4, 10]}),
        (16, 2, {"dualpipev": True}),
        (10, 2, {"noop_layers": [9]}),
        (9, 3, {"num_layer_list": [4, 1, 4]}),
    ],
)
def test_placement_covers_every_real_slot_once(num_layers, pp, kwargs):
    place = reference_placement(num_layers, pp, **kwargs)
    noop = set(kwargs.get("noop_layers", ()))
    hf_all = sorted(hf for chunk in place.values() for _, hf in chunk)
    assert hf_all == list(range(num_layers - len(noop)))
    for chunk in place.values():
        locals_ = [local for local, _ in chunk]
        hfs = [hf for _, hf in chunk]
        assert locals_ == sorted(set(locals_)) and hfs == sorted(hfs)  # ascending slot order in a chunk


@pytest.mark.parametrize(
    "num_layers,pp,kwargs,match",
    [
        (8, 2, {"vpp_layers": 3}, "vpp_layers"),
        (12, 2, {"vpp_layers": 4}, "vpp_layers"),  # (L % PP) % s == 0 would pass; (L / PP) % s does not
        (8, 2, {"vpp_layers": 0}, "vpp_layers"),
        (8, 3, {"vpp_layers": 1}, "not divisible by pp"),
        (6, 2, {"dualpipev": True}, "dualpipev"),
        (8, 2, {"dualpipev": True, "vpp_layers": 2}, "mutually exclusive"),
        (4, 2, {"num_layer_list": [1, 3], "noop_layers": [0]}, "mutually exclusive"),
        (4, 2, {"num_layer_list": [2, 2], "vpp_layers": 1}, "mutually exclusive"),
        (4, 2, {"num_layer_list": [2, 2], "dualpipev": True}, "mutually exclusive"),
        (4, 2, {"num_layer_list": [1, 2]}, "sums to 3"),
        (4, 2, {"num_layer_list": [4]}, "num_layer_list"),
        (4, 2, {"num_layer_list": [0, 4]}, "num_layer_list"),
        (4, 2, {"noop_layers": [4]}, "noop_layers"),
        (4, 2, {"noop_layers": [1, 1]}, "duplicates"),
        (2, 1, {"noop_layers": [0, 1]}, "no real layer"),
    ],
)
def test_placement_validation(num_layers, pp, kwargs, match):
    with pytest.raises(ValueError, match=match):
        reference_placement(num_layers, pp, **kwargs)


# end to end on the tiny checkpoint (4 HF layers, K = 1, MTP HF layer 4)


def _layers_of(sd, w):
    """[(local, hf_index)] of a chunk's decoder layers, the source found by input_layernorm bytes."""
    locals_ = sorted({int(k.split(".")[2]) for k in sd if k.startswith("decoder.layers.")})
    out = []
    for local in locals_:
        norm = sd[f"decoder.layers.{local}.input_layernorm.weight"]
        found = [i for i in range(5) if same(norm, w[f"model.layers.{i}.input_layernorm.weight"])]
        assert len(found) == 1
        out.append((local, found[0]))
    return out


CHUNKED_TOP = ["checkpoint_version", "iteration", "model0", "model1"]
FINAL_NO_MTP = ["decoder.final_layernorm.weight", "output_layer.weight"]


def _mtp_tail(n_local):
    """Final norm, output_layer and MTP module 0 keys (local experts), in order."""
    return (["final_layernorm.weight", "output_layer.weight",
             "mtp.layers.0.enorm.weight", "mtp.layers.0.hnorm.weight", "mtp.layers.0.eh_proj.weight"]
            + _attn_mlp_keys("mtp.layers.0.transformer_layer.", dense=False, n_local=n_local, gemm=False)
            + ["mtp.final_layernorms.0.weight"])


MTP_TAIL = _mtp_tail(4)  # EP 2
MTP_TAIL_EP1 = _mtp_tail(8)


def test_e2e_vpp_pp2_s1_mtp(bf16_dir, hf):
    _, w = hf
    out = reference_hf_to_mcore(bf16_dir, tp=2, pp=2, ep=2, mtp_num_layers=1, vpp_layers=1)
    names = [f"mp_rank_{t:02d}_{p:03d}_{e:03d}" for t in range(2) for p in range(2) for e in range(2)]
    assert set(out) == {"latest_checkpointed_iteration.txt"} | {rank_path(n) for n in names}
    for t in range(2):
        for e in range(2):
            f0 = out[rank_path(f"mp_rank_{t:02d}_000_{e:03d}")]
            f1 = out[rank_path(f"mp_rank_{t:02d}_001_{e:03d}")]
            assert list(f0) == CHUNKED_TOP and list(f1) == CHUNKED_TOP
            assert type(f0["checkpoint_version"]) is float and f0["iteration"] == 1
            # slot g -> chunk g, pp = g % 2, v = g // 2
            assert _layers_of(f0["model0"], w) == [(0, 0)]
            assert _layers_of(f1["model0"], w) == [(0, 1)]
            assert _layers_of(f0["model1"], w) == [(0, 2)]
            assert _layers_of(f1["model1"], w) == [(0, 3)]
            emb = "embedding.word_embeddings.weight"
            assert list(f0["model0"]) == [emb] + _attn_mlp_keys("decoder.layers.0.", dense=True)
            assert list(f1["model0"]) == _attn_mlp_keys("decoder.layers.0.", dense=False, n_local=4, gemm=False)
            assert list(f0["model1"]) == _attn_mlp_keys("decoder.layers.0.", dense=False, n_local=4, gemm=False)
            assert list(f1["model1"]) == (
                [emb] + _attn_mlp_keys("decoder.layers.0.", dense=False, n_local=4, gemm=False) + MTP_TAIL
            )
            assert same(f0["model0"][emb], torch.chunk(w["model.embed_tokens.weight"], 2, 0)[t])
            assert same(f1["model1"][emb], torch.chunk(w["model.layers.4.embed_tokens.weight"], 2, 0)[t])
            assert same(f1["model1"]["mtp.layers.0.enorm.weight"], w["model.layers.4.enorm.weight"])


def test_e2e_vpp_pp1_keeps_one_embedding(bf16_dir, hf):
    _, w = hf
    out = reference_hf_to_mcore(bf16_dir, vpp_layers=2, mtp_num_layers=1)
    f = out[rank_path("mp_rank_00")]
    assert list(f) == CHUNKED_TOP
    assert _layers_of(f["model0"], w) == [(0, 0), (1, 1)]
    assert _layers_of(f["model1"], w) == [(0, 2), (1, 3)]
    assert "embedding.word_embeddings.weight" in f["model0"]
    assert "embedding.word_embeddings.weight" not in f["model1"]  # no MTP copy with PP = 1
    assert list(f["model1"])[-len(MTP_TAIL_EP1):] == MTP_TAIL_EP1


def test_e2e_noop_counts_in_num_layers(bf16_dir, hf):
    _, w = hf
    sd = state(reference_hf_to_mcore(bf16_dir, num_layers=5, noop_layers=[2]), "mp_rank_00")
    assert _layers_of(sd, w) == [(0, 0), (1, 1), (3, 2), (4, 3)]  # local 2 stays a gap
    assert not any(k.startswith("decoder.layers.2.") for k in sd)
    out = reference_hf_to_mcore(bf16_dir, pp=2, num_layers=4, noop_layers=[1])
    assert set(out[rank_path("mp_rank_00_000")]) == {"model", "checkpoint_version", "iteration"}
    assert _layers_of(state(out, "mp_rank_00_000"), w) == [(0, 0)]
    assert _layers_of(state(out, "mp_rank_00_001"), w) == [(0, 1), (1, 2)]
    with pytest.raises(ValueError, match="real layers"):
        reference_hf_to_mcore(bf16_dir, num_layers=6, noop_layers=[0])  # 5 real > 4 HF layers


def test_e2e_noop_with_vpp_empty_final_chunk(bf16_dir, hf):
    _, w = hf
    out = reference_hf_to_mcore(bf16_dir, pp=2, vpp_layers=1, num_layers=4, noop_layers=[3], mtp_num_layers=1)
    f1 = out[rank_path("mp_rank_00_001")]
    assert _layers_of(f1["model0"], w) == [(0, 1)]
    assert _layers_of(f1["model1"], w) == []
    assert list(f1["model1"]) == ["embedding.word_embeddings.weight"] + MTP_TAIL_EP1


def test_e2e_dualpipev_pp2(bf16_dir, hf):
    _, w = hf
    out = reference_hf_to_mcore(bf16_dir, pp=2, ep=2, mtp_num_layers=1, dualpipev=True)
    names = [f"mp_rank_00_{p:03d}_{e:03d}" for p in range(2) for e in range(2)]
    assert set(out) == {"latest_checkpointed_iteration.txt"} | {rank_path(n) for n in names}
    moe0 = _attn_mlp_keys("decoder.layers.0.", dense=False, n_local=4, gemm=False)
    emb = "embedding.word_embeddings.weight"
    for e in range(2):
        f0 = out[rank_path(f"mp_rank_00_000_{e:03d}")]
        f1 = out[rank_path(f"mp_rank_00_001_{e:03d}")]
        assert list(f0) == CHUNKED_TOP and list(f1) == CHUNKED_TOP
        # s = 1: pp0 = [0 | 3], pp1 = [1 | 2]
        assert _layers_of(f0["model0"], w) == [(0, 0)]
        assert _layers_of(f0["model1"], w) == [(0, 3)]
        assert _layers_of(f1["model0"], w) == [(0, 1)]
        assert _layers_of(f1["model1"], w) == [(0, 2)]
        assert list(f0["model0"]) == [emb] + _attn_mlp_keys("decoder.layers.0.", dense=True)
        assert list(f0["model1"]) == [emb] + moe0 + MTP_TAIL  # MTP embedding copy with PP > 1
        assert list(f1["model0"]) == moe0 and list(f1["model1"]) == moe0
        assert same(f0["model0"][emb], w["model.embed_tokens.weight"])
        assert same(f0["model1"][emb], w["model.layers.4.embed_tokens.weight"])
        assert same(f0["model1"]["mtp.layers.0.hnorm.weight"], w["model.layers.4.hnorm.weight"])


def test_e2e_dualpipev_pp1_noop_no_mtp(bf16_dir, hf):
    _, w = hf
    out = reference_hf_to_mcore(bf16_dir, num_layers=4, noop_layers=[1], dualpipev=True)
    f = out[rank_path("mp_rank_00")]
    assert list(f) == CHUNKED_TOP
    assert _layers_of(f["model0"], w) == [(0, 0)]  # slot 1 is noop
    assert _layers_of(f["model1"], w) == [(0, 1), (1, 2)]  # HF = slot - #noop below
    assert "embedding.word_embeddings.weight" in f["model0"]
    assert "embedding.word_embeddings.weight" not in f["model1"]
    assert list(f["model1"])[-2:] == FINAL_NO_MTP


def test_e2e_dualpipev_first_k_dense_replace(tmp_path):
    build_tiny_hf(tmp_path, first_k_dense_replace=2)
    _, w = load_hf(str(tmp_path))
    out = reference_hf_to_mcore(str(tmp_path), pp=2, dualpipev=True)
    f0 = out[rank_path("mp_rank_00_000")]
    f1 = out[rank_path("mp_rank_00_001")]
    assert _layers_of(f0["model0"], w) == [(0, 0)] and _layers_of(f1["model0"], w) == [(0, 1)]
    assert "decoder.layers.0.mlp.linear_fc1.weight" in f1["model0"]  # HF 1 < K = 2: dense
    assert "decoder.layers.0.mlp.router.weight" in f1["model1"]  # HF 2: MoE
    same_k = reference_hf_to_mcore(str(tmp_path), pp=2, dualpipev=True, first_k_dense_replace=2)
    assert_same_checkpoint(same_k, out, check_order=True)
    # the remap is not applied under dualpipev (spec 4.2, 10.6): asking for it is an error
    with pytest.raises(ValueError, match="first_k_dense_replace 1 is not supported with dualpipev"):
        reference_hf_to_mcore(str(tmp_path), pp=2, dualpipev=True, first_k_dense_replace=1)


def test_e2e_num_layer_list(bf16_dir, hf):
    _, w = hf
    out = reference_hf_to_mcore(bf16_dir, pp=2, mtp_num_layers=1, num_layer_list=[1, 3])
    f0 = out[rank_path("mp_rank_00_000")]
    assert list(f0) == ["model", "checkpoint_version", "iteration"]
    assert _layers_of(f0["model"], w) == [(0, 0)]
    sd1 = state(out, "mp_rank_00_001")
    assert _layers_of(sd1, w) == [(0, 1), (1, 2), (2, 3)]
    assert list(sd1)[0] == "embedding.word_embeddings.weight" and list(sd1)[-len(MTP_TAIL_EP1):] == MTP_TAIL_EP1
    sd = state(reference_hf_to_mcore(bf16_dir, pp=2, num_layers=3, num_layer_list=[2, 1]), "mp_rank_00_001")
    assert _layers_of(sd, w) == [(0, 2)]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"dualpipev": True, "tp": 2}, "moe-tp-extend-ep"),
        ({"dualpipev": True, "pp": 4}, "dualpipev"),
        ({"dualpipev": True, "vpp_layers": 1}, "mutually exclusive"),
        ({"vpp_layers": 3}, "vpp_layers"),
        ({"pp": 2, "vpp_layers": 3}, "vpp_layers"),
        ({"pp": 2, "num_layer_list": [1, 2]}, "sums to 3"),
        ({"pp": 2, "num_layer_list": [2, 2], "noop_layers": [0]}, "mutually exclusive"),
        ({"noop_layers": [4]}, "noop_layers"),
        ({"dualpipev": True, "first_k_dense_replace": 0}, "first_k_dense_replace"),
    ],
)
def test_layout_validation_errors(bf16_dir, kwargs, match):
    with pytest.raises(ValueError, match=match):
        reference_hf_to_mcore(bf16_dir, **kwargs)


# --------------------------------------------------------------------------------------------------
# MLA key names (spec 0 / 3.3) and mla-mm-split (spec 3.4)

LEGACY = {"linear_q_up_proj": "linear_qb", "linear_kv_up_proj": "linear_kvb", "kv_layernorm": "k_layernorm"}
MM_SPLIT = ["linear_qk_nope", "linear_qk_rope", "linear_kv_nope", "linear_v"]


def _rename(key, mapping):
    for old, new in mapping.items():
        key = key.replace(f".self_attention.{old}.", f".self_attention.{new}.")
    return key


@pytest.mark.parametrize("gemm", [False, True])
def test_legacy_mla_key_names_rename_only(bf16_dir, gemm):
    kwargs = dict(tp=2, pp=2, ep=2, moe_grouped_gemm=gemm, mtp_num_layers=1)
    current = reference_hf_to_mcore(bf16_dir, **kwargs)
    legacy = reference_hf_to_mcore(bf16_dir, mla_key_names="legacy", **kwargs)
    assert set(legacy) == set(current)
    seen = set()
    for path, obj in current.items():
        if path.endswith(".txt"):
            continue
        sd, lsd = obj["model"], legacy[path]["model"]
        assert list(lsd) == [_rename(k, LEGACY) for k in sd]  # same positions
        for key, tensor in sd.items():
            assert same(lsd[_rename(key, LEGACY)], tensor)
        seen |= {k for k in lsd if ".self_attention." in k}
    assert any(k.startswith("decoder.") and k.endswith("self_attention.linear_qb.weight") for k in seen)
    assert "mtp.layers.0.transformer_layer.self_attention.k_layernorm.weight" in seen
    assert "mtp.layers.0.transformer_layer.self_attention.linear_kvb.weight" in seen
    assert not any(old in k for k in seen for old in ("linear_q_up_proj", "linear_kv_up_proj", "kv_layernorm"))
    with pytest.raises(ValueError, match="mla_key_names"):
        reference_hf_to_mcore(bf16_dir, mla_key_names="old")


def _mm_split_shapes(c, tp):
    nh, dn, dr, dv = c["num_attention_heads"], c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    rq, rkv = c["q_lora_rank"], c["kv_lora_rank"]
    return {
        "linear_qk_nope": (nh * dn // tp, rq),
        "linear_qk_rope": (nh * dr // tp, rq),
        "linear_kv_nope": (nh * dn // tp, rkv),
        "linear_v": (nh * dv // tp, rkv),
    }


def test_appendix_a_mm_split_shapes_for_671b():
    c = tiny_config(num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512,
                    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128)
    assert _mm_split_shapes(c, 2) == {
        "linear_qk_nope": (8192, 1536), "linear_qk_rope": (4096, 1536),
        "linear_kv_nope": (8192, 512), "linear_v": (8192, 512),
    }


@pytest.mark.parametrize("names", ["current", "legacy"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_mm_split_shapes_order_and_reassembly(bf16_dir, hf, tp, names):
    c, w = hf
    nh, dn, dr, dv = c["num_attention_heads"], c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    shapes = _mm_split_shapes(c, tp)
    base = reference_hf_to_mcore(bf16_dir, tp=tp, pp=2, mtp_num_layers=1, mla_key_names=names)
    out = reference_hf_to_mcore(bf16_dir, tp=tp, pp=2, mtp_num_layers=1, mla_key_names=names, mla_mm_split=True)
    assert set(out) == set(base)
    up = ["linear_qb", "linear_kvb"] if names == "legacy" else ["linear_q_up_proj", "linear_kv_up_proj"]
    for p in range(2):
        names_t = [f"mp_rank_{t:02d}_{p:03d}" for t in range(tp)]
        sds = [state(out, n) for n in names_t]
        # key order: the four replace the two up-projections in place; everything else identical
        want = []
        for key in state(base, names_t[0]):
            if key.endswith(f"self_attention.{up[0]}.weight"):
                pre = key[: -len(f"{up[0]}.weight")]
                want += [pre + f"{m}.weight" for m in MM_SPLIT]
            elif not key.endswith(f"self_attention.{up[1]}.weight"):
                want.append(key)
        for t, sd in enumerate(sds):
            assert list(sd) == want
            for key, tensor in state(base, names_t[t]).items():
                if key in sd:
                    assert same(sd[key], tensor), key
        prefixes = sorted({k[: -len("linear_qk_nope.weight")] for k in sds[0] if k.endswith("linear_qk_nope.weight")})
        assert prefixes
        for pre in prefixes:
            # pp = 2 over 4 layers: stage p local l <- HF 2p + l; MTP <- HF 4
            src = ("model.layers.4." if pre.startswith("mtp.") else f"model.layers.{2 * p + int(pre.split('.')[2])}.")
            src += "self_attn."
            pieces = {m: [sd[pre + f"{m}.weight"] for sd in sds] for m in MM_SPLIT}
            for m in MM_SPLIT:
                for piece in pieces[m]:
                    assert tuple(piece.shape) == shapes[m]
            full = {m: torch.cat(pieces[m], 0) for m in MM_SPLIT}
            q_b = torch.cat([full["linear_qk_nope"].view(nh, dn, -1), full["linear_qk_rope"].view(nh, dr, -1)], 1)
            kv_b = torch.cat([full["linear_kv_nope"].view(nh, dn, -1), full["linear_v"].view(nh, dv, -1)], 1)
            q_b, kv_b = q_b.reshape(nh * (dn + dr), -1), kv_b.reshape(nh * (dn + dv), -1)
            base_q = torch.cat([state(base, n)[pre + f"{up[0]}.weight"] for n in names_t], 0)
            base_kv = torch.cat([state(base, n)[pre + f"{up[1]}.weight"] for n in names_t], 0)
            assert same(q_b, base_q) and same(kv_b, base_kv)
            assert same(q_b, w[src + "q_b_proj.weight"]) and same(kv_b, w[src + "kv_b_proj.weight"])
        # rank t holds whole heads t*NH/TP ..: head h's nope rows are q_b rows h*(Dn+Dr) .. +Dn
        pre = prefixes[0]
        hpr = nh // tp
        for t, sd in enumerate(sds):
            q_full = torch.cat([state(base, n)[pre + f"{up[0]}.weight"] for n in names_t], 0)
            for local in range(hpr):
                h = t * hpr + local
                assert same(sd[pre + "linear_qk_nope.weight"][local * dn:(local + 1) * dn],
                            q_full[h * (dn + dr): h * (dn + dr) + dn])
                assert same(sd[pre + "linear_qk_rope.weight"][local * dr:(local + 1) * dr],
                            q_full[h * (dn + dr) + dn:(h + 1) * (dn + dr)])


# --------------------------------------------------------------------------------------------------
# moe-tp-extend-ep (spec 3.6) and expert-tensor-parallel-size 1 (spec 4.7)


def _expert_pieces(sd, pre, gemm, n, h, fm):
    """[(fc1 [2Fm, H], fc2 [H, Fm])] of a rank's n whole experts, read back per the view semantics."""
    if gemm:
        w1 = sd[pre + "mlp.experts.weight1"].view(n, h, 2 * fm)
        w2 = sd[pre + "mlp.experts.weight2"].view(n, fm, h)
        return [(w1[q].t(), w2[q].t()) for q in range(n)]
    return [(sd[pre + f"mlp.experts.local_experts.{q}.linear_fc1.weight"],
             sd[pre + f"mlp.experts.local_experts.{q}.linear_fc2.weight"]) for q in range(n)]


def _whole(w, i, j):
    x = f"model.layers.{i}.mlp.experts.{j}."
    return torch.cat([w[x + "gate_proj.weight"], w[x + "up_proj.weight"]], 0), w[x + "down_proj.weight"]


@pytest.mark.parametrize("gemm", [False, True])
@pytest.mark.parametrize("tp,ep", [(2, 1), (2, 2), (4, 2), (2, 4), (4, 1), (1, 4)])
def test_tp_extend_ep_whole_experts_in_buckets(bf16_dir, hf, tp, ep, gemm):
    c, w = hf
    h, fm, e_total = c["hidden_size"], c["moe_intermediate_size"], c["n_routed_experts"]
    n = e_total // (ep * tp)
    out = reference_hf_to_mcore(bf16_dir, tp=tp, ep=ep, moe_grouped_gemm=gemm, mtp_num_layers=1,
                                moe_tp_extend_ep=True)
    base = reference_hf_to_mcore(bf16_dir, tp=tp, ep=ep, moe_grouped_gemm=gemm, mtp_num_layers=1)
    assert set(out) == set(base) and len(out) == 1 + tp * ep
    shapes = appendix_a_shapes(c, tp, ep)
    for pre, hf_i in [("decoder.layers.1.", 1), ("decoder.layers.3.", 3), ("mtp.layers.0.transformer_layer.", 4)]:
        covered = []
        for t in range(tp):
            for e in range(ep):
                name = rank_dir_name_(t, e, ep)
                sd, bsd = state(out, name), state(base, name)
                # everything but routed experts (shared experts included) as without tp-extend-ep
                assert [k for k in sd if ".experts." not in k or "shared" in k] == \
                       [k for k in bsd if ".experts." not in k or "shared" in k]
                for key in sd:
                    if ".mlp.experts." not in key:
                        assert same(sd[key], bsd[key]), key
                assert tuple(sd[pre + "mlp.shared_experts.linear_fc1.weight"].shape) == shapes["shared_fc1"]
                if gemm:
                    assert tuple(sd[pre + "mlp.experts.weight1"].shape) == (h, n * 2 * fm)
                    assert tuple(sd[pre + "mlp.experts.weight2"].shape) == (n * fm, h)
                else:
                    assert sum(k.startswith(pre + "mlp.experts.local_experts.") for k in sd) == 2 * n
                b = e * tp + t
                for q, (fc1, fc2) in enumerate(_expert_pieces(sd, pre, gemm, n, h, fm)):
                    j = b * n + q
                    want1, want2 = _whole(w, hf_i, j)
                    assert same(fc1.contiguous(), want1) and same(fc2.contiguous(), want2), (name, q)
                    covered.append(j)
        assert sorted(covered) == list(range(e_total))


def rank_dir_name_(t, e, ep, p=None):
    name = f"mp_rank_{t:02d}"
    if p is not None:
        name += f"_{p:03d}"
    if ep > 1:
        name += f"_{e:03d}"
    return name


def test_tp_extend_ep_allows_dualpipev_tp2_and_validates(bf16_dir, hf):
    _, w = hf
    out = reference_hf_to_mcore(bf16_dir, tp=2, pp=2, mtp_num_layers=1, dualpipev=True,
                                moe_grouped_gemm=True, moe_tp_extend_ep=True)
    assert len(out) == 1 + 4
    f = out[rank_path("mp_rank_01_000")]
    assert _layers_of(f["model1"], w) == [(0, 3)]
    fc1, _ = _expert_pieces(f["model1"], "decoder.layers.0.", True, 4, 64, 32)[0]
    assert same(fc1.contiguous(), _whole(w, 3, 4)[0])  # bucket 1 = experts 4..7
    with pytest.raises(ValueError, match="ep \\* tp"):
        reference_hf_to_mcore(bf16_dir, tp=4, ep=4, moe_tp_extend_ep=True)
    with pytest.raises(ValueError, match="mutually exclusive"):
        reference_hf_to_mcore(bf16_dir, tp=2, moe_tp_extend_ep=True, expert_tensor_parallel_size=1)


@pytest.mark.parametrize(
    "tp,ep,pairs",
    [
        (4, 2, [(0, 0), (1, 1), (2, 0), (3, 1)]),
        (2, 4, [(0, 0), (1, 1), (0, 2), (1, 3)]),
        (2, 2, [(0, 0), (1, 1)]),
        (4, 1, [(0, 0), (1, 0), (2, 0), (3, 0)]),
        (1, 8, [(0, e) for e in range(8)]),
    ],
)
@pytest.mark.parametrize("gemm", [False, True])
def test_etp1_file_set_and_whole_experts(bf16_dir, hf, tp, ep, pairs, gemm):
    c, w = hf
    h, fm, e_total = c["hidden_size"], c["moe_intermediate_size"], c["n_routed_experts"]
    n = e_total // ep
    out = reference_hf_to_mcore(bf16_dir, tp=tp, pp=2, ep=ep, moe_grouped_gemm=gemm, mtp_num_layers=1,
                                expert_tensor_parallel_size=1)
    want = {rank_path(rank_dir_name_(t, e, ep, p)) for t, e in pairs for p in range(2)}
    assert set(out) == {"latest_checkpointed_iteration.txt"} | want
    base = reference_hf_to_mcore(bf16_dir, tp=tp, pp=2, ep=ep, moe_grouped_gemm=gemm, mtp_num_layers=1)
    for p, pre, hf_i in [(0, "decoder.layers.1.", 1), (1, "decoder.layers.1.", 3),
                         (1, "mtp.layers.0.transformer_layer.", 4)]:
        covered = {}
        for t, e in pairs:
            name = rank_dir_name_(t, e, ep, p)
            sd, bsd = state(out, name), state(base, name)
            for key in sd:  # non-expert tensors TP-split by t as usual
                if ".mlp.experts." not in key:
                    assert same(sd[key], bsd[key]), key
            if gemm:
                assert tuple(sd[pre + "mlp.experts.weight1"].shape) == (h, n * 2 * fm)
                assert tuple(sd[pre + "mlp.experts.weight2"].shape) == (n * fm, h)
            for q, (fc1, fc2) in enumerate(_expert_pieces(sd, pre, gemm, n, h, fm)):
                j = e * n + q
                want1, want2 = _whole(w, hf_i, j)
                assert same(fc1.contiguous(), want1) and same(fc2.contiguous(), want2)
                covered.setdefault(j, set()).add(t)
        assert sorted(covered) == list(range(e_total))  # every expert present, whole


def test_etp1_tp1_equals_default_and_validation(bf16_dir, tmp_path):
    kwargs = dict(pp=2, ep=4, moe_grouped_gemm=True, mtp_num_layers=1)
    assert_same_checkpoint(reference_hf_to_mcore(bf16_dir, expert_tensor_parallel_size=1, **kwargs),
                           reference_hf_to_mcore(bf16_dir, **kwargs), check_order=True)
    build_tiny_hf(tmp_path, n_routed_experts=12)
    with pytest.raises(ValueError, match="tp % ep"):  # ep 6 divides 12 experts, but neither of tp 4, ep 6 divides the other
        reference_hf_to_mcore(str(tmp_path), tp=4, ep=6, expert_tensor_parallel_size=1)
    with pytest.raises(ValueError, match="dualpipev"):
        reference_hf_to_mcore(bf16_dir, tp=2, pp=2, dualpipev=True, expert_tensor_parallel_size=1)
    with pytest.raises(ValueError, match="None or 1"):
        reference_hf_to_mcore(bf16_dir, tp=2, expert_tensor_parallel_size=2)
