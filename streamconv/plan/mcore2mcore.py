"""mcore -> mcore in one pass: the inverse assembly's nodes served as the forward assembly's source.

``build_hf_tensors`` gives every HF tensor as a graph over the source rank files (the exact inverse of
``build_rank_tensors``); :class:`HFView` serves that dict as the :class:`~streamconv.mapping.sources.SourceTensors`
``build_rank_tensors`` reads for the target layout.  The HF checkpoint is never written: each target band is
narrowed down to reads of exactly the source rank-file rows it needs.  The result is byte-identical to
mcore -> HF -> mcore by construction: the same nodes, the same model config (the one mcore2hf would write as
config.json), the same file layouts, and the record mcore2hf reads back, so the output converts on without flags.

What is checked before anything is written is what mcore2hf checks (record or flags, every rank file and key
against the layout, replicas).

LoRA (a checkpoint holding base and adapter, as training saves it without ``--lora-ckpt-filter``): the factors
are found and checked as mcore2hf finds them (:func:`~streamconv.plan.lora.build_inventory`, r read from the
factors' shapes), gathered per HF module as the adapter export gathers them, and placed again with the target's
weights (``build_rank_tensors(..., lora=)``): the output holds the same adapter, split as PEFT holds it in the
target layout, never merged and never dropped.  Refused by name: ``--mla-mm-split`` source modules with LoRA
(each part has its own A, which no HF module can hold), and NF4 (QLoRA) bases, with or without LoRA (NF4 blocks
follow each rank's piece: resharding would re-quantize rounded values).
"""

from __future__ import annotations

import json
from dataclasses import asdict

from ..errors import ValidationError
from ..graph.node import Node
from ..layout.options import McoreOptions
from ..layout.parallel import ParallelSizes
from ..mapping.assemble import build_hf_tensors, build_rank_tensors, output_config
from ..mapping.rules import Split
from ..models import model_for_config
from .lora import (NF4_JSON, Inventory, LoraOptions, MergedRanks, build_inventory, factor_kind, is_lora_key,
                   module_name, parse_factor)
from .lora_export import adapter_modules
from .mcore2hf import _config_origin, _expected_layout, _factor_checks, _hf_config, _output_config, replica_checks
from .mcore_source import McoreSource
from .plan import Dropped, Plan, ReplicaCheck
from .planner import mcore_files
from .trust import check_disjoint


class HFView:
    """HF tensor name -> node, served as the source of the forward assembly, with coverage accounting."""

    def __init__(self, tensors: dict[str, Node]):
        self.tensors = tensors
        self.consumed: set[str] = set()
        self.dropped: dict[str, str] = {}

    def has(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str) -> Node:
        if name not in self.tensors:
            raise ValidationError(f"{name}: the source layout does not hold it, but the target needs it. Check the "
                                  f"target's --mtp-num-layers and --num-layers against the source checkpoint.")
        self.consumed.add(name)
        return self.tensors[name]

    def drop(self, name: str, reason: str) -> None:
        if name in self.tensors:
            self.dropped[name] = reason

    def unaccounted(self) -> list[str]:
        return sorted(n for n in self.tensors if n not in self.consumed and n not in self.dropped)


class _Stored:
    """Rank-file tensors by their names in the layout (a wrapped base read from its ``base_layer`` name)."""

    def __init__(self, get):
        self.get = get


class CarriedLora:
    """The source's adapter per HF weight (``model.layers.3.self_attn.q_a_proj.weight`` -> (A, B)), served to the
    forward assembly, with the accounting of what it placed."""

    def __init__(self, inv: Inventory, pairs: dict[str, tuple[Node, Node]], checks: list[ReplicaCheck]):
        self.inv, self.pairs, self.checks = inv, pairs, checks
        self.used: set[str] = set()

    def factors(self, hf_name: str) -> tuple[Node, Node] | None:
        pair = self.pairs.get(hf_name)
        if pair is not None:
            self.used.add(hf_name)
        return pair


# Which dim of a factor is r alone (spec §5.1): linear A [r, in], B [out, r]; GEMM weight1_lora_b [r, n*C],
# weight2_lora_a [n*F, r] (weight1_lora_a [H, r*n] and weight2_lora_b [r*n, H] mix r with the expert count).
R_DIM = {("linear", "A"): 0, ("linear", "B"): 1, ("weight1", "B"): 0, ("weight2", "A"): 1}


