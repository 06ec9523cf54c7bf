"""The plan / run / convert / inspect commands: thin wrappers over library functions."""

from __future__ import annotations

import os

from ..errors import StreamconvError
from ..plan.plan import Plan
from . import common, report


# Directions added after hf2mcore/mcore2hf: name -> (help, flag adder, planner).  `plan NAME` and `convert NAME`
# take the same flags.
MORE_DIRECTIONS = {
    "mcore2mcore": ("MindSpeed mcore -> mcore in another layout, in one pass (target flags as hf2mcore's)",
                    common.add_mcore2mcore_flags, common.plan_mcore2mcore_from_args),
    "hf2zarr": ("HF safetensors -> a chunked zarr v3 store (FP8 stays FP8) that hf2mcore reads directly",
                common.add_hf2zarr_flags, common.plan_hf2zarr_from_args),
    "mcore2zarr": ("MindSpeed mcore -> a zarr v3 store of the HF checkpoint mcore2hf would write",
                   common.add_mcore2zarr_flags, common.plan_mcore2zarr_from_args),
    "zarr2hf": ("a zarr store -> the HF safetensors checkpoint it was made from, byte for byte",
                common.add_zarr2hf_flags, common.plan_zarr2hf_from_args),
}


def register(sub) -> None:
    p = sub.add_parser("plan", help="compile a conversion plan (JSON) without writing any checkpoint")
    psub = p.add_subparsers(dest="direction", required=True, metavar="DIRECTION")
    h = psub.add_parser("hf2mcore", help="HF DeepSeek-V3 safetensors -> MindSpeed mcore (legacy torch format)")
    common.add_hf2mcore_flags(h)
    h.add_argument("--output", "-o", required=True, help="where to save the plan JSON")
    h.add_argument("--dry-run", action="store_true", help="print the plan's summary; do not save it")
    h.set_defaults(func=cmd_plan)
    m = psub.add_parser("mcore2hf", help="MindSpeed mcore (legacy torch format) -> HF DeepSeek-V3 safetensors")
    common.add_mcore2hf_flags(m)
    m.add_argument("--output", "-o", required=True, help="where to save the plan JSON")
    m.add_argument("--dry-run", action="store_true", help="print the plan's summary; do not save it")
    m.set_defaults(func=cmd_plan)
    for name, (help_text, add_flags, _) in MORE_DIRECTIONS.items():
        d = psub.add_parser(name, help=help_text)
        add_flags(d)
        d.add_argument("--output", "-o", required=True, help="where to save the plan JSON")
        d.add_argument("--dry-run", action="store_true", help="print the plan's summary; do not save it")
        d.set_defaults(func=cmd_plan)
    sp = psub.add_parser("split", help="cut a saved plan into N sub-plans, one per host (no scheduler needed)")
    sp.add_argument("plan", help="plan JSON written by `streamconv plan`")
    sp.add_argument("--hosts", type=int, required=True, metavar="N", help="number of parts (hosts)")
    sp.add_argument("--output", "-o", required=True, metavar="DIR",
                    help="directory the sub-plans are written to (part-K-of-N.json)")
    sp.set_defaults(func=cmd_split)

    r = sub.add_parser("run", help="execute a saved plan")
    r.add_argument("plan", help="plan JSON written by `streamconv plan` (or a part written by `plan split`)")
    common.add_run_flags(r)
    r.add_argument("--finish", action="store_true",
                   help="after every part of `plan split` ran: check that each file of PLAN is journaled and "
                        "complete, then write the tracker and index files")
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("convert", help="plan and run in one step")
    csub = c.add_subparsers(dest="direction", required=True, metavar="DIRECTION")
    ch = csub.add_parser("hf2mcore", help="HF DeepSeek-V3 safetensors -> MindSpeed mcore (legacy torch format)")
    common.add_hf2mcore_flags(ch)
    common.add_run_flags(ch)
    ch.add_argument("--plan-output", help="also save the plan JSON here")
    ch.set_defaults(func=cmd_convert)
    cm = csub.add_parser("mcore2hf", help="MindSpeed mcore (legacy torch format) -> HF DeepSeek-V3 safetensors")
    common.add_mcore2hf_flags(cm)
    common.add_run_flags(cm)
    cm.add_argument("--plan-output", help="also save the plan JSON here")
    cm.set_defaults(func=cmd_convert)
    for name, (help_text, add_flags, _) in MORE_DIRECTIONS.items():
        d = csub.add_parser(name, help=help_text)
        add_flags(d)
        common.add_run_flags(d)
        d.add_argument("--plan-output", help="also save the plan JSON here")
        d.set_defaults(func=cmd_convert)

    v = sub.add_parser("verify", help="check written outputs: sizes, checksums, tensors re-derived from the source")
    v.add_argument("path", help="plan JSON (full checks), or a save dir written by streamconv (journal checks)")
    v.add_argument("--sample", type=int, default=None, metavar="N", help="checksum only N random files")
    v.add_argument("--rederive", type=int, default=0, metavar="K",
                   help="re-compute K random tensors from the source and compare bytes (plan only)")
    v.add_argument("--seed", type=int, default=0, help="seed of the random choices")
    v.set_defaults(func=cmd_verify)

    i = sub.add_parser("inspect", help="show a plan, an HF checkpoint or an mcore checkpoint as a table")
    i.add_argument("path", help="plan JSON, HF checkpoint directory, or mcore save dir")
    i.add_argument("--tensors", action="store_true", help="list every tensor (shape, dtype, bytes)")
    i.set_defaults(func=cmd_inspect)


