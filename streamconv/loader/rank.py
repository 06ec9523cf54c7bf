"""One rank of an mcore checkpoint, materialised from its plan graphs instead of read from a converted file.

:class:`RankSource` knows the rank's keys, shapes and dtypes from the plan alone.  Data is produced by the
converter's own machinery: :func:`streamconv.execute.executor.plan_pieces` cuts every tensor into row bands
and pushes each band down to the reads (``graph.narrow``), and :func:`streamconv.execute.kernels.materialize`
evaluates a band with the same kernels the converter writes with (positional reads of exactly the needed
bytes, the bit-exact FP8 kernel).  Bands are computed by a few threads in plan order, at most ``max_memory``
bytes of reads and intermediates in flight, each straight into where it belongs
(:func:`~streamconv.execute.kernels.materialize_into`): its rows of a state-dict tensor, or of the model's own
parameter (:meth:`RankSource.load_into`), so host memory holds a few bands' sources, not a second rank.  On an
accelerator a band is computed on the host (or, FP8 decode on the device, partly there) and copied over.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import torch

from .. import types
from ..errors import ValidationError
from ..execute import device as devices
from ..execute.executor import Piece, plan_pieces
from ..execute.kernels import materialize, materialize_into
from ..graph.node import Op, toposort
from ..graph.rewrite import narrow
from ..plan.plan import OutputFile, Plan
from ..storage import fileio

log = logging.getLogger(__name__)

MiB = 1 << 20
EXTRA_STATE = "._extra_state"   # Transformer Engine's per-module state: not weights, never in a rank file


class MismatchError(ValidationError):
    """The rank and the model it is loaded into disagree on keys, shapes or dtypes (every problem listed)."""


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the rank file: where it goes (``group``, ``name``), its shape, dtype and size."""

    group: str
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int


@dataclass(frozen=True)
class LoadOptions:
    """How a rank is materialised.

    ``device``: where tensors end up (``cpu``, ``cuda[:N]``, ``npu[:N]``).  ``dequant_on``: ``host`` (FP8 decoded
    by the CPU kernel, bf16 moved to the device) or ``device`` (the fp8 bytes move, decoded there: see
    :mod:`streamconv.execute.device`; ``method`` picks ``table`` or ``cast``).  ``workers``: threads computing
    bands.  ``max_memory``: bytes of bands and their reads in flight (bands are ``max_memory / 8`` at most)."""

    device: str | torch.device = "cpu"
    dequant_on: str = "host"
    method: str | None = None
    workers: int = 4
    max_memory: int = 256 * MiB


_CHECKED: dict[tuple[str, str], str | None] = {}   # (device, method) -> self-check result, once per process


