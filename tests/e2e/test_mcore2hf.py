"""mcore -> HF end to end: round trips over the layout matrix, FP8 re-export, replica checks, bad input.

Oracles: the original HF checkpoint (a round trip must give back every tensor byte for byte), the eager
dequantization of ``tests/reference.py``, and an eager FP8 block quantizer written here from the release's
recipe (scale_inv = amax / 448 per 128x128 block).
"""

import glob
import hashlib
import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open

from streamconv.errors import ValidationError
from streamconv.execute.executor import RunOptions, run_plan
from streamconv.layout.parallel import ParallelSizes
from streamconv.layout.options import McoreOptions
from streamconv.plan.mcore2hf import ExportOptions, plan_mcore_to_hf
from streamconv.plan.plan import Plan
from streamconv.plan.planner import plan_hf_to_mcore
from tests.reference import dequant_fp8_block

RUN = RunOptions(band_bytes=8192, max_memory=8 << 20)


def load_dir(d):
    """Every tensor of an HF directory, through the official safetensors reader."""
    out = {}
    for path in sorted(glob.glob(os.path.join(d, "*.safetensors"))):
        with safe_open(path, "pt") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
    return out


def digest(t):
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def to_mcore(hf, out, tp=1, pp=1, ep=1, **layout):
    plan = plan_hf_to_mcore(hf, out, ParallelSizes(tp, pp, ep), McoreOptions(**layout))
    run_plan(plan, RUN)
    return out


def to_hf(mcore, out, tp=1, pp=1, ep=1, export=ExportOptions(), hf_config=None, **layout):
    plan = plan_mcore_to_hf(mcore, out, ParallelSizes(tp, pp, ep), McoreOptions(**layout), export,
                            hf_config_dir=hf_config)
    plan.save(out + ".json")
    run_plan(Plan.load(out + ".json"), RUN)
    return out


CASES = [
    dict(tp=2, pp=2, ep=2, moe_grouped_gemm=True, mtp_num_layers=1),
    dict(tp=2, ep=4, mtp_num_layers=1),                                                    # local experts
    dict(tp=2, pp=2, vpp_layers=1, moe_grouped_gemm=True),
    dict(pp=2, num_layers=6, noop_layers=(2, 5), vpp_layers=1, mtp_num_layers=1),
    dict(tp=2, pp=2, num_layer_list=(1, 3), ep=4, moe_grouped_gemm=True, mtp_num_layers=1),
    dict(tp=2, pp=2, ep=2, moe_tp_extend_ep=True, dualpipev=True, moe_grouped_gemm=True, mtp_num_layers=1),
    dict(tp=4, pp=2, mla_mm_split=True, mla_key_names="legacy", mtp_num_layers=1),
    dict(tp=2, ep=2, moe_tp_extend_ep=True),
    dict(tp=4, ep=2, expert_tensor_parallel_size=1, moe_grouped_gemm=True),
    dict(tp=2, pp=2, ep=4, expert_tensor_parallel_size=1),
]


MATRIX = [dict(tp=tp, pp=pp, ep=ep, moe_grouped_gemm=gg, mtp_num_layers=mtp)
          for tp in (1, 2, 4) for pp in (1, 2) for ep in (1, 2, 4) for gg in (False, True) for mtp in (0, 1)]


@pytest.mark.slow
@pytest.mark.parametrize("case", MATRIX, ids=[",".join(f"{k}={v}" for k, v in c.items()) for c in MATRIX])
def test_round_trip_matrix(tiny_hf, tmp_path, case):
    """The full TP x PP x EP x GEMM x MTP matrix, from the FP8 source: back to its exact dequantization."""
    src = tiny_hf["fp8"]
    out = to_hf(to_mcore(src, str(tmp_path / "mcore"), **case), str(tmp_path / "hf"), **case)
    raw, got = load_dir(src), load_dir(out)
    want = {k: (dequant_fp8_block(v, raw[k + "_scale_inv"]) if v.dtype == torch.float8_e4m3fn else v)
            for k, v in raw.items() if not k.endswith("_scale_inv")}
    if not case["mtp_num_layers"]:
        want = {k: v for k, v in want.items() if not k.startswith("model.layers.4.")}
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert digest(got[name]) == digest(t), name


