"""The mcore -> HF planner (spec §7): the exact inverse of hf2mcore, as a plan over the rank files.

What it checks before anything is written: the tracker and every rank file the flags imply exist and parse,
every expected key is present with its shape (derived from the forward tables, so a wrong flag shows up as a
missing or mis-shaped key), nothing unexpected is present, and (``--fp8-scales-from``) the original scales
fit.  Replicated tensors are read from one rank file; the plan can carry :class:`ReplicaCheck` s so the
executor compares every other copy first.

LoRA (spec §5, :mod:`streamconv.plan.lora`): every rank piece is merged with its factors before the inverse
tables gather it (merge type 1: base and LoRA in one checkpoint; type 2: ``--lora-load``), NF4 base weights are
dequantized in the graph, and ``--save-lora-to-hf`` exports the adapter alone (:mod:`.lora_export`).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import asdict, dataclass

from ..errors import FormatError, ValidationError
from ..graph.node import Node, fp8_block_scale, quant_fp8_block, read
from ..layout.options import McoreOptions
from ..layout.parallel import ParallelSizes
from ..mapping.assemble import build_hf_tensors, build_rank_tensors, output_config, output_to_source_layer
from ..mapping.spec import ModelSpec
from ..models import model_for_config
from ..storage import fileio
from .lora import Inventory, LoraOptions, MergedRanks, build_inventory
from .lora_export import adapter_modules, export_files
from .mcore_source import McoreSource
from .plan import OutputFile, OutputTensor, Plan, ReplicaCheck, SourceFile
from .sources import INDEX_NAME
from .zarr_source import is_store, open_hf_source, store_record
from .trust import check_disjoint

RECORD = "streamconv_source.json"   # written by hf2mcore next to the tracker: HF config and layout
CONFIG = "config.json"
COMPANION_LIMIT = 64 << 20
SMALL_JSON = 64 << 20              # config.json, the record: a few KB in practice
AUTO_VERIFY_BYTES = 8 << 30         # --verify-replicas defaults on when the extra copies are at most this


@dataclass(frozen=True)
class ExportOptions:
    """How the HF side is written."""

    max_shard_size: int | None = None    # bytes; None: one file per layer (as MindSpeed's converter does)
    verify_replicas: bool | None = None  # None: on when the replica copies total at most AUTO_VERIFY_BYTES
    fp8_export: bool = False             # re-quantize linear weights to the family's block FP8 release format
    fp8_scales_from: str | None = None   # the original FP8 release: reuse its scales (exact round trip)


def read_record(load_dir: str) -> dict:
    """What hf2mcore recorded next to the checkpoint (empty when it was not written by streamconv)."""
    path = os.path.join(load_dir, RECORD)
    if not os.path.lexists(path):
        return {}
    try:
        return fileio.read_json(path, SMALL_JSON, what="streamconv record")
    except FormatError as exc:
        raise ValidationError(f"{exc} Delete it and pass --hf-config and the layout flags.") from None


def record_text(hf_config: dict, sizes: ParallelSizes, options: McoreOptions, qlora: dict | None = None) -> str:
    """The record hf2mcore writes: the HF config and the layout, so mcore2hf needs no flags for our outputs;
    ``qlora``: how NF4 weights were written (``{"nf4_layout": "npu"}``)."""
    obj = {"hf_config": hf_config, "layout": {"sizes": asdict(sizes), "options": asdict(options)}}
    if qlora:
        obj["qlora"] = qlora
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def plan_mcore_to_hf(load_dir: str, save_dir: str, sizes: ParallelSizes, options: McoreOptions,
                     export: ExportOptions = ExportOptions(), *, hf_config_dir: str | None = None,
                     iteration: str | None = None, model_type_hf: str | None = None,
                     lora: LoraOptions = LoraOptions()) -> Plan:
    """Compile an mcore (legacy torch format) -> HF safetensors plan.  The model family comes from the HF
    config's ``model_type`` (checked against MindSpeed's ``--model-type-hf`` when given).  ``lora``: merge the
    checkpoint's LoRA (or ``--lora-load``'s) into the base, or export the adapter alone."""
    check_disjoint(save_dir, [("--load-dir", load_dir), ("--hf-config", hf_config_dir),
                              ("--fp8-scales-from", export.fp8_scales_from), ("--lora-load", lora.load)])
    origin = _config_origin(load_dir, hf_config_dir)
    cfg_json = _hf_config(load_dir, hf_config_dir)
    spec = model_for_config(cfg_json, origin, model_type_hf=model_type_hf)
    cfg = spec.parse_config(cfg_json, origin)
    companions = _companions(spec, hf_config_dir)
    if export.fp8_scales_from and not export.fp8_export:
        raise ValidationError("--fp8-scales-from needs --fp8-export (the scales are for re-quantizing).")
    if export.fp8_export and spec.quant is None:
        raise ValidationError(f"--fp8-export: {spec.title} has no block FP8 release format; drop the flag.")
    if lora.problems():
        raise ValidationError(lora.problems())
    if lora.save_to_hf and (export.fp8_export or export.max_shard_size):
        raise ValidationError("--save-lora-to-hf writes the adapter alone; drop --fp8-export/--max-shard-size.")
    expected, replicas = _expected_layout(spec, cfg, sizes, options)
    source_root, (prefix, lora_prefix, scales_prefix) = common_root(load_dir, lora.load, export.fp8_scales_from)
    src = McoreSource(load_dir, sizes, list(expected), iteration, prefix=prefix)
    lora_src = McoreSource(lora.load, sizes, list(expected), prefix=lora_prefix) if lora.load else None
    inv = build_inventory(spec, cfg, sizes, options, expected, src, lora_src, lora)
    out_cfg, out_fields = output_config(spec, cfg, sizes, options)
    plan_options = {"source": asdict(sizes), "model": asdict(options), "export": asdict(export),
                    "iteration": src.iteration, "model_type": spec.name}
    if lora != LoraOptions():
        plan_options["lora"] = asdict(lora)
    if lora.save_to_hf:
        return _adapter_plan(spec, cfg, sizes, options, inv, expected, replicas, lora, source_root, save_dir,
                             out_fields, plan_options, export.verify_replicas)
    src.check(inv.main_expect(expected))
    if lora_src is not None:
        lora_src.check(inv.factor_expect(expected), others="--lora-load must be a LoRA-only checkpoint "
                                                           "(saved with --lora-ckpt-filter) of this base.")
    ranks = MergedRanks(inv, lora.alpha, lora.r, expected, _nf4_layout(lora, load_dir))
    tensors = build_hf_tensors(spec, cfg, sizes, options, ranks)

    source_files = list(src.files) + (list(lora_src.files) if lora_src else [])
    if export.fp8_export:
        tensors, scale_files = _fp8_export(spec, cfg, out_cfg, sizes, options, tensors, scales_prefix,
                                           export.fp8_scales_from)
        source_files += scale_files
    checks = _replica_checks(inv, ranks, replicas, export.verify_replicas)

    files = _shards(spec, out_fields, tensors, export.max_shard_size)
    weight_map = {t.name: f.path for f in files for t in f.tensors}
    total = sum(t.nbytes for f in files for t in f.tensors)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    files.append(OutputFile(CONFIG, "text", text=_output_config(spec, cfg_json, out_fields, export.fp8_export)))
    files += [OutputFile(name, "text", text=text) for name, text in companions]
    files.append(OutputFile(INDEX_NAME, "text", text=json.dumps(index, indent=2) + "\n"))  # last: marks it done

    return Plan(
        kind="mcore2hf",
        source_root=source_root,
        source_files=tuple(source_files),
        target_root=save_dir,
        files=tuple(files),
        options=json.loads(json.dumps(plan_options)),
        checks=checks,
    )


def _nf4_layout(lora: LoraOptions, load_dir: str) -> str:
    """Nibble order of NF4 base weights: --nf4-layout, else what hf2mcore recorded, else the Ascend order."""
    return lora.nf4_layout or (read_record(load_dir).get("qlora") or {}).get("nf4_layout") or "npu"


def _adapter_plan(spec, cfg, sizes, options, inv: Inventory, expected, replicas, lora: LoraOptions,
                  source_root: str, save_dir: str, out_fields: dict, plan_options: dict, verify: bool | None) -> Plan:
    """--save-lora-to-hf: the adapter's files, reading only the LoRA factors."""
    inv.lora.check(inv.factor_expect(expected), extras=False)
    modules, checks = adapter_modules(spec, cfg, sizes, options, inv)
    num_layers = out_fields["num_hidden_layers"] + options.mtp_num_layers
    files = export_files(spec, modules, lora, inv.targets, num_layers)
    if verify is not False:
        checks += _factor_checks(inv, replicas)
    return Plan(kind="mcore2hf", source_root=source_root, source_files=tuple(inv.lora.files), target_root=save_dir,
                files=tuple(files), options=json.loads(json.dumps(plan_options)), checks=tuple(checks))


