"""LoRA on a real-shaped DeepSeek-V3 slice: mcore -> HF with the adapter merged (r = 16 on every target), and
the adapter exported alone, each next to the raw copy of the same bytes measured in the same run.

    python -m benchmarks.lora --size 4.2GB [--tp 2 --ep 2] [--rank 16] [--workers 2] [--max-memory 1GiB]

The base is made by streamconv hf2mcore from a generated bf16 checkpoint (grouped GEMM, MTP); the LoRA-only
checkpoint (what training saves with ``--lora-ckpt-filter``) is written here with torch.save, factors for
every 2-D weight of the targets (linear_qkv, linear_q_up_proj, linear_kv_up_proj, linear_proj, linear_fc1,
linear_fc2 including shared and grouped-GEMM experts, eh_proj), seeded by key so TP/EP replicas agree.

Runs, each after dropping the page cache:
* ``merge``: ``convert mcore2hf --lora-load`` against the raw copy of the base and LoRA files and of the output;
* ``plain``: the same conversion without LoRA (the cost of the merge itself);
* ``export``: ``--save-lora-to-hf`` against the raw copy of the adapter's own bytes (in and out).
Writes ``bench-out/lora-<size>.json``.  Not part of CI; a smoke test runs it on the tiny preset.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import zlib

import torch

from streamconv.cli.common import parse_size
from streamconv.plan.plan import Plan
from streamconv.storage.megatron_pt import MEGATRON_PT

from .common import dir_bytes, drop_caches, files_under, raw_copy_script, run_measured, save_json
from .harness import checkpoint, converted_once

GB = 1e9
TARGETS = ("linear_qkv", "linear_q_up_proj", "linear_kv_up_proj", "linear_proj", "linear_fc1", "linear_fc2",
           "eh_proj")


def _factors(name: str, shape: tuple[int, int], r: int, experts: int) -> dict[str, torch.Tensor]:
    """Factor entries of one base weight (a linear's lora_A/B, or a GEMM stack's weightN_lora_a/b)."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{name}{shape}".encode()))

    def rand(*s):
        return (torch.randn(*s, generator=g) * 0.01).to(torch.bfloat16)

    rows, cols = shape
    if name.endswith("experts.weight1"):
        return {name + "_lora_a": rand(rows, r * experts), name + "_lora_b": rand(r, cols)}
    if name.endswith("experts.weight2"):
        return {name + "_lora_a": rand(rows, r), name + "_lora_b": rand(r * experts, cols)}
    module = name[: -len(".weight")]
    return {module + ".lora_A.default.weight": rand(r, cols), module + ".lora_B.default.weight": rand(rows, r)}


