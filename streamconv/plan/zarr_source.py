"""A zarr store as HF source tensors: the same interface as :class:`~streamconv.plan.sources.HFSource`, so every
planner that reads an HF directory reads a store (``hf2mcore --load-dir STORE``, ``zarr2hf``, the loader).

Reads are ``read_chunked`` nodes (an array's band through the ``zarr`` format object), so a rank's plan reads
the chunks its slices overlap and nothing else.  A tensor kept as element j of a stack (a layer's routed
experts, the record's ``stacks``) reads ``[j:j+1]`` of the stack with the unit dim viewed away; rows or columns
of it still narrow to a region (:func:`~streamconv.graph.rewrite.narrow`).  What the store keeps of the HF
directory (config.json, the tokenizer files, the index, the safetensors shard layout) is in the attributes of
its ``hf`` group (:data:`HF_GROUP`); stores written by other tools need only arrays named like HF tensors and a
config.json file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from ..errors import FormatError, ValidationError
from ..graph.node import Node, read_chunked, view
from ..storage import fileio, zarr_store
from ..storage.registry import digest_of_file
from ..storage.zarr_shard import ZARR
from .plan import SourceFile
from .sources import HFSource

HF_GROUP = "hf"     # the group whose attributes keep the HF directory's other files and shard layout
STORE_VERSIONS = (1, 2)   # the store layouts this version reads (2: routed experts stacked)


@dataclass(frozen=True)
class ArrayInfo:
    """What the planners need of a stored tensor (the fields of a safetensors ``TensorInfo`` they use)."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        from .. import types

        return types.nbytes(self.dtype, self.shape)


def _plain(name) -> bool:
    """An array name that stays inside the store: one path component, not hidden, not '.' or '..'."""
    return isinstance(name, str) and bool(name) and "/" not in name and "\\" not in name and not name.startswith(".")


def is_store(path: str) -> bool:
    """Whether ``path`` is a zarr v3 store (a directory with a root ``zarr.json``)."""
    return os.path.lexists(os.path.join(path, zarr_store.META))   # a FIFO there is a broken store, read as one


def open_hf_source(root: str, quant=None) -> HFSource:
    """The HF tensors at ``root``: a :class:`ZarrSource` for a zarr store, else an :class:`HFSource`."""
    return ZarrSource(root, quant) if is_store(root) else HFSource(root, quant)


RECORD_LIMIT = 1 << 30   # the hf group's zarr.json keeps the checkpoint's text files (each at most 64 MiB)


def read_json(path: str, limit: int = RECORD_LIMIT) -> dict:
    """A zarr.json document: a regular file of at most ``limit`` bytes holding a JSON object (one-line errors)."""
    try:
        return fileio.read_json(path, limit, what="zarr.json document")
    except FileNotFoundError:
        raise ValidationError(f"{path}: missing.") from None
    except FormatError as exc:
        raise ValidationError(str(exc)) from None


def store_record(root: str) -> dict:
    """The attributes of the store's ``hf`` group (``files``, ``shards``), or {} for a store without one."""
    path = os.path.join(root, HF_GROUP, zarr_store.META)
    if not os.path.lexists(path):
        return {}
    attrs = read_json(path).get("attributes") or {}
    return attrs if isinstance(attrs, dict) else {}


