"""The zarr format (shard files, storage/zarr_shard.py) and band reads of zarr arrays (storage/zarr_store.py).

Oracles: zarr-python itself (it opens what we write, and writes arrays we read), numpy slicing, and the bytes a
band read costs, counted by the kernel (/proc/self/io ``rchar``).
"""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch
import zarr

from streamconv.errors import FormatError, ValidationError
from streamconv.storage import fileio
from streamconv.storage.registry import format_of_file
from streamconv.storage.zarr_shard import ZARR, packed_name
from streamconv.storage.zarr_store import Codec, array_json, read_region
from tests.zarr_arrays import as_stored, raw, tensor, write_array

CODECS = ["none", "zstd", "blosc"]


@pytest.mark.parametrize("codec", CODECS)
def test_zarr_python_reads_what_we_write(tmp_path, codec):
    t = tensor((512, 384))
    path = write_array(str(tmp_path), "w", t, chunk=(128, 128), shard=(256, 384), codec=codec, order="random",
                       pieces=3)
    arr = zarr.open_array(path, mode="r")
    assert arr.attrs["dtype"] == "bfloat16" and arr.dtype == np.uint16
    assert np.array_equal(arr[:], as_stored(t))
    fp8 = tensor((256, 256), torch.float8_e4m3fn, seed=1)
    path = write_array(str(tmp_path), "q", fp8, chunk=(128, 128), shard=(256, 256), codec=codec)
    arr = zarr.open_array(path, mode="r")
    assert arr.attrs["dtype"] == "float8_e4m3fn" and np.array_equal(arr[:], as_stored(fp8))


@pytest.mark.parametrize("codec", CODECS)
def test_band_reads_equal_numpy_slices(tmp_path, codec):
    t = tensor((384, 640), seed=2)
    path = write_array(str(tmp_path), "w", t, chunk=(128, 128), shard=(128, 640), codec=codec)
    rng = random.Random(0)
    for _ in range(20):
        r0, c0 = rng.randrange(384), rng.randrange(640)
        r1, c1 = rng.randrange(r0, 385), rng.randrange(c0, 641)
        got = read_region(path, "bfloat16", (384, 640), (r0, c0), (r1 - r0, c1 - c0))
        assert got.dtype == torch.bfloat16 and torch.equal(got.view(torch.int16), t[r0:r1, c0:c1].view(torch.int16))


def test_the_shard_file_is_byte_identical_whatever_the_piece_order(tmp_path):
    t = tensor((256, 256), seed=4)
    for codec in CODECS:
        a = write_array(str(tmp_path / f"a-{codec}"), "w", t, (128, 128), (256, 256), codec)
        b = write_array(str(tmp_path / f"b-{codec}"), "w", t, (128, 128), (256, 256), codec, order="random", pieces=5)
        assert open(f"{a}/c/0/0", "rb").read() == open(f"{b}/c/0/0", "rb").read()
    assert os.path.getsize(tmp_path / "a-zstd/w/c/0/0") < os.path.getsize(tmp_path / "a-none/w/c/0/0")


def rchar() -> int:
    """Bytes this process has read so far, by the kernel's count (reading /proc/self/io counts too)."""
    with open("/proc/self/io", "rb") as f:
        return int(f.read().split(b"rchar:")[1].split()[0])


def bytes_read(fn) -> int:
    """What ``fn()`` reads, counted by the kernel, less the cost of one look at /proc/self/io."""
    a = rchar()
    probe = rchar() - a
    before = rchar()
    fn()
    return rchar() - before - probe


