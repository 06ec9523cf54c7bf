"""Eager LoRA references for the tests, written from spec §5 (``deepseek_v3_mindspeed.md``); imports nothing
from streamconv.

How the LoRA checkpoints of the tests are made (there is no MindSpeed here to train one):

1. :func:`make_factors` draws HF-level factors for every targeted HF module: A [r, in] and B [out, r] with
   small dyadic values (A in k * 2**-6, B in k * 2**-5, |k| < 32), so every float32 product and sum of
   ``B @ A`` is exact whatever the summation order; only the casts spec §5.2 specifies round.  Modules that
   Megatron fuses into one (q_a_proj + kv_a_proj_with_mqa = linear_qkv; gate_proj + up_proj = linear_fc1)
   share their A, as one PEFT module has one A.
2. :func:`split_factors` splits them per rank file with the *eager base reference* (``tests/reference.py``,
   ``tests/reference_families.py`` for the other families):
   it converts two stand-in HF checkpoints whose targeted weights are A tiled by rows (``W[o] = A[o % r]``) and
   B tiled by columns (``W[:, c] = B[:, c % r]``).  A rank piece's first r rows of the A stand-in are then the
   piece's A (split like the weight's columns, whole where they are whole) and its first r columns of the B
   stand-in its B (split like the rows): exactly PEFT's layout of spec §5.1, for every TP/PP/EP/VPP/MTP/GEMM
   layout the reference supports, with no LoRA-specific splitting code to get wrong.  (This needs every piece
   to start on a multiple of r, which the tiny model's sizes allow for r = 8 up to TP 4.)
3. :func:`write_lora_checkpoint` adds the factors to a base mcore checkpoint (merge type 1: ``X.base_layer.weight``
   + ``X.lora_A.default.weight`` + ``X.lora_B.default.weight``; grouped GEMM ``weight1_lora_a`` ... with the
   memory layouts of §5.1) or writes them alone (type 2, what ``--lora-ckpt-filter`` saves), with torch.save.

The oracles: :func:`merged_hf` merges at the HF level, ``W + dtype(float32(B) @ float32(A)) * (alpha / r)`` in
the base dtype, which equals MindSpeed's per-rank merge because each element's delta is one exact dot product;
:func:`adapter_keys` is the §5.3 export written out (``base_model.model.<module>.lora_A.weight``);
:func:`merge_rank_dict` is MindSpeed's ``_merge_lora`` on one rank dict (used where the base is NF4).
"""

from __future__ import annotations

import json
import os
import re

import torch
from safetensors.torch import save_file

from tests.reference import RANK_FILE, TRACKER_FILE, load_hf
from tests.reference_families import reference_hf_to_mcore_family

R = 8

# Megatron module name -> the HF modules (suffixes under model.layers.{i}.) whose weights it holds (spec §3;
# Qwen3-MoE's linear_qkv fuses q/k/v, ``mindspeed_v2_families.md``)
MEGATRON_TO_HF = {
    "linear_qkv": ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa", "self_attn.q_proj", "self_attn.k_proj",
                   "self_attn.v_proj"),
    "linear_q_up_proj": ("self_attn.q_b_proj",), "linear_kv_up_proj": ("self_attn.kv_b_proj",),
    "linear_qk_nope": ("self_attn.q_b_proj",), "linear_qk_rope": ("self_attn.q_b_proj",),
    "linear_kv_nope": ("self_attn.kv_b_proj",), "linear_v": ("self_attn.kv_b_proj",),
    "linear_proj": ("self_attn.o_proj",),
    "linear_fc1": ("gate_proj", "up_proj"), "linear_fc2": ("down_proj",),
    "eh_proj": ("eh_proj",),
}
MLP_MODULES = {"linear_fc1", "linear_fc2"}


