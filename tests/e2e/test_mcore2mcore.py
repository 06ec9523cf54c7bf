"""mcore -> mcore end to end: a matrix of source -> target layouts, each against two oracles written as plain
two-step runs of the existing converters:

* mcore(A) -> HF -> mcore(B): every file byte-identical (rank files, record, tracker);
* HF -> mcore(B) from the original checkpoint: every rank file and the tracker byte-identical (the record too
  for a bf16 source; from an FP8 source the intermediate HF config has no quantization_config, exactly as a
  converted-back checkpoint would).

Then: the output converts on (mcore2hf) without flags, the source layout may come from flags when there is no
record, LoRA weights are refused by name, bad flags fail before anything is written, and the CLI spells it.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from streamconv.cli.main import main
from streamconv.errors import ValidationError
from streamconv.execute.executor import RunOptions, run_plan
from streamconv.layout.options import McoreOptions
from streamconv.layout.parallel import ParallelSizes
from streamconv.plan.mcore2hf import plan_mcore_to_hf
from streamconv.plan.mcore2mcore import plan_mcore_to_mcore
from streamconv.plan.plan import Plan
from streamconv.plan.planner import plan_hf_to_mcore

SMALL_BANDS = RunOptions(band_bytes=16384, max_memory=16 << 20)   # bands cut through the bigger tensors
FAST = RunOptions(max_memory=256 << 20)
JOURNAL = ".streamconv_journal.jsonl"
RECORD = "streamconv_source.json"


def split(layout: dict) -> tuple[ParallelSizes, McoreOptions]:
    layout = dict(layout)
    sizes = ParallelSizes(layout.pop("tp", 1), layout.pop("pp", 1), layout.pop("ep", 1))
    return sizes, McoreOptions(**layout)


def files_of(root: str) -> dict[str, bytes]:
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            if name != JOURNAL:
                path = os.path.join(dirpath, name)
                out[os.path.relpath(path, root)] = open(path, "rb").read()
    return out


def hf2mcore(hf: str, out: str, layout: dict) -> str:
    run_plan(plan_hf_to_mcore(hf, out, *split(layout)), FAST)
    return out


def via_hf(mcore: str, work: str, source: dict, target: dict) -> str:
    """The two-step oracle: mcore2hf, then hf2mcore (bf16 HF in between)."""
    run_plan(plan_mcore_to_hf(mcore, work + "-hf", *split(source)), FAST)
    return hf2mcore(work + "-hf", work, target)


PAIRS = {
    "dualpipev->num-layer-list": (
        dict(tp=2, pp=2, ep=2, moe_tp_extend_ep=True, dualpipev=True, moe_grouped_gemm=True, mtp_num_layers=1),
        dict(tp=2, pp=2, num_layer_list=(1, 3), ep=4, moe_grouped_gemm=True, mtp_num_layers=1)),
    "etp1->etp=tp": (
        dict(tp=4, ep=2, expert_tensor_parallel_size=1, moe_grouped_gemm=True),
        dict(tp=4, ep=2, expert_tensor_parallel_size=4, moe_grouped_gemm=True)),
    "grouped-gemm->local-experts": (
        dict(tp=2, pp=2, ep=2, moe_grouped_gemm=True, mtp_num_layers=1),
        dict(tp=2, pp=2, ep=2, mtp_num_layers=1)),
    "tp2->tp4": (
        dict(tp=2, ep=2, mtp_num_layers=1),
        dict(tp=4, ep=2, mtp_num_layers=1)),
    "vpp+noop->pp1-ep2": (
        dict(pp=2, num_layers=6, noop_layers=(2, 5), vpp_layers=1, mtp_num_layers=1),
        dict(tp=2, ep=2, moe_grouped_gemm=True, mtp_num_layers=1)),
    "mla-variants->tp-extend-ep": (
        dict(tp=4, pp=2, mla_mm_split=True, mla_key_names="legacy", mtp_num_layers=1),
        dict(tp=2, ep=4, moe_tp_extend_ep=True, moe_grouped_gemm=True, mtp_num_layers=1)),
    "mtp-dropped": (
        dict(tp=2, mtp_num_layers=1),
        dict(pp=2, ep=2, moe_grouped_gemm=True)),
    "etp1-pp->dualpipev": (
        dict(tp=2, pp=2, ep=4, expert_tensor_parallel_size=1, mtp_num_layers=1),
        dict(tp=2, pp=2, ep=2, moe_tp_extend_ep=True, dualpipev=True, mtp_num_layers=1)),
}
DEFAULT = ["dualpipev->num-layer-list", "etp1->etp=tp", "grouped-gemm->local-experts", "tp2->tp4"]
CASES = ([pytest.param(name, "bf16", id=f"{name}-bf16") for name in DEFAULT]
         + [pytest.param(name, kind, id=f"{name}-{kind}", marks=pytest.mark.slow)
            for name in PAIRS for kind in ("bf16", "fp8") if (name, kind) not in {(n, "bf16") for n in DEFAULT}])


@pytest.mark.parametrize("name,kind", CASES)
def test_reshard_equals_both_two_step_oracles(tiny_hf, tmp_path, name, kind):
    source, target = PAIRS[name]
    a = hf2mcore(tiny_hf[kind], str(tmp_path / "a"), source)
    plan = plan_mcore_to_mcore(a, str(tmp_path / "b"), *split(source), *split(target))
    plan.save(str(tmp_path / "plan.json"))
    run_plan(Plan.load(str(tmp_path / "plan.json")), SMALL_BANDS if name == DEFAULT[0] else FAST)
    got = files_of(str(tmp_path / "b"))

    want = files_of(via_hf(a, str(tmp_path / "via"), source, target))
    assert sorted(got) == sorted(want)
    assert [k for k in got if got[k] != want[k]] == []

    direct = files_of(hf2mcore(tiny_hf[kind], str(tmp_path / "direct"), target))
    assert sorted(got) == sorted(direct)
    assert [k for k in got if got[k] != direct[k] and k != RECORD] == []
    # The record describes the model the source holds: without its MTP layer if the source dropped it, and
    # bf16 (no quantization_config) whatever the original release was.
    record, original = json.loads(got[RECORD]), json.loads(direct[RECORD])
    original["hf_config"]["num_nextn_predict_layers"] = source.get("mtp_num_layers", 0)
    original["hf_config"].pop("quantization_config", None)
    assert record == original
    assert (got[RECORD] == direct[RECORD]) == (kind == "bf16" and source.get("mtp_num_layers") == 1)


def test_layers_the_source_dropped_stay_dropped(tiny_hf, tmp_path):
    """A source converted with fewer layers is a smaller model: the target is mcore -> HF -> mcore of it."""
    source, target = dict(num_layers=3, first_k_dense_replace=1, tp=2), dict(pp=3, ep=2, moe_grouped_gemm=True)
    a = hf2mcore(tiny_hf["bf16"], str(tmp_path / "a"), source)
    run_plan(plan_mcore_to_mcore(a, str(tmp_path / "b"), *split(source), *split(target)), SMALL_BANDS)
    assert files_of(str(tmp_path / "b")) == files_of(via_hf(a, str(tmp_path / "via"), source, target))
    assert json.loads(files_of(str(tmp_path / "b"))[RECORD])["hf_config"]["num_hidden_layers"] == 3


def load_all(root: str) -> dict:
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file

                out.update(load_file(os.path.join(dirpath, name)))
    return out


def test_output_converts_on_without_flags(tiny_hf, tmp_path):
    """The record is the target's: mcore2hf on the result needs no layout flag and gives back the model."""
    source, target = PAIRS["dualpipev->num-layer-list"]
    a = hf2mcore(tiny_hf["bf16"], str(tmp_path / "a"), source)
    run_plan(plan_mcore_to_mcore(a, str(tmp_path / "b"), *split(source), *split(target)), FAST)
    assert main(["convert", "mcore2hf", "--load-dir", str(tmp_path / "b"), "--save-dir", str(tmp_path / "hf"),
                 "--no-progress"]) == 0
    got, want = load_all(str(tmp_path / "hf")), load_all(tiny_hf["bf16"])
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k].view(torch.uint8), want[k].view(torch.uint8)) for k in want)


