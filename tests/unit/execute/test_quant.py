"""streamconv.execute.quant and the fp8_block_scale / quant_fp8_block ops.

The property that matters: quantizing a dequantized FP8 weight with the scales it was dequantized with gives
back its bytes, so FP8 -> bf16 mcore -> FP8 is exact.  Also: the kernels equal the plain formulas bit for bit
(specials, edge blocks, origins, banding), the pinned torch cast semantics, and the graph side (narrowing on
and off block boundaries, JSON round trip, rule errors).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamconv import graph
from streamconv.errors import GraphError
from streamconv.execute import quant
from streamconv.execute.dequant import dequant_fp8_block
from streamconv.execute.kernels import materialize
from streamconv.execute.quant import fp8_block_scale, quant_fp8_block, quant_reference
from streamconv.graph.codec import graph_from_json, graph_to_json
from streamconv.graph.node import Op, QuantArg, make, read, toposort
from streamconv.graph.rewrite import narrow
from tests.st_file import write_with_reads

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
CODES = torch.arange(256, dtype=torch.int32).to(torch.uint8)
NAN_CODES = {E4M3: {0x7F, 0xFF}, E5M2: {0x7D, 0x7E, 0x7F, 0xFD, 0xFE, 0xFF}}
# Scales for which every product of a non-zero code and the scale is a normal bf16 number, where the round
# trip is exact (see test_round_trip_domain_is_tight for what happens outside).
DOMAIN = {E4M3: (2.0 ** -117, 2.0 ** 119), E5M2: (2.0 ** -110, 2.0 ** 112)}
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module", autouse=True, params=["default-bands", "tiny-bands"])
def bands(request):
    """Run every test through the default band size and through bands of a row or two, so the loop that
    splits one block row into several torch calls is exercised (restored by hand: hypothesis refuses
    function-scoped fixtures)."""
    saved = quant._BAND_ELEMENTS
    if request.param == "tiny-bands":
        quant._BAND_ELEMENTS = 7
    yield request.param
    quant._BAND_ELEMENTS = saved


def u8(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def assert_bits(got: torch.Tensor, want: torch.Tensor):
    assert got.dtype == want.dtype and tuple(got.shape) == tuple(want.shape)
    assert torch.equal(got.contiguous().reshape(-1).view(torch.uint8), want.contiguous().reshape(-1).view(torch.uint8))


def grid(rows, cols, block, origin=(0, 0)):
    return -(-(origin[0] + rows) // block[0]), -(-(origin[1] + cols) // block[1])


# --- the round trip: quant(dequant(W, S), S) == W ------------------------------------------------------------

def _awkward_scales(fp8) -> list[float]:
    lo, hi = DOMAIN[fp8]
    return [lo, hi, lo * 1.75, hi / 1.9, 1e-4, 1.2345e-3, 3.0517578125e-05, 1e-2, 7.3e-3, 1 / 3, 0.7, 1.0, 448.0,
            57344.0, 2.0 ** -64 * 1.1, 2.0 ** 64 * 0.9, float(np.float32(np.pi) * 1e-30), 6.02e23]


@pytest.mark.parametrize("out", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("fp8", [E4M3, E5M2], ids=str)
def test_round_trip_every_code_every_scale(fp8, out):
    # row i holds all 256 codes (so -0 too) under scale i
    scales = torch.tensor(_awkward_scales(fp8), dtype=torch.float32)
    assert bool(((scales >= DOMAIN[fp8][0]) & (scales <= DOMAIN[fp8][1])).all())
    w = CODES.repeat(len(scales), 1).view(fp8)
    s = scales[:, None]
    back = quant_fp8_block(dequant_fp8_block(w, s, block=(1, 256), dtype=out), s, block=(1, 256), dtype=fp8)
    nan = torch.tensor([c in NAN_CODES[fp8] for c in range(256)]).repeat(len(scales), 1)
    assert torch.equal(u8(back)[~nan], u8(w)[~nan])
    # NaN codes come back as NaN codes; torch's float32 -> bf16 cast does not keep a NaN's sign, so the bytes
    # may differ (DeepSeek's weights hold no NaN)
    assert torch.isnan(back.float()[nan]).all()


@SETTINGS
@given(data=st.data())
def test_round_trip_random_weights(data):
    fp8 = data.draw(st.sampled_from([E4M3, E5M2]), label="fp8")
    rows = data.draw(st.integers(1, 300), label="rows")
    cols = data.draw(st.integers(1, 300), label="cols")
    block = data.draw(st.sampled_from([(128, 128), (64, 32), (3, 5), (1, 1), (300, 7)]), label="block")
    lo, hi = DOMAIN[fp8]
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 32 - 1), label="seed"))
    codes = torch.randint(0, 256, (rows, cols), generator=gen, dtype=torch.uint8)
    for c in NAN_CODES[fp8]:
        codes[codes == c] = 0x80  # -0: the code a sign-dropping path would get wrong
    w = codes.view(fp8)
    n = grid(rows, cols, block)
    scale_value = st.one_of(st.floats(lo, hi, width=32, allow_subnormal=False),
                            st.floats(float(np.float32(1e-4)), float(np.float32(1e-2)), width=32),
                            st.sampled_from(_awkward_scales(fp8)))
    values = data.draw(st.lists(scale_value, min_size=min(n[0] * n[1], 8), max_size=8), label="scales")
    s = torch.tensor(values, dtype=torch.float32)[torch.randint(0, len(values), n, generator=gen)]
    deq = dequant_fp8_block(w, s, block=block)
    assert_bits(quant_fp8_block(deq, s, block=block, dtype=fp8), w)


@pytest.mark.parametrize("s", [2.0 ** -130, 1.5 * 2.0 ** 119], ids=["tiny", "huge"])
def test_round_trip_domain_is_tight(s):
    """Outside the documented domain the bf16 product underflows into subnormals or overflows, and codes are
    lost: the domain statement in the docs is not vacuous."""
    w = CODES.view(E4M3)[None, :]
    scale = torch.tensor([[s]])
    back = quant_fp8_block(dequant_fp8_block(w, scale, block=(1, 256)), scale, block=(1, 256))
    keep = torch.tensor([c not in NAN_CODES[E4M3] for c in range(256)])
    assert not torch.equal(u8(back)[0][keep], CODES[keep])


# --- the kernels against the formulas -------------------------------------------------------------------------

def test_cast_semantics_pinned():
    """The cast torch 2.13 performs, which the docs promise: RNE; e4m3fn saturates (inf too); e5m2 overflows
    to inf; NaN keeps its sign; -0 stays -0.  A torch upgrade that changes any of this fails here."""
    nan, inf = float("nan"), float("inf")
    x = torch.tensor([[448.0, 463.9, 464.0, 480.0, 1e30, inf, -inf, -500.0, nan, -nan, -0.0, 0.0,
                       2.0 ** -10, 3 * 2.0 ** -11, 57344.0, 61439.0, 61440.0]])
    s = torch.ones(1, 1)
    got = u8(quant_fp8_block(x, s, block=(1, 32)))[0].tolist()
    assert got == [0x7E, 0x7E, 0x7E, 0x7E, 0x7E, 0x7E, 0xFE, 0xFE, 0x7F, 0xFF, 0x80, 0x00, 0x00, 0x01, 0x7E, 0x7E,
                   0x7E]
    got = u8(quant_fp8_block(x, s, block=(1, 32), dtype=E5M2))[0].tolist()
    assert got == [0x5F, 0x5F, 0x5F, 0x60, 0x7C, 0x7C, 0xFC, 0xE0, 0x7F, 0xFF, 0x80, 0x00, 0x14, 0x16, 0x7B, 0x7B,
                   0x7C]


def _specials(dtype: torch.dtype, rows: int, cols: int, gen) -> torch.Tensor:
    """Random values of every magnitude plus NaN, +-inf, +-0 and subnormals, in ``dtype``."""
    x = torch.randn(rows, cols, generator=gen) * torch.exp2(torch.randint(-30, 30, (rows, cols), generator=gen))
    pick = torch.randint(0, 12, (rows, cols), generator=gen)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-40, -3e-39, 3e38])
    x = torch.where(pick < len(special), special[pick.clamp(max=len(special) - 1)], x)
    return x.to(dtype)


def _scales_with_specials(n, gen) -> torch.Tensor:
    s = torch.rand(n, generator=gen) * 1e-2 + 1e-5
    pick = torch.randint(0, 16, n, generator=gen)
    special = torch.tensor([0.0, -0.0, -1e-3, float("inf"), float("nan"), 1e-45, 2.0 ** -130, 3e38])
    return torch.where(pick < len(special), special[pick.clamp(max=len(special) - 1)], s)


@pytest.mark.parametrize("fp8", [E4M3, E5M2], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape, block, origin", [((300, 200), (128, 128), (0, 0)), ((129, 257), (128, 128), (5, 100)),
                                                  ((40, 33), (3, 5), (2, 4)), ((1, 385), (128, 128), (127, 0))],
                         ids=str)
def test_quant_equals_reference(fp8, dtype, shape, block, origin):
    gen = torch.Generator().manual_seed(sum(shape) + block[0])
    x = _specials(dtype, *shape, gen)
    s = _scales_with_specials(grid(*shape, block, origin), gen)
    got = quant_fp8_block(x, s, block=block, origin=origin, dtype=fp8)
    want = quant_reference(x, s, block, origin, fp8)
    assert_bits(got, want)
    # the reference is literally (x.float() / s_expanded).to(fp8) away from zero scales
    full = s.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    s_exp = full[origin[0]:origin[0] + shape[0], origin[1]:origin[1] + shape[1]]
    plain = (x.float() / s_exp).to(fp8)
    nonzero = s_exp != 0
    assert torch.equal(u8(got)[nonzero], u8(plain)[nonzero])
    assert bool((u8(got)[~nonzero] == 0).all())


def test_float32_bit_patterns_sample():
    """Every exponent, both signs, mantissas at and around the fp8 rounding points, and random patterns: with
    scale 1 the kernel is torch's cast of the pattern itself."""
    exps = torch.arange(256, dtype=torch.int64) << 23
    mants = torch.tensor([0, 1, 0x7FFFF, 0x80000, 0x80001, 0xFFFFF, 0x100000, 0x17FFFF, 0x180000, 0x180001, 0x3FFFFF,
                          0x400000, 0x7FFFFF], dtype=torch.int64)
    bits = (exps[:, None] | mants[None, :]).reshape(-1)
    rand = torch.randint(0, 2 ** 32, (200_000,), generator=torch.Generator().manual_seed(5))
    bits = torch.cat([bits, bits | (1 << 31), rand])
    x = bits.to(torch.int32).view(torch.float32).reshape(-1, 16)
    ones = torch.ones(1, 1)
    for fp8 in (E4M3, E5M2):
        assert_bits(quant_fp8_block(x, ones, block=(x.shape[0], 16), dtype=fp8), x.to(fp8))


