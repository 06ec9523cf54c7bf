"""streamconv.loader end to end: every rank of every layout of the e2e matrix, materialised in memory from a plan
and straight from the HF directory, equals byte for byte what the independent eager reference says its file
holds (tests/reference.py), without writing anything; the same object as the converter's written file; a
skeleton model loads it strictly; every bad input is one error before any read."""

from __future__ import annotations

import dataclasses
import json
import os
from collections import OrderedDict

import pytest
import torch

from streamconv import synth
from streamconv.errors import PlanError, ValidationError
from streamconv.execute.executor import RunOptions, run_plan
from streamconv.layout.options import McoreOptions
from streamconv.layout.parallel import ParallelSizes
from streamconv.loader import MismatchError, load_rank, open_rank, rank_paths
from streamconv.plan.planner import plan_hf_to_mcore
from streamconv.execute import kernels
from tests.e2e.test_layouts import CASES
from tests.reference import assert_same_checkpoint, load_mcore_dir, reference_hf_to_mcore
from tests.reference_families import reference_hf_to_mcore_family

SIZE_KEYS = {"tp": "target_tensor_parallel_size", "pp": "target_pipeline_parallel_size",
             "ep": "target_expert_parallel_size"}
FLAG_OF = {"vpp_layers": "num_layers_per_virtual_pipeline_stage", "gg": "moe_grouped_gemm", "mtp": "mtp_num_layers"}


def rank_of(rel: str, pp: int, ep: int) -> tuple[int, int, int]:
    """(tp, pp, ep) from a rank directory name mp_rank_TT[_PPP][_EEE] (written independently of the loader)."""
    parts = rel.split("/")[1].split("_")[2:]
    tp_rank = int(parts[0])
    pp_rank = int(parts[1]) if pp > 1 else 0
    ep_rank = int(parts[-1]) if ep > 1 else 0
    return tp_rank, pp_rank, ep_rank


def flags(case: dict) -> dict:
    """The case's layout as open_rank keywords (the CLI flags' names)."""
    out = {}
    for k, v in case.items():
        if k in SIZE_KEYS:
            out[SIZE_KEYS[k]] = v
        elif k == "dualpipev":
            out["schedules_method"] = "dualpipev" if v else None
        else:
            out[FLAG_OF.get(k, k)] = v
    return out


def expected_ranks(hf, case, reference=reference_hf_to_mcore):
    layout = {k: v for k, v in case.items() if k not in ("tp", "pp", "ep", "gg", "mtp")}
    return {rel: sd for rel, sd in reference(hf, tp=case.get("tp", 1), pp=case.get("pp", 1), ep=case.get("ep", 1),
                                             moe_grouped_gemm=case.get("gg", True),
                                             mtp_num_layers=case.get("mtp", 1), **layout).items()
            if rel.endswith(".pt")}


def plan_for(hf, out, case):
    layout = {k: v for k, v in case.items() if k not in ("tp", "pp", "ep", "gg", "mtp")}
    return plan_hf_to_mcore(hf, out, ParallelSizes(case.get("tp", 1), case.get("pp", 1), case.get("ep", 1)),
                            McoreOptions(moe_grouped_gemm=case.get("gg", True), mtp_num_layers=case.get("mtp", 1),
                                         **layout))


def check_every_rank(hf, tmp_path, case, *, from_hf=True, **load):
    case = dict(case)
    case.setdefault("gg", True)
    case.setdefault("mtp", 1)
    plan_path = str(tmp_path / "plan.json")
    plan_for(hf, str(tmp_path / "never-written"), case).save(plan_path)
    want = expected_ranks(hf, case)
    kw = flags(case)
    for rel, sd in want.items():
        tp_rank, pp_rank, ep_rank = rank_of(rel, case.get("pp", 1), case.get("ep", 1))
        got = open_rank(plan_path, tp_rank=tp_rank, pp_rank=pp_rank, ep_rank=ep_rank).state_dict(**load)
        assert_same_checkpoint({rel: got}, {rel: sd})
        if from_hf:
            got = open_rank(hf, tp_rank=tp_rank, pp_rank=pp_rank, ep_rank=ep_rank, **kw).state_dict(**load)
            assert_same_checkpoint({rel: got}, {rel: sd})
    assert not (tmp_path / "never-written").exists()
    return want


LOADER_CASES = [dict(tp=2, pp=2, ep=2), dict(tp=4, ep=2, gg=False, mtp=0)] + CASES