class ZarrSource(HFSource):
    """Tensor name -> (array path, :class:`ArrayInfo`) for a zarr store, with HFSource's coverage accounting."""

    def __init__(self, root: str, quant=None):
        self.root = os.path.abspath(root)
        self.quant = quant
        root_doc = read_json(os.path.join(self.root, zarr_store.META))
        if root_doc.get("zarr_format") != 3 or root_doc.get("node_type") != "group":
            raise ValidationError(f"{self.root}: zarr.json is not a zarr v3 group. Point --load-dir at the store's "
                                  f"root.")
        ours = (root_doc.get("attributes") or {}).get("streamconv") or {}
        version = ours.get("store_version", 1) if isinstance(ours, dict) else 1
        if version not in STORE_VERSIONS:
            raise ValidationError(f"{self.root}: store version {version!r}; this streamconv reads versions "
                                  f"{', '.join(map(str, STORE_VERSIONS))}. Upgrade streamconv.")
        self.record = store_record(self.root)
        self.tensors: dict[str, tuple[str, ArrayInfo]] = {}
        self.files: list[SourceFile] = []
        self.consumed: set[str] = set()
        self.dropped: dict[str, str] = {}
        self._nodes: dict[str, Node] = {}
        self._stacked: dict[str, tuple[int, tuple[int, ...]]] = {}   # tensor -> (index, its array's shape)
        names = [n for shard in self.record.get("shards", ()) for n in shard["tensors"]] or self._scan()
        member = self._stack_members()
        problems = []
        metas: dict[str, zarr_store.ArrayMeta | None] = {}
        for name in names:
            array, j = member.get(name, (name, None))
            if not _plain(array):
                raise ValidationError(f"{self.root}/{HF_GROUP}: {array!r} cannot be an array of the store (a name "
                                      f"with '/' or a leading '.' lies outside it). The store is damaged; re-create "
                                      f"it.")
            if array not in metas:
                try:
                    metas[array] = zarr_store.load_meta(os.path.join(self.root, array))
                    self.files += self._files_of(array)
                except FormatError as exc:
                    metas[array] = None
                    problems.append(str(exc))
            meta = metas[array]
            if meta is None:   # reported once per array, not per tensor of a stack
                continue
            if j is None:
                self.tensors[name] = (array, ArrayInfo(name, meta.dtype, meta.shape))
            elif len(meta.shape) < 2 or j >= meta.shape[0]:
                problems.append(f"{self.root}/{array}: {meta.dtype}{list(meta.shape)} cannot hold {name} as its "
                                f"element {j}. The store is damaged; re-create it.")
            else:
                self.tensors[name] = (array, ArrayInfo(name, meta.dtype, tuple(meta.shape[1:])))
                self._stacked[name] = (j, tuple(meta.shape))
        if problems:
            raise ValidationError(problems)

    def _stack_members(self) -> dict[str, tuple[str, int]]:
        """Tensor -> (array, index) for the tensors the record says are stored stacked."""
        out = {}
        for item in self.record.get("stacks", ()):
            ok = isinstance(item, list) and len(item) == 2 and _plain(item[0]) and isinstance(item[1], list)
            if not ok or not all(isinstance(t, str) for t in item[1]):
                raise ValidationError(f"{self.root}/{HF_GROUP}: a 'stacks' entry is not [array name, [tensor "
                                      f"names]]. The store is damaged; re-create it.")
            for j, name in enumerate(item[1]):
                out[name] = (item[0], j)
        return out

    def _scan(self) -> list[str]:
        """Arrays directly under the root of a store without an ``hf`` record (another tool's)."""
        out = []
        for name in sorted(os.listdir(self.root)):
            doc = os.path.join(self.root, name, zarr_store.META)
            if name != HF_GROUP and os.path.isfile(doc) and read_json(doc).get("node_type") == "array":
                out.append(name)
        if not out:
            raise ValidationError(f"{self.root}: a zarr store without arrays. Point --load-dir at a store written by "
                                  f"streamconv hf2zarr (or with one array per HF tensor).")
        return out

    def _files_of(self, name: str) -> list[SourceFile]:
        """The array's metadata and chunk files, so the executor sees a store that changed under the plan."""
        out = []
        base = os.path.join(self.root, name)
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            for f in sorted(filenames):
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, self.root).replace(os.sep, "/")
                out.append(SourceFile(rel, os.path.getsize(path), digest_of_file(path)))
        return out

    def config(self) -> dict:
        files = dict(self.record.get("files", ()))
        if "config.json" in files:
            try:
                obj = json.loads(files["config.json"])
            except ValueError as exc:
                raise ValidationError(f"{self.root}/{HF_GROUP}: its config.json is not valid JSON ({exc}).") from None
            if isinstance(obj, dict):
                return obj
        return super().config()   # a store written by another tool: config.json next to zarr.json

    def raw(self, name: str, prefix: str = "") -> Node:
        """A chunked read of the stored values (FP8 stays FP8), the whole tensor; ``prefix`` as in
        :meth:`HFSource.raw`."""
        array, info = self.tensors[name]
        stacked = self._stacked.get(name)
        if stacked is None:
            return read_chunked(prefix + array, name, ZARR.name, info.dtype, info.shape)
        j, shape = stacked   # element j of a stack: a region of it, the unit dim viewed away
        node = read_chunked(prefix + array, name, ZARR.name, info.dtype, shape,
                            offsets=(j,) + (0,) * len(info.shape), lengths=(1,) + tuple(info.shape))
        return view(node, info.shape)
