"""Per-rank assembly of an mcore checkpoint from a model spec's tables, and its exact inverse.

:func:`build_rank_tensors` walks the placement (:mod:`streamconv.layout.placement`) and the spec's rows and
gives every rank file's ordered state dict as graph nodes over the HF source (spec §3, §4).
:func:`build_hf_tensors` reads the same rows backwards: every rule is undone by its inverse
(:func:`~streamconv.mapping.rules.merge_row`), expert slices are collected by the same
:func:`~streamconv.layout.placement.expert_slice`, so every layout inverts by construction.

Megatron's side of the names is generic and lives here: ``embedding.word_embeddings.weight``,
``decoder.layers.{l}.``, ``decoder.final_layernorm.weight`` (``final_layernorm.weight`` with MTP),
``output_layer.weight``, ``mlp.experts.weight1/2`` or ``mlp.experts.local_experts.{q}.``, and the MTP module
``mtp.layers.{m}.`` / ``mtp.final_layernorms.{m}.weight``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Protocol

from ..errors import ValidationError
from ..graph.node import Node
from ..layout.options import McoreOptions
from ..layout.parallel import ParallelSizes, RankFile
from ..layout.placement import Chunk, Placement, expert_slice, place
from .rules import Row, Split, apply_row, apply_split, grouped_weight1, grouped_weight2, merge_row, merge_split
from .lora import grouped_factors, split_factors, wrapped
from .rules import ungroup_weight1, ungroup_weight2
from .sources import SourceTensors
from .spec import ModelSpec

EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT_LAYER = "output_layer.weight"


@dataclass(frozen=True)
class TargetTensor:
    group: str     # top-level key of the .pt file holding it ("model", "model0", ...)
    name: str
    node: Node


def placement(spec: ModelSpec, cfg, sizes: ParallelSizes, o: McoreOptions) -> Placement:
    """Validate the options against the model (every problem at once) and place every layer and rank."""
    return place(spec.facts(cfg, sizes, o), sizes, o)


# --- HF -> mcore ---------------------------------------------------------------------------------------------------

class LoraFactors(Protocol):
    """HF-level LoRA factors to place with the weights (resharding a checkpoint that holds base and LoRA)."""

    def factors(self, hf_name: str) -> tuple[Node, Node] | None:
        """``(A [r, in], B [out, r])`` of the HF weight ``hf_name``'s adapter, or None: not wrapped."""
        ...


def build_rank_tensors(spec: ModelSpec, cfg, sizes: ParallelSizes, o: McoreOptions,
                       src: SourceTensors, ranks=None,
                       lora: LoraFactors | None = None) -> dict[RankFile, list[TargetTensor]]:
    """Every rank file's ordered state dict, as nodes over ``src`` (spec §3, §4); with ``ranks`` (a collection
    of :class:`RankFile`), only those (a training job loading its own rank builds nothing else).  With
    ``lora``, every weight whose HF sources have factors is written wrapped (:func:`~.lora.wrapped`), its
    factors split as PEFT holds them (:func:`~.lora.split_factors`)."""
    p = placement(spec, cfg, sizes, o)
    out: dict[RankFile, list[TargetTensor]] = {}
    for r in p.ranks:
        if ranks is not None and r not in ranks:
            continue
        t = r.tp_rank
        tensors: list[TargetTensor] = []
        for group in p.layout.groups():
            chunk = (r.pp_rank, group)
            items: list[tuple[str, Node]] = []
            if chunk == p.first:
                items.append((EMBEDDING, apply_split(Split.COLUMN, [src.get(spec.embedding)], sizes.tp, t)))
            for local, hf in p.by_chunk.get(chunk, ()):
                items += _layer(spec, cfg, sizes, o, src, r, f"decoder.layers.{local}.",
                                f"{spec.layer_prefix}{hf}.", dense=hf < p.first_k, lora=lora)
            if chunk == p.last:
                items.append((p.final_norm, src.get(spec.final_norm)))
                if not cfg.tied:
                    items.append((OUTPUT_LAYER, apply_split(Split.COLUMN, [src.get(spec.lm_head)], sizes.tp, t)))
                elif sizes.pp > 1:  # a tied output layer off the first stage has its own copy (as MindSpeed writes it)
                    items.append((OUTPUT_LAYER, apply_split(Split.COLUMN, [src.get(spec.embedding)], sizes.tp, t)))
                for m in range(o.mtp_num_layers):
                    items += _mtp(spec, cfg, sizes, o, src, r, m, lora)
            tensors += [TargetTensor(group, name, node) for name, node in items]
        out[r] = tensors
    _declare_dropped(spec, cfg, sizes, o, src, p.hf_layers)
    return out


