"""HF -> mcore end to end: every byte of every rank file equals the independent eager reference.

The matrix is TP 1/2/4 x PP 1/2 x EP 1/2/4 x grouped GEMM x MTP 0/1 x bf16/FP8 source.  A representative
subset runs by default; the full matrix is marked slow (`make test-slow`).
"""

import itertools
import os

import pytest
import torch

from streamconv.execute.executor import RunOptions, run_plan
from streamconv.layout.parallel import ParallelSizes
from streamconv.layout.options import McoreOptions
from streamconv.plan.plan import Plan
from streamconv.plan.planner import plan_hf_to_mcore
from tests.reference import assert_same_checkpoint, load_mcore_dir, reference_hf_to_mcore

KiB = 1024

FULL = list(itertools.product(("bf16", "fp8"), (1, 2, 4), (1, 2), (1, 2, 4), (False, True), (0, 1)))
# (source, tp, pp, ep, grouped_gemm, mtp): each value of every axis appears, with the DeepSeek training
# combination (grouped GEMM + MTP + PP>1) in both source formats.
SUBSET = [
    ("bf16", 1, 1, 1, False, 0),
    ("bf16", 2, 2, 2, True, 1),
    ("bf16", 4, 1, 4, False, 1),
    ("bf16", 1, 2, 4, True, 0),
    ("fp8", 1, 1, 1, True, 1),
    ("fp8", 2, 2, 2, True, 1),
    ("fp8", 4, 2, 1, False, 0),
    ("fp8", 2, 1, 4, False, 1),
]


def convert(hf_dir, out_dir, tp, pp, ep, gg, mtp, **run_kw):
    plan = plan_hf_to_mcore(hf_dir, out_dir, ParallelSizes(tp, pp, ep),
                            McoreOptions(moe_grouped_gemm=gg, mtp_num_layers=mtp))
    # Through JSON and back: what runs is what a saved plan holds.
    path = out_dir + ".plan.json"
    plan.save(path)
    run_plan(Plan.load(path), RunOptions(**run_kw))
    return plan


def check(tiny_hf, tmp_path, source, tp, pp, ep, gg, mtp, **run_kw):
    out = str(tmp_path / "mcore")
    convert(tiny_hf[source], out, tp, pp, ep, gg, mtp, **run_kw)
    expected = reference_hf_to_mcore(tiny_hf[source], tp=tp, pp=pp, ep=ep, moe_grouped_gemm=gg,
                                     mtp_num_layers=mtp)
    assert_same_checkpoint(load_mcore_dir(out), expected)


@pytest.mark.parametrize("source,tp,pp,ep,gg,mtp", SUBSET)
def test_matches_reference(tiny_hf, tmp_path, source, tp, pp, ep, gg, mtp):
    check(tiny_hf, tmp_path, source, tp, pp, ep, gg, mtp)


@pytest.mark.slow
@pytest.mark.parametrize("source,tp,pp,ep,gg,mtp", [c for c in FULL if c not in SUBSET])
def test_matches_reference_full_matrix(tiny_hf, tmp_path, source, tp, pp, ep, gg, mtp):
    check(tiny_hf, tmp_path, source, tp, pp, ep, gg, mtp)


@pytest.mark.parametrize("scheduler", ["sync", "threads"])
def test_tiny_bands_and_memory_budget_give_same_bytes(tiny_hf, tmp_path, scheduler):
    """Bands of a few rows (pushed down to row reads, cutting FP8 blocks) and a budget of a few waves."""
    check(tiny_hf, tmp_path, "fp8", 2, 2, 2, True, 1, band_bytes=3 * KiB, max_memory=4 * 1024 * KiB,
          scheduler=scheduler)


def test_output_is_deterministic(tiny_hf, tmp_path):
    """Whatever the completion order, files are byte-identical (fixed layouts, pwrite at fixed offsets)."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    convert(tiny_hf["fp8"], a, 2, 1, 2, True, 1, scheduler="threads", num_workers=4)
    convert(tiny_hf["fp8"], b, 2, 1, 2, True, 1, scheduler="sync", band_bytes=5 * KiB)
    journal = ".streamconv_journal.jsonl"  # run bookkeeping (timestamps), not checkpoint content
    files_a = sorted(os.path.relpath(os.path.join(d, f), a) for d, _, fs in os.walk(a) for f in fs if f != journal)
    files_b = sorted(os.path.relpath(os.path.join(d, f), b) for d, _, fs in os.walk(b) for f in fs if f != journal)
    assert files_a == files_b
    for rel in files_a:
        with open(os.path.join(a, rel), "rb") as fa, open(os.path.join(b, rel), "rb") as fb:
            assert fa.read() == fb.read(), rel


def test_rank_file_loads_with_weights_only_and_mmap(tiny_hf, tmp_path):
    out = str(tmp_path / "mcore")
    convert(tiny_hf["bf16"], out, 2, 2, 2, True, 1)
    expected = reference_hf_to_mcore(tiny_hf["bf16"], tp=2, pp=2, ep=2, moe_grouped_gemm=True, mtp_num_layers=1)
    with open(os.path.join(out, "latest_checkpointed_iteration.txt"), "rb") as f:
        assert f.read() == b"1"
    for rel, want in expected.items():
        if not rel.endswith(".pt"):
            continue
        got = torch.load(os.path.join(out, rel), map_location="cpu", weights_only=True, mmap=True)
        assert list(got) == ["model", "checkpoint_version", "iteration"]
        assert got["checkpoint_version"] == 3.0 and isinstance(got["checkpoint_version"], float)
        assert got["iteration"] == 1
        assert set(got["model"]) == set(want["model"])
        for k, t in want["model"].items():
            assert got["model"][k].dtype == t.dtype and torch.equal(got["model"][k], t), (rel, k)
        if "mp_rank_00_001_000" in rel:  # last stage: fp32 expert bias survives, MTP keys present
            assert got["model"]["decoder.layers.1.mlp.router.expert_bias"].dtype == torch.float32
            assert "final_layernorm.weight" in got["model"] and "mtp.layers.0.eh_proj.weight" in got["model"]


def test_independent_fixture_builder(tmp_path):
    """Cross-check on checkpoints written by the tests' own builder (not the package's generator),
    including NaN payloads and -0.0, which must survive bit for bit."""
    from tests.hf_tiny import build_tiny_hf

    for fp8 in (False, True):
        hf = str(tmp_path / f"hf{fp8}")
        build_tiny_hf(hf, fp8=fp8, special_values=not fp8)
        out = str(tmp_path / f"out{fp8}")
        convert(hf, out, 2, 2, 2, True, 1)
        expected = reference_hf_to_mcore(hf, tp=2, pp=2, ep=2, moe_grouped_gemm=True, mtp_num_layers=1)
        assert_same_checkpoint(load_mcore_dir(out), expected)


def test_loader_pulls_a_rank_straight_from_the_plan(tiny_hf, tmp_path):
    """Training-time path: one rank's state dict materialised in-process equals the written file."""
    from streamconv.loader import load_rank, rank_paths

    out = str(tmp_path / "mcore")
    plan = convert(tiny_hf["fp8"], out, 2, 2, 2, True, 1)
    written = load_mcore_dir(out)
    for rel in rank_paths(plan):
        assert_same_checkpoint({rel: load_rank(plan, rel)}, {rel: written[rel]})
