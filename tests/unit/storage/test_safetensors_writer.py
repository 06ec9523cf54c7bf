"""The safetensors write protocol beyond the shared conformance suite: exact header bytes, interoperability
with the official library, layout validation, the SafetensorsWriter wrapper and the executor's layout hook."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch

from streamconv import types
from streamconv.errors import ExecutionError, ValidationError
from streamconv.execute.formats import layout_of
from streamconv.graph.node import read
from streamconv.plan.plan import OutputFile, OutputTensor
from streamconv.storage import safetensors as st
from streamconv.storage.registry import get_format


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(7, 5, generator=g).to(torch.bfloat16),
        "model.layers.0.mlp.down_proj.weight": (torch.randn(4, 6, generator=g) * 50).to(torch.float8_e4m3fn),
        "model.layers.0.mlp.down_proj.weight_scale_inv": torch.rand(1, 1, generator=g),
        "model.norm.weight": torch.randn(5, generator=g),  # 1-D
        "empty": torch.empty(0, 3, dtype=torch.bfloat16),  # 0 elements
        "model.layers.0.e_score_correction_bias": torch.randn(3, generator=g),
    }


def _entries(tensors):
    return [(n, types.from_torch(t.dtype).name, tuple(t.shape)) for n, t in tensors.items()]


def _save(path, tensors, metadata=None, order=None) -> list[int]:
    layout = st.compute_layout(_entries(tensors), metadata)
    st.create(path, layout)
    names = list(tensors)
    pieces = [st.write_piece(path, layout, i, tensors[names[i]]) for i in (order or range(len(names)))]
    return st.finish(path, layout, pieces)


def _raw(t: torch.Tensor) -> bytes:
    return st.tensor_bytes(t).tobytes()


def test_header_bytes_exactly():
    layout = st.compute_layout([("b", "float32", (2,)), ("a", "bfloat16", (3, 1))], {"format": "pt"})
    (n,) = struct.unpack("<Q", layout.header[:8])
    text = layout.header[8:].decode()
    assert n == len(text) and len(layout.header) % 8 == 0  # the data buffer starts 8-byte aligned
    assert text.rstrip(" ") == ('{"__metadata__":{"format":"pt"},'
                                '"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
                                '"a":{"dtype":"BF16","shape":[3,1],"data_offsets":[8,14]}}')
    assert len(text) - len(text.rstrip(" ")) < 8
    base = len(layout.header)
    assert layout.spans == ((base, base + 8), (base + 8, base + 14)) and layout.size == base + 14
    assert st.compute_layout([("b", "float32", (2,))]).header[8:].startswith(b'{"b":')  # no metadata, no key


def test_readable_by_the_official_library_and_ours(tmp_path):
    tensors = _tensors()
    path = str(tmp_path / "model-00001-of-00001.safetensors")
    crcs = _save(path, tensors, {"format": "pt"}, order=[3, 0, 5, 1, 4, 2])
    assert crcs == [zlib.crc32(_raw(t)) for t in tensors.values()]
    loaded = safetensors.torch.load_file(path)
    with safetensors.safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert sorted(f.keys()) == sorted(tensors)
        sliced = f.get_slice("model.embed_tokens.weight")[2:4]
    header = st.read_header(path)
    assert list(header.tensors) == list(tensors) and header.metadata == {"format": "pt"}
    for name, want in tensors.items():
        for got in (loaded[name], st.read_tensor(path, header.tensors[name])):
            assert got.dtype == want.dtype and got.shape == want.shape and _raw(got) == _raw(want), name
    assert torch.equal(sliced, tensors["model.embed_tokens.weight"][2:4])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
def test_byte_identical_to_the_official_serializer(tmp_path, dtype):
    # safetensors.torch.save orders tensors by dtype, then name; given that order, every byte agrees.
    g = torch.Generator().manual_seed(1)
    tensors = {"a.weight": torch.randn(3, 4, generator=g).to(dtype), "b.bias": torch.randn(5, generator=g).to(dtype),
               "c.empty": torch.empty(0, 2, dtype=dtype)}
    path = str(tmp_path / "f.safetensors")
    _save(path, tensors, {"format": "pt"})
    assert open(path, "rb").read() == safetensors.torch.save(tensors, metadata={"format": "pt"})


def test_validation_lists_every_problem():
    entries = [("a", "bfloat17", (2,)), ("b", "float32", (2,)), ("b", "float32", (2,)), ("c", "float32", (-1,)),
               ("__metadata__", "float32", (1,)), ("", "float32", (1,)), ("d", "float32", (2.0,))]
    with pytest.raises(ValidationError) as info:
        st.compute_layout(entries)
    text = "\n".join(info.value.problems)
    assert len(info.value.problems) == 6, text
    for needle in ("a: unknown dtype 'bfloat17'", "b: listed twice", "c: shape (-1,)", "'__metadata__'",
                   "'': tensor name must be", "d: shape (2.0,)"):
        assert needle in text
    with pytest.raises(ValidationError) as info:
        st.compute_layout([("a", "float32", (1,))], {"format": "pt", "iteration": 3, "tags": ["x"]})
    assert len(info.value.problems) == 2 and "metadata 'iteration': str -> int" in info.value.problems[0]


def test_layout_is_cached_and_accepts_numpy_sizes():
    entries = _entries(_tensors())
    layout = st.compute_layout(entries, {"format": "pt"})
    assert st.compute_layout(tuple(entries), [("format", "pt")]) is layout
    numpy_shapes = [(n, d, tuple(np.int64(s) for s in shape)) for n, d, shape in entries]
    assert st.compute_layout(numpy_shapes, {"format": "pt"}) is layout
    assert st.compute_layout(entries) is not layout  # metadata is part of the key
    head, spans = st.layout(entries, {"format": "pt"})
    assert head == layout.header and list(spans.values()) == list(layout.spans) and list(spans) == list(_tensors())


def test_writer_wrapper_matches_the_protocol_and_keeps_headers_only(tmp_path):
    tensors = _tensors()
    ref, path, sparse = str(tmp_path / "ref"), str(tmp_path / "obj"), str(tmp_path / "headers_only")
    _save(ref, tensors, {"format": "pt"})
    with st.SafetensorsWriter(path, _entries(tensors), {"format": "pt"}) as w:
        for name, t in reversed(tensors.items()):
            w.write(name, t)
        with pytest.raises(ExecutionError, match="nope: not a tensor of this file"):
            w.write("nope", torch.zeros(1))
    assert open(path, "rb").read() == open(ref, "rb").read()
    # Closing without writing (synth --headers-only): a valid file whose tensors read as zeros.
    w = st.SafetensorsWriter(sparse, _entries(tensors), {"format": "pt"})
    w.close()
    loaded = safetensors.torch.load_file(sparse)
    assert all(not _raw(loaded[n]).strip(b"\0") for n in tensors)
    assert open(sparse, "rb").read()[: len(w.header)] == w.header


def _file(tensors, attrs=(("format", "pt"),), group="") -> OutputFile:
    out = []
    pos = 0
    for seq, (name, t) in enumerate(tensors.items()):
        dtype = types.from_torch(t.dtype).name
        out.append(OutputTensor(group, name, read("src.safetensors", name, dtype, tuple(t.shape), offset=pos), seq))
        pos += t.numel() * t.element_size()
    return OutputFile("model-00001-of-00002.safetensors", "safetensors", tuple(out), tuple(attrs))


def test_executor_layout_hook():
    tensors = _tensors()
    layout = layout_of(_file(tensors))
    assert layout is st.compute_layout(_entries(tensors), {"format": "pt"})
    assert json.loads(layout.header[8:])["__metadata__"] == {"format": "pt"}
    assert layout_of(_file(tensors, attrs=())).header[8:].startswith(b'{"model.embed')
    assert get_format("safetensors") is st.SAFETENSORS
    with pytest.raises(ValidationError, match=r"model-00001-of-00002.safetensors: model.norm.weight: group 'model'"):
        layout_of(_file(tensors, group="model"))
    with pytest.raises(ValidationError, match=r"model-00001-of-00002.safetensors: metadata 'iteration'"):
        layout_of(_file(tensors, attrs=(("format", "pt"), ("iteration", 1))))
