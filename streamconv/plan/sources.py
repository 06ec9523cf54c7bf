"""An HF safetensors checkpoint as a set of named source tensors (headers and index only, no data).

Implements :class:`streamconv.mapping.sources.SourceTensors` for the planner, with coverage accounting:
every tensor is either consumed by some output, or declared dropped with a reason, or it is an error.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import struct

from ..errors import ValidationError
from ..graph.node import Node, dequant_fp8_block, read
from ..storage import safetensors as st
from .plan import SourceFile

INDEX_NAME = "model.safetensors.index.json"


def header_digest(path: str) -> str:
    """A digest of a source file's layout (staleness check): for a safetensors file, sha256 of its 8-byte
    length and JSON header; for a torch zip (.pt), of its pickle and record table."""
    with open(path, "rb") as f:
        head = f.read(8)
        if head[:4] == b"PK\x03\x04":
            from ..storage.torchzip_reader import read_pt

            return read_pt(path).digest
        if len(head) < 8:
            return ""
        (n,) = struct.unpack("<Q", head)
        return hashlib.sha256(head + f.read(min(n, st.MAX_HEADER_BYTES))).hexdigest()


class HFSource:
    """Tensor name -> (shard, header entry) for an HF checkpoint directory.

    ``quant``: the model family's block FP8 scheme (a :class:`streamconv.mapping.spec.BlockQuant`, set by the
    planner once it knows the family): an FP8 weight is read through its scale grid, dequantized to the
    scheme's logical dtype."""

    def __init__(self, root: str, quant=None):
        self.root = os.path.abspath(root)
        self.quant = quant
        self.tensors: dict[str, tuple[str, st.TensorInfo]] = {}
        self.files: list[SourceFile] = []
        self.consumed: set[str] = set()
        self.dropped: dict[str, str] = {}
        self._nodes: dict[str, Node] = {}
        self._load()

    # --- loading -------------------------------------------------------------------------------------------------
    def _load(self) -> None:
        if not os.path.isdir(self.root):
            raise ValidationError(f"{self.root}: --load-dir is not a directory.")
        index_path = os.path.join(self.root, INDEX_NAME)
        weight_map: dict[str, str] | None = None
        if os.path.exists(index_path):
            try:
                with open(index_path, "rb") as f:
                    weight_map = json.load(f)["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                raise ValidationError(f"{index_path}: not a valid safetensors index (expected a 'weight_map' "
                                      f"object). Re-create or re-download it.") from None
            shards = sorted(set(weight_map.values()))
        else:
            shards = sorted(os.path.basename(p) for p in glob.glob(os.path.join(self.root, "*.safetensors")))
            if not shards:
                raise ValidationError(f"{self.root}: no {INDEX_NAME} and no *.safetensors files. "
                                      f"Point --load-dir at an HF checkpoint directory.")
        problems = []
        headers: dict[str, st.Header] = {}
        for shard in shards:
            if os.path.basename(shard) != shard or shard.startswith("."):
                problems.append(f"{index_path}: shard name {shard!r} must be a file in --load-dir.")
                continue
            path = os.path.join(self.root, shard)
            if not os.path.exists(path):
                problems.append(f"{path}: shard named by {INDEX_NAME} is missing. Download it or fix the index.")
                continue
            try:
                headers[shard] = st.read_header(path)
            except Exception as exc:  # FormatError and OSError alike: report them all at once
                problems.append(str(exc))
        for shard, header in headers.items():
            self.files.append(SourceFile(shard, header.file_size, header_digest(header.path)))
            for name, info in header.tensors.items():
                if name in self.tensors:
                    problems.append(f"{name}: stored in two shards ({self.tensors[name][0]} and {shard}). "
                                    f"Remove the duplicate.")
                    continue
                self.tensors[name] = (shard, info)
        if weight_map is not None:
            for name, shard in weight_map.items():
                if shard in headers and name not in headers[shard].tensors:
                    problems.append(f"{name}: {INDEX_NAME} places it in {shard}, whose header does not have it. "
                                    f"The index and the shards disagree; re-download.")
                elif shard in headers and name in self.tensors and self.tensors[name][0] != shard:
                    problems.append(f"{name}: {INDEX_NAME} names {shard} but it is in {self.tensors[name][0]}.")
            for name, (shard, _) in self.tensors.items():
                if name not in weight_map:
                    problems.append(f"{name}: in {shard} but not in {INDEX_NAME}. Fix the index.")
        if problems:
            raise ValidationError(problems)

    def config(self) -> dict:
        path = os.path.join(self.root, "config.json")
        try:
            with open(path, "rb") as f:
                obj = json.load(f)
        except FileNotFoundError:
            raise ValidationError(f"{path}: missing. streamconv takes every dimension from config.json; "
                                  f"copy it next to the shards.") from None
        except ValueError as exc:
            raise ValidationError(f"{path}: not valid JSON ({exc}).") from None
        if not isinstance(obj, dict):
            raise ValidationError(f"{path}: not a JSON object.")
        return obj

    # --- SourceTensors -------------------------------------------------------------------------------------------
    def has(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> st.TensorInfo:
        return self.tensors[name][1]

    def raw(self, name: str) -> Node:
        """A read of the stored bytes, no dequantization."""
        shard, info = self.tensors[name]
        return read(shard, name, info.dtype, info.shape, offset=info.start)

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
