"""The command line: the two training-flow scripts' flags (spec §9.1) port by changing the program name;
errors are one line with exit status 2; inspect shows a dataset."""

import pytest

from streamconv.cli.main import main

from . import reference as ref
from .corpus import alpaca_rows, pretrain_texts, write_jsonl, write_parquet


@pytest.fixture
def pretrain_run(tmp_path, tok_dir):
    rows = [{"text": t} for t in pretrain_texts(40)]
    inp = write_parquet(str(tmp_path / "train-00000-of-00042.parquet"), rows)
    prefix = str(tmp_path / "dataset" / "enwiki")
    argv = ["data", "preprocess", "--input", inp, "--tokenizer-name-or-path", tok_dir,
            "--tokenizer-type", "PretrainedFromHF", "--handler-name", "GeneralPretrainHandler",
            "--output-prefix", prefix, "--json-keys", "text", "--workers", "4", "--log-interval", "10",
            "--append-eod", "--batch-rows", "10"]
    return rows, argv, prefix


def test_pretrain_script(pretrain_run, hf_tok, capsys):
    rows, argv, prefix = pretrain_run
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "40 rows ->" in out and "enwiki_text_document.bin" in out
    assert err.count("processed ") == 4  # --log-interval 10 rows
    assert ref.read_pair(prefix + "_text_document") == ref.indexed_bytes(ref.pretrain_docs(rows, hf_tok))


def test_instruction_script(tmp_path, tok_dir, hf_tok, capsys):
    rows = alpaca_rows(30)
    inp = write_parquet(str(tmp_path / "train-00000-of-00001.parquet"), rows)
    prefix = str(tmp_path / "finetune_dataset" / "alpaca")
    assert main(["data", "preprocess", "--input", inp, "--tokenizer-name-or-path", tok_dir, "--output-prefix", prefix,
                 "--handler-name", "AlpacaStyleInstructionHandler", "--tokenizer-type", "PretrainedFromHF",
                 "--workers", "4", "--log-interval", "1000", "--overwrite-cache", "--prompt-type", "deepseek3"]) == 0
    out = capsys.readouterr().out
    assert "rows with a null output dropped" in out
    samples = ref.instruction_samples(rows, hf_tok)
    assert ref.read_pair(prefix + "_packed_labels_document") == ref.indexed_bytes([s[1] for s in samples])

    assert main(["data", "inspect", prefix, "--tokenizer-name-or-path", tok_dir, "--samples", "1"]) == 0
    shown = capsys.readouterr().out
    for name in ("attention_mask", "input_ids", "labels"):
        assert f"alpaca_packed_{name}_document" in shown
    assert f"sequences {len(samples)}, documents {len(samples)} (one sequence each)" in shown
    assert "ignored labels" in shown


def test_bad_row_is_one_line_and_exit_2(tmp_path, tok_dir, capsys):
    inp = write_jsonl(str(tmp_path / "x.jsonl"), [{"text": "a"}, {"text": None}])
    code = main(["data", "preprocess", "--input", inp, "--tokenizer-name-or-path", tok_dir,
                 "--output-prefix", str(tmp_path / "o"), "--log-interval", "0"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"streamconv: error: {inp}: row 1 (line 2): column 'text' is null") and err.count("\n") == 1


def test_inspect_shows_counts_histogram_and_text(pretrain_run, tok_dir, capsys):
    rows, argv, prefix = pretrain_run
    assert main(argv) == 0
    capsys.readouterr()
    assert main(["data", "inspect", prefix + "_text_document.idx", "--tokenizer-name-or-path", tok_dir]) == 0
    out = capsys.readouterr().out
    docs = [r["text"] for r in rows if r["text"]]
    assert f"sequences {len(docs)}, documents {len(docs)} (one sequence each)" in out
    assert "lengths (tokens)" in out and "#" in out
    assert repr("<｜begin▁of▁sentence｜>" + docs[0] + "<｜end▁of▁sentence｜>")[:60] in out
    # the checkpoint `inspect` command recognises a dataset too (ids only, no tokenizer)
    assert main(["inspect", prefix + "_text_document"]) == 0
    assert f"sequences {len(docs)}" in capsys.readouterr().out


def test_inspect_of_nothing_is_an_error(tmp_path, capsys):
    assert main(["data", "inspect", str(tmp_path / "none")]) == 2
    assert "no indexed dataset" in capsys.readouterr().err
