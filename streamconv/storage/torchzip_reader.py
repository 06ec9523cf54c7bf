"""Reading torch-zip (.pt) files without executing them.

A ``.pt`` file is a zip whose ``data.pkl`` is a pickle, and unpickling can run arbitrary code.  This reader
parses the zip directory itself, and unpickles ``data.pkl`` with an unpickler that resolves only the handful
of globals a checkpoint needs, each mapped to a harmless stand-in of ours:

- ``torch._utils._rebuild_tensor_v2`` / ``_rebuild_tensor_v3``     -> a :class:`TensorRef` (no data read)
- ``torch.<X>Storage``, ``torch.storage.UntypedStorage``, ``torch.<dtype>``  -> dtype markers
- ``collections.OrderedDict``, ``collections.defaultdict`` (MindSpeed's own converter writes these),
  ``builtins.dict``/``list`` as defaultdict factories, ``argparse.Namespace`` (R-v2 ``args``) -> plain data
- what else a training checkpoint holds (numpy rng state, enums and paths in ``args``, Transformer Engine's
  ``_extra_state``): ``_INERT`` / ``_INERT_PACKAGES`` -> inert placeholders that keep their arguments as data

Anything else (``os``, ``subprocess``, ``builtins.eval``...) is refused with a :class:`FormatError` naming the
global.  Tensor bytes are read lazily, by
positional reads of the record's exact range.
"""

from __future__ import annotations

import collections
import hashlib
import io
import os
import stat
import pickle
import struct
import zipfile
from dataclasses import dataclass

import torch

from .. import types
from ..errors import FormatError
from . import fileio
from .base import is_row_major

MAX_PICKLE_BYTES = 256 << 20
_LOCAL = struct.Struct("<IHHHHHIIIHH")

_LEGACY_STORAGE = {d.legacy_storage: d.name for d in types.DTYPES.values() if d.legacy_storage}
_TORCH_DTYPES = {d.torch: d.name for d in types.DTYPES.values()}


@dataclass(frozen=True)
class TensorRef:
    """One tensor of a .pt file: where its storage is and how the tensor views it."""

    record: str              # storage key (record ``<archive>/data/<key>``)
    dtype: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int      # in elements
    start: int               # absolute file offset of the storage bytes
    storage_nbytes: int

    @property
    def nbytes(self) -> int:
        return types.nbytes(self.dtype, self.shape)

    @property
    def offset(self) -> int:
        """Absolute file offset of the tensor's first element."""
        return self.start + self.storage_offset * types.dtype(self.dtype).itemsize

    @property
    def row_major(self) -> bool:
        """Whether the tensor's bytes are ``[offset, offset + nbytes)`` in row-major order."""
        return is_row_major(self.shape, self.stride)


@dataclass(frozen=True)
class PtFile:
    path: str
    obj: object                          # the unpickled structure, tensors replaced by TensorRef
    records: dict[str, tuple[int, int]]  # storage key -> absolute (start, end)
    digest: str = ""                     # sha256 of data.pkl and the record table: changes when the layout does


class _Storage:
    def __init__(self, dtype: str):
        self.dtype = dtype


class _Namespace(dict):
    """argparse.Namespace stand-in: attributes kept as items."""

    def __setstate__(self, state):
        self.update(state if isinstance(state, dict) else {})


# Globals a training checkpoint holds besides the weights (rng_state: numpy arrays; args: enums, paths,
# partials, torch.device; Transformer Engine's BytesIO extra state) become inert :class:`_Opaque` data: the
# real class or function is never returned, so calling or building it runs nothing of theirs.  Everything
# else (os, subprocess, builtins.eval, ...) is refused outright: a checkpoint has no reason to name it.
_INERT_PACKAGES = frozenset({"numpy", "torch", "megatron", "mindspeed", "mindspeed_llm", "modellink",
                             "transformer_engine", "apex", "enum", "pathlib", "datetime"})
_INERT = frozenset({("_io", "BytesIO"), ("functools", "partial"), ("copyreg", "_reconstructor"),
                    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "tuple"), ("builtins", "object"),
                    ("builtins", "bytearray"), ("builtins", "complex"), ("builtins", "slice"),
                    ("builtins", "range"), ("types", "SimpleNamespace")})


