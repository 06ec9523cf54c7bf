"""QLoRA (spec §6): ``hf2mcore --qlora-nf4`` writes bitsandbytes' own bytes, and mcore2hf dequantizes NF4
bases in the graph, merging a QLoRA adapter in the same pass.

Oracles: bitsandbytes itself (``quantize_4bit`` / ``dequantize_4bit`` on CPU, where it installs; otherwise these
tests are skipped and say why), applied to the pieces of a plain conversion, and the LoRA merge of
``tests/lora_reference.py`` on eagerly dequantized rank dicts (MindSpeed's flow: dequantize, merge, convert).
"""

from __future__ import annotations

import glob
import json
import os
import shutil

import pytest
import torch

from streamconv.errors import ValidationError
from streamconv.execute.executor import RunOptions, run_plan
from streamconv.plan.lora import LoraOptions
from streamconv.plan.mcore2hf import plan_mcore_to_hf
from streamconv.plan.planner import plan_hf_to_mcore
from tests import lora_reference as L
from tests.e2e.test_lora import RUN, assert_same, load_dir, split_layout
from tests.reference import load_hf, load_mcore_dir

bnb_f = pytest.importorskip("bitsandbytes.functional",
                            reason="bitsandbytes is not installed: NF4 bytes are compared with its CPU quantizer")

# spec §6.1: the weights QLoRA quantizes (module names), written out here independently of streamconv's tables
QUANTIZED = {"linear_qkv", "linear_proj", "linear_q_up_proj", "linear_kv_up_proj", "linear_fc1", "linear_fc2",
             "weight1", "weight2", "output_layer", "eh_proj"}
STATE = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
CASE = dict(tp=2, ep=2, moe_grouped_gemm=True, mtp_num_layers=1)


def quantized(key: str) -> bool:
    return key.removesuffix(".weight").rsplit(".", 1)[-1] in QUANTIZED


