"""DeepSeek-V3 (HF ``deepseek_v3``) -> MindSpeed-LLM mcore, as tables.

Spec: ``deepseek_v3_mindspeed.md`` §1 (HF layout), §3 (key mapping), §4 (placement).  Every dimension comes
from config.json.  Tables below are ``(mcore suffix, HF suffixes, split rule)`` rows; split rules are
defined in :mod:`streamconv.mapping.rules`.  Key names are the current MindSpeed set (after 2025-07-23).
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Protocol

from ..errors import ValidationError
from ..graph.node import Node
from ..layout.parallel import ParallelSizes, RankFile, etp1_rank_files, expert_range, rank_files
from ..layout.pipeline import PipelineLayout, place_slots
from ..layout.pipeline import validate as validate_pipeline
from ..mapping.rules import (Split, apply_split, grouped_weight1, grouped_weight2, head_part, merge_head_parts,
                             merge_split, ungroup_weight1, ungroup_weight2)
from ..mapping.sources import SourceTensors

MODEL_TYPE = "deepseek_v3"
FP8_BLOCK = (128, 128)


# --- config ------------------------------------------------------------------------------------------------------

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

    @classmethod
    def from_json(cls, obj: dict, *, path: str = "config.json") -> "DeepSeekV3Config":
        required = [f for f in cls.__dataclass_fields__ if f not in ("num_nextn_predict_layers", "fp8")]
        missing = [f for f in required if not isinstance(obj.get(f), int)]
        if missing:
            raise ValidationError(f"{path}: missing or non-integer field(s) {', '.join(missing)}. "
                                  f"Is this a DeepSeek-V3 config.json?")
        q = obj.get("quantization_config") or {}
        fp8 = q.get("quant_method") == "fp8"
        if fp8 and list(q.get("weight_block_size", FP8_BLOCK)) != list(FP8_BLOCK):
            raise ValidationError(f"{path}: quantization_config.weight_block_size {q.get('weight_block_size')} "
                                  f"(expected [128, 128]); only DeepSeek's 128x128 block format is supported.")
        return cls(**{f: obj[f] for f in required},
                   num_nextn_predict_layers=int(obj.get("num_nextn_predict_layers") or 0), fp8=fp8)

    @property
    def shared_ffn(self) -> int:
        return self.moe_intermediate_size * self.n_shared_experts


@dataclass(frozen=True)
class McoreOptions:
    """MindSpeed-LLM model flags that change the checkpoint layout (beyond TP/PP/EP)."""

    moe_grouped_gemm: bool = False
    mtp_num_layers: int = 0
    num_layers: int | None = None              # layer slots, noop included; default: config layers + noop
    first_k_dense_replace: int | None = None   # default: config first_k_dense_replace
    vpp_layers: int | None = None              # --num-layers-per-virtual-pipeline-stage
    noop_layers: tuple[int, ...] = ()          # --noop-layers
    num_layer_list: tuple[int, ...] | None = None  # --num-layer-list
    dualpipev: bool = False                    # --schedules-method dualpipev
    mla_key_names: str = "current"             # "legacy": checkpoints made before 2025-07-23
    mla_mm_split: bool = False                 # --mla-mm-split
    moe_tp_extend_ep: bool = False             # --moe-tp-extend-ep: experts whole, TP becomes extra EP
    expert_tensor_parallel_size: int | None = None  # 1: experts whole by EP rank, only instantiated ranks


# --- the HF side: every tensor the checkpoint must contain (validation and coverage) -----------------------------

def _layer_shapes(c: DeepSeekV3Config, dense: bool) -> dict[str, tuple[int, ...]]:
    h, nh = c.hidden_size, c.num_attention_heads
    s = {
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "self_attn.q_a_proj.weight": (c.q_lora_rank, h),
        "self_attn.q_a_layernorm.weight": (c.q_lora_rank,),
        "self_attn.q_b_proj.weight": (nh * (c.qk_nope_head_dim + c.qk_rope_head_dim), c.q_lora_rank),
        "self_attn.kv_a_proj_with_mqa.weight": (c.kv_lora_rank + c.qk_rope_head_dim, h),
        "self_attn.kv_a_layernorm.weight": (c.kv_lora_rank,),
        "self_attn.kv_b_proj.weight": (nh * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank),
        "self_attn.o_proj.weight": (h, nh * c.v_head_dim),
    }
    if dense:
        f = c.intermediate_size
        s.update({"mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h), "mlp.down_proj.weight": (h, f)})
        return s
    fs, fm = c.shared_ffn, c.moe_intermediate_size
    s.update({
        "mlp.gate.weight": (c.n_routed_experts, h),
        "mlp.gate.e_score_correction_bias": (c.n_routed_experts,),
        "mlp.shared_experts.gate_proj.weight": (fs, h),
        "mlp.shared_experts.up_proj.weight": (fs, h),
        "mlp.shared_experts.down_proj.weight": (h, fs),
    })
    for j in range(c.n_routed_experts):
        s[f"mlp.experts.{j}.gate_proj.weight"] = (fm, h)
        s[f"mlp.experts.{j}.up_proj.weight"] = (fm, h)
        s[f"mlp.experts.{j}.down_proj.weight"] = (h, fm)
    return s


def _mtp_extra_shapes(c: DeepSeekV3Config) -> dict[str, tuple[int, ...]]:
    h, v = c.hidden_size, c.vocab_size
    return {"embed_tokens.weight": (v, h), "enorm.weight": (h,), "hnorm.weight": (h,),
            "eh_proj.weight": (h, 2 * h), "shared_head.norm.weight": (h,), "shared_head.head.weight": (v, h)}


def hf_tensor_shapes(c: DeepSeekV3Config) -> dict[str, tuple[int, ...]]:
    """Every tensor a DeepSeek-V3 HF checkpoint with config ``c`` holds (FP8 scales excluded)."""
    out = {"model.embed_tokens.weight": (c.vocab_size, c.hidden_size), "model.norm.weight": (c.hidden_size,),
           "lm_head.weight": (c.vocab_size, c.hidden_size)}
    for i in range(c.num_hidden_layers + c.num_nextn_predict_layers):
        shapes = _layer_shapes(c, dense=i < c.first_k_dense_replace)
        if i >= c.num_hidden_layers:
            shapes.update(_mtp_extra_shapes(c))
        out.update({f"model.layers.{i}.{k}": v for k, v in shapes.items()})
    return out


# The 2-D linear weights that DeepSeek's FP8 release stores as float8_e4m3fn with a `_scale_inv` (spec §1.4).
# Everything else (router gate, embeddings, lm_head, norms, eh_proj, shared_head) stays bf16/float32.
_FP8_WEIGHT = re.compile(
    r"^model\.layers\.\d+\.("
    r"self_attn\.(q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
    r"|mlp\.(shared_experts\.|experts\.\d+\.)?(gate_proj|up_proj|down_proj)"
    r")\.weight$")


def is_fp8_weight(name: str) -> bool:
    """Whether the FP8 release stores ``name`` as float8_e4m3fn with a ``_scale_inv``."""
    return _FP8_WEIGHT.match(name) is not None


# --- the mcore side: tables -----------------------------------------------------------------------------------------

ATTENTION = [
    ("input_layernorm.weight", ("input_layernorm.weight",), Split.REPLICATED),
    ("self_attention.linear_qkv.weight",
     ("self_attn.q_a_proj.weight", "self_attn.kv_a_proj_with_mqa.weight"), Split.FUSED_ROWS),  # LinearNoTP
    ("self_attention.q_layernorm.weight", ("self_attn.q_a_layernorm.weight",), Split.REPLICATED),
    ("self_attention.kv_layernorm.weight", ("self_attn.kv_a_layernorm.weight",), Split.REPLICATED),
]
# The up-projections: whole (default), or split per head part with --mla-mm-split (spec §3.4).
ATTENTION_UP = [
    ("self_attention.linear_q_up_proj.weight", ("self_attn.q_b_proj.weight",), Split.COLUMN),    # whole heads
    ("self_attention.linear_kv_up_proj.weight", ("self_attn.kv_b_proj.weight",), Split.COLUMN),  # whole heads
]
# (target, source, per-head parts as config fields, which part); each is then split by whole heads over TP.
MLA_MM_SPLIT = [
    ("self_attention.linear_qk_nope.weight", "self_attn.q_b_proj.weight", ("qk_nope_head_dim", "qk_rope_head_dim"), 0),
    ("self_attention.linear_qk_rope.weight", "self_attn.q_b_proj.weight", ("qk_nope_head_dim", "qk_rope_head_dim"), 1),
    ("self_attention.linear_kv_nope.weight", "self_attn.kv_b_proj.weight", ("qk_nope_head_dim", "v_head_dim"), 0),
    ("self_attention.linear_v.weight", "self_attn.kv_b_proj.weight", ("qk_nope_head_dim", "v_head_dim"), 1),
]
ATTENTION_OUT = [
    ("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",), Split.ROW),
    ("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",), Split.REPLICATED),
]
# MindSpeed's MLA names before 2025-07-23 (--mla-key-names legacy).
LEGACY_MLA_NAMES = {
    "self_attention.linear_q_up_proj.weight": "self_attention.linear_qb.weight",
    "self_attention.linear_kv_up_proj.weight": "self_attention.linear_kvb.weight",
    "self_attention.kv_layernorm.weight": "self_attention.k_layernorm.weight",
}

DENSE_MLP = [
    ("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), Split.GATED_COLUMN),
    ("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), Split.ROW),
]

MOE_MLP = [
    ("mlp.router.weight", ("mlp.gate.weight",), Split.REPLICATED),
    ("mlp.router.expert_bias", ("mlp.gate.e_score_correction_bias",), Split.REPLICATED),  # stays float32
    ("mlp.shared_experts.linear_fc1.weight",
     ("mlp.shared_experts.gate_proj.weight", "mlp.shared_experts.up_proj.weight"), Split.GATED_COLUMN),
    ("mlp.shared_experts.linear_fc2.weight", ("mlp.shared_experts.down_proj.weight",), Split.ROW),
]

# Routed expert j, per rank slice of the expert tensor-parallel group (TPe = TP, or 1 with tp-extend-ep / ETP 1).
EXPERT_FC1 = (("mlp.experts.{j}.gate_proj.weight", "mlp.experts.{j}.up_proj.weight"), Split.GATED_COLUMN)
EXPERT_FC2 = (("mlp.experts.{j}.down_proj.weight",), Split.ROW)

# MTP module m (HF layer num_hidden_layers + m), besides its transformer layer.
MTP_EXTRA = [
    ("enorm.weight", ("enorm.weight",), Split.REPLICATED),
    ("hnorm.weight", ("hnorm.weight",), Split.REPLICATED),
    ("eh_proj.weight", ("eh_proj.weight",), Split.COLUMN),
]


# --- building every rank's state dict ------------------------------------------------------------------------------

@dataclass(frozen=True)
class TargetTensor:
    group: str     # top-level key of the .pt file holding it ("model")
    name: str
    node: Node


def hf_layer_list(c: DeepSeekV3Config, num_layers: int, first_k: int) -> list[int]:
    """HF layer index for each real slot (spec §4.2): the first ``first_k`` layers, then the MoE layers."""
    return (list(range(first_k)) + list(range(c.first_k_dense_replace, c.num_hidden_layers)))[:num_layers]


def pipeline_layout(c: DeepSeekV3Config, sizes: ParallelSizes, o: McoreOptions) -> PipelineLayout:
    slots = c.num_hidden_layers + len(o.noop_layers) if o.num_layers is None else o.num_layers
    return PipelineLayout(slots, sizes.pp, o.vpp_layers, tuple(o.noop_layers),
                          tuple(o.num_layer_list) if o.num_layer_list is not None else None, o.dualpipev)


def validate(c: DeepSeekV3Config, sizes: ParallelSizes, o: McoreOptions) -> tuple[int, int]:
    """Every contradiction between config, sizes and options, raised at once.  Returns (real layers, first_k)."""
    layout = pipeline_layout(c, sizes, o)
    problems = validate_pipeline(layout)
    real = layout.num_layers - len(set(o.noop_layers))
    first_k = c.first_k_dense_replace if o.first_k_dense_replace is None else o.first_k_dense_replace
    tp = sizes.tp
    ep = sizes.ep
    if not 1 <= real <= c.num_hidden_layers:
        problems.append(f"--num-layers {layout.num_layers} leaves {real} real layers (noop slots excluded); the "
                        f"checkpoint has {c.num_hidden_layers} (num_hidden_layers in config.json).")
    available = first_k + c.num_hidden_layers - c.first_k_dense_replace
    if 1 <= real <= c.num_hidden_layers and 0 <= first_k <= c.first_k_dense_replace and real > available:
        problems.append(f"--first-k-dense-replace {first_k} leaves {available} HF layers for {real} real layer "
                        f"slots. Lower --num-layers or raise --first-k-dense-replace.")
    if not 0 <= first_k <= c.first_k_dense_replace:
        problems.append(f"--first-k-dense-replace {first_k}: must be between 0 and the checkpoint's "
                        f"first_k_dense_replace ({c.first_k_dense_replace}).")
    elif o.dualpipev and first_k != c.first_k_dense_replace:
        problems.append("--first-k-dense-replace smaller than the checkpoint's is not supported with dualpipev "
                        "(MindSpeed does not apply it there either).")
    if o.dualpipev and tp > 1 and not o.moe_tp_extend_ep:
        problems.append("--schedules-method dualpipev with --target-tensor-parallel-size > 1 needs "
                        "--moe-tp-extend-ep.")
    if o.mla_key_names not in ("current", "legacy"):
        problems.append(f"--mla-key-names {o.mla_key_names!r}: expected 'current' or 'legacy'.")
    if o.expert_tensor_parallel_size not in (None, 1, tp):
        problems.append(f"--expert-tensor-parallel-size {o.expert_tensor_parallel_size}: only 1 or the tensor "
                        f"parallel size ({tp}) are supported.")
    etp1 = o.expert_tensor_parallel_size == 1 and tp > 1
    if etp1 and o.moe_tp_extend_ep:
        problems.append("--expert-tensor-parallel-size 1 and --moe-tp-extend-ep are mutually exclusive.")
    if etp1 and tp % ep and ep % tp:
        problems.append(f"--expert-tensor-parallel-size 1 needs TP ({tp}) and EP ({ep}) to divide one another.")
    if o.moe_tp_extend_ep and c.n_routed_experts % (ep * tp):
        problems.append(f"--moe-tp-extend-ep: EP x TP = {ep * tp} does not divide n_routed_experts = "
                        f"{c.n_routed_experts}.")
    if o.mtp_num_layers < 0 or o.mtp_num_layers > c.num_nextn_predict_layers:
        problems.append(f"--mtp-num-layers {o.mtp_num_layers}: the checkpoint has {c.num_nextn_predict_layers} "
                        f"MTP layer(s) (num_nextn_predict_layers in config.json). Pass at most that.")
    divisible = [
        ("num_attention_heads", c.num_attention_heads, tp, "--target-tensor-parallel-size"),
        ("vocab_size", c.vocab_size, tp, "--target-tensor-parallel-size"),
        ("intermediate_size", c.intermediate_size, tp, "--target-tensor-parallel-size"),
        ("moe_intermediate_size", c.moe_intermediate_size,
         1 if (o.moe_tp_extend_ep or o.expert_tensor_parallel_size == 1) else tp, "--target-tensor-parallel-size"),
        ("moe_intermediate_size * n_shared_experts", c.shared_ffn, tp, "--target-tensor-parallel-size"),
        ("n_routed_experts", c.n_routed_experts, ep, "--target-expert-parallel-size"),
    ]
    if o.mtp_num_layers:  # eh_proj is the one tensor split along the hidden size
        divisible.append(("hidden_size", c.hidden_size, tp, "--target-tensor-parallel-size"))
    for field, value, size, flag in divisible:
        if value % size:
            problems.append(f"{flag} {size} does not divide {field} = {value}. Choose a size that divides it.")
    if problems:
        raise ValidationError(problems)
    return real, first_k


def build_rank_tensors(c: DeepSeekV3Config, sizes: ParallelSizes, o: McoreOptions,
                       src: SourceTensors) -> dict[RankFile, list[TargetTensor]]:
    """Every rank file's ordered state dict, as nodes over ``src`` (spec §3, §4)."""
    p = _placement(c, sizes, o)
    out: dict[RankFile, list[TargetTensor]] = {}
    for r in p.ranks:
        t = r.tp_rank
        tensors: list[TargetTensor] = []
        for group in p.layout.groups():
            chunk = (r.pp_rank, group)
            items: list[tuple[str, Node]] = []
            if chunk == p.first:
                items.append(("embedding.word_embeddings.weight",
                              apply_split(Split.COLUMN, [src.get("model.embed_tokens.weight")], sizes.tp, t)))
            for local, hf in p.by_chunk[chunk]:
                items += _layer(c, sizes, o, src, r, f"decoder.layers.{local}.", f"model.layers.{hf}.",
                                dense=hf < p.first_k)
            if chunk == p.last:
                items.append((p.final_norm, src.get("model.norm.weight")))
                items.append(("output_layer.weight",
                              apply_split(Split.COLUMN, [src.get("lm_head.weight")], sizes.tp, t)))
                for m in range(o.mtp_num_layers):
                    items += _mtp(c, sizes, o, src, r, m)
            tensors += [TargetTensor(group, name, node) for name, node in items]
        out[r] = tensors
    _declare_dropped(c, sizes, o, src, p.hf_layers)
    return out


