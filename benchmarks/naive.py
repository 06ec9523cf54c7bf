"""The naive converter peers use, as a baseline: load every source shard whole, dequantize FP8 with plain torch
ops, build every rank's state dict in memory, ``torch.save`` each.  Run as a child process:

    python -m benchmarks.naive PLAN_JSON

It takes its tensor recipes from the plan (so it writes the same tensors as streamconv), but evaluates them
the way whole-model converters do: sources fully in RAM, rank dicts built with ``torch.cat``/slices and cloned,
saved with ``torch.save``.
"""

from __future__ import annotations

import os
import sys
from collections import OrderedDict

import torch
from safetensors.torch import load_file

from streamconv.execute.dequant import dequant_reference
from streamconv.execute.kernels import KERNELS
from streamconv.graph.node import Op, toposort
from streamconv.plan.plan import Plan


def main(plan_path: str) -> int:
    plan = Plan.load(plan_path)
    tensors: dict[str, torch.Tensor] = {}
    for s in plan.source_files:  # whole files, as load_file does
        tensors.update(load_file(os.path.join(plan.source_root, s.name)))
    for name in [n for n in tensors if n.endswith("_scale_inv")]:
        w = name[: -len("_scale_inv")]
        tensors[w] = dequant_reference(tensors[w], tensors[name], block=(128, 128))
    built: dict[str, dict] = {}
    for f in plan.files:  # every rank's dict in memory before saving, like a whole-stage converter
        if not f.tensors:
            continue
        groups: dict[str, OrderedDict] = {}
        for t in f.tensors:
            groups.setdefault(t.group, OrderedDict())[t.name] = _evaluate(t.node, tensors).clone()
        built[f.path] = {**groups, **dict(f.attrs)}
    for path, obj in built.items():
        target = os.path.join(plan.target_root, path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        torch.save(obj, target)
    with open(os.path.join(plan.target_root, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("1")
    return 0


def _evaluate(node, tensors):
    values = {}
    for n in toposort([node]):
        if n.op is Op.READ:
            full = tensors[n.arg.tensor]
            values[n.key] = full[n.arg.rows[0]:n.arg.rows[1]] if n.arg.shape else full
        elif n.op is Op.DEQUANT_FP8_BLOCK:
            values[n.key] = values[n.src[0].key]  # the weight was dequantized whole on load
        else:
            values[n.key] = KERNELS[n.op](n.arg, *(values[s.key] for s in n.src))
    return values[node.key].contiguous()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
