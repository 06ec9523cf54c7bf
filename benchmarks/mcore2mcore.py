"""mcore -> mcore on a real-shaped DeepSeek-V3 slice: one pass, next to the raw copy of the same bytes and to
today's two passes (mcore -> HF -> mcore), all in the same run.

    python -m benchmarks.mcore2mcore --size 4GB [--workers 2]

The source (TP 2, PP 2, EP 2, grouped GEMM, MTP) is made first by hf2mcore from a generated bf16 checkpoint; the
target is TP 4, PP 1, EP 2 with local experts (every tensor re-cut, every expert re-stacked).  Each timed child
runs after the page cache is dropped (when root), under ``/usr/bin/time -v``.  Writes
``<work-dir>/mcore2mcore-<size>.json``.  Not part of CI; the smoke test runs it on the tiny preset.
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
SOURCE = ["--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2",
          "--target-expert-parallel-size", "2", "--moe-grouped-gemm", "--mtp-num-layers", "1"]
TARGET = ["--target-tensor-parallel-size", "4", "--target-pipeline-parallel-size", "1",
          "--target-expert-parallel-size", "2", "--mtp-num-layers", "1"]


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=parse_size, default="4GB")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--max-memory", default="1GiB")
    ap.add_argument("--work-dir", default="bench-out")
    ap.add_argument("--smoke", action="store_true", help="the tiny preset: checks the harness, not the speed")
    args = ap.parse_args(argv)

    tag = "smoke" if args.smoke else f"{args.size // 10**6}MB"
    hf = checkpoint(args.work_dir, args.size, False, args.smoke)
    sc = [sys.executable, "-m", "streamconv"]
    source = converted_once(hf, os.path.join(args.work_dir, f"mcore-src-{tag}"), SOURCE)
    inputs = files_under(source, ".pt")
    in_bytes = sum(os.path.getsize(p) for p in inputs)
    out, mid, out2 = (os.path.join(args.work_dir, n) for n in ("mcore-out", "hf-mid", "mcore-out2"))
    run = ["--no-progress", "--workers", str(args.workers), "--max-memory", args.max_memory]
    results = {"size": args.size, "input_bytes": in_bytes, "runs": {}}

    plan_path = os.path.join(args.work_dir, "mcore2mcore-plan.json")
    run_measured(sc + ["plan", "mcore2mcore", "--load-dir", source, "--save-dir", out, "--no-verify-replicas",
                       "-o", plan_path] + TARGET)
    out_bytes = Plan.load(plan_path).nbytes
    drop_caches()
    raw = run_measured(raw_copy_script(inputs, os.path.join(args.work_dir, "raw.bin"), out_bytes))
    results["raw_copy_seconds"] = raw["seconds"]
    for name, flags in (("mcore2mcore", ["--no-verify-replicas"]), ("mcore2mcore+verify", ["--verify-replicas"])):
        shutil.rmtree(out, ignore_errors=True)
        run_measured(sc + ["plan", "mcore2mcore", "--load-dir", source, "--save-dir", out, "-o", plan_path]
                     + flags + TARGET)
        drop_caches()
        r = run_measured(sc + ["run", plan_path] + run)
        results["runs"][name] = {k: v for k, v in r.items() if k != "stdout"}
        results["runs"][name]["output_bytes"] = dir_bytes(out)

    # today's path: two passes and an HF checkpoint in between
    shutil.rmtree(mid, ignore_errors=True)
    shutil.rmtree(out2, ignore_errors=True)
    drop_caches()
    a = run_measured(sc + ["convert", "mcore2hf", "--load-dir", source, "--save-dir", mid, "--no-verify-replicas"]
                     + run)
    drop_caches()
    b = run_measured(sc + ["convert", "hf2mcore", "--load-dir", mid, "--save-dir", out2] + TARGET + run)
    results["runs"]["mcore2hf+hf2mcore"] = {"seconds": a["seconds"] + b["seconds"],
                                            "peak_rss_bytes": max(a["peak_rss_bytes"] or 0, b["peak_rss_bytes"] or 0),
                                            "intermediate_bytes": dir_bytes(mid), "output_bytes": dir_bytes(out2)}
    same = all(_read(os.path.join(d, f)) == _read(os.path.join(out2, os.path.relpath(d, out), f))
               for d, _, fs in os.walk(out) for f in fs if not f.startswith(".streamconv"))
    results["byte_identical_to_two_passes"] = same
    for name, r in results["runs"].items():
        r["ratio_vs_raw_copy"] = r["seconds"] / raw["seconds"]
        rss = r["peak_rss_bytes"]
        print(f"{name:20s} {r['seconds']:7.1f} s  vs raw copy {r['ratio_vs_raw_copy']:5.2f}  "
              f"peak RSS {rss / 2**20 if rss else float('nan'):6.0f} MiB", flush=True)
    print(f"raw copy {raw['seconds']:.1f} s; input {in_bytes / GB:.2f} GB, output {out_bytes / GB:.2f} GB; "
          f"byte-identical to two passes: {same}", flush=True)
    for d in (out, mid, out2):
        shutil.rmtree(d, ignore_errors=True)
    save_json(os.path.join(args.work_dir, f"mcore2mcore-{tag}.json"), results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
