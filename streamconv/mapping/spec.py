"""What a model family is, to the rest of streamconv: a :class:`ModelSpec`.

A spec is data plus small pure functions, written once per family in ``streamconv/models/<family>.py`` and
registered there (``register_model``).  It says:

- how to read the family's config.json (:meth:`ModelSpec.parse_config`) into a frozen config that exposes the
  generic sizes of :class:`ModelConfig`;
- every HF tensor, with its shape and kind (:class:`HFTensor`): the HF table.  The kind says which tensors a
  quantized release stores in the block FP8 scheme (:class:`BlockQuant`), which stay float32, and how the
  generator makes its values;
- the mcore rows of a decoder layer (:class:`~streamconv.mapping.rules.Row`: mcore names, HF names, split
  rule), the routed-expert rows, the MTP rows, naming variants as table deltas;
- the companion files an HF export copies, and the config.json fields that count layers.

Everything generic (placement over PP/VPP/dualpipev, expert slicing, the loops over ranks, the inverse) is in
:mod:`streamconv.mapping.assemble`, which is handed a spec.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from enum import Enum
from functools import lru_cache
from typing import Protocol

from ..errors import ValidationError
from ..layout.options import McoreOptions, ModelFacts
from ..layout.parallel import ParallelSizes
from .rules import Row, Split, row


class TensorKind(str, Enum):
    LINEAR = "linear"   # a 2-D linear weight: block FP8 with a scale grid in a quantized release
    PLAIN = "plain"     # bf16, never quantized (embeddings, router, projections the release keeps in bf16)
    NORM = "norm"       # a norm's weight (bf16)
    BIAS = "bias"       # kept in float32 (a router's score-correction bias)


@dataclass(frozen=True)
class HFTensor:
    """One tensor of an HF checkpoint of the family.  ``copy_of``: the release stores the same values twice
    (an MTP layer's embedding and head)."""

    name: str
    shape: tuple[int, ...]
    kind: TensorKind
    copy_of: str | None = None

    @property
    def dtype(self) -> str:
        """The logical dtype (after dequantization)."""
        return "float32" if self.kind is TensorKind.BIAS else "bfloat16"


@dataclass(frozen=True)
class BlockQuant:
    """A block-scaled FP8 storage scheme: a weight of shape [M, N] stored in one of ``dtypes`` with a float32
    ``<name><scale_suffix>`` grid of ``[ceil(M / br), ceil(N / bc)]``, ``block = (br, bc)``;
    ``w = logical_dtype(float32(q) * scale[r // br, c // bc])``.  ``config`` is the config.json
    ``quantization_config`` that announces it."""

    block: tuple[int, int]
    scale_suffix: str
    dtypes: tuple[str, ...]
    logical_dtype: str
    config: tuple[tuple[str, object], ...]

    @property
    def config_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.config}

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, int]:
        br, bc = self.block
        return (-(-shape[0] // br), -(-shape[1] // bc))

    def describes(self, quantization_config: dict) -> bool:
        """Whether a config.json's ``quantization_config`` announces this scheme (method and block size)."""
        mine = self.config_dict
        return (quantization_config.get("quant_method") == mine["quant_method"]
                and list(quantization_config.get("weight_block_size", mine["weight_block_size"]))
                == list(mine["weight_block_size"]))

    def announced_by(self, obj: dict, path: str) -> bool:
        """Whether config.json ``obj`` announces this scheme: False without a ``quantization_config`` of its
        method; a ValidationError when it names the method with another block size (a format we cannot read)."""
        q = obj.get("quantization_config") or {}
        if not isinstance(q, dict) or q.get("quant_method") != self.config_dict["quant_method"]:
            return False
        if not self.describes(q):
            raise ValidationError(f"{path}: quantization_config.weight_block_size {q.get('weight_block_size')} "
                                  f"(expected {list(self.block)}); only the {self.block[0]}x{self.block[1]} block "
                                  f"format is supported.")
        return True


class ModelConfig(Protocol):
    """The generic sizes every family's config exposes (its own fields keep their config.json names)."""

    hidden_size: int
    vocab_size: int
    num_hidden_layers: int
    fp8: bool

    @property
    def num_experts(self) -> int: ...

    @property
    def first_dense(self) -> int: ...       # leading dense layers (0 when every layer is MoE)

    @property
    def mtp_layers(self) -> int: ...        # MTP modules stored after the decoder layers

    @property
    def tied(self) -> bool: ...             # output layer shares the embedding (no lm_head in HF)


MAX_INT = 1 << 20   # no dimension of a real model is larger (vocabularies are ~2**18)
MAX_EXPERT_LAYERS = 1 << 17   # layers x experts: the HF table holds 3 tensors per expert and layer

# Small files of an HF model directory that make an export load as is (copied from --hf-config).
COMPANIONS = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class ModelSpec:
    """A model family (see the module docstring).  Subclass, fill the class attributes, implement the methods
    marked "family", and ``register_model(MySpec())``.

    Names: HF tensor names are full names (``model.layers.3.self_attn.o_proj.weight``) in the HF table and
    suffixes (``self_attn.o_proj.weight``) in rows; mcore names in rows are suffixes under the layer prefix
    (``decoder.layers.{local}.``, ``mtp.layers.{m}.transformer_layer.``).
    """

    name: str = ""                          # the registry key: the canonical HF model_type
    title: str = ""                         # how messages name the family
    model_types: tuple[str, ...] = ()       # config.json model_type values of the family
    mindspeed_names: tuple[str, ...] = ()   # MindSpeed-LLM --model-type-hf names
    quant: BlockQuant | None = None         # the FP8 scheme of its quantized releases
    companions: tuple[str, ...] = COMPANIONS
    presets: dict = {}                      # generator starting shapes by name ("tiny", "671b") -> config
    config_class: type = object             # the family's frozen config dataclass
    zero_ok: frozenset[str] = frozenset()   # integer config fields that may be 0 (all others must be positive)
    limits: dict[str, int] = {}             # upper bounds of integer config fields beyond any real model
    variants: frozenset[str] = frozenset()  # layout options the family accepts beyond the generic ones
    legacy_names: dict[str, str] = {}       # --mla-key-names legacy: mcore suffix -> old suffix
    experts_field: str = "n_routed_experts"  # the config.json field counting routed experts (messages)
    # HF names of the model-level tensors and the MTP module parts (Megatron's names are fixed).
    embedding: str = "model.embed_tokens.weight"
    final_norm: str = "model.norm.weight"
    lm_head: str = "lm_head.weight"
    layer_prefix: str = "model.layers."
    mtp_embedding: str = "embed_tokens.weight"
    mtp_final_norm: str = "shared_head.norm.weight"
    mtp_head: str = "shared_head.head.weight"
    # QLoRA (``--qlora-nf4``): the mcore weights stored in bitsandbytes NF4, by module name (the name component
    # before ``.weight``; ``weight1``/``weight2`` for grouped-GEMM experts).  Embeddings, norms, routers stay.
    qlora_modules: frozenset[str] = frozenset({"linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "weight1",
                                               "weight2", "output_layer"})
    # transformers >= 5 stores the routed experts of a layer fused, as these two parameters (gate and up stacked
    # [experts, 2F, H]; down [experts, H, F]): a LoRA adapter for them names them in ``target_parameters``.
    # None: the family's transformers model keeps one module per expert.
    hf_fused_experts: tuple[str, str] | None = None
    # Routed expert j (``{j}``), per rank slice of the expert tensor-parallel group.  The targets name the
    # local-expert keys (``mlp.experts.local_experts.{q}.<target>``).
    expert_rows: tuple[Row, Row] = (
        row("linear_fc1.weight", ("mlp.experts.{j}.gate_proj.weight", "mlp.experts.{j}.up_proj.weight"),
            Split.GATED_COLUMN),
        row("linear_fc2.weight", "mlp.experts.{j}.down_proj.weight", Split.ROW),
    )

    # --- family ----------------------------------------------------------------------------------------------
    def config_from_json(self, obj: dict, path: str) -> ModelConfig:
        """The config from config.json's object (fields present and of the right type; one ValidationError
        listing every bad field).  Ranges are :meth:`check_config`'s."""
        raise NotImplementedError

    def relations(self, cfg) -> list[tuple[str, str]]:
        """Family rules between fields: ``(field, what is wrong and the fix)`` for each broken one."""
        return []

    def layer_tensors(self, cfg, layer: int) -> list[HFTensor]:
        """HF layer ``layer``'s tensors (names relative to the layer prefix), in release order; layers from
        ``num_hidden_layers`` on are MTP modules."""
        raise NotImplementedError

    def layer_rows(self, cfg, dense: bool, o: McoreOptions) -> list[Row]:
        """The mcore rows of a decoder layer other than its routed experts, in key order, with the naming
        variants of ``o`` applied."""
        raise NotImplementedError

    def mtp_rows(self, cfg) -> list[Row]:
        """Rows of an MTP module besides its transformer layer (under ``mtp.layers.{m}.``)."""
        return []

    def divisible(self, cfg, sizes: ParallelSizes, o: McoreOptions) -> list:
        """:class:`~streamconv.layout.options.Divisible` sizes: what TP, the expert TP size
        (:func:`~streamconv.layout.placement.expert_tp_size`) and EP must divide."""
        raise NotImplementedError

    def resized(self, cfg, **sizes):
        """``cfg`` with other layer or expert counts (``num_hidden_layers=...``), for renumbered exports and the
        generator."""
        raise NotImplementedError

    def layer_fields(self, cfg) -> dict[str, int]:
        """The config.json fields that count layers (an export with fewer layers rewrites them)."""
        return {"num_hidden_layers": cfg.num_hidden_layers}

    def config_json(self, cfg) -> dict:
        """A complete config.json for ``cfg`` (the generator writes it; transformers must load it)."""
        raise NotImplementedError

    def mindspeed_args(self, cfg) -> dict:
        """The model fields of the ``args`` namespace MindSpeed-LLM's generic converter pickles into each rank
        file and its mg -> hf reads back (spec ``mindspeed_v2_families.md``, "args")."""
        raise NotImplementedError

    # --- derived ---------------------------------------------------------------------------------------------
    def parse_config(self, obj: dict, path: str) -> ModelConfig:
        """The config of a config.json object, range-checked (one ValidationError listing every problem)."""
        cfg = self.config_from_json(obj, path)
        problems = self.check_config(cfg, path)
        if problems:
            raise ValidationError(problems)
        return cfg

    def check_config(self, cfg, where: str) -> list[str]:
        """Every out-of-range field of ``cfg`` (one line each, prefixed ``where``): integers positive (or zero
        where :attr:`zero_ok`), none beyond :data:`MAX_INT` or its :attr:`limits` entry (a layer or expert count
        beyond any real model would make planning grow without bound), and the family's :meth:`relations`."""
        problems = []
        for f in fields(self.config_class):
            value = getattr(cfg, f.name)
            if f.type in (bool, "bool"):
                if not isinstance(value, bool):
                    problems.append(f"{where}: {f.name}: expected a bool, got {value!r}.")
                continue
            if not isinstance(value, int) or isinstance(value, bool):
                problems.append(f"{where}: {f.name}: expected an int, got {value!r}.")
            elif value < (0 if f.name in self.zero_ok else 1):
                problems.append(f"{where}: {f.name}: expected {'an int >= 0' if f.name in self.zero_ok else 'a positive int'}"
                                f", got {value}.")
            elif value > self.limits.get(f.name, MAX_INT):
                problems.append(f"{where}: {f.name}: {value} is beyond any real model (at most "
                                f"{self.limits.get(f.name, MAX_INT)}). Check config.json.")
        if not problems:
            layers = cfg.num_hidden_layers + cfg.mtp_layers
            if layers * max(cfg.num_experts, 1) > MAX_EXPERT_LAYERS:
                problems.append(f"{where}: {layers} layers x {cfg.num_experts} experts: beyond any real model (at most "
                                f"{MAX_EXPERT_LAYERS} expert-layers; the largest releases have about 62 x 256). Check config.json.")
            problems += [f"{where}: {name}: {why}" for name, why in self.relations(cfg)]
        return problems

    def facts(self, cfg, sizes: ParallelSizes, o: McoreOptions) -> ModelFacts:
        return ModelFacts(self.title, cfg.num_hidden_layers, cfg.first_dense, cfg.num_experts, cfg.mtp_layers,
                          tuple(self.divisible(cfg, sizes, o)), self.variants,
                          experts_field=self.experts_field)

    def expert_stack(self, name: str) -> tuple[str, int] | None:
        """``(stack, j)`` when ``name`` is routed expert j's tensor: ``stack`` is ``name`` with the expert index
        replaced by ``{j}``, the same for every expert of that layer and projection (a store keeps them as one
        array); entries beside the weight (``weight_scale_inv``) have their own stack.  None for other tensors."""
        m = _expert_pattern(type(self)).match(name)
        return (f"{m['pre']}{{j}}{m['post']}", int(m["j"])) if m else None

    def hf_tensors(self, cfg) -> list[HFTensor]:
        """Every tensor of the HF checkpoint (FP8 scales excluded), in release order: embedding, layers, final
        norm and lm_head (unless tied), MTP layers."""
        return list(_hf_table(self, cfg).values())

    def hf_table(self, cfg) -> dict[str, HFTensor]:
        return _hf_table(self, cfg)

    def export_order(self, cfg) -> list[str]:
        """The order mcore -> HF writes tensors in: the HF table's, unless the family keeps another one."""
        return list(_hf_table(self, cfg))

    def is_quantized(self, cfg, name: str) -> bool:
        """Whether a quantized release stores ``name`` in the block FP8 scheme."""
        t = _hf_table(self, cfg).get(name)
        return t is not None and t.kind is TensorKind.LINEAR

    def layer_of(self, name: str) -> int | None:
        """The HF layer index of a tensor name, or None for model-level tensors."""
        if name.startswith(self.layer_prefix):
            return int(name[len(self.layer_prefix):].split(".", 1)[0])
        return None

    def __repr__(self) -> str:
        return f"<model {self.name}>"


@lru_cache(maxsize=16)
def _hf_table(spec: ModelSpec, cfg) -> dict[str, HFTensor]:
    h, v = cfg.hidden_size, cfg.vocab_size
    out = [HFTensor(spec.embedding, (v, h), TensorKind.PLAIN)]
    for i in range(cfg.num_hidden_layers):
        out += _prefixed(spec, spec.layer_tensors(cfg, i), i)
    out.append(HFTensor(spec.final_norm, (h,), TensorKind.NORM))
    if not cfg.tied:
        out.append(HFTensor(spec.lm_head, (v, h), TensorKind.PLAIN))
    for i in range(cfg.num_hidden_layers, cfg.num_hidden_layers + cfg.mtp_layers):
        out += _prefixed(spec, spec.layer_tensors(cfg, i), i)
    return {t.name: t for t in out}


def _prefixed(spec: ModelSpec, tensors: list[HFTensor], layer: int) -> list[HFTensor]:
    p = f"{spec.layer_prefix}{layer}."
    return [HFTensor(p + t.name, t.shape, t.kind, t.copy_of) for t in tensors]


@lru_cache(maxsize=None)
def _expert_pattern(cls: type) -> re.Pattern:
    """``pre``, ``j``, ``post`` of a routed-expert tensor's name, from the family's :attr:`expert_rows` names
    (``mlp.experts.{j}.gate_proj.weight``: anything after the projection's name, so its scale matches too)."""
    alts = set()
    for r in cls.expert_rows:
        for src in r.sources:
            head, tail = src.split("{j}")
            alts.add((re.escape(head), re.escape(tail.rsplit(".", 1)[0] + ".")))
    pre = "|".join(sorted(h for h, _ in alts))
    post = "|".join(sorted(t for _, t in alts))
    return re.compile(rf"^(?P<pre>(?:.*\.)?(?:{pre}))(?P<j>0|[1-9][0-9]*)(?P<post>(?:{post}).+)$")
