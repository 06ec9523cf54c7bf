"""Synthetic DeepSeek-V3-family HuggingFace checkpoints of any size, deterministic from a seed.

Example::

    import dataclasses
    from streamconv import synth

    synth.synth_checkpoint("/tmp/tiny", synth.TINY)                       # ~2.6 MB, used by the tests
    synth.synth_checkpoint("/tmp/tiny-fp8", dataclasses.replace(synth.TINY, fp8=True))
    cfg = dataclasses.replace(synth.DEEPSEEK_V3_671B, num_hidden_layers=4, n_routed_experts=16)
    synth.synth_checkpoint("/data/ds-slice", cfg)                         # real shapes, fewer layers/experts
    synth.synth_checkpoint("/data/ds-8g", synth.synth_for_size(8 * 10**9, fp8=True, seed=0))

The layout is spec §1.1-1.4 (docs: /work/shared/spec/deepseek_v3_mindspeed.md): ``config.json``, shards
``model-00001-of-0000N.safetensors`` holding the tensors in release order (embedding, layer by layer, final norm
and lm_head, then the MTP layers ``model.layers.{num_hidden_layers + m}``), and ``model.safetensors.index.json``
written last.  Every file is written under a temporary name and renamed into place.

Values.  Each tensor is built from float32 "master" values drawn in 128-row units, each unit from its own
generator seeded by (seed, tensor name, unit index), so the bytes never depend on the band size or the order of
generation, and memory stays at one band (at most ``BAND_BYTES`` of float32 plus its temporaries):

* linear weights (the FP8-quantizable ones): N(0, 0.02) times a per-128x128-block magnitude ``2**(k/2)``,
  k in -3..3, so FP8 scales differ from block to block and a dequantizer using the wrong block is caught;
* embeddings, lm_head, router gate, eh_proj: N(0, 0.02); norms: 1 + N(0, 0.02);
  ``e_score_correction_bias``: N(0, 0.02) in float32.  The MTP ``embed_tokens`` and ``shared_head.head`` are
  byte-identical copies of ``model.embed_tokens`` and ``lm_head``.

Relation between the FP8 and BF16 checkpoints of one seed.  A linear weight's master ``w`` is quantized per
128x128 block (partial edge blocks included): ``s = amax(|block|) / 448`` (1.0 for an all-zero block),
``q = float8_e4m3fn(w / s)``.  FP8 mode stores ``q`` and ``s`` (as ``<name>_scale_inv``).  BF16 mode stores
``bf16(float32(q) * s)``, which is exactly the dequantization rule of spec §1.4; every other tensor is
identical in both modes.  So dequantizing the FP8 checkpoint reproduces the BF16 checkpoint byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from dataclasses import dataclass, fields, replace
from typing import Callable, Iterator

import torch

from . import types
from .errors import ValidationError
from .storage import fileio
from .storage.safetensors import SafetensorsWriter

log = logging.getLogger(__name__)

MiB = 1 << 20
BLOCK = 128  # FP8 block edge (weight_block_size [128, 128]) and the row unit of the random generators
FP8_MAX = 448.0
BAND_BYTES = 8 * MiB  # float32 master values generated at once (at least 128 rows); temporaries add ~1.5x
STD = 0.02
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"

# Tensor kinds: how a tensor's values are made.
LINEAR = "linear"  # FP8-quantizable linear weight
PLAIN = "plain"  # bf16 weight N(0, 0.02), never quantized
NORM = "norm"  # bf16 1 + N(0, 0.02)
BIAS = "bias"  # float32 N(0, 0.02)
SCALE = "scale"  # float32 scale_inv companion of a LINEAR weight; made together with it


@dataclass(frozen=True)
class SynthConfig:
    """The shape of a DeepSeek-V3-family checkpoint (HF config names) plus generator settings.

    Args:
        hidden_size ... num_nextn_predict_layers: as in the HF ``config.json`` (spec §1.1).
        fp8 (bool, default False): DeepSeek release format: linear weights float8_e4m3fn + ``_scale_inv``.
        seed (int, default 0): equal seeds (and shapes) give byte-identical checkpoints.
        max_shard_bytes (int, default 512 MiB): a new shard starts when the next tensor would exceed it.
    """

    hidden_size: int
    num_hidden_layers: int
    first_k_dense_replace: int
    n_routed_experts: int
    n_shared_experts: int
    num_attention_heads: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    intermediate_size: int
    moe_intermediate_size: int
    vocab_size: int
    num_nextn_predict_layers: int
    fp8: bool = False
    seed: int = 0
    max_shard_bytes: int = 512 * MiB

    def __post_init__(self) -> None:
        problems = []
        positive = {f.name for f in fields(self)} - {"first_k_dense_replace", "n_shared_experts",
                                                     "num_nextn_predict_layers", "seed", "fp8"}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "fp8":
                if not isinstance(value, bool):
                    problems.append(f"SynthConfig.fp8: expected a bool, got {value!r}.")
                continue
            if not isinstance(value, int) or isinstance(value, bool):
                problems.append(f"SynthConfig.{f.name}: expected an int, got {value!r}.")
            elif f.name in positive and value < 1:
                problems.append(f"SynthConfig.{f.name}: expected a positive int, got {value}.")
            elif value < 0:
                problems.append(f"SynthConfig.{f.name}: expected an int >= 0, got {value}.")
        if not problems:
            if self.first_k_dense_replace > self.num_hidden_layers:
                problems.append(f"SynthConfig.first_k_dense_replace: expected at most num_hidden_layers "
                                f"({self.num_hidden_layers}, got {self.first_k_dense_replace}). Lower "
                                f"first_k_dense_replace or raise num_hidden_layers.")
            if self.qk_rope_head_dim % 2:
                problems.append(f"SynthConfig.qk_rope_head_dim: expected an even number (rotary pairs), "
                                f"got {self.qk_rope_head_dim}.")
        if problems:
            raise ValidationError(problems)

    @property
    def num_layers_total(self) -> int:
        """Transformer layers including the MTP layers (HF indices 0 .. this - 1)."""
        return self.num_hidden_layers + self.num_nextn_predict_layers


# A small DeepSeek-V3-shaped model for tests (~2.6 MB in bf16).  hidden 192 and the dense width 320 are not
# multiples of 128, so FP8 edge blocks occur in every linear; q_b (192 rows), o_proj, dense and expert
# weights span several blocks.  Heads, experts, vocab and both FFN widths divide by 4 (TP and EP up to 4).
TINY = SynthConfig(
    hidden_size=192, num_hidden_layers=4, first_k_dense_replace=1, n_routed_experts=8, n_shared_experts=1,
    num_attention_heads=4, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16,
    v_head_dim=32, intermediate_size=320, moe_intermediate_size=32, vocab_size=256, num_nextn_predict_layers=1,
)

# The real DeepSeek-V3 / R1 sizes (spec §1.1), in the FP8 release format.
DEEPSEEK_V3_671B = SynthConfig(
    hidden_size=7168, num_hidden_layers=61, first_k_dense_replace=3, n_routed_experts=256, n_shared_experts=1,
    num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
    v_head_dim=128, intermediate_size=18432, moe_intermediate_size=2048, vocab_size=129280,
    num_nextn_predict_layers=1, fp8=True,
)

PRESETS: dict[str, SynthConfig] = {"tiny": TINY, "671b": DEEPSEEK_V3_671B}


# --- config.json --------------------------------------------------------------------------------------------

def _router_groups(n_experts: int) -> tuple[int, int, int]:
    """(n_group, topk_group, num_experts_per_tok) as in the V3 release, scaled down for few experts.

    HF's noaux_tc router scores a group by its top-2 experts, so each group needs >= 2 experts.
    """
    n_group = max([d for d in range(1, 9) if n_experts % d == 0 and n_experts // d >= 2], default=1)
    topk_group = max(1, n_group // 2)
    return n_group, topk_group, min(8, topk_group * (n_experts // n_group))


def config_json(cfg: SynthConfig) -> dict:
    """The ``config.json`` of the checkpoint, in the DeepSeek-V3 release style (keys sorted)."""
    n_group, topk_group, per_tok = _router_groups(cfg.n_routed_experts)
    out = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "aux_loss_alpha": 0.001,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "ep_size": 1,
        "first_k_dense_replace": cfg.first_k_dense_replace,
        "hidden_act": "silu",
        "hidden_size": cfg.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": cfg.intermediate_size,
        "kv_lora_rank": cfg.kv_lora_rank,
        "max_position_embeddings": 163840,
        "model_type": "deepseek_v3",
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "moe_layer_freq": 1,
        "n_group": n_group,
        "n_routed_experts": cfg.n_routed_experts,
        "n_shared_experts": cfg.n_shared_experts,
        "norm_topk_prob": True,
        "num_attention_heads": cfg.num_attention_heads,
        "num_experts_per_tok": per_tok,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_key_value_heads": cfg.num_attention_heads,
        "num_nextn_predict_layers": cfg.num_nextn_predict_layers,
        "pretraining_tp": 1,
        "q_lora_rank": cfg.q_lora_rank,
        "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "rms_norm_eps": 1e-06,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "original_max_position_embeddings": 4096, "type": "yarn"},
        "rope_theta": 10000,
        "routed_scaling_factor": 2.5,
        "scoring_func": "sigmoid",
        "seq_aux": True,
        "tie_word_embeddings": False,
        "topk_group": topk_group,
        "topk_method": "noaux_tc",
        "torch_dtype": "bfloat16",
        "transformers_version": "4.46.3",
        "use_cache": True,
        "v_head_dim": cfg.v_head_dim,
        "vocab_size": cfg.vocab_size,
    }
    if cfg.fp8:
        out["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                      "weight_block_size": [BLOCK, BLOCK]}
    return dict(sorted(out.items()))


# --- the tensor list (spec §1.3) ----------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the checkpoint.  ``source`` names whose random values it carries (its own name, the
    main tensor for an MTP copy, the weight for a ``_scale_inv``)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    kind: str
    source: str

    @property
    def nbytes(self) -> int:
        return types.nbytes(self.dtype, self.shape)


def _plain(name: str, shape: tuple[int, ...], kind: str = PLAIN, source: str | None = None) -> TensorSpec:
    dtype = "float32" if kind == BIAS else "bfloat16"
    return TensorSpec(name, dtype, shape, kind, source or name)


def _linear(cfg: SynthConfig, name: str, rows: int, cols: int) -> list[TensorSpec]:
    if not cfg.fp8:
        return [TensorSpec(name, "bfloat16", (rows, cols), LINEAR, name)]
    scale_shape = (-(-rows // BLOCK), -(-cols // BLOCK))
    return [TensorSpec(name, "float8_e4m3fn", (rows, cols), LINEAR, name),
            TensorSpec(name + "_scale_inv", "float32", scale_shape, SCALE, name)]


def _layer_specs(cfg: SynthConfig, layer: int, kind: str) -> list[TensorSpec]:
    """Tensors of HF layer ``layer``; ``kind`` is "dense", "moe" or "mtp" (an MoE layer plus MTP extras)."""
    H, p = cfg.hidden_size, f"model.layers.{layer}."
    nh = cfg.num_attention_heads
    out: list[TensorSpec] = []
    if kind == "mtp":
        out += [_plain(p + "embed_tokens.weight", (cfg.vocab_size, H), source="model.embed_tokens.weight"),
                _plain(p + "enorm.weight", (H,), NORM), _plain(p + "hnorm.weight", (H,), NORM),
                _plain(p + "eh_proj.weight", (H, 2 * H))]
    out.append(_plain(p + "input_layernorm.weight", (H,), NORM))
    a = p + "self_attn."
    out += _linear(cfg, a + "q_a_proj.weight", cfg.q_lora_rank, H)
    out.append(_plain(a + "q_a_layernorm.weight", (cfg.q_lora_rank,), NORM))
    out += _linear(cfg, a + "q_b_proj.weight", nh * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim), cfg.q_lora_rank)
    out += _linear(cfg, a + "kv_a_proj_with_mqa.weight", cfg.kv_lora_rank + cfg.qk_rope_head_dim, H)
    out.append(_plain(a + "kv_a_layernorm.weight", (cfg.kv_lora_rank,), NORM))
    out += _linear(cfg, a + "kv_b_proj.weight", nh * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)
    out += _linear(cfg, a + "o_proj.weight", H, nh * cfg.v_head_dim)
    out.append(_plain(p + "post_attention_layernorm.weight", (H,), NORM))
    if kind == "dense":
        out += _mlp(cfg, p + "mlp.", cfg.intermediate_size)
    else:
        out += [_plain(p + "mlp.gate.weight", (cfg.n_routed_experts, H)),
                _plain(p + "mlp.gate.e_score_correction_bias", (cfg.n_routed_experts,), BIAS)]
        if cfg.n_shared_experts:
            out += _mlp(cfg, p + "mlp.shared_experts.", cfg.moe_intermediate_size * cfg.n_shared_experts)
        for j in range(cfg.n_routed_experts):
            out += _mlp(cfg, p + f"mlp.experts.{j}.", cfg.moe_intermediate_size)
    if kind == "mtp":
        out += [_plain(p + "shared_head.norm.weight", (H,), NORM),
                _plain(p + "shared_head.head.weight", (cfg.vocab_size, H), source="lm_head.weight")]
    return out


def _mlp(cfg: SynthConfig, p: str, width: int) -> list[TensorSpec]:
    H = cfg.hidden_size
    return (_linear(cfg, p + "gate_proj.weight", width, H) + _linear(cfg, p + "up_proj.weight", width, H)
            + _linear(cfg, p + "down_proj.weight", H, width))


def _layer_kind(cfg: SynthConfig, layer: int) -> str:
    if layer >= cfg.num_hidden_layers:
        return "mtp"
    return "dense" if layer < cfg.first_k_dense_replace else "moe"


def tensor_specs(cfg: SynthConfig) -> list[TensorSpec]:
    """Every tensor of the checkpoint, in release (file) order; a ``_scale_inv`` follows its weight."""
    H, V = cfg.hidden_size, cfg.vocab_size
    specs = [_plain("model.embed_tokens.weight", (V, H))]
    for layer in range(cfg.num_hidden_layers):
        specs += _layer_specs(cfg, layer, _layer_kind(cfg, layer))
    specs += [_plain("model.norm.weight", (H,), NORM), _plain("lm_head.weight", (V, H))]
    for layer in range(cfg.num_hidden_layers, cfg.num_layers_total):
        specs += _layer_specs(cfg, layer, "mtp")
    return specs


def checkpoint_bytes(cfg: SynthConfig) -> int:
    """Total tensor bytes (the index's ``total_size``), computed from one layer of each kind."""
    H, V = cfg.hidden_size, cfg.vocab_size
    total = 2 * (2 * V * H) + 2 * H
    counts = {"dense": cfg.first_k_dense_replace, "moe": cfg.num_hidden_layers - cfg.first_k_dense_replace,
              "mtp": cfg.num_nextn_predict_layers}
    for kind, count in counts.items():
        if count:
            total += count * _kind_bytes(replace(cfg, seed=0, max_shard_bytes=MiB, num_hidden_layers=1,
                                                 first_k_dense_replace=0, num_nextn_predict_layers=0), kind)
    return total


_KIND_BYTES: dict[tuple[SynthConfig, str], int] = {}


def _kind_bytes(key: SynthConfig, kind: str) -> int:
    if (key, kind) not in _KIND_BYTES:
        if len(_KIND_BYTES) > 4096:
            _KIND_BYTES.clear()
        _KIND_BYTES[key, kind] = sum(s.nbytes for s in _layer_specs(key, 0, kind))
    return _KIND_BYTES[key, kind]


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
    """float32 N(0, 1) rows [r0, r1) of ``source`` (r0 a multiple of BLOCK), one generator per 128-row unit."""
    if len(shape) == 1:
        g = torch.Generator().manual_seed(_seed(seed, source, 0))
        return torch.randn(shape, generator=g)
    out = torch.empty((r1 - r0,) + tuple(shape[1:]), dtype=torch.float32)
    for start in range(r0, r1, BLOCK):
        end = min(start + BLOCK, r1)
        g = torch.Generator().manual_seed(_seed(seed, source, start // BLOCK))
        torch.randn(out[start - r0 : end - r0].shape, generator=g, out=out[start - r0 : end - r0])
    return out


def _block_magnitudes(source: str, r0: int, rows: int, cols: int) -> torch.Tensor:
    """Per-block factors 2**(k/2), k in -3..3, for block rows r0/128 ... covering ``rows`` rows."""
    salt = hashlib.blake2b(source.encode(), digest_size=1).digest()[0]
    bi = torch.arange(r0 // BLOCK, r0 // BLOCK + -(-rows // BLOCK)).unsqueeze(1)
    bj = torch.arange(-(-cols // BLOCK)).unsqueeze(0)
    k = (bi * 5 + bj * 3 + salt) % 7 - 3
    return torch.exp2(k.to(torch.float32) / 2)


def _pad_blocks(w: torch.Tensor) -> torch.Tensor:
    """``w`` [M, N] zero-padded to whole 128x128 blocks and viewed as [M/128, 128, N/128, 128] (no copy
    when already aligned)."""
    rows, cols = w.shape
    rb, cb = -(-rows // BLOCK), -(-cols // BLOCK)
    if rows % BLOCK or cols % BLOCK:
        w = torch.nn.functional.pad(w, (0, cb * BLOCK - cols, 0, rb * BLOCK - rows))
    return w.view(rb, BLOCK, cb, BLOCK)


def _unpad(blocks: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    rb, _, cb, _ = blocks.shape
    return blocks.reshape(rb * BLOCK, cb * BLOCK)[:rows, :cols]


def quantize_fp8_blocks(w: torch.Tensor, magnitudes: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a float32 [M, N] band (M a multiple of 128, or the tensor's last rows) per 128x128 block.

    Returns ``(q, scale_inv)``: float8_e4m3fn [M, N] and float32 [ceil(M/128), ceil(N/128)], with
    ``scale_inv = amax(|block|) / 448`` (1.0 for an all-zero block).  ``magnitudes``, if given, multiplies
    each block of ``w`` first.  ``w`` is overwritten (it is the band's scratch space).
    """
    rows, cols = w.shape
    blocks = _pad_blocks(w)
    if magnitudes is not None:
        blocks.mul_(magnitudes[:, None, :, None])
    amax = torch.maximum(blocks.amax(dim=(1, 3)), blocks.amin(dim=(1, 3)).neg())
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    blocks.div_(scale[:, None, :, None]).clamp_(-FP8_MAX, FP8_MAX)
    return _unpad(blocks, rows, cols).to(torch.float8_e4m3fn), scale


def dequantize_fp8_blocks(q: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """Spec §1.4: ``bf16(float32(q[r, c]) * scale_inv[r // 128, c // 128])``, edge blocks included."""
    rows, cols = q.shape
    blocks = _pad_blocks(q.to(torch.float32))
    blocks.mul_(scale_inv[:, None, :, None])
    return _unpad(blocks, rows, cols).to(torch.bfloat16)


def _band_rows(spec: TensorSpec) -> int:
    if len(spec.shape) < 2:
        return max(spec.shape[0] if spec.shape else 1, 1)
    row_bytes = 4 * math.prod(spec.shape[1:])
    return BLOCK * max(1, BAND_BYTES // (BLOCK * row_bytes))


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
    q, scale = quantize_fp8_blocks(w, _block_magnitudes(spec.source, r0, r1 - r0, spec.shape[1]))
    del w
    if not cfg.fp8:
        return [(spec.name, dequantize_fp8_blocks(q, scale), r0 * row_bytes)]
    return [(spec.name, q, r0 * row_bytes), (spec.name + "_scale_inv", scale, (r0 // BLOCK) * scale.shape[1] * 4)]


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
            names = [spec.name] + ([spec.name + "_scale_inv"] if cfg.fp8 and spec.kind == LINEAR else [])
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

def _round_vocab(v: float) -> int:
    return int(min(max(v // BLOCK * BLOCK, 1024), DEEPSEEK_V3_671B.vocab_size))


def synth_for_size(target_bytes: int, fp8: bool = False, seed: int = 0, *, expert_multiple: int = 8,
                   max_shard_bytes: int = 512 * MiB) -> SynthConfig:
    """A real-shaped slice of DeepSeek-V3 (hidden 7168 and all per-tensor shapes of the 671B model) whose
    checkpoint lands near ``target_bytes`` (within 2% when reachable).

    Free knobs: ``num_hidden_layers``, ``n_routed_experts`` (a multiple of ``expert_multiple``, <= 256),
    ``first_k_dense_replace`` (1, or 0 when a dense layer does not fit), ``num_nextn_predict_layers`` (1, or 0
    when it does not fit) and ``vocab_size`` (a multiple of 128 in [1024, 129280]; the fine knob, starting
    near a quarter of the target).  Structures are tried in the order (MTP, dense) = (1, 1), (0, 1), (1, 0),
    (0, 0); within one, the fewest layers win.
    """
    if target_bytes <= 0:
        raise ValidationError(f"synth_for_size: target_bytes: expected a positive size, got {target_bytes}.")
    base = replace(DEEPSEEK_V3_671B, fp8=fp8, seed=seed, max_shard_bytes=max_shard_bytes)
    H = base.hidden_size
    best, best_err = None, None
    expert_counts = list(range(expert_multiple, base.n_routed_experts + 1, expert_multiple)) or [expert_multiple]
    for mtp, dense in ((1, 1), (0, 1), (1, 0), (0, 0)):
        row = (2 + 2 * mtp) * 2 * H  # bytes per vocab row: embed, lm_head, and the MTP copies
        v0 = _round_vocab(0.25 * target_bytes / row)
        for layers in range(dense + 1, base.num_hidden_layers + 1):
            shaped = replace(base, num_hidden_layers=layers, first_k_dense_replace=dense,
                             num_nextn_predict_layers=mtp, vocab_size=v0)
            if checkpoint_bytes(replace(shaped, n_routed_experts=expert_counts[0], vocab_size=1024)) > target_bytes:
                break  # more layers only grow
            cfg = min((replace(shaped, n_routed_experts=e) for e in expert_counts),
                      key=lambda c: abs(checkpoint_bytes(c) - target_bytes))
            rest = target_bytes - (checkpoint_bytes(cfg) - v0 * row)
            cfg = replace(cfg, vocab_size=_round_vocab(rest / row))
            err = abs(checkpoint_bytes(cfg) - target_bytes)
            if best_err is None or err < best_err:
                best, best_err = cfg, err
            if err <= 0.02 * target_bytes:
                return cfg
    if best is None:
        smallest = replace(base, num_hidden_layers=1, first_k_dense_replace=0, num_nextn_predict_layers=0,
                           n_routed_experts=expert_counts[0], vocab_size=1024)
        raise ValidationError(f"synth_for_size: {target_bytes} bytes is below the smallest real-shaped slice "
                              f"({checkpoint_bytes(smallest)} bytes). Ask for more, or shrink TINY instead.")
    return best
