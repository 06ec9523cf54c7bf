"""Tiny HF checkpoints of the two "convert_ckpt_v2" families, written from spec/mindspeed_v2_families.md
(independent of streamconv): Qwen3-MoE and DeepSeek-V3.2.

    config = build_tiny_qwen3_moe(tmp_path / "q")                        # bf16, 4 layers, 8 experts, GQA 4/2
    config = build_tiny_qwen3_moe(tmp_path / "q", tied=True)             # no lm_head.weight, tie_word_embeddings
    config = build_tiny_qwen3_moe(tmp_path / "q", experts_key="num_local_experts")  # transformers-5 spelling
    config = build_tiny_deepseek_v32(tmp_path / "d")                     # bf16, tiny V3 + indexer, 1 MTP layer
    config = build_tiny_deepseek_v32(tmp_path / "d8", fp8=True)          # FP8 release format, edge blocks
    dequantize_hf_dir(tmp_path / "d8", tmp_path / "d8_bf16")             # DS fp8_cast_bf16, written independently

As in tests/hf_tiny.py every tensor gets distinct random values (norms and the indexer's LayerNorm bias
included), tensors are spread over ``num_shards`` files in contiguous runs (one layer spans two shards), and
there is an index file and a config.json. Any config field can be overridden with a keyword.

Qwen3-MoE: hidden 64 but heads * head_dim = 4 * 24 = 96 (head_dim is its own field), num_key_value_heads 2
(so TP 1 and 2 are valid, TP 4 is not), every layer MoE, no shared expert, router without bias, no MTP.

DeepSeek-V3.2: the tiny DeepSeek-V3 config of tests/hf_tiny.py plus ``index_n_heads`` 4, ``index_head_dim``
48, ``index_topk`` 8 and the indexer in every layer, MTP layer included: ``self_attn.indexer.wq_b.weight``
[index_n_heads*index_head_dim, q_lora_rank], ``.wk.weight`` [index_head_dim, H], ``.k_norm.weight`` /
``.k_norm.bias`` [index_head_dim] (a LayerNorm), ``.weights_proj.weight`` [index_n_heads, H]. In the FP8
release format ``wq_b`` and ``wk`` are FP8 with a 128x128-block ``weight_scale_inv`` ([192, 144] -> [2, 2] and
[48, 160] -> [1, 2], partial edge blocks), ``weights_proj`` and ``k_norm`` stay bf16.

Notes on transformers 5.25 (checked in tests/reference_suite/test_families.py):
- ``Qwen3MoeConfig`` maps ``num_experts`` to the attribute ``num_local_experts`` and ``save_pretrained`` writes
  ``num_local_experts`` only; ``head_dim`` is not a declared field but is honoured (``getattr``).
- ``DeepseekV32Config`` declares no ``num_nextn_predict_layers`` (it is kept as an extra attribute) and its
  ``__post_init__`` overwrites ``head_dim`` with ``qk_rope_head_dim``; ``save_pretrained`` writes that ``head_dim``
  (64 for the real model), which is *not* an attention head size. Its routing defaults (``n_group`` 8,
  ``topk_group`` 4) need at least 2 experts per group, hence ``n_group`` 2 here.
- ``DeepseekV32PreTrainedModel`` ignores only ``model.layers.61.*`` as unexpected (the 671B MTP layer), so a tiny
  checkpoint's MTP layer (``model.layers.{num_hidden_layers}.*``) is reported as unexpected keys. It keeps
  ``mlp.gate.weight`` and ``e_score_correction_bias`` in float32 whatever ``dtype`` is asked for, and
  ``save_pretrained`` then writes ``mlp.gate.weight`` as float32 (the release stores it bf16): a V3.2 directory
  re-saved by transformers has float32 router weights, which a dtype-copying converter carries into mcore.
"""

import json
import os

import torch
from safetensors.torch import load_file, save_file

from tests.hf_tiny import hf_tensor_specs, tiny_config, write_hf_dir

FP8_BLOCK = 128