class RankSource:
    """One rank file of a plan, as graphs over the source checkpoint.  Build it with
    :func:`streamconv.loader.open_rank`; nothing is read until :meth:`state_dict`, :meth:`stream` or
    :meth:`load_into` is called."""

    def __init__(self, plan: Plan, file: OutputFile, rank: tuple[int, int, int] | None = None):
        self.plan = plan
        self.file = file
        self.rank = rank
        self.path = file.path
        self.root = plan.source_root
        groups = list(file.groups)
        groups += [t.group for t in file.tensors if t.group not in groups]
        self.groups: tuple[str, ...] = tuple(dict.fromkeys(groups))
        self.attrs: dict = dict(file.attrs)
        self.tensors: tuple[TensorSpec, ...] = tuple(
            TensorSpec(t.group, t.name, tuple(t.node.shape), types.dtype(t.node.dtype).torch, t.node.nbytes)
            for t in file.tensors)
        self.dequant_used: str | None = None   # "host" or "device:<method>", once data was produced

    def __repr__(self) -> str:
        return f"RankSource({self.path!r}, {len(self.tensors)} tensors, {self.nbytes / 1e9:.3f} GB)"

    # --- what the rank holds (no data) -------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def keys(self) -> list[tuple[str, str]]:
        """``(group, name)`` of every tensor, in file order (group ``model``, or ``model0``... with VPP)."""
        return [(t.group, t.name) for t in self.tensors]

    def meta_state_dict(self) -> dict:
        """The rank file's structure with every tensor on the ``meta`` device (shapes and dtypes, no data)."""
        out: dict = {g: OrderedDict() for g in self.groups}
        for t in self.tensors:
            out[t.group][t.name] = torch.empty(t.shape, dtype=t.dtype, device="meta")
        out.update(self.attrs)
        return out

    # --- checks ----------------------------------------------------------------------------------------------------
    def check_against(self, target, *, check_dtypes: bool = True) -> None:
        """Compare keys, shapes and dtypes with ``target`` before any read: a module (live, or a skeleton on
        the ``meta`` device), a state dict, or a list of either (one per virtual pipeline chunk, ``model0``...).
        Raises one :class:`MismatchError` naming every missing, unexpected, mis-shaped or mis-typed key.
        Transformer Engine's ``_extra_state`` entries are not weights and are ignored."""
        self._targets(target, check_dtypes)

    def _targets(self, target, check_dtypes: bool) -> dict[str, dict[str, torch.Tensor]]:
        chunks = _as_chunks(target)
        problems = []
        if len(chunks) != len(self.groups):
            raise MismatchError(f"{self.path}: the rank holds {len(self.groups)} model chunk(s) "
                                f"({', '.join(self.groups)}) but {len(chunks)} were given. Pass one module or state "
                                f"dict per virtual pipeline chunk, in order.")
        out = {}
        for group, chunk in zip(self.groups, chunks):
            have = {k: v for k, v in chunk.items() if not k.endswith(EXTRA_STATE) and isinstance(v, torch.Tensor)}
            want = {t.name: t for t in self.tensors if t.group == group}
            where = f"{self.path} [{group}]"
            for name in sorted(set(have) - set(want)):
                problems.append(f"{where} {name}: missing from the rank (the model has it). The model and the "
                                f"source disagree on family or layout (TP/PP/EP, grouped GEMM, MTP, VPP...).")
            for name in sorted(set(want) - set(have)):
                problems.append(f"{where} {name}: unexpected (the rank holds it, the model does not). The model and "
                                f"the source disagree on family or layout.")
            for name in sorted(set(want) & set(have)):
                t, v = want[name], have[name]
                if tuple(v.shape) != t.shape:
                    problems.append(f"{where} {name}: shape {list(v.shape)} in the model, {list(t.shape)} in the "
                                    f"rank. Check the parallel sizes and model flags.")
                elif check_dtypes and v.dtype != t.dtype:
                    problems.append(f"{where} {name}: dtype {v.dtype} in the model, {t.dtype} in the rank. Build "
                                    f"the model in {t.dtype} (--bf16), or pass check_dtypes=False to cast.")
            out[group] = have
        if problems:
            raise MismatchError(problems)
        return out

    # --- data ------------------------------------------------------------------------------------------------------
    def state_dict(self, device: str | torch.device = "cpu", **options) -> dict:
        """The object the converter writes into this rank's file, ``{'model': OrderedDict, 'checkpoint_version':
        3.0, 'iteration': 1}`` (``model0``, ``model1``... under VPP), with tensors on ``device``; ``options``:
        see :class:`LoadOptions`."""
        out: dict = {g: OrderedDict() for g in self.groups}
        for t, value in self.stream(device, **options):
            out[t.group][t.name] = value
        out.update(self.attrs)
        return out

    def stream(self, device: str | torch.device = "cpu", **options) -> Iterator[tuple[TensorSpec, torch.Tensor]]:
        """``(TensorSpec, tensor)`` for every tensor of the rank in file order, each complete and on ``device``."""
        opts = LoadOptions(device=device, **options)
        dev = devices.resolve_device(opts.device)
        pieces = self._pieces(opts)
        remaining = _band_counts(pieces)
        dest: dict[int, torch.Tensor] = {}

        def target(p: Piece) -> torch.Tensor:
            t = self.tensors[p.index]
            out = dest.get(p.index)
            if out is None:
                out = dest[p.index] = torch.empty(t.shape, dtype=t.dtype, device=dev)
            return _rows_of(out, p, t)

        for p in self._run(opts, dev, pieces, target):
            remaining[p.index] -= 1
            if remaining[p.index] == 0:
                yield self.tensors[p.index], dest.pop(p.index)

    def load_into(self, target, *, check_dtypes: bool = True, **options) -> None:
        """Copy the rank into the existing parameters and buffers of ``target`` (a module, a state dict of
        tensors, or a list of either for virtual pipeline chunks), band by band: host memory holds the bands in
        flight, never the rank.  Keys, shapes and dtypes are checked first (:meth:`check_against`); bands are
        produced on the first parameter's device unless ``device=`` says otherwise."""
        dests = self._targets(target, check_dtypes)
        if "device" not in options:
            first = next((v for chunk in dests.values() for v in chunk.values()), None)
            options["device"] = first.device if first is not None else "cpu"
        opts = LoadOptions(**options)
        dev = devices.resolve_device(opts.device)

        def rows(p: Piece) -> torch.Tensor:
            t = self.tensors[p.index]
            return _rows_of(dests[t.group][t.name].data, p, t)

        with torch.no_grad():
            for _ in self._run(opts, dev, self._pieces(opts), rows):
                pass

    # --- machinery ---------------------------------------------------------------------------------------------------
    def _pieces(self, opts: LoadOptions) -> list[Piece]:
        band = max(1, min(64 * MiB, opts.max_memory // 8))
        one = Plan(kind=self.plan.kind, source_root=self.root, source_files=self.plan.source_files,
                   target_root=self.plan.target_root, files=(self.file,), options=self.plan.options)
        return sorted(plan_pieces(one, band), key=lambda p: (p.index, p.band))

    def _run(self, opts: LoadOptions, dev: torch.device, pieces: list[Piece], target) -> Iterator[Piece]:
        """Compute every piece into ``target(piece)`` (its rows of the destination), in plan order, with
        ``opts.workers`` threads and at most ``opts.max_memory`` bytes (reads and intermediates) in flight;
        yields each piece once it is in place."""
        if opts.workers < 1 or opts.max_memory < 1:
            raise ValidationError(f"workers={opts.workers}, max_memory={opts.max_memory}: both must be positive.")
        if opts.dequant_on not in ("host", "device"):
            raise ValidationError(f"dequant_on={opts.dequant_on!r}: expected 'host' or 'device'.")
        decoder = self._decoder(dev, opts) if opts.dequant_on == "device" else None
        self.dequant_used = "host" if decoder is None else f"device:{decoder.method}"
        where = dev if decoder is not None else "cpu"
        fileio.release_large_allocations()

        def compute(p: Piece, dest: torch.Tensor) -> None:
            with torch.no_grad():
                if decoder is None and dest.device.type == "cpu" and dest.dtype == types.dtype(p.node.dtype).torch:
                    materialize_into(p.node, self.root, dest)      # straight into place: no band buffer, no copy
                else:
                    dest.copy_(materialize(p.node, self.root, device=where, dequant=decoder))

        window: deque = deque()
        in_flight = 0
        with ThreadPoolExecutor(max_workers=opts.workers, thread_name_prefix="streamconv-load") as pool:
            try:
                for p in pieces:
                    cost = _cost(p)
                    while window and (len(window) > opts.workers or in_flight + cost > opts.max_memory):
                        q, fut, c = window.popleft()
                        in_flight -= c
                        fut.result()
                        yield q
                    window.append((p, pool.submit(compute, p, target(p)), cost))
                    in_flight += cost
                while window:
                    q, fut, _ = window.popleft()
                    fut.result()
                    yield q
            finally:
                for _, fut, _ in window:
                    fut.cancel()

    def _decoder(self, dev: torch.device, opts: LoadOptions):
        """A device FP8 decoder that passed its self-check on ``dev``, or None (decode on the host), logged."""
        decoder = devices.DeviceDequant(dev, opts.method)
        key = (str(dev), decoder.method)
        if key not in _CHECKED:
            _CHECKED[key] = decoder.self_check(self._sample_blocks())
        problem = _CHECKED[key]
        if problem is not None:
            log.warning("FP8 decode on %s does not match the host kernel (%s); decoding on the host instead.",
                        dev, problem)
            return None
        return decoder

    def _sample_blocks(self) -> list:
        """The first block of the first FP8 weight of this rank, read from the source (a few KB)."""
        for t in self.file.tensors:
            for n in toposort([t.node]):
                if n.op is Op.DEQUANT_FP8_BLOCK and n.shape[0] and n.shape[1]:
                    br, bc = n.arg.block
                    b = narrow(narrow(n, 0, 0, min(n.shape[0], br)), 1, 0, min(n.shape[1], bc))
                    w, s = (materialize(x, self.root) for x in b.src)
                    return [(b.arg, w, s)]
        return []


def _cost(p: Piece) -> int:
    return p.node.nbytes + sum(n.nbytes for n in toposort([p.node]) if n.op is Op.READ)


def _band_counts(pieces: list[Piece]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for p in pieces:
        counts[p.index] = counts.get(p.index, 0) + 1
    return counts


def _rows_of(dest: torch.Tensor, p: Piece, t: TensorSpec) -> torch.Tensor:
    """The rows of ``dest`` that piece ``p`` (a band of tensor ``t``) fills."""
    if p.band == 0 and tuple(p.node.shape) == t.shape:
        return dest
    row_bytes = t.nbytes // t.shape[0]
    return dest.narrow(0, p.offset // row_bytes, p.node.shape[0])


def _as_chunks(target) -> list[Mapping[str, torch.Tensor]]:
    if isinstance(target, torch.nn.Module):
        return [target.state_dict(keep_vars=True)]
    if isinstance(target, Mapping):
        return [target]
    if isinstance(target, Sequence) and not isinstance(target, (str, bytes)):
        out = []
        for x in target:
            if isinstance(x, torch.nn.Module):
                out.append(x.state_dict(keep_vars=True))
            elif isinstance(x, Mapping):
                out.append(x)
            else:
                raise ValidationError(f"expected a module or a state dict per model chunk, got {type(x).__name__}.")
        return out
    raise ValidationError(f"expected a torch.nn.Module, a state dict or a list of them, got {type(target).__name__}.")
