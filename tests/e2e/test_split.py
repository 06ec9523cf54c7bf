"""Without a scheduler: ``plan split PLAN --hosts N``, ``run SUBPLAN`` per host, ``run PLAN --finish``.

The parts run here one after the other (hosts that share the save dir); the finished output must equal the
single-process run of the whole plan byte for byte, and every guard of the shared save dir must hold."""

from __future__ import annotations

import contextlib
import io
import json
import os

import pytest

from streamconv.cli.main import main
from streamconv.execute import journal
from streamconv.execute.executor import run_plan
from streamconv.graph.node import Op, toposort
from streamconv.layout.options import McoreOptions
from streamconv.layout.parallel import ParallelSizes
from streamconv.plan.mcore2hf import plan_mcore_to_hf
from streamconv.plan.plan import Plan
from streamconv.plan.planner import plan_hf_to_mcore
from streamconv.storage.lock import NAME as LOCK_NAME
from streamconv.storage.lock import TargetLock

SIZES = ParallelSizes(2, 2, 2)
OPTIONS = McoreOptions(moe_grouped_gemm=True, mtp_num_layers=1)
TRACKER = "latest_checkpointed_iteration.txt"


def cli(*argv: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(list(argv))
    return rc, err.getvalue()


def tree(root: str) -> dict[str, bytes]:
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            if not f.startswith(".streamconv"):
                with open(os.path.join(d, f), "rb") as fh:
                    out[os.path.relpath(os.path.join(d, f), root)] = fh.read()
    return out


@pytest.fixture(scope="module")
def reference(tiny_hf, tmp_path_factory):
    """The single-process hf2mcore output of the tiny FP8 checkpoint."""
    out = str(tmp_path_factory.mktemp("split_ref") / "mcore")
    run_plan(plan_hf_to_mcore(tiny_hf["fp8"], out, SIZES, OPTIONS))
    return out


def split(tiny_hf, tmp_path, hosts: int) -> tuple[str, str, list[str]]:
    """(plan path, save dir, part paths) of the tiny hf2mcore plan split for ``hosts``."""
    out = str(tmp_path / "mcore")
    plan_path = str(tmp_path / "plan.json")
    plan_hf_to_mcore(tiny_hf["fp8"], out, SIZES, OPTIONS).save(plan_path)
    assert cli("plan", "split", plan_path, "--hosts", str(hosts), "--output", str(tmp_path / "parts"))[0] == 0
    parts = sorted(str(tmp_path / "parts" / n) for n in os.listdir(tmp_path / "parts"))
    assert len(parts) == hosts
    return plan_path, out, parts


@pytest.mark.parametrize("hosts", [2, 3])
def test_parts_then_finish_equal_the_single_process_run(tiny_hf, tmp_path, reference, hosts):
    plan_path, out, parts = split(tiny_hf, tmp_path, hosts)
    whole = Plan.load(plan_path)
    subs = [Plan.load(p) for p in parts]
    tensor_paths = sorted(f.path for f in whole.files if f.tensors)
    assert sorted(f.path for s in subs for f in s.files) == tensor_paths   # a partition, no text file
    for p in parts[1:]:
        assert cli("run", p, "--no-progress")[0] == 0
    assert not os.path.exists(os.path.join(out, TRACKER))   # parts never write the tracker
    rc, err = cli("verify", out)
    assert rc == 1   # incomplete until --finish merges the parts' journals
    rc, err = cli("run", plan_path, "--finish")
    assert rc == 2 and f"part 0 of {hosts}" in err, err      # part 0 has not run: nothing is finished
    assert not os.path.exists(os.path.join(out, TRACKER))
    assert cli("run", parts[0], "--no-progress")[0] == 0
    rc, err = cli("run", plan_path, "--finish")
    assert rc == 0, err
    assert tree(out) == tree(reference)
    assert [n for n in os.listdir(out) if n.startswith(".streamconv")] == [journal.NAME]   # part journals merged
    assert cli("verify", out)[0] == 0
    assert cli("verify", plan_path)[0] == 0
    assert cli("run", plan_path, "--finish")[0] == 0        # again: harmless
    assert tree(out) == tree(reference)


def test_a_part_resumes_and_its_files_are_not_rewritten(tiny_hf, tmp_path):
    _, out, parts = split(tiny_hf, tmp_path, 2)
    assert cli("run", parts[0], "--no-progress")[0] == 0
    written = {f.path: os.stat(os.path.join(out, f.path)).st_ino for f in Plan.load(parts[0]).files}
    assert cli("run", parts[0], "--no-progress")[0] == 0
    assert {p: os.stat(os.path.join(out, p)).st_ino for p in written} == written


def test_mcore2hf_parts_share_out_the_replica_checks(tiny_hf, tmp_path):
    mcore = str(tmp_path / "mcore")
    run_plan(plan_hf_to_mcore(tiny_hf["bf16"], mcore, SIZES, OPTIONS))
    ref = str(tmp_path / "ref")
    run_plan(plan_mcore_to_hf(mcore, ref, SIZES, OPTIONS))
    out = str(tmp_path / "hf")
    plan = plan_mcore_to_hf(mcore, out, SIZES, OPTIONS)
    assert plan.checks
    plan.save(str(tmp_path / "plan.json"))
    assert cli("plan", "split", str(tmp_path / "plan.json"), "--hosts", "2", "-o", str(tmp_path / "parts"))[0] == 0
    parts = sorted(str(tmp_path / "parts" / n) for n in os.listdir(tmp_path / "parts"))
    labels = sorted(c.label for p in parts for c in Plan.load(p).checks)
    assert labels == sorted(c.label for c in plan.checks)   # each check in exactly one part
    for p in parts:
        assert cli("run", p, "--no-progress")[0] == 0
    assert cli("run", str(tmp_path / "plan.json"), "--finish")[0] == 0
    assert tree(out) == tree(ref)


def test_locks_of_a_shared_save_dir(tiny_hf, tmp_path):
    plan_path, out, parts = split(tiny_hf, tmp_path, 2)
    os.makedirs(out)
    part0 = Plan.load(parts[0])
    # the same part twice at once: its own lock refuses the second
    with TargetLock(os.path.join(out, ".streamconv.part-00-of-02.lock")):
        rc, err = cli("run", parts[0], "--no-progress")
        assert rc == 2 and "another streamconv run" in err, err
    # a part running (the save dir's lock held shared): the whole plan and --finish are refused, other parts run
    with TargetLock(os.path.join(out, LOCK_NAME), shared=True):
        for argv in (("run", plan_path, "--no-progress"), ("run", plan_path, "--finish")):
            rc, err = cli(*argv)
            assert rc == 2 and "another streamconv run" in err, (argv, err)
        assert cli("run", parts[1], "--no-progress")[0] == 0
    # a whole run holding the save dir: no part may start
    with TargetLock(os.path.join(out, LOCK_NAME)):
        rc, err = cli("run", parts[0], "--no-progress")
        assert rc == 2 and "another streamconv run" in err, err
    assert not any(os.path.exists(os.path.join(out, f.path)) for f in part0.files)


def test_guards_of_parts_and_finish(tiny_hf, tmp_path):
    plan_path, out, parts = split(tiny_hf, tmp_path, 2)
    first = Plan.load(parts[0]).files[0].path
    # a file already at one of the part's paths, not journaled by it: refused, --overwrite replaces it
    os.makedirs(os.path.dirname(os.path.join(out, first)))
    with open(os.path.join(out, first), "wb") as f:
        f.write(b"not ours")
    rc, err = cli("run", parts[0], "--no-progress")
    assert rc == 2 and "--overwrite" in err and first in err, err
    assert cli("run", parts[0], "--no-progress", "--overwrite")[0] == 0
    assert cli("run", parts[1], "--no-progress")[0] == 0
    # a part of another split in the same save dir: refused
    assert cli("plan", "split", plan_path, "--hosts", "3", "--output", str(tmp_path / "parts3"))[0] == 0
    rc, err = cli("run", str(tmp_path / "parts3" / "part-00-of-03.json"), "--no-progress")
    assert rc == 2 and "another split" in err, err
    # a stale rank file the plan does not write: --finish refuses, --finish --overwrite removes it
    stale = os.path.join(out, "iter_0000001", "mp_rank_07_007_007", "model_optim_rng.pt")
    os.makedirs(os.path.dirname(stale))
    with open(stale, "wb") as f:
        f.write(b"old")
    rc, err = cli("run", plan_path, "--finish")
    assert rc == 2 and "does not write" in err, err
    assert cli("run", plan_path, "--finish", "--overwrite")[0] == 0
    assert not os.path.exists(stale)
    # --finish takes the whole plan, never a part; parts cannot be split again
    rc, err = cli("run", parts[0], "--finish")
    assert rc == 2 and "whole plan" in err, err
    rc, err = cli("plan", "split", parts[0], "--hosts", "2", "--output", str(tmp_path / "again"))
    assert rc == 2 and "already a part" in err, err


def test_a_tampered_part_is_refused(tiny_hf, tmp_path):
    _, _, parts = split(tiny_hf, tmp_path, 2)
    with open(parts[0]) as f:
        obj = json.load(f)
    obj["options"]["part"]["index"] = 5
    with open(parts[0], "w") as f:
        json.dump(obj, f)
    rc, err = cli("run", parts[0], "--no-progress")
    assert rc == 2 and "options.part" in err, err


def test_a_plan_reading_a_zarr_store_splits_and_finishes(tiny_hf, tmp_path, reference):
    """Parts of a plan whose source is a store list the arrays' files they read (else the audit refuses them),
    count the store's bytes in the split report, and finish to the bytes the HF directory gives."""
    store = str(tmp_path / "store")
    assert cli("convert", "hf2zarr", "--load-dir", tiny_hf["fp8"], "--save-dir", store, "--no-progress")[0] == 0
    out = str(tmp_path / "mcore")
    plan_path = str(tmp_path / "plan.json")
    plan_hf_to_mcore(store, out, SIZES, OPTIONS).save(plan_path)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["plan", "split", plan_path, "--hosts", "2", "--output", str(tmp_path / "parts")]) == 0
    report = printed.getvalue()
    assert "source bytes read by all parts:" in report and "read by all parts: 0 B" not in report, report
    parts = sorted(str(tmp_path / "parts" / n) for n in os.listdir(tmp_path / "parts"))
    for p in parts:
        sub = Plan.load(p)
        arrays = {n.arg.file for f in sub.files for t in f.tensors for n in toposort([t.node])
                  if n.op is Op.READ_CHUNKED}
        assert arrays and all(any(s.name.startswith(a + "/") for s in sub.source_files) for a in arrays)
        assert cli("run", p, "--no-progress")[0] == 0
    assert cli("run", plan_path, "--finish")[0] == 0
    assert tree(out) == tree(reference)
