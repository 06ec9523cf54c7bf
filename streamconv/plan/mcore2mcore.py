"""mcore -> mcore in one pass: the inverse assembly's nodes served as the forward assembly's source.

``build_hf_tensors`` gives every HF tensor as a graph over the source rank files (the exact inverse of
``build_rank_tensors``); :class:`HFView` serves that dict as the :class:`~streamconv.mapping.sources.SourceTensors`
``build_rank_tensors`` reads for the target layout.  The HF checkpoint is never written: each target band is
narrowed down to reads of exactly the source rank-file rows it needs.  The result is byte-identical to
mcore -> HF -> mcore by construction: the same nodes, the same model config (the one mcore2hf would write as
config.json), the same file layouts, and the record mcore2hf reads back, so the output converts on without flags.

What is checked before anything is written is what mcore2hf checks (record or flags, every rank file and key
against the layout, replicas), plus: LoRA adapter weights in the source are refused by name, never dropped.
"""

from __future__ import annotations

import json
from dataclasses import asdict

from ..errors import ValidationError
from ..graph.node import Node
from ..layout.options import McoreOptions
from ..layout.parallel import ParallelSizes
from ..mapping.assemble import build_hf_tensors, build_rank_tensors, output_config
from ..models import model_for_config
from .mcore2hf import _config_origin, _expected_layout, _hf_config, _output_config, replica_checks
from .mcore_source import McoreSource
from .plan import Dropped, Plan
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


def lora_keys(src: McoreSource) -> list[str]:
    """``file: group.name`` of every LoRA adapter weight in the source rank files."""
    return [f"{src.paths[r]}: {g}.{n}" for r, keys in src.tensors.items() for g, n in keys
            if any(part.lower().startswith("lora") for part in n.split("."))]


def plan_mcore_to_mcore(load_dir: str, save_dir: str, sizes: ParallelSizes, options: McoreOptions,
                        target_sizes: ParallelSizes, target_options: McoreOptions, *,
                        hf_config_dir: str | None = None, iteration: str | None = None,
                        model_type_hf: str | None = None, save_args: bool = False,
                        verify_replicas: bool | None = None) -> Plan:
    """Compile an mcore -> mcore resharding plan: ``sizes``/``options`` describe the source checkpoint at
    ``load_dir`` (as mcore2hf takes them), ``target_sizes``/``target_options`` the output (as hf2mcore takes
    them).  The model comes from the record streamconv left next to the tracker, or from ``hf_config_dir``."""
    check_disjoint(save_dir, [("--load-dir", load_dir), ("--hf-config", hf_config_dir)])
    origin = _config_origin(load_dir, hf_config_dir)
    cfg_json = _hf_config(load_dir, hf_config_dir)
    spec = model_for_config(cfg_json, origin, model_type_hf=model_type_hf)
    cfg = spec.parse_config(cfg_json, origin)
    expected, replicas = _expected_layout(spec, cfg, sizes, options)
    src = McoreSource(load_dir, sizes, list(expected), iteration)
    lora = lora_keys(src)
    if lora:
        raise ValidationError(f"{lora[0]}: a LoRA adapter weight ({len(lora)} in the source). mcore2mcore does not "
                              f"carry LoRA weights yet; merge the adapters into the base weights first, or reshard "
                              f"the base checkpoint without them.")
    src.check(expected)
    hf = HFView(build_hf_tensors(spec, cfg, sizes, options, src))

    # The model as the intermediate HF checkpoint would describe it (its config.json, as mcore2hf writes it:
    # layers renumbered to those the source holds, weights bf16), so the output equals mcore -> HF -> mcore.
    _, fields = output_config(spec, cfg, sizes, options)
    out_json = json.loads(_output_config(spec, cfg_json, fields, False))
    out_cfg = spec.parse_config(out_json, origin)
    per_rank = build_rank_tensors(spec, out_cfg, target_sizes, target_options, hf)
    leftover = hf.unaccounted()
    if leftover:
        raise ValidationError([f"{n}: held by the source but consumed by no target file and not declared dropped. "
                               f"This is a bug in the model table; please report it." for n in leftover])
    files = mcore_files(spec, out_cfg, out_json, target_sizes, target_options, per_rank, save_args=save_args)
    return Plan(
        kind="mcore2mcore",
        source_root=load_dir,
        source_files=tuple(src.files),
        target_root=save_dir,
        files=tuple(files),
        dropped=tuple(Dropped(n, r) for n, r in sorted(hf.dropped.items())),
        options=json.loads(json.dumps({"source": asdict(sizes), "source_model": asdict(options),
                                       "target": asdict(target_sizes), "model": asdict(target_options),
                                       "iteration": src.iteration, "model_type": spec.name})),
        checks=tuple(replica_checks(replicas, src.get, src.rel, verify_replicas) or ()),
    )
