"""streamconv command line.

    streamconv synth    --save-dir DIR [--preset tiny] [--fp8]           make a DeepSeek-V3-shaped HF checkpoint
    streamconv plan     hf2mcore --load-dir HF --save-dir OUT -o plan.json  compile a plan (headers only)
    streamconv plan     mcore2hf --load-dir MCORE --save-dir HF -o plan.json  ... and the way back
    streamconv run      plan.json                                          execute a saved plan
    streamconv convert  hf2mcore|mcore2hf --load-dir A --save-dir B ...    plan and run in one step
    streamconv convert  mcore2mcore --load-dir MCORE --save-dir OUT --target-...   reshard in one pass
    streamconv convert  hf2zarr|mcore2zarr|zarr2hf --load-dir A --save-dir B   chunked zarr v3 stores
    streamconv convert  --load-model-type hf --save-model-type mg ...      the same, in convert_ckpt_v2.py's words
    streamconv verify   plan.json | SAVE_DIR [--rederive K]              checksums; tensors re-derived
    streamconv inspect  plan.json | HF_DIR | MCORE_DIR | DATASET_PREFIX    tables of files, tensors, bytes
    streamconv data     preprocess --input X --output-prefix P ...         corpora -> Megatron .bin/.idx datasets
    streamconv prepare-load plan.json --save-dir DIR                       a --load dir: ranks load from the source

Errors a user can cause print one line (what, where, the fix) and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .. import __version__
from ..errors import StreamconvError


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser; with ``command="data"`` only the dataset commands, whose import chain has no torch
    (the checkpoint commands import it, ~0.2 GB and 3 s before a tokenizer sees a row)."""
    parser = argparse.ArgumentParser(prog="streamconv", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"streamconv {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from . import data

    if command != "data":
        from . import commands, load, synth

        synth.register(sub)
        commands.register(sub)
        load.register(sub)
    data.register(sub)
    return parser


# MindSpeed-LLM's convert_ckpt_v2.py names a direction by two flags; ours by a word.
V2_DIRECTIONS = {("hf", "mg"): "hf2mcore", ("mg", "hf"): "mcore2hf", ("mg", "mg"): "mcore2mcore"}


def v2_synonym(argv: list[str]) -> list[str]:
    """``convert --load-model-type hf --save-model-type mg ...`` -> ``convert hf2mcore ...`` (and ``mg``/``hf``
    -> ``mcore2hf``; ``plan`` likewise), so convert_ckpt_v2.py scripts port by changing the program name."""
    words = [i for i, a in enumerate(argv) if not a.startswith("-")]
    if not words or argv[words[0]] not in ("convert", "plan"):
        return argv
    cmd = words[0]
    rest, given = list(argv[cmd + 1:]), {}
    for flag in ("--load-model-type", "--save-model-type"):
        for i, a in enumerate(rest):
            if a == flag and i + 1 < len(rest):
                given[flag] = rest[i + 1]
                del rest[i:i + 2]
                break
            if a.startswith(flag + "="):
                given[flag] = a.split("=", 1)[1]
                del rest[i]
                break
    if not given:
        return argv
    pair = (given.get("--load-model-type"), given.get("--save-model-type"))
    if pair not in V2_DIRECTIONS:
        raise StreamconvError(f"--load-model-type {pair[0]} --save-model-type {pair[1]}: streamconv converts hf -> "
                              f"mg, mg -> hf and mg -> mg (give both flags, or the direction word hf2mcore / mcore2hf "
                              f"/ mcore2mcore).")
    if rest and rest[0] in V2_DIRECTIONS.values():
        if rest[0] != V2_DIRECTIONS[pair]:
            raise StreamconvError(f"{rest[0]} contradicts --load-model-type {pair[0]} --save-model-type {pair[1]}.")
        rest = rest[1:]
    return argv[:cmd + 1] + [V2_DIRECTIONS[pair]] + rest


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv = v2_synonym(argv)
    except StreamconvError as exc:
        print(f"streamconv: error: {exc}", file=sys.stderr)
        return 2
    words = [a for a in argv if not a.startswith("-")]
    parser = build_parser(words[0] if words else None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("streamconv: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001  (no traceback reaches a user unless asked for)
        if args.debug:
            raise
        code, line = describe_error(exc)
        print(f"streamconv: error: {line}", file=sys.stderr)
        return code


def describe_error(exc: BaseException) -> tuple[int, str]:
    """(exit status, one line) for an exception: 2 for what the user can fix (bad input, a path, a flag),
    1 for a bug of ours (with the hint to rerun with --debug)."""
    if isinstance(exc, StreamconvError):
        return 2, str(exc)
    if isinstance(exc, OSError):
        where = exc.filename if exc.filename is not None else "a file"
        return 2, f"{where}: {exc.strerror or exc}. Check the path and its permissions."
    if isinstance(exc, RecursionError):
        return 2, "input nested too deeply to be a checkpoint, plan or dataset row."
    if isinstance(exc, MemoryError):
        return 2, "out of memory; lower --max-memory or check that the input is what you meant."
    first = (str(exc).splitlines() or [""])[0][:200]
    return 1, f"internal error ({type(exc).__name__}: {first}). Rerun with --debug for the traceback, and report it."


if __name__ == "__main__":
    sys.exit(main())
