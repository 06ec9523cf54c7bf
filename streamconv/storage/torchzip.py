"""A streaming writer of ``torch.save``-compatible zip files (Megatron ``model_optim_rng.pt``).

What torch.load (2.1 to 2.13) needs:

* A zip of STORED records under one folder, the ``archive``. The reader takes that name from the first
  central-directory entry and finds records through the central directory, so their order in the file is free.
* ``<archive>/data.pkl``: a protocol-2 pickle. A tensor is the call
  ``torch._utils._rebuild_tensor_v2(storage, 0, shape, stride, False, OrderedDict())`` whose storage is the
  persistent id ``('storage', torch.BFloat16Storage, '<key>', 'cpu', numel)``, resolved to the record
  ``<archive>/data/<key>``. Dtypes without a legacy typed storage (float8) use ``_rebuild_tensor_v3`` with
  ``torch.storage.UntypedStorage``, numel in bytes, and the dtype as a trailing argument.
* ``<archive>/data/<key>``: the raw little-endian bytes, 64-byte aligned so that mmap loads can view them in
  place. Like miniz, we pad the local header with an extra field of id 0x4246 ("FB").
* ``byteorder`` (``little``), ``version`` (``3\n``) and ``.data/serialization_id``. No ``.format_version`` and no
  ``.storage_alignment``: with those, newer torch may compute storage offsets by assuming that the data
  records are laid out in pickle order. torch.load never checks CRCs, but ``zipfile`` and ``unzip`` do.

:func:`compute_layout` fixes every byte from the list of tensors alone. Records ``data/0 .. data/n-1`` come
first, then data.pkl and the small records, the central directory, and the zip64 end records and end record.
The pickle needs no tensor data, so it is built from placeholders, and it is byte-identical to torch.save's
pickle of the same dict. Every header carries a zip64 extra field whatever the size, so the code path
that files over 4 GiB take is the one every test runs.

Write protocol (free functions, no writer object, so that threads and processes can share a file):

1. :func:`create` once (coordinator), before any write: makes ``fileio.temp_name(path)`` at its final size.
2. :func:`write_piece` any number of times, from any thread or process, in any order. Each call returns a
   :data:`Piece` ``(index, offset, length, crc32)`` for the caller to collect. The pieces of one entry
   must tile it exactly. The file comes out byte-identical whatever the order.
3. :func:`finish` once (coordinator), after every write has returned. It checks the tiling, combines the
   piece CRCs, writes headers, pickle and directory, fsyncs and renames. If the tiling is wrong it raises
   before touching the file, so the missing pieces can still be written. Or call :func:`abort` to give up.

Until finish returns, the final name does not exist, so a crashed run never looks complete.
"""

from __future__ import annotations

import argparse
import collections
import functools
import hashlib
import io
import math
import pickle
import struct
import zlib
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Union

import numpy as np
import torch

from .. import types
from ..errors import ValidationError
from . import pieces as _pieces
from .pieces import Piece

ALIGN = 64
Scalar = Union[int, float, str, bool, None]

_U32 = 0xFFFFFFFF
_U16 = 0xFFFF
_VERSION = 45  # zip spec 4.5: zip64
_DOS_DATE = (1 << 5) | 1  # 1980-01-01, fixed so that files are reproducible
_LOCAL = struct.Struct("<IHHHHHIIIHH")  # 30 bytes
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")  # 46 bytes
_LOCAL_ZIP64 = struct.Struct("<HHQQ")  # id 1: uncompressed, compressed size
_CENTRAL_ZIP64 = struct.Struct("<HHQQQ")  # id 1: uncompressed, compressed size, local header offset
_EOCD64 = struct.Struct("<IQHHIIQQQQ")  # 56 bytes
_LOCATOR64 = struct.Struct("<IIQI")  # 20 bytes
_EOCD = struct.Struct("<IHHHHIIH")  # 22 bytes
_PAD_ID = 0x4246  # "FB": the padding field miniz/torch use to align record data


@dataclass(frozen=True)
class PtEntry:
    """One tensor of the file: ``obj[group][name]``, with our dtype name (``"bfloat16"``) and its shape."""

    group: str
    name: str
    dtype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))  # lists are not hashable

    @property
    def label(self) -> str:
        return f"{self.group}/{self.name}"


@dataclass(frozen=True)
class _Record:
    name: bytes  # full name in the zip, e.g. b"archive/data/3"
    header: int  # offset of the local header
    start: int  # offset of the first data byte, a multiple of ALIGN
    size: int