def test_zero_scale_gives_positive_zero_whatever_the_data():
    x = torch.tensor([[1.0, -2.0, float("nan"), -float("inf"), -0.0, 5.0]])
    s = torch.tensor([[0.0, -0.0, 1.0]])
    got = u8(quant_fp8_block(x, s, block=(1, 2)))[0].tolist()
    assert got == [0x00, 0x00, 0x00, 0x00, 0x80, 0x4A]


def test_non_contiguous_input():
    gen = torch.Generator().manual_seed(2)
    x = (torch.randn(200, 300, generator=gen) * 0.03).to(torch.bfloat16).t()
    s = fp8_block_scale(x, block=(128, 128))
    assert not x.is_contiguous()
    assert_bits(quant_fp8_block(x, s, block=(128, 128)), quant_reference(x.contiguous(), s, block=(128, 128)))


@pytest.mark.parametrize("shape", [(0, 0), (0, 200), (300, 0)], ids=str)
def test_empty(shape):
    x = torch.empty(shape, dtype=torch.bfloat16)
    s = fp8_block_scale(x, block=(128, 128))
    assert tuple(s.shape) == grid(*shape, (128, 128)) and s.dtype == torch.float32
    q = quant_fp8_block(x, torch.ones(3, 2), block=(128, 128))
    assert tuple(q.shape) == shape and q.dtype == E4M3


