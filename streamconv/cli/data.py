"""`streamconv data`: text corpora to Megatron indexed datasets, with MindSpeed-LLM preprocess_data.py's flags.

    streamconv data preprocess --input train.parquet --tokenizer-name-or-path ./deepseek3-hf \\
        --tokenizer-type PretrainedFromHF --handler-name GeneralPretrainHandler \\
        --output-prefix ./dataset/enwiki --json-keys text --workers 4 --log-interval 1000 --append-eod
    streamconv data preprocess --input alpaca.parquet --tokenizer-name-or-path ./deepseek3-hf \\
        --output-prefix ./finetune_dataset/alpaca --handler-name AlpacaStyleInstructionHandler \\
        --tokenizer-type PretrainedFromHF --workers 4 --log-interval 1000 --overwrite-cache --prompt-type deepseek3
    streamconv data inspect ./dataset/enwiki_text_document [--tokenizer-name-or-path DIR] [--samples 3]

Pretrain writes PREFIX_text_document.{bin,idx} (one per --json-keys key); instruction writes
PREFIX_packed_{input_ids,attention_mask,labels}_document.{bin,idx}.  A killed run resumes when run again.
"""

from __future__ import annotations

import argparse
import os

from ..data import handlers
from .common import parse_size


def register(sub) -> None:
    d = sub.add_parser("data", help="tokenize corpora into Megatron indexed datasets (.bin/.idx); inspect them",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    p = dsub.add_parser("preprocess", help="tokenize parquet / JSON / JSONL into .bin/.idx (preprocess_data flags)",
                        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="a .parquet, .jsonl or .json file, or a directory of them")
    p.add_argument("--tokenizer-name-or-path", required=True, metavar="DIR",
                   help="local HF tokenizer directory (tokenizer.json, tokenizer_config.json); nothing is downloaded")
    p.add_argument("--tokenizer-type", default="PretrainedFromHF", help="PretrainedFromHF (the only type)")
    p.add_argument("--handler-name", default=handlers.PRETRAIN, choices=handlers.HANDLERS)
    p.add_argument("--output-prefix", required=True, help="path prefix of the output datasets")
    p.add_argument("--json-keys", nargs="+", default=["text"],
                   help="text columns of the pretrain handler (default text)")
    p.add_argument("--append-eod", action="store_true", help="pretrain: append the eos id to every document")
    p.add_argument("--prompt-type", default=None, help="instruction template, e.g. deepseek3")
    p.add_argument("--map-keys", default=None, metavar="JSON",
                   help='instruction columns, e.g. \'{"prompt":"instruction","query":"input","response":"output",'
                        '"system":"system","history":"history"}\' (history and system are read only when named)')
    p.add_argument("--seq-length", type=int, default=None,
                   help="instruction: truncate each sample to this many tokens (default: the reference's 100000)")
    p.add_argument("--workers", type=int, default=1, help="tokenizing threads (default 1)")
    p.add_argument("--log-interval", type=int, default=1000, help="rows between progress lines on stderr (0: none)")
    p.add_argument("--max-row-bytes", type=parse_size, default=handlers.DEFAULT_MAX_ROW_BYTES, metavar="SIZE",
                   help="a row with more text than this (default 32MiB) is a bad row: an error naming it, or dropped "
                        "with --skip-bad-rows")
    p.add_argument("--dry-run", action="store_true",
                   help="check flags, tokenizer and inputs; print the outputs that would be written; write nothing")
    p.add_argument("--skip-bad-rows", action="store_true",
                   help="drop rows with a null or non-string text (counted) instead of failing on the first one")
    p.add_argument("--batch-rows", type=int, default=1000,
                   help="rows per batch: the unit of parallel work and of resume (default 1000)")
    p.add_argument("--scheduler", choices=["threads", "sync"], default="threads",
                   help="threads (default) or sync (one thread, for debugging)")
    p.add_argument("--overwrite-cache", action="store_true", help="accepted for compatibility (there is no cache)")
    p.set_defaults(func=cmd_preprocess)

    i = dsub.add_parser("inspect", help="counts, length histogram and first samples of an indexed dataset")
    i.add_argument("path", help="dataset prefix (P for P.bin/P.idx), a .idx/.bin file, or the --output-prefix of a run")
    i.add_argument("--tokenizer-name-or-path", default=None, metavar="DIR", help="detokenize the samples shown")
    i.add_argument("--samples", type=int, default=3, help="samples to show (default 3)")
    i.set_defaults(func=cmd_inspect)


def options_from_args(args):
    from ..data.preprocess import PreprocessOptions

    return PreprocessOptions(input=args.input, tokenizer_name_or_path=args.tokenizer_name_or_path,
                             output_prefix=args.output_prefix, handler_name=args.handler_name,
                             tokenizer_type=args.tokenizer_type, json_keys=tuple(args.json_keys),
                             append_eod=args.append_eod, prompt_type=args.prompt_type, map_keys=args.map_keys,
                             seq_length=args.seq_length, skip_bad_rows=args.skip_bad_rows, workers=args.workers,
                             scheduler=args.scheduler, batch_rows=args.batch_rows, log_interval=args.log_interval,
                             max_row_bytes=args.max_row_bytes)


def cmd_preprocess(args) -> int:
    from ..data.preprocess import check, preprocess

    opts = options_from_args(args)
    if args.dry_run:
        _, files, skipped, prefixes = check(opts)
        print(f"{len(files)} input file(s) checked{f', {len(skipped)} skipped' if skipped else ''}; would write:")
        for prefix in prefixes.values():
            print(f"  {prefix}.bin and .idx")
        print("dry run: nothing written")
        return 0
    result = preprocess(opts)
    c = result.counts
    for f in result.skipped_files:
        print(f"skipped (not .parquet/.jsonl/.json): {f}")
    if result.resumed_batches:
        print(f"resumed: {result.resumed_batches} of {result.batches} batches were done by an earlier run")
    extra = []
    if c.get("skipped_bad_rows"):
        extra.append(f"{c['skipped_bad_rows']} bad rows skipped")
    if c.get("dropped_null_output"):
        extra.append(f"{c['dropped_null_output']} rows with a null output dropped")
    print(f"{c['rows']} rows -> {c['documents']} documents, {c['tokens']} tokens in {result.seconds:.1f} s"
          + (f" ({'; '.join(extra)})" if extra else ""))
    for prefix in result.outputs.values():
        print(f"  {prefix}.bin ({os.path.getsize(prefix + '.bin') / 1e6:.2f} MB) and .idx")
    return 0


def cmd_inspect(args) -> int:
    from ..data.inspect import inspect_datasets

    print(inspect_datasets(args.path, tokenizer_path=args.tokenizer_name_or_path, samples=args.samples))
    return 0
