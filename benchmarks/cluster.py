"""hf2mcore beyond one process: a dask.distributed cluster of 1 and 2 worker processes and the parts of a split
plan, next to the raw copy and the single-process run of the same plan, measured in the same run; then the
projection of the 671B FP8 conversion on N hosts from the measured per-GB rates.

    python -m benchmarks.cluster [--size 2GB] [--work-dir bench-out/cluster] [--host-cores 32]
                                 [--host-read-gbs 3.0] [--host-write-gbs 2.0]

Each scenario drops the page cache first (root).  Cluster runs use ``dask scheduler`` and ``dask worker
--nworkers 1 --nthreads 1`` processes started from the command line (tests/e2e/cluster.py); the client is
``streamconv run PLAN --scheduler ADDRESS`` under ``/usr/bin/time -v``.  A first untimed run warms the workers
up.  Per worker: bytes read (``rchar`` and ``read_bytes`` of /proc/PID/io, whole process trees) against the
plan's ideal (each distinct source byte once), and peak RSS (``VmHWM`` of the worker process).

The projection (``project``) plans the real 671B layout from a headers-only checkpoint, groups and packs it for
N hosts exactly as ``plan split`` does, and takes for each host ``max(cpu, io)`` where
``cpu = GB written x (CPU seconds per GB written, measured on the parts here) / host cores`` and
``io = (GB read / read bandwidth + GB written / write bandwidth) x slowdown`` (stated per-host figures;
``slowdown``: the parts' seconds per GB moved over the raw copy's, measured here, at least 1), plus the
measured fixed costs (planning, splitting, loading and auditing, finishing).  ``--project-from RESULTS``
recomputes only the projection from the rates of an earlier run.  Results: ``<work-dir>/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

from streamconv.cli.common import parse_size
from streamconv.plan import split as splitting
from streamconv.plan.plan import Plan

from .common import drop_caches, raw_copy_script, run_measured, save_json
from .harness import checkpoint

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.e2e.cluster import Cluster, process_tree  # noqa: E402

GB = 1e9
RECIPES = ("sft_num_layer_list", "pretrain_etp1", "convert_example_vpp")


def vm_hwm(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except FileNotFoundError:
        pass
    return 0


def streamconv(*args: str) -> list[str]:
    return [sys.executable, "-m", "streamconv", *args]


def strip(r: dict) -> dict:
    return {k: v for k, v in r.items() if k != "stdout"}


def cluster_run(plan_path: str, workers: int, work: str, max_memory: str) -> dict:
    plan = Plan.load(plan_path)
    shutil.rmtree(plan.target_root, ignore_errors=True)
    with Cluster(os.path.join(work, f"logs-{workers}"), workers=workers) as c:
        # A first, untimed run warms the workers up (imports, the dequant kernel's compilation), so that the
        # timed one reads the sources and nothing else.
        run_measured(streamconv("run", plan_path, "--scheduler", c.address, "--no-progress"))
        shutil.rmtree(plan.target_root)
        cold = drop_caches()
        before = [(c.read_bytes_by_worker("rchar"), c.read_bytes_by_worker("read_bytes"))]
        r = run_measured(streamconv("run", plan_path, "--scheduler", c.address, "--no-progress",
                                    "--max-memory", max_memory))
        rchar = [a - b for a, b in zip(c.read_bytes_by_worker("rchar"), before[0][0])]
        disk = [a - b for a, b in zip(c.read_bytes_by_worker("read_bytes"), before[0][1])]
        rss = [max([vm_hwm(p) for p in process_tree(w.pid)] or [0]) for w in c.workers]
    ideal = splitting.ideal_read_bytes(plan)
    return {"workers": workers, "cold_cache": cold, "client": strip(r), "rchar_per_worker": rchar,
            "read_bytes_per_worker": disk, "worker_peak_rss_bytes": rss, "ideal_read_bytes": ideal,
            "rchar_over_ideal": sum(rchar) / ideal, "stdout": r["stdout"][-400:]}


def split_runs(plan_path: str, hosts: int, work: str, max_memory: str) -> dict:
    """Each part of ``plan split --hosts`` run alone, one after the other (the hosts of a cluster, one at a time),
    then ``--finish``: per part its wall time, CPU time, bytes written and read (plan's count)."""
    plan = Plan.load(plan_path)
    shutil.rmtree(plan.target_root, ignore_errors=True)
    parts_dir = os.path.join(work, f"parts-{hosts}")
    shutil.rmtree(parts_dir, ignore_errors=True)
    s = run_measured(streamconv("plan", "split", plan_path, "--hosts", str(hosts), "--output", parts_dir))
    parts = []
    for name in sorted(os.listdir(parts_dir)):
        path = os.path.join(parts_dir, name)
        sub = Plan.load(path)
        drop_caches()
        r = run_measured(streamconv("run", path, "--no-progress", "--max-memory", max_memory))
        written = sum(f.nbytes for f in sub.files)
        read = splitting.extent_bytes(splitting.union(list(splitting.read_extents(sub).values())))
        parts.append({"part": name, "run": strip(r), "bytes_written": written, "bytes_read": read,
                      "seconds_per_gb_moved": r["seconds"] / ((written + read) / GB),
                      "cpu_seconds_per_gb_written": (r["cpu_seconds"] or 0) / (written / GB)})
    fin = run_measured(streamconv("run", plan_path, "--finish"))
    return {"hosts": hosts, "split": strip(s), "parts": parts, "finish": strip(fin),
            "makespan_seconds": max(p["run"]["seconds"] for p in parts) + fin["seconds"]}


def project(rates: dict, work: str, host_cores: int, read_gbs: float, write_gbs: float,
            recipes=RECIPES, hosts=(1, 4, 8, 16)) -> dict:
    """The 671B FP8 hf2mcore on ``hosts`` hosts, per recipe of plans/recipes.py (see the module docstring).

    Fixed costs, measured here on the real plan: planning it, ``plan split`` (grouping), and per host loading
    the plan and auditing its sources (the whole plan's figures: an upper bound for a part), then ``--finish``
    (which re-derives the split); plus importing streamconv (``rates["import_seconds"]``)."""
    from streamconv import synth
    from streamconv.plan.planner import plan_hf_to_mcore
    from streamconv.plan.trust import audit
    from plans.recipes import RECIPES as ALL

    # The parts here moved bytes at this speed relative to a raw copy of the same bytes on the same disk;
    # never assumed faster than the disk (a factor below 1 is overlap of reading and writing, kept out).
    slowdown = max(1.0, rates["seconds_per_gb_moved"] / rates["raw_copy_seconds_per_gb_moved"])
    hf = os.path.join(work, "hf-671b-headers")
    if not os.path.exists(os.path.join(hf, "config.json")):
        synth.synth_checkpoint(hf, synth.DEEPSEEK_V3_671B, headers_only=True)
    out = {}
    for name in recipes:
        sizes, options, _ = ALL[name]
        t = time.monotonic()
        plan = plan_hf_to_mcore(hf, os.path.join(work, "unused"), sizes, options)
        plan_s = time.monotonic() - t
        path = os.path.join(work, f"plan-671b-{name}.json")
        plan.save(path)
        t = time.monotonic()
        plan = Plan.load(path)
        assert audit(plan) == []
        load_audit_s = time.monotonic() - t
        ideal = splitting.ideal_read_bytes(plan)
        rows = []
        for n in hosts:
            t = time.monotonic()
            bins = splitting.pack(splitting.group_files(plan, n), n)
            split_s = time.monotonic() - t
            per_host = []
            for b in bins:
                w = sum(g.write_bytes for g in b) / GB
                r = sum(g.read_bytes for g in b) / GB
                cpu = w * rates["cpu_seconds_per_gb_written"] / host_cores
                io = (r / read_gbs + w / write_gbs) * slowdown
                per_host.append({"write_gb": w, "read_gb": r, "cpu_s": cpu, "io_s": io, "s": max(cpu, io)})
            busiest = max(per_host, key=lambda h: h["s"])
            fixed = {"plan_s": plan_s, "split_s": split_s, "load_audit_s": load_audit_s,
                     "import_s": rates["import_seconds"], "finish_s": load_audit_s + split_s}
            rows.append({"hosts": n, "busiest_host": busiest, "fixed": fixed,
                         "total_s": busiest["s"] + sum(fixed.values()),
                         "read_over_ideal": sum(h["read_gb"] for h in per_host) * GB / ideal,
                         "imbalance": splitting.imbalance([h["s"] for h in per_host])})
        out[name] = {"output_gb": plan.nbytes / GB, "source_gb": sum(s.size for s in plan.source_files) / GB,
                     "ideal_read_gb": ideal / GB, "rows": rows}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=parse_size, default="2GB")
    ap.add_argument("--work-dir", default=os.path.join("bench-out", "cluster"))
    ap.add_argument("--max-memory", default="1GiB")
    ap.add_argument("--host-cores", type=int, default=32)
    ap.add_argument("--host-read-gbs", type=float, default=3.0, help="per-host read bandwidth, GB/s")
    ap.add_argument("--host-write-gbs", type=float, default=2.0, help="per-host write bandwidth, GB/s")
    ap.add_argument("--smoke", action="store_true", help="tiny source, no projection (seconds)")
    ap.add_argument("--project-from", metavar="RESULTS", help="only the projection, from this results.json's rates")
    args = ap.parse_args(argv)
    work = os.path.abspath(args.work_dir)
    os.makedirs(work, exist_ok=True)
    if args.project_from:
        with open(args.project_from) as f:
            results = json.load(f)
        results["projection"] = projection(results["rates"], work, args)
        save_json(os.path.join(work, "results.json"), results)
        print(json.dumps(summary(results), indent=2))
        return 0
    hf = checkpoint(work, args.size, fp8=True, smoke=args.smoke)
    out = os.path.join(work, "mcore")
    plan_path = os.path.join(work, "plan.json")
    with open(os.path.join(hf, "config.json")) as f:
        mtp = min(1, json.load(f).get("num_nextn_predict_layers", 0))
    run_measured(streamconv("plan", "hf2mcore", "--load-dir", hf, "--save-dir", out,
                            "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "1",
                            "--target-expert-parallel-size", "2", "--moe-grouped-gemm", "--mtp-num-layers",
                            str(mtp), "-o", plan_path))
    plan = Plan.load(plan_path)
    inputs = sorted(os.path.join(hf, f) for f in os.listdir(hf) if f.endswith(".safetensors"))
    in_bytes = sum(os.path.getsize(p) for p in inputs)
    results = {"input_bytes": in_bytes, "output_bytes": plan.nbytes,
               "ideal_read_bytes": splitting.ideal_read_bytes(plan), "max_memory": args.max_memory}

    cold = drop_caches()
    results["raw_copy"] = strip(run_measured(raw_copy_script(inputs, os.path.join(work, "raw.bin"), plan.nbytes)))
    results["cold_cache"] = cold
    shutil.rmtree(out, ignore_errors=True)
    drop_caches()
    results["single_process"] = strip(run_measured(streamconv("run", plan_path, "--no-progress", "--max-memory",
                                                              args.max_memory)))
    results["cluster"] = [cluster_run(plan_path, k, work, args.max_memory) for k in (1, 2)]
    results["split"] = split_runs(plan_path, 2, work, args.max_memory)
    parts = results["split"]["parts"]
    rates = {"cpu_seconds_per_gb_written": sum(p["run"]["cpu_seconds"] or 0 for p in parts)
             / (sum(p["bytes_written"] for p in parts) / GB),
             "seconds_per_gb_moved": sum(p["run"]["seconds"] for p in parts)
             / (sum(p["bytes_written"] + p["bytes_read"] for p in parts) / GB),
             "raw_copy_seconds_per_gb_moved": results["raw_copy"]["seconds"] / ((in_bytes + plan.nbytes) / GB),
             "import_seconds": run_measured([sys.executable, "-c", "import streamconv.execute.executor"])["seconds"]}
    results["rates"] = rates
    if not args.smoke:
        results["projection"] = projection(rates, work, args)
    save_json(os.path.join(work, "results.json"), results)
    print(json.dumps(summary(results), indent=2))
    return 0


