"""Megatron parallel layout: rank directories, pipeline placement of layer slots, expert ranges.

Everything here is a pure function of sizes (no I/O, no model knowledge), so it is table-tested.
Megatron naming: ``get_checkpoint_name`` (directory names); placement as the MindSpeed-LLM converters do it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ValidationError


@dataclass(frozen=True)
class ParallelSizes:
    """Target parallel sizes (Megatron names: tensor, pipeline, expert)."""

    tp: int = 1
    pp: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        bad = [f"--target-{n}-parallel-size {v}: must be a positive integer."
               for n, v in (("tensor", self.tp), ("pipeline", self.pp), ("expert", self.ep))
               if not isinstance(v, int) or v < 1]
        if bad:
            raise ValidationError(bad)


@dataclass(frozen=True)
class RankFile:
    """One ``model_optim_rng.pt`` of the checkpoint."""

    tp_rank: int
    pp_rank: int
    ep_rank: int


@dataclass(frozen=True)
class LayerSlot:
    """Where one real (non-noop) layer slot lands: stage, chunk group and local index within it."""

    slot: int
    pp_rank: int
    group: str      # "model" (no VPP); later "model0", "model1", ... for virtual chunks
    local: int


def rank_dir(r: RankFile, sizes: ParallelSizes) -> str:
    """Megatron ``get_checkpoint_name`` rank directory: mp_rank_TT[_PPP][_EEE]."""
    name = f"mp_rank_{r.tp_rank:02d}"
    if sizes.pp > 1:
        name += f"_{r.pp_rank:03d}"
    if sizes.ep > 1:
        name += f"_{r.ep_rank:03d}"
    return name


def iter_dir(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def rank_files(sizes: ParallelSizes) -> list[RankFile]:
    """Every (tp, pp, ep) rank file, pipeline stage major, then EP, then TP."""
    return [RankFile(t, p, e) for p in range(sizes.pp) for e in range(sizes.ep) for t in range(sizes.tp)]


def etp1_rank_files(sizes: ParallelSizes) -> list[RankFile]:
    """With expert tensor parallel size 1, the (tp, ep) pairs Megatron instantiates (and writes): (t, t mod EP)
    when EP divides TP, (e mod TP, e) when TP divides EP (spec §4.7)."""
    if sizes.tp % sizes.ep == 0:
        pairs = [(t, t % sizes.ep) for t in range(sizes.tp)]
    elif sizes.ep % sizes.tp == 0:
        pairs = [(e % sizes.tp, e) for e in range(sizes.ep)]
    else:
        raise ValidationError(f"--expert-tensor-parallel-size 1 needs TP ({sizes.tp}) and EP ({sizes.ep}) to divide "
                              f"one another.")
    return sorted((RankFile(t, p, e) for p in range(sizes.pp) for t, e in pairs),
                  key=lambda r: (r.pp_rank, r.ep_rank, r.tp_rank))


def expert_range(ep_rank: int, ep: int, num_experts: int) -> range:
    """Global experts held by EP rank ``ep_rank``: a contiguous block of E/EP (spec §3.6)."""
    if num_experts % ep:
        raise ValidationError(f"--target-expert-parallel-size {ep} does not divide the {num_experts} experts.")
    n = num_experts // ep
    return range(ep_rank * n, (ep_rank + 1) * n)
