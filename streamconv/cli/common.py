"""Flags shared by several commands, defined once so names and help match everywhere."""

from __future__ import annotations

import argparse
import re

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """'512MB', '1.5GiB', '1000000' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 512MB, 2GiB, 1000000)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def int_list(text: str) -> tuple[int, ...]:
    """'47,62,63' -> (47, 62, 63)."""
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from None


def add_hf2mcore_flags(p: argparse.ArgumentParser) -> None:
    """MindSpeed-LLM's converter flags, so a user's script ports by changing the program name."""
    p.add_argument("--load-dir", required=True, help="HF checkpoint directory (config.json, *.safetensors, index)")
    p.add_argument("--save-dir", required=True, help="directory the mcore checkpoint is written to")
    p.add_argument("--target-tensor-parallel-size", type=int, default=1, metavar="TP")
    p.add_argument("--target-pipeline-parallel-size", type=int, default=1, metavar="PP")
    p.add_argument("--target-expert-parallel-size", type=int, default=1, metavar="EP")
    p.add_argument("--moe-grouped-gemm", action="store_true",
                   help="write routed experts as grouped-GEMM weight1/weight2 (what DeepSeek-V3 scripts train with)")
    p.add_argument("--mtp-num-layers", type=int, default=0, help="MTP modules to convert (0 drops them)")
    p.add_argument("--num-layers", type=int, default=None,
                   help="transformer layers to convert (default: num_hidden_layers of config.json)")
    p.add_argument("--first-k-dense-replace", type=int, default=None,
                   help="dense layers to keep (default: first_k_dense_replace of config.json)")
    p.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None, metavar="S",
                   help="VPP: layers per virtual chunk (files hold model0..model{v-1})")
    p.add_argument("--noop-layers", type=int_list, default=(), metavar="I,J,...",
                   help="layer slots that hold no weights (counted by --num-layers)")
    p.add_argument("--num-layer-list", type=int_list, default=None, metavar="A,B,...",
                   help="layers per pipeline stage (exactly PP entries)")
    p.add_argument("--schedules-method", choices=["dualpipev"], default=None,
                   help="dualpipev: two chunks per stage, down then back up")
    p.add_argument("--moe-tp-extend-ep", action="store_true",
                   help="experts whole, dealt in EP x TP buckets (the TP group becomes extra expert parallelism)")
    p.add_argument("--expert-tensor-parallel-size", type=int, default=None, choices=[1], metavar="1",
                   help="1: experts whole by EP rank; only the (tp, ep) rank files Megatron instantiates")
    p.add_argument("--mla-mm-split", action="store_true",
                   help="split the MLA up-projections into linear_qk_nope/qk_rope/kv_nope/v")
    p.add_argument("--mla-key-names", choices=["current", "legacy"], default="current",
                   help="legacy: linear_qb/linear_kvb/k_layernorm (checkpoints made before 2025-07-23)")


def add_run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-memory", type=parse_size, default="1GiB",
                   help="bound on bytes in flight (default 1GiB); peak RSS is about this plus ~0.4 GB")
    p.add_argument("--workers", type=int, default=2, help="threads of the local scheduler (default 2)")
    p.add_argument("--scheduler", default="threads",
                   help="'threads' (default), 'sync' (one thread, for debugging) or a dask.distributed "
                        "scheduler address such as tcp://host:8786")
    p.add_argument("--overwrite", action="store_true", help="allow a non-empty --save-dir")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress line")
    p.add_argument("--dry-run", action="store_true", help="check and print what would be written; write nothing")


def run_options(args):
    from ..execute.executor import RunOptions

    return RunOptions(max_memory=args.max_memory, num_workers=args.workers, scheduler=args.scheduler,
                      overwrite=args.overwrite, progress=args.progress)


def plan_hf2mcore_from_args(args):
    from ..layout.parallel import ParallelSizes
    from ..models.deepseek_v3 import McoreOptions
    from ..plan.planner import plan_hf_to_mcore

    sizes = ParallelSizes(args.target_tensor_parallel_size, args.target_pipeline_parallel_size,
                          args.target_expert_parallel_size)
    options = McoreOptions(moe_grouped_gemm=args.moe_grouped_gemm, mtp_num_layers=args.mtp_num_layers,
                           num_layers=args.num_layers, first_k_dense_replace=args.first_k_dense_replace,
                           vpp_layers=args.num_layers_per_virtual_pipeline_stage, noop_layers=args.noop_layers,
                           num_layer_list=args.num_layer_list, dualpipev=args.schedules_method == "dualpipev",
                           moe_tp_extend_ep=args.moe_tp_extend_ep,
                           expert_tensor_parallel_size=args.expert_tensor_parallel_size,
                           mla_mm_split=args.mla_mm_split, mla_key_names=args.mla_key_names)
    return plan_hf_to_mcore(args.load_dir, args.save_dir, sizes, options)
