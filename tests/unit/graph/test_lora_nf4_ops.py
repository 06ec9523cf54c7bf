"""The LoRA merge and NF4 ops as graph nodes: shape/dtype rules, JSON round trip, and ``narrow`` push-down checked
bit for bit against narrowing the materialised value (hypothesis), on real safetensors data."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamconv.errors import GraphError
from streamconv.execute.kernels import materialize
from streamconv.graph.codec import graph_from_json, graph_to_json
from streamconv.graph.lora_ops import (merge_lora, nf4_absmax, nf4_dequant, nf4_nested, nf4_quant, nf4_scales,
                                       nf4_state, nf4_table)
from streamconv.graph.node import Op, cat, read, slice_, toposort, view
from streamconv.graph.rewrite import narrow
from tests.st_file import write_with_reads

SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def r(shape, dtype="bfloat16", tensor="t"):
    return read("f.safetensors", tensor, dtype, shape, offset=0)


VALID = [
    ("merge", lambda: merge_lora(r((6, 5)), r((6, 2)), r((2, 5)), alpha="16", rank=2), "bfloat16", (6, 5)),
    ("merge-f32-factors", lambda: merge_lora(r((6, 5), "float16"), r((6, 3), "float32"), r((3, 5), "float32"),
                                             alpha="0.5", rank=3), "float16", (6, 5)),
    ("absmax", lambda: nf4_absmax(r((3, 48)), blocksize=64), "float32", (3,)),
    ("absmax-origin", lambda: nf4_absmax(r((3, 48)), blocksize=64, origin=40), "float32", (3,)),
    ("quant", lambda: nf4_quant(r((3, 48)), r((3,), "float32"), blocksize=64), "uint8", (72, 1)),
    ("nested-codes", lambda: nf4_nested(r((300,), "float32"), "codes", blocksize=256), "uint8", (300,)),
    ("nested-scales", lambda: nf4_nested(r((300,), "float32"), "scales", blocksize=256), "float32", (2,)),
    ("table-nf4", lambda: nf4_table("nf4"), "float32", (16,)),
    ("table-dynamic", lambda: nf4_table("dynamic"), "float32", (256,)),
    ("state", lambda: nf4_state(r((3,), "float32"), shape=(3, 64), dtype="bfloat16", blocksize=64,
                                nested_blocksize=256), "uint8", None),
    ("scales", lambda: nf4_scales(r((3,), "uint8"), r((1,), "float32"), r((256,), "float32"), r((170,), "uint8"),
                                  nested_blocksize=256), "float32", (3,)),
    ("dequant", lambda: nf4_dequant(r((96, 1), "uint8"), r((3,), "float32"), r((16,), "float32"), blocksize=64,
                                    cols=48), "bfloat16", (4, 48)),
]


@pytest.mark.parametrize("name,build,dtype,shape", VALID, ids=[v[0] for v in VALID])
def test_rule_valid(name, build, dtype, shape):
    node = build()
    assert node.dtype == dtype and (shape is None or node.shape == shape)


INVALID = [
    lambda: merge_lora(r((6, 5)), r((5, 2)), r((2, 5)), alpha="16", rank=2),              # B rows != W rows
    lambda: merge_lora(r((6, 5)), r((6, 2)), r((3, 5)), alpha="16", rank=2),              # inner dims differ
    lambda: merge_lora(r((6, 5)), r((6, 2)), r((2, 5)), alpha="nan", rank=2),
    lambda: merge_lora(r((6, 5)), r((6, 2)), r((2, 5)), alpha="16", rank=0),
    lambda: merge_lora(r((6, 5), "uint8"), r((6, 2)), r((2, 5)), alpha="16", rank=2),
    lambda: nf4_absmax(r((3, 48)), blocksize=64, origin=64),
    lambda: nf4_quant(r((3, 47)), r((3,), "float32"), blocksize=64),                       # odd element count
    lambda: nf4_quant(r((3, 48)), r((2,), "float32"), blocksize=64),                       # wrong absmax length
    lambda: nf4_quant(r((3, 48)), r((3,), "float32"), blocksize=64, layout="tpu"),
    lambda: nf4_nested(r((300,), "float32"), "both", blocksize=256),
    lambda: nf4_table("fp4"),
    lambda: nf4_dequant(r((96, 1), "uint8"), r((3,), "float32"), r((16,), "float32"), blocksize=64, cols=50),
    lambda: nf4_dequant(r((96, 1), "uint8"), r((3,), "float32"), r((15,), "float32"), blocksize=64, cols=48),
]


@pytest.mark.parametrize("build", INVALID)
def test_rule_invalid(build):
    with pytest.raises(GraphError):
        build()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_nf4")
    g = torch.Generator().manual_seed(0)
    tensors = {
        "w": torch.randn(30, 50, generator=g).to(torch.bfloat16),
        "b": torch.randn(30, 4, generator=g).to(torch.bfloat16),
        "a": torch.randn(4, 50, generator=g).to(torch.bfloat16),
        "x": (torch.randn(37, 48, generator=g) * 0.1).to(torch.bfloat16),    # blocks straddle rows
        "y": (torch.randn(20, 130, generator=g) * 0.1).to(torch.bfloat16),
        "stack": torch.randn(4 * 6, 10, generator=g).to(torch.bfloat16),      # a GEMM-like [n*H, C] stack
        "sa": torch.randn(4 * 6, 2, generator=g).to(torch.bfloat16),
        "sb": torch.randn(4 * 2, 10, generator=g).to(torch.bfloat16),
    }
    return str(root), write_with_reads(str(root), "a.safetensors", tensors)


def cases(n):
    out = {"merge": merge_lora(n["w"], n["b"], n["a"], alpha="16", rank=4)}
    parts = [merge_lora(slice_(n["stack"], (6 * q, 0), (6, 10)), slice_(n["sa"], (6 * q, 0), (6, 2)),
                        slice_(n["sb"], (2 * q, 0), (2, 10)), alpha="3", rank=2) for q in range(4)]
    out["merge-gemm-stack"] = view(view(cat(parts, 0), (6, 40)), (24, 10))   # a view of a view, as ungroup sees it
    for name, x in (("x", n["x"]), ("y", n["y"])):
        am = nf4_absmax(x, blocksize=64)
        q = nf4_quant(x, am, blocksize=64, layout="npu")
        sc = nf4_scales(nf4_nested(am, "codes", blocksize=256), nf4_nested(am, "scales", blocksize=256),
                        nf4_table("dynamic"), nf4_state(am, shape=x.shape, dtype="bfloat16", blocksize=64,
                                                        nested_blocksize=256), nested_blocksize=256)
        out[f"absmax-{name}"] = am
        out[f"quant-{name}"] = q
        out[f"dequant-{name}"] = nf4_dequant(q, sc, nf4_table("nf4"), blocksize=64, cols=x.shape[1], layout="npu")
    rows, cols = n["x"].shape
    out["dequant-viewed"] = view(out["dequant-x"], (rows * cols // 24, 24))   # an expert view of a NF4 stack
    return out


@pytest.fixture(scope="module")
def full(ckpt):
    root, nodes = ckpt
    return {k: materialize(v, root) for k, v in cases(nodes).items()}


def bits(t):
    return t.contiguous().view(-1).view(torch.uint8)


@SETTINGS
@given(data=st.data())
def test_narrow_equals_narrowing_the_value(ckpt, full, data):
    root, nodes = ckpt
    name = data.draw(st.sampled_from(sorted(full)), label="case")
    node = cases(nodes)[name]
    dim = data.draw(st.integers(0, len(node.shape) - 1), label="dim")
    a = data.draw(st.integers(0, node.shape[dim]), label="start")
    b = data.draw(st.integers(a, node.shape[dim]), label="stop")
    got = materialize(narrow(node, dim, a, b), root)
    assert torch.equal(bits(got), bits(full[name].narrow(dim, a, b - a)))


def test_narrowed_merge_and_dequant_read_only_their_rows(ckpt):
    """A band of a merge reads that band of W and B (and A whole); a band of dequantized rows reads only the
    packed bytes of those rows; a band of a merged GEMM stack reads only the experts it covers."""
    _, n = ckpt
    c = cases(n)
    reads = {x.arg.tensor: x.arg.rows for x in toposort([narrow(c["merge"], 0, 3, 9)]) if x.op is Op.READ}
    assert reads == {"w": (3, 9), "b": (3, 9), "a": (0, 4)}
    deq = narrow(c["dequant-x"], 0, 10, 12)
    packed = [x.arg.rows for x in toposort([deq]) if x.op is Op.READ and x.arg.tensor == "x"]
    assert all(hi - lo <= 3 * 48 for lo, hi in packed)     # rows of x re-read for absmax/quant, never all 37
    stack = [x.arg.rows for x in toposort([narrow(c["merge-gemm-stack"], 0, 7, 11)])
             if x.op is Op.READ and x.arg.tensor == "stack"]
    assert stack and all(hi - lo <= 6 for lo, hi in stack)
    viewed = narrow(c["dequant-viewed"], 0, 20, 22)
    assert not any(x.op is Op.SLICE and x.src[0].op is Op.VIEW for x in toposort([viewed]))


def test_json_round_trip():
    nodes = [merge_lora(r((6, 5)), r((6, 2)), r((2, 5)), alpha="16", rank=2),
             nf4_dequant(r((96, 1), "uint8"), r((3,), "float32"), nf4_table("nf4"), blocksize=64, cols=48,
                         layout="npu"),
             nf4_state(r((3,), "float32"), shape=(3, 64), dtype="bfloat16", blocksize=64, nested_blocksize=256)]
    back = graph_from_json(graph_to_json(nodes))
    assert [x.key for x in back] == [x.key for x in nodes]
