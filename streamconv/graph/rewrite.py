"""Graph rewrites.  :func:`narrow` pushes a range restriction down to the reads.

Why: an output tensor bigger than the memory budget (a 1.85 GB vocabulary embedding, a grouped-GEMM
``weight1`` of 32 experts) is produced in bands of rows.  Pushing the band down turns "read the whole tensor,
then slice" into "read only these rows", so a band costs its own bytes.  Where an op cannot pass a
restriction through (a column range of a read: rows are stored whole), the rule stops and slices the
unrestricted node, which keeps its content key, so all bands share one materialisation of it.

Rules, one per op (``_RULES``):
1. read, dim 0      -> a read of fewer rows (one contiguous positional read)
   read_chunked     -> a read of the smaller hypercube, any dim (the format reads only the chunks it overlaps)
2. slice            -> compose the ranges and narrow the source along every restricted dim
3. cat, same dim    -> only the overlapping parts, each narrowed; other dim -> narrow every part
4. cast             -> cast of the narrowed source
5. transpose        -> narrow the swapped dim of the source
6. view, dim 0      -> of a read: a read of those bytes; of an NF4 dequant: the dequant with the view's rows;
                      else, when the band is a whole number of the source's rows, narrow the source's rows
7. dequant, dim 0/1 -> narrow the data and the covering scale blocks, shift the block origin
8. quant, dim 0/1   -> the same as dequant (data, covering scale blocks, origin)
9. block scale      -> the scales of the data's rows/columns under those blocks (a scale range is always
                       whole blocks, so this always applies; the last block keeps its partial extent)
10. view of a view  -> one view of the inner source (row-major reinterpretations compose), then rule 6
11. merge_lora      -> rows: the weight's and B's rows, A whole; columns: the weight's and A's columns, B whole
12. NF4 absmax      -> the absmax of the whole rows that hold those blocks, then a slice of the blocks
13. NF4 quant       -> codes of the whole rows holding those bytes, with the absmax blocks under them
14. NF4 dequant     -> dim 0: the packed bytes of those rows and the absmax blocks under them
15. anything else   -> a plain slice of the node
"""

from __future__ import annotations

import math

from .. import types
from .lora_ops import MergeLoraArg, NF4Arg, merge_lora, nf4_absmax, nf4_dequant, nf4_quant
from .node import (BlockScaleArg, CatArg, ChunkedReadArg, DequantArg, Node, Op, QuantArg, ReadArg, SliceArg,
                   TransposeArg, ViewArg, cast, cat, dequant_fp8_block, fp8_block_scale, make, narrow_dim,
                   quant_fp8_block, read, read_chunked, transpose, view)


def narrow(x: Node, dim: int, start: int, stop: int) -> Node:
    """``x`` restricted to ``[start, stop)`` along ``dim``, pushed as far towards the reads as the rules allow."""
    if not 0 <= start <= stop <= x.shape[dim]:
        raise ValueError(f"narrow: [{start}, {stop}) outside dim {dim} of {list(x.shape)}")
    if start == 0 and stop == x.shape[dim]:
        return x
    rule = _RULES.get(x.op)
    out = rule(x, dim, start, stop) if rule else None
    return out if out is not None else narrow_dim(x, dim, start, stop)


def _read(x: Node, dim, start, stop):
    a: ReadArg = x.arg
    if dim != 0:
        return None
    r0 = a.rows[0]
    return read(a.file, a.tensor, a.dtype, a.shape, offset=a.offset, rows=(r0 + start, r0 + stop))


def _read_chunked(x: Node, dim, start, stop):
    a: ChunkedReadArg = x.arg
    offsets, lengths = list(a.offsets), list(a.lengths)
    offsets[dim] += start
    lengths[dim] = stop - start
    return read_chunked(a.file, a.tensor, a.format, a.dtype, a.shape, offsets=offsets, lengths=lengths)


def _slice(x: Node, dim, start, stop):
    # Every dim the slice restricts is pushed down too, first to last, not only ``dim``: an expert's rows of
    # a grouped-GEMM stack, cut by a column band, must still reach the read as rows.
    a: SliceArg = x.arg
    (src,) = x.src
    inner = src
    for d, (o, n) in enumerate(zip(a.offsets, a.lengths)):
        lo, hi = (o + start, o + stop) if d == dim else (o, o + n)
        inner = narrow(inner, d, lo, hi)
    return inner


def _cat(x: Node, dim, start, stop):
    a: CatArg = x.arg
    if dim != a.dim:
        return cat([narrow(p, dim, start, stop) for p in x.src], a.dim)
    parts = []
    pos = 0
    for p in x.src:
        size = p.shape[dim]
        lo, hi = max(start, pos), min(stop, pos + size)
        if lo < hi:
            parts.append(narrow(p, dim, lo - pos, hi - pos))
        pos += size
    if not parts:  # start == stop: an empty piece of the first part (cat of nothing is ill-typed)
        return narrow(x.src[0], dim, 0, 0)
    return cat(parts, dim)


