"""Synthetic HF checkpoints of any registered model family and size, deterministic from a seed.

Example::

    import dataclasses
    from streamconv import synth

    synth.synth_checkpoint("/tmp/tiny", synth.TINY)                       # DeepSeek-V3, ~2.6 MB, the tests' model
    synth.synth_checkpoint("/tmp/tiny-fp8", dataclasses.replace(synth.TINY, fp8=True))
    synth.synth_checkpoint("/tmp/qwen", synth.preset("tiny", "qwen3_moe"))  # any registered family
    cfg = dataclasses.replace(synth.DEEPSEEK_V3_671B, num_hidden_layers=4, n_routed_experts=16)
    synth.synth_checkpoint("/data/ds-slice", cfg)                         # real shapes, fewer layers/experts
    synth.synth_checkpoint("/data/ds-8g", synth.synth_for_size(8 * 10**9, fp8=True, seed=0))

A synthetic config is the family's own config dataclass (``streamconv/models/<family>.py``, its field names
those of config.json, ``fp8`` included) extended with the generator's settings ``seed`` and
``max_shard_bytes`` (:func:`synth_config_class`).  The tensors, their shapes, kinds and release order are the
family's HF table (:meth:`ModelSpec.hf_tensors`): there is no second table here.  Layout: ``config.json`` (the
family's :meth:`ModelSpec.config_json`), shards ``model-00001-of-0000N.safetensors`` holding the tensors in
release order, and ``model.safetensors.index.json`` written last.  Every file is written under a temporary
name and renamed into place.

Values.  Each tensor is built from float32 "master" values drawn in 128-row units, each unit from its own
generator seeded by (seed, tensor name, unit index), so the bytes never depend on the band size or the order of
generation, and memory stays at one band (at most ``BAND_BYTES`` of float32 plus its temporaries):

* linear weights (the FP8-quantizable ones): N(0, 0.02) times a per-block magnitude ``2**(k/2)``, k in -3..3,
  so FP8 scales differ from block to block and a dequantizer using the wrong block is caught;
* other weights: N(0, 0.02); norms: 1 + N(0, 0.02); float32 biases: N(0, 0.02).  A tensor the release
  stores twice (an MTP layer's embedding and head) is a byte-identical copy.

Relation between the FP8 and BF16 checkpoints of one seed.  A linear weight's master ``w`` is quantized with
the engine's own kernels (:mod:`streamconv.execute.quant`): ``s = amax(|block|) / 448``, ``q = fp8(w / s)``.
FP8 mode stores ``q`` and ``s`` (as ``<name>_scale_inv``); BF16 mode stores the dequantization of ``q`` with
``s`` (:mod:`streamconv.execute.dequant`, the spec's rule).  So dequantizing the FP8 checkpoint reproduces the
BF16 checkpoint byte for byte.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import re
from dataclasses import dataclass, replace
from typing import Callable, Iterator

import torch

from . import types
from .errors import ValidationError
from .execute.dequant import dequant_fp8_block
from .execute.quant import fp8_block_scale, quant_fp8_block
from .mapping.spec import ModelSpec, TensorKind
from .models import model_named, models
from .models.deepseek_v3 import DeepSeekV3Config
from .storage import fileio
from .storage.safetensors import SafetensorsWriter

log = logging.getLogger(__name__)

MiB = 1 << 20
UNIT = 128  # rows per random generator (and the FP8 block edge of every family we know)
BAND_BYTES = 8 * MiB  # float32 master values generated at once (at least UNIT rows); temporaries add ~1.5x
STD = 0.02
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"

# Tensor kinds: how a tensor's values are made (the HF table's kinds, plus the scale grid of an FP8 weight).
LINEAR, PLAIN, NORM, BIAS = (k.value for k in TensorKind)
SCALE = "scale"  # float32 scale_inv companion of a LINEAR weight; made together with it

SETTINGS = ("seed", "max_shard_bytes")


@functools.cache
def synth_config_class(model_class: type) -> type:
    """The generator's config for a family: its config dataclass plus ``seed`` (equal seeds and shapes give
    byte-identical checkpoints) and ``max_shard_bytes`` (a new shard starts when the next tensor would exceed
    it).  Validates on construction (one error listing every problem)."""

    def __post_init__(self) -> None:
        problems = family_of(self).check_config(self, type(self).__name__)
        for name in SETTINGS:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "seed" else 1):
                problems.append(f"{type(self).__name__}.{name}: expected a {'non-negative' if name == 'seed' else 'positive'} "
                                f"int, got {value!r}.")
        if problems:
            raise ValidationError(problems)

    return dataclasses.make_dataclass(
        f"Synth{model_class.__name__}", [("seed", int, dataclasses.field(default=0)),
                                         ("max_shard_bytes", int, dataclasses.field(default=512 * MiB))],
        bases=(model_class,), frozen=True, namespace={"__post_init__": __post_init__})


def family_of(cfg) -> ModelSpec:
    """The registered family whose config ``cfg`` is (the most derived config class wins: DeepSeek-V3.2's
    config extends DeepSeek-V3's)."""
    by_class = {spec.config_class: spec for spec in models()}
    for cls in type(cfg).__mro__:
        if cls in by_class:
            return by_class[cls]
    raise ValidationError(f"{type(cfg).__name__}: not the config of a registered model family.")


def synth_config(model_cfg, **settings):
    """A generator config from a family's model config (``seed=``, ``max_shard_bytes=`` optional)."""
    cls = synth_config_class(type(model_cfg))
    fields = {f.name: getattr(model_cfg, f.name) for f in dataclasses.fields(model_cfg)}
    return cls(**fields, **settings)


def preset(name: str = "tiny", family: str = "deepseek_v3", **overrides):
    """A family's named starting shape (``tiny``: a few MB for tests; ``671b`` and the like: real sizes), as a
    generator config, with config or setting ``overrides``."""
    spec = model_named(family)
    if name not in spec.presets:
        raise ValidationError(f"--preset {name}: {spec.title} has presets {', '.join(sorted(spec.presets))}.")
    return replace(synth_config(spec.presets[name]), **overrides)


SynthConfig = synth_config_class(DeepSeekV3Config)
TINY = preset("tiny")                       # ~2.6 MB DeepSeek-V3, FP8 edge blocks in every linear
DEEPSEEK_V3_671B = preset("671b")           # the real DeepSeek-V3 / R1 sizes (spec §1.1), FP8
PRESETS: dict[str, object] = {"tiny": TINY, "671b": DEEPSEEK_V3_671B}


def config_json(cfg) -> dict:
    """The ``config.json`` of the checkpoint (the family's own)."""
    return family_of(cfg).config_json(cfg)


# --- the tensor list: the family's HF table -----------------------------------------------------------------

@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the checkpoint.  ``source`` names whose random values it carries (its own name, the
    main tensor for a copy, the weight for a ``_scale_inv``)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    kind: str
    source: str

    @property
    def nbytes(self) -> int:
        return types.nbytes(self.dtype, self.shape)


def _specs_of(spec: ModelSpec, cfg, tensors) -> list[TensorSpec]:
    out = []
    q = spec.quant
    for t in tensors:
        if t.kind is TensorKind.LINEAR and cfg.fp8:
            out += [TensorSpec(t.name, q.dtypes[0], t.shape, LINEAR, t.name),
                    TensorSpec(t.name + q.scale_suffix, "float32", q.scale_shape(t.shape), SCALE, t.name)]
        else:
            out.append(TensorSpec(t.name, t.dtype, t.shape, t.kind.value, t.copy_of or t.name))
    return out


def tensor_specs(cfg) -> list[TensorSpec]:
    """Every tensor of the checkpoint, in release (file) order; a ``_scale_inv`` follows its weight."""
    spec = family_of(cfg)
    return _specs_of(spec, cfg, spec.hf_tensors(cfg))


def checkpoint_bytes(cfg) -> int:
    """Total tensor bytes (the index's ``total_size``), computed from one layer of each kind."""
    spec = family_of(cfg)
    base = replace(cfg, seed=0, max_shard_bytes=MiB)
    model_level = [t for t in spec.hf_table(spec.resized(base, num_hidden_layers=cfg.first_dense or 1,
                                                         mtp_layers=0)).values()
                   if spec.layer_of(t.name) is None]
    total = sum(s.nbytes for s in _specs_of(spec, cfg, model_level))
    counts = {"dense": cfg.first_dense, "moe": cfg.num_hidden_layers - cfg.first_dense, "mtp": cfg.mtp_layers}
    for kind, count in counts.items():
        if count:
            total += count * _kind_bytes(spec, base, kind)
    return total


_KIND_BYTES: dict[tuple, int] = {}


def _kind_bytes(spec: ModelSpec, cfg, kind: str) -> int:
    """Bytes of one layer of ``kind`` ("dense", "moe", "mtp")."""
    key = (cfg, kind)
    if key not in _KIND_BYTES:
        if len(_KIND_BYTES) > 4096:
            _KIND_BYTES.clear()
        one = spec.resized(cfg, num_hidden_layers=1, first_dense=1 if kind == "dense" else 0,
                           mtp_layers=1 if kind == "mtp" else 0)
        layer = 1 if kind == "mtp" else 0
        _KIND_BYTES[key] = sum(s.nbytes for s in _specs_of(spec, one, spec.layer_tensors(one, layer)))
    return _KIND_BYTES[key]


# --- shards -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shard:
    """One safetensors file of the plan: its name and tensors (in file order)."""

    file_name: str
    tensors: tuple[TensorSpec, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def shard_name(index: int, count: int) -> str:
    """HF shard file name, 1-based: ``model-00001-of-00005.safetensors``."""
    return f"model-{index:05d}-of-{count:05d}.safetensors"


def plan_shards(cfg: SynthConfig) -> list[Shard]:
    """Split the tensors into shards in order; a shard closes when the next tensor would exceed
    ``max_shard_bytes`` (a tensor larger than that gets a shard of its own)."""
    groups: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in tensor_specs(cfg):
        if groups[-1] and size + spec.nbytes > cfg.max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += spec.nbytes
    return [Shard(shard_name(i + 1, len(groups)), tuple(g)) for i, g in enumerate(groups)]


# --- values -------------------------------------------------------------------------------------------------

def _seed(seed: int, source: str, unit: int) -> int:
    digest = hashlib.blake2b(f"{seed}\0{source}\0{unit}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _normal(seed: int, source: str, shape: tuple[int, ...], r0: int, r1: int) -> torch.Tensor:
    """float32 N(0, 1) rows [r0, r1) of ``source`` (r0 a multiple of UNIT), one generator per UNIT rows."""
    if len(shape) == 1:
        g = torch.Generator().manual_seed(_seed(seed, source, 0))
        return torch.randn(shape, generator=g)
    out = torch.empty((r1 - r0,) + tuple(shape[1:]), dtype=torch.float32)
    for start in range(r0, r1, UNIT):
        end = min(start + UNIT, r1)
        g = torch.Generator().manual_seed(_seed(seed, source, start // UNIT))
        torch.randn(out[start - r0 : end - r0].shape, generator=g, out=out[start - r0 : end - r0])
    return out


def _block_magnitudes(source: str, r0: int, rows: int, cols: int, block: tuple[int, int]) -> torch.Tensor:
    """Per-block factors 2**(k/2), k in -3..3, for block rows r0/br ... covering ``rows`` rows."""
    br, bc = block
    salt = hashlib.blake2b(source.encode(), digest_size=1).digest()[0]
    bi = torch.arange(r0 // br, r0 // br + -(-rows // br)).unsqueeze(1)
    bj = torch.arange(-(-cols // bc)).unsqueeze(0)
    k = (bi * 5 + bj * 3 + salt) % 7 - 3
    return torch.exp2(k.to(torch.float32) / 2)


def _scale_by_blocks(w: torch.Tensor, magnitudes: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """``w`` with each (br, bc) block multiplied by its magnitude, in place."""
    br, bc = block
    rows, cols = w.shape
    full = magnitudes.repeat_interleave(br, 0)[:rows].repeat_interleave(bc, 1)[:, :cols]
    return w.mul_(full)


def _band_rows(spec: TensorSpec) -> int:
    if len(spec.shape) < 2:
        return max(spec.shape[0] if spec.shape else 1, 1)
    row_bytes = 4 * math.prod(spec.shape[1:])
    return UNIT * max(1, BAND_BYTES // (UNIT * row_bytes))


def _bands(spec: TensorSpec) -> Iterator[tuple[int, int]]:
    rows = spec.shape[0] if spec.shape else 1
    step = _band_rows(spec)
    for r0 in range(0, rows, step):
        yield r0, min(r0 + step, rows)


def generate_band(cfg: SynthConfig, spec: TensorSpec, r0: int, r1: int) -> list[tuple[str, torch.Tensor, int]]:
    """Rows [r0, r1) of ``spec`` (and of its ``_scale_inv`` in FP8 mode): ``(name, tensor, byte offset)``."""
    w = _normal(cfg.seed, spec.source, spec.shape, r0, r1)
    row_bytes = types.nbytes(spec.dtype, spec.shape[1:])
    if spec.kind == NORM:
        return [(spec.name, w.mul_(STD).add_(1.0).to(torch.bfloat16), 0)]
    w.mul_(STD)
    if spec.kind == BIAS:
        return [(spec.name, w, 0)]
    if spec.kind == PLAIN:
        return [(spec.name, w.to(torch.bfloat16), r0 * row_bytes)]
    q = family_of(cfg).quant
    _scale_by_blocks(w, _block_magnitudes(spec.source, r0, r1 - r0, spec.shape[1], q.block), q.block)
    scale = fp8_block_scale(w, block=q.block, dtype=types.dtype(q.dtypes[0]).torch)
    codes = quant_fp8_block(w, scale, block=q.block, dtype=types.dtype(q.dtypes[0]).torch)
    del w
    if not cfg.fp8:
        return [(spec.name, dequant_fp8_block(codes, scale, block=q.block, dtype=torch.bfloat16), r0 * row_bytes)]
    return [(spec.name, codes, r0 * row_bytes),
            (spec.name + q.scale_suffix, scale, (r0 // q.block[0]) * scale.shape[1] * 4)]


# --- writing ------------------------------------------------------------------------------------------------

ProgressFn = Callable[[str, int, int], None]  # (tensor name, bytes done, bytes total)


def synth_checkpoint(out_dir: str, cfg: SynthConfig, *, progress: ProgressFn | None = None,
                     headers_only: bool = False) -> dict:
    """Write the checkpoint of ``cfg`` into ``out_dir`` (created if missing) and return a summary.

    ``headers_only``: every shard gets its real header and its full size, but as a sparse file with no data
    written (reads give zeros).  Planning needs only headers, so a 671B checkpoint can be planned from a few
    MB of disk.

    Order: ``config.json``, the shards (each renamed into place when complete), then the index.  An index
    already in ``out_dir`` is removed first, so a crashed run never looks complete.

    Returns:
        dict with ``out_dir``, ``files`` (names written, in order), ``shards``, ``tensors`` and ``bytes``
        (the index's ``total_size``).
    """
    shards = plan_shards(cfg)
    total = sum(s.nbytes for s in shards)
    os.makedirs(out_dir, exist_ok=True)
    index_path = os.path.join(out_dir, INDEX_NAME)
    if os.path.exists(index_path):
        os.unlink(index_path)
    planned = {s.file_name for s in shards}
    stale = sorted(f for f in os.listdir(out_dir)
                   if re.fullmatch(r"model-\d+-of-\d+\.safetensors", f) and f not in planned)
    if stale:
        log.warning("%s: %d shard files from another run remain (%s ...); they are not in the new index",
                    out_dir, len(stale), stale[0])
    fileio.atomic_write_bytes(os.path.join(out_dir, CONFIG_NAME), _json_bytes(config_json(cfg)))
    log.info("writing %d tensors (%.3f GB) in %d shards to %s", sum(len(s.tensors) for s in shards),
             total / 1e9, len(shards), out_dir)
    if headers_only:
        for shard in shards:
            entries = [(t.name, t.dtype, t.shape) for t in shard.tensors]
            SafetensorsWriter(os.path.join(out_dir, shard.file_name), entries, {"format": "pt"}).close()
    else:
        _write_shards(out_dir, cfg, shards, total, progress)
    weight_map = {t.name: s.file_name for s in shards for t in s.tensors}
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    fileio.atomic_write_bytes(index_path, _json_bytes(index))
    return {"out_dir": out_dir, "files": [CONFIG_NAME] + [s.file_name for s in shards] + [INDEX_NAME],
            "shards": len(shards), "tensors": len(weight_map), "bytes": total}


def _write_shards(out_dir: str, cfg: SynthConfig, shards: list[Shard], total: int,
                  progress: ProgressFn | None) -> None:
    # A weight and its _scale_inv may fall in different shards, so up to two writers are open at once; each
    # closes (renames into place) as soon as its last tensor is written.
    file_of = {t.name: i for i, s in enumerate(shards) for t in s.tensors}
    nbytes = {t.name: t.nbytes for s in shards for t in s.tensors}
    pending = [len(s.tensors) for s in shards]
    writers: dict[int, SafetensorsWriter] = {}
    done = 0

    def writer(i: int) -> SafetensorsWriter:
        if i not in writers:
            entries = [(t.name, t.dtype, t.shape) for t in shards[i].tensors]
            writers[i] = SafetensorsWriter(os.path.join(out_dir, shards[i].file_name), entries, {"format": "pt"})
        return writers[i]

    def finished(name: str) -> None:
        i = file_of[name]
        pending[i] -= 1
        if pending[i] == 0:
            writer(i).close()
            del writers[i]
            log.info("wrote %s", shards[i].file_name)

    try:
        for spec in (t for s in shards for t in s.tensors):
            if spec.kind == SCALE:
                continue
            suffix = family_of(cfg).quant.scale_suffix if cfg.fp8 and spec.kind == LINEAR else None
            names = [spec.name] + ([spec.name + suffix] if suffix else [])
            for r0, r1 in _bands(spec):
                pieces = generate_band(cfg, spec, r0, r1)
                for name, tensor, offset in pieces:
                    writer(file_of[name]).write(name, tensor, offset)
                del pieces
            for name in names:
                finished(name)
                done += nbytes[name]
            if progress is not None:
                progress(spec.name, done, total)
    except BaseException:
        for w in writers.values():
            w.abort()
        raise


def _json_bytes(obj: dict) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode("utf-8")


# --- sizing -------------------------------------------------------------------------------------------------

def synth_for_size(target_bytes: int, fp8: bool = False, seed: int = 0, *, expert_multiple: int = 8,
                   max_shard_bytes: int = 512 * MiB, family: str = "deepseek_v3", start: str = "671b"):
    """A real-shaped slice of a family's full-size preset (for DeepSeek-V3: hidden 7168 and all per-tensor shapes
    of the 671B model) whose checkpoint lands near ``target_bytes`` (within 2% when reachable).

    Free knobs: the layer count, the routed experts (a multiple of ``expert_multiple``, at most the preset's),
    the leading dense layers (1, or 0 when a dense layer does not fit or the family has none), the MTP layers
    (likewise) and ``vocab_size`` (a multiple of 128 in [1024, the preset's]; the fine knob, starting near a
    quarter of the target).  Structures are tried in the order (MTP, dense) = (1, 1), (0, 1), (1, 0), (0, 0);
    within one, the fewest layers win.
    """
    if target_bytes <= 0:
        raise ValidationError(f"synth_for_size: target_bytes: expected a positive size, got {target_bytes}.")
    spec = model_named(family)
    base = preset(start, family, fp8=fp8, seed=seed, max_shard_bytes=max_shard_bytes)
    vmax = base.vocab_size

    def vocab(v: float) -> int:
        return int(min(max(v // UNIT * UNIT, 1024), vmax))

    best, best_err = None, None
    expert_counts = list(range(expert_multiple, base.num_experts + 1, expert_multiple)) or [expert_multiple]
    for mtp, dense in ((1, 1), (0, 1), (1, 0), (0, 0)):
        if mtp > base.mtp_layers or dense > base.first_dense:
            continue
        probe = spec.resized(base, num_hidden_layers=dense + 1, first_dense=dense, mtp_layers=mtp, vocab_size=1024)
        row = (checkpoint_bytes(spec.resized(probe, vocab_size=1024 + UNIT)) - checkpoint_bytes(probe)) // UNIT
        v0 = vocab(0.25 * target_bytes / row)
        for layers in range(dense + 1, base.num_hidden_layers + 1):
            shaped = spec.resized(base, num_hidden_layers=layers, first_dense=dense, mtp_layers=mtp, vocab_size=v0)
            if checkpoint_bytes(spec.resized(shaped, num_experts=expert_counts[0], vocab_size=1024)) > target_bytes:
                break  # more layers only grow
            cfg = min((spec.resized(shaped, num_experts=e) for e in expert_counts),
                      key=lambda c: abs(checkpoint_bytes(c) - target_bytes))
            rest = target_bytes - (checkpoint_bytes(cfg) - v0 * row)
            cfg = spec.resized(cfg, vocab_size=vocab(rest / row))
            err = abs(checkpoint_bytes(cfg) - target_bytes)
            if best_err is None or err < best_err:
                best, best_err = cfg, err
            if err <= 0.02 * target_bytes:
                return cfg
    if best is None:
        smallest = spec.resized(base, num_hidden_layers=1, first_dense=0, mtp_layers=0,
                                num_experts=expert_counts[0], vocab_size=1024)
        raise ValidationError(f"synth_for_size: {target_bytes} bytes is below the smallest real-shaped slice "
                              f"({checkpoint_bytes(smallest)} bytes). Ask for more, or shrink TINY instead.")
    return best
