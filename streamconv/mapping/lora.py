"""LoRA factors of a table row: how PEFT splits them across tensor-parallel ranks, and how to gather them back.

A LoRA adapter on a linear weight W [out, in] is ``W + s * B @ A`` with A [r, in] and B [out, r].  Wrapped
around a Megatron parallel linear (PEFT ``LoraParallelLinear``, spec §5.1), the factors follow the base piece:
A is split where W's columns are, B where W's rows are, and whatever W does not split is replicated.  So each
split rule of :mod:`streamconv.mapping.rules` fixes the factors' layout:

    rule            A piece of rank t            B piece of rank t
    REPLICATED      A                            B
    COLUMN          A            (replicated)    chunk_t(B, TP, 0)
    ROW             chunk_t(A, TP, 1)            B            (replicated)
    GATED_COLUMN    A            (replicated)    [chunk_t(B_gate); chunk_t(B_up)]   (one module: gate and up
                                                                                    share A in HF terms)
    FUSED_ROWS      A            (replicated)    [B_0; B_1; ...] whole
    QKV_GROUPS      A            (replicated)    B's rows grouped like the weight's
    HEAD_PARTS      each target is its own module with its own A and B: no single HF (A, B) pair

:func:`gather_factors` is the inverse: the HF factors of every source of a row from each rank's pieces.  An HF
weight fused from several sources (gate and up; q_a and kv_a) gets the one A for each source and its own rows
of B, which is exactly the fused module's delta split by rows.  :func:`split_factors` goes forward again (for
resharding a LoRA checkpoint): every rule that places W's rows places B's rows the same way, ROW splits A's
columns, and HEAD_PARTS, which cannot be gathered, can be split: each part's module gets the one A and its
part of B's rows.

Grouped-GEMM experts (``weight1/2``, [in, out] per expert) carry ``weight1_lora_a`` [H, r*n] (memory [n, H, r]),
``weight1_lora_b`` [r, n*C] ([n, r, C]), ``weight2_lora_a`` [n*F, r] and ``weight2_lora_b`` [r*n, H]
([n, r, H]); expert q's delta is ``a_q @ b_q``.  :func:`gemm_expert_factors` turns them into each expert's
HF-orientation factors (``A = a_q^T``, ``B = b_q^T``), so experts gather like local experts;
:func:`grouped_factors` stacks them back.

A checkpoint holding base and LoRA together (PEFT's names, spec §5.1) stores a wrapped linear's base as
``X.base_layer.weight`` with ``X.lora_A.default.weight`` and ``X.lora_B.default.weight`` after it; a GEMM stack
keeps its name, with ``weightN_lora_a``/``_b`` after it (:func:`wrapped`).
"""

from __future__ import annotations

from ..graph.node import Node, cat, slice_, transpose, view
from .rules import Row, Split, apply_row, merge_split, unfuse_qkv_groups

# Factor of a row's rule that every TP rank holds whole (the replicas to compare), by split.
REPLICATED_FACTORS = {
    Split.REPLICATED: ("A", "B"),
    Split.COLUMN: ("A",),
    Split.ROW: ("B",),
    Split.GATED_COLUMN: ("A",),
    Split.FUSED_ROWS: ("A", "B"),
    Split.QKV_GROUPS: ("A",),
}


def is_exportable(r: Row) -> bool:
    """Whether the HF side of row ``r`` can hold its LoRA as one rank-r (A, B) pair per source."""
    return r.split in REPLICATED_FACTORS


def gather_factors(r: Row, a_pieces: list[Node], b_pieces: list[Node],
                   source_rows: tuple[int, ...] = ()) -> list[tuple[Node, Node]]:
    """``(A, B)`` of each HF source of row ``r`` (in ``r.sources`` order) from every TP rank's factor pieces
    (``a_pieces[t]``, ``b_pieces[t]``); ``source_rows``: the row count of each source (FUSED_ROWS).  Replicated
    factors are taken from rank 0 (callers compare the copies)."""
    s = r.split
    if s is Split.REPLICATED:
        return [(a_pieces[0], b_pieces[0])]
    if s is Split.COLUMN:
        return [(a_pieces[0], cat(b_pieces, 0))]
    if s is Split.ROW:
        return [(cat(a_pieces, 1), b_pieces[0])]
    if s is Split.GATED_COLUMN:
        gate, up = merge_split(Split.GATED_COLUMN, b_pieces)
        return [(a_pieces[0], gate), (a_pieces[0], up)]
    if s is Split.FUSED_ROWS:
        return [(a_pieces[0], b) for b in merge_split(Split.FUSED_ROWS, [b_pieces[0]], source_rows)]
    if s is Split.QKV_GROUPS:
        return [(a_pieces[0], b) for b in unfuse_qkv_groups(cat(b_pieces, 0), r.heads, r.parts)]
    raise ValueError(f"{r.targets}: {s.value} rows carry one LoRA module per target; no single HF (A, B) pair")