@dataclass(frozen=True)
class TorchZipLayout:
    """Every offset of one .pt file, fixed before any data is written. Build it with :func:`compute_layout`.

    ``records`` lists the tensor records in entry order, then data.pkl, byteorder, version and
    serialization_id, whose bytes are ``payloads``.
    """

    entries: tuple[PtEntry, ...]
    attrs: tuple[tuple[str, Scalar], ...]
    archive: str
    records: tuple[_Record, ...] = field(repr=False)
    payloads: tuple[bytes, ...] = field(repr=False)
    spans: tuple[tuple[int, int], ...] = field(repr=False)  # absolute (start, end) of each entry's bytes
    cd_offset: int
    cd_size: int
    size: int  # of the whole file

    @property
    def data_pkl(self) -> bytes:
        return self.payloads[0]


# --- layout ----------------------------------------------------------------------------------------------------

_SCALARS = (int, float, str, bool, type(None))


class _Attr:
    """An attr as a cache key: ``3``, ``3.0`` and ``True`` are equal in Python but pickle differently."""

    __slots__ = ("key", "value", "_id")

    def __init__(self, key: str, value: Scalar):
        self.key, self.value = key, value
        fields = tuple((k, type(v), repr(v)) for k, v in vars(value).items()) if type(value) is argparse.Namespace else ()
        self._id = (key, type(value), repr(value), fields)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Attr) and self._id == other._id

    def __hash__(self) -> int:
        return hash(self._id)


def compute_layout(entries: Iterable[PtEntry], attrs: Iterable[tuple[str, Scalar]] | Mapping[str, Scalar] = (),
                   archive: str = "archive", groups: Iterable[str] = ()) -> TorchZipLayout:
    """Fix the layout of a .pt file holding ``{group: OrderedDict(name -> tensor), ..., **attrs}``.

    Args:
        entries: the tensors. Entry ``i`` is stored as record ``data/i``. Groups appear in the top-level dict
            in the order of their first entry, and the tensors of a group in entry order.
        attrs: scalars (int, float, str, bool, None) that follow the groups in the top-level dict,
            for example ``(("checkpoint_version", 3.0), ("iteration", 1))``; or an ``argparse.Namespace`` of
            such scalars (MindSpeed's ``args``).
        archive: the top-level folder inside the zip.
        groups: groups that come first, in this order, even when empty (a virtual pipeline chunk that holds
            only noop layers is still an empty ``modelN`` dict); other groups follow in entry order.

    Returns:
        A frozen :class:`TorchZipLayout`. Equal inputs give the same cached object.

    Raises:
        ValidationError: listing every bad entry or attr (unknown dtype, duplicate name, ...).
    """
    pairs = attrs.items() if isinstance(attrs, Mapping) else attrs
    return _layout_cached(tuple(entries), tuple(_Attr(k, v) for k, v in pairs), archive, tuple(groups))


@functools.lru_cache(maxsize=32)
def _layout_cached(entries: tuple[PtEntry, ...], attrs: tuple[_Attr, ...], archive: str,
                   groups: tuple[str, ...] = ()) -> TorchZipLayout:
    _validate(entries, attrs, archive)
    clash = sorted(set(groups) & {a.key for a in attrs})
    if clash:
        raise ValidationError(f"{archive}: {clash} are both groups and attrs.")
    data_pkl = _pickle(entries, attrs, groups)
    serialization_id = str(int.from_bytes(hashlib.blake2b(archive.encode() + data_pkl, digest_size=16).digest(),
                                          "big")).zfill(40).encode()
    payloads = (data_pkl, b"little", b"3\n", serialization_id)
    names = [f"{archive}/data/{i}" for i in range(len(entries))]
    names += [f"{archive}/{n}" for n in ("data.pkl", "byteorder", "version", ".data/serialization_id")]
    sizes = [types.nbytes(e.dtype, e.shape) for e in entries] + [len(p) for p in payloads]
    records = []
    pos = 0
    for name, size in zip(names, sizes):
        raw = name.encode("ascii")
        unpadded = pos + _LOCAL.size + len(raw) + _LOCAL_ZIP64.size + 4
        start = unpadded + (-unpadded) % ALIGN
        records.append(_Record(raw, pos, start, size))
        pos = start + size
    cd_size = sum(_CENTRAL.size + len(r.name) + _CENTRAL_ZIP64.size for r in records)
    size = pos + cd_size + _EOCD64.size + _LOCATOR64.size + _EOCD.size
    spans = tuple((r.start, r.start + r.size) for r in records[: len(entries)])
    return TorchZipLayout(entries, tuple((a.key, a.value) for a in attrs), archive, tuple(records), payloads,
                          spans, pos, cd_size, size)


