"""What a training rank pays to get its graph for DeepSeek-V3 671B: one rank planned from the HF headers, one rank
cut out of a saved full plan, against the full plan (in-process planning, and ``Plan.load`` of its JSON).

    python -m benchmarks.loader_plan671b [--work-dir /tmp/streamconv-bench-plan671b]

Source: a headers-only 671B checkpoint (real headers, sparse files); layout: the conversion example of
plans/recipes.py (PP 8, VPP 2, noop 47,62,63, TP 2, EP 32; 512 rank files), the largest plan.  Each case runs
in its own child under ``/usr/bin/time -v``; the rank is the last one (tp 1, pp 7, ep 31: MTP and the output
layer).  Results: ``<work-dir>/loader_plan671b.json``; the work dir is deleted at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from streamconv import synth

from .common import run_measured, save_json

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MiB = 1 << 20

SETUP = r"""
import sys, time
from plans.recipes import RECIPES
from streamconv.layout.parallel import RankFile
sizes, options, _ = RECIPES["convert_example_vpp"]
hf, plan_path, case = sys.argv[1], sys.argv[2], sys.argv[3]
rank = RankFile(1, 7, 31)
layout = dict(target_tensor_parallel_size=sizes.tp, target_pipeline_parallel_size=sizes.pp,
              target_expert_parallel_size=sizes.ep, moe_grouped_gemm=True, mtp_num_layers=1, num_layers=64,
              noop_layers=(47, 62, 63), num_layers_per_virtual_pipeline_stage=2)
t0 = time.monotonic()
if case == "full plan, in-process":
    from streamconv.plan.planner import plan_hf_to_mcore
    plan = plan_hf_to_mcore(hf, "/nonexistent", sizes, options)
    n = sum(len(f.tensors) for f in plan.files)
elif case == "full plan, save":
    from streamconv.plan.planner import plan_hf_to_mcore
    plan = plan_hf_to_mcore(hf, "/nonexistent", sizes, options)
    plan.save(plan_path)
    n = sum(len(f.tensors) for f in plan.files)
elif case == "Plan.load of the full plan":
    from streamconv.plan.plan import Plan
    plan = Plan.load(plan_path)
    n = sum(len(f.tensors) for f in plan.files)
elif case == "open_rank(HF dir): this rank planned":
    from streamconv.loader import open_rank
    n = len(open_rank(hf, tp_rank=rank.tp_rank, pp_rank=rank.pp_rank, ep_rank=rank.ep_rank, **layout).tensors)
else:
    from streamconv.loader import open_rank
    n = len(open_rank(plan_path, tp_rank=rank.tp_rank, pp_rank=rank.pp_rank, ep_rank=rank.ep_rank).tensors)
print(f"{time.monotonic() - t0:.3f} {n}")
"""

CASES = ["full plan, in-process", "open_rank(HF dir): this rank planned", "Plan.load of the full plan",
         "open_rank(plan JSON): this rank cut out"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work-dir", default="/tmp/streamconv-bench-plan671b")
    args = ap.parse_args(argv)
    hf = os.path.join(args.work_dir, "hf-671b-headers")
    plan_path = os.path.join(args.work_dir, "plan.json")
    shutil.rmtree(args.work_dir, ignore_errors=True)
    synth.synth_checkpoint(hf, synth.DEEPSEEK_V3_671B, headers_only=True)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {"PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    results = {"layout": "convert_example_vpp", "rank": [1, 7, 31]}
    try:
        run_measured([sys.executable, "-c", SETUP, hf, plan_path, "full plan, save"], env=env)
        results["plan_json_bytes"] = os.path.getsize(plan_path)
        for case in CASES:
            r = run_measured([sys.executable, "-c", SETUP, hf, plan_path, case], env=env)
            seconds, tensors = r.pop("stdout").split()[-2:]
            results[case] = {"process_seconds": r["seconds"], "work_seconds": float(seconds),
                             "peak_rss_bytes": r["peak_rss_bytes"], "tensors": int(tensors)}
            print(f"{case:42s} {float(seconds):6.2f} s (process {r['seconds']:5.1f} s)  peak RSS "
                  f"{r['peak_rss_bytes'] / MiB:6.0f} MiB  tensors {tensors}", flush=True)
    finally:
        save_json(os.path.join(os.path.dirname(args.work_dir) or ".", "loader_plan671b.json"), results)
        shutil.rmtree(args.work_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
