"""CPU kernels, one per op.  A kernel takes the node's argument and its sources' values (torch tensors)
and returns a torch tensor; :data:`KERNELS` is the table the executors dispatch on.

Views (slice, transpose) return torch views; :func:`contiguous_bytes` makes the final copy when a value is
written.  Reads need the source root (plans store file names relative to it).
"""

from __future__ import annotations

import os

import torch

from .. import types
from ..graph.node import (BlockScaleArg, CastArg, CatArg, ChunkedReadArg, DequantArg, Node, Op, QuantArg, ReadArg,
                          SliceArg, TransposeArg, ViewArg)
from ..storage import fileio
from ..storage.registry import get_format
from ..storage.safetensors import bytes_to_tensor
from . import copy as fastcopy
from . import quant
from .dequant import dequant_fp8_block


def read_kernel(root: str, a: ReadArg) -> torch.Tensor:
    dt = types.dtype(a.dtype)
    row = dt.nbytes(a.shape[1:]) if a.shape else dt.itemsize
    r0, r1 = a.rows
    shape = (r1 - r0,) + tuple(a.shape[1:]) if a.shape else ()
    buf = fileio.read_range(os.path.join(root, a.file), a.offset + r0 * row, (r1 - r0) * row)
    return bytes_to_tensor(buf, dt.name, shape)


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


KERNELS = {
    Op.SLICE: _slice,
    Op.CAT: _cat,
    Op.VIEW: _view,
    Op.TRANSPOSE: _transpose,
    Op.CAST: _cast,
    Op.DEQUANT_FP8_BLOCK: _dequant,
    Op.FP8_BLOCK_SCALE: _block_scale,
    Op.QUANT_FP8_BLOCK: _quant,
}


def run_node(root: str, node_op: Op, arg, *srcs: torch.Tensor) -> torch.Tensor:
    """Compute one node from its sources' values (the task function of the Dask executor)."""
    if node_op is Op.READ:
        return read_kernel(root, arg)
    if node_op is Op.READ_CHUNKED:
        return read_chunked_kernel(root, arg)
    return KERNELS[node_op](arg, *srcs)


def materialize(node: Node, root: str, *, device: str | torch.device = "cpu",
                cache: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Evaluate ``node`` in this process and return a contiguous tensor on ``device``.

    This is the training-time path: a job pulls its own rank's tensors straight from a plan.  ``cache``
    (content key -> value) lets several calls share reads; pass a dict and drop it when done.
    """
    from ..graph.node import toposort

    values: dict[str, torch.Tensor] = cache if cache is not None else {}
    for n in toposort([node]):
        if n.key not in values:
            values[n.key] = run_node(root, n.op, n.arg, *(values[s.key] for s in n.src))
    return fastcopy.contiguous(values[node.key]).to(device)