@dataclass(frozen=True)
class _Placement:
    """Where everything goes for one (config, sizes, options): shared by both directions."""

    layout: PipelineLayout
    ranks: list[RankFile]
    hf_layers: list[int]                                   # HF layer of each real slot, in slot order
    by_chunk: dict[tuple[int, str], list[tuple[int, int]]]  # (pp, group) -> [(local index, HF layer)]
    first: tuple[int, str]                                 # chunk holding the embedding
    last: tuple[int, str]                                  # chunk holding final norm, output layer, MTP
    first_k: int
    final_norm: str


def _placement(c: DeepSeekV3Config, sizes: ParallelSizes, o: McoreOptions) -> _Placement:
    real, first_k = validate(c, sizes, o)
    layout = pipeline_layout(c, sizes, o)
    hf_layers = hf_layer_list(c, real, first_k)
    by_chunk: dict[tuple[int, str], list[tuple[int, int]]] = defaultdict(list)
    for i, slot in enumerate(place_slots(layout)):
        by_chunk[(slot.pp_rank, slot.group)].append((slot.local, hf_layers[i]))
    ranks = etp1_rank_files(sizes) if o.expert_tensor_parallel_size == 1 else rank_files(sizes)
    final_norm = "final_layernorm.weight" if o.mtp_num_layers else "decoder.final_layernorm.weight"
    return _Placement(layout, ranks, hf_layers, by_chunk, layout.first_chunk(), layout.last_chunk(), first_k,
                      final_norm)


