"""Spec section 2: the written files (directory layout, top-level objects, per-rank storage), and the tools that
read a written checkpoint back and compare it (load_mcore_dir, assert_same_checkpoint)."""

import math
import os
from collections import OrderedDict

import pytest
import torch

from tests.reference import assert_same_checkpoint, load_mcore_dir, reference_hf_to_mcore
from tests.reference_suite.helpers import ITER, rank_path


# --------------------------------------------------------------------------------------------------
# files and top-level objects (spec 2.1, 2.2)


@pytest.mark.parametrize(
    "tp,pp,ep,dirs",
    [
        (1, 1, 1, ["mp_rank_00"]),
        (2, 1, 1, ["mp_rank_00", "mp_rank_01"]),
        (1, 2, 1, ["mp_rank_00_000", "mp_rank_00_001"]),
        (1, 1, 2, ["mp_rank_00_000", "mp_rank_00_001"]),
        (2, 2, 2, [f"mp_rank_{t:02d}_{p:03d}_{e:03d}" for t in range(2) for p in range(2) for e in range(2)]),
    ],
)
def test_file_set_and_top_level(bf16_dir, tp, pp, ep, dirs):
    out = reference_hf_to_mcore(bf16_dir, tp=tp, pp=pp, ep=ep)
    assert set(out) == {"latest_checkpointed_iteration.txt"} | {rank_path(d) for d in dirs}
    assert out["latest_checkpointed_iteration.txt"] == b"1"
    for d in dirs:
        obj = out[rank_path(d)]
        assert set(obj) == {"model", "checkpoint_version", "iteration"}
        assert type(obj["checkpoint_version"]) is float and obj["checkpoint_version"] == 3.0
        assert type(obj["iteration"]) is int and obj["iteration"] == 1
        assert isinstance(obj["model"], OrderedDict)


def test_tensors_own_their_storage(bf16_dir):
    out = reference_hf_to_mcore(bf16_dir, tp=2, ep=2, moe_grouped_gemm=True, mtp_num_layers=1)
    pointers = set()
    for path, obj in out.items():
        if path.endswith(".txt"):
            continue
        for key, tensor in obj["model"].items():
            storage = tensor.untyped_storage()
            assert storage.nbytes() == tensor.numel() * tensor.element_size(), key
            assert storage.data_ptr() not in pointers, key
            pointers.add(storage.data_ptr())


# --------------------------------------------------------------------------------------------------
# load_mcore_dir and assert_same_checkpoint


def _write(out, save_dir):
    for path, obj in out.items():
        full = os.path.join(save_dir, path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        if isinstance(obj, bytes):
            with open(full, "wb") as f:
                f.write(obj)
        else:
            torch.save(obj, full)


def _copy(out):
    return {
        p: v if isinstance(v, bytes) else {**v, "model": OrderedDict((k, t.clone()) for k, t in v["model"].items())}
        for p, v in out.items()
    }


@pytest.fixture(scope="module")
def written(special_dir, tmp_path_factory):
    out = reference_hf_to_mcore(special_dir, tp=2, ep=2, moe_grouped_gemm=True, mtp_num_layers=1)
    save_dir = tmp_path_factory.mktemp("mcore")
    _write(out, str(save_dir))
    return out, str(save_dir)


def test_written_checkpoint_loads_back_identical(written):
    out, save_dir = written
    loaded = load_mcore_dir(save_dir)
    assert loaded["latest_checkpointed_iteration.txt"] == b"1"
    assert_same_checkpoint(loaded, out)
    assert_same_checkpoint(loaded, out, check_order=True)
    emb = loaded[rank_path("mp_rank_00_000")]["model"]["embedding.word_embeddings.weight"]
    assert torch.isnan(emb.view(-1)[2]) and math.copysign(1.0, emb.view(-1)[1].item()) == -1.0


def test_stray_file_is_reported(written, tmp_path):
    out, _ = written
    _write(out, str(tmp_path))
    (tmp_path / ITER / "mp_rank_00_000" / "model_optim_rng.pt.tmp").write_bytes(b"")
    with pytest.raises(AssertionError, match=r"unexpected \['iter_0000001/mp_rank_00_000/model_optim_rng.pt.tmp'\]"):
        assert_same_checkpoint(load_mcore_dir(str(tmp_path)), out)


EMB = "embedding.word_embeddings.weight"


PT = rank_path("mp_rank_01_001")


def _mutate_zero_sign(a):
    a[PT]["model"][EMB].view(-1)[1] = 0.0


def _mutate_nan_payload(a):
    a[PT]["model"][EMB].view(-1)[2:3].view(torch.int16)[0] = 0x7FC1


def _mutate_dtype(a):
    a[PT]["model"][EMB] = a[PT]["model"][EMB].to(torch.float16)


def _mutate_shape(a):
    a[PT]["model"][EMB] = a[PT]["model"][EMB][:-1].clone()


def _mutate_missing_key(a):
    del a[PT]["model"]["output_layer.weight"]


def _mutate_version_type(a):
    a[PT]["checkpoint_version"] = 3


def _mutate_tracker(a):
    a["latest_checkpointed_iteration.txt"] = b"1\n"


def _mutate_missing_file(a):
    del a[PT]


def _mutate_last_element(a):
    t = a[PT]["model"]["output_layer.weight"]
    t[-1, -1] = t[-1, -1] + 1


@pytest.mark.parametrize(
    "mutate,message",
    [
        (_mutate_zero_sign, f"{PT}['model']['{EMB}']: first differing element at index (0, 1) (flat 1)"),
        (_mutate_nan_payload, f"{PT}['model']['{EMB}']: first differing element at index (0, 2)"),
        (_mutate_dtype, f"{PT}['model']['{EMB}']: dtype torch.float16 != expected torch.bfloat16"),
        (_mutate_shape, f"{PT}['model']['{EMB}']: shape (127, 64) != expected (128, 64)"),
        (_mutate_missing_key, f"{PT}['model']: keys differ; missing ['output_layer.weight']"),
        (_mutate_version_type, f"{PT}['checkpoint_version']: value 3 (int) != expected 3.0 (float)"),
        (_mutate_tracker, "latest_checkpointed_iteration.txt: content"),
        (_mutate_missing_file, f"missing ['{PT}']"),
        (_mutate_last_element, f"{PT}['model']['output_layer.weight']: first differing element at index (127, 63)"),
    ],
)
def test_assert_same_checkpoint_names_file_key_and_index(written, mutate, message):
    out, _ = written
    actual = _copy(out)
    assert_same_checkpoint(actual, out)
    mutate(actual)
    with pytest.raises(AssertionError) as info:
        assert_same_checkpoint(actual, out)
    assert message in str(info.value)


def test_key_order_checked_only_on_request(written):
    out, _ = written
    actual = _copy(out)
    sd = actual[PT]["model"]
    actual[PT]["model"] = OrderedDict(reversed(list(sd.items())))
    assert_same_checkpoint(actual, out)
    with pytest.raises(AssertionError, match="key order differs at position 0"):
        assert_same_checkpoint(actual, out, check_order=True)
