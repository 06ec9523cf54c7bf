"""The synthetic DeepSeek-V3 checkpoint generator (streamconv/synth.py) and `streamconv synth`.

The expected tensor list below is written out by hand from spec §1.3/§1.4, independently of synth.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from streamconv import synth
from streamconv.cli import synth as synth_cli
from streamconv.errors import ValidationError
from streamconv.storage.safetensors import read_header, read_tensor

TINY = synth.TINY
FP8_LINEARS = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
               "gate_proj", "up_proj", "down_proj")


def expected_tensors(fp8: bool) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) for TINY, straight from the spec tables."""
    H, V, L, K, E = 192, 256, 4, 1, 8
    Rq, Rkv, NH, Dn, Dr, Dv, F, Fm = 48, 32, 4, 32, 16, 32, 320, 32
    out: dict[str, tuple[str, tuple[int, ...]]] = {}

    def linear(name, shape):
        if fp8:
            out[name] = ("float8_e4m3fn", shape)
            out[name + "_scale_inv"] = ("float32", (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128)))
        else:
            out[name] = ("bfloat16", shape)

    def bf16(name, shape):
        out[name] = ("bfloat16", shape)

    bf16("model.embed_tokens.weight", (V, H))
    bf16("model.norm.weight", (H,))
    bf16("lm_head.weight", (V, H))
    for i in range(L + 1):  # layer L is the MTP layer
        p = f"model.layers.{i}."
        bf16(p + "input_layernorm.weight", (H,))
        bf16(p + "post_attention_layernorm.weight", (H,))
        linear(p + "self_attn.q_a_proj.weight", (Rq, H))
        bf16(p + "self_attn.q_a_layernorm.weight", (Rq,))
        linear(p + "self_attn.q_b_proj.weight", (NH * (Dn + Dr), Rq))
        linear(p + "self_attn.kv_a_proj_with_mqa.weight", (Rkv + Dr, H))
        bf16(p + "self_attn.kv_a_layernorm.weight", (Rkv,))
        linear(p + "self_attn.kv_b_proj.weight", (NH * (Dn + Dv), Rkv))
        linear(p + "self_attn.o_proj.weight", (H, NH * Dv))
        if i < K:
            linear(p + "mlp.gate_proj.weight", (F, H))
            linear(p + "mlp.up_proj.weight", (F, H))
            linear(p + "mlp.down_proj.weight", (H, F))
            continue
        bf16(p + "mlp.gate.weight", (E, H))
        out[p + "mlp.gate.e_score_correction_bias"] = ("float32", (E,))
        for part in ["shared_experts"] + [f"experts.{j}" for j in range(E)]:
            linear(p + f"mlp.{part}.gate_proj.weight", (Fm, H))
            linear(p + f"mlp.{part}.up_proj.weight", (Fm, H))
            linear(p + f"mlp.{part}.down_proj.weight", (H, Fm))
        if i == L:
            bf16(p + "embed_tokens.weight", (V, H))
            bf16(p + "enorm.weight", (H,))
            bf16(p + "hnorm.weight", (H,))
            bf16(p + "eh_proj.weight", (H, 2 * H))
            bf16(p + "shared_head.norm.weight", (H,))
            bf16(p + "shared_head.head.weight", (V, H))
    return out


def load_all(path: str) -> dict[str, torch.Tensor]:
    index = json.load(open(os.path.join(path, synth.INDEX_NAME)))
    return {name: read_tensor(os.path.join(path, f), read_header(os.path.join(path, f)).tensors[name])
            for name, f in index["weight_map"].items()}


def file_bytes(path: str) -> dict[str, bytes]:
    return {f: open(os.path.join(path, f), "rb").read() for f in sorted(os.listdir(path))}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """TINY written in bf16 and fp8 (seed 0), with small shards so layers span files."""
    out = {}
    for mode in ("bf16", "fp8"):
        path = str(tmp_path_factory.mktemp(mode))
        cfg = dataclasses.replace(TINY, fp8=(mode == "fp8"), max_shard_bytes=400_000)
        out[mode] = (path, synth.synth_checkpoint(path, cfg), cfg)
    return out


@pytest.mark.parametrize("mode", ["bf16", "fp8"])
def test_tensor_names_shapes_dtypes_match_spec(ckpts, mode):
    path, _, _ = ckpts[mode]
    got = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            header = read_header(os.path.join(path, f))
            assert header.metadata == {"format": "pt"}
            for name, info in header.tensors.items():
                assert name not in got, f"{name} in two shards"
                got[name] = (info.dtype, info.shape)
    want = expected_tensors(mode == "fp8")
    assert sorted(set(want) - set(got)) == [] and sorted(set(got) - set(want)) == []
    assert got == want


