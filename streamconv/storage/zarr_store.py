"""Zarr v3 arrays as streamconv writes and reads them: codecs, array metadata, chunk keys, band reads.

A store written by ``hf2zarr`` / ``mcore2zarr`` is a plain zarr v3 directory store::

    STORE/zarr.json                  root group; attributes {"streamconv": {...}} (what wrote it, codec)
    STORE/hf/zarr.json               group whose attributes keep the HF checkpoint's other files (config.json,
                                     tokenizer, index) verbatim and its shard layout, for zarr2hf
    STORE/<HF name>/zarr.json        one array per HF tensor at its global shape (HF names as array paths); a
                                     layer's routed experts of one projection are one stack [experts, ...]
                                     named with the range for the index (``...experts.0-255.gate_proj.weight``)
    STORE/<HF name>/c/<i>/<j>        its shards: ``sharding_indexed`` with a crc32c index at the end; inner
                                     chunks in C order (the file format is :mod:`streamconv.storage.zarr_shard`)

bfloat16 and float8 have no zarr v3 data type: they are stored as ``uint16`` / ``uint8`` with the dtype in the
array's attributes (``{"dtype": "float8_e4m3fn"}``), so an FP8 release stays FP8 with its ``*_scale_inv``
(float32) arrays beside it.

Reads (:func:`read_region`) are band reads: a hypercube of an array reads the shard indexes it needs once per
process (cached by file identity) and, per shard, one positional read per run of adjacent inner chunks that
overlap the band: nothing else.  They accept stores written by zarr-python too (sharded or not; ``bytes``
little or big endian, then zstd, blosc or gzip).
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from .. import types
from ..errors import FormatError, ValidationError
from . import fileio
from .safetensors import bytes_to_tensor

META = "zarr.json"
META_LIMIT = 16 << 20   # an array's zarr.json: shape, codecs, attributes (a few KB in practice)
COMPRESSORS = ("none", "zstd", "blosc")
STORED_AS = {"bfloat16": "uint16", "float8_e4m3fn": "uint8", "float8_e5m2": "uint8"}
NATIVE = ("bool", "uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64")
EMPTY = (1 << 64) - 1          # a missing inner chunk in a shard index
DTYPE_ATTR = "dtype"           # the array attribute that names a dtype zarr lacks


# --- codecs ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Codec:
    """How inner chunks are compressed: ``none``, ``zstd`` at ``level``, or ``blosc`` (zstd inside, byte
    shuffle at the dtype's width) at ``level``.  Encoding goes through numcodecs, which zarr-python decodes with."""

    name: str = "none"
    level: int = 3

    def __post_init__(self) -> None:
        problems = []
        if self.name not in COMPRESSORS:
            problems.append(f"compressor {self.name!r} (expected one of {', '.join(COMPRESSORS)}).")
        if type(self.level) is not int or not 1 <= self.level <= 9:
            problems.append(f"compression level {self.level!r} (expected an integer from 1 to 9).")
        if problems:
            raise ValidationError(problems)

    @property
    def compressed(self) -> bool:
        return self.name != "none"

    def encode(self, raw: np.ndarray, itemsize: int) -> bytes:
        """One inner chunk's bytes (uint8, little endian, C order) as stored."""
        if not self.compressed:
            return raw.tobytes()
        return bytes(_numcodec(self.name, self.level, itemsize).encode(np.ascontiguousarray(raw)))

    def zarr_codecs(self, itemsize: int) -> list[dict]:
        """The inner chunks' codec list as zarr.json spells it."""
        out = [{"name": "bytes", "configuration": {"endian": "little"}}]
        if self.name == "zstd":
            out.append({"name": "zstd", "configuration": {"level": self.level, "checksum": False}})
        elif self.name == "blosc":
            out.append({"name": "blosc", "configuration": {"typesize": itemsize, "cname": "zstd",
                                                           "clevel": self.level, "shuffle": "shuffle",
                                                           "blocksize": 0}})
        return out


@functools.lru_cache(maxsize=64)
def _numcodec(name: str, level: int, itemsize: int):
    import numcodecs

    if name == "zstd":
        return numcodecs.Zstd(level=level, checksum=False)
    if name == "blosc":
        return numcodecs.Blosc(cname="zstd", clevel=level, shuffle=numcodecs.Blosc.SHUFFLE, typesize=itemsize)
    return numcodecs.GZip(level=level)


def decompress(name: str, blob, itemsize: int, where: str) -> bytes:
    """A ``zstd``/``blosc``/``gzip`` chunk decoded; a damaged one is a :class:`FormatError` naming ``where``."""
    try:
        return bytes(_numcodec(name, 1, itemsize).decode(blob))
    except Exception as exc:  # each codec library raises its own type
        raise FormatError(f"{where}: a {name} chunk does not decode ({exc.__class__.__name__}). The file is "
                          f"corrupt; re-create it.") from None


def crc32c(data) -> int:
    """CRC32C (Castagnoli) of ``data``, as zarr's ``crc32c`` codec appends it (little endian)."""
    from numcodecs.checksum32 import crc32c_checksum

    if crc32c_checksum is None:  # pragma: no cover - zarr 3 installs google-crc32c
        raise FormatError("crc32c: neither google-crc32c nor crc32c is installed (pip install google-crc32c).")
    return crc32c_checksum(data if isinstance(data, bytes) else memoryview(data).cast("B").tobytes(), 0)


def stored_dtype(dtype: str) -> tuple[str, dict]:
    """``(zarr data_type, attributes)`` that hold one of our dtypes."""
    if dtype in STORED_AS:
        return STORED_AS[dtype], {DTYPE_ATTR: dtype}
    if dtype in NATIVE:
        return dtype, {}
    raise ValidationError(f"dtype {dtype!r} has no zarr data type (expected one of "
                          f"{', '.join(NATIVE + tuple(STORED_AS))}).")


# --- array metadata (written through zarr-python) ----------------------------------------------------------------

@functools.lru_cache(maxsize=4096)
def array_json(shape: tuple[int, ...], dtype: str, shard: tuple[int, ...], chunk: tuple[int, ...],
               codec: Codec) -> str:
    """The ``zarr.json`` of an array of ``shape`` and ``dtype`` in shards of ``shard`` holding inner chunks of
    ``chunk`` (crc32c index at the end), as zarr-python writes it.  Cached: a model has few distinct shapes."""
    import zarr
    from zarr.codecs import BloscCodec, ZstdCodec
    from zarr.storage import MemoryStore

    stored, attrs = stored_dtype(dtype)
    itemsize = types.dtype(dtype).itemsize
    compressors = None
    if codec.name == "zstd":
        compressors = [ZstdCodec(level=codec.level, checksum=False)]
    elif codec.name == "blosc":
        compressors = [BloscCodec(cname="zstd", clevel=codec.level, shuffle="shuffle", typesize=itemsize)]
    docs: dict = {}
    zarr.create_array(MemoryStore(docs), shape=shape, dtype=stored, chunks=chunk, shards=shard,
                      compressors=compressors, fill_value=0, attributes=attrs, zarr_format=3,
                      write_data=False)
    text = docs[META].to_bytes().decode() + "\n"
    got = parse_meta(json.loads(text), "<array_json>")
    if got.inner != tuple(chunk) or got.compressor != codec.name:  # what our shard writer assumes
        raise ValidationError(f"zarr-python wrote {got} for {codec}; this zarr version is not supported.")
    return text


def group_json(attributes: dict) -> str:
    """The ``zarr.json`` of a group with ``attributes``."""
    return json.dumps({"zarr_format": 3, "node_type": "group", "attributes": attributes}, indent=2,
                      sort_keys=True) + "\n"


@dataclass(frozen=True)
class ArrayMeta:
    """What a band read needs of an array's ``zarr.json``."""

    shape: tuple[int, ...]
    stored: str                    # zarr data_type
    dtype: str                     # our dtype name (attribute ``dtype``, or the stored type)
    outer: tuple[int, ...]         # the chunk grid's chunk shape: the shard shape when sharded
    inner: tuple[int, ...] | None  # inner chunk shape when sharded
    compressor: str                # none, zstd, blosc, gzip (after the bytes codec)
    big_endian: bool
    index_at_end: bool
    index_crc: bool
    separator: str
    v2_keys: bool
    fill: object

    @property
    def itemsize(self) -> int:
        return np.dtype(self.stored).itemsize


def parse_meta(obj: dict, where: str) -> ArrayMeta:
    """An array's zarr.json, checked; anything a band read cannot honour is one :class:`FormatError`."""
    def fail(what: str) -> FormatError:
        return FormatError(f"{where}: {what}. streamconv reads zarr v3 arrays with a regular chunk grid and the "
                           f"bytes codec (optionally sharded, then zstd, blosc or gzip).")

    if not isinstance(obj, dict) or obj.get("zarr_format") != 3 or obj.get("node_type") != "array":
        raise fail("not a zarr v3 array document")
    try:
        shape = tuple(int(s) for s in obj["shape"])
        stored = str(obj["data_type"])
        grid = obj["chunk_grid"]
        outer = tuple(int(c) for c in grid["configuration"]["chunk_shape"])
        keys = obj.get("chunk_key_encoding") or {"name": "default"}
        codecs = list(obj["codecs"])
    except (KeyError, TypeError, ValueError):
        raise fail("missing or malformed shape, data_type, chunk_grid or codecs") from None
    if grid.get("name") != "regular" or len(outer) != len(shape) or any(c < 1 for c in outer):
        raise fail(f"chunk grid {grid!r} is not a regular grid over {len(shape)} dims")
    attr = (obj.get("attributes") or {}).get(DTYPE_ATTR)
    dtype = attr if attr in STORED_AS and STORED_AS[attr] == stored else stored
    if dtype not in types.DTYPES:
        raise fail(f"data_type {stored!r} (expected one of {', '.join(NATIVE)}, or uint8/uint16 with a dtype "
                   f"attribute naming one of {', '.join(STORED_AS)})")
    inner = None
    index_at_end, index_crc = True, False
    if len(codecs) == 1 and codecs[0].get("name") == "sharding_indexed":
        conf = codecs[0].get("configuration") or {}
        try:
            inner = tuple(int(c) for c in conf["chunk_shape"])
            codecs = list(conf["codecs"])
            index_codecs = [c.get("name") for c in conf.get("index_codecs", [])]
        except (KeyError, TypeError, ValueError):
            raise fail("malformed sharding_indexed configuration") from None
        if len(inner) != len(shape) or any(c < 1 or o % c for o, c in zip(outer, inner)):
            raise fail(f"inner chunks {list(inner)} do not tile shards {list(outer)}")
        if index_codecs not in (["bytes"], ["bytes", "crc32c"]):
            raise fail(f"shard index codecs {index_codecs} (expected bytes, optionally crc32c)")
        index_at_end = conf.get("index_location", "end") == "end"
        index_crc = index_codecs == ["bytes", "crc32c"]
    names = [c.get("name") for c in codecs]
    if not names or names[0] != "bytes" or len(names) > 2 or (len(names) == 2 and names[1] not in
                                                              ("zstd", "blosc", "gzip")):
        raise fail(f"codecs {names}")
    big = ((codecs[0].get("configuration") or {}).get("endian", "little") == "big")
    sep = (keys.get("configuration") or {}).get("separator", "/" if keys.get("name") == "default" else ".")
    fill = obj.get("fill_value", 0)
    if isinstance(fill, str):
        fill = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}.get(fill, 0)
    return ArrayMeta(shape, stored, dtype, outer, inner, names[1] if len(names) == 2 else "none", big,
                     index_at_end, index_crc, sep, keys.get("name") == "v2", fill)


