"""An HF checkpoint directory of safetensors shards, read from its index and headers alone (no tensor data).

:func:`read_dir` finds the shards (from ``model.safetensors.index.json``, or every ``*.safetensors`` when
there is no index), reads every shard's header through :data:`~streamconv.storage.safetensors.SAFETENSORS`,
and checks that index and headers agree: each tensor in exactly one shard, each index entry in the shard it
names, each tensor in the index.  Every problem is collected and raised once.  The planner's ``HFSource``
adds coverage accounting on top.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

from ..errors import FormatError, ValidationError
from . import fileio
from .safetensors import SAFETENSORS, TensorInfo

INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class ShardFile:
    """One shard as a plan records a source file: name relative to the root, size, layout digest."""

    name: str
    size: int
    digest: str


@dataclass(frozen=True)
class SafetensorsDir:
    root: str
    tensors: dict[str, tuple[str, TensorInfo]]   # name -> (shard, header entry)
    files: tuple[ShardFile, ...]                  # shards in name order


def read_dir(root: str) -> SafetensorsDir:
    """Read the index and every shard header of the checkpoint at ``root`` (an absolute path)."""
    if not os.path.isdir(root):
        raise ValidationError(f"{root}: --load-dir is not a directory.")
    index_path = os.path.join(root, INDEX_NAME)
    weight_map = _weight_map(index_path)
    if weight_map is not None:
        shards = sorted(set(weight_map.values()))
    else:
        shards = sorted(os.path.basename(p) for p in glob.glob(os.path.join(root, "*.safetensors")))
        if not shards:
            raise ValidationError(f"{root}: no {INDEX_NAME} and no *.safetensors files. "
                                  f"Point --load-dir at an HF checkpoint directory.")
    problems = []
    indexes = {}
    for shard in shards:
        if os.path.basename(shard) != shard or shard.startswith("."):
            problems.append(f"{index_path}: shard name {shard!r} must be a file in --load-dir.")
            continue
        path = os.path.join(root, shard)
        if not os.path.exists(path):
            problems.append(f"{path}: shard named by {INDEX_NAME} is missing. Download it or fix the index.")
            continue
        try:
            indexes[shard] = SAFETENSORS.index(path)
        except Exception as exc:  # FormatError and OSError alike: report them all at once
            problems.append(str(exc))
    tensors: dict[str, tuple[str, TensorInfo]] = {}
    files = []
    for shard, index in indexes.items():
        files.append(ShardFile(shard, index.size, index.digest))
        for entry in index.tensors:
            name = entry.name
            if name in tensors:
                problems.append(f"{name}: stored in two shards ({tensors[name][0]} and {shard}). "
                                f"Remove the duplicate.")
                continue
            tensors[name] = (shard, entry.storage_data)
    if weight_map is not None:
        problems += _index_problems(weight_map, indexes, tensors)
    if problems:
        raise ValidationError(problems)
    return SafetensorsDir(root, tensors, tuple(files))


def _weight_map(index_path: str) -> dict[str, str] | None:
    """The index's ``weight_map`` (tensor name -> shard), or None when there is no index."""
    if not os.path.lexists(index_path):
        return None
    try:
        weight_map = fileio.read_json(index_path, 1 << 30, what="safetensors index")["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError
    except FormatError as exc:
        raise ValidationError(str(exc)) from None
    except (KeyError, TypeError):
        raise ValidationError(f"{index_path}: not a valid safetensors index (expected a 'weight_map' "
                              f"object of shard names). Re-create or re-download it.") from None
    return weight_map


def _index_problems(weight_map: dict[str, str], indexes: dict, tensors: dict[str, tuple[str, TensorInfo]]
                    ) -> list[str]:
    problems = []
    names = {shard: {e.name for e in index.tensors} for shard, index in indexes.items()}
    for name, shard in weight_map.items():
        if shard in indexes and name not in names[shard]:
            problems.append(f"{name}: {INDEX_NAME} places it in {shard}, whose header does not have it. "
                            f"The index and the shards disagree; re-download.")
        elif shard in indexes and name in tensors and tensors[name][0] != shard:
            problems.append(f"{name}: {INDEX_NAME} names {shard} but it is in {tensors[name][0]}.")
    for name, (shard, _) in tensors.items():
        if name not in weight_map:
            problems.append(f"{name}: in {shard} but not in {INDEX_NAME}. Fix the index.")
    return problems