def _mtp(c, sizes, o, src: SourceTensors, r: RankFile, m: int) -> list[tuple[str, Node]]:
    """MTP module m (HF layer num_hidden_layers + m), on the chunk of the final norm (spec §3.7)."""
    t = r.tp_rank
    hf_prefix = f"model.layers.{c.num_hidden_layers + m}."
    items = []
    if sizes.pp > 1:  # the MTP stage needs its own copy of the embedding
        items.append(("embedding.word_embeddings.weight", apply_split(
            Split.COLUMN, [src.get(hf_prefix + "embed_tokens.weight")], sizes.tp, t)))
    items += _table(MTP_EXTRA, src, sizes.tp, t, f"mtp.layers.{m}.", hf_prefix)
    items.append((f"mtp.final_layernorms.{m}.weight", src.get(hf_prefix + "shared_head.norm.weight")))
    items += _layer(c, sizes, o, src, r, f"mtp.layers.{m}.transformer_layer.", hf_prefix, dense=False)
    return items


def _table(rows, src: SourceTensors, tp: int, t: int, prefix: str, hf_prefix: str) -> list[tuple[str, Node]]:
    return [(prefix + target, apply_split(split, [src.get(hf_prefix + s) for s in sources], tp, t))
            for target, sources, split in rows]


