"""CPU kernels, one per op.  A kernel takes the node's argument and its sources' values (torch tensors)
and returns a torch tensor; :data:`KERNELS` is the table the executors dispatch on.

Views (slice, transpose) return torch views; :func:`contiguous_bytes` makes the final copy when a value is
written.  Reads need the source root (plans store file names relative to it).
"""

from __future__ import annotations

import os

import torch

from .. import types
from ..errors import GraphError
from ..graph.lora_ops import MergeLoraArg, NF4Arg, NF4NestedArg, NF4ScalesArg, NF4StateArg, NF4TableArg
from ..graph.node import (BlockScaleArg, CastArg, CatArg, ChunkedReadArg, DequantArg, Node, Op, QuantArg, ReadArg,
                          SliceArg, TransposeArg, ViewArg)
from ..storage import fileio
from ..storage.registry import get_format
from ..storage.safetensors import bytes_to_tensor
from . import copy as fastcopy
from . import lora, nf4, quant
from .dequant import dequant_fp8_block


def read_kernel(root: str, a: ReadArg, out: torch.Tensor | None = None) -> torch.Tensor:
    """The bytes of a read node, in a fresh tensor, or positionally read into ``out`` (contiguous, CPU)."""
    dt = types.dtype(a.dtype)
    row = dt.nbytes(a.shape[1:]) if a.shape else dt.itemsize
    r0, r1 = a.rows
    shape = (r1 - r0,) + tuple(a.shape[1:]) if a.shape else ()
    path = os.path.join(root, a.file)
    if out is None:
        return bytes_to_tensor(fileio.read_range(path, a.offset + r0 * row, (r1 - r0) * row), dt.name, shape)
    fd = os.open(path, os.O_RDONLY)
    try:
        fileio.pread_into(fd, out.reshape(-1).view(torch.uint8).numpy(), a.offset + r0 * row, path=path)
    finally:
        os.close(fd)
    return out


def read_chunked_kernel(root: str, a: ChunkedReadArg) -> torch.Tensor:
    """The format object reads the hypercube (the executor does not know which format it reads)."""
    return get_format(a.format).read_region(os.path.join(root, a.file), a.dtype, a.shape, a.offsets, a.lengths)


def _slice(a: SliceArg, x: torch.Tensor) -> torch.Tensor:
    for dim, (o, n) in enumerate(zip(a.offsets, a.lengths)):
        if o != 0 or n != x.shape[dim]:
            x = x.narrow(dim, o, n)
    return x


def _cat(a: CatArg, *xs: torch.Tensor) -> torch.Tensor:
    return fastcopy.cat(xs, a.dim)


def _view(a: ViewArg, x: torch.Tensor) -> torch.Tensor:
    # Row-major reinterpretation: a contiguous source is viewed in place, anything else copied once first.
    return fastcopy.contiguous(x).view(a.shape)


def _transpose(a: TransposeArg, x: torch.Tensor) -> torch.Tensor:
    return x.transpose(a.dim0, a.dim1)


def _cast(a: CastArg, x: torch.Tensor) -> torch.Tensor:
    return x.to(types.dtype(a.dtype).torch)


