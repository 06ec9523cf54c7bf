"""Spec section 1: the HF input, FP8 storage and its exact block dequantization (1.4)."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.reference import load_hf, reference_hf_to_mcore
from tests.reference_suite.helpers import read_json, same, state


# --------------------------------------------------------------------------------------------------
# FP8 (spec 1.4)


def block_loop_dequant(w, s):
    """Second, independent form of spec 1.4: loop over 128x128 blocks, edge blocks partial."""
    out = torch.empty(w.shape, dtype=torch.bfloat16)
    for bi in range(s.shape[0]):
        for bj in range(s.shape[1]):
            rows = slice(bi * 128, (bi + 1) * 128)
            cols = slice(bj * 128, (bj + 1) * 128)
            out[rows, cols] = (w[rows, cols].to(torch.float32) * s[bi, bj].item()).to(torch.bfloat16)
    return out


def _write_single(path, tensors, with_index):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({}, f)
    if with_index:
        names = sorted(tensors)
        first = {k: tensors[k] for k in names[::2]}
        second = {k: tensors[k] for k in names[1::2]}  # weight and scale in different shards
        save_file(first, os.path.join(path, "a.safetensors"))
        save_file(second, os.path.join(path, "b.safetensors"))
        weight_map = {**{k: "a.safetensors" for k in first}, **{k: "b.safetensors" for k in second}}
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
    else:
        save_file(tensors, os.path.join(path, "model.safetensors"))


@pytest.mark.parametrize("with_index", [False, True])
def test_fp8_dequant_hand_made_blocks(tmp_path, with_index):
    gen = torch.Generator().manual_seed(3)
    w = (torch.randn(130, 260, generator=gen) * 4).to(torch.float8_e4m3fn)  # blocks [2, 3], edges 2 rows / 4 cols
    s = torch.rand(2, 3, generator=gen) + 0.5
    # hand-checked corner in the partial edge block (row 129, col 259 -> block (1, 2)):
    w[129, 259] = 1.0
    w[129, 258] = 1.0
    w[0, 0] = 1.5
    s[1, 2] = 1.0 + 2.0**-8 + 2.0**-20  # bf16 round-to-nearest-even: above the halfway point -> 1 + 2^-7
    s[0, 0] = 0.25
    bias = torch.randn(7, generator=gen)
    plain = torch.randn(3, 5, generator=gen).to(torch.bfloat16)
    _write_single(tmp_path, {"x.weight": w, "x.weight_scale_inv": s, "bias": bias, "plain": plain}, with_index)

    config, tensors = load_hf(str(tmp_path))
    assert config == {}
    assert set(tensors) == {"x.weight", "bias", "plain"}
    x = tensors["x.weight"]
    assert x.dtype == torch.bfloat16 and x.shape == (130, 260)
    assert same(x, block_loop_dequant(w, s))
    assert x[129, 259].item() == 1.0 + 2.0**-7
    assert x[0, 0].item() == 0.375
    # per-element rule on a sample of positions across every block
    for r in (0, 127, 128, 129):
        for c in (0, 127, 128, 255, 256, 259):
            want = (w[r, c].to(torch.float32) * s[r // 128, c // 128]).to(torch.bfloat16)
            assert same(x[r, c], want)
    assert same(tensors["bias"], bias) and same(tensors["plain"], plain)


def test_fp8_round_to_nearest_even_at_the_halfway_point(tmp_path):
    w = torch.ones(1, 1).to(torch.float8_e4m3fn)
    s = torch.tensor([[1.0 + 2.0**-8]])  # exactly halfway between bf16 1.0 and 1 + 2^-7: ties to even
    _write_single(tmp_path, {"w": w, "w_scale_inv": s}, with_index=False)
    assert load_hf(str(tmp_path))[1]["w"].item() == 1.0


def test_fp8_tiny_model_loads_and_converts(fp8_dir):
    raw = {}
    index = read_json(os.path.join(fp8_dir, "model.safetensors.index.json"))["weight_map"]
    for file_name in sorted(set(index.values())):
        raw.update(load_file(os.path.join(fp8_dir, file_name)))
    config, w = load_hf(fp8_dir)
    assert "quantization_config" in config
    scaled = [k for k in raw if k.endswith("_scale_inv")]
    assert scaled and not any(k.endswith("_scale_inv") for k in w)
    assert set(w) == set(raw) - set(scaled)
    edge = 0
    for k in scaled:
        name = k[: -len("_scale_inv")]
        assert raw[name].dtype == torch.float8_e4m3fn
        assert same(w[name], block_loop_dequant(raw[name], raw[k]))
        m, n = raw[name].shape
        edge += (m % 128 != 0 and m > 128) or (n % 128 != 0 and n > 128)
    assert edge > 0  # partial edge blocks next to full ones are exercised
    for name, tensor in w.items():
        if name + "_scale_inv" not in raw:
            assert same(tensor, raw[name])
    out = reference_hf_to_mcore(fp8_dir, tp=2, ep=2, moe_grouped_gemm=True, mtp_num_layers=1)
    sd = state(out, "mp_rank_01_001")
    assert sd["decoder.layers.1.mlp.router.expert_bias"].dtype == torch.float32
    assert all(t.dtype == torch.bfloat16 for k, t in sd.items() if not k.endswith("expert_bias"))
    q_a = w["model.layers.0.self_attn.q_a_proj.weight"]
    assert same(sd["decoder.layers.0.self_attention.linear_qkv.weight"][: q_a.shape[0]], q_a)
