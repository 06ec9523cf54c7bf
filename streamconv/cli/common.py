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
    p.add_argument("--load-dir", required=True,
                   help="HF checkpoint directory (config.json, *.safetensors, index), or a zarr store (hf2zarr)")
    p.add_argument("--save-dir", required=True, help="directory the mcore checkpoint is written to")
    add_target_flags(p)


def add_target_flags(p: argparse.ArgumentParser) -> None:
    """The mcore layout being written: sizes, layout flags, ``--save-args`` (hf2mcore's and mcore2mcore's)."""
    p.add_argument("--target-tensor-parallel-size", type=int, default=1, metavar="TP")
    p.add_argument("--target-pipeline-parallel-size", type=int, default=1, metavar="PP")
    p.add_argument("--target-expert-parallel-size", type=int, default=1, metavar="EP")
    add_layout_flags(p)
    p.add_argument("--save-args", action="store_true",
                   help="also store MindSpeed's `args` namespace in every rank file, so MindSpeed's own mg->hf "
                        "can read the checkpoint (torch.load(weights_only=True) then needs argparse.Namespace "
                        "allowed)")
    p.add_argument("--qlora-nf4", action="store_true",
                   help="QLoRA base: store the linear weights in bitsandbytes NF4 (blocksize 64, double-quantized "
                        "statistics), quantized on the fly; no NPU or bitsandbytes needed")
    add_nf4_layout_flag(p)


def add_nf4_layout_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nf4-layout", choices=["npu", "cuda"], default=None,
                   help="nibble order of NF4 codes: npu (element 2i in the low nibble, code+8; the Ascend "
                        "bitsandbytes QLoRA used) or cuda (high nibble first; bitsandbytes on CUDA/CPU). Default: "
                        "npu, or what hf2mcore recorded")


def add_mcore2hf_flags(p: argparse.ArgumentParser) -> None:
    """MindSpeed's mcore2hf flags (source-side names).  Flags left out take the values streamconv recorded
    when it wrote the checkpoint (``streamconv_source.json``), else MindSpeed's defaults."""
    p.add_argument("--load-dir", required=True, help="mcore checkpoint directory (latest_checkpointed_iteration.txt)")
    p.add_argument("--save-dir", required=True, help="directory the HF safetensors checkpoint is written to")
    add_mcore_source_flags(p)
    p.add_argument("--max-shard-size", type=parse_size, default=None, metavar="SIZE",
                   help="shard by size (e.g. 5GB); default: one file per layer")
    p.add_argument("--fp8-export", action="store_true",
                   help="write linear weights in DeepSeek's FP8 release format (128x128 block scales)")
    p.add_argument("--fp8-scales-from", metavar="HF_DIR", default=None,
                   help="the original FP8 release (HF directory or zarr store): reuse its scales wherever the weights "
                        "still fit them (FP8 -> mcore -> FP8 is then exact; blocks grown by training get fresh scales)")
    add_lora_flags(p)


def add_lora_flags(p: argparse.ArgumentParser) -> None:
    """MindSpeed's LoRA flags of mcore2hf (their names), and the adapter export's layout."""
    p.add_argument("--lora-r", type=int, default=None, metavar="R",
                   help="LoRA rank of training: merge the checkpoint's LoRA factors into the base")
    p.add_argument("--lora-alpha", default=None, metavar="ALPHA",
                   help="LoRA alpha of training (the merge adds alpha / r * B @ A)")
    p.add_argument("--lora-target-modules", nargs="+", default=None, metavar="NAME",
                   help="Megatron module names training wrapped (linear_qkv linear_proj linear_fc1 linear_fc2 ...); "
                        "default: the ones found in the checkpoint")
    p.add_argument("--lora-load", metavar="DIR", default=None,
                   help="a LoRA-only checkpoint (--lora-ckpt-filter) with --load-dir's layout: merged into the base")
    p.add_argument("--save-lora-to-hf", action="store_true",
                   help="write the LoRA adapter alone (HF names), not the merged model; reads only the adapter")
    p.add_argument("--lora-export-layout", choices=["peft", "peft-fused", "mindspeed"], default="peft",
                   help="peft: adapter_model.safetensors, one entry per HF module (default); peft-fused: routed "
                        "experts as transformers>=5 fused parameters (PEFT target_parameters); mindspeed: the "
                        "reference's per-layer shards, index and adapter_config")
    add_nf4_layout_flag(p)