def _plan_from_args(args) -> Plan:
    if args.direction in MORE_DIRECTIONS:
        return MORE_DIRECTIONS[args.direction][2](args)
    if args.direction == "mcore2hf":
        return common.plan_mcore2hf_from_args(args)
    return common.plan_hf2mcore_from_args(args)


def cmd_plan(args) -> int:
    plan = _plan_from_args(args)
    if not args.dry_run:
        plan.save(args.output)
    print(report.plan_summary(plan))
    print("dry run: plan not saved" if args.dry_run else f"plan saved to {args.output}")
    return 0


def _execute(plan: Plan, args, plan_output: str | None = None) -> int:
    """Run (or with --dry-run, check) ``plan``; ``plan_output`` is saved only once every check passed."""
    from ..execute.executor import preflight, run_plan

    opts = common.run_options(args)
    if args.dry_run:
        preflight(plan, opts)
        if plan.checks:
            from ..execute.replicas import check_replicas

            check_replicas(plan, num_workers=opts.num_workers)
        print(report.plan_summary(plan))
        if plan_output:
            plan.save(plan_output)
            print(f"plan saved to {plan_output}")
        print("dry run: checks passed, nothing written")
        return 0
    finish = getattr(args, "finish", False)
    result = run_plan(plan, opts, accepted=(lambda: plan.save(plan_output)) if plan_output else None, finish=finish)
    if result.removed:
        print(f"--overwrite: removed {len(result.removed)} file(s) of an earlier checkpoint "
              f"({', '.join(result.removed[:4])}{' ...' if len(result.removed) > 4 else ''})")
    if finish:
        print(f"finished {plan.target_root}: every file of the plan is journaled and complete; wrote "
              f"{result.files} text file(s)")
        return 0
    if result.cluster is not None and result.cluster.by_worker:
        c = result.cluster
        print(f"cluster: {c.groups} task(s) on {len(c.by_worker)} worker(s); bytes written per worker "
              f"{', '.join(report.human(b) for _, b in c.by_worker)} (imbalance max/mean {c.imbalance:.2f})")
    print(f"wrote {result.files} files, {report.human(result.bytes_written)} to {plan.target_root} "
          f"in {result.seconds:.1f} s ({report.human(int(result.bytes_written / max(result.seconds, 1e-9)))}/s)")
    return 0


def cmd_run(args) -> int:
    if args.finish and args.dry_run:
        raise StreamconvError("--finish and --dry-run: pick one.")
    return _execute(Plan.load(args.plan), args)


def cmd_split(args) -> int:
    from ..plan.split import split_plan

    if args.hosts < 1:
        raise StreamconvError(f"--hosts {args.hosts}: give at least 1.")
    plan = Plan.load(args.plan)
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise StreamconvError(f"--output {args.output}: exists and is not a directory.")
    parts = split_plan(plan, args.hosts)
    os.makedirs(args.output, exist_ok=True)
    for p in parts:
        p.save(os.path.join(args.output, f"{part_name(p)}.json"))
    print(report.split_summary(plan, parts))
    first = os.path.join(args.output, f"{part_name(parts[0])}.json")
    print(f"{len(parts)} sub-plans saved to {args.output}: run `streamconv run {first}` on host 0, and so on; then "
          f"`streamconv run {args.plan} --finish` on one host")
    return 0


def part_name(p: Plan) -> str:
    from ..plan.split import part_of

    return part_of(p).tag


def cmd_convert(args) -> int:
    return _execute(_plan_from_args(args), args, plan_output=args.plan_output)


