"""Helpers shared by the reference-converter suite (tests/reference_suite): paths of rank files, byte equality,
the Appendix A shape formulas, expected key lists and read-back of expert tensors."""

import json
import re

import torch


ITER = "iter_0000001"


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


# --------------------------------------------------------------------------------------------------
# key lists, layer sources, experts


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


def rank_dir_name_(t, e, ep, p=None):
    name = f"mp_rank_{t:02d}"
    if p is not None:
        name += f"_{p:03d}"
    if ep > 1:
        name += f"_{e:03d}"
    return name