def add_mcore_source_flags(p: argparse.ArgumentParser, layout_prefix: str = "") -> None:
    """What describes an mcore checkpoint being read: its model config, iteration, parallel sizes and layout
    flags (``layout_prefix`` "source-": ``--source-moe-grouped-gemm`` ..., for mcore2mcore, whose unprefixed
    layout flags describe the target), and the replica check.  Left out: the record's values."""
    p.add_argument("--hf-config", "--hf-cfg-dir", dest="hf_config", metavar="DIR", default=None,
                   help="HF model directory (or a zarr store of it) whose config.json (and tokenizer files) "
                        "describe the model (default: the config recorded by streamconv hf2mcore)")
    p.add_argument("--iteration", default=None, help="iteration to convert (default: the tracker file's)")
    p.add_argument("--source-tensor-parallel-size", type=int, default=None, metavar="TP")
    p.add_argument("--source-pipeline-parallel-size", type=int, default=None, metavar="PP")
    p.add_argument("--source-expert-parallel-size", type=int, default=None, metavar="EP")
    add_layout_flags(p, recorded=True, prefix=layout_prefix)
    p.add_argument("--verify-replicas", dest="verify_replicas", action="store_true", default=None,
                   help="compare every TP/EP copy of replicated tensors before writing (default: on when the "
                        "copies total at most 8 GiB)")
    p.add_argument("--no-verify-replicas", dest="verify_replicas", action="store_false",
                   help="read replicated tensors from the first rank file without comparing the copies")


def add_mcore2mcore_flags(p: argparse.ArgumentParser) -> None:
    """Source: as mcore2hf reads a checkpoint (record, else ``--source-...`` flags); target: exactly hf2mcore's
    flags."""
    p.add_argument("--load-dir", required=True, help="mcore checkpoint directory (latest_checkpointed_iteration.txt)")
    p.add_argument("--save-dir", required=True, help="directory the resharded mcore checkpoint is written to")
    add_mcore_source_flags(p, layout_prefix="source-")
    p.add_argument("--lora-load", metavar="DIR", default=None,
                   help="a LoRA-only checkpoint (--lora-ckpt-filter) of --load-dir: reshard that adapter alone (the "
                        "output is LoRA-only too; the base's weights are not read). A checkpoint holding base and "
                        "LoRA together is resharded with its adapter without this flag")
    add_target_flags(p)


def add_store_flags(p: argparse.ArgumentParser) -> None:
    """How a zarr store is written (hf2zarr, mcore2zarr)."""
    p.add_argument("--compressor", choices=["none", "zstd", "blosc"], default="none",
                   help="inner chunk compression (default none: bf16 weights compress little; see "
                        "docs/performance.md)")
    p.add_argument("--compression-level", type=int, default=None, metavar="N",
                   help="zstd/blosc level 1-9 (default 1 for zstd: weights compress as well as at 3, up to 8x "
                        "faster; 3 for blosc, whose shuffle gains from it)")
    p.add_argument("--chunk-edge", type=int, default=None, metavar="N",
                   help="chunk rows and the column granule (default: the model's FP8 block edge, 128)")
    p.add_argument("--no-stack-experts", dest="stack_experts", action="store_false",
                   help="one array per HF tensor; by default a layer's routed experts are one array per "
                        "projection (and per scale), expert j at index j, so a 671B store is thousands of files")


def add_hf2zarr_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--load-dir", required=True, help="HF checkpoint directory (or a zarr store to re-chunk)")
    p.add_argument("--save-dir", required=True, help="directory the zarr store is written to (the store's root)")
    add_store_flags(p)


def add_mcore2zarr_flags(p: argparse.ArgumentParser) -> None:
    """mcore2hf's flags (the HF checkpoint the store holds: shards, FP8 export) and the store's."""
    add_mcore2hf_flags(p)
    add_store_flags(p)


def add_zarr2hf_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--load-dir", required=True, help="zarr store written by hf2zarr or mcore2zarr")
    p.add_argument("--save-dir", required=True, help="directory the HF checkpoint is written to")


def store_options(args):
    from ..plan.zarr_plans import StoreOptions

    return StoreOptions(compressor=args.compressor, level=args.compression_level, chunk_edge=args.chunk_edge,
                        stack_experts=args.stack_experts)


def plan_hf2zarr_from_args(args):
    from ..plan.zarr_plans import plan_hf_to_zarr

    return plan_hf_to_zarr(args.load_dir, args.save_dir, store_options(args))


def plan_mcore2zarr_from_args(args):
    from ..plan.zarr_plans import plan_mcore_to_zarr

    return plan_mcore_to_zarr(plan_mcore2hf_from_args(args), args.save_dir, store_options(args))


def plan_zarr2hf_from_args(args):
    from ..plan.zarr_plans import plan_zarr_to_hf

    return plan_zarr_to_hf(args.load_dir, args.save_dir)


