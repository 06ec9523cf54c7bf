"""Planning DeepSeek-V3 671B (headers only) in the training scripts' layouts: wall time and peak RSS.

    python -m benchmarks.plan671b [--work-dir bench-out]

The source is a headers-only 671B checkpoint (real headers, sparse files: a few MB of disk); each recipe of
plans/recipes.py is planned by ``streamconv plan`` in a child process under ``/usr/bin/time -v``, including
writing the full plan JSON.  Target (layouts issue): under 30 s and 1 GiB each.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from streamconv import synth

from .common import run_measured, save_json

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from plans.recipes import RECIPES, command  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work-dir", default="bench-out")
    args = ap.parse_args(argv)
    hf = os.path.join(args.work_dir, "hf-671b-headers")
    shutil.rmtree(hf, ignore_errors=True)
    synth.synth_checkpoint(hf, synth.DEEPSEEK_V3_671B, headers_only=True)
    results = {}
    for name, (sizes, options, _) in RECIPES.items():
        argv_ = command(sizes, options).split()[1:]
        argv_[argv_.index("--load-dir") + 1] = hf
        argv_[argv_.index("--save-dir") + 1] = os.path.join(args.work_dir, "unused-save-dir")
        plan_path = os.path.join(args.work_dir, f"plan-671b-{name}.json")
        r = run_measured([sys.executable, "-m", "streamconv", *argv_, "--output", plan_path])
        results[name] = {"seconds": r["seconds"], "peak_rss_bytes": r["peak_rss_bytes"],
                         "plan_json_bytes": os.path.getsize(plan_path)}
        os.remove(plan_path)
        print(f"{name:34s} {r['seconds']:6.1f} s   peak RSS {r['peak_rss_bytes'] / 2**20:6.0f} MiB   "
              f"plan JSON {results[name]['plan_json_bytes'] / 1e6:6.1f} MB", flush=True)
    save_json(os.path.join(args.work_dir, "plan671b.json"), results)
    shutil.rmtree(hf, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
