"""mcore -> HF on a real-shaped DeepSeek-V3 slice: streamconv (with and without replica checks) and the
whole-stage baseline of spec §7.4, each next to the raw copy of the same bytes measured in the same run.

    python -m benchmarks.mcore2hf --size 2GB [--tp 2 --pp 2 --ep 2] [--workers 2] [--no-naive]

The mcore source is made first by streamconv hf2mcore from a generated bf16 checkpoint.  Writes
``bench-out/mcore2hf-<size>.json``.  Not part of CI (too slow); a smoke test runs it on the tiny preset.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from streamconv.cli.common import parse_size
from streamconv.plan.plan import Plan

from .common import dir_bytes, drop_caches, files_under, raw_copy_script, run_measured, save_json
from .harness import checkpoint, converted_once

GB = 1e9


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=parse_size, default="2GB")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--ep", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--max-memory", default="1GiB")
    ap.add_argument("--work-dir", default="bench-out")
    ap.add_argument("--no-naive", dest="naive", action="store_false", help="skip the whole-stage baseline")
    ap.add_argument("--smoke", action="store_true", help="the tiny preset: checks the harness, not the speed")
    args = ap.parse_args(argv)

    tag = "smoke" if args.smoke else f"{args.size // 10**6}MB"
    hf = checkpoint(args.work_dir, args.size, False, args.smoke)
    layout = ["--moe-grouped-gemm", "--mtp-num-layers", "1"]
    mcore = converted_once(hf, os.path.join(args.work_dir, f"mcore-{tag}"),
                           ["--target-tensor-parallel-size", str(args.tp), "--target-pipeline-parallel-size",
                            str(args.pp), "--target-expert-parallel-size", str(args.ep), *layout])
    inputs = files_under(mcore, ".pt")
    in_bytes = sum(os.path.getsize(p) for p in inputs)
    out = os.path.join(args.work_dir, "hf-out")
    results = {"size": args.size, "input_bytes": in_bytes, "layout": [args.tp, args.pp, args.ep], "runs": {}}
    variants = [("streamconv", ["--no-verify-replicas"]), ("streamconv+verify", ["--verify-replicas"])]
    if args.naive:
        variants.append(("naive", None))
    for name, flags in variants:
        shutil.rmtree(out, ignore_errors=True)
        plan_path = os.path.join(args.work_dir, "mcore2hf-plan.json")
        run_measured([sys.executable, "-m", "streamconv", "plan", "mcore2hf", "--load-dir", mcore, "--save-dir", out,
                      *(flags or ["--no-verify-replicas"]), "-o", plan_path])
        out_bytes = Plan.load(plan_path).nbytes
        cold = drop_caches()
        raw = run_measured(raw_copy_script(inputs, os.path.join(args.work_dir, "raw.bin"), out_bytes))
        drop_caches()
        if flags is None:
            conv = run_measured([sys.executable, "-m", "benchmarks.naive_mcore2hf", plan_path])
        else:
            conv = run_measured([sys.executable, "-m", "streamconv", "run", plan_path, "--no-progress",
                                 "--workers", str(args.workers), "--max-memory", args.max_memory])
        written = dir_bytes(out)
        r = {"raw_copy_seconds": raw["seconds"], "seconds": conv["seconds"], "peak_rss_bytes": conv["peak_rss_bytes"],
             "disk_read_bytes": conv["disk_read_bytes"], "cold_cache": cold, "output_bytes": written,
             "ratio_vs_raw_copy": conv["seconds"] / raw["seconds"]}
        results["runs"][name] = r
        rss = r["peak_rss_bytes"]
        print(f"{name:18s} in {in_bytes / GB:6.2f} GB  out {written / GB:6.2f} GB  raw {raw['seconds']:6.1f} s  "
              f"convert {conv['seconds']:6.1f} s  ratio {r['ratio_vs_raw_copy']:5.2f}  "
              f"peak RSS {rss / 2**20 if rss else float('nan'):6.0f} MiB", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    save_json(os.path.join(args.work_dir, f"mcore2hf-{tag}.json"), results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