def add_layout_flags(p: argparse.ArgumentParser, recorded: bool = False, prefix: str = "") -> None:
    """The model flags that change the mcore layout.  ``recorded``: no defaults (None = not given).  ``prefix``:
    spelled ``--<prefix>moe-grouped-gemm`` ... (a second layout in one command; no ``--model-type-hf`` then)."""
    def default(value):
        return None if recorded else value

    if not prefix:
        p.add_argument("--model-type-hf", default=None, metavar="NAME",
                       help="MindSpeed-LLM's family name (deepseek3, deepseek32, qwen3-moe); optional: config.json's "
                            "model_type decides, and a different name is an error")
    else:
        p = _Prefixed(p, prefix)
    flag = "store_true"
    p.add_argument("--moe-grouped-gemm", action=flag, default=default(False),
                   help="routed experts as grouped-GEMM weight1/weight2 (what DeepSeek-V3 scripts train with)")
    p.add_argument("--mtp-num-layers", type=int, default=default(0), help="MTP modules (0: none)")
    p.add_argument("--num-layers", type=int, default=None,
                   help="transformer layer slots (default: num_hidden_layers of config.json plus noop layers)")
    p.add_argument("--first-k-dense-replace", type=int, default=None,
                   help="dense layers kept (default: first_k_dense_replace of config.json)")
    p.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None, metavar="S",
                   help="VPP: layers per virtual chunk (files hold model0..model{v-1})")
    p.add_argument("--noop-layers", type=int_list, default=default(()), metavar="I,J,...",
                   help="layer slots that hold no weights (counted by --num-layers)")
    p.add_argument("--num-layer-list", type=int_list, default=None, metavar="A,B,...",
                   help="layers per pipeline stage (exactly PP entries)")
    p.add_argument("--schedules-method", choices=["dualpipev"], default=None,
                   help="dualpipev: two chunks per stage, down then back up")
    p.add_argument("--moe-tp-extend-ep", action=flag, default=default(False),
                   help="experts whole, dealt in EP x TP buckets (the TP group becomes extra expert parallelism)")
    p.add_argument("--expert-tensor-parallel-size", type=int, default=None, choices=[1], metavar="1",
                   help="1: experts whole by EP rank; only the (tp, ep) rank files Megatron instantiates")
    p.add_argument("--mla-mm-split", action=flag, default=default(False),
                   help="MLA up-projections split into linear_qk_nope/qk_rope/kv_nope/v")
    p.add_argument("--mla-key-names", choices=["current", "legacy"], default=default("current"),
                   help="legacy: linear_qb/linear_kvb/k_layernorm (checkpoints made before 2025-07-23)")


class _Prefixed:
    """``add_argument`` with every ``--flag`` spelled ``--<prefix>flag`` (and its dest likewise)."""

    def __init__(self, parser: argparse.ArgumentParser, prefix: str):
        self.parser, self.prefix = parser, prefix

    def add_argument(self, *names: str, **kwargs):
        return self.parser.add_argument(*("--" + self.prefix + n[2:] for n in names), **kwargs)


def add_run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-memory", type=parse_size, default="1GiB",
                   help="bound on bytes in flight (default 1GiB); peak RSS is about this plus ~0.4 GB; with "
                        "--scheduler, per task (a worker runs one task per thread)")
    p.add_argument("--workers", type=int, default=2,
                   help="threads of the local scheduler (default 2); with --scheduler, threads of each task on a "
                        "worker")
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
    from ..plan.planner import plan_hf_to_mcore

    sizes, options = target_layout(args)
    return plan_hf_to_mcore(args.load_dir, args.save_dir, sizes, options,
                            model_type_hf=args.model_type_hf, save_args=args.save_args,
                            qlora_nf4=(args.nf4_layout or "npu") if args.qlora_nf4 else None)


def _options_from_args(args, recorded: dict | None = None, prefix: str = ""):
    """McoreOptions from the flags (``prefix``: their dests' prefix, "source_"); with ``recorded`` (an hf2mcore
    record), flags not given take its values."""
    from ..layout.options import McoreOptions

    def arg(name):
        return getattr(args, prefix + name)

    given = {
        "moe_grouped_gemm": arg("moe_grouped_gemm"), "mtp_num_layers": arg("mtp_num_layers"),
        "num_layers": arg("num_layers"), "first_k_dense_replace": arg("first_k_dense_replace"),
        "vpp_layers": arg("num_layers_per_virtual_pipeline_stage"),
        "noop_layers": tuple(arg("noop_layers")) if arg("noop_layers") is not None else None,
        "num_layer_list": arg("num_layer_list"),
        "dualpipev": True if arg("schedules_method") == "dualpipev" else None,
        "moe_tp_extend_ep": arg("moe_tp_extend_ep"),
        "expert_tensor_parallel_size": arg("expert_tensor_parallel_size"),
        "mla_mm_split": arg("mla_mm_split"), "mla_key_names": arg("mla_key_names"),
    }
    base = dict(McoreOptions().__dict__)
    if recorded is not None:
        base.update({k: tuple(v) if isinstance(v, list) else v for k, v in recorded.items() if k in base})
    base.update({k: v for k, v in given.items() if v is not None})
    return McoreOptions(**base)