def load_meta(path: str) -> ArrayMeta:
    """The metadata of the array directory ``path`` (cached while its zarr.json is unchanged)."""
    doc = os.path.join(path, META)
    try:
        st = os.stat(doc)
    except OSError:
        raise FormatError(f"{doc}: missing; {path} is not a zarr array. Check --load-dir.") from None
    return _load_meta(doc, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4096)
def _load_meta(doc: str, _size: int, _mtime: int) -> ArrayMeta:
    try:
        obj = fileio.read_json(doc, META_LIMIT, what="array's zarr.json")
    except FileNotFoundError:
        raise FormatError(f"{doc}: missing; its array is not a zarr array. Check --load-dir.") from None
    return parse_meta(obj, doc)


def chunk_key(meta: ArrayMeta, idx: tuple[int, ...]) -> str:
    """The store key of outer chunk ``idx`` ("c/0/1" with the default encoding), '/'-separated on disk."""
    parts = [str(i) for i in idx]
    key = meta.separator.join(parts) if meta.v2_keys else meta.separator.join(["c"] + parts)
    return key if key else "0"


# --- band reads -----------------------------------------------------------------------------------------------------

def read_region(path: str, dtype: str, shape: tuple[int, ...], offsets: tuple[int, ...],
                lengths: tuple[int, ...]) -> torch.Tensor:
    """Elements ``[offsets, offsets + lengths)`` of the array at directory ``path``, as a tensor of ``dtype``.

    Reads, per shard the band overlaps, the shard's index (once per process) and one positional read per run of
    adjacent needed inner chunks; chunks never written read as the fill value.  Raises :class:`FormatError`
    naming the file when the array is not what the plan expects or a shard is damaged."""
    meta = load_meta(path)
    if meta.shape != tuple(shape) or meta.dtype != dtype:
        raise FormatError(f"{path}: {meta.dtype}{list(meta.shape)} in the store (the plan expects {dtype}"
                          f"{list(shape)}). The store changed since the plan was made; re-create the plan.")
    npdt = np.dtype(meta.stored).newbyteorder(">" if meta.big_endian else "<")
    out = np.empty(tuple(lengths), dtype=npdt)  # every element lies in one chunk: placed, or filled if missing
    if all(n > 0 for n in lengths):
        ranges = [range(o // c, -(-(o + n) // c)) for o, n, c in zip(offsets, lengths, meta.outer)]
        for idx in itertools.product(*ranges):
            origin = tuple(i * c for i, c in zip(idx, meta.outer))
            file = os.path.join(path, *chunk_key(meta, idx).split("/"))
            if meta.inner is None:
                _read_chunk(file, meta, npdt, origin, offsets, lengths, out)
            else:
                _read_shard(file, meta, npdt, origin, offsets, lengths, out)
    if npdt.byteorder == ">":
        out = out.astype(npdt.newbyteorder("<"))
    return bytes_to_tensor(np.ascontiguousarray(out).reshape(-1).view(np.uint8), dtype, tuple(lengths))


def _decode(meta: ArrayMeta, blob, shape: tuple[int, ...], npdt: np.dtype, file: str) -> np.ndarray:
    data = blob if meta.compressor == "none" else decompress(meta.compressor, blob, meta.itemsize, file)
    want = math.prod(shape) * npdt.itemsize
    if len(memoryview(data).cast("B")) != want:
        raise FormatError(f"{file}: a chunk decodes to {len(memoryview(data).cast('B'))} bytes (expected {want} "
                          f"for {list(shape)} {meta.stored}). The shard is corrupt; re-create the store.")
    return np.frombuffer(data, dtype=npdt).reshape(shape)


def _place(chunk: np.ndarray | None, origin: tuple[int, ...], offsets, lengths, out: np.ndarray,
           shape: tuple[int, ...] = (), fill=0) -> None:
    """Copy the part of ``chunk`` (at global ``origin``) that lies in the band into ``out``; with ``chunk`` None
    (never written), set that part of a chunk of ``shape`` to ``fill``."""
    src, dst = [], []
    for g, c, o, n in zip(origin, chunk.shape if chunk is not None else shape, offsets, lengths):
        lo, hi = max(g, o), min(g + c, o + n)
        if lo >= hi:
            return
        src.append(slice(lo - g, hi - g))
        dst.append(slice(lo - o, hi - o))
    out[tuple(dst)] = chunk[tuple(src)] if chunk is not None else fill


def _read_chunk(file: str, meta: ArrayMeta, npdt, origin, offsets, lengths, out) -> None:
    if not os.path.exists(file):
        _place(None, origin, offsets, lengths, out, meta.outer, meta.fill)
        return
    blob = fileio.read_range(file, 0, os.path.getsize(file))
    _place(_decode(meta, blob, meta.outer, npdt, file), origin, offsets, lengths, out)


def _read_shard(file: str, meta: ArrayMeta, npdt, origin, offsets, lengths, out) -> None:
    try:
        st = os.stat(file)
    except FileNotFoundError:
        _place(None, origin, offsets, lengths, out, meta.outer, meta.fill)
        return
    grid = tuple(o // i for o, i in zip(meta.outer, meta.inner))
    index = shard_index(file, st.st_size, st.st_mtime_ns, math.prod(grid), meta.index_at_end, meta.index_crc)
    ranges = []
    for g, i, o, n, size in zip(origin, meta.inner, offsets, lengths, meta.outer):
        lo, hi = max(o, g) - g, min(o + n, g + size) - g
        ranges.append(range(lo // i, -(-hi // i)))
    wanted = []
    for cidx in itertools.product(*ranges):
        start, nbytes = (int(v) for v in index[np.ravel_multi_index(cidx, grid) if grid else 0])
        if start != EMPTY:
            wanted.append((start, nbytes, cidx))
        else:
            corner = tuple(g + c * i for g, c, i in zip(origin, cidx, meta.inner))
            _place(None, corner, offsets, lengths, out, meta.inner, meta.fill)
    wanted.sort()
    fd = os.open(file, os.O_RDONLY)
    try:
        k = 0
        while k < len(wanted):  # one read per run of chunks that lie back to back in the file
            end = k + 1
            while end < len(wanted) and wanted[end][0] == wanted[end - 1][0] + wanted[end - 1][1]:
                end += 1
            run_start = wanted[k][0]
            buf = np.empty(wanted[end - 1][0] + wanted[end - 1][1] - run_start, dtype=np.uint8)
            fileio.pread_into(fd, buf, run_start, path=file)
            for start, nbytes, cidx in wanted[k:end]:
                chunk = _decode(meta, buf[start - run_start:start - run_start + nbytes], meta.inner, npdt, file)
                corner = tuple(g + c * i for g, c, i in zip(origin, cidx, meta.inner))
                _place(chunk, corner, offsets, lengths, out)
            k = end
    finally:
        os.close(fd)


@functools.lru_cache(maxsize=1024)
def shard_index(file: str, size: int, _mtime: int, count: int, at_end: bool, with_crc: bool) -> np.ndarray:
    """The ``[count, 2]`` (offset, nbytes) index of a shard file, checked (cached by file identity)."""
    nbytes = 16 * count + (4 if with_crc else 0)
    if size < nbytes:
        raise FormatError(f"{file}: {size} bytes cannot hold a {count}-chunk shard index (truncated?). "
                          f"Re-create the store.")
    raw = fileio.read_range(file, size - nbytes if at_end else 0, nbytes)
    body = raw[:16 * count]
    if with_crc and crc32c(body) != int.from_bytes(raw[16 * count:].tobytes(), "little"):
        raise FormatError(f"{file}: shard index checksum mismatch (corrupted or truncated). Re-create the store.")
    index = body.view("<u8").reshape(count, 2)
    present = index[:, 0] != EMPTY
    if np.any(index[present, 0] + index[present, 1] > size):
        raise FormatError(f"{file}: shard index points past the end of the file (truncated?). Re-create the store.")
    return index