def _layer(c, sizes, o, src, r: RankFile, prefix: str, hf_prefix: str, dense: bool) -> list[tuple[str, Node]]:
    t, tp = r.tp_rank, sizes.tp
    items = _table(ATTENTION, src, tp, t, prefix, hf_prefix)
    if o.mla_mm_split:
        for target, source, parts, index in MLA_MM_SPLIT:
            whole = head_part(src.get(hf_prefix + source), c.num_attention_heads,
                              tuple(getattr(c, f) for f in parts), index)
            items.append((prefix + target, apply_split(Split.COLUMN, [whole], tp, t)))
    else:
        items += _table(ATTENTION_UP, src, tp, t, prefix, hf_prefix)
    items += _table(ATTENTION_OUT, src, tp, t, prefix, hf_prefix)
    if o.mla_key_names == "legacy":
        items = [(_legacy(name, prefix), node) for name, node in items]
    if dense:
        return items + _table(DENSE_MLP, src, tp, t, prefix, hf_prefix)
    items += _table(MOE_MLP, src, tp, t, prefix, hf_prefix)
    experts, tpe, te = _expert_slice(c, sizes, o, r)

    def piece(rule, j):
        names, split = rule
        return apply_split(split, [src.get(hf_prefix + n.format(j=j)) for n in names], tpe, te)

    if o.moe_grouped_gemm:
        items.append((prefix + "mlp.experts.weight1", grouped_weight1([piece(EXPERT_FC1, j) for j in experts])))
        items.append((prefix + "mlp.experts.weight2", grouped_weight2([piece(EXPERT_FC2, j) for j in experts])))
    else:
        for q, j in enumerate(experts):
            base = f"{prefix}mlp.experts.local_experts.{q}."
            items.append((base + "linear_fc1.weight", piece(EXPERT_FC1, j)))
            items.append((base + "linear_fc2.weight", piece(EXPERT_FC2, j)))
    return items


