"""``--save-lora-to-hf``: the LoRA adapter alone, under the HF checkpoint's names (spec §5.3, fixing §10 item 8).

The rank files' factors are gathered per HF module by the rules of :mod:`streamconv.mapping.lora` (replicated
factors taken once and compared across ranks, split ones concatenated), walking the same placement and rows as
the weights' inverse, so every layout exports (VPP, dualpipev, MTP, tp-extend-ep, ETP 1, grouped GEMM).  Shared
experts and the q/kv up-projections are included.  Only the adapter's bytes are read.

Layouts (``--lora-export-layout``):

* ``peft``: ``adapter_model.safetensors`` with one ``base_model.model.<HF module>.lora_A.weight`` / ``lora_B``
  per module, routed experts per expert (``mlp.experts.{j}.gate_proj``), and an ``adapter_config.json`` whose
  ``target_modules`` are HF module names (``q_a_proj``, ``gate_proj``, ...);
* ``peft-fused``: the same for attention and dense modules, routed experts as transformers >= 5 holds them
  (the family's ``hf_fused_experts`` parameters, PEFT ``target_parameters``): per layer ``lora_A`` [r*E, in]
  (expert-major rows) and ``lora_B`` [out, r*E] (column k*E + e is expert e's column k), the parameters PEFT
  wraps first nested under ``base_layer.``; ``target_modules`` are in-layer paths (``mlp.gate_proj``) so that
  PEFT's transformers-5 conversion does not re-target the fused experts;
* ``mindspeed``: the reference's files: one ``model-{i:05d}-of-{n:06d}.safetensors`` per HF layer, its index, and
  its ``adapter_config.json`` (Megatron ``target_modules``), same keys as ``peft``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass

from ..errors import ValidationError
from ..graph.node import Node, cat, transpose, view
from ..layout.placement import expert_slice
from ..mapping.assemble import placement
from ..mapping.lora import REPLICATED_FACTORS, gather_factors, gemm_expert_factors, is_exportable
from ..mapping.rules import Row
from .lora import Inventory, LoraOptions
from .plan import OutputFile, OutputTensor, ReplicaCheck

ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
INDEX = "model.safetensors.index.json"
PREFIX = "base_model.model."


@dataclass(frozen=True)
class HFLora:
    """One HF module's factors: ``module`` is its HF path (``model.layers.3.self_attn.q_a_proj``)."""

    module: str
    layer: int
    a: Node
    b: Node
    expert: int | None = None   # routed expert j
    part: int = 0               # routed experts: 0 for the fused gate/up (gate_proj, up_proj), 1 for down


