"""A plan that writes HF safetensors shards: run_plan produces the expected bytes, resumes after kill -9 to
identical files, and verify_plan / verify_dir pass on the result and find a flipped byte."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import safetensors.torch
import torch

from streamconv import types
from streamconv.execute import journal
from streamconv.execute.executor import RunOptions, run_plan
from streamconv.execute.formats import layout_of
from streamconv.execute.verify import verify_dir, verify_plan
from streamconv.graph.node import cast, read, slice_, transpose
from streamconv.plan.plan import OutputFile, OutputTensor, Plan, SourceFile
from streamconv.storage import fileio
from streamconv.storage.registry import digest_of_file
from streamconv.storage.safetensors import SafetensorsWriter, read_header

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
# Small bands: every big tensor is written in several pieces, from several tasks.
OPTS = RunOptions(scheduler="sync", band_bytes=2048, max_memory=4 << 20)


def _source_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "embed": torch.randn(64, 48, generator=g).to(torch.bfloat16),
        "w8": (torch.randn(40, 16, generator=g) * 30).to(torch.float8_e4m3fn),
        "norm": torch.randn(33, generator=g),
        "empty": torch.empty(0, 4, dtype=torch.bfloat16),
        "proj": torch.randn(24, 32, generator=g).to(torch.bfloat16),
    }


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("src"))
    tensors = _source_tensors()
    with SafetensorsWriter(os.path.join(root, "src.safetensors"),
                           [(n, types.from_torch(t.dtype).name, tuple(t.shape)) for n, t in tensors.items()]) as w:
        for name, t in tensors.items():
            w.write(name, t)
    return root, tensors


def make_plan(source_root: str, target_root: str) -> tuple[Plan, dict[str, dict[str, torch.Tensor]]]:
    """Two shards and an index; the expected tensors of each shard."""
    path = os.path.join(source_root, "src.safetensors")
    infos = read_header(path).tensors
    n = {k: read("src.safetensors", k, i.dtype, i.shape, offset=i.start) for k, i in infos.items()}
    src = _source_tensors()
    shards = [
        {"model.embed_tokens.weight": (n["embed"], src["embed"]),
         "model.layers.0.mlp.down_proj.weight": (n["w8"], src["w8"]),
         "model.norm.weight": (n["norm"], src["norm"]),
         "model.empty": (n["empty"], src["empty"])},
        {"model.layers.0.proj_t.weight": (transpose(n["proj"]), src["proj"].t().contiguous()),
         "model.layers.0.proj_half.weight": (slice_(n["proj"], (12, 0), (12, 32)), src["proj"][12:]),
         "lm_head.weight": (cast(n["embed"], "float32"), src["embed"].float())},
    ]
    files, expected, seq = [], {}, 0
    for name, shard in zip(SHARDS, shards):
        tensors = []
        for key, (node, _) in shard.items():
            tensors.append(OutputTensor("", key, node, seq))
            seq += 1
        files.append(OutputFile(name, "safetensors", tuple(tensors), (("format", "pt"),)))
        expected[name] = {k: t for k, (_, t) in shard.items()}
    index = {"metadata": {"total_size": sum(f.nbytes for f in files)},
             "weight_map": {t.name: f.path for f in files for t in f.tensors}}
    files.append(OutputFile("model.safetensors.index.json", "text", text=json.dumps(index, indent=2)))
    plan = Plan("test_safetensors", source_root,
                (SourceFile("src.safetensors", os.path.getsize(path), digest_of_file(path)),), target_root,
                tuple(files))
    return plan, expected


def tree(root: str) -> dict[str, bytes]:
    out = {}
    for d, _, fs in os.walk(root):
        for f in fs:
            if f != journal.NAME:
                with open(os.path.join(d, f), "rb") as fh:
                    out[os.path.relpath(os.path.join(d, f), root)] = fh.read()
    return out


@pytest.fixture(scope="module")
def uninterrupted(source, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("clean") / "hf")
    plan, expected = make_plan(source[0], out)
    run_plan(plan, OPTS)
    return plan, expected, tree(out)


def test_writes_the_expected_shards(uninterrupted):
    plan, expected, files = uninterrupted
    assert sorted(files) == sorted(SHARDS + ("model.safetensors.index.json",))
    for f in plan.files[:2]:
        data = files[f.path]
        layout = layout_of(f)
        assert len(data) == layout.size and data[: len(layout.header)] == layout.header
        loaded = safetensors.torch.load(data)
        want = expected[f.path]
        assert sorted(loaded) == sorted(want)
        for (start, end), (name, t) in zip(layout.spans, want.items()):
            assert loaded[name].dtype == t.dtype and loaded[name].shape == t.shape, name
            raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
            assert data[start:end] == raw, name
    index = json.loads(files["model.safetensors.index.json"])
    assert index["weight_map"]["lm_head.weight"] == SHARDS[1]


def test_verify_passes_then_finds_flipped_bytes(source, tmp_path):
    out = str(tmp_path / "hf")
    plan, _ = make_plan(source[0], out)
    run_plan(plan, OPTS)
    rep = verify_plan(plan, rederive=7)
    assert rep.ok, rep.problems
    assert rep.files == 3 and rep.records == 7 and rep.rederived == 7
    rep = verify_dir(out)
    assert rep.ok, rep.problems
    assert rep.files == 3 and rep.records == 7

    victim = plan.files[1]
    start, _ = layout_of(victim).spans[1]
    path = os.path.join(out, victim.path)
    _flip(path, start + 5)
    rep = verify_plan(plan)
    assert len(rep.problems) == 1 and "model.layers.0.proj_half.weight: checksum differs" in rep.problems[0]
    rep = verify_dir(out)
    assert len(rep.problems) == 1 and "model.layers.0.proj_half.weight: checksum differs" in rep.problems[0]
    _flip(path, start + 5)
    assert verify_plan(plan).ok and verify_dir(out).ok

    _flip(path, 30)  # inside the JSON header: the tensors' bytes are intact
    assert any("header differs" in p for p in verify_plan(plan).problems)
    assert not verify_dir(out).ok


def _flip(path: str, pos: int) -> None:
    with open(path, "r+b") as f:
        f.seek(pos)
        byte = f.read(1)
        f.seek(pos)
        f.write(bytes([byte[0] ^ 0xFF]))


# The child runs the plan with the sync scheduler and kills itself with SIGKILL at a fixed point: before the
# k-th piece write, or when the k-th file is about to be finished (the earlier ones are finished and journaled).
_CHILD = """
import os, signal, sys
from streamconv.execute.executor import RunOptions, run_plan
from streamconv.plan.plan import Plan
from streamconv.storage.registry import get_format
plan_path, step, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
fmt = get_format("safetensors")
real, calls = getattr(fmt, step), [0]
def dying(*args):
    if calls[0] == limit:
        os.kill(os.getpid(), signal.SIGKILL)
    calls[0] += 1
    return real(*args)