IDS = [",".join(f"{k}={v}" for k, v in c.items()) for c in LOADER_CASES]
# straight from the HF directory by default: one case of each kind (VPP, noop, dualpipev, uneven stages,
# tp-extend-ep, expert-TP 1, MLA variants); every case under -m slow
HF_DEFAULT = {0, 2, 4, 5, 7, 9, 12, 15}


@pytest.mark.parametrize("i", range(len(LOADER_CASES)), ids=IDS)
def test_every_rank_of_every_layout_fp8(tiny_hf, tmp_path, i):
    check_every_rank(tiny_hf["fp8"], tmp_path, LOADER_CASES[i], from_hf=i in HF_DEFAULT)


@pytest.mark.slow
@pytest.mark.parametrize("i", sorted(set(range(len(LOADER_CASES))) - HF_DEFAULT),
                         ids=[IDS[i] for i in sorted(set(range(len(LOADER_CASES))) - HF_DEFAULT)])
def test_every_layout_straight_from_hf(tiny_hf, tmp_path, i):
    check_every_rank(tiny_hf["fp8"], tmp_path, LOADER_CASES[i])


@pytest.mark.parametrize("case", [dict(tp=2, pp=2, ep=2), dict(tp=2, ep=4, moe_tp_extend_ep=True),
                                  dict(tp=4, ep=8, expert_tensor_parallel_size=1), dict(pp=2, ep=2, dualpipev=True)],
                         ids=["tp2pp2ep2", "tp-extend-ep", "etp1", "dualpipev"])
def test_bf16_source(tiny_hf, tmp_path, case):
    check_every_rank(tiny_hf["bf16"], tmp_path, case)


@pytest.fixture(scope="module")
def deep_hf(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("deep") / "hf")
    synth.synth_checkpoint(d, dataclasses.replace(synth.TINY, num_hidden_layers=13, fp8=True, max_shard_bytes=400_000))
    return d


@pytest.mark.parametrize("case", [
    dict(pp=4, ep=2, num_layers=16, noop_layers=(13, 14, 15), dualpipev=True),       # the pretrain script
    dict(tp=2, pp=2, ep=2, num_layers=16, noop_layers=(7, 14, 15), vpp_layers=2),     # the A3 scripts
], ids=["pretrain", "a3"])
def test_training_script_layouts(deep_hf, tmp_path, case):
    check_every_rank(deep_hf, tmp_path, case, from_hf=False)


def test_device_decode_small_bands_and_threads(tiny_hf, tmp_path):
    """FP8 decoded by the device path (on CPU tensors here), bands of a few KB, 3 threads: same bytes."""
    check_every_rank(tiny_hf["fp8"], tmp_path, dict(tp=2, pp=2, ep=2), from_hf=False, dequant_on="device",
                     max_memory=64_000, workers=3)


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    out = {}
    for family in ("qwen3_moe", "deepseek_v32"):
        d = str(root / family)
        synth.synth_checkpoint(d, synth.preset("tiny", family, fp8=family == "deepseek_v32", max_shard_bytes=200_000))
        out[family] = d
    return out


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v32"])
def test_other_families(families, tmp_path, family):
    hf = families[family]
    case = dict(tp=2, pp=2, ep=2, moe_grouped_gemm=True)
    plan = plan_hf_to_mcore(hf, str(tmp_path / "x"), ParallelSizes(2, 2, 2), McoreOptions(moe_grouped_gemm=True))
    want = {r: sd for r, sd in reference_hf_to_mcore_family(hf, tp=2, pp=2, ep=2, moe_grouped_gemm=True).items()
            if r.endswith(".pt")}
    assert len(want) == 8
    for rel, sd in want.items():
        t, p, e = rank_of(rel, 2, 2)
        assert_same_checkpoint({rel: open_rank(plan, tp_rank=t, pp_rank=p, ep_rank=e).state_dict()}, {rel: sd})
        got = open_rank(hf, tp_rank=t, pp_rank=p, ep_rank=e, **{SIZE_KEYS[k]: case[k] for k in SIZE_KEYS},
                        moe_grouped_gemm=True).state_dict()
        assert_same_checkpoint({rel: got}, {rel: sd})