def _rows(spec: ModelSpec, cfg, dense: bool, o: McoreOptions) -> list[Row]:
    rows = spec.layer_rows(cfg, dense, o)
    if o.mla_key_names == "legacy":
        rows = [r.renamed(spec.legacy_names) for r in rows]
    return rows


def _factors(lora: LoraFactors | None, r: Row, sources: list[str], tp: int, t: int):
    """Rank ``t``'s ``(A, B)`` per target of ``r`` built from HF weights ``sources``, or None (not wrapped)."""
    pairs = [lora.factors(s) for s in sources] if lora is not None else []
    if not any(pairs):
        return None
    if not all(pairs):
        raise ValidationError(f"{', '.join(sources)}: LoRA factors on {sum(map(bool, pairs))} of the {len(pairs)} "
                              f"weights fused into {', '.join(r.targets)}; one PEFT module wraps all of them. "
                              f"The checkpoint is inconsistent: check that it was saved by one training run.")
    return split_factors(r, pairs, tp, t)


def _entries(name: str, node: Node, factors) -> list[tuple[str, Node]]:
    return [(name, node)] if factors is None else wrapped(name, node, *factors)


def _table(rows: list[Row], src: SourceTensors, tp: int, t: int, prefix: str, hf_prefix: str,
           lora: LoraFactors | None = None) -> list[tuple[str, Node]]:
    items = []
    for r in rows:
        names = [hf_prefix + s for s in r.sources]
        nodes = apply_row(r, [src.get(n) for n in names], tp, t)
        factors = _factors(lora, r, names, tp, t) or [None] * len(nodes)
        for target, node, f in zip(r.targets, nodes, factors):
            items += _entries(prefix + target, node, f)
    return items


def _layer(spec: ModelSpec, cfg, sizes, o, src, r: RankFile, prefix: str, hf_prefix: str,
           dense: bool, lora: LoraFactors | None = None) -> list[tuple[str, Node]]:
    items = _table(_rows(spec, cfg, dense, o), src, sizes.tp, r.tp_rank, prefix, hf_prefix, lora)
    if dense:
        return items
    experts, tpe, te = expert_slice(cfg.num_experts, sizes, o, r)
    fc1, fc2 = spec.expert_rows

    def piece(rule: Row, j: int) -> tuple[Node, tuple[Node, Node] | None]:
        names = [hf_prefix + n.format(j=j) for n in rule.sources]
        (node,) = apply_row(rule, [src.get(n) for n in names], tpe, te)
        factors = _factors(lora, rule, names, tpe, te)
        return node, factors[0] if factors else None

    if o.moe_grouped_gemm:
        for which, (rule, stack) in enumerate(((fc1, grouped_weight1), (fc2, grouped_weight2)), 1):
            got = [piece(rule, j) for j in experts]
            factors = [f for _, f in got]
            if any(factors) and not all(factors):
                raise ValidationError(f"{hf_prefix}mlp.experts: LoRA factors on some routed experts' "
                                      f"{rule.targets[0]} only; a grouped-GEMM stack wraps all its experts at once.")
            items += _entries(f"{prefix}mlp.experts.weight{which}", stack([n for n, _ in got]),
                              grouped_factors(factors, which) if all(factors) else None)
    else:
        for q, j in enumerate(experts):
            base = f"{prefix}mlp.experts.local_experts.{q}."
            items += _entries(base + fc1.targets[0], *piece(fc1, j))
            items += _entries(base + fc2.targets[0], *piece(fc2, j))
    return items


def _mtp(spec: ModelSpec, cfg, sizes, o, src, r: RankFile, m: int,
         lora: LoraFactors | None = None) -> list[tuple[str, Node]]:
    """MTP module m (HF layer num_hidden_layers + m), on the chunk of the final norm (spec §3.7)."""
    t = r.tp_rank
    hf_prefix = f"{spec.layer_prefix}{cfg.num_hidden_layers + m}."
    items = []
    if sizes.pp > 1:  # the MTP stage needs its own copy of the embedding
        items.append((EMBEDDING, apply_split(Split.COLUMN, [src.get(hf_prefix + spec.mtp_embedding)], sizes.tp, t)))
    items += _table(spec.mtp_rows(cfg), src, sizes.tp, t, f"mtp.layers.{m}.", hf_prefix, lora)
    items.append((f"mtp.final_layernorms.{m}.weight", src.get(hf_prefix + spec.mtp_final_norm)))
    items += _layer(spec, cfg, sizes, o, src, r, f"mtp.layers.{m}.transformer_layer.", hf_prefix, dense=False,
                    lora=lora)
    return items


