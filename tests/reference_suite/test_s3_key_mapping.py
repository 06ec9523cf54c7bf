"""Spec section 3 (and Appendix A): the key mapping HF -> mcore per rank. Per-rank shapes, exact key lists, TP
pieces restoring the HF tensors, the grouped-GEMM memory layout, MLA key names and mla-mm-split, moe-tp-extend-ep
and MTP."""

import os

import pytest
import torch

from tests.hf_tiny import tiny_config
from tests.reference import reference_hf_to_mcore
from tests.reference_suite.helpers import (
    _attn_mlp_keys,
    _expert_pieces,
    _layers_of,
    _whole,
    appendix_a_shapes,
    halves,
    rank_dir_name_,
    rank_path,
    read_json,
    role,
    same,
    state,
)


# --------------------------------------------------------------------------------------------------
# Appendix A shapes


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
# key lists (spec 3.1-3.6)


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


def test_no_mtp_means_decoder_final_norm_and_no_mtp_keys(bf16_dir):
    out = reference_hf_to_mcore(bf16_dir, pp=2, mtp_num_layers=0)
    sd = state(out, "mp_rank_00_001")
    assert "decoder.final_layernorm.weight" in sd and "final_layernorm.weight" not in sd
    assert "embedding.word_embeddings.weight" not in sd
    assert not any(k.startswith("mtp.") for k in sd)


# --------------------------------------------------------------------------------------------------
# TP pieces restore the HF tensors (spec 3.3-3.6)


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
# grouped GEMM memory layout and moe-tp-extend-ep (spec 3.6)


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


# --------------------------------------------------------------------------------------------------
# MTP (spec 3.7)


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
