"""mcore2mcore carries a LoRA adapter: a checkpoint holding base and factors (what training saves without
``--lora-ckpt-filter``) resharded into another layout holds, in every rank file, key for key and byte for byte,
what the tests' eager LoRA reference writes for the target layout from the same HF-level factors
(``tests/lora_reference.py``: factors split per rank by the eager base reference, no streamconv code).  The
bases are never merged, the factors never dropped unless their weight is."""

from __future__ import annotations

import glob
import os

import pytest
import torch

from streamconv.cli.main import main
from streamconv.errors import ValidationError
from streamconv.execute.executor import run_plan
from streamconv.plan.lora import LoraOptions
from streamconv.plan.mcore2hf import plan_mcore_to_hf
from streamconv.plan.mcore2mcore import plan_mcore_to_mcore
from streamconv.plan.planner import plan_hf_to_mcore
from tests import lora_reference as L
from tests.e2e.test_lora import ALL, MM_SPLIT, RUN, assert_same, expected_merged, load_dir, split_layout
from tests.reference import load_hf

FFN = ("linear_fc1", "linear_fc2", "eh_proj")
MM_SPLIT_ALL = MM_SPLIT + FFN


def type1(hf_dir: str, work, case: dict, factors: dict, targets, qlora_nf4=None, **spelling) -> str:
    """The reference's LoRA checkpoint of ``case``: a base from hf2mcore, factors split by the eager reference."""
    sizes, o = split_layout(case)
    base = str(work / "base")
    run_plan(plan_hf_to_mcore(hf_dir, base, sizes, o, qlora_nf4=qlora_nf4), RUN)
    pieces = L.split_factors(hf_dir, factors, targets, str(work / "split"), **case)
    return L.write_lora_checkpoint(base, str(work / "type1"), pieces, kind="type1", **spelling)


def rank_files(root: str) -> dict[str, dict]:
    return {os.path.relpath(p, root): torch.load(p, weights_only=True)
            for p in sorted(glob.glob(os.path.join(root, "iter_*", "*", "model_optim_rng.pt")))}


def assert_same_ranks(got_root: str, want_root: str) -> None:
    got, want = rank_files(got_root), rank_files(want_root)
    assert sorted(got) == sorted(want)
    for path, obj in want.items():
        groups = [g for g in obj if g.startswith("model")]
        assert [g for g in got[path] if g.startswith("model")] == groups, path
        for g in groups:
            assert list(got[path][g]) == list(obj[g]), (path, g)     # the same keys in the same order
            for key, t in obj[g].items():
                mine = got[path][g][key]
                assert mine.dtype == t.dtype and mine.shape == t.shape, (path, key)
                assert torch.equal(mine.contiguous().view(-1).view(torch.uint8),
                                   t.contiguous().view(-1).view(torch.uint8)), (path, key)


def reshard(src: str, out: str, source: dict, target: dict, hf_dir: str):
    plan = plan_mcore_to_mcore(src, out, *split_layout(source), *split_layout(target), hf_config_dir=hf_dir)
    run_plan(plan, RUN)
    return plan


CASES = [
    # grouped GEMM -> local experts, TP 2 -> 1, PP 2 -> 1, MTP carried
    (dict(tp=2, pp=2, ep=2, moe_grouped_gemm=True, mtp_num_layers=1), ALL,
     dict(tp=1, ep=1, mtp_num_layers=1), ALL),
    # local -> grouped GEMM at TP 4 PP 2, with --mla-mm-split and the legacy names on the target: each part's
    # module gets the one A and its rows of B
    (dict(tp=2, ep=2, mtp_num_layers=1), ALL,
     dict(tp=4, pp=2, ep=2, moe_grouped_gemm=True, mla_mm_split=True, mla_key_names="legacy", mtp_num_layers=1),
     MM_SPLIT_ALL),
    # VPP chunks (model0/model1) -> tp-extend-ep (whole experts in EP x TP buckets)
    (dict(pp=2, vpp_layers=1, moe_grouped_gemm=True), ALL,
     dict(tp=2, ep=2, moe_tp_extend_ep=True, moe_grouped_gemm=True), ALL),
    # expert-TP 1 -> dualpipev
    (dict(tp=2, ep=2, expert_tensor_parallel_size=1, moe_grouped_gemm=True, mtp_num_layers=1), ALL,
     dict(pp=2, dualpipev=True, num_layers=4, mtp_num_layers=1), ALL),
]


