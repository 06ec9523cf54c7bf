"""The planner: the one place where model tables, parallel layouts and storage formats meet.

``plan_hf_to_mcore`` reads only headers, the index and config.json, validates everything it can before any
byte is written (one error listing every problem), and returns a :class:`Plan`.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict

from ..errors import ValidationError
from ..layout.options import McoreOptions
from ..layout.parallel import ParallelSizes, RankFile, iter_dir, rank_dir
from ..mapping.assemble import TargetTensor, build_rank_tensors, placement
from ..mapping.spec import ModelSpec
from ..models import model_for_config
from .mcore2hf import RECORD, record_text
from .plan import Dropped, OutputFile, OutputTensor, Plan
from .qlora import quantize_ranks
from .sources import HFSource
from .trust import check_disjoint
from .zarr_source import open_hf_source

ITERATION = 1
TRACKER = "latest_checkpointed_iteration.txt"
RANK_FILE = "model_optim_rng.pt"
FLOAT_DTYPES = ("bfloat16", "float16", "float32")


def plan_hf_to_mcore(load_dir: str, save_dir: str, sizes: ParallelSizes, options: McoreOptions = McoreOptions(),
                     *, model_type_hf: str | None = None, save_args: bool = False, ranks=None,
                     qlora_nf4: str | None = None) -> Plan:
    """Compile an HF checkpoint -> MindSpeed mcore (legacy torch format) conversion plan.  The model family
    comes from config.json's ``model_type`` (checked against MindSpeed's ``--model-type-hf`` when given).
    ``load_dir`` is an HF directory or a zarr store (``hf2zarr``): the plan reads the same tensors either way.

    ``save_args``: every rank file also holds the ``args`` namespace MindSpeed's own mg -> hf reads back
    (loading it with ``torch.load(weights_only=True)`` then needs ``add_safe_globals([argparse.Namespace])``).

    ``ranks``: plan only these rank files (a collection of :class:`~streamconv.layout.parallel.RankFile`; the
    training-time loader asks for its own).  Every check runs as for the whole plan except source coverage,
    which is a property of all ranks together; the partial plan has no tracker and no record, so running it
    can never leave a directory that looks like a complete checkpoint.  ``options["ranks"]`` lists them.

    ``qlora_nf4``: store QLoRA's weights in bitsandbytes NF4 with this nibble order (``"npu"`` or ``"cuda"``;
    :mod:`streamconv.plan.qlora`)."""
    if ranks is None:  # a partial plan is the loader's, held in memory (running one is still audited for overlap)
        check_disjoint(save_dir, [("--load-dir", load_dir)])
    src = open_hf_source(load_dir)   # an HF directory, or a zarr store written by hf2zarr
    cfg_json = src.config()
    cfg_path = os.path.join(src.root, "config.json")
    spec = model_for_config(cfg_json, cfg_path, model_type_hf=model_type_hf)
    cfg = spec.parse_config(cfg_json, cfg_path)
    src.quant = spec.quant
    check_source_against_config(src, spec, cfg)
    per_rank = build_rank_tensors(spec, cfg, sizes, options, src, ranks)  # validates flags against the model first
    if qlora_nf4 is not None:
        per_rank = quantize_ranks(spec, per_rank, qlora_nf4)
    leftover = src.unaccounted() if ranks is None else []
    if leftover:
        raise ValidationError([f"{n}: present in the source but consumed by no output and not declared "
                               f"dropped. This is a bug in the model table; please report it." for n in leftover])
    qlora = {"nf4_layout": qlora_nf4} if qlora_nf4 is not None else None
    files = mcore_files(spec, cfg, cfg_json, sizes, options, per_rank, save_args=save_args, qlora=qlora,
                        partial=ranks is not None)
    planned = {"target": asdict(sizes), "model": asdict(options), "model_type": spec.name,
               **({"qlora_nf4": qlora_nf4} if qlora_nf4 is not None else {})}
    if ranks is not None:
        planned["ranks"] = sorted([r.tp_rank, r.pp_rank, r.ep_rank] for r in per_rank)

    return Plan(
        kind="hf2mcore",
        source_root=load_dir,   # as given: a plan made with relative paths runs from any checkout
        source_files=tuple(src.files),
        target_root=save_dir,
        files=tuple(files),
        dropped=tuple(Dropped(n, r) for n, r in sorted(src.dropped.items())),
        # JSON-native (tuples as lists), so a plan equals itself read back from its file
        options=json.loads(json.dumps(planned)),
    )


def mcore_files(spec: ModelSpec, cfg, cfg_json: dict, sizes: ParallelSizes, options: McoreOptions,
                per_rank: dict[RankFile, list[TargetTensor]], *, save_args: bool = False, qlora: dict | None = None,
                partial: bool = False) -> list[OutputFile]:
    """The files of an mcore checkpoint holding ``per_rank`` (from :func:`build_rank_tensors`): the rank files,
    the record mcore2hf reads (``cfg_json``, the HF config of the model, and the layout), the tracker last;
    ``partial`` (some ranks only): the rank files alone, so such a plan never looks like a whole checkpoint."""
    p = placement(spec, cfg, sizes, options)
    groups = p.layout.groups()
    attrs: tuple = (("checkpoint_version", 3.0), ("iteration", ITERATION))
    if save_args:
        attrs += (("args", mindspeed_args(spec, cfg, sizes, options, p.layout.num_layers)),)
    # Write order: stage by stage, key position by key position.  The same key position in every rank
    # file of a stage gets the same number: those tensors are replicas or TP/EP slices of the same source
    # tensors, and the executor writes them band by band together, so a shared source is read once and
    # released at once.
    order = sorted({(r.pp_rank, pos) for r, tensors in per_rank.items() for pos in range(len(tensors))})
    seq_of = {g: i for i, g in enumerate(order)}
    files: list[OutputFile] = []
    for r, tensors in per_rank.items():
        path = f"{iter_dir(ITERATION)}/{rank_dir(r, sizes)}/{RANK_FILE}"
        out = tuple(OutputTensor(t.group, t.name, t.node, seq_of[(r.pp_rank, pos)])
                    for pos, t in enumerate(tensors))
        _check_unique(path, out)
        files.append(OutputFile(path, "megatron_pt", out, attrs=attrs, groups=groups))
    if not partial:
        # The HF config and the layout, so that mcore -> HF needs neither --hf-config nor the layout flags.
        files.append(OutputFile(RECORD, "text", text=record_text(cfg_json, sizes, options, qlora)))
        files.append(OutputFile(TRACKER, "text", text=str(ITERATION)))  # written last: marks the checkpoint done
    return files


def mindspeed_args(spec: ModelSpec, cfg, sizes: ParallelSizes, o: McoreOptions, slots: int) -> argparse.Namespace:
    """The ``args`` MindSpeed-LLM's generic converter stores in each rank file (the fields its mg -> hf reads)."""
    vpp = o.vpp_layers if not o.dualpipev else slots // sizes.pp // 2
    return argparse.Namespace(
        tensor_model_parallel_size=sizes.tp, pipeline_model_parallel_size=sizes.pp,
        expert_model_parallel_size=sizes.ep, expert_tensor_parallel_size=o.expert_tensor_parallel_size or sizes.tp,
        num_layers=slots, num_layer_list=",".join(map(str, o.num_layer_list)) if o.num_layer_list else None,
        num_layers_per_virtual_pipeline_stage=vpp, **spec.mindspeed_args(cfg))