QWEN3_MOE_CONFIG = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "hidden_size": 64,
    "vocab_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 24,
    "intermediate_size": 96,  # dense MLP size: unused (every layer MoE), present in the released configs
    "moe_intermediate_size": 32,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "norm_topk_prob": True,
    "attention_bias": False,
    "hidden_act": "silu",
    "max_position_embeddings": 128,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}

V32_EXTRA = {
    "architectures": ["DeepseekV32ForCausalLM"],
    "model_type": "deepseek_v32",
    "index_n_heads": 4,
    "index_head_dim": 48,
    "index_topk": 8,
    # routing groups: transformers' defaults (n_group 8, topk_group 4) need >= 2 experts per group (topk(2))
    "n_group": 2,
    "topk_group": 1,
}

INDEXER_FP8 = ("wq_b", "wk")


def qwen3_moe_config(*, tied=False, experts_key="num_experts", **overrides):
    """The tiny Qwen3-MoE config; ``experts_key`` "num_experts" (released) or "num_local_experts" (transformers 5)."""
    if experts_key not in ("num_experts", "num_local_experts"):
        raise ValueError(f"experts_key must be num_experts or num_local_experts, got {experts_key!r}")
    config = dict(QWEN3_MOE_CONFIG)
    config["tie_word_embeddings"] = bool(tied)
    if experts_key == "num_local_experts":
        config["num_local_experts"] = config.pop("num_experts")
    config.update(overrides)
    return config


def qwen3_moe_tensor_specs(config):
    """``[(name, shape, dtype)]`` of a Qwen3-MoE HF checkpoint, in module order."""
    h, v = config["hidden_size"], config["vocab_size"]
    nh, ng, d = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    fm = config["moe_intermediate_size"]
    experts = config.get("num_experts", config.get("num_local_experts"))
    bf16 = torch.bfloat16
    specs = [("model.embed_tokens.weight", (v, h), bf16)]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        specs += [
            (p + "input_layernorm.weight", (h,), bf16),
            (p + "self_attn.q_proj.weight", (nh * d, h), bf16),
            (p + "self_attn.k_proj.weight", (ng * d, h), bf16),
            (p + "self_attn.v_proj.weight", (ng * d, h), bf16),
            (p + "self_attn.o_proj.weight", (h, nh * d), bf16),
            (p + "self_attn.q_norm.weight", (d,), bf16),
            (p + "self_attn.k_norm.weight", (d,), bf16),
            (p + "post_attention_layernorm.weight", (h,), bf16),
            (p + "mlp.gate.weight", (experts, h), bf16),
        ]
        for j in range(experts):
            specs += [
                (p + f"mlp.experts.{j}.gate_proj.weight", (fm, h), bf16),
                (p + f"mlp.experts.{j}.up_proj.weight", (fm, h), bf16),
                (p + f"mlp.experts.{j}.down_proj.weight", (h, fm), bf16),
            ]
    specs.append(("model.norm.weight", (h,), bf16))
    if not config.get("tie_word_embeddings", False):
        specs.append(("lm_head.weight", (v, h), bf16))
    return specs


def build_tiny_qwen3_moe(path, *, tied=False, experts_key="num_experts", num_shards=3, seed=0, **overrides):
    """Write a tiny Qwen3-MoE HF checkpoint to ``path`` and return its config.

    ``tied``: ``tie_word_embeddings`` true and no ``lm_head.weight`` in the files (as HF saves tied models).
    """
    config = qwen3_moe_config(tied=tied, experts_key=experts_key, **overrides)
    gen = torch.Generator().manual_seed(seed)
    tensors = {name: torch.randn(shape, generator=gen).to(dtype) for name, shape, dtype in qwen3_moe_tensor_specs(config)}
    write_hf_dir(path, config, tensors, num_shards=num_shards)
    return config


def deepseek_v32_config(*, fp8=False, **overrides):
    """The tiny DeepSeek-V3 config (tests/hf_tiny.py, FP8 sizes when ``fp8``) plus the V3.2 fields."""
    config = tiny_config(fp8=fp8)
    config.update(V32_EXTRA)
    config.update(overrides)
    return config