class _Opaque:
    """Stand-in for an object a checkpoint may hold but a converter never needs (a BytesIO of extra state):
    it keeps its arguments and state as data and runs nothing."""

    def __init__(self, *args):
        self.args = args

    def __setstate__(self, state):
        self.state = state


def _latin1(text, encoding="latin1"):
    if not isinstance(text, str) or encoding != "latin1":
        raise FormatError(f"_codecs.encode({type(text).__name__}, {encoding!r}) is not how a pickle spells bytes.")
    return text.encode("latin1")


def _dtype_marker(name):
    return _Storage(name)


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, path: str, records: dict[str, tuple[int, int]]):
        super().__init__(io.BytesIO(data))
        self.path = path
        self.records = records

    def find_class(self, module, name):
        module = {"__builtin__": "builtins"}.get(module, module)  # protocol-2 pickles use Python 2 names
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return self._rebuild_v2
        if module == "torch._utils" and name == "_rebuild_tensor_v3":
            return self._rebuild_v3
        if module == "torch" and name in _LEGACY_STORAGE:
            return _Storage(_LEGACY_STORAGE[name])
        if module == "torch.storage" and name == "UntypedStorage":
            return _Storage("uint8")
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype) \
                and getattr(torch, name) in _TORCH_DTYPES:
            return _Storage(_TORCH_DTYPES[getattr(torch, name)])
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "collections" and name == "defaultdict":
            return _defaultdict
        if module == "builtins" and name in ("dict", "list"):
            return {"dict": dict, "list": list}[name]
        if module == "argparse" and name == "Namespace":
            return _Namespace
        if module == "_codecs" and name == "encode":  # how protocol 2 spells a bytes object
            return _latin1
        if (module, name) in _INERT or module.split(".")[0] in _INERT_PACKAGES:
            return _Opaque
        raise FormatError(f"{self.path}: data.pkl references {module}.{name}, which a checkpoint has no reason to "
                          f"contain; refusing to load it (unpickling it could run code).")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _Storage)
                and isinstance(pid[2], str) and isinstance(pid[4], int)):
            raise FormatError(f"{self.path}: malformed storage reference in data.pkl.")
        key = pid[2]
        if key not in self.records:
            raise FormatError(f"{self.path}: data.pkl names storage {key!r}, which has no data record.")
        return ("storage", pid[1].dtype, key)

    def _tensor(self, storage, offset, size, stride, dtype_name: str | None) -> TensorRef:
        if not (isinstance(storage, tuple) and len(storage) == 3 and storage[0] == "storage"):
            raise FormatError(f"{self.path}: a tensor in data.pkl has no storage.")
        _, storage_dtype, key = storage
        dtype = dtype_name or storage_dtype
        if not (isinstance(offset, int) and isinstance(size, tuple) and isinstance(stride, tuple)
                and all(isinstance(x, int) and x >= 0 for x in size + stride) and offset >= 0
                and len(size) == len(stride) and dtype in types.DTYPES):
            raise FormatError(f"{self.path}: malformed tensor record for storage {key!r}.")
        start, end = self.records[key]
        itemsize = types.dtype(dtype).itemsize
        last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else offset - 1
        if (last + 1) * itemsize > end - start:
            raise FormatError(f"{self.path}: tensor of shape {list(size)} reaches past its storage record {key!r} "
                              f"({end - start} bytes). The file is corrupt.")
        return TensorRef(key, dtype, tuple(size), tuple(stride), offset, start, end - start)

    def _rebuild_v2(self, storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
        return self._tensor(storage, offset, size, stride, None)

    def _rebuild_v3(self, storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
        name = dtype.dtype if isinstance(dtype, _Storage) else None
        return self._tensor(storage, offset, size, stride, name)


def _defaultdict(factory=None, *args):
    return collections.defaultdict(factory if factory in (dict, list, None) else None)


def read_pt(path: str) -> PtFile:
    """Parse a .pt file's zip directory and its pickle, executing nothing; tensor data is not read."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise FormatError(f"{path}: not a regular file (a directory, FIFO or device); expected a torch checkpoint.")
        size = st.st_size
        with open(path, "rb") as f, zipfile.ZipFile(f) as z:
            infos = z.infolist()
            if not infos:
                raise FormatError(f"{path}: empty zip; not a torch checkpoint.")
            archive = infos[0].filename.split("/", 1)[0]
            records: dict[str, tuple[int, int]] = {}
            pkl = None
            for info in infos:
                if info.compress_type != zipfile.ZIP_STORED:
                    raise FormatError(f"{path}: record {info.filename} is compressed; torch writes STORED records.")
                f.seek(info.header_offset)
                head = f.read(_LOCAL.size)
                if len(head) < _LOCAL.size or head[:4] != b"PK\x03\x04":
                    raise FormatError(f"{path}: bad local header for {info.filename}.")
                fields = _LOCAL.unpack(head)
                start = info.header_offset + _LOCAL.size + fields[9] + fields[10]
                end = start + info.file_size
                if end > size:
                    raise FormatError(f"{path}: record {info.filename} lies outside the file (truncated?).")
                if info.filename == f"{archive}/data.pkl":
                    if info.file_size > MAX_PICKLE_BYTES:
                        raise FormatError(f"{path}: data.pkl of {info.file_size} bytes is implausibly large.")
                    pkl = (start, info.file_size)
                elif info.filename.startswith(f"{archive}/data/"):
                    records[info.filename[len(archive) + 6:]] = (start, end)
            if pkl is None:
                raise FormatError(f"{path}: no {archive}/data.pkl; not a torch checkpoint.")
            f.seek(pkl[0])
            data = f.read(pkl[1])
    except FormatError:
        raise
    except FileNotFoundError:
        raise FormatError(f"{path}: file not found.") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, struct.error,
            OverflowError, KeyError, IndexError, UnicodeDecodeError, NotImplementedError) as exc:
        raise FormatError(f"{path}: not a readable torch zip file ({exc.__class__.__name__}: {exc}).") from None
    try:
        obj = _RestrictedUnpickler(data, path, records).load()
    except FormatError:
        raise
    except RecursionError:
        raise FormatError(f"{path}: data.pkl nests too deeply.") from None
    except Exception as exc:  # any malformed pickle: one error type for callers
        raise FormatError(f"{path}: data.pkl is not a valid checkpoint pickle ({exc.__class__.__name__}: "
                          f"{str(exc)[:200]}).") from None
    digest = hashlib.sha256(data + repr(sorted(records.items())).encode()).hexdigest()
    return PtFile(path, obj, records, digest)


# A walk of the unpickled structure is bounded: a pickle can share one dict among many parents (a few KB can
# describe a "billion laughs" DAG whose tree has 2**40 paths), and nest dicts arbitrarily deep.  No checkpoint
# comes near these limits (a rank file holds thousands of keys, a few levels deep).
MAX_VISITS = 1 << 20
MAX_DEPTH = 64


def tensors(obj, prefix: tuple = (), *, path: str = "data.pkl") -> dict[tuple, TensorRef]:
    """Every TensorRef in an unpickled structure, keyed by its path of dict keys (depth first, in dict order).

    Raises a one-line :class:`FormatError` when the structure is deeper than :data:`MAX_DEPTH` or its tree has
    more than :data:`MAX_VISITS` entries."""
    out = {}
    stack = [(obj, prefix)]
    visits = 0
    while stack:
        node, key = stack.pop()
        visits += 1
        if visits > MAX_VISITS:
            raise FormatError(f"{path}: the pickle's dicts reach more than {MAX_VISITS} entries (containers shared "
                              f"many times over, as in a pickle bomb); not a checkpoint.")
        if isinstance(node, TensorRef):
            out[key] = node
        elif isinstance(node, dict):
            if len(key) >= MAX_DEPTH:
                raise FormatError(f"{path}: dicts nested more than {MAX_DEPTH} deep; not a checkpoint.")
            stack.extend((v, key + (k,)) for k, v in reversed(list(node.items())))
    return out


def read_tensor(path: str, ref: TensorRef) -> torch.Tensor:
    """The tensor's values: one positional read of its storage range, viewed with its shape and strides."""
    dt = types.dtype(ref.dtype)
    if ref.nbytes == 0:
        return torch.empty(ref.shape, dtype=dt.torch)
    buf = fileio.read_range(path, ref.start, ref.storage_nbytes)
    storage = torch.from_numpy(buf).view(dt.torch) if ref.storage_nbytes % dt.itemsize == 0 else None
    if storage is None:
        raise FormatError(f"{path}: storage {ref.record!r} is not a whole number of {ref.dtype} elements.")
    return storage.as_strided(ref.shape, ref.stride, ref.storage_offset).clone()