def _check_unique(path: str, tensors) -> None:
    seen = set()
    for t in tensors:
        key = (t.group, t.name)
        if key in seen:
            raise ValidationError(f"{path}: {t.group}.{t.name} produced twice. This is a bug in the model table.")
        seen.add(key)


def check_source_against_config(src: HFSource, spec: ModelSpec, cfg) -> None:
    """Every tensor config.json implies is present with the right shape and a supported dtype, FP8 weights
    have well-shaped scales, and nothing unexpected is present.  Raises once, listing every problem."""
    expected = spec.hf_table(cfg)
    quant = spec.quant
    fp8_dtypes = quant.dtypes if quant else ()
    suffix = quant.scale_suffix if quant else None
    problems = []
    for name, want in expected.items():
        shape = want.shape
        if not src.has(name):
            problems.append(f"{name}: missing from the checkpoint (config.json implies it). "
                            f"Check that every shard is present and config.json belongs to these weights.")
            continue
        info = src.info(name)
        if tuple(info.shape) != tuple(shape):
            problems.append(f"{name}: shape {list(info.shape)} disagrees with config.json (expected {list(shape)}). "
                            f"Use the config.json that came with these weights.")
            continue
        if info.dtype in fp8_dtypes:
            if not spec.is_quantized(cfg, name):
                problems.append(f"{name}: dtype {info.dtype} is not expected here (only linear weights are FP8 "
                                f"in {spec.title} releases).")
                continue
            scale = name + suffix
            grid = quant.scale_shape(shape)
            if not src.has(scale):
                problems.append(f"{name}: FP8 weight without {scale}. The checkpoint is incomplete.")
            elif src.info(scale).dtype != "float32" or tuple(src.info(scale).shape) != grid:
                s = src.info(scale)
                br, bc = quant.block
                problems.append(f"{scale}: {s.dtype}{list(s.shape)} (expected float32{list(grid)} for {br}x{bc} "
                                f"blocks of {list(shape)}). The checkpoint is corrupt.")
        elif info.dtype not in FLOAT_DTYPES:
            problems.append(f"{name}: unsupported dtype {info.dtype} (expected one of {', '.join(FLOAT_DTYPES)} "
                            f"or float8_e4m3fn with block scales).")
    hints = ", ".join(list(spec.layer_fields(cfg)) + [spec.experts_field])
    for name in src.tensors:
        if name in expected:
            continue
        if suffix and name.endswith(suffix) and name[: -len(suffix)] in expected:
            if src.info(name[: -len(suffix)]).dtype not in fp8_dtypes:
                problems.append(f"{name}: scales for a weight that is not FP8. The checkpoint is inconsistent.")
            continue
        problems.append(f"{name}: unexpected tensor for a {spec.title} checkpoint with this config.json "
                        f"(check {hints}).")
    if problems:
        raise ValidationError(problems)
