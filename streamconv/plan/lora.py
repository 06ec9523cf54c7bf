"""LoRA and QLoRA checkpoints on the mcore side (spec §5, §6): which LoRA factors every rank file holds, the
merge of each rank piece, and NF4-quantized base weights.

A *module* is one LoRA-wrapped weight of one rank file:

* linear: base ``X.weight`` [out, in] with ``X.lora_A.default.weight`` [r, in] and ``X.lora_B.default.weight``
  [out, r] (also ``lora_a``/``lora_b`` and the names without ``.default``); a checkpoint holding base and LoRA
  together (merge type 1) stores the base as ``X.base_layer.weight``;
* grouped GEMM: ``...mlp.experts.weight1`` / ``weight2`` with ``weight1_lora_a``/``_b`` and ``weight2_lora_a``/``_b``
  (the base keeps its name).

What is expected comes from the base layout the forward tables give (:func:`plan.mcore2hf._expected_layout`):
every 2-D weight whose module name is a target (``--lora-target-modules``, Megatron names; GEMM stacks count as
``linear_fc1``/``linear_fc2``) must carry both factors, shaped by the base piece and r.  Targets default to the
names found in the checkpoint, so a checkpoint with LoRA on some layers but not others is refused, as PEFT
never produces one.  Everything is checked before anything is written, in one error.

The merge (:class:`MergedRanks`) wraps each rank piece: ``merge_lora(W, B, A)`` for a linear weight, per local
expert ``merge_lora(W_q, a_q, b_q)`` on the [n, H, -1] / [n, -1, H] views of a GEMM stack.  Pieces are merged
before the inverse tables gather them across TP, as the reference does, which is valid because each rank's
factors are the ones of its own piece (``mapping.lora``).

An NF4 base weight (``hf2mcore --qlora-nf4``, or a QLoRA checkpoint) is recognised by its five state entries
(``K.absmax`` ... ``K.quant_state.bitsandbytes__nf4``; all or none) and dequantized in the graph (``nf4_scales``
then ``nf4_dequant``).  In a QLoRA training checkpoint (type 1) K is the stored name, ``X.base_layer.weight``,
with the entries under it (``X.base_layer.weight.absmax``), as MindSpeed's QLoRA saves a wrapped linear.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field

from ..errors import ValidationError
from ..graph.lora_ops import merge_lora, nf4_dequant, nf4_scales
from ..graph.node import Node, cat, slice_, view
from ..layout.parallel import RankFile
from ..layout.placement import expert_slice
from ..mapping.assemble import EMBEDDING, OUTPUT_LAYER, placement
from .mcore_source import FLOAT_DTYPES, Expect, McoreSource

EXPORT_LAYOUTS = ("peft", "peft-fused", "mindspeed")
NF4_LAYOUTS = ("npu", "cuda")
NF4_JSON = ".quant_state.bitsandbytes__nf4"
NF4_TABLES = (".quant_map", ".nested_quant_map")
NF4_STATE = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", NF4_JSON)   # spec §6.1, after K
GEMM_TARGETS = {"weight1": "linear_fc1", "weight2": "linear_fc2"}   # MindSpeed targets GEMM stacks by these

_LINEAR = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[ABab])(?:\.default)?\.weight$")
_GEMM = re.compile(r"^(?P<base>(?:.*\.)?experts\.weight[12])_lora_(?P<factor>[ab])$")


@dataclass(frozen=True)
class LoraOptions:
    """MindSpeed's LoRA flags of mcore2hf (spec §7.1), and streamconv's export and NF4 choices."""

    r: int | None = None                         # --lora-r
    alpha: str | None = None                     # --lora-alpha, as written (scale = alpha / r)
    target_modules: tuple[str, ...] | None = None  # --lora-target-modules (Megatron names); None: as found
    load: str | None = None                      # --lora-load: a LoRA-only checkpoint (merge type 2)
    save_to_hf: bool = False                     # --save-lora-to-hf: export the adapter, no merge
    export_layout: str = "peft"                  # --lora-export-layout
    nf4_layout: str | None = None                # --nf4-layout of NF4 base weights (None: recorded, else npu)

    def problems(self) -> list[str]:
        out = []
        if self.r is not None and self.r < 1:
            out.append(f"--lora-r {self.r}: expected a positive integer.")
        if self.alpha is not None:
            try:
                ok = math.isfinite(float(self.alpha))
            except ValueError:
                ok = False
            if not ok:
                out.append(f"--lora-alpha {self.alpha!r}: expected a number (training's lora_alpha).")
        if self.export_layout not in EXPORT_LAYOUTS:
            out.append(f"--lora-export-layout {self.export_layout!r}: expected one of {', '.join(EXPORT_LAYOUTS)}.")
        if self.nf4_layout not in (None,) + NF4_LAYOUTS:
            out.append(f"--nf4-layout {self.nf4_layout!r}: expected npu or cuda.")
        if self.save_to_hf and (self.r is None or self.alpha is None):
            out.append("--save-lora-to-hf needs --lora-r and --lora-alpha (the adapter config records them).")
        return out


@dataclass(frozen=True)
class Module:
    """The LoRA factors of one base weight of one rank file (stored names)."""

    kind: str         # "linear", "weight1" or "weight2"
    a: str            # linear: lora_A; GEMM: weightN_lora_a
    b: str
    experts: int = 0  # GEMM: local experts in the stack


@dataclass(frozen=True)
class NF4Weight:
    """A base weight stored as bitsandbytes NF4 under ``stored`` (its five state entries next to it)."""

    stored: str
    blocksize: int
    nested_blocksize: int
    dtype: str
    state_bytes: int


def module_name(key: str) -> str:
    """``decoder.layers.0.self_attention.linear_qkv.weight`` -> ``linear_qkv``; GEMM stacks -> ``linear_fc1/2``."""
    name = key.removesuffix(".weight").rsplit(".", 1)[-1]
    return GEMM_TARGETS.get(name, name)


def parse_factor(name: str) -> tuple[str, str] | None:
    """``(base key, "A" or "B")`` of a LoRA factor key (GEMM: ``a``/``b`` -> "A"/"B"), or None."""
    m = _GEMM.match(name) or _LINEAR.match(name)
    if m is None:
        return None
    base = m["base"] if "base" in m.groupdict() else m["module"] + ".weight"
    return base, m["factor"].upper()


def is_lora_key(name: str) -> bool:
    """MindSpeed's ``--lora-ckpt-filter`` rule (a key containing ``lora``), minus Transformer Engine state."""
    return "lora" in name.lower() and not name.endswith("_extra_state")


