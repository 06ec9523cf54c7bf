"""streamconv.execute.dequant: the lookup-table FP8 block dequant must be bit-exact with the plain formula
``(w.float() * s_expanded).to(bfloat16)`` for every code, scale, block edge and origin."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from streamconv.errors import GraphError
from streamconv.execute import dequant
from streamconv.execute.dequant import dequant_fp8_block, dequant_reference

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]
INT = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}

# one scale per kind of trouble: identity, exact powers of two, rounding, negative, zero, results that are
# bf16 subnormals or underflow to zero, overflow to inf, and non-finite scales
SCALES = [1.0, 0.5, 2.0 ** -20, 1.2345e-3, 3.0517578125e-05, -0.7, 0.0, -0.0, 2.0 ** -120, 1e-38, 1e-45,
          1.7e38, 3.0e38, 448.0, 7.0, float("inf"), float("-inf"), float("nan")]


HAS_NUMBA = importlib.util.find_spec("numba") is not None


@pytest.fixture(scope="module", autouse=True, params=["numba", "numpy"])
def path(request):
    """Run every test of this module through both gathers (the public function picks by ``HAVE_NUMBA``).
    Module-scoped and restored by hand, not with monkeypatch: hypothesis refuses function-scoped fixtures."""
    if request.param == "numba" and not dequant.have_numba():
        pytest.skip("numba is not installed")
    saved = dequant.have_numba()
    dequant.HAVE_NUMBA = request.param == "numba"
    yield request.param
    dequant.HAVE_NUMBA = saved


def plain(w: torch.Tensor, s: torch.Tensor, block=(128, 128), origin=(0, 0), dtype=torch.bfloat16):
    """The formula written out: expand every scale over its block, shift by origin, multiply, round once."""
    br, bc = block
    r0, c0 = origin
    rows, cols = w.shape
    full = s.repeat_interleave(br, 0).repeat_interleave(bc, 1)
    return (w.float() * full[r0:r0 + rows, c0:c0 + cols]).to(dtype)


def assert_bits(got: torch.Tensor, want: torch.Tensor):
    assert got.dtype == want.dtype and tuple(got.shape) == tuple(want.shape)
    assert torch.equal(got.view(INT[got.dtype]), want.view(INT[want.dtype]))


def codes(fp8, rows, cols, gen=None):
    return torch.randint(0, 256, (rows, cols), generator=gen, dtype=torch.uint8).view(fp8)


def scales_for(rows, cols, block=(128, 128), origin=(0, 0), gen=None):
    n = (-(-(origin[0] + rows) // block[0]), -(-(origin[1] + cols) // block[1]))
    return torch.rand(n, generator=gen) * 3 + 1e-3


@pytest.mark.parametrize("fp8", FP8, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16], ids=str)
def test_every_code_every_scale(fp8, dtype):
    # row i holds all 256 codes and its own scale (block = one row)
    w = torch.arange(256, dtype=torch.int32).to(torch.uint8).repeat(len(SCALES), 1).view(fp8)
    s = torch.tensor(SCALES, dtype=torch.float32)[:, None]
    got = dequant_fp8_block(w, s, block=(1, 256), dtype=dtype)
    assert_bits(got, plain(w, s, block=(1, 256), dtype=dtype))


@pytest.mark.parametrize("fp8", FP8, ids=str)
def test_every_code_in_every_128_block(fp8):
    # each 128x128 block holds every code 64 times, with a different scale per block
    w = (torch.arange(256 * 256, dtype=torch.int32) % 256).to(torch.uint8).reshape(256, 256).view(fp8)
    s = torch.tensor([[2.0 ** -120, -0.7], [3.0e38, 1.2345e-3]])
    got = dequant_fp8_block(w, s, block=(128, 128))
    assert_bits(got, plain(w, s))
    assert_bits(got, dequant_reference(w, s, block=(128, 128)))
    assert got.view(torch.int16).unique().numel() > 400  # not a constant or a copy of one block


def test_nan_codes_match_the_formula_bits():
    w = torch.tensor([[0x7F, 0xFF]], dtype=torch.uint8).view(torch.float8_e4m3fn)  # both NaN codes
    s = torch.tensor([[1.0]])
    got = dequant_fp8_block(w, s, block=(128, 128))
    assert torch.isnan(got.float()).all()
    assert_bits(got, plain(w, s))


@pytest.mark.parametrize("shape", [(1, 1), (127, 129), (300, 200), (128, 128), (129, 257), (256, 1), (1, 385)],
                         ids=str)
@pytest.mark.parametrize("fp8", FP8, ids=str)
def test_edge_blocks(shape, fp8):
    g = torch.Generator().manual_seed(math.prod(shape))
    w = codes(fp8, *shape, gen=g)
    s = scales_for(*shape, gen=g)
    got = dequant_fp8_block(w, s, block=(128, 128))
    assert_bits(got, plain(w, s))
    assert_bits(got, dequant_reference(w, s, block=(128, 128)))


@pytest.mark.parametrize("shape", [(0, 0), (0, 200), (300, 0)], ids=str)
def test_empty(shape):
    w = torch.empty(shape, dtype=torch.float8_e4m3fn)
    s = scales_for(max(shape[0], 1), max(shape[1], 1))
    got = dequant_fp8_block(w, s, block=(128, 128))
    assert got.shape == shape and got.dtype == torch.bfloat16


@pytest.mark.parametrize("block", [(64, 32), (1, 1), (3, 5), (200, 7)], ids=str)
def test_other_block_sizes(block):
    g = torch.Generator().manual_seed(1)
    w = codes(torch.float8_e4m3fn, 130, 70, gen=g)
    s = scales_for(130, 70, block, gen=g)
    assert_bits(dequant_fp8_block(w, s, block=block), plain(w, s, block))


def test_non_contiguous_input():
    g = torch.Generator().manual_seed(2)
    base = codes(torch.float8_e4m3fn, 200, 300, gen=g)
    w = base.t()                                   # [300, 200], strided
    s = scales_for(300, 200, gen=g)
    assert not w.is_contiguous()
    assert_bits(dequant_fp8_block(w, s, block=(128, 128)), plain(w.contiguous(), s))


@pytest.fixture(scope="module")
def big():
    g = torch.Generator().manual_seed(3)
    w = codes(torch.float8_e4m3fn, 300, 390, gen=g)
    s = scales_for(300, 390, gen=g)
    return w, s, plain(w, s)


def _piece(w, s, r0, r1, c0, c1, block=(128, 128)):
    """w[r0:r1, c0:c1], the scale blocks that cover it, and the origin inside the first block."""
    br, bc = block
    sb = s[r0 // br: -(-r1 // br), c0 // bc: -(-c1 // bc)]
    return w[r0:r1, c0:c1], sb, (r0 % br, c0 % bc)


@pytest.mark.parametrize("r0, c0", [(0, 0), (1, 1), (127, 127), (128, 0), (0, 128), (129, 131), (200, 250),
                                    (255, 389), (299, 0)])
def test_origin_tail(big, r0, c0):
    w, s, full = big
    part, sb, origin = _piece(w, s, r0, w.shape[0], c0, w.shape[1])
    assert_bits(dequant_fp8_block(part, sb, origin=origin, block=(128, 128)), full[r0:, c0:])


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_origin_random_window(big, data):
    w, s, full = big
    r0 = data.draw(st.integers(0, w.shape[0]))
    r1 = data.draw(st.integers(r0, w.shape[0]))
    c0 = data.draw(st.integers(0, w.shape[1]))
    c1 = data.draw(st.integers(c0, w.shape[1]))
    part, sb, origin = _piece(w, s, r0, r1, c0, c1)
    if sb.numel() == 0:  # an empty window still needs a (never used) scale block to be well formed
        sb = s[:1, :1]
    assert_bits(dequant_fp8_block(part, sb, origin=origin, block=(128, 128)), full[r0:r1, c0:c1])


def test_origin_matters(big):
    """Guard against an implementation that ignores origin: the same data with the wrong origin differs."""
    w, s, full = big
    part, sb, origin = _piece(w, s, 100, 300, 100, 390)
    wrong = dequant_fp8_block(part, sb, origin=(0, 0), block=(128, 128))
    assert not torch.equal(wrong.view(torch.int16), full[100:, 100:].view(torch.int16))


def test_e5m2_big(big):
    w8, s, _ = big
    w = w8.view(torch.uint8).view(torch.float8_e5m2)
    part, sb, origin = _piece(w, s, 50, 299, 3, 388)
    assert_bits(dequant_fp8_block(part, sb, origin=origin, block=(128, 128)), plain(w, s)[50:299, 3:388])


def test_scale_grid_too_small_raises():
    w = codes(torch.float8_e4m3fn, 130, 70)
    with pytest.raises(GraphError, match=r"expected at least 2x1, got \(1, 1\)"):
        dequant_fp8_block(w, torch.ones(1, 1), block=(128, 128))
    with pytest.raises(GraphError, match="expected at least 2x2"):
        dequant_fp8_block(w, torch.ones(2, 1), origin=(0, 100), block=(128, 128))
    with pytest.raises(GraphError, match="origin >= 0"):
        dequant_fp8_block(w, torch.ones(2, 1), origin=(-1, 0), block=(128, 128))

