"""The benchmark harness: real-shaped DeepSeek-V3 slices, every scenario next to a baseline from the same run.

    python -m benchmarks                       # 4 GB and 8 GB slices, all scenarios (about 15-25 min here)
    python -m benchmarks --sizes 2GB --scenarios fp8,bf16
    python -m benchmarks --smoke               # tiny, seconds: what CI runs

For each scenario: the page cache is dropped (when root), the raw copy of the same bytes is timed (read the
input files, write as many bytes as the conversion writes, fsync), then streamconv runs the saved plan as a
child process under ``/usr/bin/time -v`` (wall time, peak RSS as the OS reports it, disk bytes read).
Results: ``<work-dir>/results.json`` and PNG plots; ``docs/performance.md`` quotes them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time

from streamconv import synth
from streamconv.cli.common import parse_size
from streamconv.plan.plan import Plan

from .common import dir_bytes, drop_caches, raw_copy_script, run_measured, save_json

GB = 1e9


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    fp8: bool
    tp: int = 2
    pp: int = 1
    ep: int = 2
    workers: int = 2
    naive: bool = False     # the whole-model-in-RAM baseline instead of streamconv
    sizes: str = "all"      # "all" sizes, or "first" (the smallest) for the pairwise comparisons


SCENARIOS = [
    Scenario("bf16", fp8=False),
    Scenario("fp8", fp8=True),
    Scenario("fp8-tp1", fp8=True, tp=1, ep=1, sizes="first"),
    Scenario("fp8-tp4", fp8=True, tp=4, ep=1, sizes="first"),
    Scenario("fp8-1worker", fp8=True, workers=1, sizes="first"),
    Scenario("fp8-naive", fp8=True, naive=True, sizes="naive"),
]


def checkpoint(work: str, size: int, fp8: bool, smoke: bool) -> str:
    """Generate (or reuse) the source checkpoint of a size and format."""
    if smoke:
        cfg = dataclasses.replace(synth.TINY, fp8=fp8, max_shard_bytes=1 << 20)
        tag = "smoke"
    else:
        cfg = synth.synth_for_size(size, fp8=fp8)
        tag = f"{size // 10**6}MB"
    out = os.path.join(work, f"hf-{'fp8' if fp8 else 'bf16'}-{tag}")
    stamp = os.path.join(out, "synth.json")
    want = repr(cfg)
    if not (os.path.exists(stamp) and open(stamp).read() == want):
        shutil.rmtree(out, ignore_errors=True)
        synth.synth_checkpoint(out, cfg)
        with open(stamp, "w") as f:
            f.write(want)
    return out


def converted_once(hf: str, out: str, flags: list[str]) -> str:
    """``out``: ``hf`` converted by ``streamconv convert hf2mcore`` with ``flags``, kept while its tracker is
    there (the source of the mcore -> X benchmarks)."""
    if not os.path.exists(os.path.join(out, "latest_checkpointed_iteration.txt")):
        shutil.rmtree(out, ignore_errors=True)
        run_measured([sys.executable, "-m", "streamconv", "convert", "hf2mcore", "--load-dir", hf, "--save-dir", out,
                      *flags, "--no-progress"])
    return out


def run_scenario(sc: Scenario, hf: str, work: str, max_memory: str) -> dict:
    out = os.path.join(work, "mcore")
    shutil.rmtree(out, ignore_errors=True)
    plan_path = os.path.join(work, "plan.json")
    with open(os.path.join(hf, "config.json")) as f:
        mtp = min(1, json.load(f).get("num_nextn_predict_layers", 0))
    planned = run_measured([sys.executable, "-m", "streamconv", "plan", "hf2mcore", "--load-dir", hf,
                            "--save-dir", out, "--target-tensor-parallel-size", str(sc.tp),
                            "--target-pipeline-parallel-size", str(sc.pp), "--target-expert-parallel-size",
                            str(sc.ep), "--moe-grouped-gemm", "--mtp-num-layers", str(mtp), "-o", plan_path])
    out_bytes = Plan.load(plan_path).nbytes
    inputs = sorted(os.path.join(hf, f) for f in os.listdir(hf) if f.endswith(".safetensors"))
    in_bytes = sum(os.path.getsize(p) for p in inputs)

    cold = drop_caches()
    raw = run_measured(raw_copy_script(inputs, os.path.join(work, "raw.bin"), out_bytes))
    drop_caches()
    if sc.naive:
        conv = run_measured([sys.executable, "-m", "benchmarks.naive", plan_path])
    else:
        conv = run_measured([sys.executable, "-m", "streamconv", "run", plan_path, "--no-progress",
                             "--workers", str(sc.workers), "--max-memory", max_memory])
    written = dir_bytes(out)
    shutil.rmtree(out, ignore_errors=True)
    strip = ("stdout",)
    return {
        "scenario": sc.name, "config": dataclasses.asdict(sc), "cold_cache": cold,
        "input_bytes": in_bytes, "output_bytes": written,
        "raw_copy": {k: v for k, v in raw.items() if k not in strip},
        "convert": {k: v for k, v in conv.items() if k not in strip},
        "plan": {k: v for k, v in planned.items() if k not in strip},
        "ratio_vs_raw_copy": conv["seconds"] / raw["seconds"],
        "read_amplification": (conv["disk_read_bytes"] / in_bytes) if cold and conv["disk_read_bytes"] else None,
    }


def plot(results: list[dict], path_prefix: str) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    files = []
    labels = [f"{r['scenario']}\n{r['input_bytes'] / GB:.1f} GB" for r in results]
    conv = [r["output_bytes"] / GB / r["convert"]["seconds"] for r in results]
    raw = [r["output_bytes"] / GB / r["raw_copy"]["seconds"] for r in results]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(results)), 4))
    xs = range(len(results))
    ax.bar([x - 0.2 for x in xs], raw, 0.4, label="raw copy of the same bytes")
    ax.bar([x + 0.2 for x in xs], conv, 0.4, label="conversion")
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_ylabel("GB written per second")
    ax.set_title("hf2mcore throughput vs raw copy (same run)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    files.append(path_prefix + "throughput.png")
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in sorted({r["scenario"] for r in results}):
        pts = sorted((r["input_bytes"] / GB, r["convert"]["peak_rss_bytes"] / 2**30) for r in results
                     if r["scenario"] == name and r["convert"]["peak_rss_bytes"])
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xlabel("checkpoint size (GB)")
    ax.set_ylabel("peak RSS (GiB)")
    ax.set_title("peak resident memory vs checkpoint size")
    ax.legend(fontsize=8)
    fig.tight_layout()
    files.append(path_prefix + "peak_rss.png")
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)
    return files


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="4GB,8GB", help="source checkpoint sizes (comma-separated)")
    ap.add_argument("--naive-size", default="2GB", help="size for the whole-model-in-RAM baseline (it needs "
                                                       "several times this in RAM)")
    ap.add_argument("--scenarios", default="all", help=f"comma-separated subset of {[s.name for s in SCENARIOS]}")
    ap.add_argument("--max-memory", default="1GiB")
    ap.add_argument("--work-dir", default="bench-out")
    ap.add_argument("--smoke", action="store_true", help="tiny checkpoints: checks the harness, not the speed")
    args = ap.parse_args(argv)

    sizes = sorted(parse_size(s) for s in args.sizes.split(","))
    chosen = [s for s in SCENARIOS if args.scenarios == "all" or s.name in args.scenarios.split(",")]
    os.makedirs(args.work_dir, exist_ok=True)
    results = []
    started = time.time()
    for sc in chosen:
        these = {"all": sizes, "first": sizes[:1], "naive": [parse_size(args.naive_size)]}[sc.sizes]
        for size in these[:1] if args.smoke else these:
            hf = checkpoint(args.work_dir, size, sc.fp8, args.smoke)
            r = run_scenario(sc, hf, args.work_dir, args.max_memory)
            results.append(r)
            rss = r["convert"]["peak_rss_bytes"]
            print(f"{sc.name:12s} in {r['input_bytes'] / GB:6.2f} GB  out {r['output_bytes'] / GB:6.2f} GB  "
                  f"raw {r['raw_copy']['seconds']:6.1f} s  convert {r['convert']['seconds']:6.1f} s  "
                  f"ratio {r['ratio_vs_raw_copy']:5.2f}  peak RSS {rss / 2**20 if rss else float('nan'):6.0f} MiB"
                  + (f"  read x{r['read_amplification']:.2f}" if r["read_amplification"] else ""), flush=True)
    summary = {"started": started, "seconds": time.time() - started, "sizes": sizes, "results": results}
    save_json(os.path.join(args.work_dir, "results.json"), summary)
    for f in plot(results, os.path.join(args.work_dir, "")):
        print("plot:", f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