def _cast(x: Node, dim, start, stop):
    return cast(narrow(x.src[0], dim, start, stop), x.dtype)


def _transpose(x: Node, dim, start, stop):
    a: TransposeArg = x.arg
    other = a.dim1 if dim == a.dim0 else a.dim0 if dim == a.dim1 else dim
    return transpose(narrow(x.src[0], other, start, stop), a.dim0, a.dim1)


def _view(x: Node, dim, start, stop):
    a: ViewArg = x.arg
    (src,) = x.src
    k = len(src.shape) - len(a.shape)
    if src.op is Op.READ_CHUNKED and k > 0 and tuple(src.shape) == (1,) * k + tuple(a.shape):
        # one element of a stacked array (an expert of a store's stack) with the unit dims dropped: any band of
        # it, rows or columns, is a region of the stack, so a rank reads only the chunks it needs
        shape = tuple(a.shape[:dim]) + (stop - start,) + tuple(a.shape[dim + 1:])
        return view(narrow(src, dim + k, start, stop), shape)
    if dim != 0 or not src.shape:
        return None
    if src.op is Op.VIEW:  # a view of a view is one view of the inner source (a merged grouped-GEMM stack)
        return narrow(view(src.src[0], a.shape), dim, start, stop)
    if src.op is Op.NF4_DEQUANT and len(a.shape) == 2 and a.shape[1]:
        # dequantized NF4 is flat elements cut into rows of `cols`: any 2-D view is the same op with other rows
        d: NF4Arg = src.arg
        data, absmax, table = src.src
        return narrow(nf4_dequant(data, absmax, table, blocksize=d.blocksize, cols=a.shape[1], origin=d.origin,
                                  layout=d.layout, dtype=d.dtype), dim, start, stop)
    if src.op is Op.READ:
        # A read is one contiguous byte range, so rows of any view of it are a read too, whether or not they
        # fall on the stored tensor's row boundaries (an expert's block of a grouped-GEMM weight1 whose
        # expert count does not divide the hidden size).
        r: ReadArg = src.arg
        itemsize = types.dtype(src.dtype).itemsize
        base = r.offset + r.rows[0] * math.prod(r.shape[1:]) * itemsize
        offset = base + start * math.prod(a.shape[1:]) * itemsize
        return read(r.file, r.tensor, r.dtype, (stop - start,) + tuple(a.shape[1:]), offset=offset)
    row = math.prod(a.shape[1:])        # elements per output row
    src_row = math.prod(src.shape[1:])  # elements per source row
    lo, hi = start * row, stop * row
    if src_row == 0 or lo % src_row or hi % src_row:
        return None
    inner = narrow(src, 0, lo // src_row, hi // src_row)
    return view(inner, (stop - start,) + tuple(a.shape[1:]))


def _covering_blocks(a: DequantArg | QuantArg, dim, start, stop) -> tuple[int, int, tuple[int, int]]:
    """Scale blocks ``[b0, b1)`` along ``dim`` that cover data ``[start, stop)``, and the origin of the band."""
    block, origin = a.block[dim], a.origin[dim]
    b0 = (origin + start) // block
    b1 = -(-(origin + stop) // block)
    new_origin = list(a.origin)
    new_origin[dim] = (origin + start) - b0 * block
    return b0, b1, tuple(new_origin)


def _dequant(x: Node, dim, start, stop):
    a: DequantArg = x.arg
    w, s = x.src
    b0, b1, origin = _covering_blocks(a, dim, start, stop)
    return dequant_fp8_block(narrow(w, dim, start, stop), narrow(s, dim, b0, b1),
                             block=a.block, origin=origin, dtype=a.dtype)


def _quant(x: Node, dim, start, stop):
    a: QuantArg = x.arg
    data, s = x.src
    b0, b1, origin = _covering_blocks(a, dim, start, stop)
    return quant_fp8_block(narrow(data, dim, start, stop), narrow(s, dim, b0, b1),
                           block=a.block, origin=origin, dtype=a.dtype)


def _block_scale(x: Node, dim, start, stop):
    a: BlockScaleArg = x.arg
    data = x.src[0]
    block, size = a.block[dim], data.shape[dim]
    prefer = narrow(x.src[1], dim, start, stop) if len(x.src) == 2 else None
    return fp8_block_scale(narrow(data, dim, min(start * block, size), min(stop * block, size)),
                           block=a.block, dtype=a.dtype, prefer=prefer)


def _merge_lora(x: Node, dim, start, stop):
    a: MergeLoraArg = x.arg
    w, left, right = x.src
    if dim == 0:
        return merge_lora(narrow(w, 0, start, stop), narrow(left, 0, start, stop), right, alpha=a.alpha, rank=a.rank)
    return merge_lora(narrow(w, 1, start, stop), left, narrow(right, 1, start, stop), alpha=a.alpha, rank=a.rank)


def _nf4_rows(x: Node, e0: int, e1: int, even: bool) -> tuple[int, int]:
    """Rows of the 2-D source ``x`` holding flat elements ``[e0, e1)``; ``even``: start on an even element."""
    cols = x.shape[1]
    ra, rb = e0 // cols, -(-e1 // cols)
    if even and (ra * cols) % 2:
        ra -= 1
    return ra, rb


def _nf4_absmax(x: Node, dim, start, stop):
    a: NF4Arg = x.arg
    if start == stop:
        return None
    (src,) = x.src
    bs, o = a.blocksize, a.origin
    ra, rb = _nf4_rows(src, max(0, start * bs - o), min(math.prod(src.shape), stop * bs - o), even=False)
    if (ra, rb) == (0, src.shape[0]):
        return None
    first = (o + ra * src.shape[1]) // bs   # block of the narrowed rows' first element
    inner = nf4_absmax(narrow(src, 0, ra, rb), blocksize=bs, origin=(o + ra * src.shape[1]) % bs)
    return narrow(inner, 0, start - first, stop - first)


def _nf4_quant(x: Node, dim, start, stop):
    a: NF4Arg = x.arg
    if start == stop:
        return None
    src, absmax = x.src
    bs, o, cols = a.blocksize, a.origin, src.shape[1]
    ra, rb = _nf4_rows(src, 2 * start, 2 * stop, even=True)
    if (ra, rb) == (0, src.shape[0]):
        return None
    b0, b1 = (o + ra * cols) // bs, -(-(o + rb * cols) // bs)
    inner = nf4_quant(narrow(src, 0, ra, rb), narrow(absmax, 0, b0, b1), blocksize=bs,
                      origin=(o + ra * cols) % bs, layout=a.layout)
    skip = (2 * start - ra * cols) // 2
    return narrow(inner, 0, skip, skip + stop - start)


def _nf4_dequant(x: Node, dim, start, stop):
    a: NF4Arg = x.arg
    if start == stop:
        return None
    data, absmax, table = x.src
    if dim != 0:
        return None
    bs, o, cols = a.blocksize, a.origin, a.cols
    ra = start - 1 if (start * cols) % 2 else start
    rb = stop + 1 if (stop * cols) % 2 else stop
    b0, b1 = (o + ra * cols) // bs, -(-(o + rb * cols) // bs)
    inner = nf4_dequant(narrow(data, 0, ra * cols // 2, rb * cols // 2), narrow(absmax, 0, b0, b1), table,
                        blocksize=bs, cols=cols, origin=(o + ra * cols) % bs, layout=a.layout, dtype=a.dtype)
    return narrow(inner, 0, start - ra, stop - ra)


_RULES = {
    Op.READ: _read,
    Op.SLICE: _slice,
    Op.CAT: _cat,
    Op.CAST: _cast,
    Op.TRANSPOSE: _transpose,
    Op.VIEW: _view,
    Op.DEQUANT_FP8_BLOCK: _dequant,
    Op.QUANT_FP8_BLOCK: _quant,
    Op.FP8_BLOCK_SCALE: _block_scale,
    Op.MERGE_LORA: _merge_lora,
    Op.NF4_ABSMAX: _nf4_absmax,
    Op.NF4_QUANT: _nf4_quant,
    Op.NF4_DEQUANT: _nf4_dequant,
    Op.READ_CHUNKED: _read_chunked,
}


def push_slices(x: Node, memo: dict[str, Node] | None = None) -> Node:
    """``x`` with every slice pushed as far towards the reads as :func:`narrow` can take it (same values).

    A tensor small enough to be written in one piece is never narrowed, but its graph may still slice a big
    value (an expert of a grouped-GEMM stack, a TP share of a weight): pushed down, the slice becomes a read
    of those bytes instead of a read of the whole stack.  ``memo`` (content key -> result) keeps shared
    sub-graphs shared across calls."""
    memo = {} if memo is None else memo
    done = memo.get(x.key)
    if done is not None:
        return done
    if x.op is Op.SLICE:
        a: SliceArg = x.arg
        out = push_slices(x.src[0], memo)
        for d, (o, n) in enumerate(zip(a.offsets, a.lengths)):
            out = narrow(out, d, o, o + n)
    elif x.src:
        srcs = tuple(push_slices(s, memo) for s in x.src)
        out = x if all(s is t for s, t in zip(srcs, x.src)) else make(x.op, srcs, x.arg)
    else:
        out = x
    memo[x.key] = out
    return out
