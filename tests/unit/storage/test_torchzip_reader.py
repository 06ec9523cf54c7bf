"""The .pt reader: reads torch.save, MindSpeed-style and our own files; executes nothing; fuzzed."""

import argparse
import collections
import io
import os
import pickle
import zipfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamconv.errors import FormatError
from streamconv.storage import torchzip
from streamconv.storage.torchzip_reader import TensorRef, read_pt, read_tensor, tensors

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _same(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def _sample():
    base = torch.randn(6, 8).to(torch.bfloat16)
    return collections.OrderedDict([
        ("w", torch.randn(5, 7).to(torch.bfloat16)),
        ("bias", torch.randn(7, dtype=torch.float32)),
        ("view", base[2:, 1:5]),                    # storage offset and strides
        ("t", base.t()),
        ("fp8", torch.randn(4, 4).to(torch.float8_e4m3fn)),
        ("empty", torch.zeros(0, 3)),
        ("scalar", torch.tensor(3.5)),
    ])


def _check_roundtrip(path, expected: dict):
    pt = read_pt(path)
    found = tensors(pt.obj)
    for key, want in expected.items():
        ref = found[key]
        assert isinstance(ref, TensorRef)
        _same(read_tensor(path, ref), want)
    return pt


@pytest.mark.parametrize("protocol", [2, 4])
def test_torch_save_files_with_mindspeed_containers(tmp_path, protocol):
    """MindSpeed's converter writes protocol 4 with collections.defaultdict containers."""
    sd = _sample()
    model = collections.defaultdict(dict)
    model.update(sd)
    obj = {"model0": model, "model1": collections.OrderedDict(a=sd["w"]), "checkpoint_version": 3.0,
           "iteration": 1, "args": argparse.Namespace(tensor_model_parallel_size=2, name="x")}
    path = str(tmp_path / "m.pt")
    torch.save(obj, path, pickle_protocol=protocol)
    pt = _check_roundtrip(path, {("model0", k): v for k, v in sd.items()} | {("model1", "a"): sd["w"]})
    assert pt.obj["checkpoint_version"] == 3.0 and pt.obj["iteration"] == 1
    assert pt.obj["args"]["tensor_model_parallel_size"] == 2


@pytest.mark.parametrize("protocol", [2, 4])
def test_extra_state_entries_are_kept_as_data(tmp_path, protocol):
    """Megatron-Core with Transformer Engine saves ``*._extra_state`` as io.BytesIO (protocol 2 spells its bytes
    with _codecs.encode): read as inert data, the tensors next to them as usual."""
    w = torch.randn(3, 4).to(torch.bfloat16)
    obj = {"model": collections.OrderedDict([("layer.linear._extra_state", io.BytesIO(b"\x00te\xff")),
                                             ("layer.linear.weight", w), ("none._extra_state", None)])}
    path = str(tmp_path / "te.pt")
    torch.save(obj, path, pickle_protocol=protocol)
    pt = _check_roundtrip(path, {("model", "layer.linear.weight"): w})
    assert set(tensors(pt.obj)) == {("model", "layer.linear.weight")}


def test_training_checkpoint_extras_are_inert_data(tmp_path):
    """A checkpoint saved by training holds rng states (numpy arrays), args with enums, paths, partials and
    devices: all read as inert data without importing or calling anything of theirs."""
    import functools
    import pathlib
    import random

    import numpy as np

    w = torch.randn(4, 2).to(torch.bfloat16)
    np_state = np.random.get_state()
    obj = {"model": collections.OrderedDict(w=w), "iteration": 100, "checkpoint_version": 3.0,
           "rng_state": [{"random_rng_state": random.getstate(), "np_rng_state": np_state,
                          "torch_rng_state": torch.get_rng_state()}],
           "args": argparse.Namespace(save=pathlib.PosixPath("/ckpt"), params_dtype=torch.bfloat16,
                                      init=functools.partial(torch.nn.init.normal_, std=0.02),
                                      device=torch.device("cpu"), kinds={1, 2}),
           "opt_param_scheduler": {"num_steps": 100}}
    try:  # Megatron's args hold its enums (megatron-core is in the test extra)
        from megatron.core.transformer.enums import AttnMaskType
        obj["args"].attn_mask_type = AttnMaskType.causal
    except ImportError:
        pass
    for protocol in (2, 4):
        path = str(tmp_path / f"train{protocol}.pt")
        torch.save(obj, path, pickle_protocol=protocol)
        pt = _check_roundtrip(path, {("model", "w"): w})
        assert pt.obj["iteration"] == 100 and pt.obj["opt_param_scheduler"] == {"num_steps": 100}
        assert ("model", "w") in tensors(pt.obj)


def test_codecs_encode_only_spells_bytes(tmp_path):
    payload = b"\x80\x02}q\x00X\x01\x00\x00\x00xc_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00utf-7\x86R" \
              b"s."
    with pytest.raises(FormatError, match="not how a pickle spells bytes"):
        read_pt(_with_pickle(tmp_path, payload))


def test_our_streaming_files(tmp_path):
    sd = {k: v.contiguous() for k, v in _sample().items()}
    path = str(tmp_path / "ours.pt")
    torchzip.save_streaming(path, {"model": sd}, {"checkpoint_version": 3.0, "iteration": 1})
    pt = _check_roundtrip(path, {("model", k): v for k, v in sd.items()})
    assert list(pt.obj) == ["model", "checkpoint_version", "iteration"]


def _with_pickle(tmp_path, payload: bytes) -> str:
    """A valid torch.save file whose data.pkl is replaced by ``payload``."""
    src = str(tmp_path / "src.pt")
    torch.save({"model": {"w": torch.ones(2)}}, src)
    out = str(tmp_path / "evil.pt")
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = payload if info.filename.endswith("/data.pkl") else zin.read(info.filename)
            zout.writestr(info.filename, data)
    return out


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = _with_pickle(tmp_path, pickle.dumps({"model": Evil()}, protocol=2))
    with pytest.raises(FormatError, match=r"references (posix|os)\.system.*refusing to load"):
        read_pt(path)
    assert not marker.exists()
    # torch itself (weights_only) refuses it too, and the marker is still absent
    with pytest.raises(Exception):
        torch.load(path, weights_only=True)
    assert not marker.exists()


@pytest.mark.parametrize("payload,match", [
    (pickle.dumps({"x": eval}, protocol=2), "builtins.eval"),
    (pickle.dumps({"x": getattr}, protocol=4), "builtins.getattr"),
    (b"\x80\x02}q\x00.", None),                        # an empty dict: fine, no tensors
    (b"garbage", "not a valid checkpoint pickle"),
])
def test_other_pickles(tmp_path, payload, match):
    path = _with_pickle(tmp_path, payload)
    if match is None:
        assert read_pt(path).obj == {}
    else:
        with pytest.raises(FormatError, match=match):
            read_pt(path)


def _valid_bytes(tmp_path) -> bytes:
    path = str(tmp_path / "v.pt")
    torchzip.save_streaming(path, {"model": {"a": torch.ones(3, 2).to(torch.bfloat16), "b": torch.arange(4)}},
                            {"iteration": 1})
    with open(path, "rb") as f:
        return f.read()


def _read_only_errors(tmp_path, data: bytes):
    p = tmp_path / "f.pt"
    p.write_bytes(data)
    try:
        pt = read_pt(str(p))
        for ref in tensors(pt.obj).values():
            read_tensor(str(p), ref)
    except FormatError as exc:
        assert str(p) in str(exc)


@SETTINGS
@given(data=st.binary(max_size=600))
def test_fuzz_random_bytes(tmp_path, data):
    _read_only_errors(tmp_path, data)


@SETTINGS
@given(edits=st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), min_size=1, max_size=6),
       cut=st.integers(0, 5000))
def test_fuzz_mutated_valid_file(tmp_path, edits, cut):
    data = bytearray(_valid_bytes(tmp_path))
    for pos, value in edits:
        if pos < len(data):
            data[pos] = value
    _read_only_errors(tmp_path, bytes(data[:cut]) if cut < len(data) else bytes(data))
