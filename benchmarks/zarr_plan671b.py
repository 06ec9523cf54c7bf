"""What a DeepSeek-V3 671B zarr store is made of: arrays, files, write tasks, inner chunks, index bytes.

    python -m benchmarks.zarr_plan671b [--work-dir bench-out]

The source is a headers-only 671B FP8 checkpoint (real headers, sparse files); ``hf2zarr`` is planned from it
twice, with the routed experts stacked (the default: one array per layer, projection and scale) and with one
array per HF tensor (``--no-stack-experts``), each in a child process under ``/usr/bin/time -v``; the plans
are then counted.  Nothing is written but the plans.  Target (zarr issue): a store of thousands of files.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

from streamconv import synth

from .common import run_measured, save_json

COUNT = r"""
import json, math, sys
from streamconv.plan.plan import Plan
plan = Plan.load(sys.argv[1])
shards = [f for f in plan.files if f.format == "zarr"]
docs = [f for f in plan.files if f.path.endswith("zarr.json")]
arrays = [f for f in docs if "/" in f.path and not f.path.startswith("hf/")]
chunks = sum(t.node.shape[0] for f in shards for t in f.tensors)
data = sum(math.prod(t.node.shape) * {"float8_e4m3fn": 1, "bfloat16": 2, "float32": 4}[t.node.dtype]
           for f in shards for t in f.tensors)
print(json.dumps({"arrays": len(arrays), "shard_files": len(shards), "json_files": len(docs),
                  "files": len(plan.files), "write_tasks": sum(len(f.tensors) for f in shards),
                  "inner_chunks": chunks, "index_bytes": 16 * chunks + 4 * len(shards), "data_bytes": data}))
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work-dir", default="bench-out")
    args = ap.parse_args(argv)
    os.makedirs(args.work_dir, exist_ok=True)
    hf = os.path.join(args.work_dir, "hf-671b-headers")
    shutil.rmtree(hf, ignore_errors=True)
    synth.synth_checkpoint(hf, synth.DEEPSEEK_V3_671B, headers_only=True)
    results = {}
    for name, flags in (("stacked experts", []), ("one array per tensor", ["--no-stack-experts"])):
        plan_path = os.path.join(args.work_dir, "plan-671b-zarr.json")
        r = run_measured([sys.executable, "-m", "streamconv", "plan", "hf2zarr", "--load-dir", hf,
                          "--save-dir", os.path.join(args.work_dir, "unused-store"), *flags, "--output", plan_path])
        counted = run_measured([sys.executable, "-c", COUNT, plan_path])
        stats = json.loads(counted["stdout"].strip().splitlines()[-1])
        stats.update(plan_seconds=r["seconds"], plan_peak_rss_bytes=r["peak_rss_bytes"],
                     plan_json_bytes=os.path.getsize(plan_path))
        os.remove(plan_path)
        results[name] = stats
        print(f"{name:22s} {stats['arrays']:7d} arrays {stats['files']:7d} files ({stats['shard_files']} shards) "
              f"{stats['write_tasks']:7d} write tasks {stats['inner_chunks'] / 1e6:5.1f} M chunks "
              f"index {stats['index_bytes'] / 1e6:6.1f} MB ({stats['index_bytes'] / stats['data_bytes']:.3%}) "
              f"data {stats['data_bytes'] / 1e9:6.1f} GB  planned in {r['seconds']:5.1f} s, "
              f"{r['peak_rss_bytes'] / 2**20:5.0f} MiB", flush=True)
    save_json(os.path.join(args.work_dir, "zarr_plan671b.json"), results)
    shutil.rmtree(hf, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