def mcore_source_layout(args, prefix: str = ""):
    """``(sizes, options)`` of the mcore checkpoint at ``--load-dir``: the flags given, else what streamconv
    recorded next to it (``streamconv_source.json``), else MindSpeed's ``args`` in its rank files."""
    from ..layout.parallel import ParallelSizes
    from ..plan.mcore2hf import read_record

    layout = read_record(args.load_dir).get("layout") or args_layout(args.load_dir, args.iteration)
    rec_sizes = layout.get("sizes") or {}
    sizes = ParallelSizes(*(v if v is not None else rec_sizes.get(k, 1) for k, v in (
        ("tp", args.source_tensor_parallel_size), ("pp", args.source_pipeline_parallel_size),
        ("ep", args.source_expert_parallel_size))))
    recorded = dict(layout.get("options") or {}) if layout else None
    if recorded and getattr(args, prefix + "schedules_method") == "dualpipev":
        recorded.pop("vpp_layers", None)  # MindSpeed's args give dualpipev's two chunks as a VPP size
    return sizes, _options_from_args(args, recorded, prefix)


def plan_mcore2hf_from_args(args):
    from ..plan.lora import LoraOptions
    from ..plan.mcore2hf import ExportOptions, plan_mcore_to_hf

    sizes, options = mcore_source_layout(args)
    export = ExportOptions(max_shard_size=args.max_shard_size, verify_replicas=args.verify_replicas,
                           fp8_export=args.fp8_export, fp8_scales_from=args.fp8_scales_from)
    lora = LoraOptions(r=args.lora_r, alpha=args.lora_alpha,
                       target_modules=tuple(args.lora_target_modules) if args.lora_target_modules else None,
                       load=args.lora_load, save_to_hf=args.save_lora_to_hf, export_layout=args.lora_export_layout,
                       nf4_layout=args.nf4_layout)
    return plan_mcore_to_hf(args.load_dir, args.save_dir, sizes, options, export, hf_config_dir=args.hf_config,
                            iteration=args.iteration, model_type_hf=args.model_type_hf, lora=lora)


def target_layout(args):
    """``(sizes, options)`` of the mcore checkpoint to write (hf2mcore's flags)."""
    from ..layout.parallel import ParallelSizes

    sizes = ParallelSizes(args.target_tensor_parallel_size, args.target_pipeline_parallel_size,
                          args.target_expert_parallel_size)
    return sizes, _options_from_args(args)


def plan_mcore2mcore_from_args(args):
    from ..plan.mcore2mcore import plan_mcore_to_mcore

    sizes, options = mcore_source_layout(args, prefix="source_")
    target_sizes, target_options = target_layout(args)
    return plan_mcore_to_mcore(args.load_dir, args.save_dir, sizes, options, target_sizes, target_options,
                               hf_config_dir=args.hf_config, iteration=args.iteration,
                               model_type_hf=args.model_type_hf, save_args=args.save_args,
                               verify_replicas=args.verify_replicas, lora_load=args.lora_load)


def args_layout(load_dir: str, iteration: str | None) -> dict:
    """The layout MindSpeed's generic converter records in the rank files' ``args`` (sizes, layer slots,
    num-layer-list, VPP, expert-TP), in the record's form; {} when the files hold no args.  Feature flags
    (grouped GEMM, MTP, dualpipev ...) are not in it: as with MindSpeed's mg->hf, they come from the command line."""
    from ..errors import StreamconvError
    from ..plan.mcore_source import read_args

    try:
        a = read_args(load_dir, iteration)
    except StreamconvError:
        return {}  # a missing tracker or a broken file: the planner reports it, naming the file
    if not a:
        return {}
    sizes = {k: a.get(f) for k, f in (("tp", "tensor_model_parallel_size"), ("pp", "pipeline_model_parallel_size"),
                                      ("ep", "expert_model_parallel_size")) if isinstance(a.get(f), int)}
    options = {}
    if a.get("num_layer_list"):
        options["num_layer_list"] = list(int_list(str(a["num_layer_list"])))
    elif isinstance(a.get("num_layers_per_virtual_pipeline_stage"), int):
        options["vpp_layers"] = a["num_layers_per_virtual_pipeline_stage"]
    if isinstance(a.get("num_layers"), int):
        options["num_layers"] = a["num_layers"]
    if a.get("expert_tensor_parallel_size") == 1 and sizes.get("tp", 1) > 1:
        options["expert_tensor_parallel_size"] = 1
    return {"sizes": sizes, "options": options}