def _lora_rank(src: McoreSource) -> int | None:
    """Training's r, read off the first LoRA factor that shows it alone (the inventory then checks the rest)."""
    for keys in src.tensors.values():
        for (_, name), t in keys.items():
            parsed = parse_factor(name) if is_lora_key(name) else None
            dim = R_DIM.get((factor_kind(parsed[0]), parsed[1])) if parsed else None
            if dim is not None and len(t.shape) == 2:
                return t.shape[dim]
    return None


def _refuse_nf4(src: McoreSource) -> None:
    """NF4 (QLoRA) bases: their blocks of 64 follow each rank's piece, so a resharded base would be quantized
    again from rounded values: not the same weights.  Refused rather than changed."""
    nf4 = [f"{src.path(r)}: {g}.{n.removesuffix(NF4_JSON)}" for r, keys in src.tensors.items() for g, n in keys
           if n.endswith(NF4_JSON)]
    if nf4:
        raise ValidationError(f"{nf4[0]}: an NF4 (QLoRA) base weight ({len(nf4)} in the source). NF4 blocks follow "
                              f"each rank's piece, so it cannot be resharded exactly: convert the HF checkpoint "
                              f"again with hf2mcore --qlora-nf4 in the target layout (and merge or export a QLoRA "
                              f"adapter with mcore2hf).")


def _carried_lora(spec, cfg, sizes, options, expected, src: McoreSource,
                  lora_src: McoreSource | None) -> CarriedLora | None:
    """The source's LoRA (in ``src`` itself, or the LoRA-only checkpoint ``lora_src``), found, checked and
    gathered per HF weight; None when the source holds none."""
    holder = lora_src or src
    if lora_src is None and not any(is_lora_key(n) for keys in src.tensors.values() for _, n in keys):
        return None
    r = _lora_rank(holder)
    # alpha only scales a merge; carrying never merges
    inv = build_inventory(spec, cfg, sizes, options, expected, src, lora_src,
                          LoraOptions(r=r, alpha="1", load=lora_src and lora_src.root))
    if options.mla_mm_split:
        parts = {module_name(t) for row in spec.layer_rows(cfg, False, options) if row.split is Split.HEAD_PARTS
                 for t in row.targets}
        wrapped = sorted(parts & set(inv.targets))
        if wrapped:
            raise ValidationError(f"{src.root}: LoRA on --mla-mm-split's {', '.join(wrapped)}: each part has its own "
                                  f"A, which no other layout holds, so it cannot be resharded. Merge it with "
                                  f"mcore2hf, or train without LoRA on those modules.")
    modules, checks = adapter_modules(spec, cfg, sizes, options, inv)
    return CarriedLora(inv, {m.module + ".weight": (m.a, m.b) for m in modules}, checks)


