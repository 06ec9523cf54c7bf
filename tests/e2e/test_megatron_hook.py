"""The Megatron / MindSpeed hook, driven the way Megatron's ``load_checkpoint`` calls ``_load_base_checkpoint``
(tests/megatron_standin: the legacy path of Megatron-LM's checkpointing module, signatures and return values
of core 0.12 ... main, and of core_r0.8.0), with ranks from the installed megatron-core's parallel state; the
models it fills are compared with the independent reference.  Plus ``prepare-load`` and ``streamconv.launch``."""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import os
import subprocess
import sys
import types
from collections import OrderedDict

import pytest
import torch

from streamconv.cli.main import main as cli
from streamconv.errors import PlanError, ValidationError
from streamconv.execute.executor import RunOptions, run_plan
from streamconv.loader import hook
from streamconv.loader.loaddir import DESCRIPTION, TRACKER
from streamconv.execute import kernels
from tests.e2e.test_loader import plan_for, rank_of, skeletons
from tests.reference import assert_same_checkpoint, reference_hf_to_mcore

pytest.importorskip("megatron.core.parallel_state", reason="megatron-core is not installed")
from megatron.core import parallel_state as mpu  # noqa: E402

STANDIN = os.path.join(os.path.dirname(os.path.dirname(__file__)), "megatron_standin")
MODULE = "megatron.training.checkpointing"
CASE = dict(tp=2, pp=2, ep=2, vpp_layers=1, gg=True, mtp=1)


@pytest.fixture
def ckpt(monkeypatch):
    """A fresh stand-in ``megatron.training.checkpointing`` (the hook mutates it)."""
    monkeypatch.syspath_prepend(STANDIN)
    for name in (MODULE, "megatron.training"):
        sys.modules.pop(name, None)
    mod = importlib.import_module(MODULE)
    yield mod
    for name in (MODULE, "megatron.training", "streamconv.loader.megatron"):
        sys.modules.pop(name, None)


@pytest.fixture
def parallel_state():
    """Set Megatron's parallel state (rank and world size overrides of megatron.core), reset afterwards."""
    def set_rank(tp, pp, ep, sizes=(2, 2, 2)):
        mpu.set_tensor_model_parallel_world_size(sizes[0])
        mpu.set_pipeline_model_parallel_world_size(sizes[1])
        mpu.set_expert_model_parallel_world_size(sizes[2])
        mpu.set_tensor_model_parallel_rank(tp)
        mpu.set_pipeline_model_parallel_rank(pp)
        mpu.set_expert_model_parallel_rank(ep)

    yield set_rank
    for f in ("tensor_model_parallel", "pipeline_model_parallel", "expert_model_parallel"):
        getattr(mpu, f"set_{f}_world_size")(None)
        getattr(mpu, f"set_{f}_rank")(None)


def megatron_args(load, **over):
    a = dict(load=load, finetune=True, no_load_optim=True, no_load_rng=True, auto_detect_ckpt_format=True,
             tensor_model_parallel_size=2, pipeline_model_parallel_size=2, expert_model_parallel_size=2,
             moe_grouped_gemm=True, num_layers_per_virtual_pipeline_stage=1, mtp_num_layers=1)
    a.update(over)
    return argparse.Namespace(**a)


@pytest.fixture(scope="module")
def prepared(tiny_hf, tmp_path_factory):
    """A saved plan, a load dir prepared from it, one prepared from the HF dir, one from an mcore2mcore plan
    resharding a TP 1 PP 1 EP 1 checkpoint into the same layout and one from that checkpoint's directory (all
    with the CLI), and the reference rank files."""
    root = tmp_path_factory.mktemp("hook")
    plan = plan_for(tiny_hf["fp8"], str(root / "never"), CASE)
    plan.save(str(root / "plan.json"))
    assert cli(["prepare-load", str(root / "plan.json"), "--save-dir", str(root / "from-plan")]) == 0
    assert cli(["prepare-load", "--load-dir", tiny_hf["fp8"], "--save-dir", str(root / "from-hf"),
                "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2",
                "--target-expert-parallel-size", "2", "--moe-grouped-gemm", "--mtp-num-layers", "1",
                "--num-layers-per-virtual-pipeline-stage", "1", "--dequant-on", "device"]) == 0
    assert cli(["convert", "hf2mcore", "--load-dir", tiny_hf["fp8"], "--save-dir", str(root / "mcore-tp1"),
                "--mtp-num-layers", "1", "--no-progress"]) == 0
    assert cli(["plan", "mcore2mcore", "--load-dir", str(root / "mcore-tp1"), "--save-dir", str(root / "never2"),
                "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2",
                "--target-expert-parallel-size", "2", "--moe-grouped-gemm", "--mtp-num-layers", "1",
                "--num-layers-per-virtual-pipeline-stage", "1", "-o", str(root / "reshard.json")]) == 0
    assert cli(["prepare-load", str(root / "reshard.json"), "--save-dir", str(root / "from-mcore2mcore")]) == 0
    assert cli(["prepare-load", "--load-dir", str(root / "mcore-tp1"), "--save-dir", str(root / "from-mcore-dir"),
                "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2",
                "--target-expert-parallel-size", "2", "--moe-grouped-gemm", "--mtp-num-layers", "1",
                "--num-layers-per-virtual-pipeline-stage", "1"]) == 0
    want = {rel: sd for rel, sd in reference_hf_to_mcore(tiny_hf["fp8"], tp=2, pp=2, ep=2, moe_grouped_gemm=True,
                                                        mtp_num_layers=1, vpp_layers=1).items()
            if rel.endswith(".pt")}
    return root, want


