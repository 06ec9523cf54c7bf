"""Every class of bad file, path or flag gets one line (what, where, the fix) and exit status 2, and nothing is
written: paths that are directories, FIFOs or symlinks, text that is not UTF-8 or not the JSON expected, input
nested 100k deep, an unwritable save dir, a bad --scheduler; --debug shows the traceback instead."""

import json
import os
import zipfile

import pytest

from streamconv.cli.main import main

from .conftest import copy_tree, one_error

DEEP = "[" * 100_000 + "]" * 100_000


def hf_copy(world, tmp_path):
    return copy_tree(world["hf"], tmp_path / "hf")


def plan_hf(cli, hf, tmp_path, *extra):
    return cli("plan", "hf2mcore", "--load-dir", hf, "--save-dir", tmp_path / "out", "-o", tmp_path / "p.json", *extra)


def replace_with_dir(path):
    os.remove(path)
    os.mkdir(path)


@pytest.mark.parametrize("change, fragment", [
    (lambda hf: replace_with_dir(os.path.join(hf, "config.json")), "is a directory, expected the config.json"),
    (lambda hf: replace_with_dir(os.path.join(hf, "model.safetensors.index.json")),
     "is a directory, expected the safetensors index"),
    (lambda hf: open(os.path.join(hf, "config.json"), "wb").write(b"\xff\xfe\x00{"), "not UTF-8"),
    (lambda hf: open(os.path.join(hf, "config.json"), "w").write("[1, 2]"), "a JSON list, expected the config.json"),
    (lambda hf: open(os.path.join(hf, "config.json"), "w").write(DEEP), "nested too deeply"),
    (lambda hf: json.dump({"weight_map": {"lm_head.weight": 7}}, open(os.path.join(hf, "model.safetensors.index.json"), "w")),
     "not a valid safetensors index"),
    (lambda hf: open(os.path.join(hf, "model.safetensors.index.json"), "w").write("{\"weight_map\": [1]}"),
     "not a valid safetensors index"),
])
def test_bad_hf_directory_files(world, tmp_path, cli, change, fragment):
    hf = hf_copy(world, tmp_path)
    change(hf)
    one_error(*plan_hf(cli, hf, tmp_path), fragment)
    assert not (tmp_path / "p.json").exists() and not (tmp_path / "out").exists()


def test_shard_that_is_a_directory(world, tmp_path, cli):
    hf = hf_copy(world, tmp_path)
    shard = sorted(f for f in os.listdir(hf) if f.endswith(".safetensors"))[0]
    replace_with_dir(os.path.join(hf, shard))
    code, err = plan_hf(cli, hf, tmp_path)
    one_error(code, err, shard)
    assert "Errno" not in err[0]


def test_plan_output_that_is_a_directory(world, tmp_path, cli):
    code, err = cli("plan", "hf2mcore", "--load-dir", world["hf"], "--save-dir", tmp_path / "out", "-o", tmp_path)
    one_error(code, err, "is a directory; give the plan a file name")


@pytest.mark.parametrize("kind", ["dir", "not-a-number", "binary"])
def test_bad_tracker(world, tmp_path, cli, kind):
    mcore = copy_tree(world["mcore"], tmp_path / "mcore")
    tracker = os.path.join(mcore, "latest_checkpointed_iteration.txt")
    if kind == "dir":
        replace_with_dir(tracker)
    else:
        open(tracker, "wb").write(b"abc" if kind == "not-a-number" else b"\xff\x00\x01")
    one_error(*cli("convert", "mcore2hf", "--load-dir", mcore, "--save-dir", tmp_path / "out", "--no-progress"),
              "latest_checkpointed_iteration.txt")
    assert not (tmp_path / "out").exists()


def test_rank_file_pickle_nested_deep(world, tmp_path, cli):
    mcore = copy_tree(world["mcore"], tmp_path / "mcore")
    n = 100_000  # {"model": {"x": {"x": ...}}} written opcode by opcode (Python's pickler would recurse)
    data = b"\x80\x02}X\x05\x00\x00\x00model}" + b"X\x01\x00\x00\x00x}" * n + b"s" * (n + 1) + b"."
    with zipfile.ZipFile(os.path.join(mcore, "iter_0000001", "mp_rank_00_000", "model_optim_rng.pt"), "w") as z:
        z.writestr("archive/data.pkl", data)
    one_error(*cli("convert", "mcore2hf", "--load-dir", mcore, "--save-dir", tmp_path / "out", "--no-progress"),
              "model_optim_rng.pt")
    assert not (tmp_path / "out").exists()