def test_same_object_as_the_converters_file_key_order_included(tiny_hf, tmp_path):
    """The converter's written file and the loader's state dict: same keys in the same order, same bytes; and
    the legacy ``load_rank`` wrapper gives the same."""
    out = str(tmp_path / "mcore")
    plan = plan_for(tiny_hf["fp8"], out, dict(tp=2, pp=2, ep=2, vpp_layers=1, gg=True, mtp=1))
    run_plan(plan, RunOptions(band_bytes=8192, max_memory=8 << 20))
    written = load_mcore_dir(out)
    for rel in rank_paths(plan):
        t, p, e = rank_of(rel, 2, 2)
        got = open_rank(plan, tp_rank=t, pp_rank=p, ep_rank=e).state_dict()
        assert list(got) == list(written[rel])                    # model0, model1, checkpoint_version, iteration
        assert_same_checkpoint({rel: got}, {rel: written[rel]}, check_order=True)
        assert_same_checkpoint({rel: load_rank(plan, rel)}, {rel: written[rel]}, check_order=True)


def test_ranks_of_an_mcore2mcore_plan_are_its_files(tiny_hf, tmp_path):
    """A training job in a new layout loads its rank straight from the old checkpoint: open_rank of a saved
    mcore2mcore plan, or of the old checkpoint's directory with the new layout's keywords (its record gives the
    old layout; only this rank is planned), gives key for key and byte for byte the rank file the plan writes."""
    from streamconv.plan.mcore2mcore import plan_mcore_to_mcore

    a = str(tmp_path / "a")
    run_plan(plan_for(tiny_hf["fp8"], a, dict(tp=2, ep=2, gg=True, mtp=1)), RunOptions())
    plan = plan_mcore_to_mcore(a, str(tmp_path / "b"), ParallelSizes(2, 1, 2),
                               McoreOptions(moe_grouped_gemm=True, mtp_num_layers=1), ParallelSizes(1, 2, 2),
                               McoreOptions(mtp_num_layers=1, vpp_layers=1))
    plan.save(str(tmp_path / "reshard.json"))
    run_plan(plan, RunOptions(band_bytes=8192, max_memory=8 << 20))
    written = load_mcore_dir(str(tmp_path / "b"))
    assert len(rank_paths(plan)) == 4
    for rel in rank_paths(plan):
        t, p, e = rank_of(rel, 2, 2)
        got = open_rank(str(tmp_path / "reshard.json"), tp_rank=t, pp_rank=p, ep_rank=e,
                        target_pipeline_parallel_size=2).state_dict()
        assert_same_checkpoint({rel: got}, {rel: written[rel]}, check_order=True)
        rank = open_rank(a, tp_rank=t, pp_rank=p, ep_rank=e, target_pipeline_parallel_size=2,
                         target_expert_parallel_size=2, mtp_num_layers=1, num_layers_per_virtual_pipeline_stage=1)
        assert len(rank.plan.files) == 1 and rank.plan.options["ranks"] == [[t, p, e]]
        assert_same_checkpoint({rel: rank.state_dict()}, {rel: written[rel]}, check_order=True)
    # a record whose layout is not one (wrong types), then none at all (a checkpoint another tool wrote): one
    # error each saying what to do, before any read
    record = os.path.join(a, "streamconv_source.json")
    with open(record) as f:
        obj = json.load(f)
    for layout in ({"sizes": {"tp": "two"}}, {"sizes": {}, "options": {"no_such_flag": 1}}, "x"):
        with open(record, "w") as f:
            json.dump(dict(obj, layout=layout), f)
        with pytest.raises(ValidationError, match="streamconv_source.json|without streamconv's record") as info:
            open_rank(a, target_pipeline_parallel_size=2)
        assert "\n" not in str(info.value) and "reshard plan" in str(info.value)
    os.remove(record)
    with pytest.raises(ValidationError, match="without streamconv's record .* Save a reshard plan"):
        open_rank(a, target_pipeline_parallel_size=2)


def test_stream_yields_complete_tensors_in_file_order(tiny_hf, tmp_path):
    plan = plan_for(tiny_hf["fp8"], str(tmp_path / "x"), dict(tp=2, ep=2, gg=True, mtp=1))
    rank = open_rank(plan, tp_rank=1, ep_rank=1)
    seen = [(spec.group, spec.name, tuple(t.shape), t.dtype) for spec, t in rank.stream(max_memory=40_000)]
    assert seen == [(s.group, s.name, s.shape, s.dtype) for s in rank.tensors]
    assert rank.nbytes == sum(s.nbytes for s in rank.tensors) > 0