@pytest.mark.parametrize("case", CASES, ids=[",".join(f"{k}={v}" for k, v in c.items()) for c in CASES])
def test_bf16_round_trip_is_identity(tiny_hf, tmp_path, case):
    """HF(bf16) -> mcore -> HF gives back every tensor, byte for byte, and the same index of names."""
    mcore = to_mcore(tiny_hf["bf16"], str(tmp_path / "mcore"), **case)
    out = to_hf(mcore, str(tmp_path / "hf"), **case)
    want, got = load_dir(tiny_hf["bf16"]), load_dir(out)
    if case.get("mtp_num_layers", 0) == 0:  # the source's MTP layer is not converted
        want = {k: v for k, v in want.items() if not k.startswith("model.layers.4.")}
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype, name
        assert digest(got[name]) == digest(t), name


def test_fp8_source_comes_back_as_its_dequantization(tiny_hf, tmp_path):
    src = tiny_hf["fp8"]
    layout = dict(tp=2, pp=2, ep=2, moe_grouped_gemm=True, mtp_num_layers=1)
    out = to_hf(to_mcore(src, str(tmp_path / "mcore"), **layout), str(tmp_path / "hf"), **layout)
    raw, got = load_dir(src), load_dir(out)
    want = {k: (dequant_fp8_block(v, raw[k + "_scale_inv"]) if v.dtype == torch.float8_e4m3fn else v)
            for k, v in raw.items() if not k.endswith("_scale_inv")}
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert torch.equal(got[name], t), name
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert "quantization_config" not in cfg  # the weights are bf16 now


def test_fp8_export_with_original_scales_reproduces_the_release(tiny_hf, tmp_path):
    """FP8 -> mcore (bf16) -> FP8 with --fp8-scales-from: every weight and scale byte of the original."""
    src = tiny_hf["fp8"]
    layout = dict(tp=2, pp=2, ep=2, moe_grouped_gemm=True, mtp_num_layers=1)
    mcore = to_mcore(src, str(tmp_path / "mcore"), **layout)
    out = to_hf(mcore, str(tmp_path / "hf"), export=ExportOptions(fp8_export=True, fp8_scales_from=src), **layout)
    want, got = load_dir(src), load_dir(out)
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype, name
        assert digest(got[name]) == digest(t), name
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["quantization_config"]["quant_method"] == "fp8"