def factor_kind(key: str) -> str:
    """``weight1``/``weight2`` for a grouped-GEMM stack, else ``linear``."""
    return "weight1" if key.endswith("experts.weight1") else "weight2" if key.endswith("experts.weight2") else "linear"


def factor_shapes(kind: str, base: tuple[int, ...], r: int, experts: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Expected shapes of (A-side, B-side) factors of a base piece (spec §5.1)."""
    if kind == "linear":
        rows, cols = base
        return (r, cols), (rows, r)
    if kind == "weight1":   # [H, n*C]
        h, nc = base
        return (h, r * experts), (r, nc)
    nf, h = base            # weight2 [n*F, H]
    return (nf, r), (r * experts, h)


@dataclass
class Inventory:
    """Where everything of an mcore checkpoint with LoRA (and NF4) is, per rank file."""

    main: McoreSource
    lora: McoreSource | None                   # where the factors are: main (type 1), --lora-load (type 2)
    r: int = 0
    targets: tuple[str, ...] = ()
    modules: dict[RankFile, dict[tuple[str, str], Module]] = field(default_factory=lambda: defaultdict(dict))
    stored: dict[RankFile, dict[tuple[str, str], str]] = field(default_factory=lambda: defaultdict(dict))
    nf4: dict[RankFile, dict[tuple[str, str], NF4Weight]] = field(default_factory=lambda: defaultdict(dict))

    def stored_name(self, r: RankFile, group: str, name: str) -> str:
        return self.stored[r].get((group, name), name)

    def factor_expect(self, expected) -> dict[RankFile, dict[tuple[str, str], Expect]]:
        """The factor keys of every rank file with their shapes (for the LoRA checkpoint's own check)."""
        out = {}
        for r, mods in self.modules.items():
            keys = {}
            for (g, name), m in mods.items():
                a, b = factor_shapes(m.kind, expected[r][(g, name)], self.r, m.experts)
                keys[(g, m.a)], keys[(g, m.b)] = Expect(a), Expect(b)
            out[r] = keys
        return out

    def main_expect(self, expected) -> dict[RankFile, dict[tuple[str, str], tuple | Expect]]:
        """What the --load-dir rank files must hold: the base keys as stored (renamed, NF4 state entries), and
        the factors when they are in the same files (type 1)."""
        out = {}
        factors = self.factor_expect(expected) if self.lora is self.main else {}
        for r, want in expected.items():
            keys: dict = {}
            for (g, name), shape in want.items():
                s = self.stored_name(r, g, name)
                q = self.nf4[r].get((g, name))
                if q is None:
                    keys[(g, s)] = shape
                    continue
                n = math.prod(shape)
                blocks = -(-n // q.blocksize)
                keys[(g, s)] = Expect((n // 2, 1), ("uint8",))
                keys[(g, s + ".absmax")] = Expect((blocks,), ("uint8",))
                keys[(g, s + ".quant_map")] = Expect((16,), ("float32",))
                keys[(g, s + ".nested_absmax")] = Expect((-(-blocks // q.nested_blocksize),), ("float32",))
                keys[(g, s + ".nested_quant_map")] = Expect((256,), ("float32",))
                keys[(g, s + NF4_JSON)] = Expect((q.state_bytes,), ("uint8",))
            keys.update(factors.get(r, {}))
            out[r] = keys
        return out


def build_inventory(spec, cfg, sizes, o, expected, main: McoreSource, lora_src: McoreSource | None,
                    opts: LoraOptions, *, nf4: bool = True) -> Inventory:
    """Find and check every LoRA factor (and NF4 weight) against the base layout ``expected``; raise once."""
    holder = lora_src or main
    inv = Inventory(main, holder, r=opts.r or 0)
    problems = list(opts.problems())
    found: dict[RankFile, dict[tuple[str, str], dict[str, str]]] = defaultdict(dict)
    for r, keys in holder.tensors.items():
        for g, n in keys:
            if not is_lora_key(n) or ".base_layer." in n:
                continue
            parsed = parse_factor(n)
            if parsed is None:
                problems.append(f"{holder.path(r)}: {g}.{n} is not a LoRA factor streamconv knows (expected "
                                f"<module>.lora_A.default.weight / lora_B, or grouped-GEMM weight1_lora_a ...).")
                continue
            slot = found[r].setdefault((g, parsed[0]), {})
            if parsed[1] in slot:
                problems.append(f"{holder.path(r)}: {g}.{n} and {g}.{slot[parsed[1]]} are both LoRA factor "
                                f"{parsed[1]} of {parsed[0]}; keep one.")
            slot[parsed[1]] = n
    if problems:
        raise ValidationError(problems)
    where = lora_src.root if lora_src else main.root
    if not any(found.values()):
        if opts.r is not None or opts.alpha is not None or opts.save_to_hf or lora_src is not None:
            raise ValidationError(f"{where}: holds no LoRA factors (keys with lora_A/lora_B or weight1_lora_a). "
                                  f"Drop --lora-r/--lora-alpha/--save-lora-to-hf, or pass --lora-load DIR, the "
                                  f"LoRA-only checkpoint.")
        if nf4:
            _find_nf4(inv, expected, opts, problems)
        if problems:
            raise ValidationError(problems)
        return inv
    if opts.r is None or opts.alpha is None:
        example = next(f"{g}.{n}" for slots in found.values() for (g, _), s in slots.items() for n in s.values())
        raise ValidationError(f"{where}: holds LoRA factors ({example}, ...). Pass --lora-r and --lora-alpha of "
                              f"training to merge them into the base (or --save-lora-to-hf to export the adapter).")

    candidates = {module_name(n) for want in expected.values() for (_, n), shape in want.items()
                  if len(shape) == 2 and n not in (EMBEDDING, OUTPUT_LAYER)}
    targets = opts.target_modules or tuple(sorted({module_name(b) for slots in found.values() for _, b in slots}))
    unknown = sorted(set(targets) - candidates)
    if unknown:
        raise ValidationError(f"--lora-target-modules {' '.join(unknown)}: no such weight in this layout (LoRA "
                              f"targets here: {', '.join(sorted(candidates))}).")
    inv.targets = tuple(targets)
    experts = {r: len(expert_slice(cfg.num_experts, sizes, o, r)[0]) for r in placement(spec, cfg, sizes, o).ranks}
    for r, want in expected.items():
        path = holder.path(r)
        mine = found.get(r, {})
        for (g, name), shape in want.items():
            if len(shape) != 2 or name in (EMBEDDING, OUTPUT_LAYER) or module_name(name) not in targets:
                continue
            kind = factor_kind(name)
            slot = mine.pop((g, name), {})
            missing = [f for f in "AB" if f not in slot]
            if missing:
                problems.append(f"{path}: {g}.{name} has no LoRA factor {'/'.join(missing)} (--lora-target-modules "
                                f"includes {module_name(name)}). Pass the target modules of training.")
                continue
            m = Module(kind, slot["A"], slot["B"], experts[r] if kind != "linear" else 0)
            want_a, want_b = factor_shapes(kind, shape, opts.r, m.experts)
            for key, want_shape in ((m.a, want_a), (m.b, want_b)):
                got = holder.tensors[r][(g, key)].shape
                if tuple(got) != want_shape:
                    problems.append(f"{path}: {g}.{key} has shape {list(got)} (expected {list(want_shape)} for "
                                    f"--lora-r {opts.r} and the base {list(shape)}). Pass training's --lora-r, or "
                                    f"check the parallel sizes.")
            inv.modules[r][(g, name)] = m
            if kind == "linear" and lora_src is None and not opts.save_to_hf:
                _check_base_layer(inv, r, g, name, problems)
        for (g, base), slot in sorted(mine.items()):
            keys = ", ".join(f"{g}.{k}" for k in sorted(slot.values()))
            problems.append(f"{path}: {keys}: LoRA factor(s) of {base}, which "
                            + ("is not a LoRA target (--lora-target-modules)." if (g, base) in want
                               else "matches no base weight of this layout. " + (
                                   "--lora-load must be the LoRA-only checkpoint of this base, with its layout."
                                   if lora_src else "Check the layout flags.")))
    if nf4 and not opts.save_to_hf:
        _find_nf4(inv, expected, opts, problems)
    if problems:
        raise ValidationError(problems)
    return inv


def _check_base_layer(inv: Inventory, r: RankFile, g: str, name: str, problems: list[str]) -> None:
    """Merge type 1: the base of a LoRA-wrapped linear is ``X.base_layer.weight`` (spec §5.1)."""
    stored = name[: -len(".weight")] + ".base_layer.weight"
    if inv.main.has(r, g, stored):
        inv.stored[r][(g, name)] = stored
        if inv.main.has(r, g, name):
            problems.append(f"{inv.main.path(r)}: {g}.{name} and {g}.{stored} are both present; a PEFT checkpoint "
                            f"holds only the base_layer one.")
    elif not inv.main.has(r, g, name):
        problems.append(f"{inv.main.path(r)}: {g}.{stored} missing (the base weight of a LoRA module). Pass "
                        f"--lora-load DIR when --load-dir is the base checkpoint and the LoRA is separate.")


def _find_nf4(inv: Inventory, expected, opts: LoraOptions, problems: list[str]) -> None:
    """Base weights stored in NF4: their quant state read and checked (shape, dtype, double quantization)."""
    for r, want in expected.items():
        for (g, name), shape in want.items():
            if len(shape) != 2:
                continue
            s = inv.stored_name(r, g, name)
            present = [e for e in NF4_STATE if inv.main.has(r, g, s + e)]
            if not present:
                continue
            if len(present) < len(NF4_STATE):
                missing = ", ".join(f"{g}.{s}{e}" for e in NF4_STATE if e not in present)
                problems.append(f"{inv.main.path(r)}: {missing} missing, though {g}.{s} has the rest of an NF4 "
                                f"quant state ({', '.join(present)}); bitsandbytes saves all five entries. Save the "
                                f"checkpoint again, or convert the base again (hf2mcore --qlora-nf4).")
                continue
            where = f"{inv.main.path(r)}: {g}.{s}{NF4_JSON}"
            try:
                meta = json.loads(inv.main.read_bytes(r, g, s + NF4_JSON).decode("utf-8"))
                blocksize, nested = int(meta["blocksize"]), int(meta["nested_blocksize"])
                ok = (meta.get("quant_type") == "nf4" and list(meta["shape"]) == list(shape)
                      and meta["dtype"] in FLOAT_DTYPES and blocksize > 1 and blocksize % 2 == 0 and nested > 0
                      and math.prod(shape) % 2 == 0 and "nested_offset" in meta)
            except (ValueError, KeyError, TypeError, UnicodeDecodeError):
                ok = False
                meta = {}
            if not ok:
                problems.append(f"{where}: not the state of a double-quantized NF4 weight of shape {list(shape)} "
                                f"(got {json.dumps(meta)[:160]}). Re-quantize with bitsandbytes' defaults "
                                f"(nf4, compress_statistics) or convert the base again.")
                continue
            size = inv.main.tensors[r][(g, s + NF4_JSON)].shape
            inv.nf4[r][(g, name)] = NF4Weight(s, blocksize, nested, meta["dtype"], size[0] if size else 0)


class MergedRanks:
    """:class:`~streamconv.mapping.assemble.RankTensors` over an :class:`Inventory`: each rank piece as its
    base dtype (NF4 dequantized), with its LoRA merged."""

    def __init__(self, inv: Inventory, alpha: str | None, r: int | None, expected, nf4_layout: str):
        self.inv, self.alpha, self.r, self.expected, self.nf4_layout = inv, alpha, r, expected, nf4_layout

    def stored(self, rank: RankFile, group: str, name: str) -> Node:
        """The base as stored (the packed codes of an NF4 weight): what replica checks compare."""
        return self.inv.main.get(rank, group, self.inv.stored_name(rank, group, name))

    def base(self, rank: RankFile, group: str, name: str) -> Node:
        q = self.inv.nf4[rank].get((group, name))
        node = self.stored(rank, group, name)
        if q is None:
            return node
        get = self.inv.main.get
        s = q.stored
        scales = nf4_scales(get(rank, group, s + ".absmax"), get(rank, group, s + ".nested_absmax"),
                            get(rank, group, s + ".nested_quant_map"), get(rank, group, s + NF4_JSON),
                            nested_blocksize=q.nested_blocksize)
        cols = self.expected[rank][(group, name)][1]
        return nf4_dequant(node, scales, get(rank, group, s + ".quant_map"), blocksize=q.blocksize, cols=cols,
                           layout=self.nf4_layout, dtype=q.dtype)

    def get(self, rank: RankFile, group: str, name: str) -> Node:
        node = self.base(rank, group, name)
        m = self.inv.modules[rank].get((group, name))
        if m is None:
            return node
        a, b = self.inv.lora.get(rank, group, m.a), self.inv.lora.get(rank, group, m.b)
        if m.kind == "linear":
            return merge_lora(node, b, a, alpha=self.alpha, rank=self.r)
        return merge_gemm(node, a, b, m.kind, m.experts, alpha=self.alpha, rank=self.r)


def merge_gemm(w: Node, lora_a: Node, lora_b: Node, kind: str, n: int, *, alpha: str, rank: int) -> Node:
    """A grouped-GEMM stack with each local expert's ``a_q @ b_q`` merged (spec §5.2: views [n, H, -1] and
    [n, -1, H]); the result has the stack's shape and memory order."""
    if kind == "weight1":    # [H, n*C], memory [n, H, C]
        h, nc = w.shape
        c = nc // n
        stacked, a, b = view(w, (n * h, c)), view(lora_a, (n * h, rank)), view(lora_b, (n * rank, c))
        parts = [merge_lora(slice_(stacked, (q * h, 0), (h, c)), slice_(a, (q * h, 0), (h, rank)),
                            slice_(b, (q * rank, 0), (rank, c)), alpha=alpha, rank=rank) for q in range(n)]
        return view(cat(parts, 0), (h, nc))
    nf, h = w.shape           # [n*F, H]
    f = nf // n
    return cat([merge_lora(slice_(w, (q * f, 0), (f, h)), slice_(lora_a, (q * f, 0), (f, rank)),
                           slice_(lora_b, (q * rank, 0), (rank, h)), alpha=alpha, rank=rank) for q in range(n)], 0)