def _dequant(a: DequantArg, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return dequant_fp8_block(w, s, block=a.block, origin=a.origin, dtype=types.dtype(a.dtype).torch)


def _block_scale(a: BlockScaleArg, x: torch.Tensor, prefer: torch.Tensor | None = None) -> torch.Tensor:
    return quant.fp8_block_scale(x, block=a.block, dtype=types.dtype(a.dtype).torch, prefer=prefer)


def _quant(a: QuantArg, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return quant.quant_fp8_block(x, s, block=a.block, origin=a.origin, dtype=types.dtype(a.dtype).torch)


def _merge_lora(a: MergeLoraArg, w: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    return lora.merge_lora(w, left, right, alpha=a.alpha, rank=a.rank)


def _nf4_absmax(a: NF4Arg, x: torch.Tensor) -> torch.Tensor:
    return nf4.absmax(x, blocksize=a.blocksize, origin=a.origin)


def _nf4_quant(a: NF4Arg, x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    return nf4.quantize(x, amax, blocksize=a.blocksize, origin=a.origin, layout=a.layout)


def _nf4_nested(a: NF4NestedArg, amax: torch.Tensor) -> torch.Tensor:
    return nf4.nested(amax, a.part, blocksize=a.blocksize)


def _nf4_table(a: NF4TableArg) -> torch.Tensor:
    return nf4.table(a.name)


def _nf4_state(a: NF4StateArg, amax: torch.Tensor) -> torch.Tensor:
    return nf4.state_json(amax, shape=a.shape, dtype=a.dtype, blocksize=a.blocksize,
                          nested_blocksize=a.nested_blocksize, width=a.width)


def _nf4_scales(a: NF4ScalesArg, codes, scales, dynamic, state) -> torch.Tensor:
    return nf4.scales(codes, scales, dynamic, state, nested_blocksize=a.nested_blocksize)


def _nf4_dequant(a: NF4Arg, data: torch.Tensor, amax: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    return nf4.dequantize(data, amax, table, blocksize=a.blocksize, origin=a.origin, layout=a.layout,
                          dtype=types.dtype(a.dtype).torch, cols=a.cols)


KERNELS = {
    Op.SLICE: _slice,
    Op.CAT: _cat,
    Op.VIEW: _view,
    Op.TRANSPOSE: _transpose,
    Op.CAST: _cast,
    Op.DEQUANT_FP8_BLOCK: _dequant,
    Op.FP8_BLOCK_SCALE: _block_scale,
    Op.QUANT_FP8_BLOCK: _quant,
    Op.MERGE_LORA: _merge_lora,
    Op.NF4_ABSMAX: _nf4_absmax,
    Op.NF4_QUANT: _nf4_quant,
    Op.NF4_NESTED: _nf4_nested,
    Op.NF4_TABLE: _nf4_table,
    Op.NF4_STATE: _nf4_state,
    Op.NF4_SCALES: _nf4_scales,
    Op.NF4_DEQUANT: _nf4_dequant,
}


def run_node(root: str, node_op: Op, arg, *srcs: torch.Tensor) -> torch.Tensor:
    """Compute one node from its sources' values (the task function of the Dask executor)."""
    if node_op is Op.READ:
        return read_kernel(root, arg)
    if node_op is Op.READ_CHUNKED:
        return read_chunked_kernel(root, arg)
    return KERNELS[node_op](arg, *srcs)


def _evaluate(node: Node, root: str, values: dict[str, torch.Tensor], dequant=None) -> torch.Tensor:
    """``node``'s value (possibly a strided view), every node computed once into ``values``."""
    from ..graph.node import toposort

    for n in toposort([node]):
        if n.key in values:
            continue
        srcs = [values[s.key] for s in n.src]
        if dequant is not None and n.op is Op.DEQUANT_FP8_BLOCK:
            values[n.key] = dequant(n.arg, *srcs)
            continue
        away = [s.device for s in srcs if s.device.type != "cpu"]
        if away:
            srcs = [s.to(away[0]) for s in srcs]
        values[n.key] = run_node(root, n.op, n.arg, *srcs)
    return values[node.key]


def materialize(node: Node, root: str, *, device: str | torch.device = "cpu",
                cache: dict[str, torch.Tensor] | None = None, dequant=None) -> torch.Tensor:
    """Evaluate ``node`` in this process and return a contiguous tensor on ``device``.

    The executor's per-piece path and the training-time loader both go through here.  ``cache`` (content
    key -> value) lets several calls share reads; pass a dict and drop it when done.  ``dequant``: a callable
    ``(DequantArg, w, scale_inv) -> tensor`` that runs DEQUANT_FP8_BLOCK nodes instead of the host kernel
    (:class:`streamconv.execute.device.DeviceDequant`: FP8 decoded on an accelerator); an op whose sources
    are on different devices runs where the non-host ones are, so what follows a device decode stays there.
    """
    values: dict[str, torch.Tensor] = cache if cache is not None else {}
    return fastcopy.contiguous(_evaluate(node, root, values, dequant)).to(device)


def materialize_into(node: Node, root: str, out: torch.Tensor) -> None:
    """Evaluate ``node`` straight into ``out`` (a CPU tensor of its shape and dtype: a band of the loader's
    destination, or a model parameter), with the kernels :func:`materialize` uses.

    The last step writes where the value belongs instead of into a fresh buffer that is copied afterwards:
    a read lands by positional read, a dequant by its kernel's ``out`` (a transposed dequant too: the
    grouped-GEMM experts), the parts of a cat in their slots, a view in the same bytes; anything else is
    computed and copied once (``copy.copy_into``: transposed values are copied in cache-sized bands)."""
    if tuple(out.shape) != tuple(node.shape) or out.dtype != types.dtype(node.dtype).torch:
        raise GraphError(f"materialize_into: out is {out.dtype}{list(out.shape)}, the node gives "
                         f"{node.dtype}{list(node.shape)}.")
    contiguous = out.is_contiguous() and out.device.type == "cpu"
    if node.op is Op.READ and contiguous and out.numel():
        read_kernel(root, node.arg, out)
        return
    if node.op is Op.VIEW and contiguous:
        materialize_into(node.src[0], root, out.view(node.src[0].shape))
        return
    if node.op is Op.CAT:
        pos = 0
        for part in node.src:
            n = part.shape[node.arg.dim]
            materialize_into(part, root, out.narrow(node.arg.dim, pos, n))
            pos += n
        return
    if node.op is Op.TRANSPOSE and node.src[0].op is Op.DEQUANT_FP8_BLOCK and out.device.type == "cpu":
        # dequantize straight into the transposed slot (grouped-GEMM experts): one pass instead of two
        materialize_into(node.src[0], root, out.transpose(node.arg.dim0, node.arg.dim1))
        return
    if node.op is Op.DEQUANT_FP8_BLOCK and out.device.type == "cpu":
        values: dict[str, torch.Tensor] = {}
        w, s = (_evaluate(x, root, values) for x in node.src)
        a = node.arg
        dequant_fp8_block(w, s, block=a.block, origin=a.origin, dtype=types.dtype(a.dtype).torch, out=out)
        return
    fastcopy.copy_into(out, _evaluate(node, root, {}))