def eager_quant(w):
    """DeepSeek's weight recipe, straight: per 128x128 block s = amax/448, q = fp8(w / s) (0 where s = 0)."""
    rows, cols = w.shape
    s = torch.zeros(-(-rows // 128), -(-cols // 128), dtype=torch.float32)
    q = torch.zeros(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            block = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].float()
            s[i, j] = block.abs().max() / 448.0
            if s[i, j] > 0:
                q[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = (block / s[i, j]).to(torch.float8_e4m3fn)
    return q, s


def test_fp8_export_with_fresh_scales_matches_the_eager_recipe(tiny_hf, tmp_path):
    src = tiny_hf["bf16"]
    layout = dict(tp=2, ep=2, moe_grouped_gemm=True, mtp_num_layers=1)
    out = to_hf(to_mcore(src, str(tmp_path / "mcore"), **layout), str(tmp_path / "hf"),
                export=ExportOptions(fp8_export=True), **layout)
    want, got = load_dir(src), load_dir(out)
    quantized = 0
    for name, t in want.items():
        if name + "_scale_inv" in got:
            q, s = eager_quant(t)
            assert digest(got[name]) == digest(q), name
            assert torch.equal(got[name + "_scale_inv"], s), name
            quantized += 1
        else:
            assert digest(got[name]) == digest(t), name
    assert quantized == sum(1 for k in got if k.endswith("_scale_inv")) > 0
    # the release's skip list: router, norms, embeddings, lm_head, eh_proj and shared_head stay bf16/fp32
    assert "model.layers.1.mlp.gate.weight_scale_inv" not in got
    assert "model.layers.4.eh_proj.weight_scale_inv" not in got
    assert "model.layers.1.self_attn.q_a_proj.weight_scale_inv" in got
    cfg = json.load(open(os.path.join(out, "config.json")))  # a bf16 origin gets the release's block config
    assert cfg["quantization_config"] == {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                          "weight_block_size": [128, 128]}


def test_output_files_index_and_config(tiny_hf, tmp_path):
    layout = dict(tp=2, pp=2, ep=2, moe_grouped_gemm=True, mtp_num_layers=1)
    out = to_hf(to_mcore(tiny_hf["fp8"], str(tmp_path / "mcore"), **layout), str(tmp_path / "hf"), **layout)
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(out, "*.safetensors")))
    assert files == [f"model-{i:05d}-of-00005.safetensors" for i in range(1, 6)]  # 4 layers + MTP
    wm = index["weight_map"]
    assert wm["model.embed_tokens.weight"] == wm["model.layers.0.input_layernorm.weight"] == files[0]
    assert wm["model.norm.weight"] == wm["lm_head.weight"] == wm["model.layers.3.input_layernorm.weight"] == files[3]
    assert {f for k, f in wm.items() if k.startswith("model.layers.4.")} == {files[4]}
    total = sum(t.numel() * t.element_size() for t in load_dir(out).values())
    assert index["metadata"]["total_size"] == total
    with safe_open(os.path.join(out, files[0]), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    src_cfg = json.load(open(os.path.join(tiny_hf["fp8"], "config.json")))
    cfg = json.load(open(os.path.join(out, "config.json")))
    src_cfg.pop("quantization_config")
    assert cfg == src_cfg


def test_max_shard_size_and_truncated_layers_renumber(tiny_hf, tmp_path):
    """--num-layers 3 --first-k-dense-replace 0 keeps MoE layers 1..3 only: they come back as layers 0..2
    with a config.json that says so, sharded by size."""
    layout = dict(tp=2, num_layers=3, first_k_dense_replace=0)
    mcore = to_mcore(tiny_hf["bf16"], str(tmp_path / "mcore"), **layout)
    out = to_hf(mcore, str(tmp_path / "hf"), export=ExportOptions(max_shard_size=300_000), **layout)
    src, got = load_dir(tiny_hf["bf16"]), load_dir(out)
    for i in range(3):
        for name in ("self_attn.q_b_proj.weight", "mlp.experts.5.down_proj.weight"):
            assert torch.equal(got[f"model.layers.{i}.{name}"], src[f"model.layers.{i + 1}.{name}"])
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert (cfg["num_hidden_layers"], cfg["first_k_dense_replace"], cfg["num_nextn_predict_layers"]) == (3, 0, 0)
    sizes = [os.path.getsize(p) for p in glob.glob(os.path.join(out, "*.safetensors"))]
    assert len(sizes) > 3 and max(sizes) < 300_000 + 4096


def _flip_byte(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


@pytest.mark.parametrize("tp, ep, victim, first, key", [
    (2, 2, "mp_rank_01_001", "mp_rank_00_000", "decoder.layers.2.input_layernorm.weight"),   # TP and EP copy
    (2, 1, "mp_rank_01", "mp_rank_00", "decoder.layers.1.mlp.router.weight"),                 # a TP copy
    (1, 2, "mp_rank_00_001", "mp_rank_00_000", "decoder.layers.3.self_attention.linear_proj.weight"),  # EP copy
])
def test_corrupted_replica_is_reported_before_writing(tiny_hf, tmp_path, tp, ep, victim, first, key):
    from streamconv.storage.torchzip_reader import read_pt, tensors

    layout = dict(tp=tp, ep=ep, moe_grouped_gemm=True)
    mcore = to_mcore(tiny_hf["bf16"], str(tmp_path / "mcore"), **layout)
    victim_path = os.path.join(mcore, "iter_0000001", victim, "model_optim_rng.pt")
    ref = tensors(read_pt(victim_path).obj)[("model", key)]
    _flip_byte(victim_path, ref.start + ref.nbytes - 3)
    out = str(tmp_path / "hf")
    with pytest.raises(ValidationError) as e:
        to_hf(mcore, out, **layout)
    msg = str(e.value)
    assert key in msg and f"{victim}/" in msg and f"{first}/" in msg
    assert not os.path.exists(out) or not os.listdir(out)
    # with the check off, the first copy is taken and the conversion goes through
    to_hf(mcore, out, export=ExportOptions(verify_replicas=False), **layout)


def test_mindspeed_style_and_trained_files_are_read_without_running_code(tiny_hf, tmp_path):
    """Rank files as MindSpeed's converter writes them (torch.save, protocol 4, defaultdict containers, which
    weights_only loading refuses), then as training saves them (iteration 1000, args, numpy rng state,
    optimizer tensors next to the model) convert like ours."""
    import argparse
    import collections
    import random

    import numpy as np

    layout = dict(tp=2, pp=2, moe_grouped_gemm=True, mtp_num_layers=1)
    mcore = to_mcore(tiny_hf["bf16"], str(tmp_path / "mcore"), **layout)
    os.rename(os.path.join(mcore, "iter_0000001"), os.path.join(mcore, "iter_0001000"))
    with open(os.path.join(mcore, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("1000")
    for i, path in enumerate(glob.glob(os.path.join(mcore, "iter_0001000", "*", "model_optim_rng.pt"))):
        obj = torch.load(path, weights_only=True)
        model = collections.defaultdict(dict)
        for k, v in obj["model"].items():
            model[k] = v.clone()
        redone = collections.defaultdict(dict, {"model": model, "checkpoint_version": 3.0, "iteration": 1000})
        if i % 2:  # as training saves it
            redone["args"] = argparse.Namespace(tensor_model_parallel_size=2, params_dtype=torch.bfloat16)
            redone["rng_state"] = [{"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
                                    "torch_rng_state": torch.get_rng_state()}]
            redone["optimizer"] = {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-4}]}
        torch.save(redone, path, pickle_protocol=4 if i % 2 == 0 else 2)
    os.remove(os.path.join(mcore, ".streamconv_journal.jsonl"))
    out = to_hf(mcore, str(tmp_path / "hf"), **layout)
    want, got = load_dir(tiny_hf["bf16"]), load_dir(out)
    assert all(digest(got[k]) == digest(v) for k, v in want.items())


@pytest.mark.parametrize("flags, needle", [
    (dict(tp=1, pp=2, ep=2, moe_grouped_gemm=True), "rank dirs the flags do not account for"),
    (dict(tp=2, pp=2, ep=2), "mlp.experts.local_experts.0.linear_fc1.weight missing"),
    (dict(tp=2, pp=2, ep=2, moe_grouped_gemm=True, mla_mm_split=True), "linear_qk_nope.weight missing"),
    (dict(tp=2, pp=2, ep=2, moe_grouped_gemm=True, mtp_num_layers=0), "not part of the layout"),
])
def test_wrong_flags_are_one_clear_error(tiny_hf, tmp_path_factory, flags, needle):
    flags = dict(flags)
    mcore = str(tmp_path_factory.mktemp("m") / "mcore")
    to_mcore(tiny_hf["bf16"], mcore, tp=2, pp=2, ep=2, moe_grouped_gemm=True, mtp_num_layers=1)
    with pytest.raises(ValidationError, match=needle):
        plan_mcore_to_hf(mcore, mcore + "-hf", ParallelSizes(flags.pop("tp"), flags.pop("pp"), flags.pop("ep")),
                         McoreOptions(**flags))


def test_bad_sources(tiny_hf, tmp_path):
    layout = dict(tp=2, moe_grouped_gemm=True)
    mcore = to_mcore(tiny_hf["bf16"], str(tmp_path / "mcore"), **layout)
    sizes, opts = ParallelSizes(2, 1, 1), McoreOptions(moe_grouped_gemm=True)
    # no record and no --hf-config
    os.rename(os.path.join(mcore, "streamconv_source.json"), str(tmp_path / "record.json"))
    with pytest.raises(ValidationError, match="--hf-config"):
        plan_mcore_to_hf(mcore, str(tmp_path / "o"), sizes, opts)
    plan_mcore_to_hf(mcore, str(tmp_path / "o"), sizes, opts, hf_config_dir=tiny_hf["bf16"])
    # a truncated rank file
    victim = os.path.join(mcore, "iter_0000001", "mp_rank_01", "model_optim_rng.pt")
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    with pytest.raises(ValidationError, match="mp_rank_01"):
        plan_mcore_to_hf(mcore, str(tmp_path / "o"), sizes, opts, hf_config_dir=tiny_hf["bf16"])
    os.remove(victim)
    with pytest.raises(ValidationError, match="mp_rank_01.*missing"):
        plan_mcore_to_hf(mcore, str(tmp_path / "o"), sizes, opts, hf_config_dir=tiny_hf["bf16"])
    shutil.rmtree(os.path.join(mcore, "iter_0000001"))
    with pytest.raises(ValidationError, match="iter_0000001"):
        plan_mcore_to_hf(mcore, str(tmp_path / "o"), sizes, opts, hf_config_dir=tiny_hf["bf16"])


def test_scales_from_must_fit(tiny_hf, tmp_path):
    layout = dict(tp=2)
    mcore = to_mcore(tiny_hf["bf16"], str(tmp_path / "mcore"), **layout)
    with pytest.raises(ValidationError, match="--fp8-scales-from"):  # a bf16 checkpoint has no scales
        plan_mcore_to_hf(mcore, str(tmp_path / "o"), ParallelSizes(2, 1, 1), McoreOptions(),
                         ExportOptions(fp8_export=True, fp8_scales_from=tiny_hf["bf16"]))
    with pytest.raises(ValidationError, match="needs --fp8-export"):
        plan_mcore_to_hf(mcore, str(tmp_path / "o"), ParallelSizes(2, 1, 1), McoreOptions(),
                         ExportOptions(fp8_scales_from=tiny_hf["fp8"]))


def test_cli_uses_the_record_and_verifies(tiny_hf, tmp_path, capsys):
    """`convert mcore2hf` with no layout flag takes them from the record hf2mcore wrote; --dry-run writes
    nothing; verify re-derives tensors of the HF output from the rank files."""
    from streamconv.cli.main import main

    mcore, out = str(tmp_path / "mcore"), str(tmp_path / "hf")
    assert main(["convert", "hf2mcore", "--load-dir", tiny_hf["bf16"], "--save-dir", mcore,
                 "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2",
                 "--num-layers-per-virtual-pipeline-stage", "1", "--moe-grouped-gemm", "--mtp-num-layers", "1",
                 "--no-progress"]) == 0
    assert main(["convert", "mcore2hf", "--load-dir", mcore, "--save-dir", out, "--dry-run"]) == 0
    assert not os.path.exists(out)
    text = capsys.readouterr().out
    assert "replica checks" in text and "model-00005-of-00005.safetensors" in text
    plan = str(tmp_path / "p.json")
    assert main(["convert", "mcore2hf", "--load-dir", mcore, "--save-dir", out, "--plan-output", plan,
                 "--no-progress"]) == 0
    want, got = load_dir(tiny_hf["bf16"]), load_dir(out)
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], v) for k, v in want.items())
    capsys.readouterr()
    assert main(["verify", plan, "--rederive", "20"]) == 0
    assert main(["verify", out]) == 0
    # a wrong flag given explicitly wins over the record, and is caught
    assert main(["plan", "mcore2hf", "--load-dir", mcore, "--save-dir", out + "2", "--source-tensor-parallel-size",
                 "1", "-o", plan]) == 2
    assert "--source-tensor" in capsys.readouterr().err