# --- config --------------------------------------------------------------------------------------------------------

def common_root(load_dir: str, *others: str | None) -> tuple[str, tuple[str, ...]]:
    """The plan's source root when a plan reads other directories too (``--lora-load``, ``--fp8-scales-from``),
    and each directory's prefix under it (``load_dir`` first; "" for an absent one): every source file is then
    named relative to one root (the rule of :mod:`streamconv.plan.trust`).  Without another directory the root is
    ``load_dir`` as given, so a plan made with relative paths runs anywhere."""
    present = [os.path.abspath(p) for p in others if p]
    if not present:
        return load_dir, ("",) * (1 + len(others))
    a = os.path.abspath(load_dir)
    common = os.path.commonpath([a] + present)

    def prefix(p: str | None) -> str:
        if not p:
            return ""
        rel = os.path.relpath(os.path.abspath(p), common)
        return "" if rel == "." else rel.replace(os.sep, "/") + "/"

    root = common if os.path.isabs(load_dir) else os.path.relpath(common)
    return root, tuple(prefix(p) for p in (load_dir,) + others)


def _config_origin(load_dir: str, hf_config_dir: str | None) -> str:
    return os.path.join(hf_config_dir, CONFIG) if hf_config_dir else os.path.join(load_dir, RECORD)


