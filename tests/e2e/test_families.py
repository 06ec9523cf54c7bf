"""DeepSeek-V3.2 and Qwen3-MoE end to end: every rank file byte for byte against the independent eager
reference (tests/reference_families.py, written from spec/mindspeed_v2_families.md), over TP 1/2/4 x PP 1/2 x
EP 1/2/4 x grouped GEMM (a subset by default, the rest marked slow) and the layout options; the families'
special cases (tied embeddings, the transformers-5 expert count, TP beyond the query groups) and refusals.
"""

import itertools
import os

import pytest

from streamconv import synth
from streamconv.errors import ValidationError
from streamconv.execute.executor import RunOptions, run_plan
from streamconv.layout.options import McoreOptions
from streamconv.layout.parallel import ParallelSizes
from streamconv.plan.mcore2hf import plan_mcore_to_hf
from streamconv.plan.planner import plan_hf_to_mcore
from tests.e2e.test_mcore2hf import digest, load_dir
from tests.hf_tiny_families import build_tiny_deepseek_v32, build_tiny_qwen3_moe
from tests.reference import assert_same_checkpoint, load_mcore_dir
from tests.reference_families import reference_hf_to_mcore_family

RUN = RunOptions(band_bytes=8192, max_memory=8 << 20)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """Generated tiny checkpoints (ours, TP up to 4) and independently built ones (tests/hf_tiny_families.py)."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for family in ("qwen3_moe", "deepseek_v32"):
        for fp8 in (False, True):
            d = str(root / f"{family}-{'fp8' if fp8 else 'bf16'}")
            synth.synth_checkpoint(d, synth.preset("tiny", family, fp8=fp8, max_shard_bytes=200_000))
            out[(family, fp8)] = d
    out["qwen-tied"] = str(root / "qwen-tied")
    build_tiny_qwen3_moe(out["qwen-tied"], tied=True)
    out["qwen-local-experts-key"] = str(root / "qwen-nle")
    build_tiny_qwen3_moe(out["qwen-local-experts-key"], experts_key="num_local_experts")
    out["v32-fp8-independent"] = str(root / "v32-fp8")
    build_tiny_deepseek_v32(out["v32-fp8-independent"], fp8=True)
    return out


def check(src, out, tp=1, pp=1, ep=1, **layout):
    plan = plan_hf_to_mcore(src, out, ParallelSizes(tp, pp, ep), McoreOptions(**layout))
    run_plan(plan, RUN)
    want = reference_hf_to_mcore_family(src, tp=tp, pp=pp, ep=ep, **layout)
    assert_same_checkpoint(load_mcore_dir(out), want)
    return plan


MATRIX = list(itertools.product((1, 2, 4), (1, 2), (1, 2, 4), (False, True)))
DEFAULT = {(1, 1, 1, False), (2, 2, 2, True), (4, 1, 2, True), (2, 1, 4, False), (4, 2, 4, True), (1, 2, 1, True)}


def matrix_params():
    for family in ("qwen3_moe", "deepseek_v32"):
        for tp, pp, ep, gg in MATRIX:
            marks = () if (tp, pp, ep, gg) in DEFAULT else (pytest.mark.slow,)
            yield pytest.param(family, tp, pp, ep, gg, marks=marks, id=f"{family}-tp{tp}-pp{pp}-ep{ep}-{'gg' if gg else 'local'}")


@pytest.mark.parametrize("family, tp, pp, ep, gg", list(matrix_params()))
def test_matrix_against_the_reference(hf, tmp_path, family, tp, pp, ep, gg):
    mtp = 1 if family == "deepseek_v32" else 0
    fp8 = (tp + pp + ep) % 2 == 1  # half the cases from the FP8 release format
    check(hf[(family, fp8)], str(tmp_path / "out"), tp=tp, pp=pp, ep=ep, moe_grouped_gemm=gg, mtp_num_layers=mtp)


LAYOUTS = [
    dict(tp=2, pp=2, ep=2, moe_grouped_gemm=True, vpp_layers=1),
    dict(tp=1, pp=2, ep=2, moe_grouped_gemm=True, noop_layers=(2, 5), num_layers=6),
    dict(tp=2, pp=2, ep=1, moe_grouped_gemm=True, num_layer_list=(1, 3)),
    dict(tp=2, pp=2, ep=2, moe_grouped_gemm=True, dualpipev=True, moe_tp_extend_ep=True),
    dict(tp=4, pp=1, ep=2, moe_grouped_gemm=True, expert_tensor_parallel_size=1),
    dict(tp=2, pp=1, ep=4, moe_grouped_gemm=False, expert_tensor_parallel_size=1),
    dict(tp=2, pp=1, ep=2, moe_grouped_gemm=True, moe_tp_extend_ep=True),
]


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v32"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda d: "-".join(f"{k}{v}" for k, v in d.items()))
def test_layout_options_against_the_reference(hf, tmp_path, family, layout):
    extra = dict(mtp_num_layers=1) if family == "deepseek_v32" else {}
    check(hf[(family, True)], str(tmp_path / "out"), **layout, **extra)


@pytest.mark.parametrize("layout", [dict(tp=2, ep=2, mla_mm_split=True), dict(tp=2, pp=2, mla_key_names="legacy"),
                                    dict(tp=2, pp=2, ep=2, moe_grouped_gemm=True, mla_mm_split=True,
                                         mla_key_names="legacy", vpp_layers=1)])
def test_deepseek_v32_mla_variants(hf, tmp_path, layout):
    check(hf[("deepseek_v32", False)], str(tmp_path / "out"), mtp_num_layers=1, **layout)


def test_deepseek_v32_independent_fp8_checkpoint(hf, tmp_path):
    check(hf["v32-fp8-independent"], str(tmp_path / "out"), tp=2, pp=2, ep=2, moe_grouped_gemm=True, mtp_num_layers=1)


@pytest.mark.parametrize("pp", [1, 2])
def test_qwen_tied_embeddings(hf, tmp_path, pp):
    """No lm_head in HF; Megatron's output layer is the embedding: stored only off the first stage."""
    src = hf["qwen-tied"]
    mcore = str(tmp_path / "mcore")
    check(src, mcore, tp=2, pp=pp, ep=2, moe_grouped_gemm=True)
    back = str(tmp_path / "hf")
    run_plan(plan_mcore_to_hf(mcore, back, ParallelSizes(2, pp, 2), McoreOptions(moe_grouped_gemm=True)), RUN)
    want, got = load_dir(src), load_dir(back)
    assert "lm_head.weight" not in got and sorted(got) == sorted(want)
    assert all(digest(got[k]) == digest(v) for k, v in want.items())