def filled(models) -> list[OrderedDict]:
    return [OrderedDict((k, v.detach().clone()) for k, v in m.state_dict().items()) for m in models]


@pytest.mark.parametrize("which", ["from-plan", "from-hf", "from-mcore2mcore", "from-mcore-dir"])
def test_load_checkpoint_fills_every_rank(ckpt, parallel_state, prepared, which):
    root, want = prepared
    load = str(root / which)
    assert sorted(os.listdir(load)) == sorted(["README", DESCRIPTION, TRACKER])     # no weights
    hook.install(ckpt)
    ckpt._GLOBAL_ARGS = megatron_args(load)
    for rel, sd in want.items():
        parallel_state(*rank_of(rel, 2, 2))
        models = skeletons(sd)
        iteration, flops = ckpt.load_checkpoint(models, None, None)
        assert (iteration, flops) == (0, 0)                                 # --finetune
        for i, got in enumerate(filled(models)):
            assert_same_checkpoint({rel: got}, {rel: sd[f"model{i}"]})


def test_hooked_function_contract(ckpt, parallel_state, prepared, monkeypatch):
    """Return values as Megatron's: (state_dict, checkpoint_name, release, CheckpointType.LEGACY); rank0=True
    gives the scalars only and reads no tensor; the name is where the legacy file would be."""
    root, want = prepared
    load = str(root / "from-plan")
    hook.install(ckpt)
    args = megatron_args(load)
    reads = []
    real = kernels.read_kernel
    monkeypatch.setattr(kernels, "read_kernel", lambda *a: reads.append(a[1]) or real(*a))
    sd, name, release, kind = ckpt._load_base_checkpoint(load, args, rank0=True)
    assert sd == {"checkpoint_version": 3.0, "iteration": 1} and reads == []
    assert kind is ckpt.CheckpointType.LEGACY and release is False
    parallel_state(1, 1, 0)
    sd, name, release, kind = ckpt._load_base_checkpoint(load, args, rank0=False, checkpointing_context={})
    rel = "iter_0000001/mp_rank_01_001_000/model_optim_rng.pt"
    assert name == os.path.join(load, rel)
    assert_same_checkpoint({rel: sd}, {rel: want[rel]}, check_order=False)
    assert reads


def test_other_directories_go_to_the_original(ckpt, parallel_state, tiny_hf, tmp_path):
    """A converted checkpoint on disk loads through Megatron's own path, unchanged."""
    out = str(tmp_path / "mcore")
    run_plan(plan_for(tiny_hf["bf16"], out, dict(tp=2, gg=False, mtp=0)), RunOptions())
    hook.install(ckpt)
    parallel_state(1, 0, 0, sizes=(2, 1, 1))
    sd, name, _, _ = ckpt._load_base_checkpoint(out, megatron_args(out), rank0=False)
    assert name == os.path.join(out, "iter_0000001/mp_rank_01/model_optim_rng.pt")
    assert_same_checkpoint({"f": sd}, {"f": torch.load(name, weights_only=True)}, check_order=True)
    assert ckpt._load_base_checkpoint(str(tmp_path / "nothing"), megatron_args(None)) == (None, "", False, None)


