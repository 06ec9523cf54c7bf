"""Where a rank's graph comes from: a saved plan (its path or a :class:`Plan`), or an HF checkpoint directory
planned in-process from headers, for this rank only.

Everything here runs before a byte of tensor data is read: the source is resolved, the rank indices are
checked against the layout, layout keywords are checked against a saved plan, and the source files the rank
reads are checked against the sizes and header digests the plan recorded (a stale plan).
"""

from __future__ import annotations

import dataclasses
import json
import os

from ..errors import PlanError, ValidationError
from ..layout.options import McoreOptions
from ..layout.parallel import ParallelSizes, RankFile, rank_dir
from ..plan.plan import OutputFile, Plan, sources_read

SIZE_FLAGS = {"target_tensor_parallel_size": "tp", "target_pipeline_parallel_size": "pp",
              "target_expert_parallel_size": "ep"}
# keyword (the CLI flag's name) -> McoreOptions field
OPTION_FLAGS = {"moe_grouped_gemm": "moe_grouped_gemm", "mtp_num_layers": "mtp_num_layers",
                "num_layers": "num_layers", "first_k_dense_replace": "first_k_dense_replace",
                "num_layers_per_virtual_pipeline_stage": "vpp_layers", "noop_layers": "noop_layers",
                "num_layer_list": "num_layer_list", "schedules_method": "dualpipev",
                "moe_tp_extend_ep": "moe_tp_extend_ep", "expert_tensor_parallel_size": "expert_tensor_parallel_size",
                "mla_mm_split": "mla_mm_split", "mla_key_names": "mla_key_names"}
PLANNER_FLAGS = ("model_type_hf", "save_args")
LAYOUT_KEYWORDS = tuple(SIZE_FLAGS) + tuple(OPTION_FLAGS) + PLANNER_FLAGS


def layout_from_keywords(kw: dict) -> tuple[ParallelSizes, McoreOptions, dict]:
    """ParallelSizes, McoreOptions and the planner's own keywords from keywords named after the CLI flags."""
    unknown = sorted(set(kw) - set(LAYOUT_KEYWORDS))
    if unknown:
        raise ValidationError(f"{', '.join(unknown)}: not a layout keyword (expected the names of the CLI flags: "
                              f"{', '.join(LAYOUT_KEYWORDS)}).")
    sizes = ParallelSizes(**{SIZE_FLAGS[k]: v for k, v in kw.items() if k in SIZE_FLAGS})
    fields = {}
    for k, v in kw.items():
        if k not in OPTION_FLAGS:
            continue
        if k == "schedules_method":
            if v not in (None, "dualpipev"):
                raise ValidationError(f"schedules_method={v!r}: expected 'dualpipev' or None.")
            v = v == "dualpipev"
        elif k in ("noop_layers", "num_layer_list") and v is not None:
            v = _int_tuple(k, v)
        fields[OPTION_FLAGS[k]] = v
    base = dict(McoreOptions().__dict__)
    base.update({f: v for f, v in fields.items() if v is not None})
    return sizes, McoreOptions(**base), {k: kw[k] for k in PLANNER_FLAGS if k in kw}


def _int_tuple(flag: str, v) -> tuple[int, ...]:
    if isinstance(v, str):
        v = [x for x in v.split(",") if x.strip()]
    try:
        return tuple(int(x) for x in v)
    except (TypeError, ValueError):
        raise ValidationError(f"{flag}={v!r}: expected integers (a list, or '47,62,63').") from None


def check_rank_index(sizes: ParallelSizes, tp_rank: int, pp_rank: int, ep_rank: int, where: str) -> RankFile:
    problems = []
    for name, value, size, flag in (("tp_rank", tp_rank, sizes.tp, "tensor"),
                                    ("pp_rank", pp_rank, sizes.pp, "pipeline"),
                                    ("ep_rank", ep_rank, sizes.ep, "expert")):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < size:
            problems.append(f"{where}: {name}={value!r} is out of range: the layout has {flag} parallel size "
                            f"{size}, so {name} must be in 0..{size - 1}.")
    if problems:
        raise ValidationError(problems)
    return RankFile(tp_rank, pp_rank, ep_rank)


# --- saved plans --------------------------------------------------------------------------------------------------

# Plans whose outputs are rank files: from HF, or resharded from another mcore layout (a training job in a new
# layout then loads its rank straight from the old checkpoint).
RANK_PLAN_KINDS = ("hf2mcore", "mcore2mcore")
LOADS_RANKS = "a training job loads ranks of an hf2mcore or mcore2mcore plan"


def plan_sizes(plan_options: dict, where: str) -> ParallelSizes:
    target = (plan_options or {}).get("target")
    if not isinstance(target, dict):
        raise PlanError(f"{where}: the plan records no target layout (options.target); re-create it with this "
                        f"streamconv version.")
    return ParallelSizes(**{k: int(target.get(k, 1)) for k in ("tp", "pp", "ep")})


