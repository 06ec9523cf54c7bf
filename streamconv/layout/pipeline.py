"""Pipeline placement of layer slots: PP (even or ``--num-layer-list``), VPP chunks, noop slots, dualpipev.

Pure functions of sizes, table-tested against the worked examples of the MindSpeed-LLM layouts.  Vocabulary:
``L`` slots (``--num-layers``, noop slots included, MTP excluded), ``PP`` stages, ``group`` the top-level key
of a rank file holding one model chunk (``model``, or ``model0`` ... ``model{v-1}``), ``local`` the layer
index inside its chunk (noop slots keep theirs, so numbering may have gaps).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ValidationError
from .parallel import LayerSlot


@dataclass(frozen=True)
class PipelineLayout:
    num_layers: int                              # L: layer slots, noop included
    pp: int = 1
    vpp_layers: int | None = None                # --num-layers-per-virtual-pipeline-stage
    noop_layers: tuple[int, ...] = ()            # --noop-layers (global slot indices)
    num_layer_list: tuple[int, ...] | None = None  # --num-layer-list
    dualpipev: bool = False                      # --schedules-method dualpipev

    @property
    def chunks(self) -> int:
        if self.dualpipev:
            return 2
        if self.vpp_layers:
            return self.num_layers // self.pp // self.vpp_layers
        return 1

    def groups(self) -> tuple[str, ...]:
        """Top-level keys of every rank file: ``model`` or ``model0..model{v-1}``."""
        if self.chunks == 1 and not self.dualpipev and not self.vpp_layers:
            return ("model",)
        return tuple(f"model{v}" for v in range(self.chunks))

    def first_chunk(self) -> tuple[int, str]:
        """(stage, group) holding the embedding."""
        return 0, self.groups()[0]

    def last_chunk(self) -> tuple[int, str]:
        """(stage, group) holding the final norm, the output layer and MTP."""
        if self.dualpipev:
            return 0, self.groups()[1]
        return self.pp - 1, self.groups()[-1]


def validate(p: PipelineLayout) -> list[str]:
    """Every contradiction among the pipeline flags (one line each)."""
    problems = []
    L, pp = p.num_layers, p.pp
    bad_noop = sorted(i for i in p.noop_layers if not 0 <= i < L)
    if bad_noop:
        problems.append(f"--noop-layers {','.join(map(str, bad_noop))}: outside the {L} layer slots "
                        f"(0..{L - 1}); --num-layers counts noop slots.")
    if len(set(p.noop_layers)) != len(p.noop_layers):
        problems.append("--noop-layers lists a slot twice.")
    if p.vpp_layers is not None and p.dualpipev:
        problems.append("--num-layers-per-virtual-pipeline-stage and --schedules-method dualpipev are mutually "
                        "exclusive (dualpipev fixes two chunks per stage).")
    if p.num_layer_list is not None:
        if p.vpp_layers is not None or p.noop_layers or p.dualpipev:
            problems.append("--num-layer-list cannot be combined with VPP, --noop-layers or dualpipev.")
        if len(p.num_layer_list) != pp or sum(p.num_layer_list) != L or min(p.num_layer_list, default=1) < 1:
            problems.append(f"--num-layer-list {','.join(map(str, p.num_layer_list))}: needs exactly {pp} positive "
                            f"entries (one per stage) summing to --num-layers {L}.")
    elif p.dualpipev:
        if L % (2 * pp):
            problems.append(f"--num-layers {L} is not divisible by 2 x --target-pipeline-parallel-size ({2 * pp}), "
                            f"as dualpipev requires.")
    elif L % pp:
        problems.append(f"--num-layers {L} is not divisible by --target-pipeline-parallel-size {pp}. "
                        f"Choose a pipeline size that divides the layer count, or pass --num-layer-list.")
    elif p.vpp_layers is not None and (p.vpp_layers < 1 or (L // pp) % p.vpp_layers):
        problems.append(f"--num-layers-per-virtual-pipeline-stage {p.vpp_layers} does not divide the {L // pp} "
                        f"layers of a stage.")
    return problems


def place_slots(p: PipelineLayout) -> list[LayerSlot]:
    """Where every real (non-noop) slot goes, in ascending slot order."""
    problems = validate(p)
    if problems:
        raise ValidationError(problems)
    L, pp = p.num_layers, p.pp
    noop = set(p.noop_layers)
    groups = p.groups()
    out = []
    if p.num_layer_list is not None:
        g = 0
        for stage, count in enumerate(p.num_layer_list):
            for local in range(count):
                out.append(LayerSlot(g, stage, groups[0], local))
                g += 1
        return out
    for g in range(L):
        if g in noop:
            continue
        if p.dualpipev:
            s = L // (2 * pp)
            if g < L // 2:
                stage, v, local = g // s, 0, g % s
            else:
                stage = (L - 1 - g) // s
                v, local = 1, g - (L - (stage + 1) * s)
        elif p.vpp_layers:
            c = g // p.vpp_layers
            stage, v, local = c % pp, c // pp, g % p.vpp_layers
        else:
            per = L // pp
            stage, v, local = g // per, 0, g % per
        out.append(LayerSlot(g, stage, groups[v], local))
    return out