def to_npu(packed: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' CUDA/CPU packing -> the Ascend one: element 2i to the low nibble, code + 8 (mod 16)."""
    hi, lo = packed.view(-1) >> 4, packed.view(-1) & 15
    return (((hi + 8) % 16) | (((lo + 8) % 16) << 4)).to(torch.uint8).view(-1, 1)


def to_cuda(packed: torch.Tensor) -> torch.Tensor:
    lo, hi = packed.view(-1) & 15, packed.view(-1) >> 4
    return ((((lo + 8) % 16) << 4) | ((hi + 8) % 16)).to(torch.uint8).view(-1, 1)


def convert(src, out, layout=None, case=CASE):
    sizes, o = split_layout(case)
    run_plan(plan_hf_to_mcore(src, out, sizes, o, qlora_nf4=layout), RunOptions(band_bytes=1 << 16))
    return out


@pytest.fixture(scope="module")
def converted(tiny_hf, tmp_path_factory):
    root = tmp_path_factory.mktemp("qlora")
    return {"plain": convert(tiny_hf["fp8"], str(root / "plain")),
            "npu": convert(tiny_hf["fp8"], str(root / "npu"), "npu"),
            "cuda": convert(tiny_hf["fp8"], str(root / "cuda"), "cuda")}


@pytest.mark.parametrize("layout", ["npu", "cuda"])
def test_nf4_entries_are_bitsandbytes_bytes(converted, layout):
    """From the FP8 release, every quantized weight's six entries equal bitsandbytes' quantization of the plain
    conversion's bf16 piece (the npu nibble order by repacking its bytes); everything else is unchanged."""
    plain, nf4 = load_mcore_dir(converted["plain"]), load_mcore_dir(converted[layout])
    count = 0
    for path, obj in plain.items():
        if not path.endswith(".pt"):
            continue
        got = nf4[path]["model"]
        want_keys = []
        for key, t in obj["model"].items():
            want_keys.append(key)
            if not quantized(key):
                assert torch.equal(got[key], t), key
                continue
            data, state = bnb_f.quantize_4bit(t, blocksize=64, compress_statistics=True, quant_type="nf4")
            packed = state.as_dict(packed=True)
            assert torch.equal(got[key], to_npu(data) if layout == "npu" else data), key
            for entry in STATE:
                assert torch.equal(got[f"{key}.{entry}"], packed[entry]), f"{key}.{entry}"
            text = bytes(got[key + ".quant_state.bitsandbytes__nf4"].numpy()).decode()
            assert json.loads(text) == json.loads(bytes(packed["quant_state.bitsandbytes__nf4"].numpy()).decode())
            want_keys += [f"{key}.{e}" for e in STATE + ("quant_state.bitsandbytes__nf4",)]
            count += 1
        assert list(got) == want_keys, path
    assert count > 50
    record = json.load(open(os.path.join(converted[layout], "streamconv_source.json")))
    assert record["qlora"] == {"nf4_layout": layout}


def bnb_dequantize(packed: torch.Tensor, state) -> torch.Tensor:
    """bitsandbytes' dequantization.  Its AVX-512 CPU kernel indexes the absmax per row (``absmax[row * (n / 64)
    + col / 64]``), which is wrong when a row is not a whole number of blocks (the quantizer's blocks run over
    the flat elements); for those shapes use its generic kernel, which follows the flat layout."""
    if state.shape[-1] % state.blocksize == 0:
        return bnb_f.dequantize_4bit(packed, state)
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    absmax = bnb_f.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return _dequantize_4bit_compute(packed.reshape(-1), absmax, state.code, state.blocksize, state.shape, state.dtype)


def dequantized_copy(nf4_dir: str, out: str, layout: str) -> str:
    """The NF4 checkpoint with every quantized weight dequantized by bitsandbytes (a plain bf16 mcore dir)."""
    for rel, obj in load_mcore_dir(nf4_dir).items():
        path = os.path.join(out, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if not rel.endswith(".pt"):
            with open(path, "wb") as f:
                f.write(obj)
            continue
        sd = obj["model"]
        plain = {}
        for key, t in sd.items():
            if key + ".quant_state.bitsandbytes__nf4" in sd:
                state = bnb_f.QuantState.from_dict({e: sd[f"{key}.{e}"] for e in STATE + (
                    "quant_state.bitsandbytes__nf4",)}, device=torch.device("cpu"))
                plain[key] = bnb_dequantize(to_cuda(t) if layout == "npu" else t, state)
            elif not any(key.endswith("." + e) for e in STATE + ("quant_state.bitsandbytes__nf4",)):
                plain[key] = t
        torch.save({**obj, "model": plain}, path)
    record = os.path.join(nf4_dir, "streamconv_source.json")
    if os.path.exists(record):
        shutil.copy(record, out)
    return out


@pytest.mark.parametrize("layout", ["npu", pytest.param("cuda", marks=pytest.mark.slow)])
def test_nf4_base_dequantizes_in_the_graph(converted, tmp_path, layout):
    sizes, o = split_layout(CASE)
    eager = dequantized_copy(converted[layout], str(tmp_path / "eager"), layout)
    run_plan(plan_mcore_to_hf(eager, str(tmp_path / "want"), sizes, o), RUN)
    run_plan(plan_mcore_to_hf(converted[layout], str(tmp_path / "got"), sizes, o), RUN)
    assert_same(load_dir(str(tmp_path / "got")), load_dir(str(tmp_path / "want")))


def test_qlora_base_and_adapter_merge_in_one_pass(tiny_hf, converted, tmp_path):
    """NF4 base + LoRA-only checkpoint (type 2) in one pass = bitsandbytes dequantization, MindSpeed's merge of
    each rank dict, then a plain conversion (the reference's three steps)."""
    src, layout = tiny_hf["fp8"], "npu"
    _, hf = load_hf(src)
    targets = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
    factors = L.make_factors(hf, targets)
    pieces = L.split_factors(src, factors, targets, str(tmp_path / "work"), **CASE)
    lora = L.write_lora_checkpoint(converted["plain"], str(tmp_path / "lora"), pieces, kind="type2")
    sizes, o = split_layout(CASE)
    run_plan(plan_mcore_to_hf(converted[layout], str(tmp_path / "got"), sizes, o,
                              lora=LoraOptions(r=L.R, alpha="16", load=lora)), RUN)
    eager = dequantized_copy(converted[layout], str(tmp_path / "eager"), layout)
    adapters = load_mcore_dir(lora)
    for rel, obj in load_mcore_dir(eager).items():
        if rel.endswith(".pt"):
            merged = L.merge_rank_dict({**adapters[rel]["model"], **obj["model"]}, 16, L.R)
            torch.save({**obj, "model": merged}, os.path.join(eager, rel))
    run_plan(plan_mcore_to_hf(eager, str(tmp_path / "want"), sizes, o), RUN)
    assert_same(load_dir(str(tmp_path / "got")), load_dir(str(tmp_path / "want")))


# --- QLoRA training checkpoints (merge type 1 with an NF4 base) -----------------------------------------------------

TYPE1_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "linear_kv_up_proj", "eh_proj")


def qlora_training_checkpoint(tiny_hf, converted, layout, out):
    """What MindSpeed's QLoRA training saves without --lora-ckpt-filter / --qlora-save-dequantize: the NF4 base
    of ``converted[layout]`` with each LoRA-wrapped linear's weight and its five state entries under
    ``X.base_layer.weight`` (R-qlora ``parallel_linear_save_to_state_dict_wrapper``: ``prefix + "weight." + name``
    with the wrapped linear's prefix ``X.base_layer.``), GEMM stacks under their own names, and the factors."""
    src = tiny_hf["fp8"]
    _, hf = load_hf(src)
    factors = L.make_factors(hf, TYPE1_TARGETS)
    pieces = L.split_factors(src, factors, TYPE1_TARGETS, os.path.join(out, "work"), **CASE)
    return L.write_lora_checkpoint(converted[layout], os.path.join(out, "type1"), pieces, kind="type1")


def check_mindspeed_names(ckpt: str) -> None:
    """The checkpoint holds what the test says it holds: wrapped NF4 bases under base_layer, GEMM stacks not."""
    sd = load_mcore_dir(ckpt)[next(p for p in load_mcore_dir(ckpt) if p.endswith(".pt"))]["model"]
    qkv = "decoder.layers.0.self_attention.linear_qkv"
    for entry in ("",) + tuple("." + e for e in STATE + ("quant_state.bitsandbytes__nf4",)):
        assert f"{qkv}.base_layer.weight{entry}" in sd and f"{qkv}.weight{entry}" not in sd, entry
    assert sd[f"{qkv}.base_layer.weight"].dtype == torch.uint8 and f"{qkv}.lora_A.default.weight" in sd
    gemm = next(k for k in sd if k.endswith("mlp.experts.weight1"))
    assert gemm + ".absmax" in sd and gemm + "_lora_a" in sd
    assert "decoder.layers.0.self_attention.linear_q_up_proj.weight.absmax" in sd    # quantized, not a target


@pytest.fixture(scope="module")
def qlora_training(tiny_hf, converted, tmp_path_factory):
    """layout -> a QLoRA training checkpoint of that nibble order, each made once."""
    made = {}

    def get(layout):
        if layout not in made:
            out = str(tmp_path_factory.mktemp(f"qlora_type1_{layout}"))
            made[layout] = qlora_training_checkpoint(tiny_hf, converted, layout, out)
        return made[layout]
    return get


@pytest.mark.parametrize("layout", ["npu", "cuda"])
def test_qlora_type1_checkpoint_merges_in_one_pass(tiny_hf, qlora_training, tmp_path, layout):
    """A QLoRA training checkpoint (type 1, NF4 base under base_layer) merged in one pass = the reference's three
    steps: bitsandbytes dequantization (what --qlora-save-dequantize would have saved), MindSpeed's type-1
    merge of each rank dict, then a plain conversion.  No streamconv record: the nibble order is npu unless
    --nf4-layout says otherwise."""
    src = tiny_hf["fp8"]
    ckpt = qlora_training(layout)
    check_mindspeed_names(ckpt)
    sizes, o = split_layout(CASE)
    opts = LoraOptions(r=L.R, alpha="16", nf4_layout=None if layout == "npu" else layout)
    run_plan(plan_mcore_to_hf(ckpt, str(tmp_path / "got"), sizes, o, hf_config_dir=src, lora=opts), RUN)
    eager = dequantized_copy(ckpt, str(tmp_path / "eager"), layout)
    for rel, obj in load_mcore_dir(eager).items():
        if rel.endswith(".pt"):
            torch.save({**obj, "model": L.merge_rank_dict(obj["model"], 16, L.R)}, os.path.join(eager, rel))
    run_plan(plan_mcore_to_hf(eager, str(tmp_path / "want"), sizes, o, hf_config_dir=src), RUN)
    assert_same(load_dir(str(tmp_path / "got")), load_dir(str(tmp_path / "want")))


def test_qlora_type1_checkpoint_with_a_missing_state_entry_is_refused(tiny_hf, qlora_training, tmp_path):
    """One base_layer weight without its absmax: one error naming the key, before anything is written."""
    bad = str(tmp_path / "bad")
    shutil.copytree(qlora_training("npu"), bad)
    path = sorted(glob.glob(os.path.join(bad, "iter_*", "mp_rank_01_*", "model_optim_rng.pt")))[0]
    obj = torch.load(path, weights_only=True)
    key = "decoder.layers.1.self_attention.linear_proj.base_layer.weight.absmax"
    del obj["model"][key]
    torch.save(obj, path)
    sizes, o = split_layout(CASE)
    out = tmp_path / "out"
    with pytest.raises(ValidationError) as e:
        plan_mcore_to_hf(bad, str(out), sizes, o, hf_config_dir=tiny_hf["fp8"], lora=LoraOptions(r=L.R, alpha="16"))
    lines = str(e.value).strip().splitlines()
    assert len(lines) == 1 and f"model.{key} missing" in lines[0] and "NF4 quant state" in lines[0], lines
    assert "mp_rank_01_" in lines[0]
    assert not out.exists()