def _hf_config(load_dir: str, hf_config_dir: str | None) -> dict:
    """config.json: from --hf-config, else the hf2mcore record."""
    if hf_config_dir is None:
        cfg = read_record(load_dir).get("hf_config")
        if not isinstance(cfg, dict):
            raise ValidationError(f"{load_dir}: no {RECORD} (the checkpoint was not converted by streamconv). Pass "
                                  f"--hf-config DIR, the HF model directory holding its config.json.")
        return cfg
    kept = _store_files(hf_config_dir)
    if kept is not None:
        try:
            cfg = json.loads(kept[CONFIG]) if CONFIG in kept else None
        except ValueError:
            cfg = None
        if not isinstance(cfg, dict):
            raise ValidationError(f"{hf_config_dir}: the store keeps no valid {CONFIG} (its 'hf' record). Pass "
                                  f"--hf-config the HF model directory instead.")
        return cfg
    path = os.path.join(hf_config_dir, CONFIG)
    try:
        return fileio.read_json(path, SMALL_JSON, what="config.json")
    except FileNotFoundError:
        raise ValidationError(f"{path}: missing. --hf-config must be an HF model directory with config.json.") from None
    except FormatError as exc:
        raise ValidationError(str(exc)) from None


def _store_files(path: str) -> dict | None:
    """The text files a zarr store at ``path`` keeps of its HF directory (name -> text), or None for a directory
    that is not a store."""
    if not is_store(path):
        return None
    files = store_record(path).get("files")
    return {item[0]: item[1] for item in (files if isinstance(files, list) else ())
            if isinstance(item, list) and len(item) == 2 and all(isinstance(x, str) for x in item)}


