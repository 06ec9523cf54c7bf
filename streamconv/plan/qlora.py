"""``hf2mcore --qlora-nf4`` (spec §6.1): QLoRA's base checkpoint, every quantized weight stored as bitsandbytes
NF4 (blocksize 64, double-quantized statistics), quantized on the fly in the graph, FP8 sources included.

Each quantized key K becomes the six entries ``QuantState.as_dict(packed=True)`` gives, in its order, K first:

    K                                   uint8 [numel / 2, 1]   two NF4 codes a byte (--nf4-layout)
    K.absmax                            uint8 [numel / 64]     the block absmax, double-quantized
    K.quant_map                         float32 [16]           the NF4 table
    K.nested_absmax                     float32 [ceil(blocks / 256)]
    K.nested_quant_map                  float32 [256]          bitsandbytes' dynamic map
    K.quant_state.bitsandbytes__nf4     uint8 [width]          the JSON of shape, dtype, blocksizes, offset

The offset of the double quantization is the mean of the whole absmax vector, so the absmax is computed once
per weight as bands of whole blocks (each band reads only its rows), then shared by the codes of every band.
"""

from __future__ import annotations

import math

from ..errors import ValidationError
from ..graph.lora_ops import nf4_absmax, nf4_nested, nf4_quant, nf4_state, nf4_table
from ..graph.node import Node, cat, narrow_dim
from ..mapping.assemble import TargetTensor
from .lora import NF4_JSON, NF4_LAYOUTS

BLOCKSIZE = 64            # bitsandbytes Params4bit's default
NESTED_BLOCKSIZE = 256    # its compress_statistics block
ABSMAX_BAND_BYTES = 32 << 20


def is_quantized(spec, name: str, shape: tuple[int, ...]) -> bool:
    """Whether QLoRA stores this mcore weight in NF4 (the family's ``qlora_modules``; 2-D weights only)."""
    return len(shape) == 2 and name.removesuffix(".weight").rsplit(".", 1)[-1] in spec.qlora_modules


def absmax_of(x: Node) -> Node:
    """The float32 block absmax of ``x``, as a concatenation of row bands that each end on a block boundary."""
    rows, cols = x.shape
    unit = BLOCKSIZE // math.gcd(cols, BLOCKSIZE)            # rows per whole number of blocks
    per_row = cols * 4
    step = max(unit, (ABSMAX_BAND_BYTES // max(per_row, 1)) // unit * unit)
    if step >= rows:
        return nf4_absmax(x, blocksize=BLOCKSIZE)
    return cat([nf4_absmax(narrow_dim(x, 0, a, min(rows, a + step)), blocksize=BLOCKSIZE)
                for a in range(0, rows, step)], 0)


def nf4_entries(name: str, x: Node, layout: str) -> list[tuple[str, Node]]:
    """The six entries of weight ``name`` (value ``x``, a 2-D float node) in NF4."""
    amax = absmax_of(x)
    return [
        (name, nf4_quant(x, amax, blocksize=BLOCKSIZE, layout=layout)),
        (name + ".absmax", nf4_nested(amax, "codes", blocksize=NESTED_BLOCKSIZE)),
        (name + ".quant_map", nf4_table("nf4")),
        (name + ".nested_absmax", nf4_nested(amax, "scales", blocksize=NESTED_BLOCKSIZE)),
        (name + ".nested_quant_map", nf4_table("dynamic")),
        (name + NF4_JSON, nf4_state(amax, shape=x.shape, dtype=x.dtype, blocksize=BLOCKSIZE,
                                    nested_blocksize=NESTED_BLOCKSIZE)),
    ]


def quantize_ranks(spec, per_rank: dict, layout: str) -> dict:
    """Every rank file's tensors with the QLoRA weights replaced by their NF4 entries."""
    if layout not in NF4_LAYOUTS:
        raise ValidationError(f"--nf4-layout {layout!r}: expected npu or cuda.")
    problems = []
    out = {}
    for r, tensors in per_rank.items():
        items: list[TargetTensor] = []
        for t in tensors:
            if not is_quantized(spec, t.name, t.node.shape):
                items.append(t)
                continue
            if math.prod(t.node.shape) % BLOCKSIZE:
                problems.append(f"{t.group}.{t.name}: {list(t.node.shape)} is not a whole number of {BLOCKSIZE}-"
                                f"element NF4 blocks; bitsandbytes' Ascend quantizer refuses it too. Drop "
                                f"--qlora-nf4 or choose a TP size that keeps the pieces whole blocks.")
                continue
            items += [TargetTensor(t.group, n, node) for n, node in nf4_entries(t.name, t.node, layout)]
        out[r] = items
    if problems:
        raise ValidationError(sorted(set(problems)))
    return out