def test_kernel_geometry_errors():
    x = torch.ones(130, 70)
    with pytest.raises(GraphError, match=r"expected at least 2x1, got \(1, 1\)"):
        quant_fp8_block(x, torch.ones(1, 1), block=(128, 128))
    with pytest.raises(GraphError, match="origin >= 0"):
        quant_fp8_block(x, torch.ones(2, 1), origin=(-1, 0), block=(128, 128))
    with pytest.raises(GraphError, match="block >= 1"):
        fp8_block_scale(x, block=(0, 128))
    with pytest.raises(GraphError, match="unsupported dtype"):
        quant_fp8_block(x, torch.ones(2, 1), dtype=torch.bfloat16, block=(128, 128))


# --- scales ---------------------------------------------------------------------------------------------------

def scale_eager(x: torch.Tensor, block, fp8_max: float) -> np.ndarray:
    """Block by block in numpy: max of |float32(x)| over what exists of the block, IEEE float32 division."""
    a = x.float().numpy()
    br, bc = block
    out = np.zeros(grid(*a.shape, block), dtype=np.float32)
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            blk = np.abs(a[i * br:(i + 1) * br, j * bc:(j + 1) * bc])
            out[i, j] = np.float32(np.nan) if np.isnan(blk).any() else blk.max() / np.float32(fp8_max)
    return out