def _companions(spec: ModelSpec, hf_config_dir: str | None) -> list[tuple[str, str]]:
    """The family's companion files (tokenizer, generation config, modeling code) found in --hf-config."""
    companions = []
    kept = _store_files(hf_config_dir) if hf_config_dir else None
    if kept is not None:   # a zarr store: the files its 'hf' record keeps, verbatim
        return [(name, kept[name]) for name in spec.companions if isinstance(kept.get(name), str)]
    for name in spec.companions if hf_config_dir else ():
        p = os.path.join(hf_config_dir, name)
        if os.path.isfile(p) and os.path.getsize(p) <= COMPANION_LIMIT:
            try:
                companions.append((name, fileio.read_small(p, COMPANION_LIMIT, what=name).decode("utf-8")))
            except UnicodeDecodeError:
                raise ValidationError(f"{p}: not UTF-8 text; remove it from --hf-config or fix it.") from None
            except FormatError as exc:
                raise ValidationError(str(exc)) from None
    return companions


def _output_config(spec: ModelSpec, cfg_json: dict, fields: dict, fp8: bool) -> str:
    """config.json of the output: the layers it holds, and quantization_config only when the weights are FP8."""
    out = dict(cfg_json)
    out.update(fields)
    if fp8:
        out["quantization_config"] = cfg_json.get("quantization_config") or spec.quant.config_dict
    else:
        out.pop("quantization_config", None)
    return json.dumps(out, indent=2) + "\n"


# --- what the rank files must hold -------------------------------------------------------------------------------------

class _ShapeSource:
    """HF tensors as reads of a placeholder file: enough for the forward tables to say what every rank holds."""

    def __init__(self, spec: ModelSpec, cfg):
        self.table = spec.hf_table(cfg)

    def get(self, name: str) -> Node:
        t = self.table[name]
        return read("<hf>", name, t.dtype, t.shape, offset=0)

    def has(self, name: str) -> bool:
        return name in self.table

    def drop(self, name: str, reason: str) -> None:
        pass


def _expected_layout(spec: ModelSpec, cfg, sizes, options):
    """Per rank file, ``(group, name) -> shape``; and the groups of copies of one value (replicas)."""
    per_rank = build_rank_tensors(spec, cfg, sizes, options, _ShapeSource(spec, cfg))
    expected = {r: {(t.group, t.name): tuple(t.node.shape) for t in ts} for r, ts in per_rank.items()}
    copies = defaultdict(list)
    for r, ts in per_rank.items():
        for t in ts:
            copies[t.node.key].append((r, t.group, t.name))
    return expected, [c for c in copies.values() if len(c) > 1]


def replica_checks(replicas, stored, rel, verify: bool | None) -> list[ReplicaCheck] | None:
    """One check per group of copies (``stored(rank, group, name)`` gives a copy's read, ``rel(rank)`` its file);
    None when checking is off: ``verify`` False, or None and the extra copies exceed AUTO_VERIFY_BYTES."""
    extra = sum(stored(r, g, n).nbytes for copies in replicas for r, g, n in copies[1:])
    if verify is None:
        verify = extra <= AUTO_VERIFY_BYTES
    if not verify:
        return None
    return [ReplicaCheck(f"{copies[0][1]}.{copies[0][2]}", tuple(stored(r, g, n) for r, g, n in copies),
                         tuple(rel(r) + (f" [{g}.{n}]" if (g, n) != copies[0][1:] else "") for r, g, n in copies))
            for copies in replicas]


def _replica_checks(inv: Inventory, ranks: MergedRanks, replicas, verify: bool | None) -> tuple[ReplicaCheck, ...]:
    """Copies of replicated base weights (as stored: NF4 codes, type-1 base_layer), and of their LoRA factors."""
    checks = replica_checks(replicas, ranks.stored, inv.main.rel, verify)
    return () if checks is None else tuple(checks + _factor_checks(inv, replicas))


