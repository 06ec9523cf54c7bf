"""Training-time loading of one rank, three ways, in one run: wall time, peak RSS, bytes read from disk.

    python -m benchmarks.loader [--size 4GB] [--work-dir /tmp/streamconv-bench-loader] [--keep]

Source: a DeepSeek-V3-shaped FP8 slice (``synth_for_size``: hidden 7168, every tensor of the 671B shape),
planned at TP 2, EP 2, grouped GEMM, MTP, and converted once so that the baseline has a file to read.
Then, each in its own child under ``/usr/bin/time -v`` after dropping the page cache (root):

1. ``torch.load``    the converted rank file (``weights_only=True``, ``map_location='cpu'``): the baseline;
2. ``plan``          ``open_rank(plan.json, ...).state_dict()``;
3. ``hf``            ``open_rank(HF dir, ..., layout flags).state_dict()`` (this rank planned in the child);
4. ``imports``       the loader's imports and nothing else (what the RSS above the rank's bytes is made of).

Every child checks the sha256 of its tensors against the baseline's.  Then 4 ranks (TP 2 x EP 2) load
concurrently straight from the HF dir after one cache drop; each reports its ``/proc/self/io`` read_bytes,
and their sum is compared with the union of the source byte ranges the 4 ranks' graphs read.
Results: ``<work-dir>/loader.json``.  Data under ``--work-dir`` is deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from streamconv import synth
from streamconv.cli.common import parse_size
from streamconv.execute.executor import RunOptions, run_plan
from streamconv.graph.node import Op, toposort
from streamconv.layout.options import McoreOptions
from streamconv.layout.parallel import ParallelSizes
from streamconv.plan.planner import plan_hf_to_mcore

from .common import drop_caches, run_measured, save_json

MiB = 1 << 20
LAYOUT = dict(target_tensor_parallel_size=2, target_expert_parallel_size=2, moe_grouped_gemm=True, mtp_num_layers=1)
RANKS = [(0, 0, 0), (1, 0, 0), (0, 0, 1), (1, 0, 1)]

CHILD = r"""
import hashlib, json, os, sys, time
mode, arg, rank = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
import torch
if mode != "torch.load":
    from streamconv.loader import open_rank
t0 = time.monotonic()
if mode == "imports":
    sd = {}
elif mode == "torch.load":
    sd = torch.load(arg, map_location="cpu", weights_only=True)
elif mode == "plan":
    sd = open_rank(arg, tp_rank=rank[0], pp_rank=rank[1], ep_rank=rank[2]).state_dict()
else:
    sd = open_rank(arg, tp_rank=rank[0], pp_rank=rank[1], ep_rank=rank[2], **json.loads(sys.argv[4])).state_dict()
load_s = time.monotonic() - t0
h = hashlib.sha256()
n = 0
for g, v in sd.items():
    if isinstance(v, dict):
        for k, t in v.items():
            h.update(k.encode()); h.update(t.contiguous().view(-1).view(torch.uint8).numpy())
            n += t.numel() * t.element_size()
with open("/proc/self/io") as f:
    io = dict(line.split(": ") for line in f.read().splitlines())
print(json.dumps({"load_seconds": load_s, "sha": h.hexdigest(), "tensor_bytes": n,
                  "read_bytes": int(io["read_bytes"])}))