def hf_modules(hf: dict, targets) -> dict[str, str]:
    """Every HF module (``model.layers.3.self_attn.q_a_proj``) the targets wrap -> the id of its A group."""
    out = {}
    for name in sorted(hf):
        if not name.endswith(".weight") or hf[name].dim() != 2:
            continue
        module = name[: -len(".weight")]
        for t in targets:
            for suffix in MEGATRON_TO_HF[t]:
                if t in MLP_MODULES:
                    ok = re.search(rf"\.mlp\.(shared_experts\.|experts\.\d+\.)?{suffix}$", module)
                else:
                    ok = module.endswith("." + suffix) and "embed" not in module
                if ok:
                    group = module.rsplit(".", 1)[0] + ":" + t if len(MEGATRON_TO_HF[t]) > 1 else module
                    out[module] = group
    return out


def make_factors(hf: dict, targets, r: int = R, seed: int = 0, *, a=(31, -6), b=(7, -5)) -> dict:
    """HF module -> (A [r, in], B [out, r]) in bf16, exact-product values (entries ``k * 2**e`` with |k| <= the
    given bound, ``a`` and ``b`` = (bound, e)); fused modules share A."""
    g = torch.Generator().manual_seed(seed)
    a_of_group: dict[str, torch.Tensor] = {}
    out = {}
    for module, group in hf_modules(hf, targets).items():
        rows, cols = hf[module + ".weight"].shape
        if group not in a_of_group:
            k = torch.randint(-a[0], a[0] + 1, (r, cols), generator=g)
            a_of_group[group] = (k * 2.0 ** a[1]).to(torch.bfloat16)
        fb = (torch.randint(-b[0], b[0] + 1, (rows, r), generator=g) * 2.0 ** b[1]).to(torch.bfloat16)
        out[module] = (a_of_group[group], fb)
    return out


def coarse_base(hf_dir: str, out_dir: str, targets, seed: int = 1) -> str:
    """A copy of an HF checkpoint whose targeted weights are ``k * 2**-7`` (|k| <= 8): merged with factors from
    ``make_factors(..., a=(2, -3), b=(2, -4))`` and alpha / r = 2, every merged weight is exact in bf16, so a
    PEFT model computing ``W + s * B @ A`` in float32 and the merged checkpoint are the same model."""
    g = torch.Generator().manual_seed(seed)
    config, hf = load_hf(hf_dir)
    replace = {m + ".weight": (torch.randint(-8, 9, hf[m + ".weight"].shape, generator=g) * 2.0 ** -7)
               .to(torch.bfloat16) for m in hf_modules(hf, targets)}
    return _stand_in(hf_dir, out_dir, replace)


def _stand_in(hf_dir: str, out_dir: str, replace: dict[str, torch.Tensor]) -> str:
    config, tensors = load_hf(hf_dir)
    tensors.update(replace)
    os.makedirs(out_dir, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out_dir, "model.safetensors"))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f)
    return out_dir


def _targeted(key: str, targets) -> str | None:
    """The kind of a rank file key the targets wrap: "linear", "weight1", "weight2" or None."""
    if key.endswith("mlp.experts.weight1"):
        return "weight1" if "linear_fc1" in targets else None
    if key.endswith("mlp.experts.weight2"):
        return "weight2" if "linear_fc2" in targets else None
    if key.endswith(".weight") and key[: -len(".weight")].rsplit(".", 1)[-1] in targets:
        return "linear"
    return None


def local_experts(config: dict, tp: int, ep: int, layout: dict) -> int:
    n = config.get("n_routed_experts") or config.get("num_experts") or config["num_local_experts"]
    n //= ep
    return n // tp if layout.get("moe_tp_extend_ep") else n