def _factor_checks(inv: Inventory, replicas) -> list[ReplicaCheck]:
    """Copies of a replicated base piece carry copies of its LoRA factors: compare them too."""
    out = []
    for copies in replicas:
        mods = [inv.modules[r].get((g, n)) for r, g, n in copies]
        if not all(mods):
            continue
        for side in ("a", "b"):
            nodes = tuple(inv.lora.get(r, g, getattr(m, side)) for (r, g, _), m in zip(copies, mods))
            where = tuple(f"{inv.lora.rel(r)} [{g}.{getattr(m, side)}]" for (r, g, _), m in zip(copies, mods))
            out.append(ReplicaCheck(f"{copies[0][1]}.{getattr(mods[0], side)}", nodes, where))
    return out


# --- FP8 export --------------------------------------------------------------------------------------------------------

def _fp8_export(spec: ModelSpec, cfg, out_cfg, sizes, options, tensors: dict[str, Node], scales_prefix: str,
                scales_from: str | None) -> tuple[dict[str, Node], list[SourceFile]]:
    """Linear weights re-quantized to the family's block FP8 format with their scales right after them."""
    q = spec.quant
    original = None
    files: list[SourceFile] = []
    rename = output_to_source_layer(spec, cfg, sizes, options)
    if scales_from:
        original = open_hf_source(scales_from, q)   # an HF directory, or a zarr store holding the release
        for f in original.files:
            files.append(SourceFile(scales_prefix + f.name, f.size, f.header_sha256))
    out: dict[str, Node] = {}
    problems = []
    for name, node in tensors.items():
        if not spec.is_quantized(out_cfg, name):
            out[name] = node
            continue
        if original is None:
            scale = fp8_block_scale(node, block=q.block)
        else:
            src_name = rename(name) + q.scale_suffix
            want = q.scale_shape(node.shape)
            if not original.has(src_name):
                problems.append(f"{original.root}: no {src_name}. --fp8-scales-from must be the FP8 release this "
                                f"checkpoint was converted from.")
                continue
            info = original.info(src_name)
            weight = original.info(rename(name))
            if tuple(info.shape) != want or info.dtype != "float32" or weight.dtype not in q.dtypes:
                problems.append(f"{src_name}: {info.dtype}{list(info.shape)} in --fp8-scales-from does not fit "
                                f"{name} {list(node.shape)} (expected float32{list(want)} scales of an FP8 weight).")
                continue
            # the original scales wherever the weights still fit them: exact for unchanged weights, and a
            # fine-tuned weight that grew past its block's range gets a fresh scale instead of being clipped
            scale = fp8_block_scale(node, block=q.block, prefer=original.raw(src_name, scales_prefix))
        out[name] = quant_fp8_block(node, scale, block=q.block)
        out[name + q.scale_suffix] = scale
    if problems:
        raise ValidationError(problems)
    return out, files


# --- output files ------------------------------------------------------------------------------------------------------

def shard_name(index: int, total: int) -> str:
    """HF's shard naming, 1-based: ``model-00001-of-00062.safetensors``."""
    return f"model-{index:05d}-of-{total:05d}.safetensors"


def _shards(spec: ModelSpec, fields: dict, tensors: dict[str, Node], max_shard_size: int | None) -> list[OutputFile]:
    """Group tensors into shards: one per layer (embedding with the first, norm and lm_head with the last real
    layer, each MTP layer alone), or greedily up to ``max_shard_size`` bytes in HF order."""
    groups: list[list[str]] = []
    if max_shard_size is None:
        real = fields["num_hidden_layers"]
        by_layer: dict[int, list[str]] = defaultdict(list)
        for name in tensors:
            layer = spec.layer_of(name)
            if layer is None:
                layer = 0 if name == spec.embedding else real - 1
            by_layer[layer].append(name)
        groups = [by_layer[k] for k in sorted(by_layer)]
    else:
        size = 0
        for name, node in tensors.items():
            if not groups or (size and size + node.nbytes > max_shard_size):
                groups.append([])
                size = 0
            groups[-1].append(name)
            size += node.nbytes
    files = []
    seq = 0
    for i, names in enumerate(groups):
        out = []
        for name in names:
            out.append(OutputTensor("", name, tensors[name], seq))
            seq += 1
        files.append(OutputFile(shard_name(i + 1, len(groups)), "safetensors", tuple(out), attrs=(("format", "pt"),)))
    return files
