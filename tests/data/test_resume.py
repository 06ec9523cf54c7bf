"""A run killed with SIGKILL (mid-batch, right after a journaled batch, or in the middle of the final renames)
and then run again gives the same bytes as an uninterrupted run."""

import os
import subprocess
import sys

import pytest

from . import reference as ref
from .corpus import alpaca_rows, pretrain_texts, write_jsonl, write_parquet

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Runs the CLI in a child that SIGKILLs itself at the chosen point (no test hook in the product code).
KILLER = r"""
import os, signal, sys
where, n = sys.argv[1], int(sys.argv[2])
calls = [0]

def tick():
    calls[0] += 1
    if calls[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)

from streamconv.data import indexed, preprocess
if where == "append":             # tokens of a batch appended, not yet journaled
    orig = indexed.IndexedWriter.append
    def append(self, *a, **k):
        orig(self, *a, **k)
        tick()
    indexed.IndexedWriter.append = append
elif where == "journal":          # right after a batch's journal line
    orig = preprocess._append
    def journaled(path, record):
        orig(path, record)
        if record["kind"] == "batch":
            tick()
    preprocess._append = journaled
elif where == "commit":           # between the renames of the final files
    orig_replace = os.replace
    def replace(a, b):
        orig_replace(a, b)
        tick()
    indexed.os.replace = replace
# the data commands only (the full CLI parser also imports the checkpoint code, seconds of start-up)
import argparse
from streamconv.cli import data
from streamconv.errors import StreamconvError
parser = argparse.ArgumentParser()
data.register(parser.add_subparsers())
args = parser.parse_args(sys.argv[3:])
try:
    sys.exit(args.func(args))
except StreamconvError as exc:
    print(f"streamconv: error: {exc}", file=sys.stderr)
    sys.exit(2)
"""


def cli(args, kill=None):
    env = dict(os.environ, PYTHONPATH=ROOT)
    cmd = [sys.executable, "-c", KILLER, *(kill or ("none", "0")), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)


def pretrain_args(inp, tok_dir, prefix, workers=2):
    return ["data", "preprocess", "--input", inp, "--tokenizer-name-or-path", tok_dir, "--tokenizer-type",
            "PretrainedFromHF", "--handler-name", "GeneralPretrainHandler", "--output-prefix", prefix,
            "--json-keys", "text", "--append-eod", "--workers", str(workers), "--batch-rows", "10",
            "--log-interval", "0"]


@pytest.mark.parametrize("where, n", [("append", 4), ("journal", 3), ("commit", 1)])
def test_killed_pretrain_run_resumes_to_identical_bytes(tmp_path, tok_dir, where, n):
    rows = [{"text": t} for t in pretrain_texts(120)]
    inp = write_parquet(str(tmp_path / "c.parquet"), rows, row_group_size=13)
    full = cli(pretrain_args(inp, tok_dir, str(tmp_path / "full" / "p")))
    assert full.returncode == 0, full.stderr
    prefix = str(tmp_path / "killed" / "p")
    killed = cli(pretrain_args(inp, tok_dir, prefix), kill=(where, str(n)))
    assert killed.returncode == -9, killed.stderr
    left = os.listdir(tmp_path / "killed")
    assert "p.streamconv_data_journal.jsonl" in left
    assert "p_text_document.idx" not in left  # a killed run never looks complete
    resumed = cli(pretrain_args(inp, tok_dir, prefix, workers=1))
    assert resumed.returncode == 0, resumed.stderr
    if where != "commit":
        assert "resumed:" in resumed.stdout
    assert ref.read_pair(prefix + "_text_document") == ref.read_pair(str(tmp_path / "full" / "p_text_document"))
    assert sorted(os.listdir(tmp_path / "killed")) == ["p_text_document.bin", "p_text_document.idx"]


def test_killed_instruction_run_resumes(tmp_path, tok_dir):
    inp = write_jsonl(str(tmp_path / "a.jsonl"), alpaca_rows(90))

    def args(prefix):
        return ["data", "preprocess", "--input", inp, "--tokenizer-name-or-path", tok_dir, "--output-prefix", prefix,
                "--handler-name", "AlpacaStyleInstructionHandler", "--tokenizer-type", "PretrainedFromHF",
                "--workers", "2", "--log-interval", "0", "--overwrite-cache", "--prompt-type", "deepseek3",
                "--batch-rows", "8"]
    assert cli(args(str(tmp_path / "full" / "a"))).returncode == 0
    prefix = str(tmp_path / "killed" / "a")
    assert cli(args(prefix), kill=("append", "14")).returncode == -9  # 3 outputs: mid-batch, after 4 batches
    resumed = cli(args(prefix))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed: 4 of 12 batches" in resumed.stdout
    for name in ("input_ids", "attention_mask", "labels"):
        suffix = f"_packed_{name}_document"
        assert ref.read_pair(prefix + suffix) == ref.read_pair(str(tmp_path / "full" / "a") + suffix)


def test_journal_of_another_run_is_discarded(tmp_path, tok_dir):
    """Changed input after a kill: the stale partial files are not resumed but rewritten."""
    inp = str(tmp_path / "c.parquet")
    write_parquet(inp, [{"text": t} for t in pretrain_texts(60)])
    prefix = str(tmp_path / "out" / "p")
    assert cli(pretrain_args(inp, tok_dir, prefix), kill=("journal", "2")).returncode == -9
    rows = [{"text": t} for t in pretrain_texts(50, seed=9)]
    write_parquet(inp, rows)
    again = cli(pretrain_args(inp, tok_dir, prefix))
    assert again.returncode == 0 and "resumed" not in again.stdout
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))
    assert ref.read_pair(prefix + "_text_document") == ref.indexed_bytes(ref.pretrain_docs(rows, tok))