def _validate(entries: tuple[PtEntry, ...], attrs: tuple[_Attr, ...], archive: str) -> None:
    problems = []
    if not archive or "/" in archive or not archive.isascii() or not archive.isprintable():
        problems.append(f"archive name {archive!r} is not a printable ASCII name without '/'. Use e.g. 'archive'.")
    seen: set[tuple[str, str]] = set()
    for e in entries:
        if e.dtype not in types.DTYPES:
            problems.append(f"{e.label}: unknown dtype {e.dtype!r} (expected one of {', '.join(types.DTYPES)}).")
        if any(s < 0 for s in e.shape):
            problems.append(f"{e.label}: shape {e.shape} has a negative size.")
        if type(e.group) is not str or type(e.name) is not str or not e.group:
            problems.append(f"{e.label}: group and name must be plain str (got {type(e.group).__name__}, "
                            f"{type(e.name).__name__}), and the group must not be empty.")
        if (e.group, e.name) in seen:
            problems.append(f"{e.label}: listed twice. Each tensor must appear once.")
        seen.add((e.group, e.name))
    groups = {g for g, _ in seen}
    keys: set[str] = set()
    for a in attrs:
        if type(a.key) is not str or a.key in groups or a.key in keys:
            problems.append(f"attr {a.key!r}: not a plain str, or already used as a group or attr key.")
        keys.add(a.key)
        # Exact types: a subclass such as numpy.float64 would pickle as a numpy global that
        # weights_only=True refuses.  An argparse.Namespace of scalars (MindSpeed's ``args``) is the one
        # container: it loads with weights_only=True once the caller allows argparse.Namespace.
        if type(a.value) is argparse.Namespace:
            bad = [k for k, v in vars(a.value).items() if type(v) not in _SCALARS]
            if bad:
                problems.append(f"attr {a.key!r}: namespace fields {bad} are not int, float, str, bool or None.")
        elif type(a.value) not in _SCALARS:
            problems.append(f"attr {a.key!r}: value of type {type(a.value).__name__} is not int, float, str, "
                            f"bool or None. Convert it (e.g. int(x)); only these load with weights_only=True.")
    if problems:
        raise ValidationError(problems)


# --- the pickle ------------------------------------------------------------------------------------------------

class _StorageRef(tuple):
    """A storage's persistent id; its own type so that no real tuple is mistaken for one."""


class _TensorRef:
    __slots__ = ("reduced",)

    def __init__(self, key: str, entry: PtEntry):
        dt, shape, numel = types.dtype(entry.dtype), entry.shape, math.prod(entry.shape)
        # torch's contiguous strides count a 0-size dim as 1
        stride = tuple(math.prod(max(s, 1) for s in shape[d + 1:]) for d in range(len(shape)))
        if dt.legacy_storage is not None:
            storage = _StorageRef(("storage", getattr(torch, dt.legacy_storage), key, "cpu", numel))
            args = (storage, 0, shape, stride, False, collections.OrderedDict())
            self.reduced = (torch._utils._rebuild_tensor_v2, args)
        else:
            storage = _StorageRef(("storage", torch.storage.UntypedStorage, key, "cpu", numel * dt.itemsize))
            args = (storage, 0, shape, stride, False, collections.OrderedDict(), dt.torch)
            self.reduced = (torch._utils._rebuild_tensor_v3, args)


class _PlaceholderPickler(pickle.Pickler):
    """Pickles :class:`_TensorRef` exactly as torch.save pickles a tensor with its own storage."""

    def persistent_id(self, obj):
        return tuple(obj) if type(obj) is _StorageRef else None

    def reducer_override(self, obj):
        return obj.reduced if type(obj) is _TensorRef else NotImplemented


def _pickle(entries: tuple[PtEntry, ...], attrs: tuple[_Attr, ...], groups: tuple[str, ...] = ()) -> bytes:
    obj: dict = {g: collections.OrderedDict() for g in groups}
    for i, e in enumerate(entries):
        obj.setdefault(e.group, collections.OrderedDict())[e.name] = _TensorRef(str(i), e)
    for a in attrs:
        obj[a.key] = a.value
    buf = io.BytesIO()
    _PlaceholderPickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


# --- zip headers -----------------------------------------------------------------------------------------------

def _local_header(r: _Record, crc: int) -> bytes:
    pad = r.start - (r.header + _LOCAL.size + len(r.name) + _LOCAL_ZIP64.size + 4)
    extra = _LOCAL_ZIP64.pack(1, 16, r.size, r.size) + struct.pack("<HH", _PAD_ID, pad) + b"Z" * pad
    return (_LOCAL.pack(0x04034B50, _VERSION, 0, 0, 0, _DOS_DATE, crc, _U32, _U32, len(r.name), len(extra))
            + r.name + extra)


