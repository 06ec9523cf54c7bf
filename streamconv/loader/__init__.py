"""Training-time loading: any rank straight from the plan's graphs, without a converted checkpoint on disk.

    from streamconv.loader import open_rank
    rank = open_rank("plan.json", tp_rank=1, pp_rank=3, ep_rank=5)          # a saved plan
    rank = open_rank("./hf-checkpoint", tp_rank=1, pp_rank=3, ep_rank=5,    # or the HF checkpoint itself,
                     target_tensor_parallel_size=2, target_pipeline_parallel_size=8,   # with the CLI's flags
                     target_expert_parallel_size=32, moe_grouped_gemm=True, mtp_num_layers=1)
    rank.keys(), rank.tensors                  # names, shapes, dtypes: nothing read yet
    rank.check_against(model)                  # every missing / unexpected / mis-shaped key, before any read
    rank.load_into(model)                      # band by band into the model's own parameters
    sd = rank.state_dict(device="cuda")        # or the object the converter would write into that rank's file

The rank's graphs run in this process with the converter's kernels: reads of exactly the bytes the rank
needs, FP8 dequantized on the host or on the device (``dequant_on="device"``).  Nothing is written, and no
rank waits for another.  Megatron / MindSpeed integration: :mod:`streamconv.loader.megatron`.
"""

from __future__ import annotations

import os

import torch

from ..errors import ValidationError
from ..layout.parallel import RankFile
from ..plan.plan import Plan
from .rank import LoadOptions, MismatchError, RankSource, TensorSpec
from .source import (LAYOUT_KEYWORDS, check_sources, file_of_path, is_hf_dir, is_mcore_dir, plan_rank_from_hf,
                     plan_rank_from_mcore, rank_of_plan, read_rank_plan, restrict_sources)

__all__ = ["open_rank", "RankSource", "TensorSpec", "LoadOptions", "MismatchError", "load_rank", "rank_paths",
           "LAYOUT_KEYWORDS"]


def open_rank(source, *, tp_rank: int = 0, pp_rank: int = 0, ep_rank: int = 0, source_root: str | None = None,
              **layout) -> RankSource:
    """The rank ``(tp_rank, pp_rank, ep_rank)`` of ``source``, checked and ready to load; nothing read yet.

    Args:
        source: a saved plan's path (hf2mcore or mcore2mcore), a :class:`~streamconv.plan.Plan`, an HF checkpoint
            directory (or a zarr store of one), or an mcore checkpoint streamconv wrote (its record gives the
            source layout; the keywords give the target: the rank is resharded on load).
        tp_rank, pp_rank, ep_rank: the rank, as Megatron numbers them.
        source_root: where the plan's source files are now, when they moved since it was made.
        **layout: keywords named after the CLI flags (``target_tensor_parallel_size=2``,
            ``moe_grouped_gemm=True``, ``num_layers_per_virtual_pipeline_stage=2``,
            ``schedules_method="dualpipev"``, ``expert_tensor_parallel_size=1``, ``model_type_hf=...``; see
            ``LAYOUT_KEYWORDS``).  With an HF directory they are the layout to plan (this rank only, from
            headers); with a plan, each one given must agree with what the plan was made for.

    Every problem is one error before any tensor data is read: a rank index outside the layout, a rank file
    the layout does not have, layout keywords contradicting a plan, a source changed since the plan (sizes and
    header digests of the files this rank reads), a flag the model does not fit (HF directory).
    """
    r = RankFile(tp_rank, pp_rank, ep_rank)
    if isinstance(source, Plan):
        plan, f = rank_of_plan(source, r, layout)
    elif is_mcore_dir(source):
        plan, f = plan_rank_from_mcore(os.fspath(source), r, layout)
    elif is_hf_dir(source):
        plan, f = plan_rank_from_hf(os.fspath(source), r, layout)
    elif isinstance(source, (str, os.PathLike)):
        plan, f = read_rank_plan(os.fspath(source), r, layout)
    else:
        raise ValidationError(f"open_rank: source must be a plan path, a Plan, or an HF or mcore checkpoint directory, "
                              f"got {type(source).__name__}.")
    plan = restrict_sources(plan, f, source_root)
    check_sources(plan)
    return RankSource(plan, f, (tp_rank, pp_rank, ep_rank))


def rank_paths(plan: Plan) -> list[str]:
    """The output files of a plan that hold tensors (one per rank)."""
    return [f.path for f in plan.files if f.tensors]


def load_rank(plan: Plan, path: str, *, device: str | torch.device = "cpu") -> dict:
    """The object the plan would write at ``path`` (``{"model": OrderedDict, "checkpoint_version": 3.0, ...}``),
    with tensors on ``device``: :meth:`RankSource.state_dict` of the rank file named by its path."""
    f = file_of_path(plan, path)
    one = restrict_sources(plan, f)
    check_sources(one)
    return RankSource(one, f).state_dict(device)
