"""The LoRA merge and QLoRA NF4 ops: their argument types, shape/dtype rules and constructors.

Part of the closed op set of :mod:`streamconv.graph.node` (the :class:`~streamconv.graph.node.Op` members
``merge_lora`` and ``nf4_*``); kept in their own module so that node.py stays small, and registered into its
``ARG_TYPES`` and ``RULES`` tables when node.py is imported.  Kernels: :mod:`streamconv.execute.lora` and
:mod:`streamconv.execute.nf4`; push-down rules: :mod:`streamconv.graph.rewrite`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from .node import ARG_TYPES, RULES, Node, Op, Shape, _arity, _fail, make


@dataclass(frozen=True)
class MergeLoraArg:
    """``out = W + dtype(float32(left) @ float32(right)) * (alpha / rank)``, added in W's dtype (torch's ops in
    that order: MindSpeed's merge arithmetic, spec §5.2).  ``left`` is [rows, k], ``right`` [k, cols]: LoRA's B
    and A for a linear weight [out, in], or a grouped-GEMM expert's A and B (its weights are [in, out]).

    ``alpha`` is the number as the user wrote it (``"16"``, ``"0.5"``), so the scale is Python's
    ``float(alpha) / rank``, the very float the reference multiplies by.  Each output element depends only on
    its own row of ``left`` and column of ``right``: bands of rows or columns narrow the factors the same way.
    """

    alpha: str
    rank: int


@dataclass(frozen=True)
class NF4Arg:
    """bitsandbytes NF4 over the row-major elements of a 2-D tensor, in blocks of ``blocksize`` elements.

    ``origin``: how many elements of the first block precede this tensor's element [0, 0] (a band of rows of a
    larger tensor starts inside a block when its width is not a multiple of the block).  ``layout``: the byte
    order of the packed codes, ``"cuda"`` (element 2i in the high nibble, code = index in the ascending NF4
    table: bitsandbytes' CUDA and CPU order) or ``"npu"`` (element 2i in the low nibble, code = (index + 8) mod
    16: the Ascend backend's order).  ``nf4_absmax`` ignores ``layout``; ``nf4_dequant`` gives ``dtype`` rows of
    ``cols`` elements.
    """

    blocksize: int
    origin: int
    layout: str = "cuda"
    dtype: str = "bfloat16"
    cols: int = 0


@dataclass(frozen=True)
class NF4NestedArg:
    """Double quantization of a float32 absmax vector (bitsandbytes ``compress_statistics``): ``offset`` =
    mean(absmax), then blockwise 8-bit quantization of ``absmax - offset`` in blocks of ``blocksize`` with the
    dynamic map.  ``part``: ``"codes"`` (uint8, one per absmax) or ``"scales"`` (float32, the max |absmax -
    offset| of each block)."""

    part: str
    blocksize: int


@dataclass(frozen=True)
class NF4TableArg:
    """``name``: ``"nf4"`` (the 16 ascending NF4 values) or ``"dynamic"`` (bitsandbytes' signed 8-bit dynamic
    map, 256 values)."""

    name: str


@dataclass(frozen=True)
class NF4StateArg:
    """The ``quant_state.bitsandbytes__nf4`` entry: UTF-8 JSON of ``{quant_type, blocksize, dtype, shape,
    nested_blocksize, nested_dtype, nested_offset}`` as bitsandbytes packs it, the offset computed from the
    absmax source (its mean), then padded with spaces to ``width`` bytes so the shape is known before the data
    (JSON readers ignore the trailing spaces)."""

    shape: Shape
    dtype: str
    blocksize: int
    nested_blocksize: int
    width: int


@dataclass(frozen=True)
class NF4ScalesArg:
    """The float32 block absmax of a double-quantized NF4 weight: ``dynamic[codes[i]] * scales[i // b] +
    offset`` (``b`` = ``nested_blocksize``; ``offset`` = ``nested_offset`` of the quant-state JSON source), with
    bitsandbytes' float32 operations in that order."""

    nested_blocksize: int


FLOATS = ("bfloat16", "float16", "float32")
NF4_LAYOUTS = ("cuda", "npu")
NF4_TABLE_SIZES = {"nf4": 16, "dynamic": 256}


def _rule_merge_lora(src, a: MergeLoraArg):
    w, left, right = _arity(Op.MERGE_LORA, src, 3, a)
    if any(x.dtype not in FLOATS or len(x.shape) != 2 for x in src):
        raise _fail(Op.MERGE_LORA, f"weight and factors must be 2-D {'/'.join(FLOATS)} tensors", src, a)
    if left.shape[0] != w.shape[0] or right.shape[1] != w.shape[1] or left.shape[1] != right.shape[0]:
        raise _fail(Op.MERGE_LORA, "factors must be [rows, k] and [k, cols] of the weight", src, a)
    if a.rank < 1:
        raise _fail(Op.MERGE_LORA, "rank must be positive", src, a)
    try:
        scale = float(a.alpha)
    except ValueError:
        scale = math.nan
    if not math.isfinite(scale):
        raise _fail(Op.MERGE_LORA, f"alpha {a.alpha!r} is not a finite number", src, a)
    return w.dtype, w.shape


def nf4_blocks(origin: int, numel: int, blocksize: int) -> int:
    """Blocks covering ``numel`` elements that start ``origin`` elements into their first block."""
    return -(-(origin + numel) // blocksize) if numel else 0


def _check_nf4_geometry(op, src, a: NF4Arg):
    if a.blocksize < 2 or a.blocksize % 2 or not 0 <= a.origin < a.blocksize:
        raise _fail(op, "blocksize must be even and positive, origin inside the first block", src, a)
    if a.layout not in NF4_LAYOUTS:
        raise _fail(op, f"layout must be one of {NF4_LAYOUTS}", src, a)


def _rule_nf4_absmax(src, a: NF4Arg):
    (x,) = _arity(Op.NF4_ABSMAX, src, 1, a)
    _check_nf4_geometry(Op.NF4_ABSMAX, src, a)
    if x.dtype not in FLOATS or len(x.shape) != 2:
        raise _fail(Op.NF4_ABSMAX, f"data must be a 2-D {'/'.join(FLOATS)} tensor", src, a)
    return "float32", (nf4_blocks(a.origin, math.prod(x.shape), a.blocksize),)


def _rule_nf4_quant(src, a: NF4Arg):
    x, absmax = _arity(Op.NF4_QUANT, src, 2, a)
    _check_nf4_geometry(Op.NF4_QUANT, src, a)
    if x.dtype not in FLOATS or len(x.shape) != 2:
        raise _fail(Op.NF4_QUANT, f"data must be a 2-D {'/'.join(FLOATS)} tensor", src, a)
    n = math.prod(x.shape)
    if n % 2 or a.origin % 2:
        raise _fail(Op.NF4_QUANT, "codes pack two per byte: the element count and origin must be even", src, a)
    if absmax.dtype != "float32" or absmax.shape != (nf4_blocks(a.origin, n, a.blocksize),):
        raise _fail(Op.NF4_QUANT, f"absmax must be float32[{nf4_blocks(a.origin, n, a.blocksize)}]", src, a)
    return "uint8", (n // 2, 1)


def _rule_nf4_nested(src, a: NF4NestedArg):
    (absmax,) = _arity(Op.NF4_NESTED, src, 1, a)
    if absmax.dtype != "float32" or len(absmax.shape) != 1 or a.blocksize < 1:
        raise _fail(Op.NF4_NESTED, "absmax must be a 1-D float32 tensor, blocksize positive", src, a)
    n = absmax.shape[0]
    if a.part == "codes":
        return "uint8", (n,)
    if a.part == "scales":
        return "float32", (-(-n // a.blocksize),)
    raise _fail(Op.NF4_NESTED, "part must be 'codes' or 'scales'", src, a)


def _rule_nf4_table(src, a: NF4TableArg):
    _arity(Op.NF4_TABLE, src, 0, a)
    if a.name not in NF4_TABLE_SIZES:
        raise _fail(Op.NF4_TABLE, f"name must be one of {sorted(NF4_TABLE_SIZES)}", src, a)
    return "float32", (NF4_TABLE_SIZES[a.name],)


def nf4_state_json(shape, dtype: str, blocksize: int, nested_blocksize: int, offset: float) -> str:
    """bitsandbytes' packed quant state (``QuantState.as_dict(packed=True)``'s non-tensor items, in its order)."""
    return json.dumps({"quant_type": "nf4", "blocksize": blocksize, "dtype": dtype, "shape": list(shape),
                       "nested_blocksize": nested_blocksize, "nested_dtype": "float32", "nested_offset": offset})


def nf4_state_width(shape, dtype: str, blocksize: int, nested_blocksize: int) -> int:
    """Bytes that hold the quant-state JSON whatever the offset (the longest repr of a double is 24 chars)."""
    return len(nf4_state_json(shape, dtype, blocksize, nested_blocksize, -2.2250738585072014e-308).encode())


def _rule_nf4_state(src, a: NF4StateArg):
    (absmax,) = _arity(Op.NF4_STATE, src, 1, a)
    if absmax.dtype != "float32" or len(absmax.shape) != 1:
        raise _fail(Op.NF4_STATE, "absmax must be a 1-D float32 tensor", src, a)
    if a.dtype not in FLOATS or a.width < nf4_state_width(a.shape, a.dtype, a.blocksize, a.nested_blocksize):
        raise _fail(Op.NF4_STATE, "dtype must be a float dtype and width hold the JSON with any offset", src, a)
    return "uint8", (a.width,)


def _rule_nf4_scales(src, a: NF4ScalesArg):
    codes, scales, dynamic, state = _arity(Op.NF4_SCALES, src, 4, a)
    n = codes.shape[0] if len(codes.shape) == 1 else -1
    if (codes.dtype != "uint8" or n < 0 or a.nested_blocksize < 1
            or scales.dtype != "float32" or scales.shape != (-(-n // a.nested_blocksize),)
            or dynamic.dtype != "float32" or dynamic.shape != (256,)
            or state.dtype != "uint8" or len(state.shape) != 1):
        raise _fail(Op.NF4_SCALES, "expected uint8 codes [n], float32 scales [ceil(n / nested_blocksize)], the "
                                   "float32 [256] dynamic map and the uint8 quant-state JSON", src, a)
    return "float32", (n,)


def _rule_nf4_dequant(src, a: NF4Arg):
    data, absmax, table = _arity(Op.NF4_DEQUANT, src, 3, a)
    _check_nf4_geometry(Op.NF4_DEQUANT, src, a)
    if data.dtype != "uint8" or len(data.shape) != 2 or data.shape[1] != 1:
        raise _fail(Op.NF4_DEQUANT, "data must be packed uint8 [n / 2, 1]", src, a)
    n = 2 * data.shape[0]
    if a.cols < 1 or n % a.cols or a.origin % 2 or a.dtype not in FLOATS:
        raise _fail(Op.NF4_DEQUANT, "cols must divide the element count, origin be even, dtype a float", src, a)
    if absmax.dtype != "float32" or absmax.shape != (nf4_blocks(a.origin, n, a.blocksize),):
        raise _fail(Op.NF4_DEQUANT, f"absmax must be float32[{nf4_blocks(a.origin, n, a.blocksize)}]", src, a)
    if table.dtype != "float32" or table.shape != (16,):
        raise _fail(Op.NF4_DEQUANT, "the code table must be float32[16]", src, a)
    return a.dtype, (n // a.cols, a.cols)


ARG_TYPES.update({
    Op.MERGE_LORA: MergeLoraArg,
    Op.NF4_ABSMAX: NF4Arg,
    Op.NF4_QUANT: NF4Arg,
    Op.NF4_NESTED: NF4NestedArg,
    Op.NF4_TABLE: NF4TableArg,
    Op.NF4_STATE: NF4StateArg,
    Op.NF4_SCALES: NF4ScalesArg,
    Op.NF4_DEQUANT: NF4Arg,
})
RULES.update({
    Op.MERGE_LORA: _rule_merge_lora,
    Op.NF4_ABSMAX: _rule_nf4_absmax,
    Op.NF4_QUANT: _rule_nf4_quant,
    Op.NF4_NESTED: _rule_nf4_nested,
    Op.NF4_TABLE: _rule_nf4_table,
    Op.NF4_STATE: _rule_nf4_state,
    Op.NF4_SCALES: _rule_nf4_scales,
    Op.NF4_DEQUANT: _rule_nf4_dequant,
})
def merge_lora(w: Node, left: Node, right: Node, *, alpha: str, rank: int) -> Node:
    """``w + dtype(float32(left) @ float32(right)) * (alpha / rank)`` (see :class:`MergeLoraArg`); for a linear
    weight ``left`` is LoRA's B and ``right`` its A."""
    return make(Op.MERGE_LORA, (w, left, right), MergeLoraArg(str(alpha), rank))


def nf4_absmax(x: Node, *, blocksize: int, origin: int = 0) -> Node:
    return make(Op.NF4_ABSMAX, (x,), NF4Arg(blocksize, origin))


def nf4_quant(x: Node, absmax: Node, *, blocksize: int, origin: int = 0, layout: str = "cuda") -> Node:
    return make(Op.NF4_QUANT, (x, absmax), NF4Arg(blocksize, origin, layout))


def nf4_nested(absmax: Node, part: str, *, blocksize: int) -> Node:
    return make(Op.NF4_NESTED, (absmax,), NF4NestedArg(part, blocksize))


def nf4_table(name: str) -> Node:
    return make(Op.NF4_TABLE, (), NF4TableArg(name))


def nf4_state(absmax: Node, *, shape: Shape, dtype: str, blocksize: int, nested_blocksize: int) -> Node:
    width = nf4_state_width(shape, dtype, blocksize, nested_blocksize)
    return make(Op.NF4_STATE, (absmax,), NF4StateArg(tuple(shape), dtype, blocksize, nested_blocksize, width))


def nf4_scales(codes: Node, scales: Node, dynamic: Node, state: Node, *, nested_blocksize: int) -> Node:
    return make(Op.NF4_SCALES, (codes, scales, dynamic, state), NF4ScalesArg(nested_blocksize))


def nf4_dequant(data: Node, absmax: Node, table: Node, *, blocksize: int, cols: int, origin: int = 0,
                layout: str = "cuda", dtype: str = "bfloat16") -> Node:
    return make(Op.NF4_DEQUANT, (data, absmax, table), NF4Arg(blocksize, origin, layout, dtype, cols))

