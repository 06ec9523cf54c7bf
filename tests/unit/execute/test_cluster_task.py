"""The cluster task and the client's commit, in this process (no scheduler): a group written under an attempt
token, renamed and journaled by the client, gives the bytes of a single-process run; attempt files of earlier
tries are removed and planned outputs never are."""

from __future__ import annotations

import dataclasses
import os

import pytest

from streamconv import synth
from streamconv.errors import ExecutionError
from streamconv.execute import cluster, journal
from streamconv.execute.executor import RunOptions, run_plan
from streamconv.layout.options import McoreOptions
from streamconv.layout.parallel import ParallelSizes
from streamconv.plan.planner import plan_hf_to_mcore
from streamconv.plan.split import group_files, sub_plan

SIZES, OPTIONS = ParallelSizes(2, 1, 2), McoreOptions(moe_grouped_gemm=True)
TOKEN = "0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster_task")
    synth.synth_checkpoint(str(root / "hf"), dataclasses.replace(synth.TINY, fp8=True, max_shard_bytes=200_000))
    return str(root / "hf")


def test_a_group_task_then_commit_gives_the_single_process_bytes(hf, tmp_path):
    ref = str(tmp_path / "ref")
    run_plan(plan_hf_to_mcore(hf, ref, SIZES, OPTIONS))
    out = str(tmp_path / "out")
    plan = plan_hf_to_mcore(hf, out, SIZES, OPTIONS)
    opts = RunOptions(max_memory=8 << 20, band_bytes=4096)
    os.makedirs(out)
    journal.start(out, journal.plan_digest(plan), [f.path for f in plan.files])
    for g in group_files(plan, 2):
        f0 = plan.files[g.files[0]]
        stale = os.path.join(out, f0.path) + f".{TOKEN}.partial"   # a dead worker's attempt at this file
        os.makedirs(os.path.dirname(stale), exist_ok=True)
        with open(stale, "wb") as fh:
            fh.write(b"half-written")
        result = cluster.run_group(sub_plan(plan, list(g.files)).to_json(), opts)
        assert not os.path.exists(stale)
        assert sorted(r["path"] for r in result["files"]) == sorted(plan.files[fi].path for fi in g.files)
        for r in result["files"]:   # nothing under a final name until the client commits
            assert not os.path.exists(os.path.join(out, r["path"]))
            assert os.path.exists(os.path.join(out, r["path"]) + "." + r["attempt"])
        cluster._commit(plan, result, journal.NAME)
    for fi in [i for i, f in enumerate(plan.files) if f.tensors]:
        rel = plan.files[fi].path
        with open(os.path.join(out, rel), "rb") as a, open(os.path.join(ref, rel), "rb") as b:
            assert a.read() == b.read(), rel
    assert set(journal.read(out)[1]) == {f.path for f in plan.files if f.tensors}
    assert cluster.remove_attempts(plan) == []


def test_remove_attempts_keeps_planned_outputs_and_other_names(hf, tmp_path):
    out = str(tmp_path / "out")
    plan = plan_hf_to_mcore(hf, out, SIZES, OPTIONS)
    rel = next(f.path for f in plan.files if f.tensors)
    base = os.path.join(out, rel)
    os.makedirs(os.path.dirname(base))
    names = {base + f".{TOKEN}": True, base + f".{TOKEN}.partial": True, base + ".bak": False,
             base + ".0123": False, os.path.join(os.path.dirname(base), f"other.pt.{TOKEN}"): False}
    for p in names:
        open(p, "wb").close()
    twin = dataclasses.replace(plan.files[0], path=rel + f".{TOKEN}")
    planned_twin = dataclasses.replace(plan, files=plan.files + (twin,))
    assert cluster.remove_attempts(planned_twin) == [base + f".{TOKEN}.partial"]   # a planned output stays
    assert sorted(cluster.remove_attempts(plan)) == [base + f".{TOKEN}"]
    assert {p: os.path.exists(p) for p in names} == {p: not removed for p, removed in names.items()}


def test_commit_refuses_what_the_plan_does_not_write(hf, tmp_path):
    plan = plan_hf_to_mcore(hf, str(tmp_path / "out"), SIZES, OPTIONS)
    for rec in ({"path": "../escape.pt", "attempt": TOKEN}, {"path": plan.files[0].path, "attempt": "../x"}):
        with pytest.raises(ExecutionError, match="does not write"):
            cluster._commit(plan, {"files": [dict(rec, size=1, crc32=[0], file_crc32=0)]}, journal.NAME)
    with pytest.raises(ExecutionError, match="is gone"):
        cluster._commit(plan, {"files": [{"path": plan.files[0].path, "attempt": TOKEN, "size": 1, "crc32": [0],
                                          "file_crc32": 0}]}, journal.NAME)
