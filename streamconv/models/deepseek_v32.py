"""DeepSeek-V3.2 (HF ``deepseek_v32``; MindSpeed ``deepseek32``): DeepSeek-V3 plus the DSA "lightning indexer"
in every layer, the MTP layer included.

Spec ``mindspeed_v2_families.md`` (DeepSeek-V3.2): the indexer's ``wq_b`` and ``wk`` are FP8 with block scales
in the release (dequantized like every FP8 weight), ``weights_proj`` is bf16, ``k_norm`` is a LayerNorm
(weight and bias); MindSpeed builds the indexer from non-parallel linears, so every TP rank holds all of it.
Its keys follow the up-projections and precede ``linear_proj``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..mapping.rules import Row, Split, row
from ..mapping.spec import HFTensor
from ..mapping.spec import TensorKind as K
from .deepseek_v3 import DEEPSEEK_V3_671B, TINY, DeepSeekV3, DeepSeekV3Config
from .registry import register_model


@dataclass(frozen=True)
class DeepSeekV32Config(DeepSeekV3Config):
    """DeepSeek-V3's dimensions plus the indexer's (``index_*`` in config.json)."""

    index_n_heads: int = 0
    index_head_dim: int = 0
    index_topk: int = 0


INDEXER = [  # HF suffix under self_attn.indexer., mcore suffix under self_attention.dsa_indexer.: all whole
    "wq_b.weight", "wk.weight", "k_norm.weight", "k_norm.bias", "weights_proj.weight",
]
INDEXER_ROWS = [row(f"self_attention.dsa_indexer.{n}", f"self_attn.indexer.{n}", Split.REPLICATED) for n in INDEXER]


class DeepSeekV32(DeepSeekV3):
    name = "deepseek_v32"
    title = "DeepSeek-V3.2"
    model_types = ("deepseek_v32",)
    mindspeed_names = ("deepseek32",)
    config_class = DeepSeekV32Config
    architecture = "DeepseekV32ForCausalLM"

    def attention_tensors(self, c) -> list[HFTensor]:
        p, d = "self_attn.indexer.", c.index_head_dim
        return super().attention_tensors(c) + [
            HFTensor(p + "wq_b.weight", (c.index_n_heads * d, c.q_lora_rank), K.LINEAR),
            HFTensor(p + "wk.weight", (d, c.hidden_size), K.LINEAR),
            HFTensor(p + "k_norm.weight", (d,), K.NORM),
            HFTensor(p + "k_norm.bias", (d,), K.PLAIN),
            HFTensor(p + "weights_proj.weight", (c.index_n_heads, c.hidden_size), K.PLAIN),
        ]

    def attention_rows(self, c, o) -> list[Row]:
        return super().attention_rows(c, o) + INDEXER_ROWS

    def relations(self, c) -> list[tuple[str, str]]:
        out = super().relations(c)
        if c.index_head_dim < c.qk_rope_head_dim:
            out.append(("index_head_dim", f"expected at least qk_rope_head_dim ({c.qk_rope_head_dim}; the indexer "
                                          f"rotates that many of its dims), got {c.index_head_dim}."))
        return out

    def mindspeed_args(self, c) -> dict:
        return {**super().mindspeed_args(c), "enable_dsa_indexer": True}

    def config_json(self, c) -> dict:
        out = super().config_json(c)
        out.update({"index_n_heads": c.index_n_heads, "index_head_dim": c.index_head_dim,
                    "index_topk": c.index_topk})
        return dict(sorted(out.items()))


DeepSeekV32.presets = {
    "tiny": DeepSeekV32Config(**{**TINY.__dict__, "index_n_heads": 4, "index_head_dim": 32, "index_topk": 8}),
    "671b": DeepSeekV32Config(**{**DEEPSEEK_V3_671B.__dict__, "index_n_heads": 64, "index_head_dim": 128,
                                 "index_topk": 2048}),
}
SPEC = register_model(DeepSeekV32())
