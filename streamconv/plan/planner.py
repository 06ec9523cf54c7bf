"""The planner: the one place where model tables, parallel layouts and storage formats meet.

``plan_hf_to_mcore`` reads only headers, the index and config.json, validates everything it can before any
byte is written (one error listing every problem), and returns a :class:`Plan`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict

from ..errors import ValidationError
from ..layout.parallel import ParallelSizes, iter_dir, rank_dir
from ..models import deepseek_v3 as dsv3
from .mcore2hf import RECORD, record_text
from .plan import Dropped, OutputFile, OutputTensor, Plan
from .sources import FP8_DTYPES, SCALE_SUFFIX, HFSource

ITERATION = 1
TRACKER = "latest_checkpointed_iteration.txt"
RANK_FILE = "model_optim_rng.pt"
FLOAT_DTYPES = ("bfloat16", "float16", "float32")


def plan_hf_to_mcore(load_dir: str, save_dir: str, sizes: ParallelSizes,
                     options: dsv3.McoreOptions = dsv3.McoreOptions()) -> Plan:
    """Compile an HF DeepSeek-V3 checkpoint -> MindSpeed mcore (legacy torch format) conversion plan."""
    src = HFSource(load_dir)
    cfg_json = src.config()
    model_type = cfg_json.get("model_type")
    if model_type not in (dsv3.MODEL_TYPE, None):
        raise ValidationError(f"{os.path.join(src.root, 'config.json')}: model_type {model_type!r} "
                              f"(expected {dsv3.MODEL_TYPE!r}); no other model family is supported yet.")
    cfg = dsv3.DeepSeekV3Config.from_json(cfg_json, path=os.path.join(src.root, "config.json"))
    check_source_against_config(src, cfg)
    per_rank = dsv3.build_rank_tensors(cfg, sizes, options, src)  # validates flags against the model first
    groups = dsv3.pipeline_layout(cfg, sizes, options).groups()
    leftover = src.unaccounted()
    if leftover:
        raise ValidationError([f"{n}: present in the source but consumed by no output and not declared "
                               f"dropped. This is a bug in the model table; please report it." for n in leftover])

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
        files.append(OutputFile(path, "megatron_pt", out, attrs=(("checkpoint_version", 3.0), ("iteration", ITERATION)),
                                groups=groups))
    # The HF config and the layout, so that mcore -> HF needs neither --hf-config nor the layout flags.
    files.append(OutputFile(RECORD, "text", text=record_text(cfg_json, sizes, options)))
    files.append(OutputFile(TRACKER, "text", text=str(ITERATION)))  # written last: marks the checkpoint done

    return Plan(
        kind="hf2mcore",
        source_root=load_dir,   # as given: a plan made with relative paths runs from any checkout
        source_files=tuple(src.files),
        target_root=save_dir,
        files=tuple(files),
        dropped=tuple(Dropped(n, r) for n, r in sorted(src.dropped.items())),
        # JSON-native (tuples as lists), so a plan equals itself read back from its file
        options=json.loads(json.dumps({"target": asdict(sizes), "model": asdict(options),
                                       "model_type": dsv3.MODEL_TYPE})),
    )


def _check_unique(path: str, tensors) -> None:
    seen = set()
    for t in tensors:
        key = (t.group, t.name)
        if key in seen:
            raise ValidationError(f"{path}: {t.group}.{t.name} produced twice. This is a bug in the model table.")
        seen.add(key)


def check_source_against_config(src: HFSource, cfg: dsv3.DeepSeekV3Config) -> None:
    """Every tensor config.json implies is present with the right shape and a supported dtype, FP8 weights
    have well-shaped scales, and nothing unexpected is present.  Raises once, listing every problem."""
    expected = dsv3.hf_tensor_shapes(cfg)
    problems = []
    for name, shape in expected.items():
        if not src.has(name):
            problems.append(f"{name}: missing from the checkpoint (config.json implies it). "
                            f"Check that every shard is present and config.json belongs to these weights.")
            continue
        info = src.info(name)
        if tuple(info.shape) != tuple(shape):
            problems.append(f"{name}: shape {list(info.shape)} disagrees with config.json (expected {list(shape)}). "
                            f"Use the config.json that came with these weights.")
            continue
        if info.dtype in FP8_DTYPES:
            if not dsv3.is_fp8_weight(name):
                problems.append(f"{name}: dtype {info.dtype} is not expected here (only linear weights are FP8 "
                                f"in DeepSeek's release).")
                continue
            scale = name + SCALE_SUFFIX
            want = (-(-shape[0] // 128), -(-shape[1] // 128))
            if not src.has(scale):
                problems.append(f"{name}: FP8 weight without {scale}. The checkpoint is incomplete.")
            elif src.info(scale).dtype != "float32" or tuple(src.info(scale).shape) != want:
                s = src.info(scale)
                problems.append(f"{scale}: {s.dtype}{list(s.shape)} (expected float32{list(want)} for 128x128 "
                                f"blocks of {list(shape)}). The checkpoint is corrupt.")
        elif info.dtype not in FLOAT_DTYPES:
            problems.append(f"{name}: unsupported dtype {info.dtype} (expected one of {', '.join(FLOAT_DTYPES)} "
                            f"or float8_e4m3fn with block scales).")
    for name in src.tensors:
        if name in expected:
            continue
        if name.endswith(SCALE_SUFFIX) and name[: -len(SCALE_SUFFIX)] in expected:
            if src.info(name[: -len(SCALE_SUFFIX)]).dtype not in FP8_DTYPES:
                problems.append(f"{name}: scales for a weight that is not FP8. The checkpoint is inconsistent.")
            continue
        problems.append(f"{name}: unexpected tensor for a DeepSeek-V3 checkpoint with this config.json "
                        f"(check num_hidden_layers, n_routed_experts, num_nextn_predict_layers).")
    if problems:
        raise ValidationError(problems)