def rank_file_of(plan: Plan, r: RankFile, sizes: ParallelSizes, where: str) -> OutputFile:
    """The plan's output file for rank ``r``; an error listing the ranks the plan has when it has none."""
    want = rank_dir(r, sizes)
    files = [f for f in plan.files if f.tensors and f.path.split("/")[1:2] == [want]]
    if files:
        return files[0]
    have = [f.path.split("/")[1] for f in plan.files if f.tensors and "/" in f.path]
    raise ValidationError(f"{where}: no rank file {want} (tp_rank={r.tp_rank}, pp_rank={r.pp_rank}, "
                          f"ep_rank={r.ep_rank}) in this layout; it has {len(have)}: {', '.join(have[:8])}"
                          f"{' ...' if len(have) > 8 else ''}. (With expert tensor parallel size 1 only the "
                          f"(tp, ep) pairs Megatron instantiates exist.)")


def check_plan_layout(plan: Plan, kw: dict, where: str) -> None:
    """Layout keywords given with a saved plan must agree with what it was planned for (a wrong layout)."""
    if not kw:
        return
    if "model_type_hf" in kw:
        raise ValidationError(f"{where}: model_type_hf applies to an HF directory; a plan records its family "
                              f"({plan.options.get('model_type')!r}).")
    sizes, options, planner = layout_from_keywords(kw)
    planned_sizes = plan_sizes(plan.options, where)
    planned = dict(plan.options.get("model") or {})
    problems = []
    for k in kw:
        if k in SIZE_FLAGS:
            got, want = getattr(sizes, SIZE_FLAGS[k]), getattr(planned_sizes, SIZE_FLAGS[k])
        elif k in OPTION_FLAGS:
            field = OPTION_FLAGS[k]
            got = getattr(options, field)
            want = planned.get(field)
            got = list(got) if isinstance(got, tuple) else got
        else:  # save_args
            got, want = bool(planner[k]), any(a == "args" for f in plan.files for a, _ in f.attrs)
        if got != want:
            problems.append(f"{where}: {k}={kw[k]!r} but the plan was made for {want!r}. Load with the plan's "
                            f"layout, or re-plan for this one.")
    if problems:
        raise ValidationError(problems)