setattr(fmt, step, dying)  # tasks look the format up by name, so they call this
run_plan(Plan.load(plan_path), RunOptions(scheduler="sync", band_bytes=2048, max_memory=4 << 20))
"""


@pytest.mark.parametrize("step, limit, finished", [("write_piece", 5, 0), ("finish", 1, 1)],
                         ids=["mid-write", "after-first-shard"])
def test_kill_9_then_resume_is_byte_identical(source, tmp_path, uninterrupted, step, limit, finished):
    out = str(tmp_path / "hf")
    plan, _ = make_plan(source[0], out)
    plan_path = str(tmp_path / "plan.json")
    plan.save(plan_path)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _CHILD, plan_path, step, str(limit)], cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    # Dask picks the order of independent tasks, so which shard got further is not fixed; the counts are.
    left = tree(out)
    done = [p for p in SHARDS if p in left]
    partial = [p for p in SHARDS if fileio.temp_name(p) in left]
    assert len(done) == finished and partial and not set(done) & set(partial)
    assert all(left[p] == uninterrupted[2][p] for p in done)  # a final name is a whole file
    assert sorted(journal.read(out)[1]) == done
    run_plan(Plan.load(plan_path), OPTS)  # resume
    assert tree(out) == uninterrupted[2]
    with open(journal.path_of(out)) as j:
        records = [json.loads(line)["path"] for line in j if '"kind":"file"' in line]
    assert sorted(records) == sorted(SHARDS + ("model.safetensors.index.json",))  # nothing written twice
    assert verify_plan(Plan.load(plan_path), rederive=3).ok and verify_dir(out).ok
