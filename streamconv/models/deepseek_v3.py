"""DeepSeek-V3 (HF ``deepseek_v3``; MindSpeed ``deepseek3``): MLA attention, dense then MoE layers, a shared
expert, a float32 router bias, MTP.

Spec ``deepseek_v3_mindspeed.md``: §1 (HF layout, FP8 §1.4), §3 (key mapping), §3.4 (``--mla-mm-split``),
§3.7 (MTP).  Every dimension comes from config.json.  Rows are ``(mcore suffix, HF suffixes, split rule)``
(:mod:`streamconv.mapping.rules`); key names are MindSpeed's current set (after 2025-07-23), the older set
is a table delta (:data:`LEGACY_MLA_NAMES`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, fields, replace

from ..errors import ValidationError
from ..layout.options import EP_FLAG, TP_FLAG, Divisible, McoreOptions
from ..layout.placement import expert_tp_size
from ..mapping.rules import Row, Split, row
from ..mapping.spec import COMPANIONS, HFTensor, ModelSpec
from ..mapping.spec import TensorKind as K
from .quant import FP8_BLOCK_128
from .registry import register_model


@dataclass(frozen=True)
class DeepSeekV3Config:
    """The dimensions of a DeepSeek-V3-family model, read from its HF config.json (spec §1.1)."""

    hidden_size: int
    vocab_size: int
    num_hidden_layers: int
    first_k_dense_replace: int
    intermediate_size: int
    moe_intermediate_size: int
    n_routed_experts: int
    n_shared_experts: int
    num_attention_heads: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    num_nextn_predict_layers: int = 0
    fp8: bool = False

    OPTIONAL = ("num_nextn_predict_layers", "fp8")

    @classmethod
    def from_json(cls, obj: dict, *, path: str = "config.json", title: str = "DeepSeek-V3"):
        required = [f.name for f in fields(cls) if f.name not in cls.OPTIONAL]
        missing = [f for f in required if not isinstance(obj.get(f), int) or isinstance(obj.get(f), bool)]
        if missing:
            raise ValidationError(f"{path}: missing or non-integer field(s) {', '.join(missing)}. "
                                  f"Is this a {title} config.json?")
        mtp = obj.get("num_nextn_predict_layers") or 0
        return cls(**{f: obj[f] for f in required}, num_nextn_predict_layers=mtp, fp8=FP8_BLOCK_128.announced_by(obj, path))

    # the generic sizes (mapping.spec.ModelConfig)
    num_experts = property(lambda self: self.n_routed_experts)
    first_dense = property(lambda self: self.first_k_dense_replace)
    mtp_layers = property(lambda self: self.num_nextn_predict_layers)
    tied = property(lambda self: False)

    @property
    def shared_ffn(self) -> int:
        return self.moe_intermediate_size * self.n_shared_experts


# --- the mcore side: tables -----------------------------------------------------------------------------------------

ATTENTION = [
    row("input_layernorm.weight", "input_layernorm.weight", Split.REPLICATED),
    row("self_attention.linear_qkv.weight",
        ("self_attn.q_a_proj.weight", "self_attn.kv_a_proj_with_mqa.weight"), Split.FUSED_ROWS),  # LinearNoTP
    row("self_attention.q_layernorm.weight", "self_attn.q_a_layernorm.weight", Split.REPLICATED),
    row("self_attention.kv_layernorm.weight", "self_attn.kv_a_layernorm.weight", Split.REPLICATED),
]
# The up-projections: whole (default), or split per head part with --mla-mm-split (spec §3.4).
ATTENTION_UP = [
    row("self_attention.linear_q_up_proj.weight", "self_attn.q_b_proj.weight", Split.COLUMN),    # whole heads
    row("self_attention.linear_kv_up_proj.weight", "self_attn.kv_b_proj.weight", Split.COLUMN),  # whole heads
]
ATTENTION_OUT = [
    row("self_attention.linear_proj.weight", "self_attn.o_proj.weight", Split.ROW),
    row("pre_mlp_layernorm.weight", "post_attention_layernorm.weight", Split.REPLICATED),
]
# MindSpeed's MLA names before 2025-07-23 (--mla-key-names legacy).
LEGACY_MLA_NAMES = {
    "self_attention.linear_q_up_proj.weight": "self_attention.linear_qb.weight",
    "self_attention.linear_kv_up_proj.weight": "self_attention.linear_kvb.weight",
    "self_attention.kv_layernorm.weight": "self_attention.k_layernorm.weight",
}
DENSE_MLP = [
    row("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), Split.GATED_COLUMN),
    row("mlp.linear_fc2.weight", "mlp.down_proj.weight", Split.ROW),
]
ROUTER = [
    row("mlp.router.weight", "mlp.gate.weight", Split.REPLICATED),
    row("mlp.router.expert_bias", "mlp.gate.e_score_correction_bias", Split.REPLICATED),  # stays float32
]
SHARED_EXPERTS = [
    row("mlp.shared_experts.linear_fc1.weight",
        ("mlp.shared_experts.gate_proj.weight", "mlp.shared_experts.up_proj.weight"), Split.GATED_COLUMN),
    row("mlp.shared_experts.linear_fc2.weight", "mlp.shared_experts.down_proj.weight", Split.ROW),
]
# MTP module m (HF layer num_hidden_layers + m), besides its transformer layer (spec §3.7).
MTP_EXTRA = [
    row("enorm.weight", "enorm.weight", Split.REPLICATED),
    row("hnorm.weight", "hnorm.weight", Split.REPLICATED),
    row("eh_proj.weight", "eh_proj.weight", Split.COLUMN),
]


class DeepSeekV3(ModelSpec):
    name = "deepseek_v3"
    title = "DeepSeek-V3"
    model_types = ("deepseek_v3",)
    mindspeed_names = ("deepseek3",)
    quant = FP8_BLOCK_128
    companions = COMPANIONS + ("configuration_deepseek.py", "modeling_deepseek.py")
    variants = frozenset({"mla_mm_split", "mla_key_names"})
    legacy_names = LEGACY_MLA_NAMES
    config_class = DeepSeekV3Config
    architecture = "DeepseekV3ForCausalLM"
    # spec §6.1: QLoRA quantizes the attention and MLP linears (both MLA key sets, --mla-mm-split's four
    # matrices), the output layer and the MTP eh_proj
    qlora_modules = ModelSpec.qlora_modules | {"linear_q_up_proj", "linear_kv_up_proj", "linear_qb", "linear_kvb",
                                               "linear_qk_nope", "linear_qk_rope", "linear_kv_nope", "linear_v",
                                               "eh_proj"}
    hf_fused_experts = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
    zero_ok = frozenset({"first_k_dense_replace", "n_shared_experts", "num_nextn_predict_layers"})
    limits = {"num_hidden_layers": 1024, "n_routed_experts": 8192, "num_nextn_predict_layers": 16}

    def config_from_json(self, obj: dict, path: str):
        return self.config_class.from_json(obj, path=path, title=self.title)

    def relations(self, c) -> list[tuple[str, str]]:
        out = []
        if c.first_k_dense_replace > c.num_hidden_layers:
            out.append(("first_k_dense_replace", f"expected at most num_hidden_layers ({c.num_hidden_layers}, got "
                                                 f"{c.first_k_dense_replace}). Lower first_k_dense_replace or "
                                                 f"raise num_hidden_layers."))
        if c.qk_rope_head_dim % 2:
            out.append(("qk_rope_head_dim", f"expected an even number (rotary pairs), got {c.qk_rope_head_dim}."))
        return out

    # --- HF side (spec §1.3) ---------------------------------------------------------------------------------
    def attention_tensors(self, c) -> list[HFTensor]:
        h, nh = c.hidden_size, c.num_attention_heads
        return [
            HFTensor("self_attn.q_a_proj.weight", (c.q_lora_rank, h), K.LINEAR),
            HFTensor("self_attn.q_a_layernorm.weight", (c.q_lora_rank,), K.NORM),
            HFTensor("self_attn.q_b_proj.weight", (nh * (c.qk_nope_head_dim + c.qk_rope_head_dim), c.q_lora_rank),
                     K.LINEAR),
            HFTensor("self_attn.kv_a_proj_with_mqa.weight", (c.kv_lora_rank + c.qk_rope_head_dim, h), K.LINEAR),
            HFTensor("self_attn.kv_a_layernorm.weight", (c.kv_lora_rank,), K.NORM),
            HFTensor("self_attn.kv_b_proj.weight", (nh * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank),
                     K.LINEAR),
            HFTensor("self_attn.o_proj.weight", (h, nh * c.v_head_dim), K.LINEAR),
        ]

    def layer_tensors(self, c, layer: int) -> list[HFTensor]:
        h, v = c.hidden_size, c.vocab_size
        mtp = layer >= c.num_hidden_layers
        out = []
        if mtp:
            out += [HFTensor("embed_tokens.weight", (v, h), K.PLAIN, copy_of=self.embedding),
                    HFTensor("enorm.weight", (h,), K.NORM), HFTensor("hnorm.weight", (h,), K.NORM),
                    HFTensor("eh_proj.weight", (h, 2 * h), K.PLAIN)]
        out.append(HFTensor("input_layernorm.weight", (h,), K.NORM))
        out += self.attention_tensors(c)
        out.append(HFTensor("post_attention_layernorm.weight", (h,), K.NORM))
        if layer < c.first_k_dense_replace:
            out += _mlp("mlp.", c.intermediate_size, h)
        else:
            out += [HFTensor("mlp.gate.weight", (c.n_routed_experts, h), K.PLAIN),
                    HFTensor("mlp.gate.e_score_correction_bias", (c.n_routed_experts,), K.BIAS)]
            if c.n_shared_experts:
                out += _mlp("mlp.shared_experts.", c.shared_ffn, h)
            for j in range(c.n_routed_experts):
                out += _mlp(f"mlp.experts.{j}.", c.moe_intermediate_size, h)
        if mtp:
            out += [HFTensor("shared_head.norm.weight", (h,), K.NORM),
                    HFTensor("shared_head.head.weight", (v, h), K.PLAIN, copy_of=self.lm_head)]
        return out

    def export_order(self, c) -> list[str]:
        """mcore -> HF has always written the model-level tensors first (embedding, final norm, lm_head), then
        each layer as: the two norms, attention, MLP, then the MTP parts (unlike the release order above); kept,
        so exports stay byte-identical across versions."""
        norms = ("input_layernorm.weight", "post_attention_layernorm.weight")
        mtp = ("embed_tokens.weight", "enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
               "shared_head.head.weight")

        def rank(name: str) -> tuple[int, int]:
            suffix = name.split(".", 3)[3]
            if suffix in norms:
                return 0, norms.index(suffix)
            return (2, mtp.index(suffix)) if suffix in mtp else (1, 0)

        names = list(self.hf_table(c))
        out = [n for n in names if self.layer_of(n) is None]
        for layer, block in itertools.groupby((n for n in names if self.layer_of(n) is not None), key=self.layer_of):
            out += sorted(block, key=rank)  # sorted() is stable
        return out

    # --- mcore side (spec §3) --------------------------------------------------------------------------------
    def attention_rows(self, c, o: McoreOptions) -> list[Row]:
        if not o.mla_mm_split:
            return ATTENTION + ATTENTION_UP
        nh, dn = c.num_attention_heads, c.qk_nope_head_dim
        return ATTENTION + [  # per head [nope | rope] and [nope | v], each part split by whole heads (§3.4)
            Row(("self_attention.linear_qk_nope.weight", "self_attention.linear_qk_rope.weight"),
                ("self_attn.q_b_proj.weight",), Split.HEAD_PARTS, nh, (dn, c.qk_rope_head_dim)),
            Row(("self_attention.linear_kv_nope.weight", "self_attention.linear_v.weight"),
                ("self_attn.kv_b_proj.weight",), Split.HEAD_PARTS, nh, (dn, c.v_head_dim)),
        ]

    def layer_rows(self, c, dense: bool, o: McoreOptions) -> list[Row]:
        rows = self.attention_rows(c, o) + ATTENTION_OUT
        if dense:
            return rows + DENSE_MLP
        return rows + ROUTER + (SHARED_EXPERTS if c.n_shared_experts else [])

    def mtp_rows(self, c) -> list[Row]:
        return MTP_EXTRA

    def divisible(self, c, sizes, o: McoreOptions) -> list[Divisible]:
        tp = sizes.tp
        out = [Divisible("num_attention_heads", c.num_attention_heads, tp),
               Divisible("vocab_size", c.vocab_size, tp),
               Divisible("intermediate_size", c.intermediate_size, tp),
               Divisible("moe_intermediate_size", c.moe_intermediate_size, expert_tp_size(sizes, o)),
               Divisible("moe_intermediate_size * n_shared_experts", c.shared_ffn, tp),
               Divisible("n_routed_experts", c.n_routed_experts, sizes.ep, EP_FLAG)]
        if o.mtp_num_layers:  # eh_proj is the one tensor split along the hidden size
            out.append(Divisible("hidden_size", c.hidden_size, tp, TP_FLAG))
        return out

    # --- sizes ----------------------------------------------------------------------------------------------
    def resized(self, c, **kw):
        names = {"first_dense": "first_k_dense_replace", "mtp_layers": "num_nextn_predict_layers",
                 "num_experts": "n_routed_experts"}
        return replace(c, **{names.get(k, k): v for k, v in kw.items()})

    def layer_fields(self, c) -> dict[str, int]:
        return {"num_hidden_layers": c.num_hidden_layers, "first_k_dense_replace": c.first_k_dense_replace,
                "num_nextn_predict_layers": c.num_nextn_predict_layers}

    def config_json(self, c) -> dict:
        """config.json in the release's style (keys sorted), scaled for small expert counts."""
        n_group = max([d for d in range(1, 9) if c.n_routed_experts % d == 0 and c.n_routed_experts // d >= 2],
                      default=1)  # HF's noaux_tc router scores a group by its top-2 experts
        topk_group = max(1, n_group // 2)
        out = {
            "architectures": [self.architecture], "attention_bias": False, "attention_dropout": 0.0,
            "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1,
            "hidden_act": "silu", "initializer_range": 0.02, "max_position_embeddings": 163840,
            "model_type": self.model_types[0], "moe_layer_freq": 1, "n_group": n_group, "norm_topk_prob": True,
            "num_experts_per_tok": min(8, topk_group * (c.n_routed_experts // n_group)),
            "num_key_value_heads": c.num_attention_heads, "pretraining_tp": 1, "rms_norm_eps": 1e-06,
            "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                             "original_max_position_embeddings": 4096, "type": "yarn"},
            "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
            "tie_word_embeddings": False, "topk_group": topk_group, "topk_method": "noaux_tc",
            "torch_dtype": "bfloat16", "transformers_version": "4.46.3", "use_cache": True,
        }
        out.update({f.name: getattr(c, f.name) for f in fields(self.config_class) if f.name != "fp8"})
        if c.fp8:
            out["quantization_config"] = FP8_BLOCK_128.config_dict
        return dict(sorted(out.items()))


    def mindspeed_args(self, c) -> dict:
        return {"hidden_size": c.hidden_size, "num_attention_heads": c.num_attention_heads,
                "num_key_value_heads": c.num_attention_heads, "kv_channels": None, "num_experts": c.n_routed_experts,
                "n_shared_experts": c.n_shared_experts, "first_k_dense_replace": c.first_k_dense_replace,
                "q_lora_rank": c.q_lora_rank, "qk_head_dim": c.qk_nope_head_dim,
                "qk_pos_emb_head_dim": c.qk_rope_head_dim, "v_head_dim": c.v_head_dim, "qkv_type": "pack_mla",
                "qk_layernorm": True, "router_bias": True, "enable_dsa_indexer": False,
                "untie_embeddings_and_output_weights": True, "fc_type": "gate_up_down"}


def _mlp(prefix: str, width: int, h: int) -> list[HFTensor]:
    return [HFTensor(prefix + "gate_proj.weight", (width, h), K.LINEAR),
            HFTensor(prefix + "up_proj.weight", (width, h), K.LINEAR),
            HFTensor(prefix + "down_proj.weight", (h, width), K.LINEAR)]


# A small DeepSeek-V3-shaped model for tests (~2.6 MB in bf16).  hidden 192 and the dense width 320 are not
# multiples of 128, so FP8 edge blocks occur in every linear; q_b (192 rows), o_proj, dense and expert weights
# span several blocks.  Heads, experts, vocab and both FFN widths divide by 4 (TP and EP up to 4).
TINY = DeepSeekV3Config(
    hidden_size=192, num_hidden_layers=4, first_k_dense_replace=1, n_routed_experts=8, n_shared_experts=1,
    num_attention_heads=4, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16,
    v_head_dim=32, intermediate_size=320, moe_intermediate_size=32, vocab_size=256, num_nextn_predict_layers=1,
)
# The real DeepSeek-V3 / R1 sizes (spec §1.1), in the FP8 release format.
DEEPSEEK_V3_671B = DeepSeekV3Config(
    hidden_size=7168, num_hidden_layers=61, first_k_dense_replace=3, n_routed_experts=256, n_shared_experts=1,
    num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
    v_head_dim=128, intermediate_size=18432, moe_intermediate_size=2048, vocab_size=129280,
    num_nextn_predict_layers=1, fp8=True,
)

DeepSeekV3.presets = {"tiny": TINY, "671b": DEEPSEEK_V3_671B}
SPEC = register_model(DeepSeekV3())
