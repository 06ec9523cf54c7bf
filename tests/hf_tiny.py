"""Tiny DeepSeek-V3-shaped HF checkpoints for tests, written from spec section 1 (independent of streamconv).

    config = build_tiny_hf(tmp_path / "hf")                  # bf16, 4 layers (K=1) + 1 MTP layer
    config = build_tiny_hf(tmp_path / "fp8", fp8=True)      # FP8 release format, edge blocks present
    config = build_tiny_hf(tmp_path / "hf", vocab_size=250)  # any config field can be overridden

Every tensor gets distinct random values (norms included) so that mix-ups show. The MTP layer's
``embed_tokens`` and ``shared_head.head`` are *not* copies of the main embedding / lm_head here, so a
test can tell which source a converter read. Tensors are spread over ``num_shards`` files in
contiguous runs, so one layer may span two shards and, in FP8, a weight and its ``_scale_inv`` may too.
"""

import json
import os

import torch
from safetensors.torch import save_file

FP8_BLOCK = 128

TINY_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "hidden_size": 64,
    "vocab_size": 256,
    "num_hidden_layers": 4,
    "first_k_dense_replace": 1,
    "intermediate_size": 96,
    "moe_intermediate_size": 32,
    "n_routed_experts": 8,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "q_lora_rank": 48,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "num_nextn_predict_layers": 1,
    "moe_layer_freq": 1,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}

# FP8 variant: sizes that are not multiples of 128 and exceed it, so partial edge blocks appear in both
# dims (q_a [144, 160] -> scales [2, 2]; dense gate [288, 160] -> [3, 2]; kv_a [40, 160] -> [1, 2]).
FP8_OVERRIDES = {"hidden_size": 160, "q_lora_rank": 144, "intermediate_size": 288}

FP8_QUANTIZATION_CONFIG = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
}


def tiny_config(*, fp8=False, **overrides):
    """The tiny config dict (FP8 sizes and quantization_config when ``fp8``), with overrides applied."""
    config = dict(TINY_CONFIG)
    if fp8:
        config.update(FP8_OVERRIDES)
        config["quantization_config"] = dict(FP8_QUANTIZATION_CONFIG)
    config.update(overrides)
    return config


def hf_tensor_specs(config):
    """``[(name, shape, dtype, is_fp8_in_release)]`` of the HF checkpoint (spec 1.3), in layer order."""
    h = config["hidden_size"]
    v = config["vocab_size"]
    heads = config["num_attention_heads"]
    nope, rope, v_dim = config["qk_nope_head_dim"], config["qk_rope_head_dim"], config["v_head_dim"]
    q_lora, kv_lora = config["q_lora_rank"], config["kv_lora_rank"]
    ffn, moe_ffn = config["intermediate_size"], config["moe_intermediate_size"]
    shared_ffn = moe_ffn * config["n_shared_experts"]
    experts = config["n_routed_experts"]
    num_layers, k = config["num_hidden_layers"], config["first_k_dense_replace"]
    bf16, f32 = torch.bfloat16, torch.float32

    specs = [("model.embed_tokens.weight", (v, h), bf16, False)]
    for i in range(num_layers + config["num_nextn_predict_layers"]):
        p = f"model.layers.{i}."
        is_mtp = i >= num_layers
        if is_mtp:
            specs.append((p + "embed_tokens.weight", (v, h), bf16, False))
            specs.append((p + "enorm.weight", (h,), bf16, False))
            specs.append((p + "hnorm.weight", (h,), bf16, False))
            specs.append((p + "eh_proj.weight", (h, 2 * h), bf16, False))
        specs += [
            (p + "input_layernorm.weight", (h,), bf16, False),
            (p + "self_attn.q_a_proj.weight", (q_lora, h), bf16, True),
            (p + "self_attn.q_a_layernorm.weight", (q_lora,), bf16, False),
            (p + "self_attn.q_b_proj.weight", (heads * (nope + rope), q_lora), bf16, True),
            (p + "self_attn.kv_a_proj_with_mqa.weight", (kv_lora + rope, h), bf16, True),
            (p + "self_attn.kv_a_layernorm.weight", (kv_lora,), bf16, False),
            (p + "self_attn.kv_b_proj.weight", (heads * (nope + v_dim), kv_lora), bf16, True),
            (p + "self_attn.o_proj.weight", (h, heads * v_dim), bf16, True),
            (p + "post_attention_layernorm.weight", (h,), bf16, False),
        ]
        if i < k and not is_mtp:
            specs += [
                (p + "mlp.gate_proj.weight", (ffn, h), bf16, True),
                (p + "mlp.up_proj.weight", (ffn, h), bf16, True),
                (p + "mlp.down_proj.weight", (h, ffn), bf16, True),
            ]
        else:
            specs += [
                (p + "mlp.gate.weight", (experts, h), bf16, False),
                (p + "mlp.gate.e_score_correction_bias", (experts,), f32, False),
                (p + "mlp.shared_experts.gate_proj.weight", (shared_ffn, h), bf16, True),
                (p + "mlp.shared_experts.up_proj.weight", (shared_ffn, h), bf16, True),
                (p + "mlp.shared_experts.down_proj.weight", (h, shared_ffn), bf16, True),
            ]
            for j in range(experts):
                specs += [
                    (p + f"mlp.experts.{j}.gate_proj.weight", (moe_ffn, h), bf16, True),
                    (p + f"mlp.experts.{j}.up_proj.weight", (moe_ffn, h), bf16, True),
                    (p + f"mlp.experts.{j}.down_proj.weight", (h, moe_ffn), bf16, True),
                ]
        if is_mtp:
            specs.append((p + "shared_head.norm.weight", (h,), bf16, False))
            specs.append((p + "shared_head.head.weight", (v, h), bf16, False))
    specs.append(("model.norm.weight", (h,), bf16, False))
    specs.append(("lm_head.weight", (v, h), bf16, False))
    return specs


