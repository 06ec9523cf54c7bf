"""Checks of the families reference (tests/reference_families.py) and of the tiny family checkpoints
(tests/hf_tiny_families.py) against spec/mindspeed_v2_families.md.

Qwen3-MoE: exact key lists, per-rank shapes, the GQA ``linear_qkv`` group interleave against hand-built tensors,
TP pieces restoring the HF tensors, EP covering every expert once, tp-extend-ep and ETP 1, placement, tied
embeddings and the refusals. DeepSeek-V3.2: exact key lists, "DeepSeek-V3 plus the indexer" for every layout
option, the indexer replicated, FP8 dequantized equal to the bf16 release, refusals. And the tiny checkpoints
themselves: files, shards, and that transformers loads them.
"""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.hf_tiny import build_tiny_hf
from tests.hf_tiny_families import (
    build_tiny_deepseek_v32,
    build_tiny_qwen3_moe,
    dequantize_hf_dir,
    deepseek_v32_tensor_specs,
    qwen3_moe_tensor_specs,
)
from tests.reference import assert_same_checkpoint, load_hf, reference_hf_to_mcore, reference_placement
from tests.reference_families import qwen3_qkv, reference_hf_to_mcore_family
from tests.reference_suite.helpers import rank_dir_name_, rank_path, read_json, same, state

# the tiny Qwen3-MoE: H 64, V 256, 4 layers, nh 4, ng 2, d 24, Fm 32, E 8
QH, QV, QNH, QNG, QD, QFM, QE = 64, 256, 4, 2, 24, 32, 8


# --------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3_moe")
    build_tiny_qwen3_moe(path)
    return str(path)


@pytest.fixture(scope="module")
def qwen(qwen_dir):
    return load_hf(qwen_dir)


@pytest.fixture(scope="module")
def qwen_tied_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3_moe_tied")
    build_tiny_qwen3_moe(path, tied=True)
    return str(path)


@pytest.fixture(scope="module")
def qwen_local_dir(tmp_path_factory):
    """The same tensors as qwen_dir, config with the transformers-5 spelling num_local_experts."""
    path = tmp_path_factory.mktemp("qwen3_moe_local")
    build_tiny_qwen3_moe(path, experts_key="num_local_experts")
    return str(path)


@pytest.fixture(scope="module")
def v32_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("v32")
    build_tiny_deepseek_v32(path)
    return str(path)


@pytest.fixture(scope="module")
def v32(v32_dir):
    return load_hf(v32_dir)


@pytest.fixture(scope="module")
def v32_fp8_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("v32_fp8")
    build_tiny_deepseek_v32(path, fp8=True)
    return str(path)


@pytest.fixture(scope="module")
def v32_fp8_bf16_dir(v32_fp8_dir, tmp_path_factory):
    """The FP8 directory after DeepSeek's fp8_cast_bf16 (written independently of tests/reference.py)."""
    path = tmp_path_factory.mktemp("v32_fp8_bf16")
    dequantize_hf_dir(v32_fp8_dir, path)
    return str(path)


def raw_tensors(hf_dir):
    """Every stored tensor of an HF directory, as stored (no dequantization)."""
    weight_map = read_json(os.path.join(hf_dir, "model.safetensors.index.json"))["weight_map"]
    out = {}
    for file_name in sorted(set(weight_map.values())):
        out.update(load_file(os.path.join(hf_dir, file_name)))
    return out


def rank_files(out):
    return {p: o for p, o in out.items() if not isinstance(o, bytes)}


def chunks_of(obj):
    return [obj[k] for k in obj if k.startswith("model")]


# --------------------------------------------------------------------------------------------------
# the tiny checkpoints (tests/hf_tiny_families.py)


