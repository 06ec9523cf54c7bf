"""Where everything of a model goes, for one (model, sizes, options): shared by both conversion directions.

Model-neutral: layers are numbered as in the HF checkpoint, experts by their global index; which tensors a
layer holds is the model family's business (:mod:`streamconv.mapping.assemble`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from .options import McoreOptions, ModelFacts, pipeline_layout, validate
from .parallel import ParallelSizes, RankFile, etp1_rank_files, expert_range, rank_files
from .pipeline import PipelineLayout, place_slots

Chunk = tuple[int, str]   # (pipeline stage, group: "model" or "model{v}")


@dataclass(frozen=True)
class Placement:
    """The rank files, and which HF layer lands in which chunk under which local index."""

    layout: PipelineLayout
    ranks: list[RankFile]
    hf_layers: list[int]                     # HF layer of each real slot, in slot order
    by_chunk: dict[Chunk, list[tuple[int, int]]]  # chunk -> [(local index, HF layer)]
    first: Chunk                             # chunk holding the embedding
    last: Chunk                              # chunk holding final norm, output layer, MTP
    first_k: int                             # dense layers kept (HF layers below it are dense)
    mtp_layers: int                          # MTP modules converted

    @property
    def final_norm(self) -> str:
        """MindSpeed moves the final norm to the top level when MTP is converted (spec §3.1)."""
        return "final_layernorm.weight" if self.mtp_layers else "decoder.final_layernorm.weight"

    def slot_of(self, hf_layer: int) -> tuple[Chunk, int]:
        """(chunk, local index) of an HF layer."""
        for chunk, items in self.by_chunk.items():
            for local, hf in items:
                if hf == hf_layer:
                    return chunk, local
        raise KeyError(hf_layer)


def hf_layer_list(facts: ModelFacts, num_layers: int, first_k: int) -> list[int]:
    """HF layer index for each real slot (spec §4.2): the first ``first_k`` layers, then the MoE layers."""
    return (list(range(first_k)) + list(range(facts.first_dense, facts.num_layers)))[:num_layers]


def place(facts: ModelFacts, sizes: ParallelSizes, o: McoreOptions) -> Placement:
    """Validate (every problem at once) and place every layer and rank file."""
    real, first_k = validate(facts, sizes, o)
    layout = pipeline_layout(facts, sizes, o)
    hf_layers = hf_layer_list(facts, real, first_k)
    by_chunk: dict[Chunk, list[tuple[int, int]]] = defaultdict(list)
    for i, slot in enumerate(place_slots(layout)):
        by_chunk[(slot.pp_rank, slot.group)].append((slot.local, hf_layers[i]))
    ranks = etp1_rank_files(sizes) if o.expert_tensor_parallel_size == 1 else rank_files(sizes)
    return Placement(layout, ranks, hf_layers, dict(by_chunk), layout.first_chunk(), layout.last_chunk(), first_k,
                     o.mtp_num_layers)


def expert_slice(num_experts: int, sizes: ParallelSizes, o: McoreOptions, r: RankFile) -> tuple[range, int, int]:
    """(global experts of rank r, expert-TP size, expert-TP rank), spec §3.6 and §4.7."""
    if o.moe_tp_extend_ep:  # TP becomes extra EP: bucket e*TP + t of E/(EP*TP) whole experts
        bucket = r.ep_rank * sizes.tp + r.tp_rank
        return expert_range(bucket, sizes.ep * sizes.tp, num_experts), 1, 0
    if o.expert_tensor_parallel_size == 1:  # whole experts by EP rank
        return expert_range(r.ep_rank, sizes.ep, num_experts), 1, 0
    return expert_range(r.ep_rank, sizes.ep, num_experts), sizes.tp, r.tp_rank


def expert_tp_size(sizes: ParallelSizes, o: McoreOptions) -> int:
    """How many pieces each routed expert is split into (TPe)."""
    return 1 if o.experts_whole else sizes.tp