def _special_values(tensor):
    """Put -0.0 and a NaN with a non-default payload into a bf16 tensor (for byte-exact checks)."""
    flat = tensor.view(-1)
    if flat.numel() >= 3 and tensor.dtype == torch.bfloat16:
        flat[1] = -0.0
        flat[2:3].view(torch.int16)[0] = 0x7FC3  # quiet NaN, payload 3
    return tensor


def write_hf_dir(path, config, tensors, num_shards=1):
    """Write ``config.json``, ``tensors`` in ``num_shards`` contiguous runs and the index."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    names = list(tensors)
    num_shards = max(1, min(num_shards, len(names)))
    per = -(-len(names) // num_shards)
    weight_map = {}
    total = 0
    for s in range(num_shards):
        file_name = f"model-{s + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {name: tensors[name].contiguous() for name in names[s * per:(s + 1) * per]}
        save_file(part, os.path.join(path, file_name), metadata={"format": "pt"})
        for name, tensor in part.items():
            weight_map[name] = file_name
            total += tensor.numel() * tensor.element_size()
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def build_tiny_hf(path, *, fp8=False, num_shards=3, seed=0, special_values=False, **overrides):
    """Write a tiny DeepSeek-V3 HF checkpoint to ``path`` and return its config.

    With ``fp8`` every weight that is FP8 in the official release is stored as float8_e4m3fn with a
    float32 ``<name>_scale_inv`` of shape [ceil(M/128), ceil(N/128)]. With ``special_values`` each bf16
    tensor of 3+ elements holds a -0.0 and a NaN with payload 3 (off by default: NaN breaks allclose).
    """
    config = tiny_config(fp8=fp8, **overrides)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape, dtype, quantized in hf_tensor_specs(config):
        values = torch.randn(shape, generator=gen)
        if fp8 and quantized:
            tensors[name] = (values * 4).to(torch.float8_e4m3fn)
            scale_shape = (-(-shape[0] // FP8_BLOCK), -(-shape[1] // FP8_BLOCK))
            tensors[name + "_scale_inv"] = torch.rand(scale_shape, generator=gen) * 0.01 + 1e-3
        else:
            tensors[name] = values.to(dtype)
            if special_values:
                _special_values(tensors[name])
    write_hf_dir(path, config, tensors, num_shards=num_shards)
    return config