def plan_mcore_to_mcore(load_dir: str, save_dir: str, sizes: ParallelSizes, options: McoreOptions,
                        target_sizes: ParallelSizes, target_options: McoreOptions, *,
                        hf_config_dir: str | None = None, iteration: str | None = None,
                        model_type_hf: str | None = None, save_args: bool = False,
                        verify_replicas: bool | None = None, lora_load: str | None = None, ranks=None) -> Plan:
    """Compile an mcore -> mcore resharding plan: ``sizes``/``options`` describe the source checkpoint at
    ``load_dir`` (as mcore2hf takes them), ``target_sizes``/``target_options`` the output (as hf2mcore takes
    them).  The model comes from the record streamconv left next to the tracker, or from ``hf_config_dir``.

    ``lora_load``: a LoRA-only checkpoint (``--lora-ckpt-filter``) of the base at ``load_dir``: the output is that
    adapter resharded, LoRA-only as well (what training would have saved in the target layout); the base's
    headers give the layout, its weights are not read.

    ``ranks``: plan only these target rank files, as ``plan_hf_to_mcore`` does for the training-time loader (no
    record, no tracker, no coverage check: that is a property of all ranks together)."""
    if ranks is None:  # a partial plan is the loader's, held in memory
        check_disjoint(save_dir, [("--load-dir", load_dir), ("--hf-config", hf_config_dir),
                                  ("--lora-load", lora_load)])
    origin = _config_origin(load_dir, hf_config_dir)
    cfg_json = _hf_config(load_dir, hf_config_dir)
    spec = model_for_config(cfg_json, origin, model_type_hf=model_type_hf)
    cfg = spec.parse_config(cfg_json, origin)
    expected, replicas = _expected_layout(spec, cfg, sizes, options)
    src = McoreSource(load_dir, sizes, list(expected), iteration)
    lora_src = McoreSource(lora_load, sizes, list(expected)) if lora_load else None
    if lora_src is None:   # with --lora-load only the adapter is resharded: the base may be NF4
        _refuse_nf4(src)
    lora = _carried_lora(spec, cfg, sizes, options, expected, src, lora_src)
    if lora is None:
        src.check(expected)
        base, stored = src.get, src.get
    else:
        src.check(lora.inv.main_expect(expected))
        if lora_src is not None:
            lora_src.check(lora.inv.factor_expect(expected), others="--lora-load must be a LoRA-only checkpoint "
                                                                    "(saved with --lora-ckpt-filter) of this base.")
        # bases by their layout names (a wrapped one is X.base_layer.weight; NF4 decoded, though never run
        # when only the adapter is written)
        named = MergedRanks(lora.inv, None, None, expected, "npu")
        base, stored = named.base, named.stored
    hf = HFView(build_hf_tensors(spec, cfg, sizes, options, _Stored(base)))

    # The model as the intermediate HF checkpoint would describe it (its config.json, as mcore2hf writes it:
    # layers renumbered to those the source holds, weights bf16), so the output equals mcore -> HF -> mcore.
    _, fields = output_config(spec, cfg, sizes, options)
    out_json = json.loads(_output_config(spec, cfg_json, fields, False))
    out_cfg = spec.parse_config(out_json, origin)
    per_rank = build_rank_tensors(spec, out_cfg, target_sizes, target_options, hf, ranks, lora=lora)
    leftover = hf.unaccounted() if ranks is None else []
    if leftover:
        raise ValidationError([f"{n}: held by the source but consumed by no target file and not declared dropped. "
                               f"This is a bug in the model table; please report it." for n in leftover])
    if lora is not None and ranks is None:   # an adapter goes where its weight goes: placed, or dropped with it
        for name in sorted(set(lora.pairs) - lora.used):
            if name not in hf.dropped:
                raise ValidationError(f"{name}: its LoRA factors were placed nowhere though the weight was. This "
                                      f"is a bug; please report it.")
            why = "LoRA of a dropped weight: " + hf.dropped[name]
            hf.dropped[name.removesuffix(".weight") + ".lora_A/lora_B"] = why
    if lora_src is None:
        checks = replica_checks(replicas, stored, src.rel, verify_replicas)
        if checks is not None and lora is not None:
            checks += _factor_checks(lora.inv, replicas) + lora.checks
    else:   # the adapter alone: no base weight is written, or read; its copies are small, so checked by default
        per_rank = {r: [t for t in tensors if is_lora_key(t.name)] for r, tensors in per_rank.items()}
        checks = None if verify_replicas is False else _factor_checks(lora.inv, replicas) + lora.checks
    files = mcore_files(spec, out_cfg, out_json, target_sizes, target_options, per_rank, save_args=save_args,
                        partial=ranks is not None)
    planned = {"source": asdict(sizes), "source_model": asdict(options), "target": asdict(target_sizes),
               "model": asdict(target_options), "iteration": src.iteration, "model_type": spec.name}
    if ranks is not None:
        planned["ranks"] = sorted([r.tp_rank, r.pp_rank, r.ep_rank] for r in per_rank)
    return Plan(
        kind="mcore2mcore",
        source_root=lora_load or load_dir,
        source_files=tuple((lora_src or src).files),
        target_root=save_dir,
        files=tuple(files),
        dropped=tuple(Dropped(n, r) for n, r in sorted(hf.dropped.items())),
        options=json.loads(json.dumps(planned)),
        checks=tuple(checks or ()),
    )