@pytest.mark.parametrize("family", ["qwen", "qwen_tied", "v32", "v32_fp8"])
def test_tiny_checkpoint_files(tmp_path, family):
    if family.startswith("qwen"):
        config = build_tiny_qwen3_moe(tmp_path, tied=family == "qwen_tied")
        specs = [(n, s, d, False) for n, s, d in qwen3_moe_tensor_specs(config)]
    else:
        config = build_tiny_deepseek_v32(tmp_path, fp8=family == "v32_fp8")
        specs = deepseek_v32_tensor_specs(config)
    assert read_json(tmp_path / "config.json") == config
    index = read_json(tmp_path / "model.safetensors.index.json")
    weight_map = index["weight_map"]
    shards = sorted(set(weight_map.values()))
    assert shards == [f"model-0000{s}-of-00003.safetensors" for s in (1, 2, 3)]
    raw = raw_tensors(str(tmp_path))
    assert set(raw) == set(weight_map)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in raw.values())
    fp8 = family == "v32_fp8"
    names = [n for n, _, _, _ in specs]
    assert set(raw) == set(names) | {n + "_scale_inv" for n, _, _, q in specs if fp8 and q}
    for name, shape, dtype, quantized in specs:
        assert tuple(raw[name].shape) == shape, name
        if fp8 and quantized:
            assert raw[name].dtype == torch.float8_e4m3fn, name
            scale = raw[name + "_scale_inv"]
            assert scale.dtype == torch.float32 and tuple(scale.shape) == (-(-shape[0] // 128), -(-shape[1] // 128))
        else:
            assert raw[name].dtype == dtype, name
    # one layer spans two shards
    files_of_layer = {}
    for name, file_name in weight_map.items():
        if name.startswith("model.layers."):
            files_of_layer.setdefault(int(name.split(".")[2]), set()).add(file_name)
    assert any(len(f) == 2 for f in files_of_layer.values())
    # distinct random values in every tensor, norms and biases included: no tensor is constant, no two are equal
    seen = set()
    for name in names:
        values = raw[name].float().reshape(-1)
        assert values.unique().numel() > 1, name
        key = tuple(values[:8].tolist())
        assert key not in seen, name
        seen.add(key)
    if family.startswith("qwen"):
        assert ("lm_head.weight" in raw) == (family == "qwen")
        assert config["head_dim"] * config["num_attention_heads"] != config["hidden_size"]
    else:
        for i in range(config["num_hidden_layers"] + config["num_nextn_predict_layers"]):
            for suffix in ("wq_b.weight", "wk.weight", "k_norm.weight", "k_norm.bias", "weights_proj.weight"):
                assert f"model.layers.{i}.self_attn.indexer.{suffix}" in raw
        if fp8:  # partial edge blocks next to full ones in the indexer's FP8 weights
            assert tuple(raw["model.layers.0.self_attn.indexer.wq_b.weight"].shape) == (192, 144)
            assert tuple(raw["model.layers.0.self_attn.indexer.wq_b.weight_scale_inv"].shape) == (2, 2)
            assert tuple(raw["model.layers.0.self_attn.indexer.wk.weight_scale_inv"].shape) == (1, 2)
            assert raw["model.layers.4.self_attn.indexer.weights_proj.weight"].dtype == torch.bfloat16
            assert config["quantization_config"]["weight_block_size"] == [128, 128]


def test_tiny_qwen3_moe_expert_spelling_same_tensors(qwen_dir, qwen_local_dir):
    assert read_json(os.path.join(qwen_local_dir, "config.json"))["num_local_experts"] == 8
    assert "num_experts" not in read_json(os.path.join(qwen_local_dir, "config.json"))
    a, b = raw_tensors(qwen_dir), raw_tensors(qwen_local_dir)
    assert set(a) == set(b) and all(same(a[k], b[k]) for k in a)


def test_dequantize_hf_dir_is_fp8_cast_bf16(v32_fp8_dir, v32_fp8_bf16_dir):
    raw, out = raw_tensors(v32_fp8_dir), raw_tensors(v32_fp8_bf16_dir)
    assert set(out) == {k for k in raw if not k.endswith("_scale_inv")}
    assert "quantization_config" not in read_json(os.path.join(v32_fp8_bf16_dir, "config.json"))
    name = "model.layers.0.self_attn.indexer.wq_b.weight"
    w, s = raw[name], raw[name + "_scale_inv"]
    for r, c in ((0, 0), (127, 143), (128, 128), (191, 143), (150, 3)):
        want = (w[r, c].to(torch.float32) * s[r // 128, c // 128]).to(torch.bfloat16)
        assert same(out[name][r, c], want)
    for k, t in out.items():
        if k + "_scale_inv" not in raw:
            assert same(t, raw[k]), k


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("variant", ["qwen", "qwen_tied", "qwen_local", "v32", "v32_no_mtp"])
def test_transformers_loads_the_bf16_checkpoints(tmp_path, variant, dtype):
    """Every HF tensor is a parameter of Qwen3MoeForCausalLM / DeepseekV32ForCausalLM with the same values; no
    missing, unexpected or mismatched keys (except the tiny V3.2 MTP layer: transformers 5.25 ignores only
    ``model.layers.61.*``, the 671B MTP layer, so ``model.layers.4.*`` shows up as unexpected)."""
    tf = pytest.importorskip("transformers")
    if variant.startswith("qwen"):
        kwargs = {"tied": variant == "qwen_tied"}
        if variant == "qwen_local":
            kwargs["experts_key"] = "num_local_experts"
        config = build_tiny_qwen3_moe(tmp_path, **kwargs)
        cls = tf.Qwen3MoeForCausalLM
    else:
        config = build_tiny_deepseek_v32(tmp_path, **({"num_nextn_predict_layers": 0} if variant == "v32_no_mtp" else {}))
        cls = tf.DeepseekV32ForCausalLM
    model, info = cls.from_pretrained(str(tmp_path), dtype=dtype, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    n = config["num_hidden_layers"]
    if variant == "v32":
        assert info["unexpected_keys"] and all(k.startswith(f"model.layers.{n}.") for k in info["unexpected_keys"])
    else:
        assert not info["unexpected_keys"], info
    raw = raw_tensors(str(tmp_path))
    params = model.state_dict()

    def check(param, hf_value):
        assert torch.equal(params[param].float(), hf_value.float()), param

    for i in range(n):
        p = f"model.layers.{i}."
        check(p + "input_layernorm.weight", raw[p + "input_layernorm.weight"])
        check(p + "self_attn.o_proj.weight", raw[p + "self_attn.o_proj.weight"])
        for j in (0, 5):
            e = p + f"mlp.experts.{j}."
            if e + "gate_proj.weight" in raw:
                gate_up = torch.cat([raw[e + "gate_proj.weight"], raw[e + "up_proj.weight"]], 0)
                assert torch.equal(params[p + "mlp.experts.gate_up_proj"][j].float(), gate_up.float())
                assert torch.equal(params[p + "mlp.experts.down_proj"][j].float(), raw[e + "down_proj.weight"].float())
        if variant.startswith("qwen"):
            for x in ("q_proj", "k_proj", "v_proj", "q_norm", "k_norm"):
                check(p + f"self_attn.{x}.weight", raw[p + f"self_attn.{x}.weight"])
            check(p + "mlp.gate.weight", raw[p + "mlp.gate.weight"])
        else:
            for x in ("wq_b.weight", "wk.weight", "k_norm.weight", "k_norm.bias", "weights_proj.weight"):
                check(p + f"self_attn.indexer.{x}", raw[p + f"self_attn.indexer.{x}"])
    check("model.embed_tokens.weight", raw["model.embed_tokens.weight"])
    if variant == "qwen_tied":
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    else:
        check("lm_head.weight", raw["lm_head.weight"])
    if variant.startswith("qwen"):
        assert model.config.num_experts == 8 and model.config.head_dim == 24
        # transformers 5 writes the expert count as num_local_experts (spec "Qwen3-MoE")
        assert "num_local_experts" in model.config.to_dict() and "num_experts" not in model.config.to_dict()
    else:
        # surprising: DeepseekV32Config.head_dim is the rope slice, not an attention head size
        assert model.config.head_dim == config["qk_rope_head_dim"]
    with torch.no_grad():
        logits = model(torch.tensor([[0, 5, 17, 42, 99, 200, 3]])).logits
    assert logits.shape == (1, 7, 256) and torch.isfinite(logits).all()


# --------------------------------------------------------------------------------------------------
# Qwen3-MoE: key lists and shapes

# one Qwen3-MoE decoder layer at EP 2 (4 local experts), no grouped GEMM, written out by hand
QWEN_LAYER_0_LOCAL_EP2 = [
    "decoder.layers.0.input_layernorm.weight",
    "decoder.layers.0.self_attention.linear_qkv.weight",
    "decoder.layers.0.self_attention.q_layernorm.weight",
    "decoder.layers.0.self_attention.k_layernorm.weight",
    "decoder.layers.0.self_attention.linear_proj.weight",
    "decoder.layers.0.pre_mlp_layernorm.weight",
    "decoder.layers.0.mlp.router.weight",
    "decoder.layers.0.mlp.experts.local_experts.0.linear_fc1.weight",
    "decoder.layers.0.mlp.experts.local_experts.0.linear_fc2.weight",
    "decoder.layers.0.mlp.experts.local_experts.1.linear_fc1.weight",
    "decoder.layers.0.mlp.experts.local_experts.1.linear_fc2.weight",
    "decoder.layers.0.mlp.experts.local_experts.2.linear_fc1.weight",
    "decoder.layers.0.mlp.experts.local_experts.2.linear_fc2.weight",
    "decoder.layers.0.mlp.experts.local_experts.3.linear_fc1.weight",
    "decoder.layers.0.mlp.experts.local_experts.3.linear_fc2.weight",
]

QWEN_LAYER_0_GEMM = [
    "decoder.layers.0.input_layernorm.weight",
    "decoder.layers.0.self_attention.linear_qkv.weight",
    "decoder.layers.0.self_attention.q_layernorm.weight",
    "decoder.layers.0.self_attention.k_layernorm.weight",
    "decoder.layers.0.self_attention.linear_proj.weight",
    "decoder.layers.0.pre_mlp_layernorm.weight",
    "decoder.layers.0.mlp.router.weight",
    "decoder.layers.0.mlp.experts.weight1",
    "decoder.layers.0.mlp.experts.weight2",
]


def _at(keys, layer):
    return [k.replace("decoder.layers.0.", f"decoder.layers.{layer}.") for k in keys]


def test_qwen_exact_key_lists_pp2_ep2_local(qwen_dir):
    out = reference_hf_to_mcore_family(qwen_dir, pp=2, ep=2)
    assert set(out) == {"latest_checkpointed_iteration.txt"} | {
        rank_path(f"mp_rank_00_{p:03d}_{e:03d}") for p in range(2) for e in range(2)
    }
    stage0 = ["embedding.word_embeddings.weight"] + QWEN_LAYER_0_LOCAL_EP2 + _at(QWEN_LAYER_0_LOCAL_EP2, 1)
    stage1 = (QWEN_LAYER_0_LOCAL_EP2 + _at(QWEN_LAYER_0_LOCAL_EP2, 1)
              + ["decoder.final_layernorm.weight", "output_layer.weight"])
    for e in range(2):
        obj = out[rank_path(f"mp_rank_00_000_{e:03d}")]
        assert list(obj) == ["model", "checkpoint_version", "iteration"]
        assert type(obj["checkpoint_version"]) is float and obj["checkpoint_version"] == 3.0 and obj["iteration"] == 1
        assert list(obj["model"]) == stage0
        assert list(state(out, f"mp_rank_00_001_{e:03d}")) == stage1
    assert out["latest_checkpointed_iteration.txt"] == b"1"


def test_qwen_exact_key_list_tp2_gemm(qwen_dir):
    out = reference_hf_to_mcore_family(qwen_dir, tp=2, moe_grouped_gemm=True)
    want = (["embedding.word_embeddings.weight"] + [k for layer in range(4) for k in _at(QWEN_LAYER_0_GEMM, layer)]
            + ["decoder.final_layernorm.weight", "output_layer.weight"])
    assert set(out) == {"latest_checkpointed_iteration.txt", rank_path("mp_rank_00"), rank_path("mp_rank_01")}
    for t in range(2):
        assert list(state(out, f"mp_rank_{t:02d}")) == want
    assert not any(k.endswith(("bias", "expert_bias")) or "shared_experts" in k or k.startswith("mtp")
                   for k in want)


def qwen_shapes(tp, ep, extend=False):
    n = QE // (ep * tp) if extend else QE // ep
    tpe = 1 if extend else tp
    return {
        "embedding.word_embeddings.weight": (QV // tp, QH),
        "output_layer.weight": (QV // tp, QH),
        "linear_qkv": ((QNH + 2 * QNG) * QD // tp, QH),
        "q_layernorm": (QD,),
        "k_layernorm": (QD,),
        "linear_proj": (QH, QNH * QD // tp),
        "router": (QE, QH),
        "weight1": (QH, n * 2 * QFM // tpe),
        "weight2": (n * QFM // tpe, QH),
        "linear_fc1": (2 * QFM // tpe, QH),
        "linear_fc2": (QH, QFM // tpe),
        "norm": (QH,),
    }


def qwen_role(key):
    if key in ("embedding.word_embeddings.weight", "output_layer.weight"):
        return key
    if key.endswith(("input_layernorm.weight", "pre_mlp_layernorm.weight", "final_layernorm.weight")):
        return "norm"
    return key.split(".")[-2] if key.endswith(".weight") and "experts.weight" not in key else key.split(".")[-1]


@pytest.mark.parametrize("gemm", [False, True])
@pytest.mark.parametrize("tp,pp,ep,extend", [(1, 1, 1, False), (2, 1, 2, False), (2, 2, 4, False), (1, 4, 8, False),
                                             (2, 2, 2, True), (2, 1, 4, True)])
def test_qwen_per_rank_shapes_and_dtypes(qwen_dir, tp, pp, ep, extend, gemm):
    shapes = qwen_shapes(tp, ep, extend)
    out = reference_hf_to_mcore_family(qwen_dir, tp=tp, pp=pp, ep=ep, moe_grouped_gemm=gemm, moe_tp_extend_ep=extend)
    assert len(rank_files(out)) == tp * pp * ep
    for obj in rank_files(out).values():
        for key, tensor in obj["model"].items():
            assert tuple(tensor.shape) == shapes[qwen_role(key)], key
            assert tensor.dtype == torch.bfloat16 and tensor.is_contiguous(), key


# --------------------------------------------------------------------------------------------------
# Qwen3-MoE: the GQA linear_qkv group interleave


def test_qwen3_qkv_rows_by_hand():
    """nh 4, ng 2, d 2: rows [q heads 0, 1; k head 0; v head 0; q heads 2, 3; k head 1; v head 1]."""
    d, hidden = 2, 3
    q = torch.arange(4 * d).repeat_interleave(hidden).reshape(4 * d, hidden).float()  # row r holds r
    k = 100 + torch.arange(2 * d).repeat_interleave(hidden).reshape(2 * d, hidden).float()
    v = 200 + torch.arange(2 * d).repeat_interleave(hidden).reshape(2 * d, hidden).float()
    qkv = qwen3_qkv(q, k, v, heads=4, kv_heads=2)
    assert qkv[:, 0].tolist() == [0, 1, 2, 3, 100, 101, 200, 201, 4, 5, 6, 7, 102, 103, 202, 203]
    assert torch.equal(qkv[:, 1], qkv[:, 0]) and torch.equal(qkv[:, 2], qkv[:, 0])


def _hand_built_qkv(w, layer, groups):
    """linear_qkv rows of the given kv groups, built head by head with loops."""
    a = f"model.layers.{layer}.self_attn."
    rows = []
    per = QNH // QNG
    for g in groups:
        for h in range(g * per, (g + 1) * per):
            rows.append(w[a + "q_proj.weight"][h * QD:(h + 1) * QD])
        rows.append(w[a + "k_proj.weight"][g * QD:(g + 1) * QD])
        rows.append(w[a + "v_proj.weight"][g * QD:(g + 1) * QD])
    return torch.cat(rows, 0)


@pytest.mark.parametrize("tp", [1, 2])
def test_qwen_linear_qkv_matches_hand_built_groups(qwen_dir, qwen, tp):
    _, w = qwen
    out = reference_hf_to_mcore_family(qwen_dir, tp=tp)
    for t in range(tp):
        sd = state(out, f"mp_rank_{t:02d}")
        groups = range(t * QNG // tp, (t + 1) * QNG // tp)  # TP rank t holds whole kv groups
        for layer in range(4):
            assert same(sd[f"decoder.layers.{layer}.self_attention.linear_qkv.weight"],
                        _hand_built_qkv(w, layer, groups))


def test_qwen_linear_qkv_is_not_plain_concatenation(qwen_dir, qwen):
    _, w = qwen
    qkv = state(reference_hf_to_mcore_family(qwen_dir), "mp_rank_00")["decoder.layers.0.self_attention.linear_qkv.weight"]
    a = "model.layers.0.self_attn."
    naive = torch.cat([w[a + "q_proj.weight"], w[a + "k_proj.weight"], w[a + "v_proj.weight"]], 0)
    assert qkv.shape == naive.shape and not same(qkv, naive)
    assert same(qkv[: 2 * QD], w[a + "q_proj.weight"][: 2 * QD])  # group 0 starts with q heads 0, 1 ...
    assert same(qkv[2 * QD: 3 * QD], w[a + "k_proj.weight"][:QD])  # ... then k head 0


# --------------------------------------------------------------------------------------------------
# Qwen3-MoE: TP pieces, EP, tp-extend-ep, ETP 1


def _ungroup_qkv(qkv):
    """Inverse of the group interleave: (q, k, v)."""
    per_group = qkv.reshape(QNG, (QNH // QNG + 2) * QD, -1)
    q = per_group[:, : QNH // QNG * QD].reshape(-1, qkv.shape[1])
    k = per_group[:, QNH // QNG * QD: (QNH // QNG + 1) * QD].reshape(-1, qkv.shape[1])
    v = per_group[:, (QNH // QNG + 1) * QD:].reshape(-1, qkv.shape[1])
    return q, k, v


def test_qwen_tp_pieces_restore_hf_tensors(qwen_dir, qwen):
    _, w = qwen
    tp = 2
    out = reference_hf_to_mcore_family(qwen_dir, tp=tp)
    sds = [state(out, f"mp_rank_{t:02d}") for t in range(tp)]

    def cat(key, dim):
        return torch.cat([sd[key] for sd in sds], dim)

    assert same(cat("embedding.word_embeddings.weight", 0), w["model.embed_tokens.weight"])
    assert same(cat("output_layer.weight", 0), w["lm_head.weight"])
    for sd in sds:
        assert same(sd["decoder.final_layernorm.weight"], w["model.norm.weight"])
    for i in range(4):
        src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
        q, k, v = _ungroup_qkv(cat(dst + "self_attention.linear_qkv.weight", 0))
        assert same(q, w[src + "self_attn.q_proj.weight"])
        assert same(k, w[src + "self_attn.k_proj.weight"])
        assert same(v, w[src + "self_attn.v_proj.weight"])
        assert same(cat(dst + "self_attention.linear_proj.weight", 1), w[src + "self_attn.o_proj.weight"])
        for sd in sds:  # replicated
            assert same(sd[dst + "input_layernorm.weight"], w[src + "input_layernorm.weight"])
            assert same(sd[dst + "pre_mlp_layernorm.weight"], w[src + "post_attention_layernorm.weight"])
            assert same(sd[dst + "self_attention.q_layernorm.weight"], w[src + "self_attn.q_norm.weight"])
            assert same(sd[dst + "self_attention.k_layernorm.weight"], w[src + "self_attn.k_norm.weight"])
            assert same(sd[dst + "mlp.router.weight"], w[src + "mlp.gate.weight"])
        for j in range(QE):
            fc1 = [sd[dst + f"mlp.experts.local_experts.{j}.linear_fc1.weight"] for sd in sds]
            gates, ups = zip(*(torch.chunk(x, 2, 0) for x in fc1))  # rank t: [gate_t; up_t]
            assert same(torch.cat(gates, 0), w[src + f"mlp.experts.{j}.gate_proj.weight"])
            assert same(torch.cat(ups, 0), w[src + f"mlp.experts.{j}.up_proj.weight"])
            assert same(cat(dst + f"mlp.experts.local_experts.{j}.linear_fc2.weight", 1),
                        w[src + f"mlp.experts.{j}.down_proj.weight"])


@pytest.mark.parametrize("gemm", [False, True])
@pytest.mark.parametrize("ep", [1, 2, 4, 8])
def test_qwen_ep_union_covers_every_expert_once(qwen_dir, qwen, ep, gemm):
    _, w = qwen
    n = QE // ep
    out = reference_hf_to_mcore_family(qwen_dir, ep=ep, moe_grouped_gemm=gemm)
    names = ["mp_rank_00"] if ep == 1 else [f"mp_rank_00_{e:03d}" for e in range(ep)]
    for layer in range(4):
        experts = {j: w[f"model.layers.{layer}.mlp.experts.{j}.down_proj.weight"] for j in range(QE)}
        seen = []
        for e, name in enumerate(names):
            sd = state(out, name)
            p = f"decoder.layers.{layer}.mlp.experts."
            for q in range(n):
                if gemm:
                    down = sd[p + "weight2"].view(n, -1, QH)[q].t()
                    fc1 = sd[p + "weight1"].view(n, QH, -1)[q].t()
                else:
                    down = sd[p + f"local_experts.{q}.linear_fc2.weight"]
                    fc1 = sd[p + f"local_experts.{q}.linear_fc1.weight"]
                found = [j for j, x in experts.items() if same(down.contiguous(), x)]
                assert found == [e * n + q]
                x = f"model.layers.{layer}.mlp.experts.{e * n + q}."
                assert same(fc1.contiguous(), torch.cat([w[x + "gate_proj.weight"], w[x + "up_proj.weight"]], 0))
                seen += found
        assert sorted(seen) == list(range(QE))
    ref = state(out, names[0])
    for name in names[1:]:
        sd = state(out, name)
        common = [k for k in ref if ".experts." not in k]
        assert common == [k for k in sd if ".experts." not in k]
        assert all(same(sd[k], ref[k]) for k in common)


def _whole_experts(sd, pre, gemm, n):
    if gemm:
        w1 = sd[pre + "mlp.experts.weight1"].view(n, QH, 2 * QFM)
        w2 = sd[pre + "mlp.experts.weight2"].view(n, QFM, QH)
        return [(w1[q].t().contiguous(), w2[q].t().contiguous()) for q in range(n)]
    return [(sd[pre + f"mlp.experts.local_experts.{q}.linear_fc1.weight"],
             sd[pre + f"mlp.experts.local_experts.{q}.linear_fc2.weight"]) for q in range(n)]


def _hf_whole(w, layer, j):
    x = f"model.layers.{layer}.mlp.experts.{j}."
    return torch.cat([w[x + "gate_proj.weight"], w[x + "up_proj.weight"]], 0), w[x + "down_proj.weight"]


@pytest.mark.parametrize("gemm", [False, True])
@pytest.mark.parametrize("tp,ep", [(2, 1), (2, 2), (2, 4), (1, 4)])
def test_qwen_tp_extend_ep_whole_experts_in_buckets(qwen_dir, qwen, tp, ep, gemm):
    _, w = qwen
    n = QE // (ep * tp)
    out = reference_hf_to_mcore_family(qwen_dir, tp=tp, ep=ep, moe_grouped_gemm=gemm, moe_tp_extend_ep=True)
    base = reference_hf_to_mcore_family(qwen_dir, tp=tp, ep=ep, moe_grouped_gemm=gemm)
    assert set(out) == set(base)
    for layer in (0, 3):
        pre = f"decoder.layers.{layer}."
        covered = []
        for t in range(tp):
            for e in range(ep):
                name = rank_dir_name_(t, e, ep)
                sd, bsd = state(out, name), state(base, name)
                assert [k for k in sd if ".experts." not in k] == [k for k in bsd if ".experts." not in k]
                assert all(same(sd[k], bsd[k]) for k in sd if ".experts." not in k)
                b = e * tp + t
                for q, (fc1, fc2) in enumerate(_whole_experts(sd, pre, gemm, n)):
                    want1, want2 = _hf_whole(w, layer, b * n + q)
                    assert same(fc1, want1) and same(fc2, want2)
                    covered.append(b * n + q)
        assert sorted(covered) == list(range(QE))


@pytest.mark.parametrize("tp,ep,pairs", [(2, 1, [(0, 0), (1, 0)]), (2, 2, [(0, 0), (1, 1)]),
                                         (2, 4, [(0, 0), (1, 1), (0, 2), (1, 3)])])
@pytest.mark.parametrize("gemm", [False, True])
def test_qwen_etp1_file_set_and_whole_experts(qwen_dir, qwen, tp, ep, pairs, gemm):
    _, w = qwen
    n = QE // ep
    out = reference_hf_to_mcore_family(qwen_dir, tp=tp, pp=2, ep=ep, moe_grouped_gemm=gemm,
                                       expert_tensor_parallel_size=1)
    assert set(rank_files(out)) == {rank_path(rank_dir_name_(t, e, ep, p)) for t, e in pairs for p in range(2)}
    base = reference_hf_to_mcore_family(qwen_dir, tp=tp, pp=2, ep=ep, moe_grouped_gemm=gemm)
    for p in range(2):
        covered = set()
        for t, e in pairs:
            name = rank_dir_name_(t, e, ep, p)
            sd, bsd = state(out, name), state(base, name)
            assert all(same(sd[k], bsd[k]) for k in sd if ".experts." not in k)  # attention TP-split by t
            for q, (fc1, fc2) in enumerate(_whole_experts(sd, "decoder.layers.1.", gemm, n)):
                want1, want2 = _hf_whole(w, 2 * p + 1, e * n + q)
                assert same(fc1, want1) and same(fc2, want2)
                covered.add(e * n + q)
        assert sorted(covered) == list(range(QE))


def test_qwen_etp_equal_to_tp_is_the_default(qwen_dir):
    kwargs = dict(tp=2, pp=2, ep=2, moe_grouped_gemm=True)
    assert_same_checkpoint(reference_hf_to_mcore_family(qwen_dir, expert_tensor_parallel_size=2, **kwargs),
                           reference_hf_to_mcore_family(qwen_dir, **kwargs), check_order=True)


def test_qwen_num_local_experts_spelling_converts_the_same(qwen_dir, qwen_local_dir):
    kwargs = dict(tp=2, pp=2, ep=2, moe_grouped_gemm=True)
    assert_same_checkpoint(reference_hf_to_mcore_family(qwen_local_dir, **kwargs),
                           reference_hf_to_mcore_family(qwen_dir, **kwargs), check_order=True)


# --------------------------------------------------------------------------------------------------
# Qwen3-MoE: placement (spec 4 via the families spec "Placement")


def _layers_of_n(sd, w, n):
    locals_ = sorted({int(k.split(".")[2]) for k in sd if k.startswith("decoder.layers.")})
    out = []
    for local in locals_:
        norm = sd[f"decoder.layers.{local}.input_layernorm.weight"]
        found = [i for i in range(n) if same(norm, w[f"model.layers.{i}.input_layernorm.weight"])]
        assert len(found) == 1
        out.append((local, found[0]))
    return out


@pytest.mark.parametrize(
    "kwargs",
    [
        {"pp": 2},
        {"pp": 4},
        {"pp": 2, "vpp_layers": 1},
        {"pp": 1, "vpp_layers": 2},
        {"pp": 2, "num_layers": 6, "noop_layers": [1, 4]},
        {"pp": 2, "num_layer_list": [1, 3]},
        {"pp": 2, "dualpipev": True},
        {"pp": 1, "dualpipev": True, "num_layers": 4, "noop_layers": [1]},
        {"pp": 2, "vpp_layers": 1, "num_layers": 4, "noop_layers": [0]},
    ],
)
def test_qwen_placement_follows_reference_placement(qwen_dir, qwen, kwargs):
    _, w = qwen
    out = reference_hf_to_mcore_family(qwen_dir, **kwargs)
    pp = kwargs["pp"]
    num_layers = kwargs.get("num_layers", 4)
    place = reference_placement(num_layers, pp, **{k: v for k, v in kwargs.items() if k not in ("pp", "num_layers")})
    vpp = kwargs.get("vpp_layers")
    final = (0, 1) if kwargs.get("dualpipev") else (pp - 1, (num_layers // pp // vpp - 1) if vpp else 0)
    chunked = vpp is not None or kwargs.get("dualpipev")
    for p in range(pp):
        obj = out[rank_path("mp_rank_00" if pp == 1 else f"mp_rank_00_{p:03d}")]
        chunks = chunks_of(obj)
        if chunked:
            assert list(obj) == ["checkpoint_version", "iteration"] + [f"model{v}" for v in range(len(chunks))]
        else:
            assert list(obj) == ["model", "checkpoint_version", "iteration"]
        for v, sd in enumerate(chunks):
            assert _layers_of_n(sd, w, 4) == place[(p, v)]
            keys = list(sd)
            # the embedding in pp0 chunk 0, even when that chunk has no decoder layer (noop slot 0)
            assert ("embedding.word_embeddings.weight" in sd) == ((p, v) == (0, 0))
            if (p, v) == (0, 0):
                assert keys[0] == "embedding.word_embeddings.weight"
            if (p, v) == final:
                assert keys[-2:] == ["decoder.final_layernorm.weight", "output_layer.weight"]
            else:
                assert "decoder.final_layernorm.weight" not in sd and "output_layer.weight" not in sd


def test_qwen_vpp_noop_slot_0_keeps_the_embedding(qwen_dir, qwen):
    """Families spec "Placement" and wrong-2: the embedding is in pp0 chunk 0 whatever that chunk holds."""
    _, w = qwen
    out = reference_hf_to_mcore_family(qwen_dir, pp=2, vpp_layers=1, num_layers=4, noop_layers=[0])
    f0, f1 = out[rank_path("mp_rank_00_000")], out[rank_path("mp_rank_00_001")]
    assert list(f0["model0"]) == ["embedding.word_embeddings.weight"]  # slot 0 is noop
    assert same(f0["model0"]["embedding.word_embeddings.weight"], w["model.embed_tokens.weight"])
    assert _layers_of_n(f1["model0"], w, 4) == [(0, 0)]  # slot 1 <- HF 0
    assert _layers_of_n(f0["model1"], w, 4) == [(0, 1)]  # slot 2 <- HF 1
    assert _layers_of_n(f1["model1"], w, 4) == [(0, 2)]  # slot 3 <- HF 2
    assert list(f1["model1"])[-2:] == ["decoder.final_layernorm.weight", "output_layer.weight"]


# --------------------------------------------------------------------------------------------------
# Qwen3-MoE: tied embeddings


def _output_layers(out):
    """{(path, chunk index): output_layer.weight} over every rank file."""
    found = {}
    for path, obj in rank_files(out).items():
        for v, sd in enumerate(chunks_of(obj)):
            if "output_layer.weight" in sd:
                found[(path, v)] = sd["output_layer.weight"]
    return found


@pytest.mark.parametrize("kwargs", [{}, {"tp": 2, "ep": 2}, {"vpp_layers": 2}, {"dualpipev": True}])
def test_qwen_tied_pp1_stores_no_output_layer(qwen_tied_dir, kwargs):
    out = reference_hf_to_mcore_family(qwen_tied_dir, **kwargs)
    assert rank_files(out) and not _output_layers(out)
    for obj in rank_files(out).values():
        assert any("decoder.final_layernorm.weight" in sd for sd in chunks_of(obj))


@pytest.mark.parametrize("kwargs,final", [
    ({"pp": 2, "tp": 2}, ("_001", 0)),
    ({"pp": 2, "tp": 2, "ep": 2, "moe_grouped_gemm": True}, ("_001", 0)),
    ({"pp": 2, "tp": 2, "vpp_layers": 1}, ("_001", 1)),
    ({"pp": 2, "tp": 2, "dualpipev": True, "moe_tp_extend_ep": True}, ("_000", 1)),  # pp0 model1
    ({"pp": 4}, ("_003", 0)),
])
def test_qwen_tied_pp_gt_1_last_stage_stores_the_embedding_chunk(qwen_tied_dir, kwargs, final):
    _, w = load_hf(qwen_tied_dir)
    tp = kwargs.get("tp", 1)
    out = reference_hf_to_mcore_family(qwen_tied_dir, **kwargs)
    found = _output_layers(out)
    assert found
    for (path, v), tensor in found.items():
        rank_dir = path.split("/")[1]
        assert rank_dir[len("mp_rank_00"):].startswith(final[0]) and v == final[1], path
        t = int(rank_dir[len("mp_rank_"):len("mp_rank_00")])
        assert same(tensor, torch.chunk(w["model.embed_tokens.weight"], tp, 0)[t])
        sd = chunks_of(out[path])[v]
        assert list(sd)[-2:] == ["decoder.final_layernorm.weight", "output_layer.weight"]
    # one per final-chunk rank file: every (tp, ep) of the last stage
    assert len(found) == tp * kwargs.get("ep", 1)


def test_qwen_tied_equals_untied_apart_from_output_layer(tmp_path):
    untied, tied = tmp_path / "untied", tmp_path / "tied"
    build_tiny_qwen3_moe(untied)
    build_tiny_qwen3_moe(tied, tied=True)  # same seed: the same tensors, lm_head left out
    kwargs = dict(tp=2, pp=2, ep=2, moe_grouped_gemm=True)
    a = reference_hf_to_mcore_family(str(untied), **kwargs)
    b = reference_hf_to_mcore_family(str(tied), **kwargs)
    _, w = load_hf(str(untied))
    assert not same(w["lm_head.weight"], w["model.embed_tokens.weight"])
    for path, obj in rank_files(a).items():
        sa, sb = obj["model"], b[path]["model"]
        assert list(sa) == list(sb)
        for key in sa:
            if key == "output_layer.weight":
                t = int(path.split("/")[1][len("mp_rank_"):len("mp_rank_00")])
                assert same(sa[key], torch.chunk(w["lm_head.weight"], 2, 0)[t])
                assert same(sb[key], torch.chunk(w["model.embed_tokens.weight"], 2, 0)[t])
            else:
                assert same(sa[key], sb[key]), key


def test_qwen_tied_with_lm_head_in_the_files(tmp_path):
    config = build_tiny_qwen3_moe(tmp_path, num_shards=1, tied=True)
    path = tmp_path / "model-00001-of-00001.safetensors"
    tensors = load_file(str(path))
    with_copy = dict(tensors, **{"lm_head.weight": tensors["model.embed_tokens.weight"].clone()})
    save_file(with_copy, str(path))
    index = read_json(tmp_path / "model.safetensors.index.json")
    index["weight_map"]["lm_head.weight"] = path.name
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert config["tie_word_embeddings"]
    out = reference_hf_to_mcore_family(str(tmp_path), pp=2)  # an equal lm_head is accepted (and not read)
    assert same(state(out, "mp_rank_00_001")["output_layer.weight"], tensors["model.embed_tokens.weight"])
    different = dict(with_copy, **{"lm_head.weight": tensors["model.embed_tokens.weight"] + 1})
    save_file(different, str(path))
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        reference_hf_to_mcore_family(str(tmp_path), pp=2)


# --------------------------------------------------------------------------------------------------
# Qwen3-MoE: refusals


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"tp": 4}, "num_key_value_heads 2 not divisible by tp 4"),  # TP > kv heads: refused (spec, wrong 4)
        ({"tp": 3}, "num_key_value_heads"),
        ({"tp": 0}, "tp"),
        ({"ep": 3}, "num_experts 8 not divisible by ep 3"),
        ({"ep": 16}, "num_experts"),
        ({"tp": 2, "ep": 8, "moe_tp_extend_ep": True}, "ep \\* tp"),
        ({"pp": 3}, "not divisible by pp"),
        ({"num_layers": 5}, "real layers"),
        ({"mla_mm_split": True}, "MLA"),
        ({"mla_key_names": "legacy"}, "MLA"),
        ({"mla_key_names": "old"}, "mla_key_names"),
        ({"mtp_num_layers": 1}, "no MTP"),
        ({"tp": 2, "expert_tensor_parallel_size": 4}, "expert_tensor_parallel_size"),
        ({"expert_tensor_parallel_size": 2}, "expert_tensor_parallel_size"),
        ({"tp": 2, "moe_tp_extend_ep": True, "expert_tensor_parallel_size": 1}, "mutually exclusive"),
        ({"tp": 2, "pp": 2, "dualpipev": True}, "moe-tp-extend-ep"),
        ({"tp": 2, "pp": 2, "dualpipev": True, "expert_tensor_parallel_size": 1}, "dualpipev"),
        ({"pp": 2, "vpp_layers": 3}, "vpp_layers"),
        ({"pp": 2, "num_layer_list": [1, 2]}, "sums to 3"),
    ],
)
def test_qwen_refusals(qwen_dir, kwargs, match):
    with pytest.raises(ValueError, match=match):
        reference_hf_to_mcore_family(qwen_dir, **kwargs)


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"mlp_only_layers": [1]}, "every-layer-MoE"),
        ({"decoder_sparse_step": 2}, "every-layer-MoE"),
        ({"attention_bias": True}, "attention_bias"),
        ({"num_local_experts": 4}, "disagree"),
        ({"head_dim": 16}, "q_proj"),  # config not matching the tensors
        ({"model_type": "qwen3"}, "model_type"),
    ],
)
def test_qwen_config_refusals(tmp_path, overrides, match):
    build_tiny_qwen3_moe(tmp_path, num_shards=1)
    reference_hf_to_mcore_family(str(tmp_path))
    config = read_json(tmp_path / "config.json")
    config.update(overrides)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        reference_hf_to_mcore_family(str(tmp_path))


def test_qwen_tp_4_with_4_kv_heads_is_fine(tmp_path):
    build_tiny_qwen3_moe(tmp_path, num_shards=1, num_key_value_heads=4)
    out = reference_hf_to_mcore_family(str(tmp_path), tp=4)
    _, w = load_hf(str(tmp_path))
    for t in range(4):  # group t = q head t, k head t, v head t
        a = "model.layers.0.self_attn."
        want = torch.cat([w[a + f"{x}_proj.weight"][t * QD:(t + 1) * QD] for x in "qkv"], 0)
        assert same(state(out, f"mp_rank_{t:02d}")["decoder.layers.0.self_attention.linear_qkv.weight"], want)


# --------------------------------------------------------------------------------------------------
# DeepSeek-V3.2


INDEXER = [
    "self_attention.dsa_indexer.wq_b.weight",
    "self_attention.dsa_indexer.wk.weight",
    "self_attention.dsa_indexer.k_norm.weight",
    "self_attention.dsa_indexer.k_norm.bias",
    "self_attention.dsa_indexer.weights_proj.weight",
]

# a DeepSeek-V3.2 MoE layer (grouped GEMM) and a dense layer, written out by hand
V32_MOE_LAYER_0_GEMM = [
    "decoder.layers.0.input_layernorm.weight",
    "decoder.layers.0.self_attention.linear_qkv.weight",
    "decoder.layers.0.self_attention.q_layernorm.weight",
    "decoder.layers.0.self_attention.kv_layernorm.weight",
    "decoder.layers.0.self_attention.linear_q_up_proj.weight",
    "decoder.layers.0.self_attention.linear_kv_up_proj.weight",
    "decoder.layers.0.self_attention.dsa_indexer.wq_b.weight",
    "decoder.layers.0.self_attention.dsa_indexer.wk.weight",
    "decoder.layers.0.self_attention.dsa_indexer.k_norm.weight",
    "decoder.layers.0.self_attention.dsa_indexer.k_norm.bias",
    "decoder.layers.0.self_attention.dsa_indexer.weights_proj.weight",
    "decoder.layers.0.self_attention.linear_proj.weight",
    "decoder.layers.0.pre_mlp_layernorm.weight",
    "decoder.layers.0.mlp.router.weight",
    "decoder.layers.0.mlp.router.expert_bias",
    "decoder.layers.0.mlp.shared_experts.linear_fc1.weight",
    "decoder.layers.0.mlp.shared_experts.linear_fc2.weight",
    "decoder.layers.0.mlp.experts.weight1",
    "decoder.layers.0.mlp.experts.weight2",
]
V32_DENSE_LAYER_0 = V32_MOE_LAYER_0_GEMM[:13] + [
    "decoder.layers.0.mlp.linear_fc1.weight",
    "decoder.layers.0.mlp.linear_fc2.weight",
]


def test_v32_exact_key_lists_pp2_ep2_gemm_mtp(v32_dir):
    out = reference_hf_to_mcore_family(v32_dir, pp=2, ep=2, moe_grouped_gemm=True, mtp_num_layers=1)
    mtp = [k.replace("decoder.layers.0.", "mtp.layers.0.transformer_layer.") for k in V32_MOE_LAYER_0_GEMM]
    stage0 = ["embedding.word_embeddings.weight"] + V32_DENSE_LAYER_0 + _at(V32_MOE_LAYER_0_GEMM, 1)
    stage1 = (["embedding.word_embeddings.weight"] + V32_MOE_LAYER_0_GEMM + _at(V32_MOE_LAYER_0_GEMM, 1)
              + ["final_layernorm.weight", "output_layer.weight",
                 "mtp.layers.0.enorm.weight", "mtp.layers.0.hnorm.weight", "mtp.layers.0.eh_proj.weight"]
              + mtp + ["mtp.final_layernorms.0.weight"])
    assert len(rank_files(out)) == 4
    for e in range(2):
        assert list(state(out, f"mp_rank_00_000_{e:03d}")) == stage0
        assert list(state(out, f"mp_rank_00_001_{e:03d}")) == stage1


def test_v32_mm_split_key_order(v32_dir):
    sd = state(reference_hf_to_mcore_family(v32_dir, tp=2, mla_mm_split=True), "mp_rank_01")
    attention = [k[len("decoder.layers.2."):] for k in sd if k.startswith("decoder.layers.2.self_attention.")]
    assert attention == [
        "self_attention.linear_qkv.weight",
        "self_attention.q_layernorm.weight",
        "self_attention.kv_layernorm.weight",
        "self_attention.linear_qk_nope.weight",
        "self_attention.linear_qk_rope.weight",
        "self_attention.linear_kv_nope.weight",
        "self_attention.linear_v.weight",
    ] + INDEXER + ["self_attention.linear_proj.weight"]


def _without_indexer(out):
    stripped = {}
    for path, obj in out.items():
        if isinstance(obj, bytes):
            stripped[path] = obj
            continue
        stripped[path] = {k: (type(v)((kk, t) for kk, t in v.items() if ".dsa_indexer." not in kk)
                              if k.startswith("model") else v) for k, v in obj.items()}
    return stripped


V32_LAYOUTS = [
    {},
    {"tp": 2, "pp": 2, "ep": 2, "moe_grouped_gemm": True, "mtp_num_layers": 1},
    {"tp": 2, "ep": 2, "mtp_num_layers": 1, "mla_mm_split": True},
    {"tp": 2, "pp": 2, "mtp_num_layers": 1, "mla_key_names": "legacy"},
    {"pp": 2, "vpp_layers": 1, "ep": 2, "mtp_num_layers": 1},
    {"pp": 2, "vpp_layers": 1, "num_layers": 4, "noop_layers": [3], "mtp_num_layers": 1},
    {"pp": 2, "num_layers": 6, "noop_layers": [2, 5], "ep": 4},
    {"pp": 2, "num_layer_list": [1, 3], "mtp_num_layers": 1},
    {"tp": 2, "pp": 2, "dualpipev": True, "moe_tp_extend_ep": True, "moe_grouped_gemm": True, "mtp_num_layers": 1},
    {"tp": 2, "pp": 2, "ep": 4, "expert_tensor_parallel_size": 1, "moe_grouped_gemm": True, "mtp_num_layers": 1},
    {"num_layers": 2, "mtp_num_layers": 1},
]


@pytest.mark.parametrize("kwargs", V32_LAYOUTS)
def test_v32_is_v3_plus_the_indexer(v32_dir, v32, kwargs):
    """Without the indexer keys the output is the DeepSeek-V3 reference's, key order included; the indexer keys
    sit right before linear_proj in every decoder and MTP layer, copied whole from that layer's HF indexer."""
    _, w = v32
    out = reference_hf_to_mcore_family(v32_dir, **kwargs)
    assert_same_checkpoint(_without_indexer(out), reference_hf_to_mcore(v32_dir, **kwargs), check_order=True)
    num_layers = 0
    for obj in rank_files(out).values():
        for sd in chunks_of(obj):
            keys = list(sd)
            sources = dict(_layers_of_n(sd, w, 4))
            prefixes = [k[: -len("self_attention.linear_proj.weight")] for k in keys
                        if k.endswith("self_attention.linear_proj.weight")]
            assert len([k for k in keys if ".dsa_indexer." in k]) == 5 * len(prefixes)
            for pre in prefixes:
                i = keys.index(pre + "self_attention.linear_proj.weight")
                assert keys[i - 5:i] == [pre + x for x in INDEXER]
                hf_layer = 4 if pre.startswith("mtp.") else sources[int(pre.split(".")[2])]
                src = f"model.layers.{hf_layer}.self_attn.indexer."
                for x in INDEXER:
                    assert same(sd[pre + x], w[src + x[len("self_attention.dsa_indexer."):]]), (pre, x)
                num_layers += 1
    assert num_layers


def test_v32_indexer_replicated_shapes_dtypes(v32_dir):
    out = reference_hf_to_mcore_family(v32_dir, tp=4, ep=2, mtp_num_layers=1, moe_grouped_gemm=True)
    shapes = {
        "self_attention.dsa_indexer.wq_b.weight": (4 * 48, 48),
        "self_attention.dsa_indexer.wk.weight": (48, 64),
        "self_attention.dsa_indexer.k_norm.weight": (48,),
        "self_attention.dsa_indexer.k_norm.bias": (48,),
        "self_attention.dsa_indexer.weights_proj.weight": (4, 64),
    }
    sds = [obj["model"] for obj in rank_files(out).values()]
    assert len(sds) == 8
    keys = [k for k in sds[0] if ".dsa_indexer." in k]
    assert len(keys) == 5 * 5  # 4 decoder layers + the MTP layer
    for key in keys:
        suffix = key[key.index("self_attention."):]
        for sd in sds:
            assert tuple(sd[key].shape) == shapes[suffix] and sd[key].dtype == torch.bfloat16
            assert same(sd[key], sds[0][key])


def test_v32_fp8_release_converts_like_its_bf16_dequantization(v32_fp8_dir, v32_fp8_bf16_dir):
    raw = raw_tensors(v32_fp8_dir)
    assert raw["model.layers.1.self_attn.indexer.wq_b.weight"].dtype == torch.float8_e4m3fn
    assert raw["model.layers.1.self_attn.indexer.wk.weight"].dtype == torch.float8_e4m3fn
    for kwargs in ({"tp": 2, "pp": 2, "ep": 2, "moe_grouped_gemm": True, "mtp_num_layers": 1},
                   {"tp": 2, "mla_mm_split": True, "mtp_num_layers": 1}):
        fp8 = reference_hf_to_mcore_family(v32_fp8_dir, **kwargs)
        bf16 = reference_hf_to_mcore_family(v32_fp8_bf16_dir, **kwargs)
        assert_same_checkpoint(fp8, bf16, check_order=True)
    sd = state(fp8, "mp_rank_01")
    name = "mtp.layers.0.transformer_layer.self_attention.dsa_indexer.wq_b.weight"
    w, s = raw["model.layers.4.self_attn.indexer.wq_b.weight"], raw["model.layers.4.self_attn.indexer.wq_b.weight_scale_inv"]
    assert sd[name].dtype == torch.bfloat16
    assert same(sd[name][150, 140], (w[150, 140].float() * s[1, 1]).to(torch.bfloat16))
    assert all(t.dtype == torch.bfloat16 for k, t in sd.items() if not k.endswith("expert_bias"))


def test_v32_indexer_dtype_is_copied(tmp_path):
    """A float32 weights_proj stays float32 (the converter copies the dtype it finds)."""
    build_tiny_deepseek_v32(tmp_path, num_shards=1)
    path = tmp_path / "model-00001-of-00001.safetensors"
    tensors = load_file(str(path))
    name = "model.layers.2.self_attn.indexer.weights_proj.weight"
    tensors[name] = tensors[name].float()
    save_file(tensors, str(path))
    sd = state(reference_hf_to_mcore_family(str(tmp_path)), "mp_rank_00")
    assert sd["decoder.layers.2.self_attention.dsa_indexer.weights_proj.weight"].dtype == torch.float32
    assert sd["decoder.layers.1.self_attention.dsa_indexer.weights_proj.weight"].dtype == torch.bfloat16


@pytest.mark.parametrize(
    "overrides,kwargs,match",
    [
        ({}, {"tp": 3}, "num_attention_heads"),  # the DeepSeek-V3 refusals apply
        ({}, {"mtp_num_layers": 2}, "mtp_num_layers"),
        ({}, {"tp": 2, "expert_tensor_parallel_size": 4}, "expert_tensor_parallel_size"),
        ({"index_head_dim": 32}, {}, "indexer.wq_b.weight: shape"),
        ({"index_n_heads": 2}, {}, "indexer.weights_proj.weight: shape"),
    ],
)
def test_v32_refusals(tmp_path, overrides, kwargs, match):
    build_tiny_deepseek_v32(tmp_path, num_shards=1)
    config = read_json(tmp_path / "config.json")
    config.update(overrides)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        reference_hf_to_mcore_family(str(tmp_path), **kwargs)


def test_v32_missing_indexer_tensor_is_refused(tmp_path):
    build_tiny_deepseek_v32(tmp_path, num_shards=1)
    path = tmp_path / "model-00001-of-00001.safetensors"
    tensors = load_file(str(path))
    del tensors["model.layers.4.self_attn.indexer.k_norm.bias"]
    save_file(tensors, str(path))
    index = read_json(tmp_path / "model.safetensors.index.json")
    del index["weight_map"]["model.layers.4.self_attn.indexer.k_norm.bias"]
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    reference_hf_to_mcore_family(str(tmp_path))  # the MTP layer is not converted: fine
    with pytest.raises(ValueError, match="model.layers.4.self_attn.indexer.k_norm.bias: missing"):
        reference_hf_to_mcore_family(str(tmp_path), mtp_num_layers=1)


def test_v32_etp_equal_to_tp_is_the_default(v32_dir):
    kwargs = dict(tp=2, ep=2, moe_grouped_gemm=True, mtp_num_layers=1)
    assert_same_checkpoint(reference_hf_to_mcore_family(v32_dir, expert_tensor_parallel_size=2, **kwargs),
                           reference_hf_to_mcore_family(v32_dir, **kwargs), check_order=True)


def test_deepseek_v3_is_delegated(tmp_path):
    build_tiny_hf(tmp_path)
    kwargs = dict(tp=2, pp=2, ep=2, moe_grouped_gemm=True, mtp_num_layers=1, mla_mm_split=True)
    assert_same_checkpoint(reference_hf_to_mcore_family(str(tmp_path), **kwargs),
                           reference_hf_to_mcore(str(tmp_path), **kwargs), check_order=True)
