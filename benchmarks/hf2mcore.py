"""hf2mcore on a real-shaped DeepSeek-V3 slice: wall time, GB/s and peak RSS, next to the raw copy of the
same bytes measured in the same run.

    python -m benchmarks.hf2mcore --size 2GB [--fp8/--bf16] [--tp 2 --pp 1 --ep 2] [--workers 2]

Writes ``bench-out/hf2mcore-<size>-<fmt>.json``.  Not part of CI (too slow); tests/unit has a smoke run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from streamconv import synth
from streamconv.cli.common import parse_size

from .common import dir_bytes, drop_caches, raw_copy_script, run_measured, save_json
from .harness import checkpoint


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=parse_size, default="2GB")
    ap.add_argument("--bf16", dest="fp8", action="store_false", help="bf16 source (default: FP8)")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--ep", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--max-memory", default="1GiB")
    ap.add_argument("--work-dir", default="bench-out")
    args = ap.parse_args(argv)

    fmt = "fp8" if args.fp8 else "bf16"
    hf = checkpoint(args.work_dir, args.size, args.fp8, smoke=False)
    out = os.path.join(args.work_dir, "mcore")
    shutil.rmtree(out, ignore_errors=True)
    inputs = sorted(os.path.join(hf, f) for f in os.listdir(hf) if f.endswith(".safetensors"))
    in_bytes = sum(os.path.getsize(p) for p in inputs)

    # Plan first (headers only) to learn the output size, then time the baseline and the run back to back.
    plan_path = os.path.join(args.work_dir, "plan.json")
    plan_cmd = [sys.executable, "-m", "streamconv", "plan", "hf2mcore", "--load-dir", hf, "--save-dir", out,
                "--target-tensor-parallel-size", str(args.tp), "--target-pipeline-parallel-size", str(args.pp),
                "--target-expert-parallel-size", str(args.ep), "--moe-grouped-gemm", "--mtp-num-layers",
                str(min(1, synth.synth_for_size(args.size, fp8=args.fp8).num_nextn_predict_layers)),
                "--output", plan_path]
    planned = run_measured(plan_cmd)
    from streamconv.plan.plan import Plan

    out_bytes = Plan.load(plan_path).nbytes

    cold = drop_caches()
    raw = run_measured(raw_copy_script(inputs, os.path.join(args.work_dir, "raw.bin"), out_bytes))
    drop_caches()
    conv = run_measured([sys.executable, "-m", "streamconv", "run", plan_path, "--no-progress",
                         "--workers", str(args.workers), "--max-memory", args.max_memory])
    written = dir_bytes(out)
    result = {
        "scenario": f"hf2mcore {fmt} TP{args.tp} PP{args.pp} EP{args.ep} grouped-gemm",
        "input_bytes": in_bytes, "output_bytes": written, "cold_cache": cold,
        "plan": {"seconds": planned["seconds"], "peak_rss_bytes": planned["peak_rss_bytes"]},
        "raw_copy": {"seconds": raw["seconds"], "peak_rss_bytes": raw["peak_rss_bytes"]},
        "streamconv": {"seconds": conv["seconds"], "peak_rss_bytes": conv["peak_rss_bytes"],
                       "output_GBps": written / 1e9 / conv["seconds"]},
        "ratio_vs_raw_copy": conv["seconds"] / raw["seconds"],
    }
    save_json(os.path.join(args.work_dir, f"hf2mcore-{args.size // 10**6}MB-{fmt}.json"), result)
    gb = 1e9
    print(f"{result['scenario']}: in {in_bytes / gb:.2f} GB, out {written / gb:.2f} GB")
    print(f"  raw copy    {raw['seconds']:7.1f} s   peak RSS {raw['peak_rss_bytes'] / 2**20:7.0f} MiB")
    print(f"  streamconv  {conv['seconds']:7.1f} s   peak RSS {conv['peak_rss_bytes'] / 2**20:7.0f} MiB   "
          f"{result['streamconv']['output_GBps']:.2f} GB/s written   {result['ratio_vs_raw_copy']:.2f}x raw copy")
    print(f"  planning    {planned['seconds']:7.1f} s   peak RSS {planned['peak_rss_bytes'] / 2**20:7.0f} MiB")
    shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