# --- into a model ---------------------------------------------------------------------------------------------------

class Skeleton(torch.nn.Module):
    """A module whose parameters are exactly ``shapes`` (dotted names -> (shape, dtype)), on ``device``."""

    def __init__(self, shapes: dict, device="cpu"):
        super().__init__()
        for name, (shape, dtype) in shapes.items():
            *path, leaf = name.split(".")
            mod = self
            for part in path:
                if not hasattr(mod, part):
                    mod.add_module(part, torch.nn.Module())
                mod = getattr(mod, part)
            mod.register_parameter(leaf, torch.nn.Parameter(torch.empty(shape, dtype=dtype, device=device),
                                                            requires_grad=False))


def skeletons(expected: dict, device="cpu") -> list[Skeleton]:
    """One skeleton per model chunk of a reference rank file (names and shapes from the reference only)."""
    groups = [k for k in expected if k == "model" or (k.startswith("model") and k[5:].isdigit())]
    return [Skeleton({n: (tuple(t.shape), t.dtype) for n, t in expected[g].items()}, device) for g in groups]


def test_skeleton_loads_strictly_and_load_into_fills_it(tiny_hf, tmp_path):
    hf = tiny_hf["fp8"]
    case = dict(tp=2, pp=2, ep=2, vpp_layers=1, gg=True, mtp=1)
    plan = plan_for(hf, str(tmp_path / "x"), case)
    for rel, sd in expected_ranks(hf, case).items():
        t, p, e = rank_of(rel, 2, 2)
        rank = open_rank(plan, tp_rank=t, pp_rank=p, ep_rank=e)
        meta = skeletons(sd, device="meta")
        rank.check_against(meta)                                        # shapes and dtypes only
        chunks = skeletons(sd)
        state = rank.state_dict()
        for i, chunk in enumerate(chunks):
            chunk.load_state_dict(state[f"model{i}"], strict=True)
        fresh = skeletons(sd)
        rank.load_into(fresh, max_memory=30_000)                        # band by band, tiny bands
        for i, chunk in enumerate(fresh):
            got = OrderedDict((k, v.detach()) for k, v in chunk.state_dict().items())
            assert_same_checkpoint({rel: got}, {rel: sd[f"model{i}"]})


def test_load_into_a_plain_state_dict_and_one_module(tiny_hf, tmp_path):
    hf = tiny_hf["bf16"]
    plan = plan_for(hf, str(tmp_path / "x"), dict(tp=2, gg=False, mtp=0))
    want = expected_ranks(hf, dict(tp=2, gg=False, mtp=0))
    rel = sorted(want)[1]
    rank = open_rank(plan, tp_rank=1)
    target = {n: torch.zeros_like(v) for n, v in want[rel]["model"].items()}
    rank.load_into(target)
    assert_same_checkpoint({rel: target}, {rel: want[rel]["model"]})


@pytest.fixture
def reads(monkeypatch):
    """Counts reads of tensor data (``kernels.read_kernel``: every read node the loader or converter runs)."""
    calls = []
    real = kernels.read_kernel

    def counting(root, arg, out=None):
        calls.append((arg.file, arg.tensor, arg.rows))
        return real(root, arg, out)

    monkeypatch.setattr(kernels, "read_kernel", counting)
    return calls


def test_mismatches_are_one_report_before_any_read(tiny_hf, tmp_path, reads):
    hf = tiny_hf["fp8"]
    case = dict(tp=2, ep=2, gg=True, mtp=1)
    plan = plan_for(hf, str(tmp_path / "x"), case)
    rel, sd = sorted(expected_ranks(hf, case).items())[0]
    shapes = {n: (tuple(t.shape), t.dtype) for n, t in sd["model"].items()}
    names = sorted(shapes)
    shapes.pop(names[0])                                                           # the rank has it, the model not
    shapes["decoder.layers.0.self_attention.extra.weight"] = ((3,), torch.bfloat16)  # the model has it, the rank not
    shape, dtype = shapes[names[1]]
    shapes[names[1]] = ((shape[0] + 1,) + shape[1:], dtype)                       # mis-shaped
    shape, _ = shapes[names[2]]
    shapes[names[2]] = (shape, torch.float32)                                     # wrong dtype
    model = Skeleton(shapes, device="meta")
    rank = open_rank(plan, tp_rank=0, ep_rank=0)
    before = len(reads)
    with pytest.raises(MismatchError) as err:
        rank.load_into(model)
    msg = str(err.value)
    assert "4 problems" in msg
    for needle in (f"{names[0]}: unexpected", "extra.weight: missing", f"{names[1]}: shape", f"{names[2]}: dtype"):
        assert needle in msg
    assert len(reads) == before, "a mismatch must be reported before any tensor data is read"
    with pytest.raises(MismatchError, match="2 model chunk"):
        open_rank(plan_for(hf, str(tmp_path / "v"), dict(pp=2, vpp_layers=1, gg=True, mtp=1))).check_against(model)