"""


def child(mode: str, arg: str, rank, layout=None) -> list[str]:
    cmd = [sys.executable, "-c", CHILD, mode, arg, json.dumps(list(rank))]
    return cmd + ([json.dumps(layout)] if layout is not None else [])


def union_read_bytes(plan, ranks) -> tuple[int, int]:
    """(bytes of the union of source byte ranges the ranks' graphs read, sum over ranks of their own unions)."""
    from streamconv.loader import open_rank

    spans: dict[str, list] = {}
    per_rank = 0
    for r in ranks:
        rank = open_rank(plan, tp_rank=r[0], pp_rank=r[1], ep_rank=r[2])
        mine: dict[str, list] = {}
        for p in rank._pieces(rank_options()):
            for n in toposort([p.node]):
                if n.op is Op.READ:
                    a = n.arg
                    row = n.nbytes // max(n.shape[0], 1) if n.shape else n.nbytes
                    start = a.offset + a.rows[0] * row
                    mine.setdefault(a.file, []).append((start, start + n.nbytes))
        per_rank += _merged(mine)
        for f, s in mine.items():
            spans.setdefault(f, []).extend(s)
    return _merged(spans), per_rank


def rank_options():
    from streamconv.loader import LoadOptions

    return LoadOptions()


def _merged(spans: dict[str, list]) -> int:
    total = 0
    for ranges in spans.values():
        end = -1
        for a, b in sorted(ranges):
            if a > end:
                total += b - a
                end = b
            elif b > end:
                total += b - end
                end = b
    return total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=parse_size, default="4GB")
    ap.add_argument("--work-dir", default="/tmp/streamconv-bench-loader")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoint and converted files")
    args = ap.parse_args(argv)
    work = args.work_dir
    hf, out, plan_path = os.path.join(work, "hf"), os.path.join(work, "mcore"), os.path.join(work, "plan.json")
    os.makedirs(work, exist_ok=True)
    results: dict = {"size": args.size, "layout": LAYOUT, "load_average_before": os.getloadavg()}
    try:
        if not os.path.exists(os.path.join(hf, "config.json")):
            t = time.monotonic()
            synth.synth_checkpoint(hf, synth.synth_for_size(args.size, fp8=True))
            print(f"generated {hf} in {time.monotonic() - t:.0f} s", flush=True)
        with open(os.path.join(hf, "config.json")) as f:
            LAYOUT["mtp_num_layers"] = min(1, json.load(f).get("num_nextn_predict_layers", 0))  # MTP when present
        sizes = ParallelSizes(LAYOUT["target_tensor_parallel_size"], 1, LAYOUT["target_expert_parallel_size"])
        plan = plan_hf_to_mcore(hf, out, sizes, McoreOptions(moe_grouped_gemm=True,
                                                             mtp_num_layers=LAYOUT["mtp_num_layers"]))
        plan.save(plan_path)
        if not os.path.exists(os.path.join(out, "latest_checkpointed_iteration.txt")):
            run_plan(plan, RunOptions(overwrite=True))
        rank_file = os.path.join(out, "iter_0000001", "mp_rank_00_000", "model_optim_rng.pt")
        results["source_bytes"] = sum(s.size for s in plan.source_files)
        results["rank_file_bytes"] = os.path.getsize(rank_file)
        one = {}
        for mode, arg, layout in (("imports", plan_path, None), ("torch.load", rank_file, None),
                                  ("plan", plan_path, None), ("hf", hf, LAYOUT)):
            cold = drop_caches()
            r = run_measured(child(mode, arg, RANKS[0], layout))
            info = json.loads(r.pop("stdout").strip().splitlines()[-1])
            one[mode] = {**r, **info, "cold_cache": cold}
            print(f"{mode:10s} wall {r['seconds']:6.2f} s (load {info['load_seconds']:6.2f} s)  peak RSS "
                  f"{r['peak_rss_bytes'] / MiB:7.0f} MiB  read {info['read_bytes'] / 1e9:6.2f} GB", flush=True)
        shas = {one[m]["sha"] for m in ("torch.load", "plan", "hf")}
        assert len(shas) == 1, "the three ways disagree on the rank's tensors"
        base = one["torch.load"]
        for m in ("plan", "hf"):
            one[m]["time_ratio_vs_torch_load"] = one[m]["seconds"] / base["seconds"]
            one[m]["load_time_ratio_vs_torch_load"] = one[m]["load_seconds"] / base["load_seconds"]
            one[m]["rss_over_rank_bytes_MiB"] = (one[m]["peak_rss_bytes"] - results["rank_file_bytes"]) / MiB
            one[m]["rss_over_imports_and_rank_MiB"] = (one[m]["peak_rss_bytes"] - one["imports"]["peak_rss_bytes"]
                                                       - base["tensor_bytes"]) / MiB
        base["rss_over_rank_bytes_MiB"] = (base["peak_rss_bytes"] - results["rank_file_bytes"]) / MiB
        results["one_rank"] = one

        union, per_rank = union_read_bytes(plan, RANKS)
        cold = drop_caches()
        procs = []
        start = time.monotonic()
        for r in RANKS:
            procs.append(subprocess.Popen(["/usr/bin/time", "-v", *child("hf", hf, r, LAYOUT)], stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True))
        ranks = []
        for r, p in zip(RANKS, procs):
            so, se = p.communicate()
            if p.returncode:
                raise RuntimeError(se[-3000:])
            info = json.loads(so.strip().splitlines()[-1])
            rss = next(int(line.split(":")[1]) * 1024 for line in se.splitlines() if "Maximum resident" in line)
            ranks.append({"rank": r, **info, "peak_rss_bytes": rss})
        wall = time.monotonic() - start
        total_read = sum(x["read_bytes"] for x in ranks)
        results["four_ranks_concurrent"] = {
            "cold_cache": cold, "wall_seconds": wall, "ranks": ranks, "read_bytes_sum": total_read,
            "union_of_needed_source_bytes": union, "sum_of_each_ranks_needed_bytes": per_rank,
            "read_over_union": total_read / union, "load_average_after": os.getloadavg()}
        print(f"4 ranks concurrently: {wall:.1f} s, read {total_read / 1e9:.2f} GB from disk for a union of "
              f"{union / 1e9:.2f} GB needed ({per_rank / 1e9:.2f} GB summed over ranks): "
              f"{total_read / union:.3f}x the union", flush=True)
    finally:
        save_json(os.path.join(work, "loader.json"), results)
        if not args.keep:
            for d in (hf, out):
                shutil.rmtree(d, ignore_errors=True)
    print(json.dumps({k: v for k, v in results.items() if k != "four_ranks_concurrent"}, indent=1, default=str)[:4000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