@pytest.mark.parametrize("mode", ["bf16", "fp8"])
def test_index_covers_every_tensor_once(ckpts, mode):
    path, summary, cfg = ckpts[mode]
    index = json.load(open(os.path.join(path, synth.INDEX_NAME)))
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    assert len(files) == summary["shards"] > 2
    assert all(f == synth.shard_name(i + 1, len(files)) for i, f in enumerate(files))
    assert sorted(set(index["weight_map"].values())) == files
    seen = {}
    for f in files:
        for name, info in read_header(os.path.join(path, f)).tensors.items():
            assert index["weight_map"][name] == f
            seen[name] = info.nbytes
    assert set(seen) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(seen.values()) == summary["bytes"] == synth.checkpoint_bytes(cfg)
    assert summary["tensors"] == len(seen)
    assert summary["files"] == [synth.CONFIG_NAME] + files + [synth.INDEX_NAME]
    assert not [f for f in os.listdir(path) if f.endswith(".partial")]
    layer_files = {}
    for name, f in index["weight_map"].items():
        if name.startswith("model.layers."):
            layer_files.setdefault(int(name.split(".")[2]), set()).add(f)
    assert any(len(fs) == 2 for fs in layer_files.values()), "expected a layer spanning two shards"


def test_shards_are_filled_in_order_up_to_the_limit():
    cfg = dataclasses.replace(TINY, fp8=True, max_shard_bytes=300_000)
    shards = synth.plan_shards(cfg)
    flat = [t.name for s in shards for t in s.tensors]
    assert flat == [t.name for t in synth.tensor_specs(cfg)]
    for s, nxt in zip(shards, shards[1:]):
        assert s.nbytes <= cfg.max_shard_bytes or len(s.tensors) == 1
        assert s.nbytes + nxt.tensors[0].nbytes > cfg.max_shard_bytes
    # release order: embedding, layers 0..L-1, final norm and lm_head, then the MTP layer
    assert flat[0] == "model.embed_tokens.weight"
    assert flat.index("lm_head.weight") < flat.index("model.layers.4.input_layernorm.weight")
    assert flat.index("model.layers.3.mlp.experts.7.down_proj.weight_scale_inv") < flat.index("model.norm.weight")
    assert flat[flat.index("model.layers.0.self_attn.q_a_proj.weight") + 1].endswith("q_a_proj.weight_scale_inv")


@pytest.mark.parametrize("mode", ["bf16", "fp8"])
def test_config_json(ckpts, mode):
    path, _, _ = ckpts[mode]
    c = json.load(open(os.path.join(path, "config.json")))
    assert c["architectures"] == ["DeepseekV3ForCausalLM"] and c["model_type"] == "deepseek_v3"
    assert c["torch_dtype"] == "bfloat16" and c["tie_word_embeddings"] is False
    for field in (f.name for f in dataclasses.fields(synth.SynthConfig) if f.name not in ("fp8", "seed",
                                                                                           "max_shard_bytes")):
        assert c[field] == getattr(TINY, field), field
    assert c["num_key_value_heads"] == 4 and c["moe_layer_freq"] == 1 and c["rms_norm_eps"] == 1e-6
    assert c["topk_method"] == "noaux_tc" and c["scoring_func"] == "sigmoid" and c["norm_topk_prob"] is True
    assert c["rope_scaling"]["type"] == "yarn" and c["rope_scaling"]["factor"] == 40
    # HF's noaux_tc router needs >= 2 experts per group and top-k within the kept groups
    assert TINY.n_routed_experts % c["n_group"] == 0 and TINY.n_routed_experts // c["n_group"] >= 2
    assert c["num_experts_per_tok"] <= c["topk_group"] * TINY.n_routed_experts // c["n_group"]
    if mode == "fp8":
        assert c["quantization_config"] == {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                            "weight_block_size": [128, 128]}
    else:
        assert "quantization_config" not in c


