"""The MindSpeed-LLM flags that shape an mcore checkpoint beyond TP/PP/EP, and their validation.

Model-neutral: what a family contributes is a :class:`ModelFacts` (layer and expert counts, and the sizes each
parallel degree must divide, named after its config fields), so every family gets the same checks and the same
messages.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ValidationError
from .parallel import ParallelSizes
from .pipeline import PipelineLayout
from .pipeline import validate as validate_pipeline

TP_FLAG = "--target-tensor-parallel-size"
EP_FLAG = "--target-expert-parallel-size"


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
    mla_key_names: str = "current"             # MLA families: "legacy" = names before 2025-07-23
    mla_mm_split: bool = False                 # MLA families: --mla-mm-split
    moe_tp_extend_ep: bool = False             # --moe-tp-extend-ep: experts whole, TP becomes extra EP
    expert_tensor_parallel_size: int | None = None  # 1: experts whole by EP rank, only instantiated ranks

    @property
    def experts_whole(self) -> bool:
        """Routed experts are not TP-split (tp-extend-ep, or expert tensor parallel size 1)."""
        return self.moe_tp_extend_ep or self.expert_tensor_parallel_size == 1


@dataclass(frozen=True)
class Divisible:
    """``value`` (config field ``field``) must be divisible by the parallel size that ``flag`` sets."""

    field: str
    value: int
    size: int
    flag: str = TP_FLAG


@dataclass(frozen=True)
class ModelFacts:
    """What the layout checks need to know of a model, whatever its family."""

    family: str                    # how messages name the model family
    num_layers: int                # HF decoder layers, MTP excluded (num_hidden_layers)
    first_dense: int               # leading dense layers of the HF checkpoint (first_k_dense_replace)
    num_experts: int               # routed experts per MoE layer
    mtp_layers: int                # MTP modules the checkpoint holds (num_nextn_predict_layers)
    divisible: tuple[Divisible, ...] = ()   # sizes that must divide (TP-split dims, ...)
    variants: frozenset[str] = frozenset()  # option names the family accepts: "mla_mm_split", "mla_key_names"
    first_dense_field: str = "first_k_dense_replace"
    experts_field: str = "n_routed_experts"


def pipeline_layout(facts: ModelFacts, sizes: ParallelSizes, o: McoreOptions) -> PipelineLayout:
    slots = facts.num_layers + len(o.noop_layers) if o.num_layers is None else o.num_layers
    return PipelineLayout(slots, sizes.pp, o.vpp_layers, tuple(o.noop_layers),
                          tuple(o.num_layer_list) if o.num_layer_list is not None else None, o.dualpipev)


def validate(facts: ModelFacts, sizes: ParallelSizes, o: McoreOptions) -> tuple[int, int]:
    """Every contradiction between model, sizes and options, raised at once.  Returns (real layers, first_k)."""
    layout = pipeline_layout(facts, sizes, o)
    problems = validate_pipeline(layout)
    real = layout.num_layers - len(set(o.noop_layers))
    c_first = facts.first_dense
    first_k = c_first if o.first_k_dense_replace is None else o.first_k_dense_replace
    tp, ep = sizes.tp, sizes.ep
    if not 1 <= real <= facts.num_layers:
        problems.append(f"--num-layers {layout.num_layers} leaves {real} real layers (noop slots excluded); the "
                        f"checkpoint has {facts.num_layers} (num_hidden_layers in config.json).")
    available = first_k + facts.num_layers - c_first
    if 1 <= real <= facts.num_layers and 0 <= first_k <= c_first and real > available:
        problems.append(f"--first-k-dense-replace {first_k} leaves {available} HF layers for {real} real layer "
                        f"slots. Lower --num-layers or raise --first-k-dense-replace.")
    if not 0 <= first_k <= c_first:
        problems.append(f"--first-k-dense-replace {first_k}: must be between 0 and the checkpoint's "
                        f"{facts.first_dense_field} ({c_first}).")
    elif o.dualpipev and first_k != c_first:
        problems.append("--first-k-dense-replace smaller than the checkpoint's is not supported with dualpipev "
                        "(MindSpeed does not apply it there either).")
    if o.dualpipev and tp > 1 and not o.moe_tp_extend_ep:
        problems.append(f"--schedules-method dualpipev with {TP_FLAG} > 1 needs --moe-tp-extend-ep.")
    if o.mla_key_names not in ("current", "legacy"):
        problems.append(f"--mla-key-names {o.mla_key_names!r}: expected 'current' or 'legacy'.")
    for name, given, flag in (("mla_mm_split", o.mla_mm_split, "--mla-mm-split"),
                              ("mla_key_names", o.mla_key_names == "legacy", "--mla-key-names legacy")):
        if given and name not in facts.variants:
            problems.append(f"{flag}: {facts.family} has no multi-latent attention; drop the flag.")
    if o.expert_tensor_parallel_size not in (None, 1, tp):
        problems.append(f"--expert-tensor-parallel-size {o.expert_tensor_parallel_size}: only 1 or the tensor "
                        f"parallel size ({tp}) are supported.")
    etp1 = o.expert_tensor_parallel_size == 1 and tp > 1
    if etp1 and o.moe_tp_extend_ep:
        problems.append("--expert-tensor-parallel-size 1 and --moe-tp-extend-ep are mutually exclusive.")
    if etp1 and tp % ep and ep % tp:
        problems.append(f"--expert-tensor-parallel-size 1 needs TP ({tp}) and EP ({ep}) to divide one another.")
    if o.moe_tp_extend_ep and facts.num_experts % (ep * tp):
        problems.append(f"--moe-tp-extend-ep: EP x TP = {ep * tp} does not divide {facts.experts_field} = "
                        f"{facts.num_experts}.")
    if o.mtp_num_layers < 0 or o.mtp_num_layers > facts.mtp_layers:
        problems.append(f"--mtp-num-layers {o.mtp_num_layers}: the checkpoint has {facts.mtp_layers} "
                        f"MTP layer(s) (num_nextn_predict_layers in config.json). Pass at most that.")
    for d in facts.divisible:
        if d.value % d.size:
            problems.append(f"{d.flag} {d.size} does not divide {d.field} = {d.value}. Choose a size that divides it.")
    if problems:
        raise ValidationError(problems)
    return real, first_k
