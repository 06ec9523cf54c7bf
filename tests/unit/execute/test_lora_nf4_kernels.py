"""The LoRA merge and NF4 kernels against eager formulas written here from spec §5.2 / §6.1, a hand-computed
NF4 block in both nibble orders, and bitsandbytes itself where it installs."""

from __future__ import annotations

import json

import pytest
import torch

from streamconv.execute import lora, nf4

# --- merge_lora ------------------------------------------------------------------------------------------------------


def fma_product(b, a):
    """float32 B @ A as an in-order fused multiply-add chain over the rank (float64 holds each exact product;
    one rounding to float32 per step)."""
    acc = torch.zeros(b.shape[0], a.shape[1], dtype=torch.float32)
    for k in range(b.shape[1]):
        acc = (b[:, k:k + 1].double() * a[k:k + 1].double() + acc.double()).float()
    return acc


def eager_merge(w, b, a, alpha, r):
    """Spec §5.2 as MindSpeed writes it, base + (alpha / r) * matmul(B.float(), A.float()).to(base.dtype), with
    the product defined as the FMA chain (what torch's float32 matmul gives for matrices of some size)."""
    return w + (alpha / r) * fma_product(b.float(), a.float()).to(w.dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("alpha,r", [(16, 8), (32, 16), (3, 8), (0.5, 4)])
def test_merge_equals_the_reference_arithmetic(monkeypatch, dtype, alpha, r):
    """Random values, bands of 5 rows: every element is the reference's, whatever the band (a band of 5 rows
    through BLAS would round differently from the whole matrix)."""
    monkeypatch.setattr(lora, "_BAND_ELEMENTS", 64 * 5)
    g = torch.Generator().manual_seed(r)
    w = torch.randn(37, 64, generator=g).to(dtype)
    b = (torch.randn(37, r, generator=g) * 0.1).to(dtype)
    a = (torch.randn(r, 64, generator=g) * 0.1).to(dtype)
    got = lora.merge_lora(w, b, a, alpha=str(alpha), rank=r)
    assert got.dtype == dtype and torch.equal(got, eager_merge(w, b, a, alpha, r))


def test_product_is_torch_matmul_for_whole_matrices():
    g = torch.Generator().manual_seed(1)
    b, a = torch.randn(256, 16, generator=g), torch.randn(16, 700, generator=g)
    assert torch.equal(lora.product(b, a), torch.matmul(b, a))
    assert torch.equal(lora.product(b[:5], a), lora.product(b, a)[:5])


def test_merge_rounds_only_where_the_spec_says():
    """Exact products: the delta is rounded to bf16 once, scaled, and added in bf16 (not in float32)."""
    w = torch.tensor([[1.0, 256.0]], dtype=torch.bfloat16)
    b = torch.tensor([[1.0]], dtype=torch.bfloat16)
    a = torch.tensor([[1.0 + 2 ** -7, 1.0]], dtype=torch.bfloat16)   # delta 1 + 2**-7 is exact in bf16
    got = lora.merge_lora(w, b, a, alpha="1", rank=1)
    # 1 + (1 + 2**-7) = 2 + 2**-7 rounds to 2 in bf16; 256 + 1 rounds to 256 (ties to even)
    assert got.tolist() == [[2.0, 256.0]]
    assert lora.lora_scale("16", 8) == 2.0 and lora.lora_scale("0.5", 3) == 0.5 / 3


# --- NF4 ------------------------------------------------------------------------------------------------------------

NF4 = nf4.NF4_VALUES


def test_hand_computed_block_in_both_nibble_orders():
    """One block whose values sit exactly on NF4 codes times its absmax 2: codes are the table indices, packed
    high nibble first with the index (cuda) or low nibble first with index + 8 mod 16 (npu), by hand."""
    idx = [0, 15, 7, 8, 1, 14, 3, 12] * 8                      # 64 elements, absmax 2 (from the +-1 codes)
    x = torch.tensor([NF4[i] * 2.0 for i in idx], dtype=torch.float32).view(1, 64)
    amax = nf4.absmax(x, blocksize=64, origin=0)
    assert amax.tolist() == [2.0]
    cuda = nf4.quantize(x, amax, blocksize=64, origin=0, layout="cuda").view(-1).tolist()
    npu = nf4.quantize(x, amax, blocksize=64, origin=0, layout="npu").view(-1).tolist()
    assert cuda[:4] == [0x0F, 0x78, 0x1E, 0x3C]                 # (0,15) (7,8) (1,14) (3,12)
    assert npu[:4] == [0x78, 0x0F, 0x69, 0x4B]                  # (8 | 7<<4) (15 | 0<<4) (9 | 6<<4) (11 | 4<<4)
    assert len(cuda) == 32
    for layout, packed in (("cuda", cuda), ("npu", npu)):
        back = nf4.dequantize(torch.tensor(packed, dtype=torch.uint8).view(-1, 1), amax, nf4.NF4, blocksize=64,
                              origin=0, layout=layout, dtype=torch.float32, cols=64)
        assert torch.equal(back, x), layout


@pytest.mark.parametrize("shape", [(48, 64), (37, 48), (96, 200)])
def test_round_trip_error_within_nf4_bound(shape):
    """|x - dequant(quant(x))| <= half the widest NF4 gap times the block's absmax, plus the error of the
    double-quantized absmax times |code|, plus the bf16 rounding of the result."""
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    amax = nf4.absmax(x, blocksize=64, origin=0)
    packed = nf4.quantize(x, amax, blocksize=64, origin=0, layout="npu")
    codes, scales = nf4.nested(amax, "codes", blocksize=256), nf4.nested(amax, "scales", blocksize=256)
    state = nf4.state_json(amax, shape=shape, dtype="bfloat16", blocksize=64, nested_blocksize=256, width=256)
    amax_dq = nf4.scales(codes, scales, nf4.dynamic_map(), state, nested_blocksize=256)
    back = nf4.dequantize(packed, amax_dq, nf4.NF4, blocksize=64, origin=0, layout="npu", dtype=torch.float32,
                          cols=shape[1])
    half_gap = max(b - a for a, b in zip(NF4, NF4[1:])) / 2
    block = torch.arange(x.numel()) // 64
    bound = (half_gap * amax[block] + (amax_dq - amax).abs()[block]).view(shape) * (1 + 2 ** -7) + 1e-7
    assert ((back - x.float()).abs() <= bound).all()
    assert (amax_dq - amax).abs().max() <= scales.max() / 100   # the 8-bit dynamic map is finer than 1% here
    assert json.loads(bytes(state.numpy()).decode())["nested_offset"] == amax.mean().item()


def test_bands_with_an_origin_equal_the_whole():
    """A band of rows starting inside a block (origin) quantizes and dequantizes to the whole tensor's bytes."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 48, generator=g).to(torch.bfloat16)        # 48 columns: blocks straddle rows
    amax = nf4.absmax(x, blocksize=64, origin=0)
    whole = nf4.quantize(x, amax, blocksize=64, origin=0, layout="cuda")
    for r0, r1 in [(1, 5), (4, 40), (13, 14)]:
        first, origin = (r0 * 48) // 64, (r0 * 48) % 64
        part = nf4.quantize(x[r0:r1], amax[first:], blocksize=64, origin=origin, layout="cuda")
        assert torch.equal(part, whole[r0 * 24:r1 * 24])
        band_amax = nf4.absmax(x[r0:r1], blocksize=64, origin=origin)
        assert torch.equal(band_amax[1:-1], amax[first + 1:first + len(band_amax) - 1])


def _bnb():
    return pytest.importorskip("bitsandbytes.functional",
                               reason="bitsandbytes is not installed: its CPU quantizer is the oracle here")


@pytest.mark.parametrize("shape,dtype", [((64, 192), torch.bfloat16), ((300, 512), torch.bfloat16),
                                         ((96, 128), torch.float16), ((33, 64), torch.float32)])
def test_bytes_equal_bitsandbytes_cpu(shape, dtype):
    F = _bnb()
    g = torch.Generator().manual_seed(shape[0])
    x = (torch.randn(shape, generator=g) * 0.03).to(dtype)
    data, state = F.quantize_4bit(x, blocksize=64, compress_statistics=True, quant_type="nf4")
    want = state.as_dict(packed=True)
    amax = nf4.absmax(x, blocksize=64, origin=0)
    assert torch.equal(nf4.quantize(x, amax, blocksize=64, origin=0, layout="cuda"), data)
    assert torch.equal(nf4.nested(amax, "codes", blocksize=256), want["absmax"])
    assert torch.equal(nf4.nested(amax, "scales", blocksize=256), want["nested_absmax"])
    assert torch.equal(nf4.table("nf4"), want["quant_map"]) and torch.equal(nf4.table("dynamic"),
                                                                              want["nested_quant_map"])
    dtype_name = str(dtype).removeprefix("torch.")
    width = len(bytes(want["quant_state.bitsandbytes__nf4"].numpy())) + 30
    ours = nf4.state_json(amax, shape=shape, dtype=dtype_name, blocksize=64, nested_blocksize=256, width=width)
    assert bytes(ours.numpy()).rstrip(b" ") == bytes(want["quant_state.bitsandbytes__nf4"].numpy())
    scales = nf4.scales(want["absmax"], want["nested_absmax"], want["nested_quant_map"],
                        want["quant_state.bitsandbytes__nf4"], nested_blocksize=256)
    assert torch.equal(scales, F.dequantize_blockwise(state.absmax, state.state2) + state.offset)
    back = nf4.dequantize(data, scales, want["quant_map"], blocksize=64, origin=0, layout="cuda", dtype=dtype,
                          cols=shape[1])
    assert torch.equal(back, F.dequantize_4bit(data, state))


def test_fused_bf16_kernel_equals_the_torch_ops(monkeypatch):
    """The one-pass bf16 kernel (bits and rounding by hand) gives the torch ops' bytes, edge values included:
    infinities, overflow to inf, subnormals, signed zeros, ties; NaN stays NaN (torch itself writes 0x7FC0 or
    0xFFFF depending on whether its scalar or vector conversion handles the element)."""
    if not lora.have_numba():
        pytest.skip("numba is not installed: only the torch path exists")
    g = torch.Generator().manual_seed(5)
    w = torch.randn(200, 96, generator=g).to(torch.bfloat16)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 3e38, -3e38, 1e-40, -0.0, 0.0, 1.0, 2.0 ** -8])
    w[0, :10] = special.to(torch.bfloat16)
    b = torch.randn(200, 8, generator=g).to(torch.bfloat16)
    a = torch.randn(8, 96, generator=g).to(torch.bfloat16)
    a[0, :10] = special.to(torch.bfloat16)
    cols = w[:, 10:90]                                   # a column band: rows are strided
    for x in (w, cols):
        right = a[:, 10:90] if x is cols else a
        fused = lora.merge_lora(x, b, right, alpha="3", rank=8)
        monkeypatch.setattr(lora, "_merge_bf16", None)
        plain = lora.merge_lora(x, b, right, alpha="3", rank=8)
        monkeypatch.undo()
        nan = fused.isnan()
        assert torch.equal(nan, plain.isnan()) and (nan.any() or x is cols)
        assert torch.equal(fused.view(torch.uint16)[~nan], plain.view(torch.uint16)[~nan])
