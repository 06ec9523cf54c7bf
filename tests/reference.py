"""Eager reference HF -> mcore converter for DeepSeek-V3: the test oracle.

Written straight from the spec ``deepseek_v3_mindspeed.md`` (sections 1-4, 10), deliberately simple
and independent of the ``streamconv`` package: it loads every tensor into memory, slices with
``torch.chunk`` and builds every rank's state dict in full. Tests compare the streaming converter's
output with it byte for byte::

    expected = reference_hf_to_mcore(hf_dir, tp=2, pp=2, ep=2, moe_grouped_gemm=True, mtp_num_layers=1)
    assert_same_checkpoint(load_mcore_dir(save_dir), expected)

Scope: TP / PP / EP, grouped GEMM or local experts, MTP, ``num_layers`` truncation, the
``first_k_dense_replace`` remap, the layer placements of spec 4.2-4.5 (noop layers, num-layer-list,
VPP and dualpipev: ``reference_placement``), legacy MLA key names, mla-mm-split (3.4),
moe-tp-extend-ep (3.6) and expert-tensor-parallel-size 1 (4.7).

Only torch, safetensors, json and os are used, on purpose.
"""

import json
import os
from collections import OrderedDict
from collections.abc import Mapping

import torch
from safetensors.torch import load_file

TRACKER_FILE = "latest_checkpointed_iteration.txt"
ITER_DIR = "iter_0000001"
RANK_FILE = "model_optim_rng.pt"
FP8_BLOCK = 128
SCALE_SUFFIX = "_scale_inv"

__all__ = [
    "assert_same_checkpoint",
    "dequant_fp8_block",
    "load_hf",
    "load_mcore_dir",
    "rank_dir_name",
    "reference_final_chunk",
    "reference_hf_to_mcore",
    "reference_placement",
]


# --------------------------------------------------------------------------------------------------
# HF input


