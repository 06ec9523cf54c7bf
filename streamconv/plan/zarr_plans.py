"""Plans that write and read zarr stores: ``hf2zarr``, ``mcore2zarr``, ``zarr2hf``.

Every one goes through :class:`HFLayout`, an HF checkpoint as the planners see it: its safetensors shards (each
tensor a graph node, in file order, with the shard's ``__metadata__``) and its other files (name, text; the
index last).  ``hf2zarr`` takes it from an HF directory (raw reads: FP8 stays FP8, scales beside it) or from
another store (re-chunk, re-compress), ``mcore2zarr`` from the mcore -> HF plan (the HF checkpoint mcore2hf
would write, never written), and ``zarr2hf`` rebuilds it from the store's ``hf`` record.  So zarr2hf gives back
the HF checkpoint a store was made from byte for byte, whichever way it was made.

Chunks (see :func:`chunking`): inner chunks are ``edge`` rows (the family's FP8 block edge) by the widest
multiple of ``edge`` that divides the dim's ``align``-way split (TP/EP up to 8 by default) within
``chunk_bytes``; shards are full-width bands of chunk rows up to ``shard_bytes``; each shard file's entries are
bands of chunk rows up to ``entry_bytes`` (one write task each; 64 MiB, the executor's band: 4 MiB entries made
hf2zarr 1.3-1.9x slower on a 4 GB slice, from the per-write flush and the many small reads).  Chunks and shards tile every array exactly.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass

from .. import __version__
from ..errors import ValidationError
from ..graph.node import Node, Op, cat, narrow_dim, transpose, view
from ..models import model_for_config
from ..storage import zarr_store
from ..storage.safetensors import SAFETENSORS
from ..storage.zarr_shard import ZARR
from ..storage.zarr_store import Codec
from .mcore2hf import COMPANION_LIMIT, CONFIG
from .plan import Dropped, OutputFile, OutputTensor, Plan, ReplicaCheck, SourceFile
from .sources import INDEX_NAME, HFSource
from .trust import check_disjoint
from .zarr_source import HF_GROUP, ZarrSource, open_hf_source

log = logging.getLogger(__name__)
MiB = 1 << 20
# Measured on weights (docs/performance.md): zstd compresses them as well at level 1 as at 3 (FP8 0.82 both,
# N(0, 0.02) bf16 0.78 both) and up to 5x faster; blosc's byte shuffle gains at 3 (bf16 0.74 against 0.78).
DEFAULT_LEVEL = {"zstd": 1, "blosc": 3}
STORE_VERSION = 2   # 2: routed experts stacked (``stacks`` in the hf record); 1 is read as before


@dataclass(frozen=True)
class StoreOptions:
    """How a store is laid out (``--compressor``, ``--compression-level``, ``--chunk-edge``)."""

    compressor: str = "none"
    level: int | None = None         # None: the codec's default (DEFAULT_LEVEL)
    chunk_edge: int | None = None    # None: the model family's FP8 block edge
    align: int = 8                   # chunks also tile a dim split this many ways, where the dim allows
    chunk_bytes: int = 1 * MiB
    shard_bytes: int = 256 * MiB
    entry_bytes: int = 64 * MiB      # one write task each: the executor's default band
    stack_experts: bool = True       # a layer's routed experts as one array per projection (and per scale)

    @property
    def codec(self) -> Codec:
        return Codec(self.compressor, DEFAULT_LEVEL.get(self.compressor, 3) if self.level is None else self.level)


@dataclass(frozen=True)
class HFShard:
    file: str
    tensors: tuple[tuple[str, Node], ...]     # in file order
    metadata: tuple[tuple[str, str], ...]
    header_sha256: str = ""                    # of the original file's header ("" when it never existed)


@dataclass(frozen=True)
class HFLayout:
    """An HF checkpoint as shards of nodes plus its other files (name, text), the index last."""

    shards: tuple[HFShard, ...]
    files: tuple[tuple[str, str], ...]

    def config(self) -> dict:
        text = dict(self.files).get(CONFIG)
        if text is None:
            raise ValidationError(f"{CONFIG}: missing from the HF checkpoint; the store needs it (the model family "
                                  f"decides the chunk edge, and zarr2hf gives it back).")
        return json.loads(text)


# --- chunking -----------------------------------------------------------------------------------------------------

def _divisor_at_most(n: int, cap: int) -> int:
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def _aligned_edge(size: int, edge: int, align: int, cap: int) -> int:
    """The widest multiple of ``edge`` (at most ``cap``) that divides ``size / a``, for the largest a <= align
    (a power of two) for which ``edge`` divides ``size / a``: chunk borders then fall on every a-way split."""
    a = align
    while a > 1 and (size % a or (size // a) % edge):
        a //= 2
    span = size // a
    return max(c for c in range(edge, max(edge, min(cap, span)) + 1, edge) if span % c == 0)


def chunking(shape: tuple[int, ...], itemsize: int, edge: int, opts: StoreOptions
             ) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """``(inner chunk shape, shard shape, chunk rows per entry)`` of an array (see the module docstring)."""
    if not shape:
        raise ValidationError("a 0-d tensor: zarr stores of streamconv hold tensors of at least one dim.")
    rows = shape[0]
    if len(shape) == 2:
        cols = shape[1]
        if rows % edge == 0 and rows > edge:
            chunk_rows = edge
        else:
            chunk_rows = rows if rows <= 8 * edge else _divisor_at_most(rows, edge)
        cap = max(edge, opts.chunk_bytes // max(chunk_rows * itemsize, 1))
        if cols % edge == 0 and cols > edge:
            chunk_cols = _aligned_edge(cols, edge, opts.align, cap)
        else:
            chunk_cols = cols if cols * chunk_rows * itemsize <= 4 * opts.chunk_bytes else _divisor_at_most(cols, cap)
        chunk = (chunk_rows, max(chunk_cols, 1))
    elif len(shape) == 1:
        cap = max(edge, opts.chunk_bytes // itemsize)
        chunk = (_aligned_edge(rows, edge, opts.align, cap) if rows % edge == 0 and rows > edge
                 else rows if rows <= cap else _divisor_at_most(rows, cap),)
    else:
        chunk = ((edge if rows % edge == 0 else _divisor_at_most(rows, edge)),) + tuple(shape[1:])
    chunk = tuple(max(c, 1) for c in chunk)
    row_bytes = chunk[0] * itemsize
    for n in shape[1:]:
        row_bytes *= n
    units = max(rows // chunk[0], 1)           # chunk rows in the array
    per_shard = _divisor_at_most(units, max(1, opts.shard_bytes // max(row_bytes, 1)))
    per_entry = _divisor_at_most(per_shard, max(1, opts.entry_bytes // max(row_bytes, 1)))
    shard = (per_shard * chunk[0],) + tuple(shape[1:])
    return chunk, shard, per_entry


def stacked_chunking(shape: tuple[int, ...], itemsize: int, edge: int, opts: StoreOptions
                     ) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """:func:`chunking` of a stack ``[n, rows, cols]``: inner chunks are one element's (an expert's) chunks, so a
    chunk never mixes experts; a shard holds whole experts (a divisor of n within ``shard_bytes``), an entry
    whole experts within ``entry_bytes``."""
    inner, _, _ = chunking(tuple(shape[1:]), itemsize, edge, opts)
    one = itemsize * math.prod(shape[1:])
    per_shard = _divisor_at_most(shape[0], max(1, opts.shard_bytes // max(one, 1)))
    per_entry = _divisor_at_most(per_shard, max(1, opts.entry_bytes // max(one, 1)))
    return (1,) + inner, (per_shard,) + tuple(shape[1:]), per_entry


def _entry(src: Node, start: int, rows: int, chunk: tuple[int, ...]) -> Node:
    """Rows ``[start, start + rows)`` of ``src`` (whole chunk rows) as the stack of their inner chunks, in the
    shard index's order: one read of the rows, regrouped by views and one transpose (one copy when run)."""
    if len(chunk) == 3 and chunk[0] == 1 and src.op is Op.CAT and len(src.src) == src.shape[0]:
        # a stack (a cat of its elements): each element's chunk grid regrouped by views, the cat last, so the
        # entry is one copy of strided reads rather than a copy of the cat and another of its transpose
        r, c = src.shape[1], src.shape[2]
        k = (r // chunk[1]) * (c // chunk[2])
        grids = [view(transpose(view(e, (r // chunk[1], chunk[1], c // chunk[2], chunk[2])), 1, 2), (k,) + chunk)
                 for e in src.src[start:start + rows]]
        return cat(grids, 0)
    band = narrow_dim(src, 0, start, start + rows)
    k = rows // chunk[0]
    if len(chunk) == 2 and chunk[1] != src.shape[1]:
        n = src.shape[1] // chunk[1]
        grid = transpose(view(band, (k, chunk[0], n, chunk[1])), 1, 2)   # [k, n, chunk rows, chunk cols]
        return view(grid, (k * n, chunk[0], chunk[1]))
    return view(band, (k,) + tuple(chunk))


def array_files(name: str, src: Node, edge: int, opts: StoreOptions, seq: int, stacked: bool = False
                ) -> tuple[list[OutputFile], int]:
    """The shard files and the zarr.json of the array ``name`` holding ``src`` (``stacked``: a stack of 2-D
    tensors along dim 0, see :func:`stacked_chunking`); ``seq`` numbers the writes."""
    cut = stacked_chunking if stacked else chunking
    chunk, shard, per_entry = cut(tuple(src.shape), _itemsize(src.dtype), edge, opts)
    codec = opts.codec
    attrs = (("codec", codec.name), ("level", codec.level), ("stacked", True))
    files = []
    for i, r0 in enumerate(range(0, src.shape[0], shard[0])):
        entries = []
        for e0 in range(r0, r0 + shard[0], per_entry * chunk[0]):
            entries.append(OutputTensor("", f"rows{e0}", _entry(src, e0, per_entry * chunk[0], chunk), seq))
            seq += 1
        key = "/".join(["c", str(i)] + ["0"] * (len(shard) - 1))
        files.append(OutputFile(f"{name}/{key}", ZARR.name, tuple(entries), attrs=attrs))
    files.append(OutputFile(f"{name}/{zarr_store.META}", "text",
                            text=zarr_store.array_json(tuple(src.shape), src.dtype, shard, chunk, codec)))
    return files, seq


def _itemsize(dtype: str) -> int:
    from .. import types

    return types.dtype(dtype).itemsize


# --- the store plan -------------------------------------------------------------------------------------------------

def _check_names(layout: HFLayout) -> None:
    problems = []
    for shard in layout.shards:
        for name, _ in shard.tensors:
            if "/" in name or name in (HF_GROUP, zarr_store.META) or name.startswith("__") or name.startswith("."):
                problems.append(f"{name}: cannot be a zarr array path (no '/', not {HF_GROUP!r} or "
                                f"{zarr_store.META!r}, no leading '__' or '.'). Rename the tensor.")
    if problems:
        raise ValidationError(problems)


def store_edge(layout: HFLayout, opts: StoreOptions) -> int:
    """The chunk edge: ``--chunk-edge``, else the model family's FP8 block edge."""
    if opts.chunk_edge is not None:
        if opts.chunk_edge < 1:
            raise ValidationError(f"--chunk-edge {opts.chunk_edge}: expected a positive integer.")
        return opts.chunk_edge
    spec = model_for_config(layout.config(), CONFIG)
    if spec.quant is None:
        raise ValidationError(f"{spec.title} has no block FP8 scheme to align chunks with. Pass --chunk-edge N.")
    return max(spec.quant.block)


def stacks(layout: HFLayout, opts: StoreOptions) -> dict[str, tuple[str, ...]]:
    """Array name -> the HF tensors it holds, element j being tensor j, for every group of routed-expert tensors
    of one layer and projection (the model family says which, :meth:`ModelSpec.expert_stack`) that has experts
    0..n-1, n >= 2, all 2-D of one dtype and shape.  A 671B store is then ~1 700 arrays, not ~92 000, and a
    rank's experts are a band of one array.  The array is named like its tensors with the index replaced by
    the range: ``model.layers.3.mlp.experts.0-255.gate_proj.weight``."""
    if not opts.stack_experts:
        return {}
    try:
        spec = model_for_config(layout.config(), CONFIG)
    except ValidationError:   # a family we do not know (its store needs --chunk-edge): every tensor its own array
        return {}
    nodes = {name: node for shard in layout.shards for name, node in shard.tensors}
    groups: dict[str, dict[int, str]] = {}   # stack key -> expert index -> tensor name
    for name in nodes:
        hit = spec.expert_stack(name)
        if hit is not None:
            groups.setdefault(hit[0], {})[hit[1]] = name
    out = {}
    for key, members in groups.items():
        n = len(members)
        if n < 2 or sorted(members) != list(range(n)):
            continue
        first = nodes[members[0]]
        if len(first.shape) != 2 or any(nodes[t].dtype != first.dtype or nodes[t].shape != first.shape
                                        for t in members.values()):
            continue
        array = key.replace("{j}", f"0-{n - 1}")
        if array not in nodes:
            out[array] = tuple(members[j] for j in range(n))
    return out


def plan_store(layout: HFLayout, save_dir: str, opts: StoreOptions, *, kind: str, source_root: str,
               source_files: tuple[SourceFile, ...], dropped: tuple[Dropped, ...] = (),
               checks: tuple[ReplicaCheck, ...] = (), options: dict | None = None) -> Plan:
    """The plan writing ``layout`` as a zarr store at ``save_dir`` (arrays, the ``hf`` record, the root last)."""
    _check_names(layout)
    edge = store_edge(layout, opts)
    stacked = stacks(layout, opts)
    member = {t: array for array, ts in stacked.items() for t in ts}
    nodes = {name: node for shard in layout.shards for name, node in shard.tensors}
    files: list[OutputFile] = []
    seq = 0
    for shard in layout.shards:
        for name, node in shard.tensors:
            array = member.get(name)
            if array is None:
                more, seq = array_files(name, node, edge, opts, seq)
            elif stacked[array][0] == name:   # the stack is written where its first element was
                parts = [view(nodes[t], (1,) + tuple(nodes[t].shape)) for t in stacked[array]]
                more, seq = array_files(array, cat(parts, 0), edge, opts, seq, stacked=True)
            else:
                continue
            files += more
    record = {"files": [list(f) for f in layout.files],
              "stacks": [[array, list(ts)] for array, ts in stacked.items()],
              "shards": [{"file": s.file, "metadata": [list(m) for m in s.metadata],
                          "tensors": [n for n, _ in s.tensors], "header_sha256": s.header_sha256}
                         for s in layout.shards]}
    files.append(OutputFile(f"{HF_GROUP}/{zarr_store.META}", "text", text=zarr_store.group_json(record)))
    root = {"streamconv": {"store_version": STORE_VERSION, "written_by": f"streamconv {__version__} {kind}",
                           "codec": asdict(opts.codec), "chunk_edge": edge,
                           "model_type": layout.config().get("model_type")}}
    files.append(OutputFile(zarr_store.META, "text", text=zarr_store.group_json(root)))  # last: marks it complete
    return Plan(kind=kind, source_root=source_root, source_files=source_files, target_root=save_dir,
                files=tuple(files), dropped=dropped, checks=checks,
                options=json.loads(json.dumps(dict(options or {}, store=asdict(opts)))))


# --- where an HF layout comes from ------------------------------------------------------------------------------

def layout_of_plan(plan: Plan) -> HFLayout:
    """The HF checkpoint an HF-writing plan (mcore2hf) describes: its safetensors files and text files."""
    shards = tuple(HFShard(f.path, tuple((t.name, t.node) for t in f.tensors), tuple(f.attrs))
                   for f in plan.files if f.format == SAFETENSORS.name)
    texts = tuple((f.path, f.text) for f in plan.files if f.format == "text")
    return HFLayout(shards, texts)


def companion_files(root: str) -> tuple[tuple[str, str], ...]:
    """The other files of an HF directory (config, tokenizer, generation config, index last), as text; files
    that are not UTF-8 or are bigger than 64 MiB are left out with a warning."""
    out, index = [], None
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if name.startswith(".") or name.endswith(".safetensors") or not os.path.isfile(path):
            continue
        if os.path.getsize(path) > COMPANION_LIMIT:
            log.warning("%s: bigger than %d bytes; not kept in the store", path, COMPANION_LIMIT)
            continue
        try:
            with open(path, encoding="utf-8", newline="") as f:
                text = f.read()
        except UnicodeDecodeError:
            log.warning("%s: not UTF-8 text; not kept in the store", path)
            continue
        if name == INDEX_NAME:
            index = (name, text)
        else:
            out.append((name, text))
    return tuple(out) + ((index,) if index else ())


def layout_of_source(src: HFSource) -> HFLayout:
    """An HF directory, or a store, as it is: every tensor raw (FP8 stays FP8, scales beside it)."""
    if isinstance(src, ZarrSource):
        shards = tuple(HFShard(s["file"], tuple((n, src.raw(n)) for n in s["tensors"]),
                               tuple(tuple(m) for m in s.get("metadata", ())), s.get("header_sha256", ""))
                       for s in src.record.get("shards", ()))
        if not shards:
            raise ValidationError(f"{src.root}: a zarr store without an '{HF_GROUP}' record; convert it from its HF "
                                  f"directory instead.")
        return HFLayout(shards, tuple(tuple(f) for f in src.record.get("files", ())))
    by_shard: dict[str, list[str]] = {}
    for name, (shard, _) in src.tensors.items():
        by_shard.setdefault(shard, []).append(name)
    shards = []
    for f in src.files:
        header = SAFETENSORS.index(os.path.join(src.root, f.name))
        names = [e.name for e in header.tensors]
        shards.append(HFShard(f.name, tuple((n, src.raw(n)) for n in names), header.attrs, f.header_sha256))
    return HFLayout(tuple(shards), companion_files(src.root))


def inexact_shards(layout: HFLayout) -> list[str]:
    """Shards whose original header our safetensors writer would not reproduce (another writer's formatting)."""
    import hashlib

    out = []
    for s in layout.shards:
        entries = [("", n, node.dtype, tuple(node.shape)) for n, node in s.tensors]
        header = SAFETENSORS.compute_layout(entries, s.metadata).header
        if s.header_sha256 and hashlib.sha256(header).hexdigest() != s.header_sha256:
            out.append(s.file)
    return out


# --- the three plans ------------------------------------------------------------------------------------------------

def plan_hf_to_zarr(load_dir: str, save_dir: str, opts: StoreOptions = StoreOptions()) -> Plan:
    """An HF directory (or a store) -> a zarr store holding every tensor as it is stored."""
    check_disjoint(save_dir, [("--load-dir", load_dir)])
    src = open_hf_source(load_dir)
    layout = layout_of_source(src)
    for shard in inexact_shards(layout):
        log.warning("%s: its header was not written by the safetensors library's rules; zarr2hf will give back "
                    "the same tensors and metadata with a canonical header", shard)
    return plan_store(layout, save_dir, opts, kind="hf2zarr", source_root=load_dir,
                      source_files=tuple(src.files))


def plan_mcore_to_zarr(mcore_plan: Plan, save_dir: str, opts: StoreOptions = StoreOptions()) -> Plan:
    """The HF checkpoint an mcore -> HF plan would write, written as a zarr store instead (one pass)."""
    return plan_store(layout_of_plan(mcore_plan), save_dir, opts, kind="mcore2zarr",
                      source_root=mcore_plan.source_root, source_files=mcore_plan.source_files,
                      dropped=mcore_plan.dropped, checks=mcore_plan.checks, options=mcore_plan.options)


def hf_files(layout: HFLayout) -> list[OutputFile]:
    """``layout`` as the files of an HF directory: its safetensors shards (tensors in order, metadata), then its
    other files (the index last, marking the checkpoint complete)."""
    files = []
    seq = 0
    for shard in layout.shards:
        tensors = []
        for name, node in shard.tensors:
            tensors.append(OutputTensor("", name, node, seq))
            seq += 1
        files.append(OutputFile(shard.file, SAFETENSORS.name, tuple(tensors), attrs=shard.metadata))
    return files + [OutputFile(name, "text", text=text) for name, text in layout.files]


def plan_zarr_to_hf(load_dir: str, save_dir: str) -> Plan:
    """A store -> the HF checkpoint it was made from: the same shards, tensor order, metadata and files."""
    check_disjoint(save_dir, [("--load-dir", load_dir)])
    src = ZarrSource(load_dir)
    layout = layout_of_source(src)
    inexact = inexact_shards(layout)
    if inexact:
        log.warning("%s: the original header differed from a canonical one; the tensors and metadata come back "
                    "byte for byte, the header in canonical form", ", ".join(inexact[:3]))
    files = hf_files(layout)
    return Plan(kind="zarr2hf", source_root=load_dir, source_files=tuple(src.files), target_root=save_dir,
                files=tuple(files))
