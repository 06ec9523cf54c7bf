"""Bad input: one clear error naming the tensor or file, raised before anything is written."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from streamconv.errors import PlanError, StreamconvError, ValidationError
from streamconv.execute import executor
from streamconv.execute.executor import RunOptions, run_plan
from streamconv.layout.parallel import ParallelSizes
from streamconv.layout.options import McoreOptions
from streamconv.plan.plan import Plan
from streamconv.plan.planner import plan_hf_to_mcore


@pytest.fixture
def hf(tiny_hf, tmp_path):
    """A private copy of the tiny FP8 checkpoint that a test may damage."""
    d = str(tmp_path / "hf")
    shutil.copytree(tiny_hf["fp8"], d)
    return d


def index(d):
    with open(os.path.join(d, "model.safetensors.index.json")) as f:
        return json.load(f)


def write_index(d, obj):
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump(obj, f)


def shard_of(d, name):
    return os.path.join(d, index(d)["weight_map"][name])


def rewrite_shard(path, edit):
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def convert(hf_dir, out, tp=1, pp=1, ep=1, mtp=0, **kw):
    plan = plan_hf_to_mcore(hf_dir, out, ParallelSizes(tp, pp, ep), McoreOptions(mtp_num_layers=mtp, **kw))
    return run_plan(plan)


def expect_error(tmp_path, hf_dir, match, *, exc=StreamconvError, **kw):
    out = str(tmp_path / "out")
    with pytest.raises(exc, match=match):
        convert(hf_dir, out, **kw)
    assert not os.path.exists(out), "nothing may be written on a validation error"


@pytest.mark.parametrize("kw,match", [
    (dict(tp=8), r"--target-tensor-parallel-size 8 does not divide num_attention_heads = 4"),
    (dict(ep=3), r"--target-expert-parallel-size 3 does not divide n_routed_experts = 8"),
    (dict(pp=3), r"--num-layers 4 is not divisible by --target-pipeline-parallel-size 3"),
    (dict(mtp=2), r"--mtp-num-layers 2: the checkpoint has 1 MTP layer"),
    (dict(num_layers=9), r"--num-layers 9 leaves 9 real layers \(noop slots excluded\); the checkpoint has 4"),
    (dict(first_k_dense_replace=3), r"--first-k-dense-replace 3: must be between 0 and"),
])
def test_contradictory_flags(tiny_hf, tmp_path, kw, match):
    expect_error(tmp_path, tiny_hf["fp8"], match, exc=ValidationError, **kw)


def test_all_problems_listed_at_once(tiny_hf, tmp_path):
    with pytest.raises(ValidationError) as info:
        convert(tiny_hf["fp8"], str(tmp_path / "out"), tp=8, ep=3)
    assert len(info.value.problems) >= 2


def test_missing_shard(hf, tmp_path):
    victim = shard_of(hf, "lm_head.weight")
    os.remove(victim)
    expect_error(tmp_path, hf, rf"{os.path.basename(victim)}: shard named by model.safetensors.index.json is missing")


def test_truncated_shard(hf, tmp_path):
    victim = shard_of(hf, "model.layers.2.mlp.experts.3.up_proj.weight")
    size = os.path.getsize(victim)
    with open(victim, "r+b") as f:
        f.truncate(size - 100)
    expect_error(tmp_path, hf, rf"{os.path.basename(victim)}: .*outside the file.*truncated")


def test_corrupt_header(hf, tmp_path):
    victim = shard_of(hf, "model.norm.weight")
    with open(victim, "r+b") as f:
        f.seek(8)
        f.write(b"#garbage#")
    expect_error(tmp_path, hf, rf"{os.path.basename(victim)}: header is not valid JSON")


def test_oversized_header_length(hf, tmp_path):
    victim = shard_of(hf, "model.norm.weight")
    with open(victim, "r+b") as f:
        f.write((1 << 40).to_bytes(8, "little"))
    expect_error(tmp_path, hf, rf"{os.path.basename(victim)}: header length \d+ exceeds")


def test_missing_tensor(hf, tmp_path):
    name = "model.layers.3.self_attn.q_a_layernorm.weight"
    rewrite_shard(shard_of(hf, name), lambda t: t.pop(name))
    idx = index(hf)
    del idx["weight_map"][name]
    write_index(hf, idx)
    expect_error(tmp_path, hf, rf"{name}: missing from the checkpoint")


def test_unexpected_tensor(hf, tmp_path):
    path = shard_of(hf, "model.norm.weight")
    rewrite_shard(path, lambda t: t.__setitem__("model.layers.99.mystery.weight", torch.zeros(4)))
    idx = index(hf)
    idx["weight_map"]["model.layers.99.mystery.weight"] = os.path.basename(path)
    write_index(hf, idx)
    expect_error(tmp_path, hf, r"model.layers.99.mystery.weight: unexpected tensor")


def test_tensor_in_two_shards(hf, tmp_path):
    name = "model.norm.weight"
    home = shard_of(hf, name)
    other = next(p for p in sorted(set(index(hf)["weight_map"].values())) if p != os.path.basename(home))
    value = load_file(home)[name]
    rewrite_shard(os.path.join(hf, other), lambda t: t.__setitem__(name, value))
    expect_error(tmp_path, hf, rf"{name}: stored in two shards")


def test_index_names_tensor_absent_from_shard(hf, tmp_path):
    idx = index(hf)
    name = "model.norm.weight"
    wrong = next(s for s in sorted(set(idx["weight_map"].values())) if s != idx["weight_map"][name])
    idx["weight_map"][name] = wrong
    write_index(hf, idx)
    expect_error(tmp_path, hf, rf"{name}: model.safetensors.index.json places it in {wrong}")


def test_shape_disagrees_with_config(hf, tmp_path):
    with open(os.path.join(hf, "config.json")) as f:
        cfg = json.load(f)
    cfg["q_lora_rank"] = 64
    with open(os.path.join(hf, "config.json"), "w") as f:
        json.dump(cfg, f)
    expect_error(tmp_path, hf, r"self_attn.q_a_proj.weight: shape \[48, 192\] disagrees with config.json "
                               r"\(expected \[64, 192\]\)")


def test_unsupported_dtype(hf, tmp_path):
    name = "model.layers.1.input_layernorm.weight"
    rewrite_shard(shard_of(hf, name), lambda t: t.__setitem__(name, t[name].to(torch.int32)))
    expect_error(tmp_path, hf, rf"{name}: unsupported dtype int32")


def test_fp8_weight_without_scales(hf, tmp_path):
    name = "model.layers.1.self_attn.o_proj.weight"
    scale = name + "_scale_inv"
    rewrite_shard(shard_of(hf, scale), lambda t: t.pop(scale))
    idx = index(hf)
    del idx["weight_map"][scale]
    write_index(hf, idx)
    expect_error(tmp_path, hf, rf"{name}: FP8 weight without {scale}")


def test_missing_config(hf, tmp_path):
    os.remove(os.path.join(hf, "config.json"))
    expect_error(tmp_path, hf, r"config.json: missing")


def test_output_dir_not_empty(tiny_hf, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    plan = plan_hf_to_mcore(tiny_hf["bf16"], str(out), ParallelSizes(), McoreOptions())
    with pytest.raises(ValidationError, match="output directory is not empty.*--overwrite"):
        run_plan(plan)
    assert os.listdir(out) == ["keep.txt"]
    run_plan(plan, RunOptions(overwrite=True))
    assert (out / "keep.txt").read_text() == "precious"
    assert (out / "latest_checkpointed_iteration.txt").read_bytes() == b"1"


def test_not_enough_disk(tiny_hf, tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    plan = plan_hf_to_mcore(tiny_hf["bf16"], out, ParallelSizes(), McoreOptions())

    class Usage:
        free = 1000

    monkeypatch.setattr(executor.shutil, "disk_usage", lambda p: Usage)
    with pytest.raises(ValidationError, match=r"the plan writes .* GB but only 0.00 GB are free"):
        run_plan(plan)
    assert not os.path.exists(out)


def test_stale_plan_refused(hf, tmp_path):
    out = str(tmp_path / "out")
    plan = plan_hf_to_mcore(hf, out, ParallelSizes(), McoreOptions())
    plan.save(str(tmp_path / "plan.json"))
    # Plans record each source file's size and header digest (not a checksum of the data: that would
    # mean reading every byte at planning time).
    victim = shard_of(hf, "model.layers.1.input_layernorm.weight")
    with open(victim, "ab") as f:
        f.write(b"\0" * 8)
    with pytest.raises(ValidationError, match=rf"{os.path.basename(victim)}: changed since the plan was made"):
        run_plan(Plan.load(str(tmp_path / "plan.json")))
    assert not os.path.exists(out)


@pytest.mark.parametrize("bad", ["../escape.pt", "/abs/model.pt", "a/../../b.pt", "./x.pt"])
def test_plan_paths_cannot_escape_target(tiny_hf, tmp_path, bad):
    plan = plan_hf_to_mcore(tiny_hf["bf16"], str(tmp_path / "out"), ParallelSizes(), McoreOptions())
    obj = plan.to_json()
    obj["target"]["files"][0]["path"] = bad
    with pytest.raises(PlanError, match="output path"):
        Plan.from_json(obj)


def test_plan_schema_version_checked(tiny_hf, tmp_path):
    plan = plan_hf_to_mcore(tiny_hf["bf16"], str(tmp_path / "out"), ParallelSizes(), McoreOptions())
    obj = plan.to_json()
    obj["schema_version"] = 999
    with pytest.raises(PlanError, match="schema_version 999"):
        Plan.from_json(obj)


def test_coverage_every_source_tensor_accounted(tiny_hf, tmp_path):
    """Consumed or dropped with a reason: nothing else (spec §3.8)."""
    plan = plan_hf_to_mcore(tiny_hf["fp8"], str(tmp_path / "out"), ParallelSizes(1, 2, 1), McoreOptions(mtp_num_layers=1))
    dropped = {d.name: d.reason for d in plan.dropped}
    assert set(dropped) == {"model.layers.4.shared_head.head.weight"}
    plan0 = plan_hf_to_mcore(tiny_hf["fp8"], str(tmp_path / "out"), ParallelSizes(), McoreOptions())
    dropped0 = {d.name for d in plan0.dropped}
    assert all(n.startswith("model.layers.4.") for n in dropped0)
    assert "model.layers.4.self_attn.q_b_proj.weight_scale_inv" in dropped0
    assert "model.layers.4.embed_tokens.weight" in dropped0