def test_config_json_671b_matches_spec_table():
    c = synth.config_json(synth.DEEPSEEK_V3_671B)
    want = dict(hidden_size=7168, vocab_size=129280, num_hidden_layers=61, first_k_dense_replace=3,
                intermediate_size=18432, moe_intermediate_size=2048, n_routed_experts=256, n_shared_experts=1,
                num_experts_per_tok=8, num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536,
                kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                num_nextn_predict_layers=1, moe_layer_freq=1, rms_norm_eps=1e-6, tie_word_embeddings=False,
                torch_dtype="bfloat16", rope_theta=10000, topk_method="noaux_tc", scoring_func="sigmoid",
                n_group=8, topk_group=4, routed_scaling_factor=2.5, norm_topk_prob=True)
    assert {k: c[k] for k in want} == want
    assert c["rope_scaling"] == {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                                 "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "type": "yarn"}
    assert c["quantization_config"]["weight_block_size"] == [128, 128]


def test_671b_scale_shapes_match_spec_examples():
    cfg = dataclasses.replace(synth.DEEPSEEK_V3_671B, num_hidden_layers=4, n_routed_experts=2)
    shapes = {s.name: s.shape for s in synth.tensor_specs(cfg)}
    p = "model.layers.3."
    assert shapes[p + "self_attn.q_a_proj.weight_scale_inv"] == (12, 56)
    assert shapes[p + "self_attn.kv_a_proj_with_mqa.weight_scale_inv"] == (5, 56)
    assert shapes[p + "self_attn.q_b_proj.weight_scale_inv"] == (192, 12)
    assert shapes[p + "self_attn.kv_b_proj.weight_scale_inv"] == (256, 4)
    assert shapes[p + "self_attn.o_proj.weight_scale_inv"] == (56, 128)
    assert shapes[p + "mlp.experts.1.gate_proj.weight_scale_inv"] == (16, 56)
    assert shapes[p + "mlp.experts.1.down_proj.weight_scale_inv"] == (56, 16)
    assert shapes["model.layers.0.mlp.gate_proj.weight_scale_inv"] == (144, 56)
    assert shapes["model.layers.0.mlp.down_proj.weight_scale_inv"] == (56, 144)
    assert shapes["model.layers.4.eh_proj.weight"] == (7168, 14336)
    assert "model.layers.4.eh_proj.weight_scale_inv" not in shapes


def test_671b_totals_match_the_release():
    # The DeepSeek-V3 FP8 release: 91,991 index entries (incl. scale_inv) and ~688.6 GB of tensor data.
    specs = synth.tensor_specs(synth.DEEPSEEK_V3_671B)
    assert len(specs) == 91991
    total = synth.checkpoint_bytes(synth.DEEPSEEK_V3_671B)
    assert total == sum(s.nbytes for s in specs)
    assert 688e9 < total < 689e9


def dequant(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Spec §1.4 with plain torch: expand each block scale over its (possibly partial) block."""
    m, n = q.shape
    full = s.repeat_interleave(128, dim=0)[:m].repeat_interleave(128, dim=1)[:, :n]
    return (q.float() * full).to(torch.bfloat16)


def test_fp8_dequantizes_to_the_bf16_checkpoint_byte_for_byte(ckpts):
    bf16, fp8 = load_all(ckpts["bf16"][0]), load_all(ckpts["fp8"][0])
    assert set(fp8) - set(bf16) == {n + "_scale_inv" for n in bf16 if n + "_scale_inv" in fp8}
    n_quantized = 0
    for name, b in bf16.items():
        f = fp8[name]
        if name + "_scale_inv" in fp8:
            n_quantized += 1
            assert name.split(".")[-2] in FP8_LINEARS
            assert f.dtype == torch.float8_e4m3fn and b.dtype == torch.bfloat16
            assert torch.equal(dequant(f, fp8[name + "_scale_inv"]).view(torch.int16), b.view(torch.int16)), name
        else:
            assert f.dtype == b.dtype and torch.equal(f.view(torch.uint8), b.view(torch.uint8)), name
    assert n_quantized == 5 * 5 + 3 + 4 * 9 * 3


def test_fp8_scales_vary_by_block_and_use_the_edge_blocks(ckpts):
    fp8 = load_all(ckpts["fp8"][0])
    w = fp8["model.layers.0.mlp.gate_proj.weight"]  # [320, 192]: 3x2 blocks, the last row/column partial
    s = fp8["model.layers.0.mlp.gate_proj.weight_scale_inv"]
    assert s.shape == (3, 2) and len(set(s.flatten().tolist())) == 6
    for bi in range(3):
        for bj in range(2):
            block = w[bi * 128:(bi + 1) * 128, bj * 128:(bj + 1) * 128].float()
            assert block.abs().max().item() == 448.0  # amax of each block, partial ones too, maps to 448
    # a dequantizer applying one block's scale everywhere would be visibly wrong
    wrong = (w.float() * s[0, 0]).to(torch.bfloat16)
    assert not torch.equal(wrong, dequant(w, s))


def test_values_look_like_weights(ckpts):
    t = load_all(ckpts["bf16"][0])
    norm = t["model.layers.1.input_layernorm.weight"].float()
    assert abs(norm.mean().item() - 1) < 0.01 and 0.005 < norm.std().item() < 0.05
    emb = t["model.embed_tokens.weight"].float()
    assert abs(emb.std().item() - 0.02) < 0.002
    lin = t["model.layers.1.self_attn.o_proj.weight"].float()
    assert 0.005 < lin.std().item() < 0.06
    assert t["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32


@pytest.mark.parametrize("mode", ["bf16", "fp8"])
def test_mtp_copies_equal_main_embedding_and_head(ckpts, mode):
    t = load_all(ckpts[mode][0])
    assert torch.equal(t["model.layers.4.embed_tokens.weight"].view(torch.int16),
                       t["model.embed_tokens.weight"].view(torch.int16))
    assert torch.equal(t["model.layers.4.shared_head.head.weight"].view(torch.int16),
                       t["lm_head.weight"].view(torch.int16))
    assert not torch.equal(t["lm_head.weight"], t["model.embed_tokens.weight"])


def test_same_seed_same_bytes_whatever_the_band_size(ckpts, tmp_path, monkeypatch):
    path, _, cfg = ckpts["fp8"]
    monkeypatch.setattr(synth, "BAND_BYTES", 1)  # 128-row bands: vocab and dense tensors span several
    synth.synth_checkpoint(str(tmp_path / "again"), cfg)
    assert file_bytes(str(tmp_path / "again")) == file_bytes(path)


def test_different_seed_different_bytes(ckpts, tmp_path):
    path, _, cfg = ckpts["bf16"]
    synth.synth_checkpoint(str(tmp_path / "seed1"), dataclasses.replace(cfg, seed=1))
    a, b = load_all(path), load_all(str(tmp_path / "seed1"))
    assert a.keys() == b.keys()
    assert all(not torch.equal(a[n].view(torch.uint8), b[n].view(torch.uint8)) for n in a)


def test_crash_leaves_no_index_and_no_temp_files(tmp_path):
    def stop(name, done, total):
        if done > total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        synth.synth_checkpoint(str(tmp_path), dataclasses.replace(TINY, max_shard_bytes=400_000), progress=stop)
    names = os.listdir(tmp_path)
    assert synth.INDEX_NAME not in names and not [n for n in names if n.endswith(".partial")]


def test_config_validation_lists_every_problem():
    with pytest.raises(ValidationError) as e:
        dataclasses.replace(TINY, hidden_size=0, first_k_dense_replace=-1, qk_rope_head_dim=7, fp8="yes")
    msg = str(e.value)
    assert "hidden_size" in msg and "first_k_dense_replace" in msg and "fp8" in msg
    with pytest.raises(ValidationError, match="at most num_hidden_layers"):
        dataclasses.replace(TINY, first_k_dense_replace=5)
    with pytest.raises(ValidationError, match="even"):
        dataclasses.replace(TINY, qk_rope_head_dim=7)


def test_tiny_is_small_and_has_edge_and_multi_blocks():
    assert synth.checkpoint_bytes(TINY) < 5e6
    specs = {s.name: s.shape for s in synth.tensor_specs(dataclasses.replace(TINY, fp8=True)) if s.kind == "linear"}
    assert any(any(d % 128 for d in shape) for shape in specs.values())
    assert any(any(d > 128 for d in shape) for shape in specs.values())
    for n in (TINY.num_attention_heads, TINY.n_routed_experts, TINY.vocab_size, TINY.intermediate_size,
              TINY.moe_intermediate_size):
        assert n % 4 == 0


@pytest.mark.parametrize("target", [2e9, 4e9, 8e9])
@pytest.mark.parametrize("fp8", [False, True])
def test_synth_for_size_lands_near_target(target, fp8):
    cfg = synth.synth_for_size(int(target), fp8=fp8, seed=3)
    assert cfg.hidden_size == 7168 and cfg.fp8 == fp8 and cfg.seed == 3
    assert cfg.n_routed_experts % 8 == 0 and cfg.vocab_size % 128 == 0
    assert abs(synth.checkpoint_bytes(cfg) - target) <= 0.02 * target
    small = dataclasses.replace(cfg, n_routed_experts=8)
    assert synth.checkpoint_bytes(small) == sum(s.nbytes for s in synth.tensor_specs(small))


# --- memory ---------------------------------------------------------------------------------------------------

MEMORY_PROBE = textwrap.dedent("""
    import dataclasses, json, resource, sys
    from streamconv import synth
    out, overrides = sys.argv[1], json.loads(sys.argv[2])
    synth.synth_checkpoint(out + "/warm", synth.TINY)  # imports and allocator warm-up
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cfg = dataclasses.replace(synth.DEEPSEEK_V3_671B, num_hidden_layers=1, first_k_dense_replace=0,
                              num_nextn_predict_layers=0, n_routed_experts=1, vocab_size=1024,
                              max_shard_bytes=128 << 20, **overrides)
    s = synth.synth_checkpoint(out + "/big", cfg)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"bytes": s["bytes"], "growth_kib": peak - base, "base_kib": base}))