def read_rank_plan(path: str, r: RankFile, kw: dict) -> tuple[Plan, OutputFile]:
    """A saved plan file cut down to rank ``r``'s file and the nodes it uses, then decoded and checked by
    :meth:`Plan.from_json`: a 671B plan is tens of MB of JSON, but one rank needs a few hundredth of its nodes."""
    try:
        with open(path, "rb") as f:
            obj = json.loads(f.read())
    except FileNotFoundError:
        raise PlanError(f"{path}: plan file not found.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PlanError(f"{path}: not valid JSON ({exc}).") from None
    try:
        options = obj.get("options") or {}
        if obj.get("kind") not in RANK_PLAN_KINDS:
            raise PlanError(f"{path}: a {obj.get('kind')!r} plan; {LOADS_RANKS}.")
        sizes = plan_sizes(options, path)
        check_rank_index(sizes, r.tp_rank, r.pp_rank, r.ep_rank, path)
        want = rank_dir(r, sizes)
        entries = [f for f in obj["target"]["files"] if f.get("tensors") and f["path"].split("/")[1:2] == [want]]
        if entries:
            entry = entries[0]
            rows = obj["nodes"]
            keep: set[int] = set()
            stack = [int(t[2]) for t in entry["tensors"]]
            while stack:
                i = stack.pop()
                if i not in keep:
                    keep.add(i)
                    stack.extend(int(j) for j in rows[i]["src"])
            order = sorted(keep)
            new_id = {old: new for new, old in enumerate(order)}
            nodes = [dict(rows[i], src=[new_id[int(j)] for j in rows[i]["src"]]) for i in order]
            entry = dict(entry, tensors=[[g, n, new_id[int(i)], s] for g, n, i, s in entry["tensors"]])
            obj = dict(obj, nodes=nodes, target=dict(obj["target"], files=[entry]))
            obj.pop("checks", None)
    except PlanError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise PlanError(f"{path}: malformed plan ({exc.__class__.__name__}: {exc}).") from None
    plan = Plan.from_json(obj, path=path)
    check_plan_layout(plan, kw, path)
    return plan, rank_file_of(plan, r, sizes, path)


def rank_of_plan(plan: Plan, r: RankFile, kw: dict, where: str = "plan") -> tuple[Plan, OutputFile]:
    """An in-memory plan cut down to rank ``r``'s file."""
    if plan.kind not in RANK_PLAN_KINDS:
        raise PlanError(f"{where}: a {plan.kind!r} plan; {LOADS_RANKS}.")
    sizes = plan_sizes(plan.options, where)
    check_rank_index(sizes, r.tp_rank, r.pp_rank, r.ep_rank, where)
    check_plan_layout(plan, kw, where)
    f = rank_file_of(plan, r, sizes, where)
    return dataclasses.replace(plan, files=(f,), checks=()), f


def file_of_path(plan: Plan, path: str) -> OutputFile:
    for f in plan.files:
        if f.path == path and f.tensors:
            return f
    paths = [f.path for f in plan.files if f.tensors]
    raise PlanError(f"{path}: not a rank file of this plan; it has {len(paths)}: {', '.join(paths[:4])}"
                    f"{' ...' if len(paths) > 4 else ''}.")


# --- HF directories -------------------------------------------------------------------------------------------------

def is_hf_dir(source) -> bool:
    return isinstance(source, (str, os.PathLike)) and os.path.isdir(source)


def is_mcore_dir(source) -> bool:
    """An mcore checkpoint (its tracker file is there); an HF directory or a zarr store never has one."""
    if not is_hf_dir(source):
        return False   # a plan file: the planner (and the model tables) stay unimported
    from ..plan.planner import TRACKER

    return os.path.isfile(os.path.join(source, TRACKER))


def plan_rank_from_mcore(load_dir: str, r: RankFile, kw: dict) -> tuple[Plan, OutputFile]:
    """Plan target rank ``r`` (the layout in ``kw``) straight from an mcore checkpoint streamconv wrote, whose
    record gives the source layout: the mcore2mcore planner, this rank only (its rank files' headers read)."""
    from ..plan.mcore2hf import RECORD, read_record  # the one place model tables meet storage
    from ..plan.mcore2mcore import plan_mcore_to_mcore

    layout = read_record(load_dir).get("layout")
    if not isinstance(layout, dict) or not isinstance(layout.get("sizes"), dict):
        raise ValidationError(f"{load_dir}: an mcore checkpoint without streamconv's record ({RECORD}), so its "
                              f"layout is unknown here. Save a reshard plan with its layout flags (streamconv plan "
                              f"mcore2mcore --load-dir {load_dir} --source-... -o reshard.json) and open that.")
    try:
        src_sizes = ParallelSizes(**{k: int(layout["sizes"].get(k, 1)) for k in ("tp", "pp", "ep")})
        src_options = McoreOptions(**{k: tuple(v) if isinstance(v, list) else v
                                      for k, v in (layout.get("options") or {}).items()})
    except (TypeError, ValueError) as exc:
        raise ValidationError(f"{os.path.join(load_dir, RECORD)}: not a layout this streamconv reads ({exc}). "
                              f"Save a reshard plan with the layout flags and open that.") from None
    sizes, options, planner = layout_from_keywords(kw)
    check_rank_index(sizes, r.tp_rank, r.pp_rank, r.ep_rank, str(load_dir))
    plan = plan_mcore_to_mcore(str(load_dir), os.path.join(str(load_dir), "(loaded in memory)"), src_sizes,
                               src_options, sizes, options, ranks={r}, **planner)
    return dataclasses.replace(plan, checks=()), rank_file_of(plan, r, sizes, str(load_dir))


def plan_rank_from_hf(load_dir: str, r: RankFile, kw: dict) -> tuple[Plan, OutputFile]:
    """Plan rank ``r`` straight from an HF checkpoint directory (headers, index and config.json only): the
    planner validates the source and the layout as for a conversion, and builds this rank's graphs only."""
    from ..plan.planner import plan_hf_to_mcore  # the one place model tables meet storage

    sizes, options, planner = layout_from_keywords(kw)
    check_rank_index(sizes, r.tp_rank, r.pp_rank, r.ep_rank, str(load_dir))
    plan = plan_hf_to_mcore(str(load_dir), os.path.join(str(load_dir), "(loaded in memory)"), sizes, options,
                            ranks={r}, **planner)
    return plan, rank_file_of(plan, r, sizes, str(load_dir))


# --- staleness ------------------------------------------------------------------------------------------------------

def restrict_sources(plan: Plan, f: OutputFile, source_root: str | None = None) -> Plan:
    """``plan`` with only ``f`` and the source files its graphs read (so staleness checks touch only those)."""
    return dataclasses.replace(plan, files=(f,), checks=(), source_root=source_root or plan.source_root,
                               source_files=sources_read(plan, [t.node for t in f.tensors]))


def check_sources(plan: Plan) -> None:
    """The source files ``plan`` reads exist with the sizes and header digests it recorded (headers only)."""
    from ..execute.executor import source_problems

    problems = source_problems(plan)
    if problems:
        raise ValidationError(problems)
