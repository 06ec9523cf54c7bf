"""Tests of the torch zip writer that the generic writer suite (tests/conformance) does not cover."""

from __future__ import annotations

import collections
import multiprocessing
import os
import pickletools
import struct
import zipfile
import zlib
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
import torch

from streamconv.errors import ExecutionError, ValidationError
from streamconv.storage import fileio, torchzip
from streamconv.storage.torchzip import PtEntry

ATTRS = {"checkpoint_version": 3.0, "iteration": 1}
ALLOWED_GLOBALS = {"collections OrderedDict", "torch._utils _rebuild_tensor_v2", "torch._utils _rebuild_tensor_v3",
                   "torch.storage UntypedStorage", "torch float8_e4m3fn", "torch float8_e5m2"} | {
    f"torch {s}" for s in ("BFloat16Storage", "HalfStorage", "FloatStorage", "DoubleStorage", "BoolStorage",
                           "ByteStorage", "CharStorage", "ShortStorage", "IntStorage", "LongStorage")}


def _state_dict() -> collections.OrderedDict:
    g = torch.Generator().manual_seed(0)
    return collections.OrderedDict([
        ("embedding.weight", torch.randn(7, 5, generator=g).to(torch.bfloat16)),
        ("layers.0.norm", torch.randn(5, generator=g)),
        ("layers.0.fp8", torch.randn(3, 4, generator=g).to(torch.float8_e4m3fn)),
        ("empty", torch.empty(0, 3, dtype=torch.float16)),
        ("scalar", torch.tensor(7, dtype=torch.int64)),
        ("mask", torch.tensor([True, False, True])),
    ])


def _entries(groups: dict) -> tuple[PtEntry, ...]:
    from streamconv import types
    return tuple(PtEntry(g, n, types.from_torch(t.dtype).name, tuple(t.shape))
                 for g, ts in groups.items() for n, t in ts.items())


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


@pytest.mark.parametrize("mmap", [False, True])
def test_top_level_dict_and_key_order(tmp_path, mmap):
    sd = _state_dict()
    path = str(tmp_path / "model_optim_rng.pt")
    torchzip.save_streaming(path, {"model": sd}, ATTRS)
    obj = torch.load(path, weights_only=True, mmap=mmap)
    assert type(obj) is dict
    assert list(obj) == ["model", "checkpoint_version", "iteration"]
    assert type(obj["model"]) is collections.OrderedDict and list(obj["model"]) == list(sd)
    assert type(obj["checkpoint_version"]) is float and obj["checkpoint_version"] == 3.0
    assert type(obj["iteration"]) is int and obj["iteration"] == 1
    for name, want in sd.items():
        got = obj["model"][name]
        assert (got.dtype, got.shape, _bytes(got)) == (want.dtype, want.shape, _bytes(want)), name


def test_pickle_is_byte_identical_to_torch_save(tmp_path):
    sd = _state_dict()
    ref = str(tmp_path / "ref.pt")
    torch.save({"model": sd, **ATTRS}, ref)
    layout = torchzip.compute_layout(_entries({"model": sd}), ATTRS)
    assert layout.data_pkl == zipfile.ZipFile(ref).read("ref/data.pkl")


def test_namespace_attr_pickles_as_torch_save_does(tmp_path):
    """MindSpeed's `args` (--save-args): an argparse.Namespace of scalars, byte-identical to torch.save's pickle
    and readable by our restricted reader; anything but scalars inside it is refused."""
    import argparse

    from streamconv.errors import ValidationError
    from streamconv.storage.torchzip_reader import read_pt

    sd = _state_dict()
    args = argparse.Namespace(tensor_model_parallel_size=2, num_layer_list="1,3", kv_channels=None, qk_layernorm=True,
                              norm_epsilon=1e-6)
    ref = str(tmp_path / "ref.pt")
    torch.save({"model": sd, **ATTRS, "args": args}, ref)
    layout = torchzip.compute_layout(_entries({"model": sd}), {**ATTRS, "args": args})
    assert layout.data_pkl == zipfile.ZipFile(ref).read("ref/data.pkl")
    assert dict(read_pt(ref).obj["args"]) == vars(args)
    with pytest.raises(ValidationError, match=r"namespace fields \['layers'\]"):
        torchzip.compute_layout(_entries({"model": sd}), {"args": argparse.Namespace(layers=[1, 2])})


