"""streamconv.execute.device: device names, and the device FP8 decodes (uint8 bytes + 256-entry table gather;
native cast) bit-exact with the host kernel, on CPU tensors here and on a CUDA device when the test run has one."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

from streamconv import synth
from streamconv.execute import device as devices
from streamconv.execute.dequant import dequant_fp8_block
from streamconv.execute.device import DeviceDequant, DeviceError, decode_fp8_cast, decode_fp8_table, resolve_device
from streamconv.graph.node import DequantArg

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]
DECODERS = {"table": decode_fp8_table, "cast": decode_fp8_cast}
SCALES = [1.0, 0.5, 2.0 ** -20, 1.2345e-3, -0.7, 0.0, -0.0, 2.0 ** -120, 1e-38, 1e-45, 1.7e38, 3.0e38, 448.0,
          float("inf"), float("-inf"), float("nan")]
CPU = torch.device("cpu")
INT = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}

CUDA = pytest.mark.skipif(not torch.cuda.is_available(),
                          reason=f"no CUDA device in this test run (torch {torch.__version__}, "
                                 f"cuda available: {torch.cuda.is_available()})")


def bits(t):
    return t.contiguous().view(INT[t.dtype])


def all_codes(fp8, rows=16):
    """``rows`` x 256: every code in every column position class, different per row (rolled)."""
    base = torch.arange(256, dtype=torch.int32)
    return torch.stack([torch.roll(base, r * 37) for r in range(rows)]).to(torch.uint8).view(fp8)


def host(w, s, block, origin, dtype):
    return dequant_fp8_block(w, s, block=block, origin=origin, dtype=dtype)


def grid(rows, cols, block, origin):
    return ((rows - 1 + origin[0]) // block[0] + 1, (cols - 1 + origin[1]) // block[1] + 1)


@pytest.mark.parametrize("method", ["table", "cast"])
@pytest.mark.parametrize("fp8", FP8, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_every_code_under_every_kind_of_scale(method, fp8, dtype):
    """Each scale in its own 16 x 16 block over all 256 codes: NaN codes and payloads, infinities, subnormal
    results, overflow, signed zeros: every bit as the host kernel gives it."""
    w = all_codes(fp8, rows=16)                       # [16, 256]: 16 column blocks of 16
    scales = torch.tensor(SCALES, dtype=torch.float32).reshape(1, 16)
    want = host(w, scales, (16, 16), (0, 0), dtype)
    got = DECODERS[method](w, scales, block=(16, 16), origin=(0, 0), dtype=dtype, device=CPU)
    assert torch.equal(bits(got), bits(want))


def test_independent_formula_on_finite_values():
    """Where no NaN is involved, the table decode equals the plain formula (w.float() * s).to(bf16)."""
    w = all_codes(torch.float8_e4m3fn, rows=8)
    s = torch.tensor([[0.37, 2.0 ** -9, 1e-40, 5.5] * 4], dtype=torch.float32)
    got = decode_fp8_table(w, s, block=(8, 16), origin=(0, 0), dtype=torch.bfloat16, device=CPU)
    ref = (w.to(torch.float32) * s.repeat_interleave(16, 1)).to(torch.bfloat16)
    finite = ~torch.isnan(ref)
    assert torch.equal(bits(got)[finite], bits(ref)[finite])


@pytest.mark.parametrize("method", ["table", "cast"])
@pytest.mark.parametrize("shape,block,origin", [
    ((300, 200), (128, 128), (0, 0)),      # edge blocks on both dims
    ((257, 131), (128, 128), (5, 100)),    # a TP slice cutting through blocks: origin inside the first block
    ((17, 33), (4, 8), (3, 7)),
    ((1, 1), (128, 128), (127, 127)),
    ((0, 5), (4, 4), (0, 0)),              # empty
])
def test_random_codes_any_geometry(method, shape, block, origin):
    g = torch.Generator().manual_seed(sum(shape) + sum(origin))
    for fp8 in FP8:
        w = torch.randint(0, 256, shape, generator=g, dtype=torch.int32).to(torch.uint8).view(fp8)
        s = torch.rand(grid(*shape, block, origin), generator=g) * 4 - 1 if shape[0] else torch.ones(1, 2)
        got = DECODERS[method](w, s, block=block, origin=origin, dtype=torch.bfloat16, device=CPU)
        assert torch.equal(bits(got), bits(host(w, s, block, origin, torch.bfloat16)))


def test_table_decode_chunks_rows(monkeypatch):
    """Large weights are decoded in row chunks (bounded device buffers); the chunk edge must not matter."""
    monkeypatch.setattr(devices, "_CHUNK_ELEMENTS", 1000)
    g = torch.Generator().manual_seed(3)
    w = torch.randint(0, 256, (97, 130), generator=g, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)
    s = torch.rand(grid(97, 130, (16, 32), (9, 1)), generator=g)
    for method in ("table", "cast"):
        got = DECODERS[method](w, s, block=(16, 32), origin=(9, 1), dtype=torch.bfloat16, device=CPU)
        assert torch.equal(bits(got), bits(host(w, s, (16, 32), (9, 1), torch.bfloat16)))


@pytest.fixture(scope="module")
def real_fp8(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("fp8"))
    synth.synth_checkpoint(d, dataclasses.replace(synth.TINY, fp8=True))
    tensors = {}
    for name in sorted(os.listdir(d)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(d, name)))
    return tensors


@pytest.mark.parametrize("method", ["table", "cast"])
def test_real_blocks_whole_and_sliced(real_fp8, method):
    """Every FP8 weight of a generated release-format checkpoint, whole and as a column slice starting inside
    a block (what a TP rank reads), decoded on the device equals the host kernel."""
    weights = [n for n, t in real_fp8.items() if t.dtype == torch.float8_e4m3fn]
    assert len(weights) > 10
    for name in weights:
        w, s = real_fp8[name], real_fp8[name + "_scale_inv"]
        got = DECODERS[method](w, s, block=(128, 128), origin=(0, 0), dtype=torch.bfloat16, device=CPU)
        assert torch.equal(bits(got), bits(host(w, s, (128, 128), (0, 0), torch.bfloat16))), name
        c0 = min(37, w.shape[1] - 1)
        part = w[:, c0:]
        got = DECODERS[method](part, s, block=(128, 128), origin=(0, c0), dtype=torch.bfloat16, device=CPU)
        assert torch.equal(bits(got), bits(host(part, s, (128, 128), (0, c0), torch.bfloat16))), name


def test_self_check_passes_for_both_methods_on_the_host(real_fp8):
    w = real_fp8["model.layers.1.mlp.experts.0.up_proj.weight"]
    s = real_fp8["model.layers.1.mlp.experts.0.up_proj.weight_scale_inv"]
    sample = [(DequantArg((128, 128), (0, 0), "bfloat16"), w, s)]
    for method in ("table", "cast"):
        assert DeviceDequant(CPU, method).self_check(sample) is None


def test_self_check_names_the_first_differing_code():
    """A decode that gets one code wrong (here: a table whose code 0x38 entry is off by one bit) is caught,
    and the message names the code and both bit patterns."""
    class OffByOne(DeviceDequant):
        def __call__(self, arg, w, s):
            out = super().__call__(arg, w, s)
            bad = w.contiguous().view(torch.uint8) == 0x38
            iv = out.view(INT[out.dtype])
            iv[bad] ^= 1
            return out

    msg = OffByOne(CPU, "table").self_check()
    assert msg is not None and "code 56" in msg and "host" in msg


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(DeviceError, match="not a device torch knows"):
        resolve_device("gpu0")
    with pytest.raises(DeviceError, match="meta device holds no data"):
        resolve_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no cuda device is available"):
            resolve_device("cuda:0")


@pytest.mark.skipif(importlib.util.find_spec("torch_npu") is not None, reason="torch_npu is installed here")
def test_npu_without_torch_npu_is_one_clear_error():
    with pytest.raises(DeviceError, match="torch_npu is not importable"):
        resolve_device("npu:0")


def test_torch_npu_is_never_imported_by_the_loader():
    import streamconv.loader  # noqa: F401
    import streamconv.loader.hook  # noqa: F401
    assert "torch_npu" not in sys.modules


@CUDA
@pytest.mark.parametrize("method", ["table", "cast"])
def test_cuda_decode_bit_exact(method, real_fp8):
    dev = resolve_device("cuda")
    for fp8 in FP8:
        w = all_codes(fp8, rows=16)
        s = torch.tensor(SCALES, dtype=torch.float32).reshape(1, 16)
        got = DECODERS[method](w, s, block=(16, 16), origin=(0, 0), dtype=torch.bfloat16, device=dev)
        assert got.device.type == "cuda"
        assert torch.equal(bits(got.cpu()), bits(host(w, s, (16, 16), (0, 0), torch.bfloat16)))
    for name, w in real_fp8.items():
        if w.dtype == torch.float8_e4m3fn:
            s = real_fp8[name + "_scale_inv"]
            got = DECODERS[method](w, s, block=(128, 128), origin=(0, 0), dtype=torch.bfloat16, device=dev)
            assert torch.equal(bits(got.cpu()), bits(host(w, s, (128, 128), (0, 0), torch.bfloat16))), name
    assert DeviceDequant(dev, method).self_check() is None
