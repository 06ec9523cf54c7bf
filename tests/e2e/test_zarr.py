"""Zarr stores end to end.

Oracles: the original HF directory (HF -> zarr -> HF gives back every file byte for byte), zarr-python itself
(``zarr.open`` of the store, every array against the source tensor read by the safetensors library), hf2mcore
from the HF directory (from the store it must write the same bytes), mcore2hf (mcore2zarr then zarr2hf must
write what it writes), and, for the bytes a rank reads from a store, the eager reference converter run over a
checkpoint whose every element holds its own index: the elements a rank's files hold are exactly the elements it
needs, counted independently of streamconv; the bytes read are counted by the kernel (/proc/self/io).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import load_file, save_file

from streamconv import synth
from streamconv.cli.main import main
from streamconv.errors import ValidationError
from streamconv.execute.executor import RunOptions, run_plan
from streamconv.plan.mcore2hf import ExportOptions, plan_mcore_to_hf
from streamconv.plan.plan import Plan
from streamconv.plan.planner import plan_hf_to_mcore
from streamconv.plan.zarr_plans import StoreOptions, plan_hf_to_zarr, plan_mcore_to_zarr, plan_zarr_to_hf
from streamconv.storage import zarr_store
from tests.e2e.test_mcore2hf import CASES as LAYOUTS
from tests.e2e.test_mcore2mcore import files_of, split
from tests.reference import reference_hf_to_mcore

FAST = RunOptions(max_memory=256 << 20)
SMALL_BANDS = RunOptions(band_bytes=16384, max_memory=16 << 20)


def to_zarr(hf: str, out: str, compressor: str = "none", run=FAST, **kw) -> str:
    plan = plan_hf_to_zarr(hf, out, StoreOptions(compressor=compressor, **kw))
    plan.save(out + ".json")
    run_plan(Plan.load(out + ".json"), run)
    return out


@pytest.fixture(scope="module")
def hf_dirs(tiny_hf, tmp_path_factory):
    """The tiny checkpoints plus a tokenizer file and a generation config, as a real HF directory has."""
    root = tmp_path_factory.mktemp("hf_with_files")
    out = {}
    for kind, src in tiny_hf.items():
        d = root / kind
        d.mkdir()
        for name in os.listdir(src):
            (d / name).write_bytes((tmp := open(os.path.join(src, name), "rb")).read())
            tmp.close()
        (d / "tokenizer.json").write_text('{"model": {"vocab": {"\\u00e9": 0}}, "added": "caf\u00e9"}\r\n',
                                          encoding="utf-8", newline="")
        (d / "generation_config.json").write_text('{"bos_token_id": 0}\n')
        out[kind] = str(d)
    return out


@pytest.fixture(scope="module")
def fp8_store(hf_dirs, tmp_path_factory):
    """The FP8 checkpoint as a zstd store, written in small bands (shards get pieces from many tasks)."""
    return to_zarr(hf_dirs["fp8"], str(tmp_path_factory.mktemp("fp8_store") / "store"), "zstd", run=SMALL_BANDS)


@pytest.mark.parametrize("kind,compressor", [("bf16", "none"), ("fp8", "zstd"),
                                             pytest.param("fp8", "blosc", marks=pytest.mark.slow),
                                             pytest.param("bf16", "zstd", marks=pytest.mark.slow),
                                             pytest.param("fp8", "none", marks=pytest.mark.slow)])
def test_hf_zarr_hf_is_byte_identical(hf_dirs, fp8_store, tmp_path, kind, compressor):
    if (kind, compressor) == ("fp8", "zstd"):
        store = fp8_store
    else:
        store = to_zarr(hf_dirs[kind], str(tmp_path / "store"), compressor, run=SMALL_BANDS)
    run_plan(plan_zarr_to_hf(store, str(tmp_path / "back")), FAST)
    assert files_of(str(tmp_path / "back")) == files_of(hf_dirs[kind])


def test_plain_zarr_open_sees_every_tensor(hf_dirs, fp8_store):
    """FP8 stays FP8: uint8 arrays with the dtype in their attributes, scales float32 beside them."""
    src = hf_dirs["fp8"]
    store = fp8_store
    want = {}
    for name in os.listdir(src):
        if name.endswith(".safetensors"):
            want.update(load_file(os.path.join(src, name)))
    group = zarr.open_group(store, mode="r")
    experts = {}   # "model.layers.i.mlp.experts.{j}.<proj...>" -> expert count, from the source's names alone
    for name in want:
        m = re.match(r"^(.*\.mlp\.experts\.)(\d+)(\..*)$", name)
        if m:
            key = m[1] + "{j}" + m[3]
            experts[key] = max(experts.get(key, 0), int(m[2]) + 1)
    assert experts
    seen, stacked = set(), 0
    for name, t in want.items():
        m = re.match(r"^(.*\.mlp\.experts\.)(\d+)(\..*)$", name)
        if m:   # a layer's routed experts are one array per projection, expert j at index j
            n = experts[m[1] + "{j}" + m[3]]
            stack = group[f"{m[1]}0-{n - 1}{m[3]}"]
            assert stack.shape == (n,) + tuple(t.shape), name
            arr, attrs, stacked = stack[int(m[2])], stack.attrs, stacked + 1
        else:
            arr = group[name]
            attrs, arr = arr.attrs, arr[...]
        seen.add(name)
        assert arr.shape == tuple(t.shape), name
        if t.dtype == torch.float8_e4m3fn:
            assert arr.dtype == np.uint8 and attrs["dtype"] == "float8_e4m3fn"
            expect = t.view(torch.uint8).numpy()
        elif t.dtype == torch.bfloat16:
            assert arr.dtype == np.uint16 and attrs["dtype"] == "bfloat16"
            expect = t.view(torch.int16).numpy().view(np.uint16)
        else:
            assert arr.dtype == np.float32, name
            expect = t.numpy()
        assert np.array_equal(arr, expect), name
    assert stacked and len(list(group.array_keys())) == len(want) - stacked + len(experts)
    assert any(n.endswith("_scale_inv") for n in seen)
    assert group.attrs["streamconv"]["codec"] == {"name": "zstd", "level": 1}   # zstd's default level
    kept = dict(group["hf"].attrs["files"])
    assert kept["tokenizer.json"] == open(os.path.join(src, "tokenizer.json"), encoding="utf-8", newline="").read()


STORE_CASES = [LAYOUTS[5], LAYOUTS[8]]


@pytest.mark.parametrize("layout", STORE_CASES + [pytest.param(c, marks=pytest.mark.slow) for c in LAYOUTS
                                                  if c not in STORE_CASES],
                         ids=[",".join(f"{k}={v}" for k, v in c.items()) for c in STORE_CASES]
                         + [",".join(f"{k}={v}" for k, v in c.items()) for c in LAYOUTS if c not in STORE_CASES])
def test_hf2mcore_from_the_store_equals_from_the_directory(hf_dirs, fp8_store, tmp_path, layout):
    src = hf_dirs["fp8"]
    store = fp8_store
    run_plan(plan_hf_to_mcore(store, str(tmp_path / "from-store"), *split(layout)), SMALL_BANDS)
    run_plan(plan_hf_to_mcore(src, str(tmp_path / "from-dir"), *split(layout)), FAST)
    assert files_of(str(tmp_path / "from-store")) == files_of(str(tmp_path / "from-dir"))


def test_mcore2zarr_then_zarr2hf_equals_mcore2hf(hf_dirs, tmp_path):
    layout = LAYOUTS[0]
    run_plan(plan_hf_to_mcore(hf_dirs["bf16"], str(tmp_path / "m"), *split(layout)), FAST)
    hf_plan = plan_mcore_to_hf(str(tmp_path / "m"), str(tmp_path / "unused"), *split(layout),
                               hf_config_dir=hf_dirs["bf16"])
    run_plan(plan_mcore_to_zarr(hf_plan, str(tmp_path / "store"), StoreOptions(compressor="zstd")), FAST)
    assert not (tmp_path / "unused").exists()
    run_plan(plan_zarr_to_hf(str(tmp_path / "store"), str(tmp_path / "back")), FAST)
    run_plan(plan_mcore_to_hf(str(tmp_path / "m"), str(tmp_path / "hf"), *split(layout),
                              hf_config_dir=hf_dirs["bf16"]), FAST)
    assert files_of(str(tmp_path / "back")) == files_of(str(tmp_path / "hf"))
    assert "tokenizer.json" in os.listdir(tmp_path / "back")
    # and the store is a source like the HF checkpoint it holds
    target = split(dict(tp=4, ep=2))
    run_plan(plan_hf_to_mcore(str(tmp_path / "store"), str(tmp_path / "m-store"), *target), FAST)
    run_plan(plan_hf_to_mcore(str(tmp_path / "hf"), str(tmp_path / "m-hf"), *target), FAST)
    assert files_of(str(tmp_path / "m-store")) == files_of(str(tmp_path / "m-hf"))


def test_fp8_scales_from_a_store_equal_those_from_the_directory(hf_dirs, fp8_store, tmp_path):
    """mcore2hf --fp8-export --fp8-scales-from takes the release as a store too: the same exact round trip."""
    layout = dict(tp=2, ep=2, moe_grouped_gemm=True, mtp_num_layers=1)
    mcore = str(tmp_path / "mcore")
    run_plan(plan_hf_to_mcore(hf_dirs["fp8"], mcore, *split(layout)), FAST)
    for name, scales in (("from-dir", hf_dirs["fp8"]), ("from-store", fp8_store)):
        export = ExportOptions(fp8_export=True, fp8_scales_from=scales)
        run_plan(plan_mcore_to_hf(mcore, str(tmp_path / name), *split(layout), export), FAST)
    got = files_of(str(tmp_path / "from-store"))
    assert got == files_of(str(tmp_path / "from-dir"))


    def tensors(d):
        out = {}
        for f in sorted(os.listdir(d)):
            if f.endswith(".safetensors"):
                out.update({k: v.view(torch.uint8) for k, v in load_file(os.path.join(d, f)).items()})
        return out

    back, release = tensors(str(tmp_path / "from-store")), tensors(hf_dirs["fp8"])
    assert any(k.endswith("_scale_inv") for k in back) and set(back) <= set(release)
    assert all(torch.equal(t, release[k]) for k, t in back.items())   # exact: the release's bytes and scales


def test_hf_config_from_a_store_equals_from_the_directory(hf_dirs, fp8_store, tmp_path):
    """mcore2hf --hf-config takes a store: config.json and the tokenizer files come from its record, verbatim."""
    layout = dict(tp=2, ep=2, moe_grouped_gemm=True, mtp_num_layers=1)
    mcore = str(tmp_path / "mcore")
    run_plan(plan_hf_to_mcore(hf_dirs["fp8"], mcore, *split(layout)), FAST)
    os.remove(os.path.join(mcore, "streamconv_source.json"))   # as a checkpoint another tool wrote
    for name, cfg in (("from-dir", hf_dirs["fp8"]), ("from-store", fp8_store)):
        run_plan(plan_mcore_to_hf(mcore, str(tmp_path / name), *split(layout), hf_config_dir=cfg), FAST)
    got = files_of(str(tmp_path / "from-store"))
    assert got == files_of(str(tmp_path / "from-dir"))
    assert got["tokenizer.json"] == files_of(hf_dirs["fp8"])["tokenizer.json"]


def test_cli_rechunk_verify_and_refusals(hf_dirs, tmp_path, capsys):
    """The CLI spelling; a store re-written from a store (recompressed) still gives back the checkpoint;
    verify checks a store; bad input is one line before anything is written."""
    src = hf_dirs["fp8"]
    args = ["--no-progress"]
    assert main(["convert", "hf2zarr", "--load-dir", src, "--save-dir", str(tmp_path / "z1")] + args) == 0
    assert main(["convert", "hf2zarr", "--load-dir", str(tmp_path / "z1"), "--save-dir", str(tmp_path / "z2"),
                 "--compressor", "blosc", "--compression-level", "5", "--no-stack-experts"] + args) == 0
    one = "model.layers.1.mlp.experts.0.gate_proj.weight"     # z1 stacks the experts, z2 does not
    assert not (tmp_path / "z1" / one).exists() and (tmp_path / "z2" / one / "zarr.json").is_file()
    assert len(os.listdir(tmp_path / "z1")) < len(os.listdir(tmp_path / "z2"))
    # a stacked store re-written stacked (its elements are regions of stacks) gives the checkpoint back too
    assert main(["convert", "hf2zarr", "--load-dir", str(tmp_path / "z1"), "--save-dir", str(tmp_path / "z4"),
                 "--compressor", "zstd"] + args) == 0
    assert main(["convert", "zarr2hf", "--load-dir", str(tmp_path / "z4"), "--save-dir", str(tmp_path / "hf4")]
                + args) == 0
    assert files_of(str(tmp_path / "hf4")) == files_of(src)
    assert main(["convert", "zarr2hf", "--load-dir", str(tmp_path / "z2"), "--save-dir", str(tmp_path / "hf")]
                + args) == 0
    assert files_of(str(tmp_path / "hf")) == files_of(src)
    assert main(["verify", str(tmp_path / "z2")]) == 0
    assert main(["inspect", str(tmp_path / "z2")]) == 0
    shown = capsys.readouterr().out
    assert "zarr store" in shown and "model-00001-of-" in shown
    assert main(["convert", "zarr2hf", "--load-dir", src, "--save-dir", str(tmp_path / "no")] + args) == 2
    assert main(["convert", "hf2zarr", "--load-dir", src, "--save-dir", str(tmp_path / "z3"),
                 "--compression-level", "12"] + args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("streamconv: error:") for e in err)
    assert "compression level 12" in err[1]
    assert not (tmp_path / "no").exists() and not (tmp_path / "z3").exists()


def test_a_store_changed_under_its_plan_is_refused(hf_dirs, tmp_path):
    store = to_zarr(hf_dirs["bf16"], str(tmp_path / "store"))
    plan = plan_hf_to_mcore(store, str(tmp_path / "m"), *split(dict(tp=2)))
    shard = os.path.join(store, "model.embed_tokens.weight", "c", "0", "0")
    with open(shard, "ab") as f:
        f.write(b"\0")
    with pytest.raises(ValidationError, match="model.embed_tokens.weight/c/0/0: changed since the plan was made"):
        run_plan(plan, FAST)


def test_a_damaged_stack_record_or_a_newer_store_is_one_error(hf_dirs, tmp_path):
    store = to_zarr(hf_dirs["bf16"], str(tmp_path / "store"))
    hf_doc = os.path.join(store, "hf", "zarr.json")
    doc = json.load(open(hf_doc))
    array, names = doc["attributes"]["stacks"][0]
    doc["attributes"]["stacks"][0] = [array, names + ["model.layers.1.mlp.experts.99.up_proj.weight"]]
    doc["attributes"]["shards"][0]["tensors"].append("model.layers.1.mlp.experts.99.up_proj.weight")
    with open(hf_doc, "w") as f:
        json.dump(doc, f)
    with pytest.raises(ValidationError, match=r"cannot hold model\.layers\.1\.mlp\.experts\.99\.up_proj\.weight "
                                              r"as its element \d+\. The store is damaged"):
        plan_hf_to_mcore(store, str(tmp_path / "m"), *split(dict(tp=1)))
    doc["attributes"]["stacks"][0] = "model.layers.1.mlp.experts.0-3.up_proj.weight"
    with open(hf_doc, "w") as f:
        json.dump(doc, f)
    with pytest.raises(ValidationError, match="a 'stacks' entry is not"):
        plan_zarr_to_hf(store, str(tmp_path / "hf"))
    root_doc = os.path.join(store, "zarr.json")
    doc = json.load(open(root_doc))
    doc["attributes"]["streamconv"]["store_version"] = 3
    with open(root_doc, "w") as f:
        json.dump(doc, f)
    with pytest.raises(ValidationError, match="store version 3; this streamconv reads versions 1, 2"):
        plan_zarr_to_hf(store, str(tmp_path / "hf"))
    assert not (tmp_path / "m").exists() and not (tmp_path / "hf").exists()


def test_names_that_cannot_be_array_paths_are_refused(tmp_path):
    d = tmp_path / "hf"
    d.mkdir()
    cfg = synth.config_json(dataclasses.replace(synth.TINY, fp8=False))
    (d / "config.json").write_text(json.dumps(cfg))
    save_file({"hf": torch.zeros(2), "zarr.json": torch.zeros(2)}, str(d / "model.safetensors"))
    with pytest.raises(ValidationError) as info:
        plan_hf_to_zarr(str(d), str(tmp_path / "z"))
    assert len(info.value.problems) == 2 and "hf: cannot be a zarr array path" in info.value.problems[0]


# --- bytes read per rank ------------------------------------------------------------------------------------------

# Every dim a layout below splits is a multiple of 128 x TP (hidden 512, FFN widths 512 and 1024, 8 heads of
# 64+64), as in real models, so a rank's share of each array is a whole number of chunks; the 10 % allow for
# shard indexes and metadata, and for the two small arrays whose rows (kv_a: 192) are one chunk.
MID = dataclasses.replace(synth.TINY, fp8=False, hidden_size=512, q_lora_rank=256, kv_lora_rank=128,
                          qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=64, num_attention_heads=8,
                          intermediate_size=1024, moe_intermediate_size=512, vocab_size=1024, n_routed_experts=4,
                          num_hidden_layers=2, first_k_dense_replace=1, num_nextn_predict_layers=0)
READ_LAYOUTS = [dict(tp=2, ep=2, moe_grouped_gemm=True), dict(tp=4, pp=2), dict(pp=2, ep=4)]


def tagged_copy(src: str, dst: str) -> dict[int, tuple[str, int]]:
    """``src`` with every element replaced by its global index (int32), and index range -> (array, itemsize)."""
    os.makedirs(dst)
    ranges, start = {}, 0
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if not name.endswith(".safetensors"):
            with open(path, "rb") as f, open(os.path.join(dst, name), "wb") as g:
                g.write(f.read())
            continue
        tensors = load_file(path)
        out = {}
        for t_name, t in tensors.items():
            n = t.numel()
            out[t_name] = torch.arange(start, start + n, dtype=torch.int32).reshape(t.shape)
            ranges[start] = (t_name, t.element_size())
            start += n
        save_file(out, os.path.join(dst, name))
    return ranges


def share_of(obj: dict, ranges: dict[int, tuple[str, int]]) -> int:
    """Bytes of the distinct source elements held by a reference rank file (tensors of element indices)."""
    ids = torch.cat([t.reshape(-1) for group in obj.values() if isinstance(group, dict) for t in group.values()])
    ids = torch.unique(ids).numpy()
    starts = np.array(sorted(ranges))
    sizes = np.array([ranges[s][1] for s in starts])
    return int(sizes[np.searchsorted(starts, ids, side="right") - 1].sum())


def rchar() -> int:
    with open("/proc/self/io", "rb") as f:
        return int(f.read().split(b"rchar:")[1].split()[0])


@pytest.fixture(scope="module")
def mid(tmp_path_factory):
    """(store, tagged HF copy, index ranges) of the MID model."""
    root = tmp_path_factory.mktemp("mid")
    synth.synth_checkpoint(str(root / "hf"), dataclasses.replace(MID, max_shard_bytes=4 << 20))
    store = to_zarr(str(root / "hf"), str(root / "store"))
    return store, str(root / "tagged"), tagged_copy(str(root / "hf"), str(root / "tagged"))


@pytest.mark.parametrize("layout", READ_LAYOUTS, ids=["tp2-ep2-gemm", "tp4-pp2", "pp2-ep4"])
def test_each_rank_reads_its_share_of_the_store(mid, tmp_path, layout):
    store, tagged, ranges = mid
    expected = reference_hf_to_mcore(tagged, **layout)
    plan = plan_hf_to_mcore(store, str(tmp_path / "m"), *split(layout))
    reads = []
    for f in plan.files:
        if not f.tensors:
            continue
        zarr_store._load_meta.cache_clear()    # each rank starts cold, as a process of its own would
        zarr_store.shard_index.cache_clear()
        one = dataclasses.replace(plan, files=(f,), target_root=str(tmp_path / "ranks" / f.path.split("/")[1]))
        before = rchar()
        run_plan(one, RunOptions(max_memory=256 << 20, scheduler="sync"))
        read = rchar() - before
        share = share_of(expected[f.path], ranges)
        assert abs(read - share) <= 0.10 * share, (f.path, read, share)
        reads.append(read / share)
    print(f"bytes read / share per rank: {', '.join(f'{r:.3f}' for r in reads)}")


def test_open_rank_reads_a_store_as_it_reads_the_directory(hf_dirs, fp8_store):
    """The training-time loader takes a store wherever it takes an HF directory: every rank, same bytes."""
    import torch

    from streamconv.loader import open_rank

    kw = dict(target_tensor_parallel_size=2, target_expert_parallel_size=2, moe_grouped_gemm=True,
              mtp_num_layers=1)
    for tp, ep in ((0, 0), (1, 1)):
        want = open_rank(hf_dirs["fp8"], tp_rank=tp, pp_rank=0, ep_rank=ep, **kw).state_dict()
        got = open_rank(fp8_store, tp_rank=tp, pp_rank=0, ep_rank=ep, **kw).state_dict()
        assert list(got["model"]) == list(want["model"])
        for name, t in want["model"].items():
            u = got["model"][name]
            assert u.dtype == t.dtype and torch.equal(u.view(torch.uint8), t.view(torch.uint8)), name