def test_pickle_uses_only_allowed_globals():
    layout = torchzip.compute_layout(_entries({"model": _state_dict()}), ATTRS)
    found = {arg for op, arg, _ in pickletools.genops(layout.data_pkl) if op.name in ("GLOBAL", "STACK_GLOBAL")}
    protos = {arg for op, arg, _ in pickletools.genops(layout.data_pkl) if op.name == "PROTO"}
    assert protos == {2}
    assert "torch._utils _rebuild_tensor_v3" in found and found <= ALLOWED_GLOBALS


def test_groups_in_order_of_first_appearance(tmp_path):
    a, b, c = (torch.full((2,), float(i)) for i in range(3))
    entries = (PtEntry("model0", "x", "float32", (2,)), PtEntry("model1", "y", "float32", (2,)),
               PtEntry("model0", "z", "float32", (2,)))
    layout = torchzip.compute_layout(entries, ATTRS)
    path = str(tmp_path / "f.pt")
    torchzip.create(path, layout)
    pieces = [torchzip.write_piece(path, layout, i, t) for i, t in enumerate((a, b, c))]
    torchzip.finish(path, layout, pieces)
    obj = torch.load(path, weights_only=True)
    assert list(obj) == ["model0", "model1", "checkpoint_version", "iteration"]
    assert list(obj["model0"]) == ["x", "z"] and list(obj["model1"]) == ["y"]
    assert torch.equal(obj["model0"]["z"], c) and torch.equal(obj["model1"]["y"], b)


def test_zip_is_valid_and_aligned(tmp_path):
    sd = _state_dict()
    path = str(tmp_path / "f.pt")
    layout = torchzip.save_streaming(path, {"model": sd}, ATTRS)
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None
        names = [i.filename for i in z.infolist()]
    assert names == [f"archive/data/{i}" for i in range(len(sd))] + [
        "archive/data.pkl", "archive/byteorder", "archive/version", "archive/.data/serialization_id"]
    reader = torch._C.PyTorchFileReader(path)  # torch's own (miniz) reader
    for i, (start, end) in enumerate(layout.spans):
        assert start % 64 == 0
        assert reader.get_record_offset(f"data/{i}") == start
        assert reader.get_record_size(f"data/{i}") == end - start
    assert set(reader.get_all_records()) == {n.split("/", 1)[1] for n in names}  # no .format_version
    assert os.path.getsize(path) == layout.size


def _zip64_extras(extra: bytes) -> list[bytes]:
    found = []
    while extra:
        tag, n = struct.unpack("<HH", extra[:4])
        if tag == 1:
            found.append(extra[4:4 + n])
        extra = extra[4 + n:]
    return found


def test_zip64_fields_everywhere(tmp_path):
    # A few MB in several pieces: the zip64 code path is the only one, so this checks what > 4 GiB files use.
    tensors = {f"w{i}": torch.randn(256, 1024 + i).to(torch.bfloat16) for i in range(4)}
    path = str(tmp_path / "f.pt")
    layout = torchzip.compute_layout(_entries({"model": tensors}), ATTRS)
    torchzip.create(path, layout)
    pieces = []
    for i, t in enumerate(tensors.values()):
        raw = np.frombuffer(_bytes(t), dtype=np.uint8)
        for lo in range(0, len(raw), 100_000):
            pieces.append(torchzip.write_piece(path, layout, i, raw[lo:lo + 100_000], lo))
    torchzip.finish(path, layout, pieces)
    data = open(path, "rb").read()
    with zipfile.ZipFile(path) as z:
        infos = z.infolist()
        assert z.testzip() is None
        for info, t in zip(infos, tensors.values()):
            assert z.read(info) == _bytes(t)
    for info in infos:
        (central,) = _zip64_extras(info.extra)
        assert struct.unpack("<QQQ", central) == (info.file_size, info.compress_size, info.header_offset)
        local = data[info.header_offset:info.header_offset + 30]
        assert local[:4] == b"PK\x03\x04" and struct.unpack("<II", local[18:26]) == (0xFFFFFFFF, 0xFFFFFFFF)
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        extra = data[info.header_offset + 30 + name_len:info.header_offset + 30 + name_len + extra_len]
        (local64,) = _zip64_extras(extra)
        assert struct.unpack("<QQ", local64) == (info.file_size, info.file_size)
    eocd64 = data.rfind(b"PK\x06\x06")
    assert eocd64 == layout.cd_offset + layout.cd_size
    assert data[eocd64 + 56:eocd64 + 60] == b"PK\x06\x07" and data[-22:-18] == b"PK\x05\x06"