def _legacy(name: str, prefix: str) -> str:
    suffix = name[len(prefix):]
    return prefix + LEGACY_MLA_NAMES.get(suffix, suffix)


def _expert_slice(c, sizes: ParallelSizes, o: McoreOptions, r: RankFile) -> tuple[range, int, int]:
    """(global experts of rank r, expert-TP size, expert-TP rank), spec §3.6 and §4.7."""
    if o.moe_tp_extend_ep:  # TP becomes extra EP: bucket e*TP + t of E/(EP*TP) whole experts
        bucket = r.ep_rank * sizes.tp + r.tp_rank
        return expert_range(bucket, sizes.ep * sizes.tp, c.n_routed_experts), 1, 0
    if o.expert_tensor_parallel_size == 1:  # whole experts by EP rank
        return expert_range(r.ep_rank, sizes.ep, c.n_routed_experts), 1, 0
    return expert_range(r.ep_rank, sizes.ep, c.n_routed_experts), sizes.tp, r.tp_rank


def _declare_dropped(c, sizes, o, src: SourceTensors, hf_layers: list[int]) -> None:
    """Source tensors deliberately not converted, with the reason (coverage accounting, spec §3.8)."""
    used = set(hf_layers)
    for i in range(c.num_hidden_layers):
        if i not in used:
            why = ("--first-k-dense-replace skips this dense layer" if i < c.first_k_dense_replace
                   else "beyond --num-layers")
            for name in _layer_shapes(c, dense=i < c.first_k_dense_replace):
                src.drop(f"model.layers.{i}.{name}", why)
    for m in range(c.num_nextn_predict_layers):
        prefix = f"model.layers.{c.num_hidden_layers + m}."
        if m >= o.mtp_num_layers:
            for name in list(_layer_shapes(c, dense=False)) + list(_mtp_extra_shapes(c)):
                src.drop(prefix + name, f"MTP layer {m} not requested (--mtp-num-layers {o.mtp_num_layers})")
            continue
        src.drop(prefix + "shared_head.head.weight", "copy of lm_head; MTP uses output_layer (spec §3.7)")
        if sizes.pp == 1:
            src.drop(prefix + "embed_tokens.weight", "copy of model.embed_tokens; with PP 1 the MTP shares "
                                                     "the stage's embedding (spec §3.7)")


