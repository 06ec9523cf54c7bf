"""`streamconv synth`: write a synthetic HF checkpoint of a registered model family, deterministic from --seed.

    streamconv synth --save-dir tiny --preset tiny --fp8
    streamconv synth --save-dir ds-slice --preset 671b --num-hidden-layers 4 --n-routed-experts 16
    streamconv synth --save-dir ds-8g --target-size 8GB --fp8 --dry-run
    streamconv synth --save-dir qwen --model-type qwen3_moe --preset tiny

The family is --model-type (default deepseek_v3).  The shape starts from --preset (default tiny) or from
--target-size (a real-shaped slice of the family's full-size preset, sized to land near the target); each shape
flag then overrides one config.json field.
"""

from __future__ import annotations

import argparse
import dataclasses

from .. import synth
from ..errors import ValidationError
from ..models import model_named, models
from .common import parse_size
from .report import human, table

# Config fields that describe a model's shape (every registered family's), each exposed as --<field-with-dashes>.
SHAPE_FIELDS = list(dict.fromkeys(f.name for spec in models() for f in dataclasses.fields(spec.config_class)
                                  if f.name != "fp8"))


def register(sub) -> None:
    p = sub.add_parser("synth", help="write a synthetic DeepSeek-V3-shaped HF checkpoint (deterministic)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--save-dir", required=True, help="directory the checkpoint is written to (created if missing)")
    p.add_argument("--model-type", default="deepseek_v3", choices=sorted(spec.name for spec in models()),
                   help="the model family (config.json model_type; default deepseek_v3)")
    p.add_argument("--preset", choices=sorted({name for spec in models() for name in spec.presets}), default=None,
                   help="starting shape: tiny (a few MB, the tests' model) or the family's real sizes (671b for "
                        "DeepSeek-V3); default tiny")
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


def config_from_args(args: argparse.Namespace):
    """The SynthConfig the flags describe: preset or target size, then per-field overrides."""
    if args.target_size is not None and args.preset is not None:
        raise ValidationError("--target-size and --preset both given (expected one). Drop one of them.")
    fp8 = args.fp8
    family = getattr(args, "model_type", None) or "deepseek_v3"
    spec = model_named(family)
    if args.target_size is not None:
        cfg = synth.synth_for_size(args.target_size, fp8=bool(fp8), seed=args.seed or 0, family=family)
    else:
        cfg = synth.preset(args.preset or "tiny", family)
    own = {f.name for f in dataclasses.fields(spec.config_class)}
    overrides = {name: getattr(args, name) for name in SHAPE_FIELDS if getattr(args, name) is not None}
    foreign = sorted(name for name in overrides if name not in own)
    if foreign:
        raise ValidationError(f"--{foreign[0].replace('_', '-')}: not a {spec.title} config field (the "
                              f"{family} fields: {', '.join(sorted(own - {'fp8'}))}).")
    if fp8 is not None:
        overrides["fp8"] = fp8
    if args.seed is not None:
        overrides["seed"] = args.seed
    if args.max_shard_size is not None:
        overrides["max_shard_bytes"] = args.max_shard_size
    return dataclasses.replace(cfg, **overrides)


def describe(cfg) -> str:
    fmt = "fp8" if cfg.fp8 else "bf16"
    return (f"{synth.family_of(cfg).title} {fmt}: hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers "
            f"({cfg.first_dense} dense) + {cfg.mtp_layers} MTP, "
            f"{cfg.num_experts} experts, vocab {cfg.vocab_size}, seed {cfg.seed}")


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
