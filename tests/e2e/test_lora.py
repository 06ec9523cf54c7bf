"""mcore -> HF with LoRA (spec §5): merges and adapter exports byte for byte against the eager reference of
``tests/lora_reference.py``, over the layout matrix, both merge types, FP8 re-export, and the refusals.

How a case is built: the tiny HF checkpoint goes to mcore with streamconv (its layouts are proven elsewhere);
LoRA factors drawn at the HF level are split per rank file by the eager base reference and written next to
(type 1) or apart from (type 2) the base with torch.save.  The oracles are the HF-level merge and the drawn
factors themselves (what the export must give back).
"""

from __future__ import annotations

import glob
import json
import os

import pytest
import torch
from safetensors import safe_open

from streamconv.errors import ValidationError
from streamconv.execute.executor import RunOptions, run_plan
from streamconv.layout.options import McoreOptions
from streamconv.layout.parallel import ParallelSizes
from streamconv.plan.lora import LoraOptions
from streamconv.plan.mcore2hf import ExportOptions, plan_mcore_to_hf
from streamconv.plan.planner import plan_hf_to_mcore
from tests import lora_reference as L
from tests.e2e.test_mcore2hf import eager_quant
from tests.reference import load_hf

RUN = RunOptions(band_bytes=8192, max_memory=8 << 20)
ALL = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "linear_q_up_proj", "linear_kv_up_proj", "eh_proj")
MM_SPLIT = ("linear_qkv", "linear_proj", "linear_qk_nope", "linear_qk_rope", "linear_kv_nope", "linear_v")
LAYOUT_KEYS = ("tp", "pp", "ep")


def split_layout(case: dict):
    sizes = ParallelSizes(*(case.get(k, 1) for k in LAYOUT_KEYS))
    return sizes, McoreOptions(**{k: v for k, v in case.items() if k not in LAYOUT_KEYS})