def _id(case) -> str:
    return ",".join(f"{k}={v}" for k, v in case.items())


@pytest.mark.parametrize("source,source_targets,target,target_targets", CASES,
                         ids=[_id(c[0]) + "->" + _id(c[2]) for c in CASES])
def test_reshard_carries_the_adapter(tiny_hf, tmp_path, source, source_targets, target, target_targets):
    hf_dir = tiny_hf["bf16"]
    _, hf = load_hf(hf_dir)
    factors = L.make_factors(hf, source_targets)
    src = type1(hf_dir, tmp_path / "a", source, factors, source_targets)
    want = type1(hf_dir, tmp_path / "b", target, factors, target_targets)
    reshard(src, str(tmp_path / "out"), source, target, hf_dir)
    assert_same_ranks(str(tmp_path / "out"), want)


def test_training_loads_the_resharded_adapter_without_the_files(tiny_hf, tmp_path):
    """open_rank of the saved LoRA reshard plan: each rank's base and factors, byte for byte the rank file the
    plan writes (a job in the new layout loads straight from the old checkpoint)."""
    from streamconv.loader import open_rank, rank_paths

    hf_dir = tiny_hf["bf16"]
    _, hf = load_hf(hf_dir)
    factors = L.make_factors(hf, ALL)
    source, target = dict(tp=2, ep=2, moe_grouped_gemm=True, mtp_num_layers=1), dict(tp=1, ep=2, mtp_num_layers=1)
    src = type1(hf_dir, tmp_path / "a", source, factors, ALL)
    plan = reshard(src, str(tmp_path / "out"), source, target, hf_dir)
    plan.save(str(tmp_path / "reshard.json"))
    written = rank_files(str(tmp_path / "out"))
    for rel in rank_paths(plan):
        ep = int(rel.split("/")[1].split("_")[-1])
        got = open_rank(str(tmp_path / "reshard.json"), ep_rank=ep).state_dict()
        assert any(".lora_A.default.weight" in k for k in got["model"])
        for key, t in written[rel]["model"].items():
            assert torch.equal(got["model"][key].view(-1).view(torch.uint8), t.view(-1).view(torch.uint8)), key
        assert list(got["model"]) == list(written[rel]["model"])


def test_other_spellings_come_out_in_pefts(tiny_hf, tmp_path):
    """A source with the lower-case lora_a/lora_b spelling and Transformer Engine _extra_state entries: the
    output holds PEFT's names (lora_A.default / lora_B.default) and no _extra_state, as hf2mcore writes none."""
    hf_dir = tiny_hf["bf16"]
    _, hf = load_hf(hf_dir)
    factors = L.make_factors(hf, ALL)
    source, target = dict(tp=2, ep=2, mtp_num_layers=1), dict(tp=1, ep=2, mtp_num_layers=1)
    src = type1(hf_dir, tmp_path / "a", source, factors, ALL, lower=True, extra_state=True)
    want = type1(hf_dir, tmp_path / "b", target, factors, ALL)
    reshard(src, str(tmp_path / "out"), source, target, hf_dir)
    assert_same_ranks(str(tmp_path / "out"), want)


def test_qwen3_moe_groups_and_the_cli(tmp_path):
    """Qwen3-MoE's linear_qkv (B's rows regrouped by whole query groups) through the CLI; the resharded adapter
    merges (mcore2hf) into exactly the eager merge of the HF factors."""
    from tests.hf_tiny_families import build_tiny_qwen3_moe

    hf_dir = str(tmp_path / "qwen")
    build_tiny_qwen3_moe(hf_dir)
    targets = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
    _, hf = load_hf(hf_dir)
    factors = L.make_factors(hf, targets)
    source, target = dict(tp=2, ep=2, moe_grouped_gemm=True), dict(ep=4)
    src = type1(hf_dir, tmp_path / "a", source, factors, targets)
    want = type1(hf_dir, tmp_path / "b", target, factors, targets)
    out = str(tmp_path / "out")
    assert main(["convert", "mcore2mcore", "--load-dir", src, "--save-dir", out, "--hf-config", hf_dir,
                 "--source-tensor-parallel-size", "2", "--source-expert-parallel-size", "2",
                 "--source-moe-grouped-gemm", "--target-expert-parallel-size", "4", "--no-progress"]) == 0
    assert_same_ranks(out, want)
    merged = str(tmp_path / "merged")
    sizes, o = split_layout(target)
    lora = LoraOptions(r=L.R, alpha="16")
    run_plan(plan_mcore_to_hf(out, merged, sizes, o, hf_config_dir=hf_dir, lora=lora), RUN)
    assert_same(load_dir(merged), L.merged_hf(hf, factors, 16))