def test_cli_with_source_flags_and_no_record(tiny_hf, tmp_path):
    """A checkpoint another tool wrote (no record): --hf-config and the --source-... flags describe it; the v2
    spelling (--load-model-type mg --save-model-type mg) names the same direction."""
    source, target = PAIRS["grouped-gemm->local-experts"]
    a = hf2mcore(tiny_hf["bf16"], str(tmp_path / "a"), source)
    os.remove(os.path.join(a, RECORD))
    args = ["--load-dir", a, "--hf-config", tiny_hf["bf16"], "--source-tensor-parallel-size", "2",
            "--source-pipeline-parallel-size", "2", "--source-expert-parallel-size", "2",
            "--source-moe-grouped-gemm", "--source-mtp-num-layers", "1",
            "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2",
            "--target-expert-parallel-size", "2", "--mtp-num-layers", "1", "--no-progress"]
    assert main(["convert", "mcore2mcore", "--save-dir", str(tmp_path / "b")] + args) == 0
    assert main(["convert", "--load-model-type", "mg", "--save-model-type", "mg", "--save-dir",
                 str(tmp_path / "c")] + args) == 0
    want = files_of(hf2mcore(tiny_hf["bf16"], str(tmp_path / "direct"), target))
    assert files_of(str(tmp_path / "b")) == want == files_of(str(tmp_path / "c"))


def test_an_incomplete_adapter_is_refused_by_name(tiny_hf, tmp_path):
    """A LoRA factor without its partner (or its base_layer) is an inconsistent adapter: refused, naming the
    weight, before anything is written (a whole adapter is carried: tests/e2e/test_mcore2mcore_lora.py)."""
    source = dict(tp=2)
    a = hf2mcore(tiny_hf["bf16"], str(tmp_path / "a"), source)
    pt = os.path.join(a, "iter_0000001", "mp_rank_01", "model_optim_rng.pt")
    obj = torch.load(pt, weights_only=True)
    key = "decoder.layers.0.self_attention.linear_proj.lora_A.default.weight"
    obj["model"][key] = torch.zeros(4, 8, dtype=torch.bfloat16)
    torch.save(obj, pt)
    with pytest.raises(ValidationError, match=r"mp_rank_01/model_optim_rng.pt: model.decoder.layers.0.self_attention"
                                              r".linear_proj.weight has no LoRA factor B"):
        plan_mcore_to_mcore(a, str(tmp_path / "b"), *split(source), *split(dict(tp=1)))
    assert not (tmp_path / "b").exists()


def test_wrong_source_flags_fail_before_writing(tiny_hf, tmp_path, capsys):
    a = hf2mcore(tiny_hf["bf16"], str(tmp_path / "a"), dict(tp=2, ep=2, moe_grouped_gemm=True))
    with pytest.raises(ValidationError, match="mlp.experts.local_experts.0.linear_fc1.weight missing"):
        plan_mcore_to_mcore(a, str(tmp_path / "b"), *split(dict(tp=2, ep=2)), *split(dict(tp=1)))
    assert main(["convert", "mcore2mcore", "--load-dir", a, "--save-dir", str(tmp_path / "b"),
                 "--source-expert-parallel-size", "4", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("streamconv: error:") and "missing" in err
    assert not (tmp_path / "b").exists()
