"""AlpacaStyleInstructionHandler with the deepseek3 template: byte equality of the three packed datasets with
the eager reference; null outputs dropped; history/system only through --map-keys; truncation."""

import json

import numpy as np
import pytest

from streamconv.data.preprocess import PreprocessOptions, preprocess
from streamconv.errors import StreamconvError, ValidationError

from . import reference as ref
from .corpus import ASSISTANT, USER, alpaca_rows, write_jsonl, write_parquet

NAMES = ("input_ids", "attention_mask", "labels")


def run(tmp_path, inp, tok_dir, name="sft", **kw):
    kw.setdefault("prompt_type", "deepseek3")
    kw.setdefault("log_interval", 0)
    opts = PreprocessOptions(input=str(inp), tokenizer_name_or_path=tok_dir,
                             output_prefix=str(tmp_path / name / "alpaca"),
                             handler_name="AlpacaStyleInstructionHandler", **kw)
    result = preprocess(opts)
    return result, {n: str(tmp_path / name / f"alpaca_packed_{n}_document") for n in NAMES}


def expected(samples):
    return {"input_ids": ref.indexed_bytes([s[0] for s in samples]),
            "attention_mask": ref.indexed_bytes([[1] * len(s[0]) for s in samples]),
            "labels": ref.indexed_bytes([s[1] for s in samples])}


def check(prefixes, samples):
    want = expected(samples)
    for n in NAMES:
        assert ref.read_pair(prefixes[n]) == want[n], n


def test_bytes_equal_the_reference(tmp_path, tok_dir, hf_tok):
    rows = alpaca_rows(120)
    path = write_parquet(str(tmp_path / "alpaca.parquet"), rows)
    result, prefixes = run(tmp_path, path, tok_dir, workers=2, batch_rows=11)
    samples = ref.instruction_samples(rows, hf_tok)
    check(prefixes, samples)
    nulls = sum(r["output"] is None for r in rows)
    assert nulls > 0 and result.counts["dropped_null_output"] == nulls and result.counts["documents"] == len(samples)


def test_sample_layout_by_hand(tmp_path, tok_dir, hf_tok):
    """One row spelled out: [BOS] + ids(<｜User｜>instruction\\ninput<｜Assistant｜>), then ids(output) + [EOS]."""
    rows = [{"instruction": "add", "input": "1 2", "output": "3"}, {"instruction": None, "input": None, "output": ""}]
    path = write_jsonl(str(tmp_path / "one.jsonl"), rows)
    _, prefixes = run(tmp_path, path, tok_dir)
    source = [0] + hf_tok.encode(USER + "add\n1 2" + ASSISTANT, add_special_tokens=False).ids
    target = hf_tok.encode("3", add_special_tokens=False).ids + [1]
    from streamconv.data.indexed import IndexedReader

    ids, labels = IndexedReader(prefixes["input_ids"]), IndexedReader(prefixes["labels"])
    assert ids[0].tolist() == source + target
    assert labels[0].tolist() == [-100] * len(source) + target
    assert ids[1].tolist() == [0, 2, 3, 1] and labels[1].tolist() == [-100, -100, -100, 1]  # empty parts, empty output


def test_history_and_system_only_with_map_keys(tmp_path, tok_dir, hf_tok):
    rows = alpaca_rows(60, history=True)
    path = write_jsonl(str(tmp_path / "h.jsonl"), rows)
    # the training script's flags: history and system columns are not read
    _, plain = run(tmp_path, path, tok_dir, name="plain", batch_rows=7)
    check(plain, ref.instruction_samples(rows, hf_tok))
    keys = {"prompt": "instruction", "query": "input", "response": "output", "system": "system", "history": "history"}
    _, mapped = run(tmp_path, path, tok_dir, name="mapped", batch_rows=7, workers=2, map_keys=json.dumps(keys))
    samples = ref.instruction_samples(rows, hf_tok, history_key="history", system_key="system")
    check(mapped, samples)
    assert samples != ref.instruction_samples(rows, hf_tok)  # the corpus really has history and system text


def test_map_keys_renames_columns(tmp_path, tok_dir, hf_tok):
    rows = alpaca_rows(30)
    renamed = [{"q": r["instruction"], "ctx": r["input"], "a": r["output"]} for r in rows]
    path = write_parquet(str(tmp_path / "r.parquet"), renamed)
    _, prefixes = run(tmp_path, path, tok_dir, map_keys='{"prompt": "q", "query": "ctx", "response": "a"}')
    check(prefixes, ref.instruction_samples(rows, hf_tok))


@pytest.mark.parametrize("seq_length", [5, 12, 40])
def test_truncation_with_seq_length(tmp_path, tok_dir, hf_tok, seq_length):
    rows = alpaca_rows(40, history=True)
    path = write_jsonl(str(tmp_path / "t.jsonl"), rows)
    keys = '{"history": "history"}'
    _, prefixes = run(tmp_path, path, tok_dir, seq_length=seq_length, map_keys=keys)
    samples = ref.instruction_samples(rows, hf_tok, cutoff=seq_length, history_key="history")
    check(prefixes, samples)
    lengths = np.array([len(s[0]) for s in samples])
    assert lengths.max() <= seq_length and (lengths == seq_length).any()


def test_unknown_prompt_type_lists_the_known_ones(tmp_path, tok_dir):
    path = write_jsonl(str(tmp_path / "u.jsonl"), alpaca_rows(3))
    with pytest.raises(ValidationError, match=r"--prompt-type 'llama9': unknown prompt type \(known: deepseek3\)"):
        run(tmp_path, path, tok_dir, prompt_type="llama9")
    with pytest.raises(ValidationError, match="unknown role 'answer'"):
        run(tmp_path, path, tok_dir, map_keys='{"answer": "output"}')
    with pytest.raises(ValidationError, match="--map-keys: not valid JSON"):
        run(tmp_path, path, tok_dir, map_keys="{prompt: instruction}")
    assert not (tmp_path / "sft").exists()


def test_bad_rows(tmp_path, tok_dir, hf_tok):
    rows = alpaca_rows(20)
    rows[7]["instruction"] = ["not", "text"]
    path = write_jsonl(str(tmp_path / "b.jsonl"), rows)
    with pytest.raises(StreamconvError, match=r"b.jsonl: row 7 \(line 8\): column 'instruction' holds a list"):
        run(tmp_path, path, tok_dir)
    assert not (tmp_path / "sft").exists()  # a refused run leaves nothing, not even the directory
    result, prefixes = run(tmp_path, path, tok_dir, skip_bad_rows=True)
    assert result.counts["skipped_bad_rows"] == 1
    check(prefixes, ref.instruction_samples(rows[:7] + rows[8:], hf_tok))