""")


@pytest.mark.parametrize("overrides, size_mb, limit_mb", [
    # 132 MB: 32 heads (o_proj [7168, 4096] is 117 MB as float32, 15 bands), one expert, no shared expert
    ({"num_attention_heads": 32, "n_shared_experts": 0}, (120, 140), 100),
    # 305 MB: every per-tensor shape of the 671B model (o_proj [7168, 16384] alone is 470 MB as float32)
    pytest.param({}, (290, 320), 200, marks=pytest.mark.slow),
])
def test_memory_stays_bounded_for_a_real_shaped_slice(tmp_path, overrides, size_mb, limit_mb):
    # Peak RSS is measured inside the child after a warm-up, so the torch import (~230 MB) does not count; the
    # parent's RUSAGE_CHILDREN would include it.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd()] + sys.path))
    res = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tmp_path), json.dumps(overrides)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert size_mb[0] * 1e6 < got["bytes"] < size_mb[1] * 1e6
    assert got["growth_kib"] < limit_mb * 1024, got


# --- CLI ------------------------------------------------------------------------------------------------------

def parse(argv):
    parser = argparse.ArgumentParser()
    synth_cli.register(parser.add_subparsers())
    return parser.parse_args(["synth"] + argv)


def test_cli_dry_run_writes_nothing(tmp_path, capsys):
    out = tmp_path / "ckpt"
    assert parse(["--save-dir", str(out), "--target-size", "8GB", "--fp8", "--dry-run"]).func is synth_cli.run
    args = parse(["--save-dir", str(out), "--target-size", "8GB", "--fp8", "--dry-run"])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "model-00001-of-" in text and "nothing written" in text and "tensors" in text
    assert not out.exists()


def test_cli_writes_with_overrides(tmp_path, capsys):
    out = tmp_path / "ckpt"
    args = parse(["--save-dir", str(out), "--preset", "tiny", "--bf16", "--num-hidden-layers", "3",
                  "--n-routed-experts", "4", "--seed", "7", "--max-shard-size", "1MB"])
    cfg = synth_cli.config_from_args(args)
    assert cfg == dataclasses.replace(TINY, num_hidden_layers=3, n_routed_experts=4, seed=7,
                                      max_shard_bytes=10**6, fp8=False)
    assert args.func(args) == 0
    assert "wrote" in capsys.readouterr().out
    c = json.load(open(out / "config.json"))
    assert c["num_hidden_layers"] == 3 and c["n_routed_experts"] == 4
    assert "model.layers.3.shared_head.head.weight" in json.load(open(out / synth.INDEX_NAME))["weight_map"]


def test_cli_flag_per_shape_field_and_preset_conflict(tmp_path):
    args = parse(["--save-dir", "x", "--preset", "671b", "--num-hidden-layers", "4", "--n-routed-experts", "8"])
    cfg = synth_cli.config_from_args(args)
    assert cfg.hidden_size == 7168 and cfg.num_hidden_layers == 4 and cfg.n_routed_experts == 8 and cfg.fp8
    with pytest.raises(ValidationError, match="Lower first_k_dense_replace"):
        synth_cli.config_from_args(parse(["--save-dir", "x", "--preset", "671b", "--num-hidden-layers", "2"]))
    assert {f.name for f in dataclasses.fields(synth.SynthConfig)} - set(synth_cli.SHAPE_FIELDS) == {
        "fp8", "seed", "max_shard_bytes"}
    for name in synth_cli.SHAPE_FIELDS:
        assert getattr(parse(["--save-dir", "x", "--" + name.replace("_", "-"), "5"]), name) == 5
    with pytest.raises(ValidationError, match="--target-size"):
        synth_cli.config_from_args(parse(["--save-dir", "x", "--preset", "tiny", "--target-size", "2GB"]))
