"""Plain-text tables for plans and checkpoints (inspect, --dry-run)."""

from __future__ import annotations

from ..plan.plan import Plan


def human(n: int) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def table(rows: list[tuple], header: tuple) -> str:
    cols = list(zip(*([header] + [tuple(str(c) for c in r) for r in rows]))) if rows else [[h] for h in header]
    widths = [max(len(str(c)) for c in col) for col in cols]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def plan_summary(plan: Plan, *, tensors: bool = False) -> str:
    rows = [(f.path, f.format, len(f.tensors), human(f.nbytes)) for f in plan.files]
    out = [f"plan {plan.kind}: {plan.source_root} -> {plan.target_root}",
           f"options: {plan.options}",
           table(rows, ("file", "format", "tensors", "bytes")),
           f"total: {len(plan.files)} files, {plan.tensor_count} tensors, {human(plan.nbytes)} "
           f"from {len(plan.source_files)} source files"]
    if plan.checks:
        copies = sum(len(c.nodes) for c in plan.checks)
        out.append(f"replica checks: {len(plan.checks)} replicated tensors, {copies} copies compared before writing")
    if tensors:
        for f in plan.files:
            if f.tensors:
                out.append(f"\n{f.path}")
                out.append(table([(f"{t.group}.{t.name}" if t.group else t.name, t.node.dtype,
                                   list(t.node.shape), human(t.nbytes)) for t in f.tensors],
                                 ("tensor", "dtype", "shape", "bytes")))
    if plan.dropped:
        out.append(f"\ndropped source tensors ({len(plan.dropped)}):")
        out += [f"  {d.name}: {d.reason}" for d in plan.dropped]
    return "\n".join(out)


def split_summary(plan: Plan, parts: list[Plan]) -> str:
    """One row per part of a split plan: files, bytes written, source bytes read; imbalance and read-once."""
    from ..plan.split import ideal_read_bytes, imbalance, read_extents, extent_bytes, union

    rows, loads, reads = [], [], []
    for k, p in enumerate(parts):
        read = extent_bytes(union(list(read_extents(p).values())))
        written = sum(f.nbytes for f in p.files)
        loads.append(written + read)
        reads.append(read)
        rows.append((k, len(p.files), human(written), human(read), len(p.checks)))
    ideal = ideal_read_bytes(plan)
    out = [f"split of {plan.kind} plan into {len(parts)} parts ({plan.target_root})",
           table(rows, ("part", "files", "writes", "reads", "replica checks")),
           f"imbalance (max/mean of bytes moved): {imbalance(loads):.2f}; source bytes read by all parts: "
           f"{human(sum(reads))}, {sum(reads) / max(ideal, 1):.2f}x the plan's ideal ({human(ideal)}, "
           f"each byte once); text files are written by `run PLAN --finish`"]
    idle = [k for k, p in enumerate(parts) if not p.files]
    if idle:
        out.append(f"{len(idle)} part(s) have no file to write (a file is never split between hosts, and this plan "
                   f"has {sum(len(p.files) for p in parts)} tensor files): fewer hosts would do.")
    return "\n".join(out)