def test_a_dropped_weight_drops_its_adapter_with_the_reason(tiny_hf, tmp_path):
    """Target without MTP: the MTP layer's weights and their LoRA are dropped together, and the plan says so."""
    hf_dir = tiny_hf["bf16"]
    _, hf = load_hf(hf_dir)
    factors = L.make_factors(hf, ALL)
    source, target = dict(tp=2, ep=2, mtp_num_layers=1), dict(ep=2, moe_grouped_gemm=True)
    src = type1(hf_dir, tmp_path / "a", source, factors, ALL)
    want = type1(hf_dir, tmp_path / "b", target, factors, ALL)
    plan = reshard(src, str(tmp_path / "out"), source, target, hf_dir)
    assert_same_ranks(str(tmp_path / "out"), want)
    dropped = {d.name: d.reason for d in plan.dropped}
    assert dropped["model.layers.4.eh_proj.lora_A/lora_B"].startswith("LoRA of a dropped weight: MTP layer 0")
    # and the merge of what was carried is the eager merge of the layers kept
    merged = str(tmp_path / "merged")
    run_plan(plan_mcore_to_hf(str(tmp_path / "out"), merged, *split_layout(target), hf_config_dir=hf_dir,
                              lora=LoraOptions(r=L.R, alpha="16")), RUN)
    assert_same(load_dir(merged), expected_merged(hf_dir, factors, target))


def refused(tmp_path, match: str, src: str, source: dict, target: dict, hf_dir: str) -> None:
    out = tmp_path / "out"
    with pytest.raises(ValidationError, match=match) as info:
        plan_mcore_to_mcore(src, str(out), *split_layout(source), *split_layout(target), hf_config_dir=hf_dir)
    assert "\n" not in str(info.value) and not out.exists()


def test_mla_mm_split_parts_with_lora_are_refused(tiny_hf, tmp_path):
    hf_dir = tiny_hf["bf16"]
    _, hf = load_hf(hf_dir)
    source = dict(tp=2, mla_mm_split=True, mtp_num_layers=1)
    src = type1(hf_dir, tmp_path / "a", source, L.make_factors(hf, MM_SPLIT), MM_SPLIT)
    refused(tmp_path, r"LoRA on --mla-mm-split's linear_kv_nope, linear_qk_nope, linear_qk_rope, linear_v: each "
                      r"part has its own A", src, source, dict(tp=1, mtp_num_layers=1), hf_dir)


def test_an_nf4_base_is_refused(tiny_hf, tmp_path):
    """An NF4 base, alone (hf2mcore --qlora-nf4) or in a QLoRA training checkpoint (under base_layer): refused
    naming the weight, nothing written (its blocks follow the rank pieces: resharding would change it)."""
    hf_dir = tiny_hf["bf16"]
    _, hf = load_hf(hf_dir)
    source = dict(tp=2, ep=2, moe_grouped_gemm=True)
    targets = ("linear_qkv", "linear_proj")
    src = type1(hf_dir, tmp_path / "a", source, L.make_factors(hf, targets), targets, qlora_nf4="npu")
    nf4 = r": an NF4 \(QLoRA\) base weight \(\d+ in the source\)\. NF4 blocks follow each rank's piece"
    refused(tmp_path, r"linear_qkv.base_layer.weight" + nf4, src, source, dict(tp=1), hf_dir)
    refused(tmp_path, r"linear_qkv.weight" + nf4, str(tmp_path / "a" / "base"), source, dict(tp=1), hf_dir)