def split_factors(hf_dir: str, factors: dict, targets, work: str, r: int = R, **layout) -> dict:
    """``{rank file path: {group: {key: (kind, first factor, second factor)}}}``: the factors PEFT would hold in
    each rank file (GEMM: ``weightN_lora_a``, ``weightN_lora_b`` in their stored shapes; linear: A, B)."""
    config, hf = load_hf(hf_dir)
    a_stand = {m + ".weight": a.repeat(hf[m + ".weight"].shape[0] // r, 1) for m, (a, _) in factors.items()}
    b_stand = {m + ".weight": b.repeat(1, hf[m + ".weight"].shape[1] // r) for m, (_, b) in factors.items()}
    fa = reference_hf_to_mcore_family(_stand_in(hf_dir, os.path.join(work, "a"), a_stand), **layout)
    fb = reference_hf_to_mcore_family(_stand_in(hf_dir, os.path.join(work, "b"), b_stand), **layout)
    tp, ep = layout.get("tp", 1), layout.get("ep", 1)
    n = local_experts(config, tp, ep, layout)
    out: dict = {}
    for path, obj in fa.items():
        if not path.endswith(RANK_FILE):
            continue
        for group, sd in obj.items():
            if not group.startswith("model"):
                continue
            for key, wa in sd.items():
                kind = _targeted(key, targets)
                if kind is None:
                    continue
                wb = fb[path][group][key]
                if kind == "linear":
                    pair = (wa[:r, :].contiguous(), wb[:, :r].contiguous())
                elif kind == "weight1":          # [H, n*C]; memory [n, H, C]
                    h, nc = wa.shape
                    va, vb = wa.reshape(n, h, nc // n), wb.reshape(n, h, nc // n)
                    pair = (va[:, :, :r].contiguous().view(h, r * n), vb[:, :r, :].contiguous().view(r, nc))
                else:                            # weight2 [n*F, H]; memory [n, F, H]
                    nf, h = wa.shape
                    va, vb = wa.reshape(n, nf // n, h), wb.reshape(n, nf // n, h)
                    pair = (va[:, :, :r].contiguous().view(nf, r), vb[:, :r, :].contiguous().view(r * n, h))
                out.setdefault(path, {}).setdefault(group, {})[key] = (kind,) + pair
    return out


# spec §6.1: the entries bitsandbytes' ``QuantState.as_dict(packed=True)`` adds next to an NF4 weight K (K.<entry>)
QUANT_STATE = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4")


def _state_owner(key: str, sd: dict) -> str | None:
    """The weight of ``sd`` whose quant-state entry ``key`` is (None: ``key`` is no such entry)."""
    for e in QUANT_STATE:
        if key.endswith("." + e) and key[: -len(e) - 1] in sd:
            return key[: -len(e) - 1]
    return None


def _factor_keys(key: str, kind: str, lower: bool = False) -> tuple[str, str]:
    if kind == "linear":
        module = key[: -len(".weight")]
        a, b = ("lora_a", "lora_b") if lower else ("lora_A", "lora_B")
        return f"{module}.{a}.default.weight", f"{module}.{b}.default.weight"
    return f"{key}_lora_a", f"{key}_lora_b"


def write_lora_checkpoint(base_dir: str, out_dir: str, pieces: dict, *, kind: str, lower: bool = False,
                          extra_state: bool = False) -> str:
    """A LoRA checkpoint from the base mcore checkpoint ``base_dir`` and :func:`split_factors`' pieces.

    ``kind="type1"``: every rank dict with the targeted linears' bases renamed ``X.base_layer.weight`` and their
    factors right after (GEMM stacks keep their name, factors after); ``"type2"``: the factors alone.
    ``lower``: the ``lora_a``/``lora_b`` spelling; ``extra_state``: Transformer Engine ``_extra_state`` entries.

    An NF4 base (``hf2mcore --qlora-nf4``, spec §6.1) gives a QLoRA training checkpoint: each quantized base's
    state entries ``K.absmax`` ... ``K.quant_state.bitsandbytes__nf4`` move with it, so a wrapped linear holds
    ``X.base_layer.weight`` followed by ``X.base_layer.weight.absmax`` ...: MindSpeed's QLoRA
    ``parallel_linear_save_to_state_dict_wrapper`` writes ``prefix + "weight." + name`` for each entry of
    ``quant_state.as_dict(packed=True)``, and the wrapped parallel linear's prefix is ``X.base_layer.``."""
    with open(os.path.join(base_dir, TRACKER_FILE)) as f:
        tracker = f.read()
    it = f"iter_{int(tracker):07d}"
    for rank in sorted(os.listdir(os.path.join(base_dir, it))):
        path = f"{it}/{rank}/{RANK_FILE}"
        obj = torch.load(os.path.join(base_dir, path), weights_only=True)
        mine = pieces.get(path, {})
        new = {}
        for group, value in obj.items():
            if not group.startswith("model"):
                new[group] = value
                continue
            sd = {}
            for key, tensor in value.items():
                piece = mine.get(group, {}).get(key)
                if piece is None:
                    if kind == "type1" and _state_owner(key, value) not in mine.get(group, {}):
                        sd[key] = tensor
                    continue
                k, first, second = piece
                ka, kb = _factor_keys(key, k, lower)
                if kind == "type1":
                    stored = key[: -len(".weight")] + ".base_layer.weight" if k == "linear" else key
                    sd[stored] = tensor
                    for entry in QUANT_STATE:
                        if f"{key}.{entry}" in value:
                            sd[f"{stored}.{entry}"] = value[f"{key}.{entry}"]
                sd[ka], sd[kb] = first, second
                if extra_state and k == "linear":
                    sd[ka.replace(".weight", "._extra_state")] = None
            new[group] = sd
        os.makedirs(os.path.join(out_dir, it, rank), exist_ok=True)
        torch.save(new, os.path.join(out_dir, path))
    with open(os.path.join(out_dir, TRACKER_FILE), "w") as f:
        f.write(tracker)
    return out_dir


def lora_delta(a: torch.Tensor, b: torch.Tensor, alpha, r: int, dtype) -> torch.Tensor:
    """Spec §5.2: matmul(B.float(), A.float()) cast to the base dtype, times alpha / r (a Python float)."""
    return torch.matmul(b.float(), a.float()).to(dtype) * (alpha / r)


def merged_hf(hf: dict, factors: dict, alpha, r: int = R) -> dict[str, torch.Tensor]:
    """The HF checkpoint with every adapter merged: ``W + delta`` in W's dtype."""
    out = dict(hf)
    for module, (a, b) in factors.items():
        w = hf[module + ".weight"]
        out[module + ".weight"] = w + lora_delta(a, b, alpha, r, w.dtype)
    return out


def adapter_keys(factors: dict) -> dict[str, torch.Tensor]:
    """Spec §5.3's keys (the PEFT convention): ``base_model.model.<HF module>.lora_A.weight`` / ``lora_B``."""
    out = {}
    for module, (a, b) in factors.items():
        out[f"base_model.model.{module}.lora_A.weight"] = a
        out[f"base_model.model.{module}.lora_B.weight"] = b
    return out


def merge_rank_dict(sd: dict, alpha, r: int) -> dict:
    """MindSpeed's ``_merge_lora`` on one rank dict (spec §5.2), grouped-GEMM stacks per local expert on their
    [n, H, -1] / [n, -1, H] views.  Type 2 (after ``{**lora, **base}``): the base is ``X.weight``; type 1: it is
    ``X.base_layer.weight``, which the merged ``X.weight`` replaces."""
    out = dict(sd)
    names = sorted({k.split(".lora")[0] for k in sd if ".lora" in k and not k.endswith("_extra_state")})
    for name in names:
        a, b = out.pop(f"{name}.lora_A.default.weight"), out.pop(f"{name}.lora_B.default.weight")
        base = out.pop(f"{name}.base_layer.weight") if f"{name}.base_layer.weight" in out else out[f"{name}.weight"]
        out[f"{name}.weight"] = base + (alpha / r) * torch.matmul(b.float(), a.float()).to(base.dtype)
    for key in [k for k in sd if k.endswith(("experts.weight1", "experts.weight2")) and k + "_lora_a" in sd]:
        w, a, b = out[key], out.pop(key + "_lora_a"), out.pop(key + "_lora_b")
        if key.endswith("weight1"):
            n = a.shape[1] // r
            wv, av, bv = w.view(n, w.shape[0], -1).clone(), a.view(n, -1, r), b.view(n, r, -1)
        else:
            n = b.shape[0] // r
            wv, av, bv = w.view(n, -1, w.shape[1]).clone(), a.view(n, -1, r), b.view(n, r, -1)
        for i in range(n):
            wv[i] = wv[i] + (alpha / r) * torch.matmul(av[i].float(), bv[i].float()).to(w.dtype)
        out[key] = wv.view(w.shape)
    return out