def test_wrong_family_is_refused_before_any_read(tiny_hf, families, tmp_path, reads):
    """A DeepSeek-V3 rank checked against a Qwen3-MoE model's skeleton: every key reported, nothing read."""
    qwen = expected_ranks(families["qwen3_moe"], dict(gg=True, mtp=0), reference=reference_hf_to_mcore_family)
    (_, sd), = qwen.items()
    rank = open_rank(tiny_hf["fp8"], moe_grouped_gemm=True)
    before = len(reads)
    with pytest.raises(MismatchError, match="problems"):
        rank.check_against(skeletons(sd, device="meta")[0])
    assert len(reads) == before


@pytest.mark.parametrize("kw,match", [
    (dict(tp_rank=2), "tp_rank=2 is out of range: the layout has tensor parallel size 2"),
    (dict(pp_rank=-1), "pp_rank=-1 is out of range"),
    (dict(ep_rank=4), "ep_rank=4 is out of range"),
])
def test_rank_out_of_range(tiny_hf, tmp_path, kw, match, reads):
    plan = plan_for(tiny_hf["fp8"], str(tmp_path / "x"), dict(tp=2, pp=2, ep=2))
    plan.save(str(tmp_path / "p.json"))
    for src, extra in ((plan, {}), (str(tmp_path / "p.json"), {}),
                       (tiny_hf["fp8"], dict(target_tensor_parallel_size=2, target_pipeline_parallel_size=2,
                                             target_expert_parallel_size=2))):
        with pytest.raises(ValidationError, match=match):
            open_rank(src, **kw, **extra)
    assert reads == []


def test_rank_file_the_layout_does_not_instantiate(tiny_hf, tmp_path):
    """Expert-TP 1 at TP 4 EP 2: only (t, t mod 2) exist; (tp 1, ep 0) is in range but not a file."""
    plan = plan_for(tiny_hf["fp8"], str(tmp_path / "x"), dict(tp=4, ep=2, expert_tensor_parallel_size=1))
    with pytest.raises(ValidationError, match="no rank file mp_rank_01_000 .* only the \\(tp, ep\\) pairs"):
        open_rank(plan, tp_rank=1, ep_rank=0)
    with pytest.raises(ValidationError, match="no rank file mp_rank_01_000"):
        open_rank(tiny_hf["fp8"], tp_rank=1, ep_rank=0, target_tensor_parallel_size=4, target_expert_parallel_size=2,
                  expert_tensor_parallel_size=1)


def test_layout_keywords_must_agree_with_a_plan(tiny_hf, tmp_path):
    plan = plan_for(tiny_hf["fp8"], str(tmp_path / "x"), dict(tp=2, ep=2, gg=True))
    open_rank(plan, target_tensor_parallel_size=2, moe_grouped_gemm=True, mtp_num_layers=1)   # agrees
    with pytest.raises(ValidationError) as err:
        open_rank(plan, target_tensor_parallel_size=4, moe_grouped_gemm=False)
    assert "target_tensor_parallel_size=4 but the plan was made for 2" in str(err.value)
    assert "moe_grouped_gemm=False but the plan was made for True" in str(err.value)
    with pytest.raises(ValidationError, match="not a layout keyword"):
        open_rank(plan, target_tensor_parallel=2)


def test_layout_the_model_does_not_fit_from_hf(tiny_hf):
    with pytest.raises(ValidationError, match="does not divide"):
        open_rank(tiny_hf["fp8"], target_tensor_parallel_size=3)