def test_a_band_reads_only_the_chunks_it_overlaps(tmp_path):
    """Counted by the kernel: after one read has cached the metadata and index, a band costs exactly the inner
    chunks it overlaps (128x128 bf16 = 32 KiB each)."""
    t = tensor((1024, 1024), seed=5)
    path = write_array(str(tmp_path), "w", t, chunk=(128, 128), shard=(1024, 1024))
    read_region(path, "bfloat16", (1024, 1024), (0, 0), (1, 1))
    for (r0, c0), (rows, cols) in [((0, 0), (128, 128)), ((100, 300), (200, 300)), ((512, 0), (512, 1024)),
                                   ((130, 256), (1, 1))]:
        chunks = (-(-(r0 + rows) // 128) - r0 // 128) * (-(-(c0 + cols) // 128) - c0 // 128)
        got = []
        n = bytes_read(lambda: got.append(read_region(path, "bfloat16", (1024, 1024), (r0, c0), (rows, cols))))
        assert n == chunks * 128 * 128 * 2
        got = got[0]
        assert torch.equal(got.view(torch.int16), t[r0:r0 + rows, c0:c0 + cols].view(torch.int16))


@pytest.mark.parametrize("kind", ["sharded", "plain", "gzip", "big-endian"])
def test_reads_arrays_zarr_python_wrote(tmp_path, kind):
    """Other writers' stores: chunks in zarr-python's own order, chunks never written (fill value), unsharded."""
    x = np.random.default_rng(1).standard_normal((300, 200)).astype(np.float32)
    x[:100] = 0  # zarr-python skips chunks equal to the fill value
    kwargs = {"sharded": dict(chunks=(50, 40), shards=(100, 200)), "plain": dict(chunks=(64, 64)),
              "gzip": dict(chunks=(64, 64), compressors=[zarr.codecs.GzipCodec(level=5)]),
              "big-endian": dict(chunks=(64, 64), serializer=zarr.codecs.BytesCodec(endian="big"))}[kind]
    arr = zarr.create_array(str(tmp_path / "a"), shape=x.shape, dtype="float32", fill_value=0, **kwargs)
    arr[:] = x
    for offsets, lengths in [((0, 0), (300, 200)), ((37, 11), (150, 170)), ((99, 0), (2, 200))]:
        got = read_region(str(tmp_path / "a"), "float32", (300, 200), offsets, lengths)
        (r0, c0), (n, m) = offsets, lengths
        assert np.array_equal(got.numpy(), x[r0:r0 + n, c0:c0 + m])


def test_a_changed_or_damaged_array_is_one_line_error(tmp_path):
    t = tensor((256, 256), seed=6)
    path = write_array(str(tmp_path), "w", t, (128, 128), (256, 256))
    with pytest.raises(FormatError, match=r"bfloat16\[256, 256\] in the store \(the plan expects bfloat16\[256, 512\]"):
        read_region(path, "bfloat16", (256, 512), (0, 0), (1, 1))
    shard = os.path.join(path, "c", "0", "0")
    with open(shard, "r+b") as f:
        f.seek(-2, os.SEEK_END)
        f.write(b"\xff\xff")
    with pytest.raises(FormatError, match="checksum mismatch") as info:
        read_region(path, "bfloat16", (256, 256), (0, 0), (1, 1))
    assert shard in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(FormatError, match="not a zarr array"):
        read_region(str(tmp_path / "nothing"), "bfloat16", (1,), (0,), (1,))


@pytest.mark.parametrize("codec", ["zstd", "blosc"])
def test_compressed_shard_protocol(tmp_path, codec):
    """Compressed: raw pieces in the temporary file, encoded at finish; a bad tiling leaves it for a retry;
    check_file and the index decode; a flipped byte is named; abort removes both temporary files."""
    entries = [("", "a", "bfloat16", (4, 16, 32)), ("", "b", "float32", (2, 16, 32))]
    layout = ZARR.compute_layout(entries, (("codec", codec), ("level", 5), ("stacked", True)))
    assert len(layout.chunks) == 6
    data = [tensor((4, 16, 32), seed=1), torch.zeros(2, 16, 32)]
    path = str(tmp_path / "s")
    ZARR.create(path, layout)
    pieces = [ZARR.write_piece(path, layout, 0, data[0]), ZARR.write_piece(path, layout, 1, raw(data[1])[:100])]
    with pytest.raises(ValidationError, match="b: bytes"):
        ZARR.finish(path, layout, pieces)
    pieces.append(ZARR.write_piece(path, layout, 1, raw(data[1])[100:], 100))
    crcs = ZARR.finish(path, layout, pieces)
    assert sorted(os.listdir(tmp_path)) == ["s"]
    assert crcs == [fileio.crc32(raw(d)) for d in data]
    assert os.path.getsize(path) < layout.size  # the zeros compress
    assert format_of_file(path) is ZARR
    index = ZARR.index(path)
    assert [e.name for e in index.tensors] == ["a", "b"] and not index.tensors[0].row_major
    record = {"size": os.path.getsize(path), "crc32": crcs}
    assert ZARR.check_file(path, record, layout).problems == []
    start = index.tensors[1].start
    with open(path, "r+b") as f:
        f.seek(start + 2)
        byte = f.read(1)
        f.seek(start + 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    problems = ZARR.check_file(path, record).problems
    assert len(problems) == 1 and ": b:" in problems[0]
    other = str(tmp_path / "t")
    ZARR.create(other, layout)
    with open(packed_name(other), "wb") as f:
        f.write(b"left over")
    ZARR.abort(other)
    assert sorted(os.listdir(tmp_path)) == ["s"]


def test_layout_refuses_bad_attrs():
    with pytest.raises(ValidationError) as info:
        ZARR.compute_layout([("", "a", "bfloat16", (2, 2))], (("codec", "lz4"), ("level", "9"), ("stacked", 1)))
    text = str(info.value)
    assert "level" in text and "stacked" in text
    with pytest.raises(ValidationError, match="compressor 'lz4'"):
        ZARR.compute_layout([("", "a", "bfloat16", (2, 2))], (("codec", "lz4"),))


def test_array_json_is_what_zarr_python_writes():
    doc = json.loads(array_json((1024, 256), "float8_e4m3fn", (512, 256), (128, 128), Codec("zstd", 3)))
    shard = doc["codecs"][0]
    assert doc["data_type"] == "uint8" and doc["attributes"] == {"dtype": "float8_e4m3fn"}
    assert doc["chunk_grid"]["configuration"]["chunk_shape"] == [512, 256]
    assert shard["name"] == "sharding_indexed" and shard["configuration"]["chunk_shape"] == [128, 128]
    assert [c["name"] for c in shard["configuration"]["index_codecs"]] == ["bytes", "crc32c"]
    assert shard["configuration"]["codecs"][1] == {"name": "zstd", "configuration": {"level": 3, "checksum": False}}