def _crc_of_zeros(n: int) -> int:
    """crc32 of n zero bytes without making them: combine the CRCs of 2**k zeros for the bits of n."""
    crc, power, crc_power = 0, 1, zlib.crc32(b"\0")
    while n:
        if n & 1:
            crc = fileio.crc32_combine(crc, crc_power, power)
        crc_power = fileio.crc32_combine(crc_power, crc_power, power)
        power, n = power * 2, n >> 1
    return crc


def test_file_over_4gib_sparse(tmp_path):
    """A 5 GiB file written sparsely: only a marker is real data, the rest are zeros the filesystem never stores."""
    big = 5 << 30
    entries = (PtEntry("model", "small", "float32", (4,)), PtEntry("model", "big", "uint8", (big,)),
               PtEntry("model", "after", "int64", (3,)))
    layout = torchzip.compute_layout(entries, ATTRS)
    path = str(tmp_path / "big.pt")
    torchzip.create(path, layout)
    if os.stat(fileio.temp_name(path)).st_blocks * 512 > 1 << 20:
        torchzip.abort(path)
        pytest.skip("filesystem has no sparse files")
    small, after, marker = torch.arange(4.0), torch.arange(3), np.arange(1, 17, dtype=np.uint8)
    pieces = [torchzip.write_piece(path, layout, 0, small), torchzip.write_piece(path, layout, 2, after),
              torchzip.write_piece(path, layout, 1, marker, big - 16),
              (1, 0, big - 16, _crc_of_zeros(big - 16))]  # those bytes are the zeros ftruncate left there
    torchzip.finish(path, layout, pieces)
    assert os.path.getsize(path) == layout.size > 1 << 32
    with zipfile.ZipFile(path) as z:
        infos = {i.filename: i for i in z.infolist()}
        assert infos["archive/data/1"].file_size == big
        assert infos["archive/data/2"].header_offset == layout.records[2].header > 1 << 32
        assert infos["archive/data/2"].CRC == zlib.crc32(_bytes(after))
        assert z.read("archive/data.pkl") == layout.data_pkl
    obj = torch.load(path, weights_only=True, mmap=True)
    assert obj["model"]["big"].shape == (big,)
    assert obj["model"]["big"][-16:].tolist() == marker.tolist() and obj["model"]["big"][:8].sum() == 0
    assert torch.equal(obj["model"]["after"], after) and torch.equal(obj["model"]["small"], small)


def test_finish_names_tensors_with_missing_or_overlapping_pieces(tmp_path):
    sd = collections.OrderedDict(a=torch.ones(8), b=torch.zeros(4, 4), c=torch.arange(6))
    layout = torchzip.compute_layout(_entries({"model": sd}), ATTRS)
    path = str(tmp_path / "f.pt")
    torchzip.create(path, layout)
    raw_b = np.frombuffer(_bytes(sd["b"]), dtype=np.uint8)
    pieces = [torchzip.write_piece(path, layout, 0, sd["a"]),
              torchzip.write_piece(path, layout, 1, raw_b[:16]),
              torchzip.write_piece(path, layout, 2, sd["c"]),
              torchzip.write_piece(path, layout, 2, np.zeros(8, dtype=np.uint8), 4)]
    with pytest.raises(ValidationError) as info:
        torchzip.finish(path, layout, pieces)
    problems = info.value.problems
    assert len(problems) == 2
    assert "model/b" in problems[0] and "[16, 64) were never written" in problems[0]
    assert "model/c" in problems[1] and "overlap" in problems[1]
    assert not os.path.exists(path) and os.path.exists(fileio.temp_name(path))
    # The temp file is still there: write what is missing, rewrite the damaged tensor, and finish.
    pieces = pieces[:2] + [torchzip.write_piece(path, layout, 1, raw_b[16:], 16),
                           torchzip.write_piece(path, layout, 2, sd["c"])] + pieces[:1]  # a duplicate is fine
    torchzip.finish(path, layout, pieces)
    obj = torch.load(path, weights_only=True)
    assert all(torch.equal(obj["model"][n], t) for n, t in sd.items())
    assert zipfile.ZipFile(path).testzip() is None