def test_qwen_transformers5_expert_count_name(hf, tmp_path):
    check(hf["qwen-local-experts-key"], str(tmp_path / "out"), tp=2, pp=2, ep=4, moe_grouped_gemm=True)


@pytest.mark.parametrize("family, kw, match", [
    ("qwen3_moe", dict(tp=8), r"--target-tensor-parallel-size 8 does not divide num_key_value_heads = 4"),
    ("qwen3_moe", dict(ep=3), r"--target-expert-parallel-size 3 does not divide num_experts = 8"),
    ("qwen3_moe", dict(mla_mm_split=True), r"--mla-mm-split: Qwen3-MoE has no multi-latent attention"),
    ("qwen3_moe", dict(mtp_num_layers=1), r"--mtp-num-layers 1: the checkpoint has 0 MTP layer"),
    ("deepseek_v32", dict(tp=3), r"--target-tensor-parallel-size 3 does not divide num_attention_heads = 4"),
])
def test_refusals_before_any_write(hf, tmp_path, family, kw, match):
    out = str(tmp_path / "out")
    sizes = ParallelSizes(kw.pop("tp", 1), 1, kw.pop("ep", 1))
    with pytest.raises(ValidationError, match=match):
        plan_hf_to_mcore(hf[(family, False)], out, sizes, McoreOptions(**kw))
    assert not os.path.exists(out)


def test_model_type_hf_must_match_config(hf, tmp_path):
    src = hf[("qwen3_moe", False)]
    plan_hf_to_mcore(src, str(tmp_path / "a"), ParallelSizes(), McoreOptions(), model_type_hf="qwen3-moe")
    with pytest.raises(ValidationError, match=r"--model-type-hf deepseek32 names DeepSeek-V3.2, but .* describes a "
                                              r"Qwen3-MoE"):
        plan_hf_to_mcore(src, str(tmp_path / "b"), ParallelSizes(), McoreOptions(), model_type_hf="deepseek32")
    with pytest.raises(ValidationError, match=r"--model-type-hf llama9: not a family"):
        plan_hf_to_mcore(src, str(tmp_path / "c"), ParallelSizes(), McoreOptions(), model_type_hf="llama9")
