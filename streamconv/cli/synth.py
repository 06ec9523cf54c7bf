"""`streamconv synth`: write a synthetic DeepSeek-V3-family HF checkpoint, deterministic from --seed.

    streamconv synth --save-dir tiny --preset tiny --fp8
    streamconv synth --save-dir ds-slice --preset 671b --num-hidden-layers 4 --n-routed-experts 16
    streamconv synth --save-dir ds-8g --target-size 8GB --fp8 --dry-run

The shape starts from --preset (default tiny) or from --target-size (a real-shaped slice, hidden 7168, sized to
land near the target); each shape flag then overrides one config.json field.
"""

from __future__ import annotations

import argparse
import dataclasses

from .. import synth
from ..errors import ValidationError
from .common import parse_size
from .report import human, table

# SynthConfig fields that describe the model's shape, each exposed as --<field-with-dashes>.
SHAPE_FIELDS = [f.name for f in dataclasses.fields(synth.SynthConfig)
                if f.name not in ("fp8", "seed", "max_shard_bytes")]


def register(sub) -> None:
    p = sub.add_parser("synth", help="write a synthetic DeepSeek-V3-shaped HF checkpoint (deterministic)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--save-dir", required=True, help="directory the checkpoint is written to (created if missing)")
    p.add_argument("--preset", choices=sorted(synth.PRESETS), default=None,
                   help="starting shape: tiny (~2.6 MB, the tests' model) or 671b (the real DeepSeek-V3 sizes); "
                        "default tiny")
    p.add_argument("--target-size", type=parse_size, default=None, metavar="SIZE",
                   help="start from a real-shaped slice (hidden 7168) sized near SIZE, e.g. 8GB; "
                        "excludes --preset")
    shape = p.add_argument_group("shape (each overrides the config.json field of the same name)")
    for name in SHAPE_FIELDS:
        shape.add_argument("--" + name.replace("_", "-"), dest=name, type=int, default=None, metavar="N")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--fp8", dest="fp8", action="store_true", default=None,
                     help="DeepSeek release format: float8_e4m3fn linears with 128x128 weight_scale_inv")
    fmt.add_argument("--bf16", dest="fp8", action="store_false", help="every weight in bfloat16")
    p.add_argument("--seed", type=int, default=None, help="equal seeds give byte-identical files (default 0)")
    p.add_argument("--max-shard-size", type=parse_size, default=None, metavar="SIZE",
                   help="start a new shard before exceeding SIZE, e.g. 512MiB (the default) or 5GB")
    p.add_argument("--dry-run", action="store_true", help="print the files, tensors and bytes; write nothing")
    p.add_argument("--headers-only", action="store_true",
                   help="real headers and sizes, no data (sparse files): enough to plan, e.g. the 671b preset")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> synth.SynthConfig:
    """The SynthConfig the flags describe: preset or target size, then per-field overrides."""
    if args.target_size is not None and args.preset is not None:
        raise ValidationError("--target-size and --preset both given (expected one). Drop one of them.")
    fp8 = args.fp8
    if args.target_size is not None:
        cfg = synth.synth_for_size(args.target_size, fp8=bool(fp8), seed=args.seed or 0)
    else:
        cfg = synth.PRESETS[args.preset or "tiny"]
    overrides = {name: getattr(args, name) for name in SHAPE_FIELDS if getattr(args, name) is not None}
    if fp8 is not None:
        overrides["fp8"] = fp8
    if args.seed is not None:
        overrides["seed"] = args.seed
    if args.max_shard_size is not None:
        overrides["max_shard_bytes"] = args.max_shard_size
    return dataclasses.replace(cfg, **overrides)


def describe(cfg: synth.SynthConfig) -> str:
    fmt = "fp8" if cfg.fp8 else "bf16"
    return (f"DeepSeek-V3 {fmt}: hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers "
            f"({cfg.first_k_dense_replace} dense) + {cfg.num_nextn_predict_layers} MTP, "
            f"{cfg.n_routed_experts} experts, vocab {cfg.vocab_size}, seed {cfg.seed}")


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if args.dry_run:
        shards = synth.plan_shards(cfg)
        rows = [(s.file_name, len(s.tensors), human(s.nbytes)) for s in shards]
        print(describe(cfg))
        print(table(rows, ("file", "tensors", "bytes")))
        total = sum(s.nbytes for s in shards)
        print(f"dry run: would write {synth.CONFIG_NAME}, {len(shards)} shards, {synth.INDEX_NAME} "
              f"({sum(len(s.tensors) for s in shards)} tensors, {human(total)}) to {args.save_dir}; nothing written")
        return 0
    summary = synth.synth_checkpoint(args.save_dir, cfg, headers_only=args.headers_only)
    print(f"wrote {summary['tensors']} tensors ({human(summary['bytes'])}) in {summary['shards']} shards to "
          f"{args.save_dir} [{describe(cfg)}]")
    return 0