# --- the reverse: mcore -> HF (spec §7), the same tables read backwards ---------------------------------------------

class RankTensors(Protocol):
    """What the reverse mapping needs from an mcore checkpoint: one rank file's tensor as a graph node."""

    def get(self, rank: RankFile, group: str, name: str) -> Node:
        ...


def output_hf_config(c: DeepSeekV3Config, sizes: ParallelSizes, o: McoreOptions) -> dict[str, int]:
    """The config.json fields that describe the HF checkpoint mcore -> HF writes (the layers it holds).

    Layers are renumbered densely: output layer i is the i-th real slot, so a checkpoint converted with
    ``--num-layers`` or a lower ``--first-k-dense-replace`` comes back as a smaller, valid model."""
    return _output_fields(_placement(c, sizes, o), o)


def _output_fields(p: "_Placement", o: McoreOptions) -> dict[str, int]:
    return {"num_hidden_layers": len(p.hf_layers), "first_k_dense_replace": p.first_k,
            "num_nextn_predict_layers": o.mtp_num_layers}


def build_hf_tensors(c: DeepSeekV3Config, sizes: ParallelSizes, o: McoreOptions,
                     src: RankTensors) -> dict[str, Node]:
    """Every HF tensor of the checkpoint the mcore layout holds, in HF order, as nodes over ``src``.

    The exact inverse of :func:`build_rank_tensors`: every rule is undone by its ``merge_*`` counterpart
    (:mod:`streamconv.mapping.rules`).  Tensors held by several rank files (replicas across TP or EP) are
    read from the first file that holds them; the planner can check the other copies."""
    p = _placement(c, sizes, o)
    holder: dict[tuple[int, int], RankFile] = {}  # (pp, tp) -> first rank file of that stage and TP rank
    for r in p.ranks:
        holder.setdefault((r.pp_rank, r.tp_rank), r)
    slot_of = {hf: (pp, group, local) for (pp, group), items in p.by_chunk.items() for local, hf in items}

    def pieces(chunk: tuple[int, str], name: str) -> list[Node]:
        pp, group = chunk
        return [src.get(holder[(pp, t)], group, name) for t in range(sizes.tp)]

    out: dict[str, Node] = {}
    (out["model.embed_tokens.weight"],) = merge_split(Split.COLUMN, pieces(p.first, "embedding.word_embeddings.weight"))
    for i, hf in enumerate(p.hf_layers):
        pp, group, local = slot_of[hf]
        out.update(_unlayer(c, sizes, o, src, p, (pp, group), pieces, f"decoder.layers.{local}.",
                            f"model.layers.{i}.", dense=hf < p.first_k))
    (out["model.norm.weight"],) = merge_split(Split.REPLICATED, pieces(p.last, p.final_norm))
    (out["lm_head.weight"],) = merge_split(Split.COLUMN, pieces(p.last, "output_layer.weight"))
    for m in range(o.mtp_num_layers):
        hf_prefix = f"model.layers.{len(p.hf_layers) + m}."
        prefix = f"mtp.layers.{m}."
        out.update(_unlayer(c, sizes, o, src, p, p.last, pieces, prefix + "transformer_layer.", hf_prefix,
                            dense=False))
        if sizes.pp > 1:  # the MTP stage's own copy of the embedding
            (out[hf_prefix + "embed_tokens.weight"],) = merge_split(
                Split.COLUMN, pieces(p.last, "embedding.word_embeddings.weight"))
        else:             # PP 1: the MTP module shares the stage's embedding
            out[hf_prefix + "embed_tokens.weight"] = out["model.embed_tokens.weight"]
        for target, sources, split in MTP_EXTRA:
            out.update(zip([hf_prefix + s for s in sources], merge_split(split, pieces(p.last, prefix + target))))
        (out[hf_prefix + "shared_head.norm.weight"],) = merge_split(
            Split.REPLICATED, pieces(p.last, f"mtp.final_layernorms.{m}.weight"))
        out[hf_prefix + "shared_head.head.weight"] = out["lm_head.weight"]  # DeepSeek stores lm_head again
    order = {name: k for k, name in enumerate(hf_tensor_shapes(dataclasses.replace(c, **_output_fields(p, o))))}
    return dict(sorted(out.items(), key=lambda kv: order[kv[0]]))