def test_damaged_journal_line(world, tmp_path, cli):
    out = str(tmp_path / "out")
    assert cli("convert", "hf2mcore", "--load-dir", world["hf"], "--save-dir", out, "--no-progress")[0] == 0
    journal = os.path.join(out, ".streamconv_journal.jsonl")
    lines = open(journal).read().splitlines()
    lines.insert(1, "\xff not json")
    open(journal, "w").write("\n".join(lines) + "\n")
    one_error(*cli("convert", "hf2mcore", "--load-dir", world["hf"], "--save-dir", out, "--no-progress"),
              ".streamconv_journal.jsonl: line 2 is not JSON")


def test_unwritable_save_dir(world, tmp_path, cli):
    # /proc refuses new entries even to root, like a read-only mount
    one_error(*cli("convert", "hf2mcore", "--load-dir", world["hf"], "--save-dir", "/proc/streamconv-test",
                   "--no-progress"), "/proc/streamconv-test")


def test_unwritable_dataset_output(tmp_path, cli):
    from tests.data.corpus import build_tokenizer, write_jsonl

    tok = build_tokenizer(str(tmp_path / "tok"))
    data = write_jsonl(str(tmp_path / "d.jsonl"), [{"text": "hello world"}])
    one_error(*cli("data", "preprocess", "--input", data, "--tokenizer-name-or-path", tok, "--output-prefix",
                   "/proc/streamconv-test/ds"), "/proc/streamconv-test")


def test_dataset_row_nested_deep(tmp_path, cli):
    from tests.data.corpus import build_tokenizer

    tok = build_tokenizer(str(tmp_path / "tok"))
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n{"text": ' + DEEP + "}\n")
    one_error(*cli("data", "preprocess", "--input", tmp_path / "d.jsonl", "--tokenizer-name-or-path", tok,
                   "--output-prefix", tmp_path / "out" / "ds"), "d.jsonl: line 2: JSON nested too deeply")
    assert not (tmp_path / "out").exists()


def test_data_preprocess_dry_run_writes_nothing(tmp_path, cli):
    from tests.data.corpus import build_tokenizer, write_jsonl

    tok = build_tokenizer(str(tmp_path / "tok"))
    data = write_jsonl(str(tmp_path / "d.jsonl"), [{"text": "hello world"}])
    code, err = cli("data", "preprocess", "--input", data, "--tokenizer-name-or-path", tok, "--output-prefix",
                    tmp_path / "out" / "ds", "--dry-run")
    assert code == 0 and "nothing written" in cli.out and not (tmp_path / "out").exists()


@pytest.mark.parametrize("address", ["not-an-address", "tcp://127.0.0.1:9"])
def test_bad_scheduler_address(world, tmp_path, cli, address):
    code, err = cli("convert", "hf2mcore", "--load-dir", world["hf"], "--save-dir", tmp_path / "out", "--scheduler",
                    address, "--plan-output", tmp_path / "p.json", "--no-progress")
    one_error(code, err, f"--scheduler {address}: cannot connect")
    assert not (tmp_path / "out").exists() and not (tmp_path / "p.json").exists()


def test_plan_output_only_when_the_run_is_accepted(world, tmp_path, cli):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    code, err = cli("convert", "hf2mcore", "--load-dir", world["hf"], "--save-dir", tmp_path / "out",
                    "--plan-output", tmp_path / "p.json", "--no-progress")
    one_error(code, err, "output directory is not empty")
    assert not (tmp_path / "p.json").exists()
    code, err = cli("convert", "hf2mcore", "--load-dir", world["hf"], "--save-dir", tmp_path / "o2",
                    "--plan-output", tmp_path / "p.json", "--dry-run")
    assert code == 0 and (tmp_path / "p.json").exists() and not (tmp_path / "o2").exists()


def test_debug_shows_the_traceback(tmp_path):
    (tmp_path / "plan.json").write_text("[]")
    with pytest.raises(Exception):
        main(["--debug", "run", str(tmp_path / "plan.json")])


def test_fifos_where_files_belong(world, tmp_path, cli):
    """A FIFO is never opened for reading (that would block until a writer came)."""
    hf = hf_copy(world, tmp_path)
    shard = sorted(f for f in os.listdir(hf) if f.endswith(".safetensors"))[0]
    os.remove(os.path.join(hf, shard))
    os.mkfifo(os.path.join(hf, shard))
    one_error(*plan_hf(cli, hf, tmp_path), shard, "not a regular file")
    mcore = copy_tree(world["mcore"], tmp_path / "mcore")
    rank = os.path.join(mcore, "iter_0000001", "mp_rank_00_000", "model_optim_rng.pt")
    os.remove(rank)
    os.mkfifo(rank)
    one_error(*cli("convert", "mcore2hf", "--load-dir", mcore, "--save-dir", tmp_path / "out", "--no-progress"),
              "not a regular file")
    one_error(*cli("inspect", rank), "not a regular file")
