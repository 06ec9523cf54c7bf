"""Graph nodes: the closed op set, per-op argument types and the shape/dtype rules.

Each op has one frozen argument dataclass and one rule in :data:`RULES`, which checks the sources and
returns the output ``(dtype, shape)``.  Adding an op means adding an :class:`Op` member, its argument type,
its rule, its kernel (``streamconv.execute.kernels``) and its tests, in one change.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from enum import Enum
from functools import cached_property
from typing import Callable

from .. import types
from ..errors import GraphError

Shape = tuple[int, ...]


class Op(str, Enum):
    READ = "read"                    # bytes of a tensor (or a band of its rows) at a byte offset of a source file
    SLICE = "slice"                  # a hypercube: offsets/lengths per dim
    CAT = "cat"                      # concatenation along one dim
    VIEW = "view"                    # reinterpret the row-major element order as another shape
    TRANSPOSE = "transpose"          # swap two dims
    CAST = "cast"                    # dtype conversion (round-to-nearest-even as torch does)
    DEQUANT_FP8_BLOCK = "dequant_fp8_block"  # block-scaled FP8: float32(w) * scale_inv[block] -> dtype
    FP8_BLOCK_SCALE = "fp8_block_scale"      # per-block scale_inv = amax|x| / fp8_max (float32)
    QUANT_FP8_BLOCK = "quant_fp8_block"      # fp8(float32(x) / scale_inv[block]), the inverse of dequant
    MERGE_LORA = "merge_lora"                # W + dtype(float32(B) @ float32(A)) * (alpha / r): a LoRA merge
    NF4_ABSMAX = "nf4_absmax"                # float32 max|x| per block of the row-major elements (bitsandbytes NF4)
    NF4_QUANT = "nf4_quant"                  # NF4 codes of x, two per byte, with the exact block absmax
    NF4_NESTED = "nf4_nested"                # double quantization of the absmax (uint8 codes, or their scales)
    NF4_TABLE = "nf4_table"                  # a code table: the 16 NF4 values or bitsandbytes' 256-entry dynamic map
    NF4_STATE = "nf4_state"                  # the packed quant-state JSON (uint8), padded to a fixed width
    NF4_SCALES = "nf4_scales"                # block absmax back from the double quantization (float32)
    NF4_DEQUANT = "nf4_dequant"              # NF4 codes * block absmax -> dtype [rows, cols]
    READ_CHUNKED = "read_chunked"    # a hypercube of a tensor stored in chunks (zarr), read by its format object


READS = frozenset({Op.READ, Op.READ_CHUNKED})   # the ops that touch source files (no sources of their own)


# --- argument types -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ReadArg:
    """Bytes of tensor ``tensor`` stored row-major at absolute byte ``offset`` of source ``file``.

    ``shape`` is the stored tensor's full shape; ``rows`` (exclusive end) selects a band of dim 0, so a
    band is one contiguous positional read.  ``tensor`` is informational (errors, coverage, inspect).
    """

    file: str
    tensor: str
    dtype: str
    shape: Shape
    offset: int
    rows: tuple[int, int]


@dataclass(frozen=True)
class ChunkedReadArg:
    """Elements ``[offsets, offsets + lengths)`` of tensor ``tensor``, stored in chunks at ``file`` (relative to
    the source root: a zarr array's directory) in the registered format ``format``, whose ``read_region`` reads
    exactly the chunks the hypercube overlaps.  ``shape`` is the stored tensor's full shape, so a restriction
    on any dim is again one of these reads (see ``graph.rewrite``)."""

    file: str
    tensor: str
    format: str
    dtype: str
    shape: Shape
    offsets: Shape
    lengths: Shape


@dataclass(frozen=True)
class SliceArg:
    offsets: Shape
    lengths: Shape


@dataclass(frozen=True)
class CatArg:
    dim: int


@dataclass(frozen=True)
class ViewArg:
    shape: Shape


@dataclass(frozen=True)
class TransposeArg:
    dim0: int
    dim1: int


@dataclass(frozen=True)
class CastArg:
    dtype: str


@dataclass(frozen=True)
class DequantArg:
    """Block dequantization: ``out[r, c] = dtype(float32(w[r, c]) * s[(r + r0) // br, (c + c0) // bc])``.

    ``block`` = (br, bc).  ``origin`` = (r0, c0) places the data's element [0, 0] inside the first scale
    block, so a slice of a weight that cuts through a block still pairs every element with its own scale.
    """

    block: tuple[int, int]
    origin: tuple[int, int]
    dtype: str


@dataclass(frozen=True)
class BlockScaleArg:
    """Per-block scales for FP8 quantization: ``out[i, j] = amax(|float32(x[block i, j])|) / fp8_max``, float32.

    ``block`` = (br, bc); ``dtype`` is the fp8 format the scales are for (``fp8_max`` = 448 for float8_e4m3fn,
    57344 for float8_e5m2: the release recipe ``s = amax / 448``).  Blocks are counted from the data's element
    [0, 0]; edge blocks cover what exists.  An all-zero block has scale 0, which quantization maps to +0.

    With a second source ``prefer`` (float32, the output's shape; scales the values had before): a block keeps
    its ``prefer`` scale while its values still fit it, ``amax < keep_limit * prefer`` (quantizing with it
    rounds into range: ``keep_limit`` is 464 for float8_e4m3fn, 61440 for float8_e5m2, the midpoints above
    the largest finite values), and gets the fresh scale otherwise.  Unchanged weights keep their original
    scales exactly; weights that grew are never clipped.
    """

    block: tuple[int, int]
    dtype: str


@dataclass(frozen=True)
class QuantArg:
    """Block quantization: ``out[r, c] = dtype(float32(x[r, c]) / s[(r + r0) // br, (c + c0) // bc])``.

    ``origin`` = (r0, c0) as in :class:`DequantArg`.  The cast is torch's (round to nearest even;
    float8_e4m3fn saturates to +-448, inf included; float8_e5m2 overflows to inf; NaN stays NaN); where the
    scale is zero the output is +0.
    """

    block: tuple[int, int]
    origin: tuple[int, int]
    dtype: str


ARG_TYPES: dict[Op, type] = {
    Op.READ: ReadArg,
    Op.SLICE: SliceArg,
    Op.CAT: CatArg,
    Op.VIEW: ViewArg,
    Op.TRANSPOSE: TransposeArg,
    Op.CAST: CastArg,
    Op.DEQUANT_FP8_BLOCK: DequantArg,
    Op.FP8_BLOCK_SCALE: BlockScaleArg,
    Op.QUANT_FP8_BLOCK: QuantArg,
    Op.READ_CHUNKED: ChunkedReadArg,
}


# --- the node -------------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Node:
    """One operation of the lazy graph.  Build nodes with the constructor functions below, which check them."""

    op: Op
    src: tuple["Node", ...]
    arg: object
    dtype: str
    shape: Shape

    def __post_init__(self) -> None:
        # Hash at construction: sources are built first and already hold their keys, so computing a key
        # never recurses (a lazy key on a chain thousands of nodes deep overflowed the Python stack).
        self.key  # noqa: B018

    @cached_property
    def key(self) -> str:
        """Content hash of op, argument and sources: equal graphs have equal keys."""
        payload = json.dumps([self.op.value, arg_to_json(self.arg), [s.key for s in self.src]],
                             separators=(",", ":"), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:24]

    @property
    def nbytes(self) -> int:
        return types.nbytes(self.dtype, self.shape)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Node) and (self is other or self.key == other.key)

    def __hash__(self) -> int:
        return hash(self.key)

    def __repr__(self) -> str:
        return f"Node({self.op.value}, {self.dtype}{list(self.shape)}, key={self.key[:8]})"


def arg_to_json(arg: object) -> dict:
    return {f.name: _jsonable(getattr(arg, f.name)) for f in dataclasses.fields(arg)}


def _jsonable(v):
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    return v


def arg_from_json(op: Op, obj: dict) -> object:
    cls = ARG_TYPES[op]
    names = {f.name for f in dataclasses.fields(cls)}
    if set(obj) != names:
        raise GraphError(f"{op.value}: argument fields {sorted(obj)} (expected {sorted(names)})")
    return cls(**{k: _tupled(v) for k, v in obj.items()})


def _tupled(v):
    # Arguments hold only strings, integers and (nested) tuples of them: a float or bool from an edited plan
    # would hash differently from the integer it resembles and fail only when data is computed.
    if isinstance(v, list):
        return tuple(_tupled(x) for x in v)
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise GraphError(f"argument value {v!r} is not an integer or string")
    return v


# --- shape and dtype rules (one per op) ---------------------------------------------------------------------------

def _fail(op: Op, msg: str, src: tuple[Node, ...], arg: object) -> GraphError:
    shapes = ", ".join(f"{s.dtype}{list(s.shape)}" for s in src)
    return GraphError(f"{op.value}: {msg} (sources: [{shapes}], arg: {arg})")


def _rule_read(src, a: ReadArg):
    if src:
        raise _fail(Op.READ, "takes no sources", src, a)
    if a.dtype not in types.DTYPES:
        raise _fail(Op.READ, f"unknown dtype {a.dtype!r}", src, a)
    if not a.shape:
        if a.rows != (0, 1):
            raise _fail(Op.READ, "a 0-d tensor is read whole: rows must be (0, 1)", src, a)
        return a.dtype, ()
    r0, r1 = a.rows
    if not 0 <= r0 <= r1 <= a.shape[0]:
        raise _fail(Op.READ, f"rows {a.rows} outside [0, {a.shape[0]}]", src, a)
    return a.dtype, (r1 - r0,) + tuple(a.shape[1:])


def _rule_read_chunked(src, a: ChunkedReadArg):
    if src:
        raise _fail(Op.READ_CHUNKED, "takes no sources", src, a)
    if a.dtype not in types.DTYPES:
        raise _fail(Op.READ_CHUNKED, f"unknown dtype {a.dtype!r}", src, a)
    if len(a.offsets) != len(a.shape) or len(a.lengths) != len(a.shape):
        raise _fail(Op.READ_CHUNKED, "offsets/lengths must give one entry per dim of shape", src, a)
    for o, n, size in zip(a.offsets, a.lengths, a.shape):
        if o < 0 or n < 0 or o + n > size:
            raise _fail(Op.READ_CHUNKED, f"range [{o}, {o + n}) outside [0, {size}]", src, a)
    return a.dtype, tuple(a.lengths)


def _rule_slice(src, a: SliceArg):
    (x,) = _arity(Op.SLICE, src, 1, a)
    if len(a.offsets) != len(x.shape) or len(a.lengths) != len(x.shape):
        raise _fail(Op.SLICE, "offsets/lengths must give one entry per dim", src, a)
    for o, n, size in zip(a.offsets, a.lengths, x.shape):
        if o < 0 or n < 0 or o + n > size:
            raise _fail(Op.SLICE, f"range [{o}, {o + n}) outside [0, {size}]", src, a)
    return x.dtype, tuple(a.lengths)


def _rule_cat(src, a: CatArg):
    if not src:
        raise _fail(Op.CAT, "needs at least one source", src, a)
    first = src[0]
    if not 0 <= a.dim < len(first.shape):
        raise _fail(Op.CAT, f"dim {a.dim} out of range", src, a)
    for s in src[1:]:
        if s.dtype != first.dtype:
            raise _fail(Op.CAT, "sources differ in dtype", src, a)
        if len(s.shape) != len(first.shape) or any(
                d != a.dim and p != q for d, (p, q) in enumerate(zip(s.shape, first.shape))):
            raise _fail(Op.CAT, f"shapes differ outside dim {a.dim}", src, a)
    shape = list(first.shape)
    shape[a.dim] = sum(s.shape[a.dim] for s in src)
    return first.dtype, tuple(shape)


def _rule_view(src, a: ViewArg):
    (x,) = _arity(Op.VIEW, src, 1, a)
    if any(d < 0 for d in a.shape) or math.prod(a.shape) != math.prod(x.shape):
        raise _fail(Op.VIEW, f"cannot view {math.prod(x.shape)} elements as {list(a.shape)}", src, a)
    return x.dtype, tuple(a.shape)


def _rule_transpose(src, a: TransposeArg):
    (x,) = _arity(Op.TRANSPOSE, src, 1, a)
    n = len(x.shape)
    if not (0 <= a.dim0 < n and 0 <= a.dim1 < n):
        raise _fail(Op.TRANSPOSE, "dims out of range", src, a)
    shape = list(x.shape)
    shape[a.dim0], shape[a.dim1] = shape[a.dim1], shape[a.dim0]
    return x.dtype, tuple(shape)


def _rule_cast(src, a: CastArg):
    (x,) = _arity(Op.CAST, src, 1, a)
    if a.dtype not in types.DTYPES:
        raise _fail(Op.CAST, f"unknown dtype {a.dtype!r}", src, a)
    return a.dtype, x.shape


def _rule_dequant(src, a: DequantArg):
    w, s = _arity(Op.DEQUANT_FP8_BLOCK, src, 2, a)
    if w.dtype not in ("float8_e4m3fn", "float8_e5m2") or len(w.shape) != 2:
        raise _fail(Op.DEQUANT_FP8_BLOCK, "data must be a 2-D float8 tensor", src, a)
    if s.dtype != "float32" or len(s.shape) != 2:
        raise _fail(Op.DEQUANT_FP8_BLOCK, "scales must be a 2-D float32 tensor", src, a)
    (br, bc), (r0, c0) = a.block, a.origin
    if br <= 0 or bc <= 0 or not (0 <= r0 < br and 0 <= c0 < bc):
        raise _fail(Op.DEQUANT_FP8_BLOCK, "origin must lie inside the first block", src, a)
    want = (-(-(r0 + w.shape[0]) // br), -(-(c0 + w.shape[1]) // bc))
    if tuple(s.shape) != want:
        raise _fail(Op.DEQUANT_FP8_BLOCK, f"scales must be {list(want)} for this data and origin", src, a)
    if a.dtype not in types.DTYPES:
        raise _fail(Op.DEQUANT_FP8_BLOCK, f"unknown dtype {a.dtype!r}", src, a)
    return a.dtype, w.shape


FP8 = ("float8_e4m3fn", "float8_e5m2")
QUANT_INPUTS = ("bfloat16", "float16", "float32")


def _rule_block_scale(src, a: BlockScaleArg):
    if len(src) not in (1, 2):
        raise _fail(Op.FP8_BLOCK_SCALE, f"takes 1 or 2 source(s), got {len(src)}", src, a)
    x = src[0]
    if x.dtype not in QUANT_INPUTS or len(x.shape) != 2:
        raise _fail(Op.FP8_BLOCK_SCALE, f"data must be a 2-D {'/'.join(QUANT_INPUTS)} tensor", src, a)
    br, bc = a.block
    if br <= 0 or bc <= 0:
        raise _fail(Op.FP8_BLOCK_SCALE, "block sizes must be positive", src, a)
    if a.dtype not in FP8:
        raise _fail(Op.FP8_BLOCK_SCALE, f"dtype must be one of {FP8}", src, a)
    shape = (-(-x.shape[0] // br), -(-x.shape[1] // bc))
    if len(src) == 2 and (src[1].dtype != "float32" or tuple(src[1].shape) != shape):
        raise _fail(Op.FP8_BLOCK_SCALE, f"preferred scales must be float32{list(shape)}", src, a)
    return "float32", shape


def _rule_quant(src, a: QuantArg):
    x, s = _arity(Op.QUANT_FP8_BLOCK, src, 2, a)
    if x.dtype not in QUANT_INPUTS or len(x.shape) != 2:
        raise _fail(Op.QUANT_FP8_BLOCK, f"data must be a 2-D {'/'.join(QUANT_INPUTS)} tensor", src, a)
    if s.dtype != "float32" or len(s.shape) != 2:
        raise _fail(Op.QUANT_FP8_BLOCK, "scales must be a 2-D float32 tensor", src, a)
    (br, bc), (r0, c0) = a.block, a.origin
    if br <= 0 or bc <= 0 or not (0 <= r0 < br and 0 <= c0 < bc):
        raise _fail(Op.QUANT_FP8_BLOCK, "origin must lie inside the first block", src, a)
    want = (-(-(r0 + x.shape[0]) // br), -(-(c0 + x.shape[1]) // bc))
    if tuple(s.shape) != want:
        raise _fail(Op.QUANT_FP8_BLOCK, f"scales must be {list(want)} for this data and origin", src, a)
    if a.dtype not in FP8:
        raise _fail(Op.QUANT_FP8_BLOCK, f"dtype must be one of {FP8}", src, a)
    return a.dtype, x.shape


def _arity(op, src, n, arg):
    if len(src) != n:
        raise _fail(op, f"takes {n} source(s), got {len(src)}", src, arg)
    return src


RULES: dict[Op, Callable] = {
    Op.READ: _rule_read,
    Op.SLICE: _rule_slice,
    Op.CAT: _rule_cat,
    Op.VIEW: _rule_view,
    Op.TRANSPOSE: _rule_transpose,
    Op.CAST: _rule_cast,
    Op.DEQUANT_FP8_BLOCK: _rule_dequant,
    Op.FP8_BLOCK_SCALE: _rule_block_scale,
    Op.QUANT_FP8_BLOCK: _rule_quant,
    Op.READ_CHUNKED: _rule_read_chunked,
}


def make(op: Op, src: tuple[Node, ...], arg: object) -> Node:
    """Build a checked node (the one entry point; the functions below are sugar)."""
    if not isinstance(arg, ARG_TYPES[op]):
        raise GraphError(f"{op.value}: argument must be {ARG_TYPES[op].__name__}, got {type(arg).__name__}")
    dtype, shape = RULES[op](tuple(src), arg)
    return Node(op, tuple(src), arg, dtype, tuple(shape))


# --- constructors -----------------------------------------------------------------------------------------------

def read(file: str, tensor: str, dtype: str, shape: Shape, *, offset: int,
         rows: tuple[int, int] | None = None) -> Node:
    shape = tuple(shape)
    if rows is None:
        rows = (0, shape[0]) if shape else (0, 1)
    return make(Op.READ, (), ReadArg(file, tensor, dtype, shape, offset, tuple(rows)))


def read_chunked(file: str, tensor: str, fmt: str, dtype: str, shape: Shape, *, offsets: Shape | None = None,
                 lengths: Shape | None = None) -> Node:
    """A chunked tensor (the whole of it unless ``offsets``/``lengths`` say which hypercube)."""
    shape = tuple(shape)
    offsets = (0,) * len(shape) if offsets is None else tuple(offsets)
    lengths = shape if lengths is None else tuple(lengths)
    return make(Op.READ_CHUNKED, (), ChunkedReadArg(file, tensor, fmt, dtype, shape, offsets, lengths))


def slice_(x: Node, offsets: Shape, lengths: Shape) -> Node:
    offsets, lengths = tuple(offsets), tuple(lengths)
    if offsets == (0,) * len(x.shape) and lengths == x.shape:
        return x
    return make(Op.SLICE, (x,), SliceArg(offsets, lengths))


def narrow_dim(x: Node, dim: int, start: int, stop: int) -> Node:
    """``x`` restricted to ``[start, stop)`` along ``dim`` (a plain SLICE, no push-down)."""
    offsets = [0] * len(x.shape)
    lengths = list(x.shape)
    offsets[dim], lengths[dim] = start, stop - start
    return slice_(x, tuple(offsets), tuple(lengths))


def chunk(x: Node, n: int, index: int, dim: int) -> Node:
    """The ``index``-th of ``n`` equal pieces of ``x`` along ``dim`` (torch.chunk for exact divisions)."""
    size = x.shape[dim]
    if size % n:
        raise GraphError(f"chunk: dim {dim} of size {size} does not split into {n} equal pieces")
    step = size // n
    return narrow_dim(x, dim, index * step, (index + 1) * step)


def cat(parts: list[Node] | tuple[Node, ...], dim: int = 0) -> Node:
    parts = tuple(parts)
    if len(parts) == 1:
        return parts[0]
    return make(Op.CAT, parts, CatArg(dim))


def view(x: Node, shape: Shape) -> Node:
    shape = tuple(shape)
    if shape == x.shape:
        return x
    return make(Op.VIEW, (x,), ViewArg(shape))


def transpose(x: Node, dim0: int = 0, dim1: int = 1) -> Node:
    return make(Op.TRANSPOSE, (x,), TransposeArg(dim0, dim1))


def cast(x: Node, dtype: str) -> Node:
    if x.dtype == dtype:
        return x
    return make(Op.CAST, (x,), CastArg(dtype))


def dequant_fp8_block(w: Node, scale: Node, *, block: tuple[int, int],
                      origin: tuple[int, int] = (0, 0), dtype: str = "bfloat16") -> Node:
    return make(Op.DEQUANT_FP8_BLOCK, (w, scale), DequantArg(tuple(block), tuple(origin), dtype))


def fp8_block_scale(x: Node, *, block: tuple[int, int], dtype: str = "float8_e4m3fn",
                    prefer: Node | None = None) -> Node:
    """The float32 ``scale_inv`` grid that :func:`quant_fp8_block` needs to quantize ``x`` to ``dtype``;
    ``prefer``: scales to keep wherever the values still fit them (see :class:`BlockScaleArg`)."""
    return make(Op.FP8_BLOCK_SCALE, (x,) if prefer is None else (x, prefer), BlockScaleArg(tuple(block), dtype))


def quant_fp8_block(x: Node, scale: Node, *, block: tuple[int, int],
                    origin: tuple[int, int] = (0, 0), dtype: str = "float8_e4m3fn") -> Node:
    """``x`` quantized with ``scale`` (``scale_inv``): with the scales an FP8 checkpoint was dequantized with,
    this gives back its fp8 bytes exactly (see ``streamconv.execute.quant``)."""
    return make(Op.QUANT_FP8_BLOCK, (x, scale), QuantArg(tuple(block), tuple(origin), dtype))


def toposort(roots, *, skip: Callable[[Node], bool] | None = None) -> list[Node]:
    """Every node reachable from ``roots``, sources before users, each once (iterative; graphs can be deep).

    ``skip(node)`` true: leave that node out and do not visit its sources (a value that already exists)."""
    seen: set[str] = set()
    order: list[Node] = []
    for root in roots:
        stack = [(root, False)]
        while stack:
            node, expanded = stack.pop()
            if node.key in seen:
                continue
            if expanded:
                seen.add(node.key)
                order.append(node)
                continue
            if skip is not None and skip(node):
                seen.add(node.key)
                continue
            stack.append((node, True))
            for s in reversed(node.src):
                if s.key not in seen:
                    stack.append((s, False))
    return order


# The LoRA merge and NF4 ops (argument types, rules, constructors) live in .lora_ops, which registers them here.
from . import lora_ops  # noqa: E402,F401  (import for its registration; it needs the names above)