def _central_header(r: _Record, crc: int) -> bytes:
    extra = _CENTRAL_ZIP64.pack(1, 24, r.size, r.size, r.header)
    return (_CENTRAL.pack(0x02014B50, _VERSION, _VERSION, 0, 0, 0, _DOS_DATE, crc, _U32, _U32, len(r.name),
                          len(extra), 0, 0, 0, 0, _U32) + r.name + extra)


def _tail(layout: TorchZipLayout, crcs: list[int]) -> bytes:
    """Everything after the last tensor record: small records, central directory, end records."""
    n = len(layout.entries)
    out = bytearray()
    for r, payload in zip(layout.records[n:], layout.payloads):
        crc = zlib.crc32(payload)
        crcs = crcs + [crc]
        out += _local_header(r, crc) + payload
    out += b"".join(_central_header(r, c) for r, c in zip(layout.records, crcs))
    count, eocd64 = len(layout.records), layout.cd_offset + layout.cd_size
    out += _EOCD64.pack(0x06064B50, _EOCD64.size - 12, _VERSION, _VERSION, 0, 0, count, count,
                        layout.cd_size, layout.cd_offset)
    out += _LOCATOR64.pack(0x07064B50, 0, eocd64, 1)
    out += _EOCD.pack(0x06054B50, 0, 0, min(count, _U16), min(count, _U16), min(layout.cd_size, _U32),
                      min(layout.cd_offset, _U32), 0)
    return bytes(out)


# --- the write protocol (see the module docstring) ------------------------------------------------------------

def create(path: str, layout: TorchZipLayout) -> None:
    """Create the temporary file at its final size (sparse: nothing is written yet)."""
    _pieces.create_temp(path, layout.size)


def write_piece(path: str, layout: TorchZipLayout, index: int, data: torch.Tensor | np.ndarray | bytes,
                offset: int = 0) -> Piece:
    """Write ``data`` at byte ``offset`` of entry ``index`` and return ``(index, offset, length, crc32)``.

    ``data`` is a tensor of the entry's dtype (made contiguous here), or raw bytes (``bytes``, a uint8 array).
    Thread- and process-safe: it opens the temp file, writes with write-behind and closes it.
    """
    return _pieces.write_piece(path, layout, index, data, offset)


def finish(path: str, layout: TorchZipLayout, pieces: Iterable[Piece]) -> list[int]:
    """Check that ``pieces`` cover every entry exactly, write headers and pickle, fsync, rename
    into place. Returns each entry's CRC32 (the run journal records them; ``verify`` re-computes them).

    Exact duplicate pieces (a retried task) count once. Raises :class:`ValidationError` naming every tensor
    with a gap or an overlap; the temporary file is then left as it is.
    """
    crcs = _pieces.entry_crcs(path, layout, pieces)
    n = len(layout.entries)
    patches = [(r.header, _local_header(r, crc)) for r, crc in zip(layout.records[:n], crcs)]
    patches.append((layout.records[n].header, _tail(layout, crcs)))
    _pieces.commit(path, layout.size, patches)
    return crcs


def abort(path: str) -> None:
    """Remove the temporary file, if any. The final name is never touched."""
    _pieces.abort(path)


def save_streaming(path: str, groups: Mapping[str, Mapping[str, torch.Tensor]],
                   attrs: Mapping[str, Scalar] | None = None, archive: str = "archive") -> TorchZipLayout:
    """Write ``{group: OrderedDict(tensors), ..., **attrs}`` in one call (create, write each tensor, finish).

    Example:
        >>> save_streaming("model_optim_rng.pt", {"model": state_dict},
        ...                {"checkpoint_version": 3.0, "iteration": 1})  # doctest: +SKIP
    """
    empty = [g for g, tensors in groups.items() if not tensors]
    if empty:
        raise ValidationError([f"group {g!r}: no tensors. A group exists only through its tensors." for g in empty])
    tensors = [t for ts in groups.values() for t in ts.values()]
    entries = tuple(PtEntry(g, name, types.from_torch(t.dtype).name, tuple(t.shape))
                    for g, ts in groups.items() for name, t in ts.items())
    layout = compute_layout(entries, tuple((attrs or {}).items()), archive)
    create(path, layout)
    try:
        pieces = [write_piece(path, layout, i, t) for i, t in enumerate(tensors)]
        finish(path, layout, pieces)
    except BaseException:
        abort(path)
        raise
    return layout