def cmd_verify(args) -> int:
    from ..execute.verify import verify_dir, verify_plan

    if os.path.isfile(args.path):
        rep = verify_plan(Plan.load(args.path), sample=args.sample, rederive=args.rederive, seed=args.seed)
    elif os.path.isdir(args.path):
        rep = verify_dir(args.path)
    else:
        raise StreamconvError(f"{args.path}: no such plan file or directory.")
    for p in rep.problems:
        print(f"FAIL {p}")
    status = "ok" if rep.ok else "INCOMPLETE" if rep.incomplete else "FAILED"
    print(f"{status}: {rep.files} files, {rep.records} tensor checksums, "
          f"{rep.rederived} tensors re-derived, {len(rep.problems)} problems")
    return 0 if rep.ok else 1


def cmd_inspect(args) -> int:
    path = args.path
    from ..data.inspect import dataset_prefixes, inspect_datasets
    if not path.endswith(".json") and dataset_prefixes(path):  # a Megatron indexed dataset (.bin/.idx)
        print(inspect_datasets(path))
        return 0
    if os.path.isfile(path):
        from ..storage.registry import format_of_file

        fmt = format_of_file(path)
        if fmt is not None and not fmt.is_text:  # one tensor file (a shard, a rank file)
            print(_inspect_file(path, fmt))
            return 0
        print(report.plan_summary(Plan.load(path), tensors=args.tensors))
        return 0
    if os.path.lexists(os.path.join(path, "latest_checkpointed_iteration.txt")):
        print(_inspect_mcore(path, args.tensors))
        return 0
    if os.path.isdir(path):
        print(_inspect_hf(path, args.tensors))
        return 0
    if os.path.lexists(path):
        raise StreamconvError(f"{path}: not a regular file or directory (a FIFO, device or dangling symlink); expected "
                              f"a plan, a tensor file or a checkpoint directory.")
    raise StreamconvError(f"{path}: no such plan file or checkpoint directory.")


def _inspect_file(path: str, fmt) -> str:
    index = fmt.index(path)
    rows = [(f"{e.group}.{e.name}" if e.group else e.name, e.dtype, list(e.shape), report.human(e.nbytes))
            for e in index.tensors]
    return "\n".join([f"{fmt.name} file {path}: {len(rows)} tensors, {report.human(index.size)}",
                      report.table(rows, ("tensor", "dtype", "shape", "bytes"))])


def _inspect_hf(path: str, tensors: bool) -> str:
    from ..plan.zarr_source import is_store, open_hf_source

    src = open_hf_source(path)   # an HF directory, or a zarr store
    # a store: by the HF shard its tensors came from (one array per tensor would be a row each)
    origin = {n: s["file"] for s in getattr(src, "record", {}).get("shards", ()) for n in s["tensors"]}
    files: dict[str, list] = {}
    for name, (shard, info) in src.tensors.items():
        files.setdefault(origin.get(name, shard), []).append((name, info))
    rows = [(shard, len(items), report.human(sum(i.nbytes for _, i in items))) for shard, items in sorted(files.items())]
    out = [f"{'zarr store' if is_store(path) else 'HF checkpoint'} {src.root}",
           report.table(rows, ("file", "tensors", "bytes")),
           f"total: {len(files)} files, {len(src.tensors)} tensors, "
           f"{report.human(sum(i.nbytes for _, i in src.tensors.values()))}"]
    if tensors:
        out.append(report.table([(n, i.dtype, list(i.shape), shard) for n, (shard, i) in sorted(src.tensors.items())],
                                ("tensor", "dtype", "shape", "file")))
    return "\n".join(out)


def _inspect_mcore(path: str, tensors: bool) -> str:
    from ..plan.mcore_source import RANK_FILE, iteration_dir
    from ..storage.megatron_pt import MEGATRON_PT

    it = iteration_dir(path)
    iter_path = os.path.join(path, it)
    rows, detail = [], []
    for rank in sorted(os.listdir(iter_path)):
        pt = os.path.join(iter_path, rank, RANK_FILE)
        if not os.path.isfile(pt):
            continue
        # the format's own index: reads no tensor data, runs no code, and accepts MindSpeed's defaultdict files
        entries = MEGATRON_PT.index(pt).tensors
        groups = sorted({e.group for e in entries})
        rows.append((f"{it}/{rank}", ",".join(groups), len(entries), report.human(sum(e.nbytes for e in entries))))
        if tensors:
            detail.append(f"\n{rank}")
            detail.append(report.table([(f"{e.group}.{e.name}", e.dtype, list(e.shape)) for e in entries],
                                       ("tensor", "dtype", "shape")))
    return "\n".join([f"mcore checkpoint {path} ({it})",
                      report.table(rows, ("rank file", "groups", "tensors", "bytes"))] + detail)