def dequant_fp8_block(weight, scale_inv):
    """Spec 1.4: ``bf16(float32(W[r, c]) * S[r // 128, c // 128])``, edge blocks partial."""
    if weight.dim() != 2:
        raise ValueError(f"FP8 weight must be 2-D, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    want = (-(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK))
    if tuple(scale_inv.shape) != want:
        raise ValueError(
            f"scale_inv shape {tuple(scale_inv.shape)} does not match weight {tuple(weight.shape)}"
            f" (expected {want})"
        )
    full = scale_inv.float().repeat_interleave(FP8_BLOCK, 0).repeat_interleave(FP8_BLOCK, 1)
    return (weight.float() * full[:rows, :cols]).to(torch.bfloat16)


def load_hf(hf_dir):
    """Load ``config.json`` and every tensor of every shard; FP8 weights are dequantized to bf16.

    Shards are those listed in ``model.safetensors.index.json`` (or the single ``model.safetensors``
    when there is no index). ``<name>_scale_inv`` companions are consumed and dropped.

    Returns ``(config, tensors)``.
    """
    with open(os.path.join(hf_dir, "config.json")) as f:
        config = json.load(f)
    index_path = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.exists(index_path):
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        weight_map = None
        files = ["model.safetensors"]

    raw = {}
    for file_name in files:
        part = load_file(os.path.join(hf_dir, file_name))
        for name, tensor in part.items():
            if name in raw:
                raise ValueError(f"{name}: present in more than one shard")
            raw[name] = tensor
    if weight_map is not None and set(weight_map) != set(raw):
        missing = sorted(set(weight_map) - set(raw))
        unlisted = sorted(set(raw) - set(weight_map))
        raise ValueError(f"index and shards disagree: missing {missing}, not in index {unlisted}")

    tensors = {}
    for name, tensor in raw.items():
        if name.endswith(SCALE_SUFFIX):
            if name[: -len(SCALE_SUFFIX)] not in raw:
                raise ValueError(f"{name}: scale without its weight")
            continue
        scale = raw.get(name + SCALE_SUFFIX)
        tensors[name] = tensor if scale is None else dequant_fp8_block(tensor, scale)
    return config, tensors


class _Dims:
    """Model sizes from config.json (spec 1.1); never constants."""

    def __init__(self, config):
        self.hidden = config["hidden_size"]
        self.vocab = config["vocab_size"]
        self.num_hf_layers = config["num_hidden_layers"]
        self.first_k_dense = config["first_k_dense_replace"]
        self.ffn = config["intermediate_size"]
        self.moe_ffn = config["moe_intermediate_size"]
        self.experts = config["n_routed_experts"]
        self.shared_ffn = config["moe_intermediate_size"] * config["n_shared_experts"]
        self.heads = config["num_attention_heads"]
        self.q_lora = config["q_lora_rank"]
        self.kv_lora = config["kv_lora_rank"]
        self.nope = config["qk_nope_head_dim"]
        self.rope = config["qk_rope_head_dim"]
        self.v_dim = config["v_head_dim"]
        self.num_mtp = config.get("num_nextn_predict_layers", 0)


def _hf_shapes(d, i, is_dense, is_mtp):
    """Expected HF shapes of layer i (spec 1.3), used to check the input against config.json."""
    pre = f"model.layers.{i}."
    h = d.hidden
    shapes = {
        pre + "input_layernorm.weight": (h,),
        pre + "post_attention_layernorm.weight": (h,),
        pre + "self_attn.q_a_proj.weight": (d.q_lora, h),
        pre + "self_attn.q_a_layernorm.weight": (d.q_lora,),
        pre + "self_attn.q_b_proj.weight": (d.heads * (d.nope + d.rope), d.q_lora),
        pre + "self_attn.kv_a_proj_with_mqa.weight": (d.kv_lora + d.rope, h),
        pre + "self_attn.kv_a_layernorm.weight": (d.kv_lora,),
        pre + "self_attn.kv_b_proj.weight": (d.heads * (d.nope + d.v_dim), d.kv_lora),
        pre + "self_attn.o_proj.weight": (h, d.heads * d.v_dim),
    }
    if is_dense:
        shapes[pre + "mlp.gate_proj.weight"] = (d.ffn, h)
        shapes[pre + "mlp.up_proj.weight"] = (d.ffn, h)
        shapes[pre + "mlp.down_proj.weight"] = (h, d.ffn)
    else:
        shapes[pre + "mlp.gate.weight"] = (d.experts, h)
        shapes[pre + "mlp.gate.e_score_correction_bias"] = (d.experts,)
        shapes[pre + "mlp.shared_experts.gate_proj.weight"] = (d.shared_ffn, h)
        shapes[pre + "mlp.shared_experts.up_proj.weight"] = (d.shared_ffn, h)
        shapes[pre + "mlp.shared_experts.down_proj.weight"] = (h, d.shared_ffn)
        for j in range(d.experts):
            shapes[pre + f"mlp.experts.{j}.gate_proj.weight"] = (d.moe_ffn, h)
            shapes[pre + f"mlp.experts.{j}.up_proj.weight"] = (d.moe_ffn, h)
            shapes[pre + f"mlp.experts.{j}.down_proj.weight"] = (h, d.moe_ffn)
    if is_mtp:
        shapes[pre + "embed_tokens.weight"] = (d.vocab, h)
        shapes[pre + "enorm.weight"] = (h,)
        shapes[pre + "hnorm.weight"] = (h,)
        shapes[pre + "eh_proj.weight"] = (h, 2 * h)
        shapes[pre + "shared_head.norm.weight"] = (h,)
    return shapes


def _check_hf_shapes(hf, expected):
    problems = []
    for name, shape in expected.items():
        if name not in hf:
            problems.append(f"{name}: missing")
        elif tuple(hf[name].shape) != shape:
            problems.append(f"{name}: shape (expected {shape}, got {tuple(hf[name].shape)})")
    if problems:
        raise ValueError("HF checkpoint does not match config.json:\n  " + "\n  ".join(problems))


# --------------------------------------------------------------------------------------------------
# Layout


def rank_dir_name(tp_rank, pp_rank, ep_rank, pp_size, ep_size):
    """Spec 2.1 (Megatron ``get_checkpoint_name``)."""
    name = f"mp_rank_{tp_rank:02d}"
    if pp_size > 1:
        name += f"_{pp_rank:03d}"
    if ep_size > 1:
        name += f"_{ep_rank:03d}"
    return name


def _hf_layer_list(num_layers, config_k, k):
    """Spec 4.2: [0..K'-1] + [K, K+1, ...], truncated to num_layers (identity when K' == K)."""
    return (list(range(k)) + list(range(config_k, config_k + num_layers)))[:num_layers]


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _validate_layout(num_layers, pp, vpp_layers, noop_layers, num_layer_list, dualpipev):
    """The layout rules of spec 4.2-4.5; raises ValueError listing every problem."""
    if not _is_int(pp) or pp < 1:
        raise ValueError(f"pp must be a positive int, got {pp!r}")
    if not _is_int(num_layers) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
    problems = []
    noop = list(noop_layers)
    if any(not _is_int(g) for g in noop):
        problems.append(f"noop_layers must be ints, got {noop!r}")
    else:
        if len(set(noop)) != len(noop):
            problems.append(f"noop_layers has duplicates: {noop}")
        if any(not 0 <= g < num_layers for g in noop):
            problems.append(f"noop_layers must be slot indices in 0..{num_layers - 1}, got {noop}")
        elif len(set(noop)) >= num_layers:
            problems.append(f"noop_layers {noop} leave no real layer out of num_layers={num_layers}")
    if vpp_layers is not None and dualpipev:
        problems.append("vpp_layers and dualpipev are mutually exclusive")
    if num_layer_list is not None:
        if vpp_layers is not None or noop or dualpipev:
            problems.append("num_layer_list is mutually exclusive with vpp_layers, noop_layers and dualpipev")
        counts = list(num_layer_list)
        if len(counts) != pp or any(not _is_int(a) or a < 1 for a in counts):
            problems.append(f"num_layer_list must be {pp} (pp) positive ints, got {counts!r}")
        elif sum(counts) != num_layers:
            problems.append(f"num_layer_list {counts} sums to {sum(counts)}, not num_layers={num_layers}")
    elif dualpipev:
        if num_layers % (2 * pp):
            problems.append(f"dualpipev: num_layers {num_layers} not divisible by 2 * pp = {2 * pp}")
    else:
        if num_layers % pp:
            problems.append(f"num_layers {num_layers} not divisible by pp {pp}")
        elif vpp_layers is not None:
            if not _is_int(vpp_layers) or vpp_layers < 1:
                problems.append(f"vpp_layers must be a positive int, got {vpp_layers!r}")
            elif (num_layers // pp) % vpp_layers:
                problems.append(
                    f"vpp_layers {vpp_layers} does not divide num_layers / pp = {num_layers // pp}"
                )
    if problems:
        raise ValueError("; ".join(problems))


def _chunk_slots(num_layers, pp, vpp_layers, num_layer_list, dualpipev):
    """``{(pp_rank, chunk): [(local, slot), ...]}`` for every slot, noop slots included (spec 4.3-4.5)."""
    chunks = {}
    if num_layer_list is not None:  # 4.3: stage p holds the next a_p layers
        start = 0
        for p, count in enumerate(num_layer_list):
            chunks[(p, 0)] = [(local, start + local) for local in range(count)]
            start += count
    elif dualpipev:  # 4.5: model0 walks down, model1 walks back up
        s = num_layers // (2 * pp)
        for p in range(pp):
            down = range(p * s, p * s + s)
            up = range(num_layers - (p + 1) * s, num_layers - p * s)
            chunks[(p, 0)] = list(enumerate(down))
            chunks[(p, 1)] = list(enumerate(up))
    elif vpp_layers is not None:  # 4.4: chunk c = g // s, pp = c % PP, v = c // PP, local = g % s
        s = vpp_layers
        vpp_size = num_layers // pp // s
        chunks = {(p, v): [] for p in range(pp) for v in range(vpp_size)}
        for g in range(num_layers):
            c = g // s
            chunks[(c % pp, c // pp)].append((g % s, g))
    else:  # 4.3: even split
        per = num_layers // pp
        chunks = {(p, 0): [] for p in range(pp)}
        for g in range(num_layers):
            chunks[(g // per, 0)].append((g % per, g))
    return chunks


def reference_placement(
    num_layers,
    pp,
    hf_layers=None,
    *,
    vpp_layers=None,
    noop_layers=(),
    num_layer_list=None,
    dualpipev=False,
):
    """Where every decoder layer goes: ``{(pp_rank, chunk): [(local_index, hf_index), ...]}`` (spec 4.2-4.5).

    ``num_layers`` is L, noop slots included. ``hf_layers`` is the HF index of each *real* slot in
    ascending slot order (default ``0..L-|noop|-1``, i.e. HF index = slot - #noop slots below it).
    ``chunk`` is the VPP / dualpipev model chunk (``modelN``), always 0 otherwise. Every chunk is
    present, possibly empty; noop slots are left out but keep their local index. Raises ValueError.
    """
    _validate_layout(num_layers, pp, vpp_layers, noop_layers, num_layer_list, dualpipev)
    noop = set(noop_layers)
    real_slots = [g for g in range(num_layers) if g not in noop]
    if hf_layers is None:
        hf_layers = list(range(len(real_slots)))
    if len(hf_layers) != len(real_slots):
        raise ValueError(f"{len(hf_layers)} HF layers for {len(real_slots)} real slots")
    hf_of_slot = dict(zip(real_slots, hf_layers))
    placement = {}
    for key, slots in _chunk_slots(num_layers, pp, vpp_layers, num_layer_list, dualpipev).items():
        placement[key] = [(local, hf_of_slot[g]) for local, g in slots if g not in noop]
    return placement


def reference_final_chunk(num_layers, pp, *, vpp_layers=None, dualpipev=False):
    """``(pp_rank, chunk)`` holding final norm, output_layer and MTP (spec 3.1, 3.7, 4.4, 4.5)."""
    if dualpipev:
        return (0, 1)
    if vpp_layers is not None:
        return (pp - 1, num_layers // pp // vpp_layers - 1)
    return (pp - 1, 0)


def _etp1_pairs(tp, ep):
    """Spec 4.7 (``get_etp_valid_ckpts_list``): the (tp, ep) rank pairs Megatron instantiates under ETP 1."""
    if tp % ep == 0:
        return [(t, t % ep) for t in range(tp)]
    if ep % tp == 0:
        return [(e % tp, e) for e in range(ep)]
    raise ValueError(f"expert_tensor_parallel_size 1 needs tp % ep == 0 or ep % tp == 0, got tp={tp}, ep={ep}")


def _validate(d, tp, pp, ep, mtp_num_layers, num_real, k, dualpipev, k_given, experts="tp"):
    problems = []
    for flag, value in (("tp", tp), ("pp", pp), ("ep", ep)):
        if not _is_int(value) or value < 1:
            problems.append(f"{flag} must be a positive int, got {value!r}")
    if problems:
        raise ValueError("; ".join(problems))
    if num_real > d.num_hf_layers:
        problems.append(
            f"num_layers minus noop layers = {num_real} real layers, more than the {d.num_hf_layers} HF layers"
        )
    if dualpipev:
        # Spec 4.2 / 10.6: the reference ignores the K' remap under dualpipev. Rather than silently
        # ignoring a request for it, the oracle refuses any value other than the config's K.
        if k_given != d.first_k_dense:
            problems.append(
                f"first_k_dense_replace {k_given} is not supported with dualpipev (the remap is not applied"
                f" there); pass None or the config value {d.first_k_dense}"
            )
        if tp > 1 and experts != "extend":
            problems.append("dualpipev with tp > 1 needs moe-tp-extend-ep (moe_tp_extend_ep=True)")
    elif not 0 <= k <= d.first_k_dense:
        problems.append(f"first_k_dense_replace must be in 0..{d.first_k_dense} (config), got {k}")
    elif k + (d.num_hf_layers - d.first_k_dense) < num_real:
        problems.append(f"first_k_dense_replace {k} leaves fewer than num_layers={num_real} HF layers")
    if not 0 <= mtp_num_layers <= d.num_mtp:
        problems.append(
            f"mtp_num_layers must be in 0..{d.num_mtp} (num_nextn_predict_layers), got {mtp_num_layers}"
        )
    if d.experts % ep:
        problems.append(f"n_routed_experts {d.experts} not divisible by ep {ep}")
    if experts == "extend" and d.experts % (ep * tp):
        problems.append(f"moe_tp_extend_ep: n_routed_experts {d.experts} not divisible by ep * tp = {ep * tp}")
    by_tp = {
        "num_attention_heads": d.heads,
        "vocab_size": d.vocab,
        "intermediate_size": d.ffn,
        "shared experts ffn (moe_intermediate_size * n_shared_experts)": d.shared_ffn,
    }
    if experts == "tp":  # routed experts are TP-split only without tp-extend-ep / ETP 1
        by_tp["moe_intermediate_size"] = d.moe_ffn
    if mtp_num_layers:
        by_tp["hidden_size (eh_proj rows)"] = d.hidden
    for what, size in by_tp.items():
        if size % tp:
            problems.append(f"{what} {size} not divisible by tp {tp}")
    if problems:
        raise ValueError("; ".join(problems))


# --------------------------------------------------------------------------------------------------
# Per-rank tensors (spec 3)


def _own(x):
    return x.clone().contiguous()


def _chunk(x, n, dim, k):
    return torch.chunk(x, n, dim)[k]


def _gated_fc1(gate, up, tp, t):
    """Spec 3.5: rank t holds its gate slice then its up slice."""
    return torch.cat([_chunk(gate, tp, 0, t), _chunk(up, tp, 0, t)], 0)


class _Opts:
    """Per-call mapping options: MLA key names / mm-split (spec 3.3, 3.4) and the expert layout
    ``experts``: "tp" (TP-split, spec 3.6), "extend" (moe-tp-extend-ep, 3.6) or "etp1" (ETP = 1, 4.7)."""

    def __init__(self, grouped_gemm, legacy_names=False, mm_split=False, experts="tp"):
        self.grouped_gemm = grouped_gemm
        self.legacy_names = legacy_names
        self.mm_split = mm_split
        self.experts = experts


def _head_split(weight, heads, first):
    """Spec 3.4: view [NH, D1+D2, R], return the head-major flattenings of rows [0:D1] and [D1:]."""
    per_head = weight.reshape(heads, -1, weight.shape[1])
    return (
        per_head[:, :first, :].reshape(-1, weight.shape[1]),
        per_head[:, first:, :].reshape(-1, weight.shape[1]),
    )


def _attention(hf, d, src, dst, tp, t, opts):
    a = src + "self_attn."
    s = dst + "self_attention."
    qkv = torch.cat([hf[a + "q_a_proj.weight"], hf[a + "kv_a_proj_with_mqa.weight"]], 0)
    # Spec 0 (2025-07-23 rename) / 3.3: legacy names linear_qb, linear_kvb, k_layernorm.
    kv_norm = "k_layernorm" if opts.legacy_names else "kv_layernorm"
    q_up = "linear_qb" if opts.legacy_names else "linear_q_up_proj"
    kv_up = "linear_kvb" if opts.legacy_names else "linear_kv_up_proj"
    out = [
        (s + "linear_qkv.weight", qkv),
        (s + "q_layernorm.weight", hf[a + "q_a_layernorm.weight"]),
        (s + f"{kv_norm}.weight", hf[a + "kv_a_layernorm.weight"]),
    ]
    if opts.mm_split:  # spec 3.4: four column-parallel matrices, whole heads per rank
        qk_nope, qk_rope = _head_split(hf[a + "q_b_proj.weight"], d.heads, d.nope)
        kv_nope, v = _head_split(hf[a + "kv_b_proj.weight"], d.heads, d.nope)
        out += [
            (s + "linear_qk_nope.weight", _chunk(qk_nope, tp, 0, t)),
            (s + "linear_qk_rope.weight", _chunk(qk_rope, tp, 0, t)),
            (s + "linear_kv_nope.weight", _chunk(kv_nope, tp, 0, t)),
            (s + "linear_v.weight", _chunk(v, tp, 0, t)),
        ]
    else:
        out += [
            (s + f"{q_up}.weight", _chunk(hf[a + "q_b_proj.weight"], tp, 0, t)),
            (s + f"{kv_up}.weight", _chunk(hf[a + "kv_b_proj.weight"], tp, 0, t)),
        ]
    out.append((s + "linear_proj.weight", _chunk(hf[a + "o_proj.weight"], tp, 1, t)))
    return out


def _dense_mlp(hf, src, dst, tp, t):
    m = src + "mlp."
    return [
        (dst + "mlp.linear_fc1.weight", _gated_fc1(hf[m + "gate_proj.weight"], hf[m + "up_proj.weight"], tp, t)),
        (dst + "mlp.linear_fc2.weight", _chunk(hf[m + "down_proj.weight"], tp, 1, t)),
    ]


def _moe_mlp(hf, d, src, dst, tp, t, ep, e, opts):
    m = src + "mlp."
    out = [
        (dst + "mlp.router.weight", hf[m + "gate.weight"][: d.experts]),
        (dst + "mlp.router.expert_bias", hf[m + "gate.e_score_correction_bias"][: d.experts]),
        (
            dst + "mlp.shared_experts.linear_fc1.weight",
            _gated_fc1(hf[m + "shared_experts.gate_proj.weight"], hf[m + "shared_experts.up_proj.weight"], tp, t),
        ),
        (dst + "mlp.shared_experts.linear_fc2.weight", _chunk(hf[m + "shared_experts.down_proj.weight"], tp, 1, t)),
    ]
    return out + _routed_experts(hf, d, m, dst, tp, t, ep, e, opts)


def _routed_experts(hf, d, m, dst, tp, t, ep, e, opts):
    """Spec 3.6 / 4.7: the routed experts of HF ``{m}experts.{j}`` on rank (t, e), local or grouped GEMM.
    Uses ``d.experts`` and ``d.hidden`` only (shared with the Qwen3-MoE reference)."""
    out = []
    if opts.experts == "extend":  # spec 3.6: bucket b = e*TP + t of n = E/(EP*TP) whole experts
        n_local = d.experts // (ep * tp)
        first = (e * tp + t) * n_local
    else:  # "tp" and "etp1": EP rank e holds experts e*E/EP .. (e+1)*E/EP - 1
        n_local = d.experts // ep
        first = e * n_local
    fc1s, fc2s = [], []
    for q in range(n_local):
        x = f"{m}experts.{first + q}."
        if opts.experts == "tp":
            fc1s.append(_gated_fc1(hf[x + "gate_proj.weight"], hf[x + "up_proj.weight"], tp, t))
            fc2s.append(_chunk(hf[x + "down_proj.weight"], tp, 1, t))
        else:  # whole experts (spec 3.6 tp-extend-ep, 4.7 ETP 1); correct without GEMM too (10.5)
            fc1s.append(torch.cat([hf[x + "gate_proj.weight"], hf[x + "up_proj.weight"]], 0))
            fc2s.append(hf[x + "down_proj.weight"])
    if opts.grouped_gemm:
        # Spec 3.6(b): [n, H, 2Fm/TP] memory reinterpreted as [H, n*2Fm/TP]; NOT cat_1 of the transposes.
        stacked = torch.stack([w.t() for w in fc1s], 0).contiguous()
        out.append((dst + "mlp.experts.weight1", stacked.view(d.hidden, -1)))
        out.append((dst + "mlp.experts.weight2", torch.cat([w.t() for w in fc2s], 0)))
    else:
        for q in range(n_local):
            out.append((f"{dst}mlp.experts.local_experts.{q}.linear_fc1.weight", fc1s[q]))
            out.append((f"{dst}mlp.experts.local_experts.{q}.linear_fc2.weight", fc2s[q]))
    return out


def _layer(hf, d, hf_index, dst, is_dense, tp, t, ep, e, opts):
    src = f"model.layers.{hf_index}."
    out = [(dst + "input_layernorm.weight", hf[src + "input_layernorm.weight"])]
    out += _attention(hf, d, src, dst, tp, t, opts)
    out.append((dst + "pre_mlp_layernorm.weight", hf[src + "post_attention_layernorm.weight"]))
    if is_dense:
        out += _dense_mlp(hf, src, dst, tp, t)
    else:
        out += _moe_mlp(hf, d, src, dst, tp, t, ep, e, opts)
    return out


def _chunk_state_dict(hf, d, *, tp, t, ep, e, opts, mtp_num_layers, layers, k, embedding, final):
    """One model chunk of one rank. ``layers``: [(local, hf_index)]; ``embedding``: None, "main" (the
    first chunk) or "mtp" (the MTP chunk's own copy, spec 3.7); ``final``: final norm, output_layer, MTP."""
    items = []
    if embedding == "main":
        items.append(("embedding.word_embeddings.weight", _chunk(hf["model.embed_tokens.weight"], tp, 0, t)))
    elif embedding == "mtp":
        # Spec 3.7: the MTP chunk gets its own embedding copy, from the HF MTP layer (module 0).
        mtp_embed = hf[f"model.layers.{d.num_hf_layers}.embed_tokens.weight"]
        items.append(("embedding.word_embeddings.weight", _chunk(mtp_embed, tp, 0, t)))
    for local, hf_index in layers:
        items += _layer(hf, d, hf_index, f"decoder.layers.{local}.", hf_index < k, tp, t, ep, e, opts)
    if final:
        norm_key = "final_layernorm.weight" if mtp_num_layers else "decoder.final_layernorm.weight"
        items.append((norm_key, hf["model.norm.weight"]))
        items.append(("output_layer.weight", _chunk(hf["lm_head.weight"], tp, 0, t)))
        for m in range(mtp_num_layers):
            hf_index = d.num_hf_layers + m  # config num_hidden_layers + m, whatever num_layers / noop are
            src = f"model.layers.{hf_index}."
            dst = f"mtp.layers.{m}."
            items.append((dst + "enorm.weight", hf[src + "enorm.weight"]))
            items.append((dst + "hnorm.weight", hf[src + "hnorm.weight"]))
            items.append((dst + "eh_proj.weight", _chunk(hf[src + "eh_proj.weight"], tp, 0, t)))
            items += _layer(hf, d, hf_index, dst + "transformer_layer.", False, tp, t, ep, e, opts)
            items.append((f"mtp.final_layernorms.{m}.weight", hf[src + "shared_head.norm.weight"]))
    state = OrderedDict()
    for key, tensor in items:
        if key in state:
            raise AssertionError(f"reference bug: duplicate key {key}")
        state[key] = _own(tensor)
    return state


def reference_hf_to_mcore(
    hf_dir,
    *,
    tp=1,
    pp=1,
    ep=1,
    moe_grouped_gemm=False,
    mtp_num_layers=0,
    num_layers=None,
    first_k_dense_replace=None,
    vpp_layers=None,
    noop_layers=(),
    num_layer_list=None,
    dualpipev=False,
    mla_key_names="current",
    mla_mm_split=False,
    moe_tp_extend_ep=False,
    expert_tensor_parallel_size=None,
):
    """Every file of the mcore checkpoint, keyed by path relative to the save dir.

    ``"latest_checkpointed_iteration.txt"`` maps to ``b"1"``; each
    ``"iter_0000001/<rank dir>/model_optim_rng.pt"`` maps to
    ``{"model": OrderedDict, "checkpoint_version": 3.0, "iteration": 1}``, or with ``vpp_layers`` /
    ``dualpipev`` to ``{"checkpoint_version": 3.0, "iteration": 1, "model0": ..., "model{v-1}": ...}``.

    ``num_layers`` is L (default config ``num_hidden_layers``) and counts the ``noop_layers`` slots.
    ``vpp_layers`` is ``--num-layers-per-virtual-pipeline-stage``, ``num_layer_list`` the PP layer
    counts, ``dualpipev`` ``--schedules-method dualpipev``; placement is ``reference_placement``.
    Under dualpipev the ``first_k_dense_replace`` remap is not applied (spec 4.2, 10.6), so any value
    other than the config's is refused, as is tp > 1 without ``moe_tp_extend_ep``.

    ``mla_key_names`` "current" or "legacy" (pre-2025-07-23 ``linear_qb`` / ``linear_kvb`` /
    ``k_layernorm``); ``mla_mm_split`` writes ``linear_qk_nope`` / ``linear_qk_rope`` / ``linear_kv_nope``
    / ``linear_v`` instead of the up-projections (spec 3.4; these have no legacy form).
    ``moe_tp_extend_ep``: whole experts in EP*TP buckets, bucket ``e*TP + t`` (spec 3.6), correct with
    and without grouped GEMM. ``expert_tensor_parallel_size`` None or 1: with 1, whole experts by EP
    rank and only the (tp, ep) pairs of spec 4.7 get a file. The two are mutually exclusive.
    Raises ValueError for sizes that do not divide and out-of-range or conflicting options.
    """
    if mla_key_names not in ("current", "legacy"):
        raise ValueError(f"mla_key_names must be 'current' or 'legacy', got {mla_key_names!r}")
    if expert_tensor_parallel_size not in (None, 1) or isinstance(expert_tensor_parallel_size, bool):
        raise ValueError(f"expert_tensor_parallel_size must be None or 1, got {expert_tensor_parallel_size!r}")
    if moe_tp_extend_ep and expert_tensor_parallel_size is not None:
        raise ValueError("moe_tp_extend_ep and expert_tensor_parallel_size are mutually exclusive")
    experts = "extend" if moe_tp_extend_ep else "etp1" if expert_tensor_parallel_size == 1 else "tp"
    opts = _Opts(moe_grouped_gemm, mla_key_names == "legacy", bool(mla_mm_split), experts)
    config, hf = load_hf(hf_dir)
    d = _Dims(config)
    num_layers = d.num_hf_layers if num_layers is None else num_layers
    noop_layers = tuple(noop_layers)
    k_given = d.first_k_dense if first_k_dense_replace is None else first_k_dense_replace
    k = d.first_k_dense if dualpipev else k_given
    _validate_layout(num_layers, pp, vpp_layers, noop_layers, num_layer_list, dualpipev)
    num_real = num_layers - len(noop_layers)
    _validate(d, tp, pp, ep, mtp_num_layers, num_real, k, dualpipev, k_given, experts)
    if experts == "etp1":
        if dualpipev and tp > 1:
            raise ValueError("dualpipev with tp > 1 is only supported with moe_tp_extend_ep, not ETP 1")
        rank_pairs = _etp1_pairs(tp, ep)
    else:
        rank_pairs = [(t, e) for t in range(tp) for e in range(ep)]
    hf_layers = _hf_layer_list(num_real, d.first_k_dense, k)  # identity under dualpipev (k == K)
    placement = reference_placement(
        num_layers, pp, hf_layers, vpp_layers=vpp_layers, noop_layers=noop_layers,
        num_layer_list=num_layer_list, dualpipev=dualpipev,
    )
    final_chunk = reference_final_chunk(num_layers, pp, vpp_layers=vpp_layers, dualpipev=dualpipev)
    chunked = vpp_layers is not None or dualpipev
    num_chunks = max(v for _, v in placement) + 1

    expected = {}
    for i in hf_layers:
        expected.update(_hf_shapes(d, i, i < d.first_k_dense, False))
    for m in range(mtp_num_layers):
        expected.update(_hf_shapes(d, d.num_hf_layers + m, False, True))
    expected["model.embed_tokens.weight"] = (d.vocab, d.hidden)
    expected["model.norm.weight"] = (d.hidden,)
    expected["lm_head.weight"] = (d.vocab, d.hidden)
    _check_hf_shapes(hf, expected)

    files = {TRACKER_FILE: b"1"}
    for p in range(pp):
        for t, e in rank_pairs:
            chunks = []
            for v in range(num_chunks):
                if (p, v) == (0, 0):
                    embedding = "main"
                elif (p, v) == final_chunk and mtp_num_layers and pp > 1:
                    embedding = "mtp"
                else:
                    embedding = None
                chunks.append(_chunk_state_dict(
                    hf, d, tp=tp, t=t, ep=ep, e=e, opts=opts,
                    mtp_num_layers=mtp_num_layers, layers=placement[(p, v)], k=k,
                    embedding=embedding, final=(p, v) == final_chunk,
                ))
            path = f"{ITER_DIR}/{rank_dir_name(t, p, e, pp, ep)}/{RANK_FILE}"
            if chunked:
                obj = {"checkpoint_version": 3.0, "iteration": 1}
                for v, chunk_state in enumerate(chunks):
                    obj[f"model{v}"] = chunk_state
            else:
                obj = {"model": chunks[0], "checkpoint_version": 3.0, "iteration": 1}
            files[path] = obj
    return files


# --------------------------------------------------------------------------------------------------
# Reading a written checkpoint and comparing


def load_mcore_dir(save_dir):
    """Every file under ``save_dir`` keyed by relative path: ``.pt`` files loaded with
    ``torch.load(weights_only=True)``, anything else as raw bytes (so stray files show up).  streamconv's
    run journal (``.streamconv_journal.jsonl``, bookkeeping for resume and verify) is not part of the
    checkpoint and is skipped, as is ``streamconv_source.json`` (the HF config and layout it records for the
    way back, which Megatron ignores; tests/e2e/test_mcore2hf.py checks it)."""
    files = {}
    for root, _dirs, names in os.walk(save_dir):
        for name in names:
            if name in (".streamconv_journal.jsonl", "streamconv_source.json"):
                continue
            path = os.path.join(root, name)
            rel = os.path.relpath(path, save_dir).replace(os.sep, "/")
            if name.endswith(".pt"):
                files[rel] = torch.load(path, map_location="cpu", weights_only=True)
            else:
                with open(path, "rb") as f:
                    files[rel] = f.read()
    return files


def _as_bytes(tensor):
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def _scalar(tensor, flat):
    value = tensor.detach().cpu().reshape(-1)[flat]
    try:
        return value.item()
    except (RuntimeError, TypeError):
        return value.float().item()


def _unravel(flat, shape):
    index = []
    for size in reversed(shape):
        index.append(flat % size)
        flat //= size
    return tuple(reversed(index))


def _assert_same_tensor(actual, expected, where):
    if not isinstance(actual, torch.Tensor):
        raise AssertionError(f"{where}: expected a tensor, got {type(actual).__name__}")
    if actual.dtype != expected.dtype:
        raise AssertionError(f"{where}: dtype {actual.dtype} != expected {expected.dtype}")
    if tuple(actual.shape) != tuple(expected.shape):
        raise AssertionError(f"{where}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a, e = _as_bytes(actual), _as_bytes(expected)
    if torch.equal(a, e):
        return
    byte = int((a != e).nonzero()[0])
    flat = byte // expected.element_size()
    raise AssertionError(
        f"{where}: first differing element at index {_unravel(flat, tuple(expected.shape))} (flat {flat}):"
        f" actual {_scalar(actual, flat)!r} vs expected {_scalar(expected, flat)!r}"
    )


def _assert_same_value(actual, expected, where, check_order):
    if isinstance(expected, torch.Tensor):
        _assert_same_tensor(actual, expected, where)
    elif isinstance(expected, Mapping):
        if not isinstance(actual, Mapping):
            raise AssertionError(f"{where}: expected a mapping, got {type(actual).__name__}")
        missing = [key for key in expected if key not in actual]
        extra = [key for key in actual if key not in expected]
        if missing or extra:
            raise AssertionError(f"{where}: keys differ; missing {missing}, unexpected {extra}")
        if check_order and list(actual) != list(expected):
            first = next(i for i, (x, y) in enumerate(zip(actual, expected)) if x != y)
            raise AssertionError(
                f"{where}: key order differs at position {first}:"
                f" actual {list(actual)[first]!r} vs expected {list(expected)[first]!r}"
            )
        for key in expected:
            _assert_same_value(actual[key], expected[key], f"{where}[{key!r}]", check_order)
    elif isinstance(expected, bytes):
        if not isinstance(actual, bytes) or actual != expected:
            raise AssertionError(f"{where}: content {actual!r} != expected {expected!r}")
    else:
        if type(actual) is not type(expected) or actual != expected:
            raise AssertionError(
                f"{where}: value {actual!r} ({type(actual).__name__}) != expected"
                f" {expected!r} ({type(expected).__name__})"
            )


def assert_same_checkpoint(actual, expected, *, check_order=False):
    """Assert two ``{path: content}`` checkpoints are identical.

    Compares the file sets, raw bytes of non-``.pt`` files, top-level keys and values (type included:
    ``3.0`` is not ``3``), state-dict key sets and every tensor's dtype, shape and raw bytes (so NaN
    payloads and -0.0 count). Key order is compared only with ``check_order=True``. The
    AssertionError names the file, the key and the first differing index.
    """
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    if missing or extra:
        raise AssertionError(f"checkpoint files differ; missing {missing}, unexpected {extra}")
    for path in sorted(expected):
        _assert_same_value(actual[path], expected[path], path, check_order)