def test_write_piece_rejects_bad_pieces(tmp_path):
    layout = torchzip.compute_layout((PtEntry("model", "w", "bfloat16", (4, 4)),), ATTRS)
    path = str(tmp_path / "f.pt")
    with pytest.raises(ExecutionError, match="Call create"):
        torchzip.write_piece(path, layout, 0, torch.zeros(4, 4, dtype=torch.bfloat16))
    torchzip.create(path, layout)
    with pytest.raises(ExecutionError, match="outside"):
        torchzip.write_piece(path, layout, 0, np.zeros(8, dtype=np.uint8), 28)
    with pytest.raises(ExecutionError, match="outside"):
        torchzip.write_piece(path, layout, 0, b"xx", -2)
    with pytest.raises(ExecutionError, match="dtype"):
        torchzip.write_piece(path, layout, 0, torch.zeros(4, 4))
    with pytest.raises(ExecutionError, match="out of range"):
        torchzip.write_piece(path, layout, 1, b"")
    torchzip.abort(path)
    assert os.listdir(tmp_path) == []


def test_layout_validation_lists_every_problem():
    entries = (PtEntry("model", "a", "bfloat17", (2,)), PtEntry("model", "b", "float32", (2,)),
               PtEntry("model", "b", "float32", (2,)), PtEntry("model", "c", "float32", (-1,)))
    with pytest.raises(ValidationError) as info:
        torchzip.compute_layout(entries, {"model": 1, "args": [1, 2], "iteration": np.int64(3)})
    text = "\n".join(info.value.problems)
    assert len(info.value.problems) == 6
    for needle in ("model/a: unknown dtype 'bfloat17'", "model/b: listed twice", "model/c: shape (-1,)",
                   "attr 'model'", "attr 'args'", "attr 'iteration': value of type int64"):
        assert needle in text


def test_layout_is_cached_and_typed():
    entries = _entries({"model": _state_dict()})
    assert torchzip.compute_layout(entries, ATTRS) is torchzip.compute_layout(list(entries), ATTRS.items())
    # 3 == 3.0 == True in Python, but they pickle differently and must not share a cache slot.
    pkls = {torchzip.compute_layout(entries, {"v": v}).data_pkl for v in (3, 3.0, True, 1)}
    assert len(pkls) == 4


def test_same_content_same_bytes_anywhere(tmp_path):
    sd = _state_dict()
    (tmp_path / "x").mkdir()
    one, two = str(tmp_path / "a.pt"), str(tmp_path / "x" / "b.pt")
    torchzip.save_streaming(one, {"model": sd}, ATTRS)
    torchzip.save_streaming(two, {"model": sd}, ATTRS)
    assert open(one, "rb").read() == open(two, "rb").read()


def test_no_tensors(tmp_path):
    path = str(tmp_path / "f.pt")
    torchzip.save_streaming(path, {}, {"iteration": 5})
    assert torch.load(path, weights_only=True) == {"iteration": 5}
    with pytest.raises(ValidationError, match="no tensors"):
        torchzip.save_streaming(path, {"model": {}}, ATTRS)


def _write_in_child(args):
    path, layout, index, offset, data = args
    return torchzip.write_piece(path, layout, index, data, offset)


def test_pieces_from_other_processes(tmp_path):
    sd = collections.OrderedDict((f"w{i}", torch.randn(32, 48)) for i in range(4))
    layout = torchzip.compute_layout(_entries({"model": sd}), ATTRS)
    path, ref = str(tmp_path / "f.pt"), str(tmp_path / "ref.pt")
    torchzip.save_streaming(ref, {"model": sd}, ATTRS)
    torchzip.create(path, layout)
    jobs = []
    for i, t in enumerate(sd.values()):
        raw = np.frombuffer(_bytes(t), dtype=np.uint8)
        jobs += [(path, layout, i, lo, raw[lo:lo + 1000]) for lo in range(0, len(raw), 1000)]
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork")) as pool:
        pieces = list(pool.map(_write_in_child, jobs[::-1]))
    torchzip.finish(path, layout, pieces)
    assert open(path, "rb").read() == open(ref, "rb").read()
