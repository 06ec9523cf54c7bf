"""Small inputs that used to hang or grow without bound finish fast with one error: a pickle whose dicts share
children (2**40 paths in 500 bytes), a config.json with an absurd layer count, a tracker that is /dev/zero or
a FIFO, a 100 MB dataset row.  Time and memory are measured in a child process."""

import io
import json
import os
import pickle
import subprocess
import sys
import time
import zipfile

import pytest

from .conftest import copy_tree, one_error

PROBE = """
import json, resource, sys, time
from streamconv.cli.main import main, build_parser
build_parser(sys.argv[1] if sys.argv[1] == "data" else None)   # the imports a run makes, before measuring
if sys.argv[1] != "data":
    import streamconv.cli.commands, streamconv.plan.mcore2hf, streamconv.storage.registry  # noqa: E401
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.monotonic()
code = main(sys.argv[1:])
print(json.dumps({"code": code, "seconds": time.monotonic() - start,
                  "growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def probe(*argv):
    """Run the CLI in a grandchild under /usr/bin/time; returns (result dict, stderr lines).  ``growth_mb`` is
    the peak RSS beyond what the imports took (torch alone is ~0.25 GB for the checkpoint commands); ``peak_mb``
    the whole process's as the OS reports it.  (Linux carries the maximum RSS across exec, so a child forked
    straight from this large test process would report ours: /usr/bin/time is the small parent in between.)"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd()] + sys.path))
    r = subprocess.run(["/usr/bin/time", "-f", "peak_kb=%M", sys.executable, "-c", PROBE, *map(str, argv)],
                       capture_output=True, text=True, env=env, timeout=60)
    result = json.loads(r.stdout.strip().splitlines()[-1])
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    result["peak_mb"] = int(next(x for x in lines if x.startswith("peak_kb="))[8:]) / 1024
    return result, [x for x in lines if not x.startswith("peak_kb=")]


def bounded(result, err, fragment):
    one_error(result["code"], err, fragment)
    assert result["seconds"] < 5, result
    assert result["growth_mb"] < 200, result


def pickle_bomb(path):
    d = {"x": 1}
    for _ in range(40):
        d = {"a": d, "b": d}
    buf = io.BytesIO()
    pickle.Pickler(buf, protocol=2).dump({"model": d, "checkpoint_version": 3.0})
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/version", "3\n")


def test_pickle_bomb_in_inspect(tmp_path):
    pickle_bomb(tmp_path / "bomb.pt")
    bounded(*probe("inspect", tmp_path / "bomb.pt"), "pickle bomb")


def timed(cli, *argv):
    """In this process (the child-process probe is for memory claims): (result, stderr lines) like probe's."""
    start = time.monotonic()
    code, err = cli(*argv)
    return {"code": code, "seconds": time.monotonic() - start, "growth_mb": 0}, err


def test_pickle_bomb_in_mcore2hf(world, tmp_path, cli):
    mcore = copy_tree(world["mcore"], tmp_path / "mcore")
    pickle_bomb(os.path.join(mcore, "iter_0000001", "mp_rank_00_000", "model_optim_rng.pt"))
    bounded(*timed(cli, "convert", "mcore2hf", "--load-dir", mcore, "--save-dir", tmp_path / "out", "--no-progress"),
            "pickle bomb")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", [10**12, 1e12, 2**62])
def test_absurd_layer_count(world, tmp_path, cli, value):
    hf = copy_tree(world["hf"], tmp_path / "hf")
    cfg = json.load(open(os.path.join(hf, "config.json")))
    cfg["num_hidden_layers"] = value
    json.dump(cfg, open(os.path.join(hf, "config.json"), "w"))
    result, err = timed(cli, "plan", "hf2mcore", "--load-dir", hf, "--save-dir", tmp_path / "o", "-o",
                        tmp_path / "p.json")
    bounded(result, err, "num_hidden_layers")
    assert not (tmp_path / "p.json").exists()


def not_a_file(path, kind):
    """Replace the file at ``path`` by a FIFO or a symlink to /dev/zero (reading either never ends)."""
    os.remove(path)
    if kind == "fifo":
        os.mkfifo(path)
    else:
        os.symlink("/dev/zero", path)


@pytest.mark.parametrize("kind", ["dev-zero", "fifo"])
def test_tracker_that_is_not_a_file(world, tmp_path, cli, kind):
    mcore = copy_tree(world["mcore"], tmp_path / "mcore")
    not_a_file(os.path.join(mcore, "latest_checkpointed_iteration.txt"), kind)
    bounded(*timed(cli, "convert", "mcore2hf", "--load-dir", mcore, "--save-dir", tmp_path / "out", "--no-progress"),
            "not a regular file")


def test_a_100mb_dataset_row(tmp_path):
    from tests.data.corpus import build_tokenizer

    tok = build_tokenizer(str(tmp_path / "tok"))
    with open(tmp_path / "big.jsonl", "w") as f:
        f.write(json.dumps({"text": "hello"}) + "\n" + json.dumps({"text": "x" * (100 << 20)}) + "\n")
    result, err = probe("data", "preprocess", "--input", tmp_path / "big.jsonl", "--tokenizer-name-or-path", tok,
                        "--output-prefix", tmp_path / "out" / "ds")
    bounded(result, err, "row 1 (line 2): the row is 104857")
    assert result["peak_mb"] < 200, result  # the dataset command imports no torch: the whole process counts
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def store(world, tmp_path_factory):
    from streamconv.cli.main import main

    out = str(tmp_path_factory.mktemp("store") / "store")
    assert main(["convert", "hf2zarr", "--load-dir", world["hf"], "--save-dir", out, "--no-progress"]) == 0
    return out


@pytest.mark.parametrize("doc", ["zarr.json", "hf/zarr.json", "model.embed_tokens.weight/zarr.json",
                                 "model.layers.1.mlp.experts.0-7.up_proj.weight/zarr.json"])
@pytest.mark.parametrize("kind", ["dev-zero", "fifo"])
def test_store_documents_that_are_not_files(store, tmp_path, cli, doc, kind):
    """A zarr store's JSON documents are read like the tracker: regular files of bounded size, or one error."""
    mine = copy_tree(store, tmp_path / "store")
    not_a_file(os.path.join(mine, doc), kind)
    bounded(*timed(cli, "convert", "hf2mcore", "--load-dir", mine, "--save-dir", tmp_path / "out", "--no-progress"),
            "not a regular file")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["stacks", "shards"])
def test_an_array_named_outside_the_store(store, tmp_path, cli, where):
    """The store's record names its arrays; a name that would lead out of the store is refused before any read."""
    mine = copy_tree(store, tmp_path / "store")
    record = os.path.join(mine, "hf", "zarr.json")
    doc = json.load(open(record))
    if where == "stacks":
        doc["attributes"]["stacks"][0][0] = "../../etc"
        message = "a 'stacks' entry is not [array name, [tensor names]]"
    else:
        doc["attributes"]["shards"][0]["tensors"][0] = "../hf"
        message = "'../hf' cannot be an array of the store"
    json.dump(doc, open(record, "w"))
    bounded(*timed(cli, "convert", "zarr2hf", "--load-dir", mine, "--save-dir", tmp_path / "out", "--no-progress"),
            message)
    assert not (tmp_path / "out").exists()
