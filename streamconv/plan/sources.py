"""An HF safetensors checkpoint as a set of named source tensors (headers and index only, no data).

Implements :class:`streamconv.mapping.sources.SourceTensors` for the planner, with coverage accounting:
every tensor is either consumed by some output, or declared dropped with a reason, or it is an error.
"""

from __future__ import annotations

import os

from ..errors import FormatError, ValidationError
from ..graph.node import Node, dequant_fp8_block, read
from ..storage import fileio
from ..storage import safetensors as st
from ..storage.safetensors_dir import INDEX_NAME, read_dir  # noqa: F401  (INDEX_NAME: the planners use it)
from .plan import SourceFile


class HFSource:
    """Tensor name -> (shard, header entry) for an HF checkpoint directory (read by
    :func:`streamconv.storage.safetensors_dir.read_dir`), with coverage accounting.

    ``quant``: the model family's block FP8 scheme (a :class:`streamconv.mapping.spec.BlockQuant`, set by the
    planner once it knows the family): an FP8 weight is read through its scale grid, dequantized to the
    scheme's logical dtype."""

    def __init__(self, root: str, quant=None):
        self.root = os.path.abspath(root)
        self.quant = quant
        checkpoint = read_dir(self.root)
        self.tensors: dict[str, tuple[str, st.TensorInfo]] = dict(checkpoint.tensors)
        self.files: list[SourceFile] = [SourceFile(f.name, f.size, f.digest) for f in checkpoint.files]
        self.consumed: set[str] = set()
        self.dropped: dict[str, str] = {}
        self._nodes: dict[str, Node] = {}

    def config(self) -> dict:
        path = os.path.join(self.root, "config.json")
        try:
            return fileio.read_json(path, 64 << 20, what="config.json")
        except FileNotFoundError:
            raise ValidationError(f"{path}: missing. streamconv takes every dimension from config.json; "
                                  f"copy it next to the shards.") from None
        except FormatError as exc:
            raise ValidationError(str(exc)) from None

    # --- SourceTensors -------------------------------------------------------------------------------------------
    def has(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> st.TensorInfo:
        return self.tensors[name][1]

    def raw(self, name: str, prefix: str = "") -> Node:
        """A read of the stored bytes, no dequantization; ``prefix``: this source's path under the plan's source
        root, when the plan reads from several directories."""
        shard, info = self.tensors[name]
        return read(prefix + shard, name, info.dtype, info.shape, offset=info.start)

    def get(self, name: str) -> Node:
        node = self._nodes.get(name)
        if node is not None:
            self.consumed.add(name)
            return node
        if name not in self.tensors:
            raise ValidationError(f"{name}: missing from the source checkpoint. Check --load-dir and the model "
                                  f"flags (--num-layers, --mtp-num-layers).")
        self.consumed.add(name)
        node = self.raw(name)
        q = self.quant
        if q is not None and node.dtype in q.dtypes:
            scale = name + q.scale_suffix
            if scale not in self.tensors:
                raise ValidationError(f"{name}: FP8 weight without {scale}; cannot dequantize. "
                                      f"The checkpoint is incomplete.")
            self.consumed.add(scale)
            node = dequant_fp8_block(node, self.raw(scale), block=q.block, dtype=q.logical_dtype)
        self._nodes[name] = node
        return node

    def drop(self, name: str, reason: str) -> None:
        if name in self.tensors:
            self.dropped[name] = reason
            scale = name + self.quant.scale_suffix if self.quant else None
            if scale in self.tensors:
                self.dropped[scale] = reason

    def unaccounted(self) -> list[str]:
        """Tensors neither consumed nor declared dropped."""
        return sorted(n for n in self.tensors if n not in self.consumed and n not in self.dropped)
