"""Split rules, named after the sharding they implement (Megatron vocabulary).

Each rule is a pure function ``(source nodes, tp_size, tp_rank) -> node``: no I/O, no model knowledge.
Per-rank layouts, with ``chunk_t(X, n, d)`` the t-th of n equal pieces of X along dim d:

    REPLICATED      X                                  every rank holds the whole tensor
    COLUMN          chunk_t(X, TP, 0)                  column-parallel linear: output rows split
    ROW             chunk_t(X, TP, 1)                  row-parallel linear: input columns split
    GATED_COLUMN    [chunk_t(gate, TP, 0);             SwiGLU fc1: each rank holds its gate slice, then its
                     chunk_t(up, TP, 0)]               up slice (Megatron splits the fc1 output in halves)
    FUSED_ROWS      [X_0; X_1; ...] whole              several sources stacked on dim 0, not split
    HEAD_PARTS      chunk_t(part_k(X), TP, 0)          a head-major X whose heads have parts (rows p_0, p_1..):
                                                       target k holds part k of every head, split by whole heads
    QKV_GROUPS      chunk_t([q_g; k_g; v_g]_g, TP, 0)  GQA fused qkv: per query group g its q heads, then its k
                                                       head, then its v head; split by whole groups

Grouped-GEMM expert stacks (Megatron GroupedMLP, ``weight1.view(n, H, -1)``, ``weight2.view(n, -1, H)``):

    weight1 = reinterpret( [fc1_0^T; fc1_1^T; ...] as [n*H, C] )  as [H, n*C]     (C = 2*Fm/TPe)
    weight2 = [fc2_0^T; fc2_1^T; ...]                                              ([n*Fm/TPe, H])

``weight1`` is *not* a column concatenation of the fc1^T: its memory is expert-major, then hidden row.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from ..errors import ValidationError
from ..graph.node import Node, cat, chunk, slice_, transpose, view


class Split(str, Enum):
    REPLICATED = "replicated"
    COLUMN = "column"
    ROW = "row"
    GATED_COLUMN = "gated_column"
    FUSED_ROWS = "fused_rows"
    HEAD_PARTS = "head_parts"
    QKV_GROUPS = "qkv_groups"


@dataclass(frozen=True)
class Row:
    """One row of a model table: mcore ``targets`` built from HF ``sources`` by ``split``.

    Names are suffixes (the layer prefix is added by the assembler).  Most rules make one target; HEAD_PARTS
    makes one per part.  ``heads``/``parts`` parametrise the head rules: HEAD_PARTS ``heads`` heads of
    ``parts`` rows each; QKV_GROUPS ``heads`` query groups, ``parts`` = (query heads per group, head dim).
    """

    targets: tuple[str, ...]
    sources: tuple[str, ...]
    split: Split
    heads: int = 0
    parts: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        want_targets = len(self.parts) if self.split is Split.HEAD_PARTS else 1
        want_sources = {Split.GATED_COLUMN: 2, Split.QKV_GROUPS: 3, Split.FUSED_ROWS: len(self.sources)}
        if (len(self.targets) != want_targets or len(self.sources) != want_sources.get(self.split, 1)
                or (self.split in (Split.HEAD_PARTS, Split.QKV_GROUPS) and (self.heads < 1 or not self.parts))):
            raise ValueError(f"malformed table row {self}")

    def renamed(self, names: dict[str, str]) -> "Row":
        """The row with targets renamed by ``names`` (a naming variant: a table delta)."""
        return Row(tuple(names.get(t, t) for t in self.targets), self.sources, self.split, self.heads, self.parts)


def row(target: str, sources: tuple[str, ...] | str, split: Split) -> Row:
    """A one-target row: ``row("linear_proj.weight", "o_proj.weight", Split.ROW)``."""
    return Row((target,), (sources,) if isinstance(sources, str) else tuple(sources), split)


def apply_row(r: Row, sources: list[Node], tp: int, t: int) -> list[Node]:
    """The rank-``t`` piece (of ``tp``) of each target of ``r``."""
    if r.split is Split.HEAD_PARTS:
        (x,) = sources
        return [chunk(head_part(x, r.heads, r.parts, k), tp, t, 0) for k in range(len(r.parts))]
    if r.split is Split.QKV_GROUPS:
        return [qkv_groups(sources, r.heads, r.parts, tp, t)]
    return [apply_split(r.split, sources, tp, t)]


def merge_row(r: Row, pieces: list[list[Node]], source_rows: tuple[int, ...] = ()) -> list[Node]:
    """Inverse of :func:`apply_row`: every source of ``r`` from ``pieces[k][t]``, target k's piece of TP rank t.
    ``source_rows``: the row count of each source (FUSED_ROWS needs it)."""
    if r.split is Split.HEAD_PARTS:
        return [merge_head_parts([cat(p, 0) for p in pieces], r.heads)]
    if r.split is Split.QKV_GROUPS:
        return unfuse_qkv_groups(cat(pieces[0], 0), r.heads, r.parts)
    (target_pieces,) = pieces
    return merge_split(r.split, target_pieces, source_rows)


def apply_split(split: Split, sources: list[Node], tp: int, t: int) -> Node:
    """The rank-``t`` piece (of ``tp``) of a target tensor built from ``sources`` by ``split``."""
    if split is Split.REPLICATED:
        (x,) = sources
        return x
    if split is Split.COLUMN:
        (x,) = sources
        return chunk(x, tp, t, 0)
    if split is Split.ROW:
        (x,) = sources
        return chunk(x, tp, t, 1)
    if split is Split.GATED_COLUMN:
        gate, up = sources
        return cat([chunk(gate, tp, t, 0), chunk(up, tp, t, 0)], 0)
    if split is Split.FUSED_ROWS:
        return cat(list(sources), 0)
    raise ValueError(f"unknown split {split}")


def head_part(x: Node, heads: int, parts: tuple[int, ...], index: int) -> Node:
    """Rows of part ``index`` of every head of a head-major ``[heads * sum(parts), in]`` weight, head-major.

    ``q_b_proj`` is ``[NH * (Dn + Dr), Rq]`` with each head's Dn "nope" rows then its Dr "rope" rows;
    ``head_part(q_b, NH, (Dn, Dr), 1)`` is ``[NH * Dr, Rq]`` (MindSpeed's ``--mla-mm-split`` ``linear_qk_rope``).
    """
    width, cols = sum(parts), x.shape[1]
    per_head = view(x, (heads, width, cols))
    start = sum(parts[:index])
    offsets, lengths = (0, start, 0), (heads, parts[index], cols)
    return view(slice_(per_head, offsets, lengths), (heads * parts[index], cols))


def qkv_groups(qkv: list[Node], groups: int, parts: tuple[int, ...], tp: int, t: int) -> Node:
    """Megatron's fused GQA ``linear_qkv`` rows of TP rank ``t``: for each of its ``groups / tp`` query groups,
    the group's q heads, then its k head, then its v head (``parts`` = (q heads per group, head dim))."""
    q, k, v = qkv
    per_group, head_dim = parts
    if groups % tp:
        raise ValidationError(f"QKV_GROUPS: {tp} ranks do not divide {groups} query groups")
    cols = q.shape[1]
    mine = range(t * groups // tp, (t + 1) * groups // tp)
    rows = []
    for g in mine:
        rows += [slice_(q, (g * per_group * head_dim, 0), (per_group * head_dim, cols)),
                 slice_(k, (g * head_dim, 0), (head_dim, cols)),
                 slice_(v, (g * head_dim, 0), (head_dim, cols))]
    return cat(rows, 0)


def unfuse_qkv_groups(fused: Node, groups: int, parts: tuple[int, ...]) -> list[Node]:
    """Inverse of :func:`qkv_groups` over all ranks: ``[q, k, v]`` from the whole fused tensor."""
    per_group, head_dim = parts
    width, cols = (per_group + 2) * head_dim, fused.shape[1]
    q, k, v = [], [], []
    for g in range(groups):
        base = g * width
        q.append(slice_(fused, (base, 0), (per_group * head_dim, cols)))
        k.append(slice_(fused, (base + per_group * head_dim, 0), (head_dim, cols)))
        v.append(slice_(fused, (base + (per_group + 1) * head_dim, 0), (head_dim, cols)))
    return [cat(q, 0), cat(k, 0), cat(v, 0)]


def grouped_weight1(fc1_pieces: list[Node]) -> Node:
    """Stack per-expert fc1 pieces ([C, H] each) into Megatron's ``weight1`` [H, n*C] (memory [n, H, C])."""
    c, h = fc1_pieces[0].shape
    stacked = cat([transpose(p) for p in fc1_pieces], 0)          # [n*H, C] == memory of [n, H, C]
    return view(stacked, (h, len(fc1_pieces) * c))


def grouped_weight2(fc2_pieces: list[Node]) -> Node:
    """Stack per-expert fc2 pieces ([H, F] each) into Megatron's ``weight2`` [n*F, H]."""
    return cat([transpose(p) for p in fc2_pieces], 0)


# --- the inverse rules (mcore -> HF): each undoes its forward counterpart above ------------------------------------

def merge_split(split: Split, pieces: list[Node], part_rows: tuple[int, ...] = ()) -> list[Node]:
    """The source tensors of ``split`` rebuilt from every rank's piece (``pieces[t]`` for TP rank t).

    Inverse of :func:`apply_split`: ``merge_split(s, [apply_split(s, X, tp, t) for t in range(tp)])`` is X.
    REPLICATED takes rank 0's copy (the planner checks the others when asked); FUSED_ROWS needs the row
    count of each fused source in ``part_rows``.
    """
    if split is Split.REPLICATED:
        return [pieces[0]]
    if split is Split.COLUMN:
        return [cat(pieces, 0)]
    if split is Split.ROW:
        return [cat(pieces, 1)]
    if split is Split.GATED_COLUMN:
        halves = [_rows(p, 2) for p in pieces]
        return [cat([gate for gate, _ in halves], 0), cat([up for _, up in halves], 0)]
    if split is Split.FUSED_ROWS:
        x = pieces[0]
        if sum(part_rows) != x.shape[0]:
            raise ValueError(f"fused rows {part_rows} do not add up to {x.shape[0]}")
        out, start = [], 0
        for n in part_rows:
            out.append(slice_(x, (start, 0), (n, x.shape[1])))
            start += n
        return out
    raise ValueError(f"unknown split {split}")


def _rows(x: Node, n: int) -> list[Node]:
    return [chunk(x, n, i, 0) for i in range(n)]


def merge_head_parts(parts: list[Node], heads: int) -> Node:
    """Inverse of :func:`head_part`: interleave per-head parts ``[heads * p_k, in]`` back into
    ``[heads * sum(p_k), in]`` (each head's part 0 rows, then its part 1 rows...)."""
    cols = parts[0].shape[1]
    per_head = [view(p, (heads, p.shape[0] // heads, cols)) for p in parts]
    whole = cat(per_head, 1)
    return view(whole, (heads * whole.shape[1], cols))


def ungroup_weight1(weight1: Node, n: int) -> list[Node]:
    """Inverse of :func:`grouped_weight1`: ``weight1`` [H, n*C] -> n per-expert fc1 pieces [C, H]."""
    h, nc = weight1.shape
    c = nc // n
    stacked = view(weight1, (n * h, c))             # memory is [n, H, C]
    return [transpose(slice_(stacked, (q * h, 0), (h, c))) for q in range(n)]


def ungroup_weight2(weight2: Node, n: int) -> list[Node]:
    """Inverse of :func:`grouped_weight2`: ``weight2`` [n*F, H] -> n per-expert fc2 pieces [H, F]."""
    return [transpose(p) for p in _rows(weight2, n)]
