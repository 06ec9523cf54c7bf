"""A plan is untrusted input: tampered plans are refused before any read, one line naming the field."""

import json
import os
import shutil

import pytest

from .conftest import one_error


def edit(world, tmp_path, change):
    """A copy of the saved plan with ``change(obj)`` applied, targeting a fresh dir under tmp_path."""
    obj = json.load(open(world["plan"]))
    obj["target"]["root"] = str(tmp_path / "out")
    change(obj)
    path = str(tmp_path / "plan.json")
    with open(path, "w") as f:
        json.dump(obj, f)
    return path


def first_read(obj):
    return next(i for i, n in enumerate(obj["nodes"]) if n["op"] == "read")


def set_read(field, value):
    def change(obj):
        obj["nodes"][first_read(obj)]["arg"][field] = value
    return change


def add_source(name):
    def change(obj):
        obj["source"]["files"].append([name, 10, ""])
    return change


CASES = [
    ("absolute source path", add_source("/etc/hostname"), "must be relative to the source root"),
    ("dot-dot source path", add_source("../hf/config.json"), "must be relative to the source root"),
    ("read of an unlisted file", set_read("file", "../../etc/hostname"), "not among the plan's source files"),
    ("moved offset", lambda o: o["nodes"][first_read(o)]["arg"].update(offset=o["nodes"][first_read(o)]["arg"]["offset"] + 2),
     "starts at byte"),
    ("duplicate output", lambda o: o["target"]["files"].append(dict(o["target"]["files"][-1])), "listed twice"),
    ("output named like the journal", lambda o: o["target"]["files"][-1].update(path=".streamconv_journal.jsonl"),
     "bookkeeping"),
    ("output named like a temporary file", lambda o: o["target"]["files"][-1].update(path="x.pt.partial"),
     "bookkeeping"),
    ("output escaping the target", lambda o: o["target"]["files"][-1].update(path="../escape.txt"), "output path"),
    ("tensors not a list", lambda o: o["target"]["files"][0].update(tensors="x"),
     "target.files[0].tensors: expected a list"),
    ("source row of wrong types", lambda o: o["source"]["files"][0].__setitem__(1, "12"),
     "source.files[0]: expected [name, size, digest]"),
    ("node index out of range", lambda o: o["target"]["files"][0]["tensors"][0].__setitem__(2, 10**9),
     "target.files[0].tensors[0]: 1000000000 is not an index"),
    ("target not an object", lambda o: o.update(target=[]), "target: expected a JSON object"),
]


@pytest.mark.parametrize("name, change, fragment", CASES, ids=[c[0] for c in CASES])
def test_tampered_plan_is_refused_before_any_read(world, tmp_path, cli, name, change, fragment):
    plan = edit(world, tmp_path, change)
    code, err = cli("run", plan, "--no-progress")
    one_error(code, err, fragment)
    assert not os.path.exists(tmp_path / "out"), "nothing may be written"


def test_relabelled_dtype_names_the_tensor(world, tmp_path, cli):
    def change(obj):
        i = first_read(obj)
        for row in obj["nodes"]:
            if row is obj["nodes"][i]:
                row["arg"]["dtype"] = "float16"
                row["dtype"] = "float16"
    code, err = cli("run", edit(world, tmp_path, change), "--no-progress")
    tensor = json.load(open(world["plan"]))["nodes"][first_read(json.load(open(world["plan"])))]["arg"]["tensor"]
    one_error(code, err, tensor)


def test_relabelled_dtype_and_shape_agreeing_downstream_are_caught_by_the_header(world, tmp_path, cli):
    """An edit consistent inside the plan (a read of float16 where the file holds bf16, cast away again) is
    still refused: the audit compares every read with the file's header."""
    def change(obj):
        row = obj["nodes"][first_read(obj)]
        row["arg"]["shape"] = [row["arg"]["shape"][0]] + row["arg"]["shape"][1:]
        row["arg"]["dtype"] = "float16"
        row["dtype"] = "float16"
        # retarget every user to a new cast node so the graph stays well-typed
        obj["nodes"].insert(first_read(obj) + 1, {"op": "cast", "arg": {"dtype": "bfloat16"},
                                                  "src": [first_read(obj)], "dtype": "bfloat16",
                                                  "shape": row["shape"]})
        k = first_read(obj)
        for n in obj["nodes"][k + 2:]:
            n["src"] = [s + 1 if s > k else (k + 1 if s == k else s) for s in n["src"]]
        for f in obj["target"]["files"]:
            for t in f.get("tensors", []):
                t[2] = t[2] + 1 if t[2] > k else (k + 1 if t[2] == k else t[2])
        for c in obj.get("checks", []):
            c[1] = [i + 1 if i > k else i for i in c[1]]
    code, err = cli("run", edit(world, tmp_path, change), "--no-progress")
    one_error(code, err, "reads float16")
    assert not os.path.exists(tmp_path / "out")


def test_symlinked_directory_escaping_the_source_root(world, tmp_path, cli):
    outside = tmp_path / "outside"
    outside.mkdir()
    shard = sorted(f for f in os.listdir(world["hf"]) if f.endswith(".safetensors"))[0]
    shutil.copy(os.path.join(world["hf"], shard), outside / shard)
    root = tmp_path / "root"
    shutil.copytree(world["hf"], root)
    os.symlink(outside, root / "sub")

    def change(obj):
        obj["source"]["root"] = str(root)
        obj["source"]["files"].append([f"sub/{shard}", os.path.getsize(outside / shard), obj["source"]["files"][0][2]])
    code, err = cli("run", edit(world, tmp_path, change), "--no-progress")
    one_error(code, err, "through a symlinked directory")


@pytest.mark.parametrize("content, fragment", [
    (b"\xff\xfe not utf-8", "not UTF-8"),
    (b"[1, 2, 3]", "a JSON list, expected the plan as a JSON object"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b"{\"schema_version\": 1, \"nodes\": " + b"[" * 50_000 + b"]" * 50_000 + b"}", "nested too deeply"),
])
def test_plan_files_that_are_not_plans(tmp_path, cli, content, fragment):
    path = tmp_path / "plan.json"
    path.write_bytes(content)
    one_error(*cli("run", path), fragment)


def test_plan_path_that_is_a_directory(tmp_path, cli):
    one_error(*cli("run", tmp_path), "is a directory")
    one_error(*cli("inspect", tmp_path / "nope.json"), "no such plan file or checkpoint directory")