def test_release_iteration_and_explicit_iteration(tiny_hf, tmp_path):
    """A tracker saying `release` reads release/; --iteration picks another saved iteration."""
    layout = dict(tp=2, moe_grouped_gemm=True)
    mcore = to_mcore(tiny_hf["bf16"], str(tmp_path / "mcore"), **layout)
    os.rename(os.path.join(mcore, "iter_0000001"), os.path.join(mcore, "release"))
    with open(os.path.join(mcore, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("release")
    plan = plan_mcore_to_hf(mcore, str(tmp_path / "o"), ParallelSizes(2, 1, 1), McoreOptions(moe_grouped_gemm=True))
    assert all(s.name.startswith("release/") for s in plan.source_files)
    shutil.copytree(os.path.join(mcore, "release"), os.path.join(mcore, "iter_0000500"))
    plan = plan_mcore_to_hf(mcore, str(tmp_path / "o"), ParallelSizes(2, 1, 1), McoreOptions(moe_grouped_gemm=True),
                            iteration="500")
    assert all(s.name.startswith("iter_0000500/") for s in plan.source_files)
    run_plan(plan, RUN)
    want, got = load_dir(tiny_hf["bf16"]), load_dir(str(tmp_path / "o"))
    assert all(digest(got[k]) == digest(want[k]) for k in got)


def test_fp8_export_after_fine_tuning_never_clips(tiny_hf, tmp_path):
    """--fp8-scales-from after training: unchanged weights come back as the release's bytes; a weight that grew
    past its blocks' range gets fresh scales there (instead of saturating at 448) and dequantizes back to the
    trained values within FP8 rounding."""
    src = tiny_hf["fp8"]
    mcore = to_mcore(src, str(tmp_path / "mcore"))
    path = os.path.join(mcore, "iter_0000001", "mp_rank_00", "model_optim_rng.pt")
    obj = torch.load(path, weights_only=True)
    key = "decoder.layers.1.self_attention.linear_proj.weight"
    obj["model"][key] = obj["model"][key] * 4          # "training" moved this weight
    trained = obj["model"][key].clone()
    torch.save(obj, path)
    os.remove(os.path.join(mcore, ".streamconv_journal.jsonl"))
    out = to_hf(mcore, str(tmp_path / "hf"), export=ExportOptions(fp8_export=True, fp8_scales_from=src))
    want, got = load_dir(src), load_dir(out)
    want = {k: v for k, v in want.items() if not k.startswith("model.layers.4.")}  # no MTP converted
    assert sorted(got) == sorted(want)
    name = "model.layers.1.self_attn.o_proj.weight"
    for k, t in want.items():
        if k not in (name, name + "_scale_inv"):
            assert digest(got[k]) == digest(t), k
    assert not torch.equal(got[name + "_scale_inv"], want[name + "_scale_inv"])
    back = dequant_fp8_block(got[name], got[name + "_scale_inv"]).float()
    assert got[name].float().abs().max() <= 448
    assert torch.allclose(back, trained.float(), rtol=0.07, atol=1e-6)
