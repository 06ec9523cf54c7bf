"""Zarr stores on a real-shaped DeepSeek-V3 slice: HF -> zarr and zarr -> mcore, each next to the same job done
from/to safetensors in the same run, with and without compression, and the store's size.

    python -m benchmarks.zarr_store --size 4GB [--bf16] [--compressors none,zstd] [--tp 2 --ep 2]

Per compressor, cold cache before every timed child (when root):

1. **raw copy**: read the HF shards, write as many bytes (the floor);
2. **HF -> HF (safetensors)**: streamconv rewrites the checkpoint as safetensors (the same tensors, files and
   executor; only the output format differs);
3. **HF -> zarr**: ``streamconv run`` of the hf2zarr plan; the store's bytes and file count;
4. **safetensors -> mcore** and **zarr -> mcore**: the same hf2mcore plan (TP/EP, grouped GEMM, MTP) from the HF
   directory and from the store.

Writes ``<work-dir>/zarr-<size>-<fmt>.json``.  Not part of CI (minutes); the smoke test runs it on the tiny preset.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

from streamconv.cli.common import parse_size
from streamconv.plan.plan import Plan
from streamconv.plan.sources import HFSource
from streamconv.plan.zarr_plans import hf_files, layout_of_source

from .common import dir_bytes, drop_caches, raw_copy_script, run_measured, save_json
from .harness import checkpoint

GB = 1e9


def file_count(path: str) -> int:
    return sum(len(fs) for _, _, fs in os.walk(path))


def timed_run(plan_path: str, args) -> dict:
    drop_caches()
    r = run_measured([sys.executable, "-m", "streamconv", "run", plan_path, "--no-progress", "--workers",
                      str(args.workers), "--max-memory", args.max_memory])
    return {k: v for k, v in r.items() if k != "stdout"}


def hf2hf_plan(hf: str, out: str, path: str) -> None:
    """The HF checkpoint rewritten as safetensors by streamconv: the baseline of HF -> zarr."""
    src = HFSource(hf)
    plan = Plan(kind="hf2hf", source_root=hf, source_files=tuple(src.files), target_root=out,
                files=tuple(hf_files(layout_of_source(src))))
    plan.save(path)


def compressibility(work_dir: str, levels: tuple[int, ...] = (1, 3)) -> dict:
    """How much chunks of trained-like weights compress, and how fast (one thread): N(0, 0.02) values (what
    trained weights look like, unlike the generator's bf16, which is a dequantized FP8 checkpoint with 3-bit
    mantissas), as bf16, and as FP8 with per-128x128-block scales; 128 x 896 chunks, as a 7168-wide weight is
    stored; each codec at each of ``levels``.  The generator's bf16 (dequantized FP8 codes) is measured too."""
    import time

    import numpy as np
    import torch

    from streamconv.execute.quant import fp8_block_scale, quant_fp8_block
    from streamconv.storage.zarr_store import Codec

    torch.manual_seed(0)
    w = (torch.randn(4096, 7168) * 0.02)
    samples = {"bf16": w.to(torch.bfloat16)}
    scale = fp8_block_scale(samples["bf16"], block=(128, 128), dtype=torch.float8_e4m3fn)
    samples["fp8"] = quant_fp8_block(samples["bf16"], scale, block=(128, 128), origin=(0, 0),
                                     dtype=torch.float8_e4m3fn)
    samples["generator bf16"] = (samples["fp8"].to(torch.float32).view(32, 128, 56, 128)
                                 * scale.view(32, 1, 56, 1)).view(4096, 7168).to(torch.bfloat16)
    out = {}
    for kind, t in samples.items():
        raw = t.view(torch.uint8 if t.element_size() == 1 else torch.int16).numpy()
        chunks = [np.ascontiguousarray(raw[r:r + 128, c:c + 896]).view(np.uint8).reshape(-1)
                  for r in range(0, raw.shape[0], 128) for c in range(0, raw.shape[1], 896)]
        total = sum(c.size for c in chunks)
        for name in ("zstd", "blosc"):
            for level in levels:
                codec = Codec(name, level)
                start = time.perf_counter()
                stored = sum(len(codec.encode(c, t.element_size())) for c in chunks)
                seconds = time.perf_counter() - start
                out[f"{kind} {name} {level}"] = {"stored_over_raw": stored / total,
                                                 "encode_mb_s": total / seconds / 1e6}
                print(f"{kind:15s} {name:5s} level {level}: stored / raw = {stored / total:.3f}, encode "
                      f"{total / seconds / 1e6:5.0f} MB/s (one thread)", flush=True)
    os.makedirs(work_dir, exist_ok=True)
    save_json(os.path.join(work_dir, "zarr-compressibility.json"), out)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=parse_size, default="4GB")
    ap.add_argument("--bf16", dest="fp8", action="store_false", help="bf16 source (default: FP8)")
    ap.add_argument("--compressors", default="none,zstd")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--ep", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--max-memory", default="1GiB")
    ap.add_argument("--work-dir", default="bench-out")
    ap.add_argument("--smoke", action="store_true", help="the tiny preset: checks the harness, not the speed")
    ap.add_argument("--compressibility", action="store_true",
                    help="only measure how N(0, 0.02) weights compress (bf16 and FP8 chunks)")
    args = ap.parse_args(argv)
    if args.compressibility:
        compressibility(args.work_dir)
        return 0

    fmt = "fp8" if args.fp8 else "bf16"
    tag = "smoke" if args.smoke else f"{args.size // 10**6}MB"
    hf = checkpoint(args.work_dir, args.size, args.fp8, args.smoke)
    with open(os.path.join(hf, "config.json")) as f:
        mtp = str(min(1, json.load(f).get("num_nextn_predict_layers", 0)))
    inputs = sorted(os.path.join(hf, f) for f in os.listdir(hf) if f.endswith(".safetensors"))
    in_bytes = sum(os.path.getsize(p) for p in inputs)
    store, mcore, back = (os.path.join(args.work_dir, n) for n in ("store", "mcore-out", "hf-out"))
    results = {"size": args.size, "format": fmt, "input_bytes": in_bytes, "layout": [args.tp, 1, args.ep],
               "runs": {}}
    sc = [sys.executable, "-m", "streamconv"]
    layout = ["--target-tensor-parallel-size", str(args.tp), "--target-expert-parallel-size", str(args.ep),
              "--moe-grouped-gemm", "--mtp-num-layers", mtp]

    def plan(name, cmd) -> str:
        path = os.path.join(args.work_dir, f"{name}.json")
        run_measured(sc + ["plan"] + cmd + ["-o", path])
        return path

    shutil.rmtree(back, ignore_errors=True)
    hf2hf_plan(hf, back, os.path.join(args.work_dir, "hf2hf.json"))
    out_bytes = Plan.load(os.path.join(args.work_dir, "hf2hf.json")).nbytes
    drop_caches()
    raw = run_measured(raw_copy_script(inputs, os.path.join(args.work_dir, "raw.bin"), out_bytes))
    results["raw_copy_seconds"] = raw["seconds"]
    results["runs"]["hf2hf"] = timed_run(os.path.join(args.work_dir, "hf2hf.json"), args)
    shutil.rmtree(back, ignore_errors=True)

    shutil.rmtree(mcore, ignore_errors=True)
    st_plan = plan("st2mcore", ["hf2mcore", "--load-dir", hf, "--save-dir", mcore] + layout)
    results["runs"]["safetensors->mcore"] = timed_run(st_plan, args)
    results["mcore_bytes"] = dir_bytes(mcore)
    shutil.rmtree(mcore, ignore_errors=True)

    for comp in args.compressors.split(","):
        shutil.rmtree(store, ignore_errors=True)
        z_plan = plan(f"hf2zarr-{comp}", ["hf2zarr", "--load-dir", hf, "--save-dir", store, "--compressor", comp])
        r = timed_run(z_plan, args)
        r.update(store_bytes=dir_bytes(store), store_files=file_count(store))
        results["runs"][f"hf->zarr[{comp}]"] = r
        zm_plan = plan(f"zarr2mcore-{comp}", ["hf2mcore", "--load-dir", store, "--save-dir", mcore] + layout)
        results["runs"][f"zarr[{comp}]->mcore"] = timed_run(zm_plan, args)
        same = dir_bytes(mcore) == results["mcore_bytes"]
        results["runs"][f"zarr[{comp}]->mcore"]["same_size_as_from_safetensors"] = same
        shutil.rmtree(mcore, ignore_errors=True)
    shutil.rmtree(store, ignore_errors=True)

    base = {"hf->zarr": results["runs"]["hf2hf"]["seconds"],
            "->mcore": results["runs"]["safetensors->mcore"]["seconds"]}
    for name, r in results["runs"].items():
        ref = base["hf->zarr"] if name.startswith("hf->zarr") else base["->mcore"] if "->mcore" in name else None
        r["ratio_vs_safetensors"] = r["seconds"] / ref if ref and name.startswith(("hf->zarr", "zarr")) else None
        r["ratio_vs_raw_copy"] = r["seconds"] / raw["seconds"]
        rss = r["peak_rss_bytes"]
        extra = (f"  store {r['store_bytes'] / GB:6.2f} GB in {r['store_files']} files"
                 if "store_bytes" in r else "")
        print(f"{name:20s} {r['seconds']:7.1f} s  vs raw copy {r['ratio_vs_raw_copy']:5.2f}  "
              + (f"vs safetensors {r['ratio_vs_safetensors']:5.2f}  " if r["ratio_vs_safetensors"] else "")
              + f"peak RSS {rss / 2**20 if rss else float('nan'):6.0f} MiB" + extra, flush=True)
    print(f"raw copy {raw['seconds']:.1f} s; input {in_bytes / GB:.2f} GB", flush=True)
    save_json(os.path.join(args.work_dir, f"zarr-{tag}-{fmt}.json"), results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
