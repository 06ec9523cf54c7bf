"""Older torch, as NPU hosts run it (torch 2.1 - 2.6 with torch_npu): the rank files we write load with
``torch.load(weights_only=True)`` (mmap on and off), and the loader itself runs and gives the same bytes.

Each version runs in its own venv built from the package registry (``pip install torch==V 'numpy<2' dask``;
the Linux wheels pull their CUDA libraries, ~3 GB each) under ``$STREAMCONV_TORCH_VENVS`` (default
``~/.cache/streamconv/torch-venvs``), made once and reused.  Marked slow; where a venv cannot be made (no
network, no wheel for this Python) the test is skipped with pip's reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from streamconv.execute.executor import RunOptions, run_plan
from streamconv.loader import open_rank, rank_paths
from tests.digest import digest
from tests.e2e.test_loader import plan_for, rank_of

VERSIONS = ["2.1.2", "2.6.0"]
ROOT = os.environ.get("STREAMCONV_TORCH_VENVS", os.path.expanduser("~/.cache/streamconv/torch-venvs"))
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.slow


def venv_python(version: str) -> str:
    """The venv's python, made if missing; skips the test with pip's reason when it cannot be made."""
    home = os.path.join(ROOT, f"torch-{version}")
    py = os.path.join(home, "bin", "python")
    if not os.path.exists(py):
        made = subprocess.run([sys.executable, "-m", "venv", home], capture_output=True, text=True)
        if made.returncode:
            pytest.skip(f"cannot make a venv for torch {version}: {made.stderr.strip()[-300:]}")
    ok = subprocess.run([py, "-c", "import torch, dask, numpy; print(torch.__version__)"], capture_output=True,
                        text=True)
    if ok.returncode or not ok.stdout.startswith(version):
        pip = subprocess.run([py, "-m", "pip", "install", "-q", f"torch=={version}", "numpy<2", "dask"],
                             capture_output=True, text=True, timeout=3600)
        if pip.returncode:
            pytest.skip(f"torch {version} cannot be installed from the package registry here: "
                        f"{pip.stderr.strip()[-400:]}")
    return py


CHILD = r"""
import json, sys, torch
from streamconv.loader import open_rank
from tests.digest import digest
job = json.loads(sys.argv[1])
out = {"torch": torch.__version__}
for path in job["files"]:
    for mmap in (False, True):
        out[f"{path} mmap={mmap}"] = digest(torch.load(path, weights_only=True, mmap=mmap, map_location="cpu"))
for r in job["ranks"]:
    for how in ("host", "device"):
        out[f"rank {r} {how}"] = digest(open_rank(job["plan"], tp_rank=r[0], pp_rank=r[1], ep_rank=r[2])
                                        .state_dict(dequant_on=how))
print(json.dumps(out))
"""


@pytest.mark.parametrize("version", VERSIONS)
def test_files_and_loader_under_older_torch(version, tiny_hf, tmp_path):
    py = venv_python(version)
    out = str(tmp_path / "mcore")
    plan = plan_for(tiny_hf["fp8"], out, dict(tp=2, pp=2, ep=2, vpp_layers=1, gg=True, mtp=1))
    plan.save(str(tmp_path / "plan.json"))
    run_plan(plan, RunOptions())
    files = [os.path.join(out, p) for p in rank_paths(plan)]
    ranks = [rank_of(p, 2, 2) for p in rank_paths(plan)][:3]
    want = {}
    for path in files:
        for mmap in (False, True):
            want[f"{path} mmap={mmap}"] = digest(torch.load(path, weights_only=True, mmap=mmap))
    for r in ranks:
        d = digest(open_rank(plan, tp_rank=r[0], pp_rank=r[1], ep_rank=r[2]).state_dict())
        want[f"rank {list(r)} host"] = want[f"rank {list(r)} device"] = d
    job = {"files": files, "ranks": [list(r) for r in ranks], "plan": str(tmp_path / "plan.json")}
    env = dict(os.environ, PYTHONPATH=REPO)
    run = subprocess.run([py, "-W", "ignore", "-c", CHILD, json.dumps(job)], capture_output=True, text=True,
                         env=env, timeout=600, cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got.pop("torch").startswith(version)
    assert got == want