def gemm_expert_factors(lora_a: Node, lora_b: Node, n: int, which: int) -> list[tuple[Node, Node]]:
    """Per local expert q, the HF-orientation ``(A, B)`` of grouped-GEMM ``weight{which}`` LoRA factors.

    GEMM weights are [in, out], so expert q's delta is ``a_q @ b_q`` [in, out]; HF's [out, in] delta is its
    transpose ``b_q^T @ a_q^T``, so A = ``a_q^T`` [r, in] and B = ``b_q^T`` [out, r]."""
    if which == 1:   # weight1_lora_a [H, r*n] = memory [n, H, r]; weight1_lora_b [r, n*C] = memory [n, r, C]
        h, rn = lora_a.shape
        r = rn // n
        c = lora_b.shape[1] // n
        a = view(lora_a, (n * h, r))
        b = view(lora_b, (n * r, c))
        return [(transpose(slice_(a, (q * h, 0), (h, r))), transpose(slice_(b, (q * r, 0), (r, c))))
                for q in range(n)]
    # weight2_lora_a [n*F, r] = memory [n, F, r]; weight2_lora_b [r*n, H] = memory [n, r, H]
    nf, r = lora_a.shape
    f = nf // n
    h = lora_b.shape[1]
    return [(transpose(slice_(lora_a, (q * f, 0), (f, r))), transpose(slice_(lora_b, (q * r, 0), (r, h))))
            for q in range(n)]


def split_factors(r: Row, pairs: list[tuple[Node, Node]], tp: int, t: int) -> list[tuple[Node, Node]]:
    """Inverse of :func:`gather_factors`: TP rank ``t``'s ``(A, B)`` of each target of row ``r`` from the HF
    ``(A, B)`` of each of its sources (``pairs``, in ``r.sources`` order).  The sources of a fused row share one
    A (one PEFT module), as gathered factors do."""
    if r.split is Split.REPLICATED:
        return [pairs[0]]
    if r.split is Split.ROW:
        (a,) = apply_row(r, [pairs[0][0]], tp, t)
        return [(a, pairs[0][1])]
    a = pairs[0][0]
    if any(other != a for other, _ in pairs[1:]):
        raise ValueError(f"{r.targets}: the fused sources {r.sources} have different LoRA A factors")
    return [(a, b) for b in apply_row(r, [b for _, b in pairs], tp, t)]


def grouped_factors(pairs: list[tuple[Node, Node]], which: int) -> tuple[Node, Node]:
    """Inverse of :func:`gemm_expert_factors`: ``(weightN_lora_a, weightN_lora_b)`` of a grouped-GEMM stack from
    each local expert's HF-orientation ``(A, B)`` (expert q's ``a_q = A^T``, ``b_q = B^T``)."""
    n = len(pairs)
    a_q = [transpose(a) for a, _ in pairs]      # [in, r]
    b_q = [transpose(b) for _, b in pairs]      # [r, out]
    if which == 1:   # weight1_lora_a [H, r*n] (memory [n, H, r]); weight1_lora_b [r, n*C] (memory [n, r, C])
        h, r = a_q[0].shape
        c = b_q[0].shape[1]
        return view(cat(a_q, 0), (h, r * n)), view(cat(b_q, 0), (r, n * c))
    return cat(a_q, 0), cat(b_q, 0)             # weight2_lora_a [n*F, r]; weight2_lora_b [r*n, H]


def wrapped(name: str, base: Node, a: Node, b: Node) -> list[tuple[str, Node]]:
    """A LoRA-wrapped weight's entries in a checkpoint holding base and factors (spec §5.1), in PEFT's order."""
    if name.endswith(("experts.weight1", "experts.weight2")):
        return [(name, base), (name + "_lora_a", a), (name + "_lora_b", b)]
    module = name.removesuffix(".weight")
    return [(module + ".base_layer.weight", base), (module + ".lora_A.default.weight", a),
            (module + ".lora_B.default.weight", b)]
