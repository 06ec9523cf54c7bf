"""The whole-stage mcore -> HF converter, as a baseline (spec §7.4): every rank file of a pipeline stage is
``torch.load``-ed whole and kept while the stage's HF tensors are built with plain torch ops, then each HF
file is written with ``safetensors.torch.save_file``.  Run as a child process:

    python -m benchmarks.naive_mcore2hf PLAN_JSON

It takes its tensor recipes from the plan (so it writes the same tensors as streamconv); a stage's files stay
in RAM until every output tensor that needs them is built, like the reference.
"""

from __future__ import annotations

import os
import re
import sys

import torch
from safetensors.torch import save_file

from streamconv.execute.kernels import KERNELS
from streamconv.graph.node import Op, toposort
from streamconv.plan.plan import Plan


def _stage(path: str) -> int:
    m = re.search(r"mp_rank_\d+_(\d{3})", path)
    return int(m.group(1)) if m else 0


def main(plan_path: str) -> int:
    plan = Plan.load(plan_path)
    loaded: dict[str, dict] = {}
    for f in plan.files:
        if not f.tensors:
            continue
        reads = {n.arg.file for t in f.tensors for n in toposort([t.node]) if n.op is Op.READ}
        for stage in sorted({_stage(p) for p in reads}):  # load whole stages, as the reference does
            for s in plan.source_files:
                if _stage(s.name) == stage and s.name not in loaded:
                    obj = torch.load(os.path.join(plan.source_root, s.name), map_location="cpu", weights_only=False)
                    loaded[s.name] = {f"{g}.{k}": v for g, d in obj.items() if isinstance(d, dict)
                                      for k, v in d.items()}
        tensors = {t.name: _evaluate(t.node, loaded).clone() for t in f.tensors}
        os.makedirs(plan.target_root, exist_ok=True)
        save_file(tensors, os.path.join(plan.target_root, f.path), metadata={"format": "pt"})
        needed = {n.arg.file for g in plan.files[plan.files.index(f) + 1:] for t in g.tensors
                  for n in toposort([t.node]) if n.op is Op.READ}
        for name in [n for n in loaded if n not in needed]:  # a finished stage is released
            del loaded[name]
    for f in plan.files:
        if f.format == "text":
            with open(os.path.join(plan.target_root, f.path), "w") as out:
                out.write(f.text or "")
    return 0


def _evaluate(node, loaded):
    values = {}
    for n in toposort([node]):
        if n.op is Op.READ:
            full = loaded[n.arg.file][n.arg.tensor]
            values[n.key] = full[n.arg.rows[0]:n.arg.rows[1]] if n.arg.shape else full
        else:
            values[n.key] = KERNELS[n.op](n.arg, *(values[s.key] for s in n.src))
    return values[node.key].contiguous()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