@pytest.mark.parametrize("fp8, fp8_max", [(E4M3, 448.0), (E5M2, 57344.0)], ids=["e4m3fn", "e5m2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape, block", [((300, 200), (128, 128)), ((576, 300), (128, 128)), ((41, 29), (4, 7)),
                                          ((1, 1), (128, 128))], ids=str)
def test_block_scale_equals_eager(fp8, fp8_max, dtype, shape, block):
    gen = torch.Generator().manual_seed(shape[0])
    x = (torch.randn(shape, generator=gen) * torch.rand(shape, generator=gen) * 1e-2).to(dtype)
    x[: block[0], : block[1]] = 0            # an all-zero block: scale 0
    if shape[0] > block[0]:
        x[block[0], 0] = float("nan")         # a NaN block: NaN
    got = fp8_block_scale(x, block=block, dtype=fp8)
    want = scale_eager(x, block, fp8_max)
    assert got.dtype == torch.float32 and got[0, 0].item() == 0.0
    assert np.array_equal(got.numpy().view(np.int32), want.view(np.int32))


def test_block_scale_finds_the_extreme_of_each_block():
    x = torch.zeros(256, 130)
    x[200, 129] = -896.0                      # the last, partial column block of the second block row
    s = fp8_block_scale(x, block=(128, 128))
    assert s.tolist() == [[0.0, 0.0], [0.0, 2.0]]


@pytest.mark.parametrize("fp8", [E4M3, E5M2], ids=str)
@pytest.mark.parametrize("shape", [(300, 200), (129, 385), (7, 5)], ids=str)
def test_quant_with_computed_scales_is_within_fp8_rounding(fp8, shape):
    gen = torch.Generator().manual_seed(shape[1])
    x = (torch.randn(shape, generator=gen) * torch.exp2(torch.randint(-12, 0, shape, generator=gen))).to(torch.bfloat16)
    zero_block = shape[0] > 128 and shape[1] > 128
    if zero_block:
        x[:128, :128] = 0
    s = fp8_block_scale(x, dtype=fp8, block=(128, 128))
    q = quant_fp8_block(x, s, dtype=fp8, block=(128, 128))
    back = dequant_fp8_block(q, s, dtype=torch.float32, block=(128, 128))
    xs = x.float()
    s_exp = s.repeat_interleave(128, 0).repeat_interleave(128, 1)[: shape[0], : shape[1]]
    mant = {E4M3: 3, E5M2: 2}[fp8]
    sub = {E4M3: 2.0 ** -9, E5M2: 2.0 ** -16}[fp8]  # spacing of the subnormals (in units of the scale)
    bound = torch.maximum(xs.abs() * 2.0 ** -(mant + 1), s_exp * sub / 2) * (1 + 2.0 ** -20)
    assert bool(((back - xs).abs() <= bound).all())
    # each block's extreme element lands on the largest code, and the zero block is all +0
    assert bool((q.float().abs().amax() == {E4M3: 448.0, E5M2: 57344.0}[fp8]))
    assert not zero_block or bool((u8(q)[:128, :128] == 0).all())


# --- graph: rules, narrowing, codec ---------------------------------------------------------------------------

def test_rules_and_constructors():
    x = read("f", "x", "bfloat16", (576, 300), offset=0)
    s = graph.fp8_block_scale(x, block=(128, 128))
    assert (s.op, s.dtype, s.shape) == (Op.FP8_BLOCK_SCALE, "float32", (5, 3))
    q = graph.quant_fp8_block(x, s, block=(128, 128))
    assert (q.op, q.dtype, q.shape) == (Op.QUANT_FP8_BLOCK, "float8_e4m3fn", (576, 300))
    e5 = graph.quant_fp8_block(x, graph.fp8_block_scale(x, dtype="float8_e5m2", block=(128, 128)), dtype="float8_e5m2", block=(128, 128))
    assert e5.dtype == "float8_e5m2" and e5.src[1].key != s.key
    part = graph.quant_fp8_block(read("f", "y", "float32", (20, 10), offset=0), read("f", "s", "float32", (1, 1),
                                 offset=0), origin=(100, 110), block=(128, 128))
    assert part.shape == (20, 10)


def _x(shape=(300, 200), dtype="bfloat16"):
    return read("f", "x", dtype, shape, offset=0)


def _s(shape):
    return read("f", "s", "float32", shape, offset=0)


BAD = [
    ("scale-1d-data", lambda: graph.fp8_block_scale(_x((4,)), block=(128, 128))),
    ("scale-3d-data", lambda: graph.fp8_block_scale(_x((4, 4, 4)), block=(128, 128))),
    ("scale-fp8-data", lambda: graph.fp8_block_scale(_x((4, 4), "float8_e4m3fn"), block=(128, 128))),
    ("scale-int-data", lambda: graph.fp8_block_scale(_x((4, 4), "int32"), block=(128, 128))),
    ("scale-not-fp8-dtype", lambda: graph.fp8_block_scale(_x(), dtype="bfloat16", block=(128, 128))),
    ("scale-block-zero", lambda: graph.fp8_block_scale(_x(), block=(0, 128))),
    ("scale-two-sources", lambda: make(Op.FP8_BLOCK_SCALE, (_x(), _x()), graph.fp8_block_scale(_x(), block=(128, 128)).arg)),
    ("quant-scale-too-few-rows", lambda: graph.quant_fp8_block(_x(), _s((2, 2)), block=(128, 128))),
    ("quant-scale-too-many-cols", lambda: graph.quant_fp8_block(_x(), _s((3, 3)), block=(128, 128))),
    ("quant-scale-ignores-origin", lambda: graph.quant_fp8_block(_x((128, 128)), _s((1, 1)), origin=(1, 0), block=(128, 128))),
    ("quant-scale-bf16", lambda: graph.quant_fp8_block(_x(), read("f", "s", "bfloat16", (3, 2), offset=0), block=(128, 128))),
    ("quant-scale-1d", lambda: graph.quant_fp8_block(_x((4, 4)), _s((1,)), block=(128, 128))),
    ("quant-data-1d", lambda: graph.quant_fp8_block(_x((4,)), _s((1, 1)), block=(128, 128))),
    ("quant-data-fp8", lambda: graph.quant_fp8_block(_x((4, 4), "float8_e4m3fn"), _s((1, 1)), block=(128, 128))),
    ("quant-data-f64", lambda: graph.quant_fp8_block(_x((4, 4), "float64"), _s((1, 1)), block=(128, 128))),
    ("quant-out-not-fp8", lambda: graph.quant_fp8_block(_x((4, 4)), _s((1, 1)), dtype="bfloat16", block=(128, 128))),
    ("quant-origin-outside-block", lambda: graph.quant_fp8_block(_x((4, 4)), _s((2, 1)), origin=(128, 0), block=(128, 128))),
    ("quant-origin-negative", lambda: graph.quant_fp8_block(_x((4, 4)), _s((1, 1)), origin=(0, -1), block=(128, 128))),
    ("quant-one-source", lambda: make(Op.QUANT_FP8_BLOCK, (_x(),), QuantArg((128, 128), (0, 0), "float8_e4m3fn"))),
]


@pytest.mark.parametrize("build", [b[1] for b in BAD], ids=[b[0] for b in BAD])
def test_rule_errors(build):
    with pytest.raises(GraphError):
        build()


M, N = 300, 200


def _no_nan(codes: torch.Tensor) -> torch.Tensor:
    return codes.masked_fill((codes & 0x7F) == 0x7F, 0x80)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A real safetensors file: a bf16 weight (dims not multiples of 128), an fp8 weight and its scales."""
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "x": (torch.randn(M, N, generator=gen) * 0.02).to(torch.bfloat16),
        "w8": _no_nan(torch.randint(0, 256, (M, N), generator=gen, dtype=torch.uint8)).view(E4M3),
        "w8_s": torch.rand(3, 2, generator=gen) * 1e-3 + 1e-5,
    }
    root = str(tmp_path_factory.mktemp("ckpt"))
    return root, tensors, write_with_reads(root, "model.safetensors", tensors)


def _cases(n: dict) -> dict:
    x = n["x"]
    deq = graph.dequant_fp8_block(n["w8"], n["w8_s"], block=(128, 128))
    x_part = graph.slice_(x, (130, 70), (150, 110))       # starts inside a block: origin (2, 70)
    return {
        "scale": graph.fp8_block_scale(x, block=(128, 128)),
        "scale-small-blocks": graph.fp8_block_scale(x, block=(7, 9), dtype="float8_e5m2"),
        "quant": graph.quant_fp8_block(x, graph.fp8_block_scale(x, block=(128, 128)), block=(128, 128)),
        "quant-e5m2-small-blocks": graph.quant_fp8_block(x, graph.fp8_block_scale(x, block=(7, 9), dtype="float8_e5m2"),
                                                         block=(7, 9), dtype="float8_e5m2"),
        "quant-origin": graph.quant_fp8_block(x_part, graph.slice_(graph.fp8_block_scale(x, block=(128, 128)), (1, 0), (2, 2)),
                                              origin=(2, 70), block=(128, 128)),
        "requant": graph.quant_fp8_block(deq, n["w8_s"], block=(128, 128)),
        "requant-transposed-back": graph.quant_fp8_block(graph.transpose(graph.transpose(deq)), n["w8_s"], block=(128, 128)),
    }


@pytest.fixture(scope="module")
def full(ckpt):
    root, _, nodes = ckpt
    cache: dict = {}
    return {k: materialize(v, root, cache=cache) for k, v in _cases(nodes).items()}


def test_graph_values(ckpt, full):
    _, t, _ = ckpt
    s = fp8_block_scale(t["x"], block=(128, 128))
    assert_bits(full["scale"], s)
    assert_bits(full["quant"], quant_reference(t["x"], s, block=(128, 128)))
    assert_bits(full["quant-origin"], full["quant"][130:280, 70:180])
    assert_bits(full["requant"], t["w8"])  # the FP8 -> bf16 -> FP8 round trip, through the graph


def _bands(size: int, block: int) -> list[tuple[int, int]]:
    """Bands on block boundaries, inside one block, across boundaries, at the ends, and empty ones."""
    cand = [(0, block), (block, min(size, 2 * block)), (1, 2), (block - 1, block + 1), (3, size - 2),
            (size - 1, size), (0, size - 1), (size // 2, size // 2), (size, size), (block, block)]
    return sorted({(a, b) for a, b in cand if 0 <= a <= b <= size})


@pytest.mark.parametrize("name", ["scale", "scale-small-blocks", "quant", "quant-e5m2-small-blocks", "quant-origin",
                                  "requant", "requant-transposed-back"])
@pytest.mark.parametrize("dim", [0, 1])
def test_narrow_equals_slicing_the_value(ckpt, full, name, dim):
    root, _, nodes = ckpt
    node = _cases(nodes)[name]
    block = 7 if "small" in name and dim == 0 else 9 if "small" in name else 128
    if name.startswith("scale"):
        block = 1  # the scale's own index is already in blocks
    for a, b in _bands(node.shape[dim], block):
        band = narrow(node, dim, a, b)
        assert band.op is node.op or a == b, f"{name}: [{a}, {b}) along {dim} not pushed down"
        assert_bits(materialize(band, root), full[name].narrow(dim, a, b - a))
        for c, d in _bands(b - a, 5):  # bands of bands
            assert_bits(materialize(narrow(band, dim, c, d), root), full[name].narrow(dim, a + c, d - c))


@SETTINGS
@given(data=st.data())
def test_narrow_random_bands(ckpt, full, data):
    root, _, nodes = ckpt
    name = data.draw(st.sampled_from(sorted(full)), label="case")
    node = _cases(nodes)[name]
    dim = data.draw(st.integers(0, 1), label="dim")
    a = data.draw(st.integers(0, node.shape[dim]), label="start")
    b = data.draw(st.integers(a, node.shape[dim]), label="stop")
    assert_bits(materialize(narrow(node, dim, a, b), root), full[name].narrow(dim, a, b - a))


def test_narrow_quant_rows_reads_only_the_covering_rows(ckpt):
    _, _, nodes = ckpt
    x = nodes["x"]
    band = narrow(graph.quant_fp8_block(x, graph.fp8_block_scale(x, block=(128, 128)), block=(128, 128)), 0, 130, 140)
    assert band.op is Op.QUANT_FP8_BLOCK and band.arg.origin == (2, 0)
    data, s = band.src
    assert data.op is Op.READ and data.arg.rows == (130, 140)
    # the scale of block row 1 is computed from exactly that block's rows, not from the whole weight
    assert s.op is Op.FP8_BLOCK_SCALE and s.shape == (1, 2)
    assert [n.arg.rows for n in toposort([s]) if n.op is Op.READ] == [(128, 256)]
    wide = narrow(graph.quant_fp8_block(x, graph.fp8_block_scale(x, block=(128, 128)), block=(128, 128)), 0, 120, 260)
    assert wide.arg.origin == (120, 0) and wide.src[1].shape == (3, 2)
    last = narrow(graph.fp8_block_scale(x, block=(128, 128)), 0, 2, 3)          # the partial last block row: rows 256..299
    assert [n.arg.rows for n in toposort([last]) if n.op is Op.READ] == [(256, 300)]


def test_codec_round_trip():
    x = read("f", "x", "bfloat16", (300, 200), offset=0)
    s = graph.fp8_block_scale(x, block=(64, 32), dtype="float8_e5m2")
    roots = [graph.quant_fp8_block(x, s, block=(64, 32), dtype="float8_e5m2"),
             graph.quant_fp8_block(graph.slice_(x, (5, 40), (100, 100)), graph.slice_(s, (0, 1), (2, 4)),
                                   block=(64, 32), origin=(5, 8), dtype="float8_e5m2"),
             narrow(graph.quant_fp8_block(x, graph.fp8_block_scale(x, block=(128, 128)), block=(128, 128)), 1, 100, 150)]
    obj = graph_to_json(roots)
    back = graph_from_json(json.loads(json.dumps(obj)))
    assert [n.key for n in back] == [n.key for n in roots] and graph_to_json(back) == obj
    assert {row["op"] for row in obj["nodes"]} >= {"fp8_block_scale", "quant_fp8_block"}
    row = next(r for r in obj["nodes"] if r["op"] == "quant_fp8_block")
    assert row["arg"] == {"block": [64, 32], "origin": [0, 0], "dtype": "float8_e5m2"}


@pytest.mark.parametrize("edit", [
    lambda r: r["arg"].__setitem__("origin", [0, 100]),         # scale grid no longer fits
    lambda r: r["arg"].__setitem__("dtype", "bfloat16"),
    lambda r: r["arg"].pop("origin"),
    lambda r: r.__setitem__("dtype", "float8_e5m2"),
], ids=["origin", "dtype", "missing-field", "recorded-dtype"])
def test_codec_refuses_tampered_quant(edit):
    x = read("f", "x", "bfloat16", (300, 200), offset=0)
    obj = json.loads(json.dumps(graph_to_json([graph.quant_fp8_block(x, graph.fp8_block_scale(x, block=(128, 128)), block=(128, 128))])))
    edit(next(r for r in obj["nodes"] if r["op"] == "quant_fp8_block"))
    with pytest.raises(GraphError):
        graph_from_json(obj)


def test_nbytes():
    x = read("f", "x", "bfloat16", (300, 200), offset=0)
    assert graph.quant_fp8_block(x, graph.fp8_block_scale(x, block=(128, 128)), block=(128, 128)).nbytes == math.prod((300, 200))
    assert graph.fp8_block_scale(x, block=(128, 128)).nbytes == 3 * 2 * 4


# --- preferred scales (re-export with the scales the weights came with) ----------------------------------------------

def test_preferred_scales_are_kept_while_the_values_fit():
    """Dequantized FP8 weights keep their own scales exactly (so quantizing again gives the same codes); a block
    whose values grew past its range gets the fresh amax/448 scale instead of being clipped; a zero block keeps
    a zero scale."""
    gen = torch.Generator().manual_seed(7)
    codes = (torch.rand(300, 260, generator=gen) * 800 - 400).to(torch.float8_e4m3fn)
    codes[:128, :128] = 448.0                      # a block at the top of the range: bf16(448 s) may round up
    codes[128:256, 128:256] = 0.0
    s = torch.rand(3, 3, generator=gen) * 1e-2 + 1e-4
    s[1, 1] = 0.0
    x = dequant_fp8_block(codes, s, block=(128, 128), dtype=torch.bfloat16)
    kept = fp8_block_scale(x, prefer=s, block=(128, 128))
    assert torch.equal(kept, s)
    assert_bits(quant_fp8_block(x, kept, block=(128, 128)), codes)
    grown = x.clone()
    grown[130:140, 5:9] *= 4                      # fine-tuning moved block (1, 0) past its range
    scales = fp8_block_scale(grown, prefer=s, block=(128, 128))
    fresh = fp8_block_scale(grown, block=(128, 128))
    changed = (scales != s)
    assert changed.sum() == 1 and changed[1, 0]
    assert scales[1, 0] == fresh[1, 0]
    q = quant_fp8_block(grown, scales, block=(128, 128)).float()
    assert q.abs().max() <= 448 and not torch.isnan(q).any()


def test_preferred_scales_in_the_graph_narrow_and_check():
    x = read("f", "x", "bfloat16", (300, 260), offset=0)
    s = read("f", "s", "float32", (3, 3), offset=0)
    node = graph.fp8_block_scale(x, prefer=s, block=(128, 128))
    band = narrow(node, 0, 1, 3)
    assert band.op is Op.FP8_BLOCK_SCALE and band.src[1].arg.rows == (1, 3) and band.src[0].arg.rows == (128, 300)
    with pytest.raises(GraphError, match="preferred scales"):
        graph.fp8_block_scale(x, prefer=read("f", "s", "float32", (2, 3), offset=0), block=(128, 128))