def type2(hf_dir: str, work, case: dict, factors: dict, targets) -> tuple[str, str]:
    """(base, LoRA-only checkpoint) of ``case``, as training with --lora-ckpt-filter leaves them."""
    sizes, o = split_layout(case)
    base = str(work / "base")
    run_plan(plan_hf_to_mcore(hf_dir, base, sizes, o), RUN)
    pieces = L.split_factors(hf_dir, factors, targets, str(work / "split"), **case)
    return base, L.write_lora_checkpoint(base, str(work / "type2"), pieces, kind="type2")


@pytest.mark.parametrize("source,target", [
    (dict(tp=2, ep=2, moe_grouped_gemm=True, mtp_num_layers=1), dict(tp=4, pp=2, ep=1, mtp_num_layers=1)),
    (dict(pp=2, vpp_layers=1), dict(tp=2, ep=2, expert_tensor_parallel_size=1, moe_grouped_gemm=True)),
], ids=["gemm-tp2ep2->tp4pp2", "vpp->etp1"])
def test_a_lora_only_checkpoint_is_resharded_alone(tiny_hf, tmp_path, source, target):
    """--lora-load: the LoRA-only checkpoint resharded LoRA-only, equal to the reference's at the target; only
    the adapter's files are read; it merges (mcore2hf --lora-load) into a base converted in the target layout
    exactly as the eager merge says."""
    hf_dir = tiny_hf["bf16"]
    _, hf = load_hf(hf_dir)
    factors = L.make_factors(hf, ALL)
    base, lora = type2(hf_dir, tmp_path / "a", source, factors, ALL)
    target_base, want = type2(hf_dir, tmp_path / "b", target, factors, ALL)
    out = str(tmp_path / "out")
    plan = plan_mcore_to_mcore(base, out, *split_layout(source), *split_layout(target), hf_config_dir=hf_dir,
                               lora_load=lora)
    assert plan.source_root == lora and all(not f.name.startswith("..") for f in plan.source_files)
    run_plan(plan, RUN)
    assert_same_ranks(out, want)
    merged = str(tmp_path / "merged")
    run_plan(plan_mcore_to_hf(target_base, merged, *split_layout(target), hf_config_dir=hf_dir,
                              lora=LoraOptions(r=L.R, alpha="16", load=out)), RUN)
    assert_same(load_dir(merged), expected_merged(hf_dir, factors, target))


def test_lora_load_through_the_cli_and_its_refusals(tiny_hf, tmp_path, capsys):
    hf_dir = tiny_hf["bf16"]
    _, hf = load_hf(hf_dir)
    factors = L.make_factors(hf, ALL)
    base, lora = type2(hf_dir, tmp_path / "a", dict(tp=2), factors, ALL)
    args = ["convert", "mcore2mcore", "--load-dir", base, "--lora-load", lora, "--hf-config", hf_dir,
            "--source-tensor-parallel-size", "2", "--no-progress"]
    assert main(args + ["--save-dir", str(tmp_path / "out")]) == 0
    assert_same_ranks(str(tmp_path / "out"), type2(hf_dir, tmp_path / "b", dict(), factors, ALL)[1])
    # a LoRA-only checkpoint of another layout; the save dir inside an input
    _, other = type2(hf_dir, tmp_path / "c", dict(), factors, ALL)
    assert main(["convert", "mcore2mcore", "--load-dir", base, "--lora-load", other, "--hf-config", hf_dir,
                 "--source-tensor-parallel-size", "2", "--no-progress", "--save-dir", str(tmp_path / "x")]) == 2
    assert main(args + ["--save-dir", os.path.join(lora, "inside")]) == 2
    # --lora-load naming nothing, or a file
    for bad in (str(tmp_path / "nowhere"), os.path.join(lora, "latest_checkpointed_iteration.txt")):
        assert main(["convert", "mcore2mcore", "--load-dir", base, "--lora-load", bad, "--hf-config", hf_dir,
                     "--source-tensor-parallel-size", "2", "--no-progress", "--save-dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(e.startswith("streamconv: error:") for e in err)
    assert "--lora-load" in err[1] and "nowhere" in err[2] and "latest_checkpointed_iteration.txt" in err[3]
    assert not (tmp_path / "x").exists() and not os.path.exists(os.path.join(lora, "inside"))