def projection(rates: dict, work: str, args) -> dict:
    return {"host_cores": args.host_cores, "host_read_gbs": args.host_read_gbs, "host_write_gbs": args.host_write_gbs,
            "recipes": project(rates, work, args.host_cores, args.host_read_gbs, args.host_write_gbs)}


def summary(r: dict) -> dict:
    out = {"input_gb": r["input_bytes"] / GB, "output_gb": r["output_bytes"] / GB,
           "raw_copy_s": r["raw_copy"]["seconds"], "single_process_s": r["single_process"]["seconds"]}
    for c in r["cluster"]:
        out[f"cluster_{c['workers']}w_s"] = c["client"]["seconds"]
        out[f"cluster_{c['workers']}w_rchar_over_ideal"] = c["rchar_over_ideal"]
        out[f"cluster_{c['workers']}w_worker_rss_gib"] = [b / 2**30 for b in c["worker_peak_rss_bytes"]]
    out["split_parts_s"] = [p["run"]["seconds"] for p in r["split"]["parts"]]
    out["rates"] = r["rates"]
    for name, rec in (r.get("projection") or {}).get("recipes", {}).items():
        out[f"projection_{name}_s"] = {row["hosts"]: round(row["total_s"], 1) for row in rec["rows"]}
    return out


if __name__ == "__main__":
    sys.exit(main())