def test_stale_plan_and_moved_sources(tiny_hf, tmp_path, reads):
    hf = str(tmp_path / "hf")
    synth.synth_checkpoint(hf, dataclasses.replace(synth.TINY, fp8=True, max_shard_bytes=200_000))
    plan = plan_for(hf, str(tmp_path / "x"), dict(tp=2))
    plan.save(str(tmp_path / "p.json"))
    moved = str(tmp_path / "moved")
    os.rename(hf, moved)
    with pytest.raises(ValidationError, match="source file named by the plan is missing"):
        open_rank(str(tmp_path / "p.json"))
    rank = open_rank(str(tmp_path / "p.json"), source_root=moved)     # relocated checkpoint
    assert rank.state_dict()["model"]
    shard = sorted(n for n in os.listdir(moved) if n.endswith(".safetensors"))[0]
    with open(os.path.join(moved, shard), "ab") as f:
        f.write(b"\0" * 16)
    reads.clear()
    with pytest.raises(ValidationError, match="changed since the plan was made"):
        open_rank(str(tmp_path / "p.json"), source_root=moved)
    assert reads == []


def test_plans_that_are_not_hf2mcore_or_malformed(tmp_path, tiny_hf):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps({"schema_version": 1, "kind": "mcore2hf"}))
    with pytest.raises(PlanError, match="a training job loads ranks of an hf2mcore or mcore2mcore plan"):
        open_rank(str(p))
    p.write_text("{")
    with pytest.raises(PlanError, match="not valid JSON"):
        open_rank(str(p))
    with pytest.raises(ValidationError, match="must be a plan path"):
        open_rank(42)


def test_device_that_is_not_there_fails_before_any_read(tiny_hf, tmp_path, reads):
    rank = open_rank(tiny_hf["fp8"])
    for device, match in (("cuda:0", "no cuda device|index out of range"), ("npu:0", "torch_npu"),
                          ("tpu", "not a device torch knows")):
        if device.startswith("cuda") and torch.cuda.is_available():
            continue
        with pytest.raises(ValidationError.__mro__[1], match=match):
            rank.state_dict(device=device)
    assert reads == []


def test_partial_plan_cannot_pose_as_a_checkpoint(tiny_hf, tmp_path):
    """The one-rank plan the loader makes has no tracker: running it can never leave a 'complete' checkpoint."""
    from streamconv.layout.parallel import RankFile

    plan = plan_hf_to_mcore(tiny_hf["fp8"], str(tmp_path / "out"), ParallelSizes(2, 1, 2), McoreOptions(),
                            ranks={RankFile(1, 0, 1)})
    assert [f.path for f in plan.files] == ["iter_0000001/mp_rank_01_001/model_optim_rng.pt"]
    assert plan.options["ranks"] == [[1, 0, 1]]


def test_device_decode_that_fails_its_self_check_falls_back_to_the_host(tiny_hf, tmp_path, monkeypatch, caplog):
    """A device whose FP8 decode disagrees with the host kernel (here: a table entry off by one bit for one
    code) is caught at start-up; the rank is decoded on the host, with a warning naming the code."""
    from streamconv.execute import device as devices
    from streamconv.loader import rank as rank_mod

    class OffByOne(devices.DeviceDequant):
        def __call__(self, arg, w, s):
            out = super().__call__(arg, w, s)
            iv = out.view(torch.int16) if out.element_size() == 2 else out.view(torch.int32)
            iv[w.contiguous().view(torch.uint8) == 0x38] ^= 1
            return out

    monkeypatch.setattr(devices, "DeviceDequant", OffByOne)
    monkeypatch.setattr(rank_mod, "_CHECKED", {})
    plan = plan_for(tiny_hf["fp8"], str(tmp_path / "x"), dict(tp=2, ep=2))
    want = expected_ranks(tiny_hf["fp8"], dict(tp=2, ep=2, gg=True, mtp=1))
    rel = "iter_0000001/mp_rank_01_001/model_optim_rng.pt"
    rank = open_rank(plan, tp_rank=1, ep_rank=1)
    with caplog.at_level("WARNING"):
        got = rank.state_dict(dequant_on="device")
    assert rank.dequant_used == "host"
    assert "does not match the host kernel" in caplog.text and "code 56" in caplog.text
    assert_same_checkpoint({rel: got}, {rel: want[rel]})
    monkeypatch.setattr(devices, "DeviceDequant", OffByOne.__mro__[1])
    monkeypatch.setattr(rank_mod, "_CHECKED", {})
    rank.state_dict(dequant_on="device")
    assert rank.dequant_used == "device:table"