def write_lora(base: str, out: str, r: int, experts: int) -> None:
    """A LoRA-only checkpoint with the base's layout: every rank file's targeted weights get factors."""
    shutil.rmtree(out, ignore_errors=True)
    with open(os.path.join(base, "latest_checkpointed_iteration.txt")) as f:
        tracker = f.read()
    for d, _, files in os.walk(base):
        for fname in files:
            if not fname.endswith(".pt"):
                continue
            path = os.path.join(d, fname)
            obj: dict = {}
            for e in MEGATRON_PT.index(path).tensors:
                if len(e.shape) != 2:
                    continue
                module = e.name.removesuffix(".weight").rsplit(".", 1)[-1]
                module = {"weight1": "linear_fc1", "weight2": "linear_fc2"}.get(module, module)
                if module in TARGETS:
                    obj.setdefault(e.group, {}).update(_factors(e.name, tuple(e.shape), r, experts))
            target = os.path.join(out, os.path.relpath(path, base))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            torch.save({**obj, "checkpoint_version": 3.0, "iteration": 1}, target)
    with open(os.path.join(out, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(tracker)


def _measure(name: str, plan_cmd: list[str], inputs: list[str], out: str, args, results: dict) -> None:
    shutil.rmtree(out, ignore_errors=True)
    plan_path = os.path.join(args.work_dir, f"lora-{name}-plan.json")
    run_measured(plan_cmd + ["-o", plan_path])
    out_bytes = Plan.load(plan_path).nbytes
    in_bytes = sum(os.path.getsize(p) for p in inputs)
    cold = drop_caches()
    raw = run_measured(raw_copy_script(inputs, os.path.join(args.work_dir, "raw.bin"), out_bytes))
    drop_caches()
    conv = run_measured([sys.executable, "-m", "streamconv", "run", plan_path, "--no-progress", "--workers",
                         str(args.workers), "--max-memory", args.max_memory])
    r = {"input_bytes": in_bytes, "output_bytes": dir_bytes(out), "raw_copy_seconds": raw["seconds"],
         "seconds": conv["seconds"], "peak_rss_bytes": conv["peak_rss_bytes"], "cold_cache": cold,
         "ratio_vs_raw_copy": conv["seconds"] / raw["seconds"]}
    results["runs"][name] = r
    rss = r["peak_rss_bytes"]
    print(f"{name:8s} in {in_bytes / GB:6.2f} GB  out {r['output_bytes'] / GB:6.2f} GB  raw {raw['seconds']:6.1f} s  "
          f"convert {conv['seconds']:6.1f} s  ratio {r['ratio_vs_raw_copy']:5.2f}  "
          f"peak RSS {rss / 2**20 if rss else float('nan'):6.0f} MiB", flush=True)
    shutil.rmtree(out, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=parse_size, default="4.2GB")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--ep", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--max-memory", default="1GiB")
    ap.add_argument("--work-dir", default="bench-out")
    ap.add_argument("--smoke", action="store_true", help="the tiny preset: checks the harness, not the speed")
    args = ap.parse_args(argv)

    tag = "smoke" if args.smoke else f"{args.size // 10**6}MB"
    hf = checkpoint(args.work_dir, args.size, False, args.smoke)
    layout = ["--source-tensor-parallel-size", str(args.tp), "--source-expert-parallel-size", str(args.ep),
              "--moe-grouped-gemm", "--mtp-num-layers", "1"]
    base = converted_once(hf, os.path.join(args.work_dir, f"mcore-lora-base-{tag}"),
                          ["--target-tensor-parallel-size", str(args.tp), "--target-expert-parallel-size",
                           str(args.ep), "--moe-grouped-gemm", "--mtp-num-layers", "1"])
    import json

    with open(os.path.join(hf, "config.json")) as f:
        experts = json.load(f)["n_routed_experts"] // args.ep
    lora = os.path.join(args.work_dir, f"mcore-lora-r{args.rank}-{tag}")
    write_lora(base, lora, args.rank, experts)
    out = os.path.join(args.work_dir, "lora-out")
    lora_flags = ["--lora-r", str(args.rank), "--lora-alpha", str(2 * args.rank)]
    base_files, lora_files = files_under(base, ".pt"), files_under(lora, ".pt")
    results = {"size": args.size, "rank": args.rank, "layout": [args.tp, 1, args.ep],
               "base_bytes": sum(map(os.path.getsize, base_files)),
               "adapter_bytes": sum(map(os.path.getsize, lora_files)), "runs": {}}
    mcore2hf = [sys.executable, "-m", "streamconv", "plan", "mcore2hf", "--save-dir", out, *layout]
    _measure("merge", mcore2hf + ["--load-dir", base, "--lora-load", lora, *lora_flags, "--no-verify-replicas"],
             base_files + lora_files, out, args, results)
    _measure("plain", mcore2hf + ["--load-dir", base, "--no-verify-replicas"], base_files, out, args, results)
    _measure("export", mcore2hf + ["--load-dir", lora, "--hf-config", hf, "--save-lora-to-hf", *lora_flags],
             lora_files, out, args, results)
    save_json(os.path.join(args.work_dir, f"lora-{tag}.json"), results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
