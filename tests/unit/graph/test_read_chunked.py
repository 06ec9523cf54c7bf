"""The ``read_chunked`` op: shape rule, JSON form, narrow() push-down on every dim, and its kernel on a real store
(the format object reads; the executor only dispatches)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from streamconv.errors import GraphError
from streamconv.execute.kernels import materialize
from streamconv.graph.codec import graph_from_json, graph_to_json
from streamconv.graph.node import Op, cast, cat, read_chunked, slice_, transpose, view
from streamconv.graph.rewrite import narrow, push_slices
from streamconv.storage.zarr_store import Codec, array_json
from tests.zarr_arrays import tensor, write_array


def node(**kw):
    args = dict(offsets=None, lengths=None) | kw
    return read_chunked("w", "model.w", "zarr", "bfloat16", (512, 384), **args)


def test_shape_rule():
    assert node().shape == (512, 384) and node().dtype == "bfloat16"
    assert node(offsets=(128, 0), lengths=(10, 384)).shape == (10, 384)
    with pytest.raises(GraphError, match=r"range \[500, 520\) outside \[0, 512\]"):
        node(offsets=(500, 0), lengths=(20, 1))
    with pytest.raises(GraphError, match="one entry per dim"):
        node(offsets=(0,), lengths=(1,))
    with pytest.raises(GraphError, match="unknown dtype"):
        read_chunked("w", "w", "zarr", "bf16", (2,))


def test_json_round_trip():
    roots = [node(offsets=(1, 2), lengths=(3, 4)), cast(node(), "float32")]
    again = graph_from_json(graph_to_json(roots))
    assert [n.key for n in again] == [n.key for n in roots]
    assert again[0].arg.offsets == (1, 2) and again[0].op is Op.READ_CHUNKED


def test_narrow_reaches_the_read_on_every_dim():
    x = node()
    assert narrow(x, 1, 100, 200) == node(offsets=(0, 100), lengths=(512, 100))
    y = narrow(narrow(x, 0, 128, 256), 1, 10, 20)
    assert y == node(offsets=(128, 10), lengths=(128, 10))
    # through a transpose and a cat: each part's read shrinks to what the band needs
    t = narrow(transpose(x), 0, 5, 7)
    assert t.src[0] == node(offsets=(0, 5), lengths=(512, 2))
    c = narrow(cat([x, x], 1), 1, 380, 390)
    assert [p.arg.offsets for p in c.src] == [(0, 380), (0, 0)]
    assert push_slices(slice_(x, (1, 2), (3, 4))) == node(offsets=(1, 2), lengths=(3, 4))


def test_kernel_reads_through_the_format(tmp_path):
    t = tensor((512, 384), seed=9)
    write_array(str(tmp_path), "w", t, chunk=(128, 128), shard=(256, 384), codec="zstd")
    band = narrow(narrow(node(), 0, 200, 300), 1, 130, 250)
    got = materialize(band, str(tmp_path))
    assert torch.equal(got.view(torch.int16), t[200:300, 130:250].view(torch.int16))


def test_an_element_of_a_stack_narrows_to_a_region_on_every_dim():
    """Expert j of a stacked array is ``view(read_chunked(..., [j:j+1]), element shape)``: a band of it, rows or
    columns, must still reach the read (a TP rank reads its share of the expert's chunks, nothing more)."""
    stack = read_chunked("s", "e3", "zarr", "float8_e4m3fn", (8, 256, 384), offsets=(3, 0, 0),
                         lengths=(1, 256, 384))
    x = view(stack, (256, 384))
    rows = narrow(x, 0, 128, 256)
    assert rows.op is Op.VIEW and rows.shape == (128, 384)
    assert rows.src[0].arg.offsets == (3, 128, 0) and rows.src[0].arg.lengths == (1, 128, 384)
    cols = narrow(narrow(x, 1, 200, 300), 0, 10, 20)
    assert cols.shape == (10, 100)
    assert cols.src[0].op is Op.READ_CHUNKED
    assert cols.src[0].arg.offsets == (3, 10, 200) and cols.src[0].arg.lengths == (1, 10, 100)
    # any other view of a chunked read keeps its old rule (rows of whole source rows only)
    flat = view(read_chunked("w", "w", "zarr", "bfloat16", (4, 6)), (8, 3))
    assert narrow(flat, 1, 0, 1).op is Op.SLICE


def test_kernel_reads_an_element_of_a_stack(tmp_path):
    t = tensor((4, 256, 384), dtype=torch.float32, seed=3)
    with open(tmp_path / "zarr.json", "w") as f:
        f.write('{"zarr_format": 3, "node_type": "group", "attributes": {}}\n')
    (tmp_path / "s").mkdir()
    with open(tmp_path / "s" / "zarr.json", "w") as f:
        f.write(array_json((4, 256, 384), "float32", (2, 256, 384), (1, 128, 128), Codec("zstd")))
    zarr.open_array(str(tmp_path / "s"), mode="r+")[...] = t.numpy()    # zarr-python writes the shards
    x = view(read_chunked("s", "e2", "zarr", "float32", (4, 256, 384), offsets=(2, 0, 0), lengths=(1, 256, 384)),
             (256, 384))
    got = materialize(narrow(narrow(x, 1, 100, 300), 0, 50, 130), str(tmp_path))
    assert np.array_equal(got.numpy(), t[2, 50:130, 100:300].numpy())