def _declare_dropped(spec: ModelSpec, cfg, sizes, o, src: SourceTensors, hf_layers: list[int]) -> None:
    """Source tensors deliberately not converted, with the reason (coverage accounting, spec §3.8)."""
    used = set(hf_layers)
    for i in range(cfg.num_hidden_layers):
        if i not in used:
            why = ("--first-k-dense-replace skips this dense layer" if i < cfg.first_dense
                   else "beyond --num-layers")
            for t in spec.layer_tensors(cfg, i):
                src.drop(f"{spec.layer_prefix}{i}.{t.name}", why)
    for m in range(cfg.mtp_layers):
        prefix = f"{spec.layer_prefix}{cfg.num_hidden_layers + m}."
        if m >= o.mtp_num_layers:
            for t in spec.layer_tensors(cfg, cfg.num_hidden_layers + m):
                src.drop(prefix + t.name, f"MTP layer {m} not requested (--mtp-num-layers {o.mtp_num_layers})")
            continue
        src.drop(prefix + spec.mtp_head, "copy of lm_head; MTP uses output_layer (spec §3.7)")
        if sizes.pp == 1:
            src.drop(prefix + spec.mtp_embedding, "copy of model.embed_tokens; with PP 1 the MTP shares "
                                                  "the stage's embedding (spec §3.7)")


# --- mcore -> HF (spec §7): the same rows read backwards --------------------------------------------------------------

class RankTensors(Protocol):
    """What the inverse needs from an mcore checkpoint: one rank file's tensor as a graph node."""

    def get(self, rank: RankFile, group: str, name: str) -> Node:
        ...


def output_config(spec: ModelSpec, cfg, sizes: ParallelSizes, o: McoreOptions):
    """The config of the HF checkpoint mcore -> HF writes: output layer i is the i-th real slot, so a checkpoint
    converted with ``--num-layers`` or a lower ``--first-k-dense-replace`` comes back as a smaller, valid
    model.  Returns ``(config, config.json fields that changed)``."""
    return _output_config(spec, cfg, placement(spec, cfg, sizes, o))


def _output_config(spec: ModelSpec, cfg, p: Placement):
    out = spec.resized(cfg, num_hidden_layers=len(p.hf_layers), first_dense=p.first_k, mtp_layers=p.mtp_layers)
    return out, spec.layer_fields(out)


def build_hf_tensors(spec: ModelSpec, cfg, sizes: ParallelSizes, o: McoreOptions,
                     src: RankTensors) -> dict[str, Node]:
    """Every HF tensor of the checkpoint the mcore layout holds, in HF order, as nodes over ``src``.

    Tensors held by several rank files (replicas across TP or EP) are read from the first file that holds
    them; the planner can check the other copies."""
    p = placement(spec, cfg, sizes, o)
    holder: dict[tuple[int, int], RankFile] = {}  # (pp, tp) -> first rank file of that stage and TP rank
    for r in p.ranks:
        holder.setdefault((r.pp_rank, r.tp_rank), r)

    def pieces(chunk: Chunk, name: str) -> list[Node]:
        pp, group = chunk
        return [src.get(holder[(pp, t)], group, name) for t in range(sizes.tp)]

    out: dict[str, Node] = {}
    (out[spec.embedding],) = merge_split(Split.COLUMN, pieces(p.first, EMBEDDING))
    for i, hf in enumerate(p.hf_layers):
        chunk, local = p.slot_of(hf)
        out.update(_unlayer(spec, cfg, sizes, o, src, p, chunk, pieces, f"decoder.layers.{local}.", hf,
                            f"{spec.layer_prefix}{i}.", dense=hf < p.first_k))
    (out[spec.final_norm],) = merge_split(Split.REPLICATED, pieces(p.last, p.final_norm))
    if not cfg.tied:
        (out[spec.lm_head],) = merge_split(Split.COLUMN, pieces(p.last, OUTPUT_LAYER))
    for m in range(o.mtp_num_layers):
        hf = cfg.num_hidden_layers + m
        hf_prefix = f"{spec.layer_prefix}{len(p.hf_layers) + m}."
        prefix = f"mtp.layers.{m}."
        out.update(_unlayer(spec, cfg, sizes, o, src, p, p.last, pieces, prefix + "transformer_layer.", hf,
                            hf_prefix, dense=False))
        if sizes.pp > 1:  # the MTP stage's own copy of the embedding
            (out[hf_prefix + spec.mtp_embedding],) = merge_split(Split.COLUMN, pieces(p.last, EMBEDDING))
        else:             # PP 1: the MTP module shares the stage's embedding
            out[hf_prefix + spec.mtp_embedding] = out[spec.embedding]
        out.update(_untable(spec.mtp_rows(cfg), lambda name: pieces(p.last, name), prefix, hf_prefix,
                            _shapes(spec, cfg, hf)))
        (out[hf_prefix + spec.mtp_final_norm],) = merge_split(
            Split.REPLICATED, pieces(p.last, f"mtp.final_layernorms.{m}.weight"))
        out[hf_prefix + spec.mtp_head] = out[spec.lm_head]  # the release stores lm_head again
    renumbered, _ = _output_config(spec, cfg, p)
    order = {name: k for k, name in enumerate(spec.export_order(renumbered))}
    return dict(sorted(out.items(), key=lambda kv: order[kv[0]]))


