"""Shared fixtures of the adversarial suite: a tiny checkpoint, its plan and its conversion, made once; and
``cli``, which runs the command line in this process and returns (exit status, stderr lines)."""

import dataclasses
import os
import shutil

import pytest

from streamconv import synth
from streamconv.cli.main import main
from streamconv.execute.executor import RunOptions, run_plan
from streamconv.layout.options import McoreOptions
from streamconv.layout.parallel import ParallelSizes
from streamconv.plan.planner import plan_hf_to_mcore

SIZES, OPTIONS = ParallelSizes(2, 2, 1), McoreOptions(moe_grouped_gemm=True)


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """{"hf": bf16 HF dir, "plan": saved hf2mcore plan path (target not yet written), "mcore": a converted
    checkpoint of it, "root": a scratch dir}."""
    root = tmp_path_factory.mktemp("adversarial")
    hf = str(root / "hf")
    synth.synth_checkpoint(hf, dataclasses.replace(synth.TINY, max_shard_bytes=300_000))
    mcore = str(root / "mcore")
    run_plan(plan_hf_to_mcore(hf, mcore, SIZES, OPTIONS), RunOptions(band_bytes=8192, max_memory=8 << 20))
    plan = plan_hf_to_mcore(hf, str(root / "out"), SIZES, OPTIONS)
    plan.save(str(root / "plan.json"))
    return {"hf": hf, "mcore": mcore, "plan": str(root / "plan.json"), "out": str(root / "out"), "root": str(root)}


@pytest.fixture
def cli(capsys):
    def run(*argv):
        code = main([str(a) for a in argv])
        captured = capsys.readouterr()
        run.out = captured.out  # what the command printed, for the tests that read it
        return code, [line for line in captured.err.splitlines() if line.strip()]
    return run


def one_error(code, err, *fragments):
    """Exit status 2 and exactly one stderr line, `streamconv: error: ...`, holding every fragment."""
    assert code == 2, (code, err)
    assert len(err) == 1 and err[0].startswith("streamconv: error: "), err
    for f in fragments:
        assert f in err[0], (f, err[0])


def copy_tree(src, dst):
    shutil.copytree(src, dst, symlinks=True)
    return str(dst)


def tree(path):
    """Every file under ``path`` with its size and mtime: to show nothing was touched."""
    out = {}
    for d, _, names in os.walk(path):
        for n in names:
            p = os.path.join(d, n)
            st = os.lstat(p)
            out[os.path.relpath(p, path)] = (st.st_size, st.st_mtime_ns)
    return out
