"""Unit tests of streamconv.graph: shape/dtype rules, content keys, the JSON codec, ``narrow`` push-down
(checked bit for bit against real safetensors data) and toposort."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamconv.errors import GraphError
from streamconv.execute.kernels import materialize
from streamconv.graph.codec import graph_from_json, graph_to_json
from streamconv.graph.node import (CastArg, CatArg, DequantArg, Node, Op, ReadArg, SliceArg, TransposeArg, ViewArg,
                                   cast, cat, chunk, dequant_fp8_block, fp8_block_scale, make, quant_fp8_block, read,
                                   slice_, toposort, transpose, view)
from streamconv.graph.rewrite import narrow
from streamconv.mapping.rules import grouped_weight1, grouped_weight2
from tests.st_file import write_with_reads

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def r(shape, dtype="bfloat16", tensor="t", file="f.safetensors", offset=0, rows=None) -> Node:
    return read(file, tensor, dtype, shape, offset=offset, rows=rows)


def f8(shape) -> Node:
    return r(shape, "float8_e4m3fn", tensor="w")


def sc(shape) -> Node:
    return r(shape, "float32", tensor="s")


# --- shape and dtype rules -----------------------------------------------------------------------------------

VALID = [
    # (id, builder, dtype, shape)
    ("read", lambda: r((4, 3)), "bfloat16", (4, 3)),
    ("read-rows", lambda: r((4, 3), rows=(1, 3)), "bfloat16", (2, 3)),
    ("read-empty-band", lambda: r((4, 3), rows=(4, 4)), "bfloat16", (0, 3)),
    ("read-3d-band", lambda: r((5, 3, 2), "float32", rows=(2, 5)), "float32", (3, 3, 2)),
    ("read-0d", lambda: r((), "int64"), "int64", ()),
    ("read-empty", lambda: r((0, 7), "float16"), "float16", (0, 7)),
    ("slice", lambda: slice_(r((4, 6)), (1, 2), (2, 3)), "bfloat16", (2, 3)),
    ("slice-empty", lambda: slice_(r((4, 6)), (4, 0), (0, 6)), "bfloat16", (0, 6)),
    ("slice-whole-is-identity", lambda: slice_(r((4, 6)), (0, 0), (4, 6)), "bfloat16", (4, 6)),
    ("chunk-dim0", lambda: chunk(r((8, 6)), 4, 3, 0), "bfloat16", (2, 6)),
    ("chunk-dim1", lambda: chunk(r((8, 6)), 3, 1, 1), "bfloat16", (8, 2)),
    ("cat-dim0", lambda: cat([r((2, 3)), r((4, 3), tensor="u")], 0), "bfloat16", (6, 3)),
    ("cat-dim1", lambda: cat([r((2, 3)), r((2, 5), tensor="u")], 1), "bfloat16", (2, 8)),
    ("cat-three", lambda: cat([r((1, 3)), r((0, 3)), r((4, 3))], 0), "bfloat16", (5, 3)),
    ("view-flat", lambda: view(r((4, 6)), (24,)), "bfloat16", (24,)),
    ("view-3d", lambda: view(r((4, 6)), (2, 3, 4)), "bfloat16", (2, 3, 4)),
    ("view-empty", lambda: view(r((0, 6)), (3, 0)), "bfloat16", (3, 0)),
    ("transpose", lambda: transpose(r((2, 3))), "bfloat16", (3, 2)),
    ("transpose-3d", lambda: transpose(r((2, 3, 4)), 0, 2), "bfloat16", (4, 3, 2)),
    ("transpose-same-dim", lambda: transpose(r((2, 3)), 1, 1), "bfloat16", (2, 3)),
    ("cast", lambda: cast(r((2, 3)), "float32"), "float32", (2, 3)),
    ("cast-same-is-identity", lambda: cast(r((2, 3)), "bfloat16"), "bfloat16", (2, 3)),
    ("dequant", lambda: dequant_fp8_block(f8((300, 200)), sc((3, 2)), block=(128, 128)), "bfloat16", (300, 200)),
    ("dequant-exact-blocks", lambda: dequant_fp8_block(f8((256, 128)), sc((2, 1)), block=(128, 128)), "bfloat16", (256, 128)),
    ("dequant-origin", lambda: dequant_fp8_block(f8((300, 200)), sc((3, 3)), origin=(5, 70), block=(128, 128)), "bfloat16",
     (300, 200)),
    ("dequant-origin-fits", lambda: dequant_fp8_block(f8((20, 10)), sc((1, 1)), origin=(100, 110), block=(128, 128)), "bfloat16",
     (20, 10)),
    ("dequant-e5m2-f32", lambda: dequant_fp8_block(r((3, 4), "float8_e5m2"), sc((1, 1)), dtype="float32", block=(128, 128)),
     "float32", (3, 4)),
    ("dequant-small-block", lambda: dequant_fp8_block(f8((10, 9)), sc((4, 3)), block=(3, 4), origin=(2, 3)),
     "bfloat16", (10, 9)),
    ("block-scale", lambda: fp8_block_scale(r((576, 300)), block=(128, 128)), "float32", (5, 3)),
    ("block-scale-e5m2-f16", lambda: fp8_block_scale(r((10, 9), "float16"), block=(3, 4), dtype="float8_e5m2"),
     "float32", (4, 3)),
    ("block-scale-empty", lambda: fp8_block_scale(r((0, 7)), block=(128, 128)), "float32", (0, 1)),
    ("quant", lambda: quant_fp8_block(r((300, 200)), sc((3, 2)), block=(128, 128)), "float8_e4m3fn", (300, 200)),
    ("quant-origin", lambda: quant_fp8_block(r((300, 200), "float32"), sc((3, 3)), origin=(5, 70), block=(128, 128)), "float8_e4m3fn",
     (300, 200)),
    ("quant-e5m2", lambda: quant_fp8_block(r((10, 9)), sc((4, 3)), block=(3, 4), origin=(2, 3), dtype="float8_e5m2"),
     "float8_e5m2", (10, 9)),
]


@pytest.mark.parametrize("build, dtype, shape", [v[1:] for v in VALID], ids=[v[0] for v in VALID])
def test_rule_valid(build, dtype, shape):
    node = build()
    assert (node.dtype, node.shape) == (dtype, shape)
    assert node.nbytes == math.prod(shape) * {"bfloat16": 2, "float16": 2, "float32": 4, "int64": 8, "float8_e4m3fn": 1,
                                             "float8_e5m2": 1}[dtype]


X = r((4, 6))
RA = ReadArg("f", "t", "bfloat16", (4, 3), 0, (0, 4))

INVALID = [
    # (id, builder) -- each must raise GraphError
    ("read-with-source", lambda: make(Op.READ, (X,), RA)),
    ("read-unknown-dtype", lambda: r((4, 3), "bf16")),
    ("read-rows-past-end", lambda: r((4, 3), rows=(0, 5))),
    ("read-rows-reversed", lambda: r((4, 3), rows=(3, 2))),
    ("read-rows-negative", lambda: r((4, 3), rows=(-1, 2))),
    ("read-0d-band", lambda: r((), rows=(0, 2))),
    ("arg-of-wrong-type", lambda: make(Op.SLICE, (X,), CatArg(0))),
    ("slice-no-source", lambda: make(Op.SLICE, (), SliceArg((0, 0), (1, 1)))),
    ("slice-two-sources", lambda: make(Op.SLICE, (X, X), SliceArg((0, 0), (1, 1)))),
    ("slice-rank-mismatch", lambda: slice_(X, (0,), (2,))),
    ("slice-lengths-rank", lambda: slice_(X, (0, 0), (2,))),
    ("slice-past-end", lambda: slice_(X, (3, 0), (2, 6))),
    ("slice-past-end-dim1", lambda: slice_(X, (0, 1), (4, 6))),
    ("slice-negative-offset", lambda: slice_(X, (-1, 0), (2, 6))),
    ("slice-negative-length", lambda: slice_(X, (2, 0), (-1, 6))),
    ("chunk-uneven", lambda: chunk(X, 3, 0, 0)),
    ("cat-no-sources", lambda: make(Op.CAT, (), CatArg(0))),
    ("cat-dtype-mismatch", lambda: cat([X, r((4, 6), "float32")], 0)),
    ("cat-shape-mismatch", lambda: cat([X, r((4, 5))], 0)),
    ("cat-shape-mismatch-dim1", lambda: cat([X, r((3, 6))], 1)),
    ("cat-rank-mismatch", lambda: cat([X, r((4, 6, 1))], 0)),
    ("cat-dim-out-of-range", lambda: cat([X, X], 2)),
    ("cat-dim-negative", lambda: cat([X, X], -1)),
    ("view-numel", lambda: view(X, (5, 5))),
    ("view-negative", lambda: view(X, (-4, -6))),
    ("view-two-sources", lambda: make(Op.VIEW, (X, X), ViewArg((24,)))),
    ("transpose-dim-out-of-range", lambda: transpose(X, 0, 2)),
    ("transpose-dim-negative", lambda: transpose(X, -1, 0)),
    ("transpose-no-source", lambda: make(Op.TRANSPOSE, (), TransposeArg(0, 1))),
    ("cast-unknown-dtype", lambda: cast(X, "float128")),
    ("cast-two-sources", lambda: make(Op.CAST, (X, X), CastArg("float32"))),
    ("dequant-one-source", lambda: make(Op.DEQUANT_FP8_BLOCK, (f8((4, 4)),), DequantArg((128, 128), (0, 0),
                                                                                          "bfloat16"))),
    ("dequant-data-not-fp8", lambda: dequant_fp8_block(r((4, 4)), sc((1, 1)), block=(128, 128))),
    ("dequant-data-1d", lambda: dequant_fp8_block(f8((4,)), sc((1, 1)), block=(128, 128))),
    ("dequant-scale-bf16", lambda: dequant_fp8_block(f8((4, 4)), r((1, 1)), block=(128, 128))),
    ("dequant-scale-1d", lambda: dequant_fp8_block(f8((4, 4)), sc((1,)), block=(128, 128))),
    ("dequant-scale-too-few-rows", lambda: dequant_fp8_block(f8((300, 200)), sc((2, 2)), block=(128, 128))),
    ("dequant-scale-too-many-cols", lambda: dequant_fp8_block(f8((300, 200)), sc((3, 3)), block=(128, 128))),
    ("dequant-scale-ignores-origin", lambda: dequant_fp8_block(f8((128, 128)), sc((1, 1)), origin=(1, 0), block=(128, 128))),
    ("dequant-origin-outside-block", lambda: dequant_fp8_block(f8((4, 4)), sc((2, 1)), origin=(128, 0), block=(128, 128))),
    ("dequant-origin-negative", lambda: dequant_fp8_block(f8((4, 4)), sc((1, 1)), origin=(0, -1), block=(128, 128))),
    ("dequant-block-zero", lambda: dequant_fp8_block(f8((4, 4)), sc((1, 1)), block=(0, 128))),
    ("dequant-unknown-out-dtype", lambda: dequant_fp8_block(f8((4, 4)), sc((1, 1)), dtype="bf16", block=(128, 128))),
    ("block-scale-fp8-data", lambda: fp8_block_scale(f8((4, 4)), block=(128, 128))),
    ("block-scale-1d", lambda: fp8_block_scale(r((4,)), block=(128, 128))),
    ("block-scale-out-not-fp8", lambda: fp8_block_scale(r((4, 4)), dtype="float32", block=(128, 128))),
    ("quant-scale-too-few-rows", lambda: quant_fp8_block(r((300, 200)), sc((2, 2)), block=(128, 128))),
    ("quant-scale-bf16", lambda: quant_fp8_block(r((4, 4)), r((1, 1)), block=(128, 128))),
    ("quant-data-fp8", lambda: quant_fp8_block(f8((4, 4)), sc((1, 1)), block=(128, 128))),
    ("quant-out-not-fp8", lambda: quant_fp8_block(r((4, 4)), sc((1, 1)), dtype="bfloat16", block=(128, 128))),
]


@pytest.mark.parametrize("build", [v[1] for v in INVALID], ids=[v[0] for v in INVALID])
def test_rule_invalid(build):
    with pytest.raises(GraphError):
        build()


# --- content keys --------------------------------------------------------------------------------------------

def _sample_graph(file="f.safetensors", rows=(0, 300), c0=70, dim=0, dtype="bfloat16") -> Node:
    w = read(file, "w", "float8_e4m3fn", (300, 200), offset=128, rows=rows)
    s = read(file, "s", "float32", (3, 2), offset=64)
    d = dequant_fp8_block(w, s, dtype=dtype, block=(128, 128))
    a = slice_(d, (0, c0), (rows[1] - rows[0], 100))
    return cast(cat([a, transpose(transpose(a))], dim), "float32")


def test_equal_graphs_have_equal_keys():
    a, b = _sample_graph(), _sample_graph()
    assert a is not b
    assert a.key == b.key and a == b and hash(a) == hash(b)
    assert len({a, b}) == 1
    assert a != a.src[0]


@pytest.mark.parametrize("kw", [dict(file="g.safetensors"), dict(rows=(0, 299)), dict(c0=71), dict(dim=1),
                                dict(dtype="float16")], ids=str)
def test_different_args_give_different_keys(kw):
    assert _sample_graph().key != _sample_graph(**kw).key


def test_keys_differ_for_every_field():
    nodes = [
        r((4, 6)), r((4, 6), tensor="u"), r((4, 6), file="g"), r((4, 6), offset=8), r((4, 6), "float16"),
        r((6, 4)), r((4, 6), rows=(0, 3)), r((4, 6), rows=(1, 4)),
        slice_(X, (1, 0), (2, 6)), slice_(X, (2, 0), (2, 6)), slice_(X, (1, 0), (3, 6)),
        cat([X, X], 0), cat([X, X], 1), cat([X, X, X], 0),
        view(X, (24,)), view(X, (6, 4)), transpose(X), cast(X, "float32"), cast(X, "float16"),
        dequant_fp8_block(f8((4, 4)), sc((1, 1)), block=(128, 128)), dequant_fp8_block(f8((4, 4)), sc((1, 1)), dtype="float32", block=(128, 128)),
        dequant_fp8_block(f8((4, 4)), sc((1, 1)), origin=(1, 0), block=(128, 128)),
        dequant_fp8_block(f8((4, 4)), sc((1, 1)), block=(64, 128)),
    ]
    assert len({n.key for n in nodes}) == len(nodes)


def _key_from_json(rows: list[dict], i: int, memo: dict) -> str:
    """The content key recomputed from the JSON row alone (op, arg fields, sources' keys)."""
    if i not in memo:
        row = rows[i]
        payload = json.dumps([row["op"], row["arg"], [_key_from_json(rows, j, memo) for j in row["src"]]],
                             separators=(",", ":"), sort_keys=True)
        memo[i] = hashlib.sha256(payload.encode()).hexdigest()[:24]
    return memo[i]


def test_key_is_a_function_of_the_json_form():
    root = _sample_graph()
    obj = json.loads(json.dumps(graph_to_json([root])))
    memo: dict = {}
    got = [_key_from_json(obj["nodes"], i, memo) for i in range(len(obj["nodes"]))]
    assert got == [n.key for n in toposort([root])]


def test_key_is_stable_across_processes():
    code = ("import sys; sys.path.insert(0, %r); from tests.unit.graph.test_graph import _sample_graph; "
            "print(_sample_graph().key)") % os.getcwd()
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == _sample_graph().key


# --- JSON codec ----------------------------------------------------------------------------------------------

def _shared_graph() -> list[Node]:
    w = r((8, 6))
    a = slice_(w, (0, 0), (4, 6))
    b = slice_(w, (4, 0), (4, 6))
    c = cat([a, b], 1)
    d = cat([transpose(a), transpose(b)], 0)
    return [cast(c, "float32"), d, view(c, (2, 24))]


def test_round_trip_identity_and_sharing():
    roots = _shared_graph()
    obj = graph_to_json(roots)
    reachable = toposort(roots)
    assert len(obj["nodes"]) == len(reachable)              # every node once, shared ones too
    assert sum(row["op"] == "read" for row in obj["nodes"]) == 1
    back = graph_from_json(json.loads(json.dumps(obj)))
    assert back == roots and [n.key for n in back] == [n.key for n in roots]
    assert [(n.dtype, n.shape) for n in back] == [(n.dtype, n.shape) for n in roots]
    # sharing survives: one object per stored row
    assert len({id(n) for n in toposort(back)}) == len(reachable)
    c_back = back[0].src[0]
    assert c_back is back[2].src[0]
    assert c_back.src[0].src[0] is c_back.src[1].src[0]
    assert graph_to_json(back) == obj


@st.composite
def random_graph(draw, max_ops=8):
    """A random well-typed graph over a few reads (shapes kept small)."""
    pool = [r((6, 4)), r((6, 4), tensor="u", offset=48), r((2, 3, 4), "float32", tensor="v"),
            dequant_fp8_block(f8((5, 7)), sc((2, 3)), block=(3, 3), origin=(1, 2)),
            quant_fp8_block(r((5, 7)), fp8_block_scale(r((5, 7)), block=(3, 3)), block=(3, 3)),
            quant_fp8_block(r((5, 7), "float32"), sc((2, 3)), block=(3, 3), origin=(1, 2), dtype="float8_e5m2")]
    for _ in range(draw(st.integers(1, max_ops))):
        x = draw(st.sampled_from(pool))
        kind = draw(st.sampled_from(["slice", "cat", "view", "transpose", "cast"]))
        if not x.shape:
            continue
        if kind == "slice":
            offs, lens = [], []
            for n in x.shape:
                o = draw(st.integers(0, n))
                offs.append(o)
                lens.append(draw(st.integers(0, n - o)))
            pool.append(slice_(x, offs, lens))
        elif kind == "cat":
            d = draw(st.integers(0, len(x.shape) - 1))
            pool.append(cat([x, x], d))
        elif kind == "view":
            pool.append(view(x, (math.prod(x.shape),)))
        elif kind == "transpose" and len(x.shape) >= 2:
            pool.append(transpose(x, 0, len(x.shape) - 1))
        elif kind == "cast":
            pool.append(cast(x, draw(st.sampled_from(["float32", "bfloat16", "float16"]))))
    return pool[-draw(st.integers(1, min(3, len(pool)))):]


@SETTINGS
@given(random_graph())
def test_round_trip_random_graphs(roots):
    obj = graph_to_json(roots)
    back = graph_from_json(json.loads(json.dumps(obj)))
    assert [n.key for n in back] == [n.key for n in roots]
    assert graph_to_json(back) == obj
    assert len(obj["nodes"]) == len(toposort(roots))


def _tamper(edit):
    obj = json.loads(json.dumps(graph_to_json(_shared_graph())))
    edit(obj)
    return obj


def _node(obj, op):
    return next(row for row in obj["nodes"] if row["op"] == op)


TAMPERED = [
    ("recorded-shape", lambda o: _node(o, "slice").__setitem__("shape", [5, 6])),
    ("recorded-dtype", lambda o: _node(o, "cast").__setitem__("dtype", "float16")),
    ("read-rows-past-end", lambda o: _node(o, "read")["arg"].__setitem__("rows", [0, 9])),
    ("forward-source", lambda o: o["nodes"][1].__setitem__("src", [2])),
    ("self-source", lambda o: o["nodes"][1].__setitem__("src", [1])),
    ("negative-source", lambda o: o["nodes"][1].__setitem__("src", [-1])),
    ("missing-source", lambda o: o["nodes"][1].__setitem__("src", [])),
    ("unknown-op", lambda o: _node(o, "transpose").__setitem__("op", "matmul")),
    ("op-missing", lambda o: _node(o, "transpose").pop("op")),
    ("arg-missing-field", lambda o: _node(o, "slice")["arg"].pop("lengths")),
    ("arg-extra-field", lambda o: _node(o, "cat")["arg"].__setitem__("axis", 0)),
    ("arg-renamed-field", lambda o: _node(o, "transpose").__setitem__("arg", {"dim0": 0, "dims": 1})),
    ("arg-wrong-type", lambda o: _node(o, "slice")["arg"].__setitem__("offsets", None)),
    ("arg-not-object", lambda o: _node(o, "view").__setitem__("arg", 7)),
    ("arg-out-of-range", lambda o: _node(o, "slice")["arg"].__setitem__("offsets", [5, 0])),
    ("root-out-of-range", lambda o: o.__setitem__("roots", [len(o["nodes"])])),
    ("root-negative", lambda o: o.__setitem__("roots", [-1])),
    ("arg-float-offset", lambda o: _node(o, "slice")["arg"].__setitem__("offsets", [0.0, 0])),
    ("arg-bool-dim", lambda o: _node(o, "cat")["arg"].__setitem__("dim", False)),
]


@pytest.mark.parametrize("edit", [t[1] for t in TAMPERED], ids=[t[0] for t in TAMPERED])
def test_tampered_json_is_refused(edit):
    with pytest.raises(GraphError):
        graph_from_json(_tamper(edit))


# --- narrow push-down, checked on real data -------------------------------------------------------------------

M, N = 300, 200
NE, H, C, F = 3, 12, 10, 6          # experts, hidden, fc1 rows per expert, fc2 cols per expert


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A real safetensors file: bf16/f32/fp8 weights with dims not multiples of 128, block scales, experts."""
    g = torch.Generator().manual_seed(0)
    tensors = {
        "bf": torch.randn(M, N, generator=g).to(torch.bfloat16),
        "bf2": torch.randn(M, N, generator=g).to(torch.bfloat16),
        "f32": torch.randn(M, N, generator=g),
        "w8": torch.randint(0, 256, (M, N), generator=g, dtype=torch.uint8).view(torch.float8_e4m3fn),
        "w8_s": torch.rand(-(-M // 128), -(-N // 128), generator=g) * 2 + 0.01,
        "big8": (torch.randn(260, 130, generator=g) * 40).to(torch.float8_e4m3fn),
        "big8_s": torch.rand(3, 2, generator=g) + 0.5,
    }
    for q in range(NE):
        tensors[f"fc1.{q}"] = torch.randn(C, H, generator=g).to(torch.bfloat16)
        tensors[f"fc2.{q}"] = torch.randn(H, F, generator=g).to(torch.bfloat16)
    root = str(tmp_path_factory.mktemp("ckpt"))
    return root, tensors, write_with_reads(root, "model.safetensors", tensors)


def _cases(n: dict) -> dict[str, Node]:
    bf, bf2, f32 = n["bf"], n["bf2"], n["f32"]
    deq = dequant_fp8_block(n["w8"], n["w8_s"], block=(128, 128))
    # a piece of w8 that starts inside a block, paired with its covering scale blocks
    w_part = slice_(n["w8"], (130, 70), (150, 110))
    s_part = slice_(n["w8_s"], (1, 0), (2, 2))
    deq_part = dequant_fp8_block(w_part, s_part, origin=(2, 70), block=(128, 128))
    fc1 = [n[f"fc1.{q}"] for q in range(NE)]
    fc2 = [n[f"fc2.{q}"] for q in range(NE)]
    big = dequant_fp8_block(n["big8"], n["big8_s"], block=(128, 128))
    # fc1 of each "expert" taken from the fp8 tensor: gate and up halves chunked for TP rank 1 of 2
    fp8_fc1 = [cat([chunk(slice_(big, (0, 40 * q), (130, 40)), 2, 1, 0),
                    chunk(slice_(big, (130, 40 * q), (130, 40)), 2, 1, 0)], 0) for q in range(3)]
    return {
        "read-bf16": bf,
        "read-f32": f32,
        "read-fp8": n["w8"],
        "slice": slice_(bf, (17, 33), (250, 150)),
        "slice-of-slice": slice_(slice_(f32, (5, 9), (290, 180)), (100, 1), (150, 170)),
        "chunk-dim0": chunk(bf, 4, 1, 0),
        "chunk-dim1": chunk(f32, 5, 2, 1),
        "cat-dim0": cat([bf, bf2], 0),
        "cat-dim1": cat([bf, bf2], 1),
        "cat-uneven-slices-dim0": cat([slice_(bf, (0, 0), (7, N)), slice_(bf2, (100, 0), (123, N)), bf], 0),
        "cat-uneven-slices-dim1": cat([slice_(bf, (0, 190), (M, 10)), chunk(bf2, 2, 1, 1)], 1),
        "transpose": transpose(bf),
        "transpose-of-cat": transpose(cat([bf, bf2], 1)),
        "view-rows-merge": view(bf, (150, 400)),
        "view-rows-split": view(bf, (600, 100)),
        "view-odd": view(f32, (250, 240)),
        "view-flat": view(bf, (M * N,)),
        "view-3d": view(f32, (100, 3, N)),
        "cast-up": cast(bf, "float32"),
        "cast-down": cast(f32, "bfloat16"),
        "dequant": deq,
        "dequant-f32": dequant_fp8_block(n["w8"], n["w8_s"], dtype="float32", block=(128, 128)),
        "dequant-origin": deq_part,
        "dequant-transposed": transpose(deq),
        "dequant-cast-cat": cast(cat([deq, bf], 1), "float32"),
        "requant": quant_fp8_block(deq, n["w8_s"], block=(128, 128)),
        "quant-of-cat": quant_fp8_block(cat([bf, bf2], 1), fp8_block_scale(cat([bf, bf2], 1), block=(128, 128)), block=(128, 128)),
        "block-scale": fp8_block_scale(f32, block=(7, 9), dtype="float8_e5m2"),
        "grouped-w1": grouped_weight1(fc1),
        "grouped-w2": grouped_weight2(fc2),
        "grouped-w1-fp8-tp": grouped_weight1(fp8_fc1),
        "grouped-w2-fp8": grouped_weight2([slice_(big, (0, 30 * q), (260, 30)) for q in range(4)]),
    }


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def assert_same(got: torch.Tensor, want: torch.Tensor):
    assert got.dtype == want.dtype and tuple(got.shape) == tuple(want.shape)
    assert torch.equal(bits(got), bits(want))


@pytest.fixture(scope="module")
def full(ckpt):
    """Each case's whole value, materialized once."""
    root, _, nodes = ckpt
    cache: dict = {}
    return {name: materialize(node, root, cache=cache) for name, node in _cases(nodes).items()}


@SETTINGS
@given(data=st.data())
def test_narrow_equals_narrowing_the_value(ckpt, full, data):
    root, _, nodes = ckpt
    name = data.draw(st.sampled_from(sorted(full)), label="case")
    node = _cases(nodes)[name]
    dim = data.draw(st.integers(0, len(node.shape) - 1), label="dim")
    a = data.draw(st.integers(0, node.shape[dim]), label="start")
    b = data.draw(st.integers(a, node.shape[dim]), label="stop")
    got = materialize(narrow(node, dim, a, b), root)
    assert_same(got, full[name].narrow(dim, a, b - a))


@pytest.mark.parametrize("dim", [0, 1])
def test_narrow_nested_bands(ckpt, full, dim):
    """Narrowing a narrowed node composes (bands of bands), including empty ones."""
    root, _, nodes = ckpt
    cases = _cases(nodes)
    for name in ("dequant-origin", "cat-uneven-slices-dim0", "grouped-w1-fp8-tp", "transpose-of-cat"):
        node = cases[name]
        size = node.shape[dim]
        outer = narrow(node, dim, size // 5, size - size // 7)
        for a, b in [(0, 1), (3, outer.shape[dim] - 2), (outer.shape[dim], outer.shape[dim])]:
            got = materialize(narrow(outer, dim, a, b), root)
            assert_same(got, full[name].narrow(dim, size // 5 + a, b - a))


def test_data_matches_what_was_written(ckpt, full):
    _, tensors, _ = ckpt
    assert_same(full["read-bf16"], tensors["bf"])
    assert_same(full["read-fp8"], tensors["w8"])
    assert_same(full["cat-dim1"], torch.cat([tensors["bf"], tensors["bf2"]], 1))


def _reads(node: Node) -> list[ReadArg]:
    return [n.arg for n in toposort([node]) if n.op is Op.READ]


def test_narrow_read_dim0_reads_fewer_rows(ckpt):
    _, _, nodes = ckpt
    w = nodes["bf"]
    band = narrow(w, 0, 10, 25)
    assert band.op is Op.READ and band.arg.rows == (10, 25) and band.shape == (15, N)
    assert band.arg.offset == w.arg.offset
    again = narrow(band, 0, 5, 6)
    assert again.op is Op.READ and again.arg.rows == (15, 16)


@pytest.mark.parametrize("name", ["cast-up", "slice", "chunk-dim0", "dequant", "view-rows-merge"])
def test_narrow_dim0_never_reads_whole_tensor(ckpt, name):
    """A band reads fewer bytes of each source than the source holds (a view of a read may become a read
    of those bytes under another shape, so bytes are what is compared)."""
    _, _, nodes = ckpt
    node = _cases(nodes)[name]
    stored = {n.arg.tensor: n.nbytes for n in toposort([node]) if n.op is Op.READ}
    for n in toposort([narrow(node, 0, 3, 9)]):
        if n.op is Op.READ:
            assert n.nbytes < stored[n.arg.tensor], f"{name}: whole read of {n.arg.tensor}"


def test_narrow_view_of_read_reads_the_band_bytes(ckpt):
    """Rows of a view of a read are a read of exactly those bytes, even off the stored rows' boundaries."""
    _, _, nodes = ckpt
    w = nodes["bf"]                                   # [M, N] stored row-major
    flat = view(w, (w.shape[0] * w.shape[1] // 3, 3))  # rows of 3 elements: cut through stored rows
    band = narrow(flat, 0, 7, 20)
    itemsize = 2
    assert band.op is Op.READ and band.shape == (13, 3)
    assert band.arg.offset == w.arg.offset + 7 * 3 * itemsize


def test_narrow_transpose_dim1_reads_rows(ckpt):
    _, _, nodes = ckpt
    out = narrow(transpose(nodes["bf"]), 1, 40, 60)
    assert [a.rows for a in _reads(out)] == [(40, 60)]


def test_narrow_dequant_dim0_narrows_scale_read():
    w = read("f", "w", "float8_e4m3fn", (300, 200), offset=1000)
    s = read("f", "s", "float32", (3, 2), offset=0)
    band = narrow(dequant_fp8_block(w, s, block=(128, 128)), 0, 130, 140)
    assert band.op is Op.DEQUANT_FP8_BLOCK
    wn, sn = band.src
    assert wn.op is Op.READ and wn.arg.rows == (130, 140)
    assert sn.op is Op.READ and sn.arg.rows == (1, 2)
    assert band.arg.origin == (2, 0)
    # a band crossing a block boundary needs both scale rows
    wide = narrow(dequant_fp8_block(w, s, block=(128, 128)), 0, 120, 260)
    assert wide.src[1].arg.rows == (0, 3) and wide.arg.origin == (120, 0)


def test_narrow_dequant_dim1_slices_covering_scale_blocks():
    w = read("f", "w", "float8_e4m3fn", (300, 200), offset=1000)
    s = read("f", "s", "float32", (3, 2), offset=0)
    out = narrow(dequant_fp8_block(w, s, block=(128, 128)), 1, 130, 150)
    wn, sn = out.src
    assert out.arg.origin == (0, 2)
    assert sn.shape == (3, 1) and sn.op is Op.SLICE and sn.arg.offsets == (0, 1)
    assert wn.op is Op.SLICE and wn.src[0] == w  # rows are stored whole: slice the unrestricted read


def test_narrow_column_of_read_keeps_read_key():
    w = r((8, 6))
    out = narrow(w, 1, 2, 4)
    assert out.op is Op.SLICE and out.src[0] is w


def test_narrow_full_range_is_identity_and_bad_range_raises():
    w = r((8, 6))
    c = cast(w, "float32")
    assert narrow(c, 0, 0, 8) is c
    for dim, a, b in [(0, 3, 2), (0, 0, 9), (1, -1, 2)]:
        with pytest.raises(ValueError):
            narrow(c, dim, a, b)


def test_narrow_cat_drops_parts_outside_range():
    a, b, c = r((4, 6)), r((5, 6), tensor="u"), r((3, 6), tensor="v")
    out = narrow(cat([a, b, c], 0), 0, 5, 8)
    assert out.op is Op.READ and out.arg.tensor == "u" and out.arg.rows == (1, 4)
    out = narrow(cat([a, b, c], 0), 0, 2, 10)
    assert out.op is Op.CAT and [p.arg.tensor for p in out.src] == ["t", "u", "v"]
    assert [p.arg.rows for p in out.src] == [(2, 4), (0, 5), (0, 1)]


# --- toposort ------------------------------------------------------------------------------------------------

def _check_topo(roots, order):
    pos = {n.key: i for i, n in enumerate(order)}
    assert len(pos) == len(order), "a node appears twice"
    for n in order:
        for s in n.src:
            assert pos[s.key] < pos[n.key]
    for rt in roots:
        assert rt.key in pos


def test_toposort_shared_graph():
    roots = _shared_graph()
    order = toposort(roots)
    _check_topo(roots, order)
    assert len(order) == 9  # read, 2 slices, cat, cast, 2 transposes, cat, view


@SETTINGS
@given(random_graph())
def test_toposort_random(roots):
    order = toposort(roots)
    _check_topo(roots, order)
    # every reachable node is listed
    stack, seen = list(roots), set()
    while stack:
        n = stack.pop()
        if n.key not in seen:
            seen.add(n.key)
            stack.extend(n.src)
    assert seen == {n.key for n in order}


def test_toposort_deep_chain():
    x = r((64, 4))
    for i in range(5000):
        x = cast(x, "float32") if i % 2 == 0 else slice_(cast(x, "bfloat16"), (1, 0), (x.shape[0] - 1, 4)) \
            if x.shape[0] > 1 else cast(x, "bfloat16")
    order = toposort([x])
    assert order[0].op is Op.READ and order[-1] is x
    assert len(order) == len({n.key for n in order}) >= 5000
    _check_topo([x], order)
    obj = graph_to_json([x])
    assert graph_from_json(obj)[0].key == x.key


@pytest.mark.parametrize("name, dim", [("read-bf16", 0), ("read-fp8", 1), ("cat-dim0", 0), ("cat-dim1", 1),
                                       ("dequant", 0), ("grouped-w1", 1)])
def test_narrow_empty_range(ckpt, name, dim):
    root, _, nodes = ckpt
    node = _cases(nodes)[name]
    for a in (0, 1, node.shape[dim]):
        out = narrow(node, dim, a, a)
        assert out.shape[dim] == 0 and out.dtype == node.dtype
        got = materialize(out, root)
        assert tuple(got.shape) == out.shape


def test_push_slices_reads_only_the_sliced_bytes(ckpt, full):
    """A slice of a view of a read (an expert of a grouped stack) becomes a read of that expert's bytes, with
    the same values; sub-graphs shared by two slices stay shared."""
    from streamconv.graph.rewrite import push_slices

    root, _, nodes = ckpt
    w = nodes["bf"]
    rows, cols = w.shape
    stacked = view(w, (rows * cols // 6, 6))
    piece = transpose(slice_(stacked, (6, 0), (5, 6)))
    pushed = push_slices(piece)
    reads = [n for n in toposort([pushed]) if n.op is Op.READ]
    assert len(reads) == 1 and reads[0].nbytes == 5 * 6 * 2
    assert_same(materialize(pushed, root), materialize(piece, root))
    memo = {}
    a, b = push_slices(cat([piece, piece], 0), memo), push_slices(piece, memo)
    assert a.src[0] is b