def test_core_r08_signature(parallel_state, prepared, tmp_path):
    """Megatron core_r0.8.0 (MindSpeed-LLM 2.0/2.1): no ``args`` parameter (get_args()), a 3-tuple back."""
    root, want = prepared
    spec = importlib.util.spec_from_file_location("standin_r08", os.path.join(STANDIN, "checkpointing_core_r08.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    hook.install(mod)
    mod._GLOBAL_ARGS = megatron_args(str(root / "from-plan"))
    rel = "iter_0000001/mp_rank_00_001_001/model_optim_rng.pt"
    parallel_state(0, 1, 1)
    out = mod._load_base_checkpoint(str(root / "from-plan"), rank0=False)
    assert len(out) == 3 and out[1].endswith(rel) and out[2] is False
    models = skeletons(want[rel])
    assert mod.load_checkpoint(models, None, None) == 0
    for i, got in enumerate(filled(models)):
        assert_same_checkpoint({rel: got}, {rel: want[rel][f"model{i}"]})


def test_arguments_that_contradict_the_load_dir(ckpt, parallel_state, prepared, monkeypatch):
    root, _ = prepared
    load = str(root / "from-plan")
    hook.install(ckpt)
    reads = []
    monkeypatch.setattr(kernels, "read_kernel", lambda *a: reads.append(a[1]))
    parallel_state(0, 0, 0)
    args = megatron_args(load, tensor_model_parallel_size=4, moe_grouped_gemm=False, finetune=False,
                         no_load_optim=False)
    with pytest.raises(ValidationError) as err:
        ckpt._load_base_checkpoint(load, args, rank0=False)
    msg = str(err.value)
    assert "--tensor-model-parallel-size 4 but" in msg and "prepared for 2" in msg
    assert "--moe-grouped-gemm False" in msg
    assert "Add --finetune --no-load-optim --no-load-rng" in msg
    assert reads == []


def test_import_installs_and_rebinds_names_imported_elsewhere(ckpt, parallel_state, prepared):
    """``import streamconv.loader.megatron`` hooks the module and every module that imported the function by
    name (as MindSpeed-LLM's checkpointing module does)."""
    user = types.ModuleType("some_user_module")
    user._load_base_checkpoint = ckpt._load_base_checkpoint
    sys.modules[user.__name__] = user
    try:
        importlib.import_module("streamconv.loader.megatron")
        assert hook._is_hooked(ckpt._load_base_checkpoint)
        assert user._load_base_checkpoint is ckpt._load_base_checkpoint
        assert hook.install(ckpt) is ckpt._load_base_checkpoint           # idempotent
    finally:
        del sys.modules[user.__name__]


def test_mindspeed_patch_manager_keeps_the_hook(ckpt, monkeypatch):
    """With MindSpeed's patch manager loaded, the hook is registered there as a wrapper; MindSpeed re-applying
    the patch from the original function (what it does when features add wrappers later) keeps it.  The
    manager below reproduces mindspeed/patch_utils.py's rules: a function whose name ends in ``wrapper`` is a
    decorator, stacked in registration order over the original; applying rebinds every module holding the
    previous function."""
    class Patch:
        def __init__(self, name):
            self.module_name, self.attr = name.rsplit(".", 1)
            self.orig = getattr(sys.modules[self.module_name], self.attr)
            self.wrappers = []

        def apply_patch(self):
            module = sys.modules[self.module_name]
            current, final = getattr(module, self.attr), self.orig
            for w in self.wrappers:
                final = w(final)
            for m in list(sys.modules.values()):
                if getattr(m, self.attr, None) is current:
                    setattr(m, self.attr, final)

    class Manager:
        patches_info = {}

        @staticmethod
        def register_patch(name, fn):
            Manager.patches_info.setdefault(name, Patch(name)).wrappers.append(fn)

    def lora_wrapper(fn):     # a MindSpeed-LLM feature wrapping the function too
        def wrapper(*a, **kw):
            return fn(*a, **kw)
        return wrapper

    patch_utils = types.ModuleType("mindspeed.patch_utils")
    patch_utils.MindSpeedPatchesManager = Manager
    monkeypatch.setitem(sys.modules, "mindspeed.patch_utils", patch_utils)
    Manager.register_patch(hook.PATCH_NAME, lora_wrapper)
    Manager.patches_info[hook.PATCH_NAME].apply_patch()
    hook.install(ckpt)
    assert [w.__name__ for w in Manager.patches_info[hook.PATCH_NAME].wrappers] == [
        "lora_wrapper", "streamconv_load_base_checkpoint_wrapper"]
    Manager.patches_info[hook.PATCH_NAME].apply_patch()                   # MindSpeed applies again
    assert hook._is_hooked(ckpt._load_base_checkpoint)


@pytest.mark.slow   # a child process importing torch and megatron-core: ~15 s
def test_launch_runs_the_script_with_the_hook(prepared, tmp_path):
    """``python -m streamconv.launch script.py ARGS``: the unchanged script imports Megatron's checkpointing and
    calls load_checkpoint; the rank it gets is the reference's."""
    root, want = prepared
    rel = "iter_0000001/mp_rank_01_000_001/model_optim_rng.pt"
    script = tmp_path / "pretrain.py"
    script.write_text(
        "import argparse, sys, torch\n"
        "from megatron.core import parallel_state as mpu\n"
        "import megatron.training.checkpointing as ckpt\n"
        "from tests.e2e.test_loader import skeletons\n"
        "for f, r in (('tensor', 1), ('pipeline', 0), ('expert', 1)):\n"
        "    getattr(mpu, f'set_{f}_model_parallel_world_size')(2); getattr(mpu, f'set_{f}_model_parallel_rank')(r)\n"
        "ckpt._GLOBAL_ARGS = argparse.Namespace(load=sys.argv[1], finetune=True, no_load_optim=True,\n"
        "                                       no_load_rng=True)\n"
        "want = torch.load(sys.argv[2], weights_only=True)\n"
        "models = skeletons(want)\n"
        "print('iteration', ckpt.load_checkpoint(models, None, None)[0])\n"
        "for i, m in enumerate(models):\n"
        "    for k, v in m.state_dict().items():\n"
        "        assert torch.equal(v.view(torch.uint8), want[f'model{i}'][k].view(torch.uint8)), k\n"
        "print('hooked', getattr(ckpt._load_base_checkpoint, '_streamconv_hook', False))\n")
    ref = tmp_path / "want.pt"
    torch.save(want[rel], ref)
    repo = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([STANDIN, repo, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-W", "ignore", "-m", "streamconv.launch", str(script),
                          str(root / "from-plan"), str(ref)], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "iteration 0" in out.stdout and "hooked True" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "streamconv.launch"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "usage: python -m streamconv.launch" in bad.stderr


def test_prepare_load_refusals(prepared, tmp_path, tiny_hf, capsys):
    root, _ = prepared
    plan = str(root / "plan.json")
    assert cli(["prepare-load", plan, "--save-dir", str(tmp_path / "a"), "--moe-grouped-gemm"]) == 2
    assert "layout flags come from the plan" in capsys.readouterr().err
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "weights.pt").write_bytes(b"x")
    assert cli(["prepare-load", plan, "--save-dir", str(tmp_path / "b")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert cli(["prepare-load", "--save-dir", str(tmp_path / "c")]) == 2
    assert cli(["prepare-load", "--load-dir", tiny_hf["fp8"], "--save-dir", str(tmp_path / "d"),
                "--target-tensor-parallel-size", "3"]) == 2
    assert "does not divide" in capsys.readouterr().err
    assert not (tmp_path / "d").exists() and not (tmp_path / "a").exists()


def test_a_plan_changed_after_prepare_load_is_refused(prepared, tmp_path, ckpt, parallel_state):
    root, _ = prepared
    plan = tmp_path / "plan.json"
    plan.write_bytes((root / "plan.json").read_bytes())
    assert cli(["prepare-load", str(plan), "--save-dir", str(tmp_path / "load")]) == 0
    plan.write_bytes(plan.read_bytes().replace(b'"created_by":"', b'"created_by":"edited '))
    hook.install(ckpt)
    parallel_state(0, 0, 0)
    with pytest.raises(PlanError, match="changed since `streamconv prepare-load`"):
        ckpt._load_base_checkpoint(str(tmp_path / "load"), megatron_args(str(tmp_path / "load")), rank0=False)


SOURCES = [p for p in os.environ.get("STREAMCONV_MEGATRON_SOURCES", "").split(os.pathsep) if p]


@pytest.mark.skipif(not SOURCES, reason="STREAMCONV_MEGATRON_SOURCES (checkpointing.py files of Megatron-LM "
                                        "checkouts, ':'-separated) is not set")
@pytest.mark.parametrize("path", SOURCES)
def test_real_megatron_sources_have_the_contract_the_hook_assumes(path):
    """Against Megatron-LM's own checkpointing.py: ``_load_base_checkpoint``'s leading parameters, the tuple
    length of every literal return, and that ``load_checkpoint`` calls it by its module-global name."""
    tree = ast.parse(open(path).read())
    fns = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    base = fns["_load_base_checkpoint"]
    params = [a.arg for a in base.args.args]
    with_args = params[:3] == ["load_dir", "args", "rank0"]
    assert with_args or params[:2] == ["load_dir", "rank0"], params
    lengths = {len(r.value.elts) for r in ast.walk(base)
               if isinstance(r, ast.Return) and isinstance(r.value, ast.Tuple)}
    assert lengths == ({4} if with_args else {3}), lengths
    calls = [c for c in ast.walk(fns["load_checkpoint"]) if isinstance(c, ast.Call)
             and isinstance(c.func, ast.Name) and c.func.id == "_load_base_checkpoint"]
    assert calls and all(any(k.arg == "rank0" for k in c.keywords) for c in calls)