def adapter_modules(spec, cfg, sizes, o, inv: Inventory) -> tuple[list[HFLora], list[ReplicaCheck]]:
    """Every HF module's (A, B), in HF layer order, and the replicas of factors the gather takes once."""
    p = placement(spec, cfg, sizes, o)
    holder: dict[tuple[int, int], object] = {}
    for r in p.ranks:
        holder.setdefault((r.pp_rank, r.tp_rank), r)
    out: list[HFLora] = []
    checks: list[ReplicaCheck] = []
    problems: list[str] = []
    src = inv.lora

    def rows_of(dense: bool) -> list[Row]:
        rows = spec.layer_rows(cfg, dense, o)
        return [r.renamed(spec.legacy_names) for r in rows] if o.mla_key_names == "legacy" else rows

    def emit_rows(rows: list[Row], chunk, prefix: str, layer: int, hf: int) -> None:
        pp, group = chunk
        shapes = {t.name: t.shape for t in spec.layer_tensors(cfg, hf)}
        for row in rows:
            ranks = [holder[(pp, t)] for t in range(sizes.tp)]
            mods = [[inv.modules[rk].get((group, prefix + target)) for rk in ranks] for target in row.targets]
            if not any(m for per in mods for m in per):
                continue
            if not is_exportable(row):
                problems.append(f"{prefix}{', '.join(row.targets)}: separate LoRA factors per {row.split.value} "
                                f"target, which the HF module {row.sources[0]} cannot hold as one rank-r adapter. "
                                f"Merge them instead (drop --save-lora-to-hf), or leave these modules out of "
                                f"--lora-target-modules in training.")
                continue
            (per,) = mods
            a = [src.get(rk, group, m.a) for rk, m in zip(ranks, per)]
            b = [src.get(rk, group, m.b) for rk, m in zip(ranks, per)]
            pairs = gather_factors(row, a, b, tuple(shapes[s][0] for s in row.sources))
            for source, (fa, fb) in zip(row.sources, pairs):
                out.append(HFLora(f"{spec.layer_prefix}{layer}.{source[: -len('.weight')]}", layer, fa, fb))
            for which, pieces in (("A", a), ("B", b)):
                if which in REPLICATED_FACTORS[row.split] and sizes.tp > 1:
                    checks.append(_check(f"{group}.{prefix}{row.targets[0]} LoRA {which}", pieces, ranks, src))

    def emit_experts(chunk, prefix: str, layer: int) -> None:
        pp, group = chunk
        rule1, rule2 = spec.expert_rows
        got: dict[int, dict[int, dict[int, tuple[Node, Node]]]] = {1: defaultdict(dict), 2: defaultdict(dict)}
        for r in p.ranks:
            if r.pp_rank != pp:
                continue
            experts, _, te = expert_slice(cfg.num_experts, sizes, o, r)
            per: dict[int, list] = {}
            if o.moe_grouped_gemm:
                for which in (1, 2):
                    m = inv.modules[r].get((group, f"{prefix}mlp.experts.weight{which}"))
                    if m is not None:
                        per[which] = gemm_expert_factors(src.get(r, group, m.a), src.get(r, group, m.b),
                                                         len(experts), which)
            else:
                for which, rule in ((1, rule1), (2, rule2)):
                    ms = [inv.modules[r].get((group, f"{prefix}mlp.experts.local_experts.{q}.{rule.targets[0]}"))
                          for q in range(len(experts))]
                    if all(ms):
                        per[which] = [(src.get(r, group, m.a), src.get(r, group, m.b)) for m in ms]
            for which, factors in per.items():
                for q, j in enumerate(experts):
                    got[which][j].setdefault(te, factors[q])
        for j in range(cfg.num_experts):
            for which, rule in ((1, rule1), (2, rule2)):
                pieces = got[which].get(j)
                if not pieces:
                    continue
                pairs = gather_factors(rule, [pieces[t][0] for t in range(len(pieces))],
                                       [pieces[t][1] for t in range(len(pieces))])
                for source, (fa, fb) in zip(rule.sources, pairs):
                    module = f"{spec.layer_prefix}{layer}.{source.format(j=j)[: -len('.weight')]}"
                    out.append(HFLora(module, layer, fa, fb, expert=j, part=which - 1))

    for i, hf in enumerate(p.hf_layers):
        chunk, local = p.slot_of(hf)
        emit_rows(rows_of(hf < p.first_k), chunk, f"decoder.layers.{local}.", i, hf)
        if hf >= p.first_k:
            emit_experts(chunk, f"decoder.layers.{local}.", i)
    for m in range(o.mtp_num_layers):
        layer, hf = len(p.hf_layers) + m, cfg.num_hidden_layers + m
        emit_rows(spec.mtp_rows(cfg), p.last, f"mtp.layers.{m}.", layer, hf)
        emit_rows(rows_of(False), p.last, f"mtp.layers.{m}.transformer_layer.", layer, hf)
        emit_experts(p.last, f"mtp.layers.{m}.transformer_layer.", layer)
    if problems:
        raise ValidationError(problems)
    return out, checks


def _check(label: str, pieces: list[Node], ranks, src) -> ReplicaCheck:
    return ReplicaCheck(label, tuple(pieces), tuple(src.rel(r) for r in ranks))


def export_files(spec, modules: list[HFLora], opts: LoraOptions, targets: tuple[str, ...],
                 num_layers: int) -> list[OutputFile]:
    """The adapter's files for ``--lora-export-layout``."""
    if opts.export_layout == "peft-fused":
        return _fused(spec, modules, opts)
    tensors: list[tuple[str, Node]] = []
    for m in modules:
        tensors += [(f"{PREFIX}{m.module}.lora_A.weight", m.a), (f"{PREFIX}{m.module}.lora_B.weight", m.b)]
    if opts.export_layout == "mindspeed":
        return _mindspeed(spec, tensors, opts, targets, num_layers)
    short = sorted({m.module.rsplit(".", 1)[-1] for m in modules})
    return [_safetensors(ADAPTER_FILE, tensors), _config(opts, short)]


def _safetensors(path: str, tensors: list[tuple[str, Node]], seq0: int = 0) -> OutputFile:
    return OutputFile(path, "safetensors", tuple(OutputTensor("", n, node, seq0 + k) for k, (n, node) in
                                                 enumerate(tensors)), attrs=(("format", "pt"),))


def _alpha(opts: LoraOptions):
    value = float(opts.alpha)
    return int(value) if value.is_integer() and abs(value) < 2 ** 53 else value


def _config(opts: LoraOptions, target_modules: list[str], target_parameters: list[str] | None = None) -> OutputFile:
    """adapter_config.json for stock PEFT (LoraConfig fields; PEFT fills the ones left out)."""
    cfg = {"base_model_name_or_path": None, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
           "init_lora_weights": True, "lora_alpha": _alpha(opts), "lora_dropout": 0.0, "modules_to_save": None,
           "peft_type": "LORA", "r": opts.r, "target_modules": target_modules, "task_type": "CAUSAL_LM",
           "use_dora": False, "use_rslora": False}
    if target_parameters:
        cfg["target_parameters"] = target_parameters
    return OutputFile(ADAPTER_CONFIG, "text", text=json.dumps(cfg, indent=2) + "\n")


