"""Layout options end to end, byte for byte against the eager reference: VPP, noop slots, num-layer-list,
dualpipev, mla-mm-split, legacy names, tp-extend-ep, expert-TP 1, alone and in the combinations the
DeepSeek-V3 training scripts use (scaled down)."""

import dataclasses

import pytest

from streamconv import synth
from streamconv.errors import ValidationError
from streamconv.execute.executor import RunOptions, run_plan
from streamconv.layout.parallel import ParallelSizes
from streamconv.layout.options import McoreOptions
from streamconv.plan.plan import Plan
from streamconv.plan.planner import plan_hf_to_mcore
from tests.reference import assert_same_checkpoint, load_mcore_dir, reference_hf_to_mcore


@pytest.fixture(scope="module")
def deep_hf(tmp_path_factory):
    """A tiny model with 13 layers + MTP, so 16-slot layouts with 3 noop slots fit (like 61 + 3 = 64)."""
    d = str(tmp_path_factory.mktemp("deep") / "hf")
    synth.synth_checkpoint(d, dataclasses.replace(synth.TINY, num_hidden_layers=13, fp8=True,
                                                  max_shard_bytes=400_000))
    return d


def check(hf, tmp_path, tp=1, pp=1, ep=1, gg=True, mtp=1, **layout):
    out = str(tmp_path / "mcore")
    plan = plan_hf_to_mcore(hf, out, ParallelSizes(tp, pp, ep),
                            McoreOptions(moe_grouped_gemm=gg, mtp_num_layers=mtp, **layout))
    plan.save(out + ".json")
    run_plan(Plan.load(out + ".json"), RunOptions(band_bytes=8192, max_memory=8 << 20))
    ref_kw = {k: v for k, v in layout.items()}
    expected = reference_hf_to_mcore(hf, tp=tp, pp=pp, ep=ep, moe_grouped_gemm=gg, mtp_num_layers=mtp, **ref_kw)
    assert_same_checkpoint(load_mcore_dir(out), expected)


CASES = [
    dict(tp=2, pp=2, ep=2, vpp_layers=1),                                   # VPP, 2 chunks per stage
    dict(pp=2, num_layers=6, noop_layers=(2, 5), vpp_layers=1),              # VPP + noop, empty-ish chunks
    dict(pp=1, num_layers=5, noop_layers=(2,), gg=False),                   # noop keeps local indices
    dict(pp=2, ep=2, dualpipev=True),                                       # dualpipev: final chunk pp0 model1
    dict(pp=1, dualpipev=True, mtp=0),
    dict(tp=2, pp=2, num_layer_list=(1, 3), ep=4),                          # uneven stages
    dict(tp=2, pp=2, num_layer_list=(3, 1), mtp=0, gg=False),
    dict(tp=2, mla_mm_split=True),                                          # linear_qk_nope/qk_rope/kv_nope/v
    dict(tp=4, pp=2, mla_mm_split=True, mla_key_names="legacy"),
    dict(tp=2, mla_key_names="legacy", gg=False),                           # linear_qb/linear_kvb/k_layernorm
    dict(tp=2, ep=4, moe_tp_extend_ep=True),                                # the TP 2 EP 4 + GEMM case
    dict(tp=2, ep=2, moe_tp_extend_ep=True, gg=False),                      # correct without GEMM (spec §10.5)
    dict(tp=2, pp=2, ep=2, moe_tp_extend_ep=True, dualpipev=True),          # dualpipev at TP 2
    dict(tp=4, ep=8, expert_tensor_parallel_size=1),                        # ETP 1 with TP 4 EP 8
    dict(tp=4, pp=2, ep=2, expert_tensor_parallel_size=1, gg=False),
]


@pytest.mark.parametrize("case", CASES, ids=[",".join(f"{k}={v}" for k, v in c.items()) for c in CASES])
def test_layout_matches_reference(tiny_hf, tmp_path, case):
    check(tiny_hf["fp8"], tmp_path, **case)


def test_pretrain_script_layout(deep_hf, tmp_path):
    """The pretrain script's shape: 64 slots, PP 8, noop 61,62,63, dualpipev, MTP -> here 16 slots, PP 4."""
    check(deep_hf, tmp_path, pp=4, ep=2, num_layers=16, noop_layers=(13, 14, 15), dualpipev=True)


def test_pp4_vpp_noop_layout(deep_hf, tmp_path):
    """PP 4 with VPP and noop: 16 slots, 2 layers per virtual chunk, noop 5,14,15, local experts."""
    check(deep_hf, tmp_path, pp=4, ep=2, num_layers=16, noop_layers=(5, 14, 15), vpp_layers=2, gg=False)


def test_a3_script_layout(deep_hf, tmp_path):
    """PP with VPP and noop (the A3 scripts): 16 slots, PP 2, 2 layers per virtual chunk, noop 7,14,15."""
    check(deep_hf, tmp_path, tp=2, pp=2, ep=2, num_layers=16, noop_layers=(7, 14, 15), vpp_layers=2)


@pytest.mark.parametrize("case,match", [
    (dict(pp=2, vpp_layers=1, dualpipev=True), "mutually exclusive"),
    (dict(pp=2, num_layer_list=(2, 2), vpp_layers=1), "cannot be combined"),
    (dict(tp=2, pp=2, dualpipev=True), "dualpipev with --target-tensor-parallel-size > 1"),
    (dict(pp=2, num_layers=6, noop_layers=(6,)), "outside the 6 layer slots"),
    (dict(pp=3, dualpipev=True), "2 x --target-pipeline-parallel-size"),
    (dict(pp=2, vpp_layers=3), "does not divide the 2 layers of a stage"),
    (dict(pp=2, num_layer_list=(1, 2)), "summing to --num-layers 4"),
    (dict(dualpipev=True, first_k_dense_replace=0), "not supported with dualpipev"),
    (dict(tp=2, moe_tp_extend_ep=True, expert_tensor_parallel_size=1), "mutually exclusive"),
    (dict(tp=4, moe_tp_extend_ep=True, ep=4), "EP x TP = 16 does not divide n_routed_experts = 8"),
    (dict(mla_key_names="ancient"), "expected 'current' or 'legacy'"),
])
def test_contradictory_layouts_refused_before_writing(tiny_hf, tmp_path, case, match):
    tp, pp, ep = case.pop("tp", 1), case.pop("pp", 1), case.pop("ep", 1)
    with pytest.raises(ValidationError, match=match):
        plan_hf_to_mcore(tiny_hf["fp8"], str(tmp_path / "out"), ParallelSizes(tp, pp, ep), McoreOptions(**case))
    assert not (tmp_path / "out").exists()