def load_dir(d):
    out = {}
    for path in sorted(glob.glob(os.path.join(d, "*.safetensors"))):
        with safe_open(path, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def bits(t):
    return t.contiguous().view(-1).view(torch.uint8)


def assert_same(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert torch.equal(bits(got[name]), bits(t)), name


def build(hf_dir, tmp_path, case, targets=ALL, kind="type1", alpha=16, factors_kw=None, **write_kw):
    """(base mcore dir, LoRA dir, HF factors): the case's checkpoint, written as training would leave it."""
    sizes, o = split_layout(case)
    base = str(tmp_path / "base")
    run_plan(plan_hf_to_mcore(hf_dir, base, sizes, o), RUN)
    _, hf = load_hf(hf_dir)
    factors = L.make_factors(hf, targets, **(factors_kw or {}))
    pieces = L.split_factors(hf_dir, factors, targets, str(tmp_path / "work"), **case)
    lora = L.write_lora_checkpoint(base, str(tmp_path / kind), pieces, kind=kind, **write_kw)
    return base, lora, factors


def merge(hf_dir, base, lora, out, case, kind="type1", alpha="16", export=ExportOptions(), **lora_kw):
    sizes, o = split_layout(case)
    opts = LoraOptions(r=L.R, alpha=alpha, load=lora if kind == "type2" else None, **lora_kw)
    plan = plan_mcore_to_hf(base if kind == "type2" else lora, out, sizes, o, export, hf_config_dir=hf_dir, lora=opts)
    plan.save(out + ".json")
    run_plan(plan, RUN)
    return out


def export_adapter(hf_dir, lora, out, case, layout="peft", **kw):
    sizes, o = split_layout(case)
    plan = plan_mcore_to_hf(lora, out, sizes, o, hf_config_dir=hf_dir,
                            lora=LoraOptions(r=L.R, alpha="16", save_to_hf=True, export_layout=layout, **kw))
    run_plan(plan, RUN)
    return out


def expected_merged(hf_dir, factors, case, alpha=16):
    _, hf = load_hf(hf_dir)
    want = L.merged_hf(hf, factors, alpha)
    if not case.get("mtp_num_layers"):
        want = {k: v for k, v in want.items() if not k.startswith("model.layers.4.")}
    return want


def adapter_tensors(d):
    with safe_open(os.path.join(d, "adapter_model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


CASES = [
    (dict(tp=2, pp=2, ep=2, moe_grouped_gemm=True, mtp_num_layers=1), "type1"),
    (dict(tp=2, ep=2, mtp_num_layers=1), "type2"),                                      # local experts
    (dict(pp=2, vpp_layers=1, moe_grouped_gemm=True), "type2"),                         # TP 1, VPP model0/1
]


@pytest.mark.parametrize("case,kind", CASES, ids=[f"{k}-" + ",".join(f"{a}={b}" for a, b in c.items())
                                                  for c, k in CASES])
def test_merge_and_export_equal_the_eager_reference(tiny_hf, tmp_path, case, kind):
    check_merge_and_export(tiny_hf["bf16"], tmp_path, case, kind)


def check_merge_and_export(src: str, tmp_path, case: dict, kind: str) -> None:
    """The case's LoRA checkpoint merges into the eager merge and exports the eager adapter (MTP layer 4's
    modules only where the case keeps MTP)."""
    base, lora, factors = build(src, tmp_path, case, kind=kind)
    out = merge(src, base, lora, str(tmp_path / "merged"), case, kind)
    assert_same(load_dir(out), expected_merged(src, factors, case))
    ad = export_adapter(src, lora, str(tmp_path / "adapter"), case)
    want = L.adapter_keys({m: f for m, f in factors.items()
                           if case.get("mtp_num_layers") or not m.startswith("model.layers.4.")})
    assert_same(adapter_tensors(ad), want)


def test_qwen3_moe_merge_and_export(tmp_path):
    """Family-neutral: Qwen3-MoE's GQA linear_qkv (split by whole query groups) merges and exports to
    q_proj/k_proj/v_proj, experts to the per-expert and fused layouts."""
    from tests.hf_tiny_families import build_tiny_qwen3_moe

    src = str(tmp_path / "qwen")
    build_tiny_qwen3_moe(src)
    case, targets = dict(tp=2, ep=2, moe_grouped_gemm=True), ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
    base, lora, factors = build(src, tmp_path, case, targets, kind="type1")
    _, hf = load_hf(src)
    assert_same(load_dir(merge(src, base, lora, str(tmp_path / "merged"), case)), L.merged_hf(hf, factors, 16))
    assert_same(adapter_tensors(export_adapter(src, lora, str(tmp_path / "ad"), case)), L.adapter_keys(factors))
    cfg = json.load(open(tmp_path / "ad" / "adapter_config.json"))
    assert cfg["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def test_type1_spellings_and_extra_state(tiny_hf, tmp_path):
    """lora_a/lora_b spelling and Transformer Engine _extra_state entries are read and dropped."""
    src, case = tiny_hf["bf16"], dict(tp=2, ep=2, mtp_num_layers=1)
    base, lora, factors = build(src, tmp_path, case, kind="type1", lower=True, extra_state=True)
    out = merge(src, base, lora, str(tmp_path / "merged"), case, "type1")
    assert_same(load_dir(out), expected_merged(src, factors, case))


def test_mla_mm_split_merges_and_refuses_to_export(tiny_hf, tmp_path):
    src = tiny_hf["bf16"]
    case = dict(tp=2, pp=2, mla_mm_split=True, mla_key_names="legacy", mtp_num_layers=1)
    base, lora, factors = build(src, tmp_path, case, MM_SPLIT, kind="type1")
    out = merge(src, base, lora, str(tmp_path / "merged"), case)
    assert_same(load_dir(out), expected_merged(src, factors, case))
    with pytest.raises(ValidationError, match="linear_qk_nope.*cannot hold as one rank-r adapter"):
        export_adapter(src, lora, str(tmp_path / "adapter"), case)
    assert not os.path.exists(tmp_path / "adapter")


def test_fp8_export_of_a_merge_is_merge_then_quantize(tiny_hf, tmp_path):
    """--fp8-export with a merge, one pass: every FP8 weight and scale equals the eager recipe applied to the
    eagerly merged weight."""
    src, case = tiny_hf["bf16"], dict(tp=2, ep=2, moe_grouped_gemm=True, mtp_num_layers=1)
    base, lora, factors = build(src, tmp_path, case, kind="type2")
    out = merge(src, base, lora, str(tmp_path / "fp8"), case, "type2", export=ExportOptions(fp8_export=True))
    got, want = load_dir(out), expected_merged(src, factors, case)
    quantized = 0
    for name, t in want.items():
        if name + "_scale_inv" in got:
            q, s = eager_quant(t)
            assert torch.equal(bits(got[name]), bits(q)) and torch.equal(got[name + "_scale_inv"], s), name
            quantized += 1
        else:
            assert torch.equal(bits(got[name]), bits(t)), name
    assert quantized > 0 and "model.layers.1.self_attn.q_a_proj.weight_scale_inv" in got


def eager_quant_prefer(w, prefer):
    """The release recipe with the original scales kept wherever the block still fits them (amax < 464 * s, the
    midpoint above 448), fresh ones (amax / 448) elsewhere."""
    rows, cols = w.shape
    s = torch.zeros_like(prefer)
    q = torch.zeros(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            block = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].float()
            amax = block.abs().max()
            s[i, j] = prefer[i, j] if amax < 464.0 * prefer[i, j] or (amax == 0 and prefer[i, j] == 0) else amax / 448
            if s[i, j] > 0:
                q[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = (block / s[i, j]).to(torch.float8_e4m3fn)
    return q, s


def test_fp8_export_of_a_merge_with_the_release_scales(tiny_hf, tmp_path):
    """From the FP8 release, merged and re-exported with --fp8-scales-from in one pass: every block keeps its
    original scale unless the merge pushed it past the range (small factors here, as fine-tuning leaves them)."""
    src, case = tiny_hf["fp8"], dict(tp=2, ep=2, moe_grouped_gemm=True, mtp_num_layers=1)
    base, lora, factors = build(src, tmp_path, case, kind="type2", factors_kw=dict(a=(1, -7), b=(1, -7)))
    out = merge(src, base, lora, str(tmp_path / "fp8"), case, "type2",
                export=ExportOptions(fp8_export=True, fp8_scales_from=src))
    got, want, release = load_dir(out), expected_merged(src, factors, case), load_dir(src)
    kept = fresh = 0
    for name, t in want.items():
        if name + "_scale_inv" not in got:
            assert torch.equal(bits(got[name]), bits(t)), name
            continue
        prefer = release[name + "_scale_inv"]
        q, s = eager_quant_prefer(t, prefer)
        assert torch.equal(bits(got[name]), bits(q)) and torch.equal(got[name + "_scale_inv"], s), name
        kept += int((s == prefer).sum())
        fresh += int((s != prefer).sum())
    assert kept > 0
    changed = sum(not torch.equal(bits(want[k]), bits(v)) for k, v in load_hf(src)[1].items() if k in want)
    assert changed > 50   # the merge did change the weights


def test_merged_checkpoint_round_trips_through_hf2mcore(tiny_hf, tmp_path):
    """The merged HF output is an ordinary checkpoint: hf2mcore then mcore2hf gives it back byte for byte."""
    src, case = tiny_hf["bf16"], dict(tp=2, moe_grouped_gemm=True)
    base, lora, factors = build(src, tmp_path, case, ("linear_qkv", "linear_fc1"), kind="type2")
    merged = merge(src, base, lora, str(tmp_path / "merged"), case, "type2")
    sizes, o = split_layout(case)
    run_plan(plan_hf_to_mcore(merged, str(tmp_path / "again"), sizes, o), RUN)
    run_plan(plan_mcore_to_hf(str(tmp_path / "again"), str(tmp_path / "back"), sizes, o), RUN)
    assert_same(load_dir(str(tmp_path / "back")), load_dir(merged))


def test_mindspeed_layout_files(tiny_hf, tmp_path):
    """The reference's files: a shard per HF layer (5/6-digit names), its index and adapter_config; tensors
    those of the eager export, correct at TP 2 (the reference concatenates linear_qkv's B across TP)."""
    src, case = tiny_hf["bf16"], dict(tp=2, ep=2, mtp_num_layers=1)
    _, lora, factors = build(src, tmp_path, case, kind="type2")
    ad = export_adapter(src, lora, str(tmp_path / "ms"), case, layout="mindspeed",
                        target_modules=ALL)
    names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ad, "*.safetensors")))
    assert names == [f"model-{i:05d}-of-000005.safetensors" for i in range(1, 6)]
    index = json.load(open(os.path.join(ad, "model.safetensors.index.json")))
    got = load_dir(ad)
    assert_same(got, L.adapter_keys(factors))
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in got.values())
    assert index["weight_map"]["base_model.model.model.layers.2.mlp.experts.5.up_proj.lora_B.weight"] == names[2]
    cfg = json.load(open(os.path.join(ad, "adapter_config.json")))
    assert cfg["target_modules"] == list(ALL) and cfg["r"] == L.R and cfg["lora_alpha"] == 16
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["modules_to_save"] == []


def test_peft_fused_layout_stacks_experts(tiny_hf, tmp_path):
    """peft-fused: routed experts as PEFT ParamWrapper factors of gate_up_proj / down_proj (written out here
    from PEFT's convention: A [r*E, in] expert-major, B [out, r*E] with column k*E + e), the rest per module."""
    src, case = tiny_hf["bf16"], dict(tp=2, ep=2, moe_grouped_gemm=True)
    _, lora, factors = build(src, tmp_path, case, kind="type2")
    got = adapter_tensors(export_adapter(src, lora, str(tmp_path / "fused"), case, layout="peft-fused"))
    want = {}
    for m, f in L.adapter_keys(factors).items():
        if ".mlp.experts." not in m and not m.startswith("base_model.model.model.layers.4."):
            want[m] = f
    for layer in (1, 2, 3):
        p = f"model.layers.{layer}.mlp.experts"
        gate_up = [(factors[f"{p}.{j}.gate_proj"][0], torch.cat([factors[f"{p}.{j}.gate_proj"][1],
                                                                  factors[f"{p}.{j}.up_proj"][1]])) for j in range(8)]
        down = [factors[f"{p}.{j}.down_proj"] for j in range(8)]
        for nest, pairs in (("base_layer.", gate_up), ("", down)):
            a = torch.cat([a for a, _ in pairs])
            b = torch.stack([b for _, b in pairs], dim=2).reshape(pairs[0][1].shape[0], -1)   # [out, r, E] -> col k*E+e
            want[f"base_model.model.{p}.{nest}lora_A.weight"] = a
            want[f"base_model.model.{p}.{nest}lora_B.weight"] = b
    assert_same(got, want)
    cfg = json.load(open(tmp_path / "fused" / "adapter_config.json"))
    assert cfg["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    assert "mlp.gate_proj" in cfg["target_modules"] and "gate_proj" not in cfg["target_modules"]


# --- validation: one error, nothing written -------------------------------------------------------------------

def refused(tmp_path, match, fn):
    out = tmp_path / "out"
    with pytest.raises(ValidationError, match=match):
        fn(str(out))
    assert not out.exists()


@pytest.fixture(scope="module")
def t2(tiny_hf, tmp_path_factory):
    """A type-2 case at TP 2 EP 2 GEMM, built once for the refusals."""
    tmp = tmp_path_factory.mktemp("lora_t2")
    case = dict(tp=2, ep=2, moe_grouped_gemm=True)
    targets = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "linear_kv_up_proj")
    base, lora, factors = build(tiny_hf["bf16"], tmp, case, targets, kind="type2")
    return base, lora, case


def test_refusals_before_any_write(tiny_hf, tmp_path, t2):
    src = tiny_hf["bf16"]
    base, lora, case = t2
    sizes, o = split_layout(case)

    def plan(out, d=base, **kw):
        return plan_mcore_to_hf(d, out, sizes, o, hf_config_dir=src, lora=LoraOptions(**kw))

    refused(tmp_path, r"has shape \[8, 192\] \(expected \[4, 192\] for --lora-r 4",
            lambda out: plan(out, r=4, alpha="16", load=lora))
    refused(tmp_path, "holds no LoRA factors", lambda out: plan(out, r=8, alpha="16"))
    refused(tmp_path, "Pass --lora-r and --lora-alpha", lambda out: plan(out, load=lora))
    refused(tmp_path, "--lora-target-modules linear_qkvv: no such weight",
            lambda out: plan(out, r=8, alpha="16", load=lora, target_modules=("linear_qkvv",)))
    refused(tmp_path, "has no LoRA factor A/B .*linear_q_up_proj",
            lambda out: plan(out, r=8, alpha="16", load=lora, target_modules=ALL[:-1]))
    refused(tmp_path, "--lora-alpha 'x'", lambda out: plan(out, r=8, alpha="x", load=lora))
    refused(tmp_path, "is not a LoRA target", lambda out: plan(out, r=8, alpha="16", load=lora,
                                                               target_modules=("linear_qkv", "linear_proj")))


def test_lora_only_checkpoint_of_another_layout_is_refused(tiny_hf, tmp_path, t2):
    """A LoRA-only checkpoint written at TP 1 cannot merge into a TP 2 base: missing/stray rank files."""
    src = tiny_hf["bf16"]
    base, _, case = t2
    _, other, _ = build(src, tmp_path / "tp1", dict(ep=2, moe_grouped_gemm=True), kind="type2")
    sizes, o = split_layout(case)
    refused(tmp_path, "rank dirs the flags do not account for|missing", lambda out: plan_mcore_to_hf(
        base, out, sizes, o, hf_config_dir=src, lora=LoraOptions(r=8, alpha="16", load=other)))


def test_lora_key_matching_no_base_is_refused(tiny_hf, tmp_path, t2):
    src = tiny_hf["bf16"]
    base, lora, case = t2
    path = glob.glob(os.path.join(lora, "iter_*", "mp_rank_00_000", "model_optim_rng.pt"))[0]
    bad = str(tmp_path / "bad")
    os.makedirs(bad)
    import shutil
    shutil.copytree(lora, bad, dirs_exist_ok=True)
    obj = torch.load(path, weights_only=True)
    obj["model"]["decoder.layers.9.self_attention.linear_qkv.lora_A.default.weight"] = torch.zeros(8, 192)
    torch.save(obj, path.replace(lora, bad))
    sizes, o = split_layout(case)
    refused(tmp_path, "decoder.layers.9.self_attention.linear_qkv.weight, which matches no base weight", lambda out:
            plan_mcore_to_hf(base, out, sizes, o, hf_config_dir=src, lora=LoraOptions(r=8, alpha="16", load=bad)))


# --- the matrix (slow) ---------------------------------------------------------------------------------------------

MATRIX = [(dict(tp=tp, pp=pp, ep=ep, moe_grouped_gemm=gg, mtp_num_layers=mtp), kind)
          for tp in (1, 2, 4) for pp in (1, 2) for ep in (1, 2) for gg in (False, True) for mtp in (0, 1)
          for kind in ("type1", "type2")]
MATRIX += [(dict(tp=2, pp=2, ep=2, moe_tp_extend_ep=True, dualpipev=True, moe_grouped_gemm=True, mtp_num_layers=1),
            "type1"),
           (dict(tp=2, ep=2, moe_tp_extend_ep=True), "type2"),
           (dict(tp=4, ep=2, expert_tensor_parallel_size=1, moe_grouped_gemm=True), "type1"),
           (dict(tp=2, pp=2, ep=4, expert_tensor_parallel_size=1), "type2"),
           (dict(pp=2, num_layers=6, noop_layers=(2, 5), vpp_layers=1, mtp_num_layers=1), "type1")]


@pytest.mark.slow
@pytest.mark.parametrize("case,kind", MATRIX, ids=[f"{k}-" + ",".join(f"{a}={b}" for a, b in c.items())
                                                   for c, k in MATRIX])
def test_matrix(tiny_hf, tmp_path, case, kind):
    check_merge_and_export(tiny_hf["fp8"], tmp_path, case, kind)


def test_export_reads_only_the_adapter(tiny_hf, t2, tmp_path):
    """--save-lora-to-hf plans reads of LoRA factors only, never of a base weight."""
    src = tiny_hf["bf16"]
    base, lora, case = t2
    sizes, o = split_layout(case)
    plan = plan_mcore_to_hf(lora, str(tmp_path / "ad"), sizes, o, hf_config_dir=src,
                            lora=LoraOptions(r=8, alpha="16", save_to_hf=True))
    from streamconv.graph.node import Op, toposort
    reads = {n.arg.tensor for f in plan.files for t in f.tensors for n in toposort([t.node]) if n.op is Op.READ}
    assert reads and all("lora" in name for name in reads)


def test_cli_flags(tiny_hf, t2, tmp_path, capsys):
    """MindSpeed's spelling: --lora-r --lora-alpha --lora-load --lora-target-modules --save-lora-to-hf; errors
    are one line with status 2 and write nothing."""
    from streamconv.cli.main import main

    src = tiny_hf["bf16"]
    base, lora, case = t2
    flags = ["--source-tensor-parallel-size", "2", "--source-expert-parallel-size", "2", "--moe-grouped-gemm"]
    merged = str(tmp_path / "merged")
    assert main(["convert", "mcore2hf", "--load-dir", base, "--save-dir", merged, *flags, "--lora-r", "8",
                 "--lora-alpha", "16", "--lora-load", lora, "--max-memory", "8MiB"]) == 0
    assert os.path.isfile(os.path.join(merged, "model.safetensors.index.json"))
    ad = str(tmp_path / "adapter")
    assert main(["convert", "mcore2hf", "--load-dir", lora, "--save-dir", ad, *flags, "--hf-config", src,
                 "--lora-r", "8", "--lora-alpha", "16", "--save-lora-to-hf", "--lora-export-layout", "peft-fused",
                 "--lora-target-modules", "linear_qkv", "linear_proj", "linear_fc1", "linear_fc2",
                 "linear_kv_up_proj"]) == 0
    assert json.load(open(os.path.join(ad, "adapter_config.json")))["target_parameters"]
    capsys.readouterr()
    assert main(["convert", "mcore2hf", "--load-dir", base, "--save-dir", str(tmp_path / "no"), *flags,
                 "--lora-r", "4", "--lora-alpha", "16", "--lora-load", lora]) == 2
    err = capsys.readouterr().err
    assert "expected [4, 192] for --lora-r 4" in err and not os.path.exists(tmp_path / "no")
    qlora = str(tmp_path / "q")
    assert main(["convert", "hf2mcore", "--load-dir", src, "--save-dir", qlora, "--qlora-nf4", "--nf4-layout", "cuda",
                 "--target-tensor-parallel-size", "2"]) == 0
    assert json.load(open(os.path.join(qlora, "streamconv_source.json")))["qlora"] == {"nf4_layout": "cuda"}