def _shapes(spec: ModelSpec, cfg, hf_layer: int) -> dict[str, tuple[int, ...]]:
    return {t.name: t.shape for t in spec.layer_tensors(cfg, hf_layer)}


def _untable(rows: list[Row], pieces_of: Callable[[str], list[Node]], prefix: str, hf_prefix: str,
             shapes: dict[str, tuple[int, ...]]) -> dict[str, Node]:
    got = {}
    for r in rows:
        merged = merge_row(r, [pieces_of(prefix + target) for target in r.targets],
                           tuple(shapes[s][0] for s in r.sources))
        got.update(zip([hf_prefix + s for s in r.sources], merged))
    return got


def _unlayer(spec: ModelSpec, cfg, sizes, o, src: RankTensors, p: Placement, chunk: Chunk, pieces, prefix: str,
             hf: int, hf_prefix: str, dense: bool) -> dict[str, Node]:
    """Inverse of :func:`_layer`: one transformer layer's HF tensors (HF layer ``hf`` of the source model,
    written as ``hf_prefix``) from the rank files of ``chunk``."""
    pp, group = chunk
    out = _untable(_rows(spec, cfg, dense, o), lambda name: pieces(chunk, name), prefix, hf_prefix,
                   _shapes(spec, cfg, hf))
    if dense:
        return out
    fc1: dict[int, dict[int, Node]] = defaultdict(dict)  # expert -> expert-TP rank -> piece
    fc2: dict[int, dict[int, Node]] = defaultdict(dict)
    rule1, rule2 = spec.expert_rows
    for r in p.ranks:
        if r.pp_rank != pp:
            continue
        experts, tpe, te = expert_slice(cfg.num_experts, sizes, o, r)
        if o.moe_grouped_gemm:
            w1 = ungroup_weight1(src.get(r, group, prefix + "mlp.experts.weight1"), len(experts))
            w2 = ungroup_weight2(src.get(r, group, prefix + "mlp.experts.weight2"), len(experts))
        else:
            base = prefix + "mlp.experts.local_experts.{q}."
            w1 = [src.get(r, group, base.format(q=q) + rule1.targets[0]) for q in range(len(experts))]
            w2 = [src.get(r, group, base.format(q=q) + rule2.targets[0]) for q in range(len(experts))]
        for q, j in enumerate(experts):  # several files can hold the same slice (ETP 1): keep the first
            fc1[j].setdefault(te, w1[q])
            fc2[j].setdefault(te, w2[q])
    for j in range(cfg.num_experts):
        for rule, got in ((rule1, fc1[j]), (rule2, fc2[j])):
            merged = merge_row(rule, [[got[t] for t in range(len(got))]])
            out.update(zip([hf_prefix + n.format(j=j) for n in rule.sources], merged))
    return out


def output_to_source_layer(spec: ModelSpec, cfg, sizes: ParallelSizes, o: McoreOptions) -> Callable[[str], str]:
    """``name -> name``: an output HF tensor's name in the HF checkpoint the mcore one was converted from
    (output layers are renumbered densely, see :func:`output_config`)."""
    p = placement(spec, cfg, sizes, o)
    source = list(p.hf_layers) + [cfg.num_hidden_layers + m for m in range(o.mtp_num_layers)]

    def rename(name: str) -> str:
        layer = spec.layer_of(name)
        if layer is None:
            return name
        rest = name[len(spec.layer_prefix):].split(".", 1)[1]
        return f"{spec.layer_prefix}{source[layer]}.{rest}"

    return rename
