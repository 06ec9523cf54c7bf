"""The lazy graph: one frozen node type over a closed op set.

>>> w = read("model-00001.safetensors", "lm_head.weight", "bfloat16", (256, 64), offset=1024)
>>> piece = slice_(w, offsets=(128, 0), lengths=(128, 64))   # TP rank 1 of 2, rows
>>> piece.shape, piece.dtype
((128, 64), 'bfloat16')

Shapes and dtypes are inferred when a node is built, without data; :attr:`Node.key` is a content hash, so
equal sub-graphs have equal keys (Dask task names, caches).  :mod:`.codec` turns graphs into JSON and back.
"""

from .node import (Node, Op, cast, cat, dequant_fp8_block, fp8_block_scale, quant_fp8_block, read, read_chunked,
                   slice_, transpose, view)
from .rewrite import narrow

__all__ = ["Node", "Op", "read", "read_chunked", "slice_", "cat", "view", "transpose", "cast", "dequant_fp8_block",
           "fp8_block_scale", "quant_fp8_block", "narrow"]