def _fused(spec, modules: list[HFLora], opts: LoraOptions) -> list[OutputFile]:
    """Per-module factors, routed experts stacked as PEFT ``target_parameters`` on the fused parameters."""
    if spec.hf_fused_experts is None and any(m.expert is not None for m in modules):
        raise ValidationError(f"--lora-export-layout peft-fused: {spec.title}'s transformers model keeps one module "
                              f"per expert; use --lora-export-layout peft.")
    tensors: list[tuple[str, Node]] = []
    inner: set[str] = set()
    experts: dict[int, dict[int, dict[int, list[HFLora]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for m in modules:
        if m.expert is None:
            tensors += [(f"{PREFIX}{m.module}.lora_A.weight", m.a), (f"{PREFIX}{m.module}.lora_B.weight", m.b)]
            inner.add(m.module[len(f"{spec.layer_prefix}{m.layer}."):])
        else:
            experts[m.layer][m.part][m.expert].append(m)
    params: list[str] = []
    for layer in sorted(experts):
        parts = sorted(experts[layer])
        for k, part in enumerate(parts):
            name = spec.hf_fused_experts[part]
            container = name.rsplit(".", 1)[0]
            nested = "base_layer." * (len(parts) - 1 - k)   # PEFT wraps the listed parameters in order
            a, b = _stack(experts[layer][part])
            key = f"{PREFIX}{spec.layer_prefix}{layer}.{container}.{nested}"
            tensors += [(key + "lora_A.weight", a), (key + "lora_B.weight", b)]
            if name not in params:
                params.append(name)
    params.sort(key=spec.hf_fused_experts.index)
    return [_safetensors(ADAPTER_FILE, tensors), _config(opts, sorted(inner), params)]


def _stack(per_expert: dict[int, list[HFLora]]) -> tuple[Node, Node]:
    """One layer's routed-expert factors as PEFT's ``ParamWrapper`` holds them: A [r*E, in] (rows of expert e
    at e*r), B [out, r*E] (column k*E + e).  Gate and up of an expert share their A, and their B rows stack
    as the fused parameter's rows do (gate, then up)."""
    n = len(per_expert)
    a_parts, b_parts = [], []
    for e in range(n):
        mods = per_expert[e]
        a_parts.append(mods[0].a)
        b_parts.append(cat([m.b for m in mods], 0))
    r, out = a_parts[0].shape[0], b_parts[0].shape[0]
    a = cat(a_parts, 0)
    rows = cat([transpose(b) for b in b_parts], 0)                      # [E*r, out]: row e*r + k
    by_rank = view(transpose(view(rows, (n, r * out))), (r, out, n))    # [r, out, E]
    b = view(transpose(by_rank, 0, 1), (out, r * n))                    # [out, r*E]: column k*E + e
    return a, b


def _mindspeed(spec, tensors: list[tuple[str, Node]], opts: LoraOptions, targets: tuple[str, ...],
               num_layers: int) -> list[OutputFile]:
    """The reference's files: one shard per HF layer (its 5/6-digit names), its index, its adapter_config."""
    by_layer: dict[int, list[tuple[str, Node]]] = defaultdict(list)
    for name, node in tensors:
        by_layer[spec.layer_of(name[len(PREFIX):])].append((name, node))
    files, weight_map, seq = [], {}, 0
    for layer in sorted(by_layer):
        path = f"model-{layer + 1:05d}-of-{num_layers:06d}.safetensors"
        files.append(_safetensors(path, by_layer[layer], seq))
        seq += len(by_layer[layer])
        weight_map.update({name: path for name, _ in by_layer[layer]})
    total = sum(node.nbytes for _, node in tensors)
    config = {"auto_mapping": None, "base_model_name_or_path": None, "bias": "none", "fan_in_fan_out": False,
              "inference_mode": True, "init_lora_weights": True, "layers_pattern": None, "layers_to_transform": None,
              "lora_alpha": _alpha(opts), "lora_dropout": 0.0, "modules_to_save": [], "peft_type": "LORA",
              "r": opts.r, "revision": None, "target_modules": list(targets), "task_type": "CAUSAL_LM"}
    files.append(OutputFile(ADAPTER_CONFIG, "text", text=json.dumps(config)))
    files.append(OutputFile(INDEX, "text", text=json.dumps({"metadata": {"total_size": total},
                                                            "weight_map": weight_map}, indent=4)))
    return files