def deepseek_v32_tensor_specs(config):
    """``[(name, shape, dtype, is_fp8_in_release)]``: the V3 tensors (hf_tiny.hf_tensor_specs) with the indexer
    inserted after each layer's ``self_attn.o_proj.weight`` (its module order), MTP layer included."""
    h, q_lora = config["hidden_size"], config["q_lora_rank"]
    n, d = config["index_n_heads"], config["index_head_dim"]
    bf16 = torch.bfloat16
    specs = []
    for name, shape, dtype, quantized in hf_tensor_specs(config):
        specs.append((name, shape, dtype, quantized))
        if name.endswith(".self_attn.o_proj.weight"):
            p = name[: -len("o_proj.weight")] + "indexer."
            specs += [
                (p + "wq_b.weight", (n * d, q_lora), bf16, True),
                (p + "wk.weight", (d, h), bf16, True),
                (p + "k_norm.weight", (d,), bf16, False),
                (p + "k_norm.bias", (d,), bf16, False),
                (p + "weights_proj.weight", (n, h), bf16, False),
            ]
    return specs


def build_tiny_deepseek_v32(path, *, fp8=False, num_shards=3, seed=0, **overrides):
    """Write a tiny DeepSeek-V3.2 HF checkpoint to ``path`` and return its config.

    With ``fp8`` every weight that is FP8 in the release (the V3 ones and the indexer's ``wq_b`` / ``wk``) is
    float8_e4m3fn with a float32 ``<name>_scale_inv`` [ceil(M/128), ceil(N/128)]. As in tests/hf_tiny.py the MTP
    layer's ``embed_tokens`` / ``shared_head.head`` are not copies of the main ones.
    """
    config = deepseek_v32_config(fp8=fp8, **overrides)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape, dtype, quantized in deepseek_v32_tensor_specs(config):
        values = torch.randn(shape, generator=gen)
        if fp8 and quantized:
            tensors[name] = (values * 4).to(torch.float8_e4m3fn)
            scale_shape = (-(-shape[0] // FP8_BLOCK), -(-shape[1] // FP8_BLOCK))
            tensors[name + "_scale_inv"] = torch.rand(scale_shape, generator=gen) * 0.01 + 1e-3
        else:
            tensors[name] = values.to(dtype)
    write_hf_dir(path, config, tensors, num_shards=num_shards)
    return config


def _block_dequant(weight, scale):
    """DS ``weight_dequant``: per 128x128 block, float32 multiply then bf16; edge blocks partial."""
    out = torch.empty(weight.shape, dtype=torch.bfloat16)
    for bi in range(scale.shape[0]):
        for bj in range(scale.shape[1]):
            rows = slice(bi * FP8_BLOCK, (bi + 1) * FP8_BLOCK)
            cols = slice(bj * FP8_BLOCK, (bj + 1) * FP8_BLOCK)
            out[rows, cols] = (weight[rows, cols].to(torch.float32) * scale[bi, bj].item()).to(torch.bfloat16)
    return out


def dequantize_hf_dir(src, dst):
    """What DeepSeek's ``fp8_cast_bf16.py`` makes of an FP8 directory (spec 1.4): same shard names, every 1-byte
    tensor dequantized with its ``_scale_inv`` (from whichever shard holds it), the scales dropped, everything
    else copied; the index without the scales; config.json without ``quantization_config``. Returns the config."""
    src, dst = str(src), str(dst)
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(src, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    files = sorted(set(weight_map.values()))
    everything = {}
    for file_name in files:
        everything.update(load_file(os.path.join(src, file_name)))
    new_map, total = {}, 0
    for file_name in files:
        part = {}
        for name, tensor in load_file(os.path.join(src, file_name)).items():
            if name.endswith("_scale_inv"):
                continue
            if tensor.element_size() == 1:
                tensor = _block_dequant(tensor, everything[name + "_scale_inv"])
            part[name] = tensor.contiguous()
            new_map[name] = file_name
            total += tensor.numel() * tensor.element_size()
        save_file(part, os.path.join(dst, file_name), metadata={"format": "pt"})
    with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": new_map}, f, indent=2)
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    config.pop("quantization_config", None)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return config
