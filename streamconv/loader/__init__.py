"""Training-time loading: one rank's tensors straight from a plan, without a converted checkpoint on disk.

    plan = Plan.load("plan.json")
    sd = load_rank(plan, "iter_0000001/mp_rank_01_000_001/model_optim_rng.pt", device="cuda")
    model.load_state_dict(sd["model"])

The rank's graphs run in this process (reads of exactly the bytes it needs, FP8 dequantized on the fly);
results are moved to ``device`` tensor by tensor, so host memory holds one tensor and its sources at a time.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from ..errors import PlanError
from ..execute.kernels import materialize
from ..graph.node import toposort
from ..plan.plan import Plan


def rank_paths(plan: Plan) -> list[str]:
    """The output files of a plan that hold tensors (one per rank)."""
    return [f.path for f in plan.files if f.tensors]


def load_rank(plan: Plan, path: str, *, device: str | torch.device = "cpu") -> dict:
    """The object the plan would write at ``path`` (``{"model": OrderedDict, "checkpoint_version": 3.0, ...}``),
    with tensors on ``device``."""
    matches = [f for f in plan.files if f.path == path]
    if not matches:
        raise PlanError(f"{path}: not an output of this plan; choose one of {rank_paths(plan)[:4]}...")
    f = matches[0]
    root = plan.source_root
    # A value computed for one tensor is kept only while a later tensor of this rank still needs it
    # (a replicated read feeding several keys); everything else is released as soon as it is consumed.
    last_use: dict[str, int] = {}
    for i, t in enumerate(f.tensors):
        for n in toposort([t.node]):
            last_use[n.key] = i
    groups: dict[str, OrderedDict] = {}
    cache: dict[str, torch.Tensor] = {}
    for i, t in enumerate(f.tensors):
        groups.setdefault(t.group, OrderedDict())[t.name] = materialize(t.node, root, device=device, cache=cache)
        for key in [k for k in cache if last_use.get(k, i) <= i]:
            del cache[key]
    out: dict = dict(groups)
    out.update(dict(f.attrs))
    return out
