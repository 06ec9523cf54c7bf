"""Qwen3-MoE (HF ``qwen3_moe``; MindSpeed ``qwen3-moe``): GQA attention with q/k norms, every layer MoE, no
shared expert, a router without bias, no MTP; embeddings tied or not.

Spec ``mindspeed_v2_families.md`` (Qwen3-MoE): Megatron's fused ``linear_qkv`` holds, per query group, the
group's q heads, then its k head, then its v head, and is split over TP by whole groups (TP must divide
``num_key_value_heads``).  ``head_dim`` is its own config field (heads x head_dim may differ from hidden).
config.json written by transformers >= 5 names the expert count ``num_local_experts``: both names are read.
Qwen3's FP8 releases use the same 128x128 block scheme as DeepSeek's.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import ValidationError
from ..layout.options import EP_FLAG, Divisible, McoreOptions
from ..layout.placement import expert_tp_size
from ..mapping.rules import Row, Split, row
from ..mapping.spec import HFTensor, ModelSpec
from ..mapping.spec import TensorKind as K
from .quant import FP8_BLOCK_128
from .registry import register_model


@dataclass(frozen=True)
class Qwen3MoeConfig:
    hidden_size: int
    vocab_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    moe_intermediate_size: int
    num_experts: int
    tie_word_embeddings: bool = False
    fp8: bool = False

    first_dense = property(lambda self: 0)
    mtp_layers = property(lambda self: 0)
    tied = property(lambda self: self.tie_word_embeddings)


REQUIRED = ("hidden_size", "vocab_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "moe_intermediate_size")


def _config_from_json(obj: dict, path: str) -> Qwen3MoeConfig:
    problems = [f"{path}: {f}: missing or not an integer. Is this a Qwen3-MoE config.json?"
                for f in REQUIRED if not isinstance(obj.get(f), int) or isinstance(obj.get(f), bool)]
    counts = {obj[k] for k in ("num_experts", "num_local_experts") if obj.get(k) is not None}
    if len(counts) != 1 or not isinstance(next(iter(counts)), int):
        problems.append(f"{path}: num_experts / num_local_experts: expected one integer expert count, got "
                        f"{sorted(map(repr, counts)) or 'none'}.")
    if obj.get("decoder_sparse_step", 1) != 1 or obj.get("mlp_only_layers"):
        problems.append(f"{path}: decoder_sparse_step {obj.get('decoder_sparse_step', 1)}, mlp_only_layers "
                        f"{obj.get('mlp_only_layers')}: only checkpoints whose every layer is MoE are supported.")
    if obj.get("attention_bias"):
        problems.append(f"{path}: attention_bias true: Qwen3-MoE with q/k/v biases is not supported.")
    if problems:
        raise ValidationError(problems)
    head_dim = obj.get("head_dim")
    if head_dim is None:  # transformers' default
        head_dim = obj["hidden_size"] // max(obj["num_attention_heads"], 1)
    return Qwen3MoeConfig(**{f: obj[f] for f in REQUIRED}, head_dim=head_dim, num_experts=counts.pop(),
                          tie_word_embeddings=bool(obj.get("tie_word_embeddings", False)),
                          fp8=FP8_BLOCK_128.announced_by(obj, path))


class Qwen3Moe(ModelSpec):
    name = "qwen3_moe"
    title = "Qwen3-MoE"
    model_types = ("qwen3_moe",)
    mindspeed_names = ("qwen3-moe",)
    hf_fused_experts = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")   # transformers >= 5
    quant = FP8_BLOCK_128
    config_class = Qwen3MoeConfig
    experts_field = "num_experts"
    limits = {"num_hidden_layers": 1024, "num_experts": 8192}

    def config_from_json(self, obj: dict, path: str):
        return _config_from_json(obj, path)

    def relations(self, c) -> list[tuple[str, str]]:
        if c.num_attention_heads % c.num_key_value_heads:
            return [("num_attention_heads", f"expected a multiple of num_key_value_heads ({c.num_key_value_heads}), "
                                            f"got {c.num_attention_heads}.")]
        return []

    def layer_tensors(self, c, layer: int) -> list[HFTensor]:
        h, d = c.hidden_size, c.head_dim
        out = [HFTensor("input_layernorm.weight", (h,), K.NORM),
               HFTensor("self_attn.q_proj.weight", (c.num_attention_heads * d, h), K.LINEAR),
               HFTensor("self_attn.k_proj.weight", (c.num_key_value_heads * d, h), K.LINEAR),
               HFTensor("self_attn.v_proj.weight", (c.num_key_value_heads * d, h), K.LINEAR),
               HFTensor("self_attn.o_proj.weight", (h, c.num_attention_heads * d), K.LINEAR),
               HFTensor("self_attn.q_norm.weight", (d,), K.NORM),
               HFTensor("self_attn.k_norm.weight", (d,), K.NORM),
               HFTensor("post_attention_layernorm.weight", (h,), K.NORM),
               HFTensor("mlp.gate.weight", (c.num_experts, h), K.PLAIN)]
        for j in range(c.num_experts):
            out += [HFTensor(f"mlp.experts.{j}.gate_proj.weight", (c.moe_intermediate_size, h), K.LINEAR),
                    HFTensor(f"mlp.experts.{j}.up_proj.weight", (c.moe_intermediate_size, h), K.LINEAR),
                    HFTensor(f"mlp.experts.{j}.down_proj.weight", (h, c.moe_intermediate_size), K.LINEAR)]
        return out

    def layer_rows(self, c, dense: bool, o: McoreOptions) -> list[Row]:
        groups = c.num_key_value_heads
        return [
            row("input_layernorm.weight", "input_layernorm.weight", Split.REPLICATED),
            Row(("self_attention.linear_qkv.weight",),
                ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
                Split.QKV_GROUPS, groups, (c.num_attention_heads // groups, c.head_dim)),
            row("self_attention.q_layernorm.weight", "self_attn.q_norm.weight", Split.REPLICATED),
            row("self_attention.k_layernorm.weight", "self_attn.k_norm.weight", Split.REPLICATED),
            row("self_attention.linear_proj.weight", "self_attn.o_proj.weight", Split.ROW),
            row("pre_mlp_layernorm.weight", "post_attention_layernorm.weight", Split.REPLICATED),
            row("mlp.router.weight", "mlp.gate.weight", Split.REPLICATED),
        ]

    def divisible(self, c, sizes, o: McoreOptions) -> list[Divisible]:
        tp = sizes.tp
        return [Divisible("num_key_value_heads", c.num_key_value_heads, tp),  # whole query groups per rank
                Divisible("vocab_size", c.vocab_size, tp),
                Divisible("moe_intermediate_size", c.moe_intermediate_size, expert_tp_size(sizes, o)),
                Divisible("num_experts", c.num_experts, sizes.ep, EP_FLAG)]

    def resized(self, c, **kw):
        kw = {k: v for k, v in kw.items() if not (k in ("first_dense", "mtp_layers") and v == 0)}
        bad = sorted(set(kw) & {"first_dense", "mtp_layers"})
        if bad:
            raise ValidationError(f"{self.title} has no dense or MTP layers ({', '.join(bad)} requested).")
        return replace(c, **kw)

    def mindspeed_args(self, c) -> dict:
        return {"hidden_size": c.hidden_size, "num_attention_heads": c.num_attention_heads,
                "num_key_value_heads": c.num_key_value_heads, "kv_channels": c.head_dim,
                "num_experts": c.num_experts, "n_shared_experts": None, "first_k_dense_replace": 0,
                "q_lora_rank": None, "qk_head_dim": None, "qk_pos_emb_head_dim": None, "v_head_dim": None,
                "qkv_type": "unpack", "qk_layernorm": True, "router_bias": False, "enable_dsa_indexer": False,
                "untie_embeddings_and_output_weights": not c.tie_word_embeddings, "fc_type": "gate_up_down"}

    def config_json(self, c) -> dict:
        out = {
            "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
            "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": c.head_dim,
            "hidden_act": "silu", "hidden_size": c.hidden_size, "initializer_range": 0.02,
            "intermediate_size": 3 * c.moe_intermediate_size, "max_position_embeddings": 40960,
            "max_window_layers": c.num_hidden_layers, "mlp_only_layers": [], "model_type": "qwen3_moe",
            "moe_intermediate_size": c.moe_intermediate_size, "norm_topk_prob": True,
            "num_attention_heads": c.num_attention_heads, "num_experts": c.num_experts,
            "num_experts_per_tok": min(8, max(1, c.num_experts // 4)), "num_hidden_layers": c.num_hidden_layers,
            "num_key_value_heads": c.num_key_value_heads, "output_router_logits": False, "rms_norm_eps": 1e-06,
            "rope_scaling": None, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001, "sliding_window": None,
            "tie_word_embeddings": c.tie_word_embeddings, "torch_dtype": "bfloat16", "use_cache": True,
            "use_sliding_window": False, "vocab_size": c.vocab_size,
        }
        if c.fp8:
            out["quantization_config"] = FP8_BLOCK_128.config_dict
        return dict(sorted(out.items()))


Qwen3Moe.presets = {
    # 8 heads in 4 query groups (TP up to 4), heads x head_dim (128) != hidden (96); experts, vocab, widths / 4
    "tiny": Qwen3MoeConfig(hidden_size=96, vocab_size=256, num_hidden_layers=4, num_attention_heads=8,
                           num_key_value_heads=4, head_dim=16, moe_intermediate_size=32, num_experts=8),
    "30b-a3b": Qwen3MoeConfig(hidden_size=2048, vocab_size=151936, num_hidden_layers=48, num_attention_heads=32,
                              num_key_value_heads=4, head_dim=128, moe_intermediate_size=768, num_experts=128),
    "235b-a22b": Qwen3MoeConfig(hidden_size=4096, vocab_size=151936, num_hidden_layers=94, num_attention_heads=64,
                                num_key_value_heads=4, head_dim=128, moe_intermediate_size=1536, num_experts=128),
}
SPEC = register_model(Qwen3Moe())