def _unlayer(c, sizes, o, src: RankTensors, p: _Placement, chunk: tuple[int, str], pieces, prefix: str,
             hf_prefix: str, dense: bool) -> dict[str, Node]:
    """Inverse of :func:`_layer`: one transformer layer's HF tensors from the rank files of ``chunk``;
    ``pieces(chunk, name)`` gives each TP rank's copy of a non-expert tensor."""
    pp, group = chunk
    shapes = _layer_shapes(c, dense)

    def name_of(suffix: str) -> str:
        return prefix + (LEGACY_MLA_NAMES.get(suffix, suffix) if o.mla_key_names == "legacy" else suffix)

    def untable(rows) -> dict[str, Node]:
        got = {}
        for target, sources, split in rows:
            merged = merge_split(split, pieces(chunk, name_of(target)), tuple(shapes[s][0] for s in sources))
            got.update(zip([hf_prefix + s for s in sources], merged))
        return got

    out = untable(ATTENTION)
    if o.mla_mm_split:
        by_source: dict[str, list] = defaultdict(list)
        for target, source, parts, index in MLA_MM_SPLIT:
            by_source[source].append(merge_split(Split.COLUMN, pieces(chunk, name_of(target)))[0])  # index order
        for source, parts in by_source.items():
            out[hf_prefix + source] = merge_head_parts(parts, c.num_attention_heads)
    else:
        out.update(untable(ATTENTION_UP))
    out.update(untable(ATTENTION_OUT))
    if dense:
        out.update(untable(DENSE_MLP))
        return out
    out.update(untable(MOE_MLP))

    fc1: dict[int, dict[int, Node]] = defaultdict(dict)  # expert -> expert-TP rank -> piece
    fc2: dict[int, dict[int, Node]] = defaultdict(dict)
    for r in p.ranks:
        if r.pp_rank != pp:
            continue
        experts, tpe, te = _expert_slice(c, sizes, o, r)
        if o.moe_grouped_gemm:
            w1 = ungroup_weight1(src.get(r, group, prefix + "mlp.experts.weight1"), len(experts))
            w2 = ungroup_weight2(src.get(r, group, prefix + "mlp.experts.weight2"), len(experts))
        else:
            base = prefix + "mlp.experts.local_experts.{q}."
            w1 = [src.get(r, group, base.format(q=q) + "linear_fc1.weight") for q in range(len(experts))]
            w2 = [src.get(r, group, base.format(q=q) + "linear_fc2.weight") for q in range(len(experts))]
        for q, j in enumerate(experts):  # several files can hold the same slice (ETP 1): keep the first
            fc1[j].setdefault(te, w1[q])
            fc2[j].setdefault(te, w2[q])
    for j in range(c.n_routed_experts):
        tpe = len(fc1[j])
        names, split = EXPERT_FC1
        out.update(zip([hf_prefix + n.format(j=j) for n in names],
                       merge_split(split, [fc1[j][t] for t in range(tpe)])))
        names, split = EXPERT_FC2
        out.update(zip([hf_prefix + n.format(j=j) for n in names],
                       merge_split(split, [fc2[j][t] for t in range(tpe)])))
    return out


def output_to_source_layer(c: DeepSeekV3Config, sizes: ParallelSizes, o: McoreOptions):
    """``name -> name``: an output HF tensor's name in the HF checkpoint the mcore one was converted from
    (output layers are renumbered densely, see :func:`output_hf_config`)."""
    p = _placement(c, sizes, o)
    source = list(p.hf_layers) + [c.num_hidden_layers + m for m in range(o.mtp_num_layers)]

    def rename(name: str) -> str:
        parts = name.split(".")
        if name.startswith("model.layers."):
            parts[2] = str(source[int(parts[2])])
        return ".".join(parts)

    return rename
