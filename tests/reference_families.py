"""Eager reference HF -> mcore converter for the two "convert_ckpt_v2" families: the test oracle.

Written from ``spec/mindspeed_v2_families.md`` and ``spec/deepseek_v3_mindspeed.md`` (sections 2-4), deliberately
simple and independent of the ``streamconv`` package; the generic parts (HF loading with FP8 dequantization,
placement, rank directory names, ETP-1 pairs, routed experts and the grouped-GEMM buffers) come from
``tests/reference.py``, the DeepSeek-V3 oracle::

    expected = reference_hf_to_mcore_family(hf_dir, tp=2, pp=2, ep=2, moe_grouped_gemm=True)
    assert_same_checkpoint(load_mcore_dir(save_dir), expected, check_order=True)

The return value has the structure of ``reference_hf_to_mcore``: ``{"latest_checkpointed_iteration.txt": b"1",
"iter_0000001/<rank dir>/model_optim_rng.pt": {"model": OrderedDict, "checkpoint_version": 3.0, "iteration": 1}}``,
with ``model0``, ``model1``, ... instead of ``model`` under VPP / dualpipev. No ``args`` entry is written (the
families spec makes the pickled Namespace the user's choice, not a default).

Dispatch on config.json's ``model_type``:

* ``deepseek_v3``: ``reference_hf_to_mcore`` with the same options.
* ``deepseek_v32`` (DeepSeek-V3.2): exactly the DeepSeek-V3 conversion (``reference_hf_to_mcore`` is run on the
  directory; MLA, dense layers below ``first_k_dense_replace``, shared experts, float32 ``expert_bias``, MTP, every
  layout option) plus the DSA indexer in every decoder layer and every MTP ``transformer_layer``:
  ``self_attention.dsa_indexer.wq_b.weight``, ``.wk.weight``, ``.k_norm.weight``, ``.k_norm.bias``,
  ``.weights_proj.weight`` from ``self_attn.indexer.*`` of the same HF layer, whole on every TP and EP rank.

  *Key order (decision):* the five indexer keys, in that order (the spec table's, which is also the HF module
  order), come right after the other attention keys and right before ``self_attention.linear_proj.weight``:
  ``linear_qkv, q_layernorm, kv_layernorm, linear_q_up_proj, linear_kv_up_proj`` (or the four mla-mm-split
  matrices), ``dsa_indexer.wq_b, dsa_indexer.wk, dsa_indexer.k_norm.weight, dsa_indexer.k_norm.bias,
  dsa_indexer.weights_proj``, ``linear_proj``. Every other key keeps its DeepSeek-V3 position.

  *Dtype (decision):* the indexer tensors are copied in the dtype found after loading: FP8 ``wq_b`` / ``wk`` are
  dequantized to bf16 with their ``weight_scale_inv`` like every FP8 weight (spec 1.4); ``weights_proj`` and
  ``k_norm`` are copied as stored (bf16 in the release; a float32 copy would stay float32).

  ``mla_key_names="legacy"`` is accepted as for V3 (a rename only), though no V3.2 checkpoint predates the
  2025-07-23 rename.
  ``tie_word_embeddings`` is not supported for V3.2 (the V3 conversion requires ``lm_head.weight``).
* ``qwen3_moe`` (Qwen3-MoE), keys per rank in this order (spec "Keys common to both families" and the Qwen3-MoE
  table, the style of tests/reference.py):

  - ``embedding.word_embeddings.weight`` (pp 0, chunk 0): C(embed_tokens, TP, 0)[t];
  - per decoder layer L: ``input_layernorm.weight``; ``self_attention.linear_qkv.weight`` (per kv group g the
    rows [its nh/ng q heads; its k head; its v head], groups stacked, then C(., TP, 0)[t]);
    ``self_attention.q_layernorm.weight`` (q_norm); ``self_attention.k_layernorm.weight`` (k_norm);
    ``self_attention.linear_proj.weight`` (C(o_proj, TP, 1)[t]); ``pre_mlp_layernorm.weight``;
    ``mlp.router.weight`` (``mlp.gate.weight``, whole; no bias, no shared experts); the routed experts exactly as
    for DeepSeek-V3 (``mlp.experts.local_experts.{i}.linear_fc1`` / ``linear_fc2`` per local expert, or
    ``mlp.experts.weight1`` / ``weight2`` with grouped GEMM; TP-split, tp-extend-ep buckets or ETP 1);
  - in the final chunk: ``decoder.final_layernorm.weight`` then ``output_layer.weight``.

  Every layer is MoE; configs with ``mlp_only_layers`` or ``decoder_sparse_step`` != 1 are refused, as are
  ``attention_bias``, MTP (``mtp_num_layers`` > 0), the MLA options (``mla_mm_split``, legacy MLA names) and TP not
  dividing ``num_key_value_heads`` (Megatron needs ``num_query_groups % TP == 0``; spec "Where the reference is
  wrong" 4). ``head_dim`` is read from its own config field (default hidden / heads); the expert count from
  ``num_experts`` or ``num_local_experts`` (transformers >= 5), which must agree when both are present.

  *Tied embeddings (decision):* with ``tie_word_embeddings: true`` the HF directory has no ``lm_head.weight``
  (if it has one, it must equal the embedding and is not read). Megatron then builds the model with
  ``share_embeddings_and_output_weights``: with PP == 1 the output layer has no weight of its own, so no
  ``output_layer.weight`` is stored; with PP > 1 the last stage's output layer owns a copy that Megatron keeps
  equal to the embedding, so the final chunk stores ``output_layer.weight`` = C(embed_tokens, TP, 0)[t]. The
  condition is PP > 1, as in MindSpeed's convert_hf2mg (``untie or pipeline_model_parallel_size > 1``) and like
  the MTP embedding copy of spec 3.7; so with PP == 1 under VPP or dualpipev (final chunk other than chunk 0) no
  ``output_layer.weight`` is written either (Megatron-Core would give such a last chunk an output weight of its own,
  but its tie set-up returns early when PP == 1, so nothing would keep it tied there; we follow MindSpeed). Untied:
  ``output_layer.weight`` = C(lm_head, TP, 0)[t], always.

Options common to both families: ``tp``, ``pp``, ``ep``, ``moe_grouped_gemm``, ``num_layers`` (L, noop slots
included; default config ``num_hidden_layers``), ``vpp_layers``, ``noop_layers``, ``num_layer_list``,
``dualpipev`` (placement: ``reference_placement``, HF index = slot - #noop slots below), ``moe_tp_extend_ep``,
``expert_tensor_parallel_size`` (None, 1 or ``tp``: ``tp`` is the default layout; other values refused, as is ETP 1
with tp-extend-ep); dualpipev with TP > 1 needs tp-extend-ep, as for DeepSeek-V3. ``mtp_num_layers``,
``mla_mm_split`` and ``mla_key_names`` apply to DeepSeek only. Raises ValueError for anything refused.

Only torch, safetensors, json, os and tests/reference.py are used, on purpose.
"""

import json
import os
from collections import OrderedDict

import torch

from tests.reference import (
    ITER_DIR,
    RANK_FILE,
    TRACKER_FILE,
    _chunk,
    _etp1_pairs,
    _is_int,
    _Opts,
    _own,
    _routed_experts,
    load_hf,
    rank_dir_name,
    reference_final_chunk,
    reference_hf_to_mcore,
    reference_placement,
)

__all__ = [
    "INDEXER_KEYS",
    "qwen3_qkv",
    "reference_hf_to_mcore_family",
]

# (mcore suffix under self_attention., HF suffix under self_attn.) in key order
INDEXER_KEYS = [
    ("dsa_indexer.wq_b.weight", "indexer.wq_b.weight"),
    ("dsa_indexer.wk.weight", "indexer.wk.weight"),
    ("dsa_indexer.k_norm.weight", "indexer.k_norm.weight"),
    ("dsa_indexer.k_norm.bias", "indexer.k_norm.bias"),
    ("dsa_indexer.weights_proj.weight", "indexer.weights_proj.weight"),
]


def reference_hf_to_mcore_family(
    hf_dir,
    *,
    tp=1,
    pp=1,
    ep=1,
    moe_grouped_gemm=False,
    mtp_num_layers=0,
    num_layers=None,
    vpp_layers=None,
    noop_layers=(),
    num_layer_list=None,
    dualpipev=False,
    mla_mm_split=False,
    moe_tp_extend_ep=False,
    expert_tensor_parallel_size=None,
    mla_key_names="current",
):
    """Every file of the mcore checkpoint for a ``deepseek_v3``, ``deepseek_v32`` or ``qwen3_moe`` HF directory,
    keyed by path relative to the save dir (see the module docstring for the rules and decisions)."""
    with open(os.path.join(hf_dir, "config.json")) as f:
        config = json.load(f)
    model_type = config.get("model_type")
    etp = _normalize_etp(expert_tensor_parallel_size, tp)
    kwargs = dict(
        tp=tp, pp=pp, ep=ep, moe_grouped_gemm=moe_grouped_gemm, mtp_num_layers=mtp_num_layers,
        num_layers=num_layers, vpp_layers=vpp_layers, noop_layers=tuple(noop_layers),
        num_layer_list=num_layer_list, dualpipev=dualpipev, mla_mm_split=mla_mm_split,
        moe_tp_extend_ep=moe_tp_extend_ep, expert_tensor_parallel_size=etp, mla_key_names=mla_key_names,
    )
    if model_type == "deepseek_v3":
        return reference_hf_to_mcore(hf_dir, **kwargs)
    if model_type == "deepseek_v32":
        return _deepseek_v32(hf_dir, config, **kwargs)
    if model_type == "qwen3_moe":
        return _qwen3_moe(hf_dir, **kwargs)
    raise ValueError(f"model_type {model_type!r} is not one of deepseek_v3, deepseek_v32, qwen3_moe")


def _normalize_etp(etp, tp):
    """Families spec: ETP is 1 or TP (None = TP). ETP == TP is the default layout (returned as None)."""
    if etp is None:
        return None
    if not _is_int(etp):
        raise ValueError(f"expert_tensor_parallel_size must be None, 1 or tp, got {etp!r}")
    if etp == 1:
        return 1
    if etp == tp:
        return None
    raise ValueError(f"expert_tensor_parallel_size must be None, 1 or tp ({tp}), got {etp!r}")


def _model_chunks(obj):
    """The chunk state dicts of one rank file, ``[(top-level key, chunk index)]``."""
    if "model" in obj:
        return [("model", 0)]
    return [(key, int(key[len("model"):])) for key in obj if key.startswith("model")]


def _pp_rank(path, pp, ep):
    """pp rank of ``iter_0000001/mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt`` (spec 2.1)."""
    parts = path.split("/")[1].split("_")[2:]  # ["TT", "PPP"?, "EEE"?]
    expected = 1 + (pp > 1) + (ep > 1)
    if len(parts) != expected:
        raise AssertionError(f"reference bug: unexpected rank dir in {path}")
    return int(parts[1]) if pp > 1 else 0


# --------------------------------------------------------------------------------------------------
# DeepSeek-V3.2: DeepSeek-V3 plus the DSA indexer


def _deepseek_v32(hf_dir, config, **kwargs):
    files = reference_hf_to_mcore(hf_dir, **kwargs)  # every V3 rule and refusal
    _, hf = load_hf(hf_dir)
    pp, ep, mtp = kwargs["pp"], kwargs["ep"], kwargs["mtp_num_layers"]
    num_hf = config["num_hidden_layers"]
    num_layers = num_hf if kwargs["num_layers"] is None else kwargs["num_layers"]
    placement = reference_placement(
        num_layers, pp, vpp_layers=kwargs["vpp_layers"], noop_layers=kwargs["noop_layers"],
        num_layer_list=kwargs["num_layer_list"], dualpipev=kwargs["dualpipev"],
    )
    final = reference_final_chunk(num_layers, pp, vpp_layers=kwargs["vpp_layers"], dualpipev=kwargs["dualpipev"])

    h, q_lora = config["hidden_size"], config["q_lora_rank"]
    n, d = config["index_n_heads"], config["index_head_dim"]
    shapes = {
        "indexer.wq_b.weight": (n * d, q_lora),
        "indexer.wk.weight": (d, h),
        "indexer.k_norm.weight": (d,),
        "indexer.k_norm.bias": (d,),
        "indexer.weights_proj.weight": (n, h),
    }
    used = sorted({i for chunk in placement.values() for _, i in chunk} | {num_hf + m for m in range(mtp)})
    problems = []
    for i in used:
        for suffix, shape in shapes.items():
            name = f"model.layers.{i}.self_attn.{suffix}"
            if name not in hf:
                problems.append(f"{name}: missing")
            elif tuple(hf[name].shape) != shape:
                problems.append(f"{name}: shape (expected {shape}, got {tuple(hf[name].shape)})")
    if problems:
        raise ValueError("HF checkpoint does not match config.json:\n  " + "\n  ".join(problems))

    for path, obj in files.items():
        if isinstance(obj, bytes):
            continue
        p = _pp_rank(path, pp, ep)
        for top, v in _model_chunks(obj):
            sources = {f"decoder.layers.{local}.self_attention.": i for local, i in placement[(p, v)]}
            if (p, v) == final:
                for m in range(mtp):
                    sources[f"mtp.layers.{m}.transformer_layer.self_attention."] = num_hf + m
            obj[top] = _with_indexer(obj[top], sources, hf)
    return files


def _with_indexer(state, sources, hf):
    """``state`` with the indexer keys of every attention prefix in ``sources`` inserted before its linear_proj."""
    out = OrderedDict()
    done = set()
    for key, tensor in state.items():
        if key.endswith("linear_proj.weight"):
            prefix = key[: -len("linear_proj.weight")]
            if prefix in sources:
                src = f"model.layers.{sources[prefix]}.self_attn."
                for mcore_suffix, hf_suffix in INDEXER_KEYS:
                    out[prefix + mcore_suffix] = _own(hf[src + hf_suffix])
                done.add(prefix)
        out[key] = tensor
    if done != set(sources):
        raise AssertionError(f"reference bug: no linear_proj for {sorted(set(sources) - done)}")
    return out


# --------------------------------------------------------------------------------------------------
# Qwen3-MoE


class _QwenDims:
    """Qwen3-MoE sizes from config.json."""

    def __init__(self, config):
        self.hidden = config["hidden_size"]
        self.vocab = config["vocab_size"]
        self.num_hf_layers = config["num_hidden_layers"]
        self.heads = config["num_attention_heads"]
        self.kv_heads = config["num_key_value_heads"]
        self.head_dim = config.get("head_dim") or self.hidden // self.heads
        self.moe_ffn = config["moe_intermediate_size"]
        counts = {k: config[k] for k in ("num_experts", "num_local_experts") if config.get(k) is not None}
        if not counts:
            raise ValueError("config.json has neither num_experts nor num_local_experts")
        if len(set(counts.values())) > 1:
            raise ValueError(f"config.json: num_experts and num_local_experts disagree: {counts}")
        self.experts = next(iter(counts.values()))
        self.tied = bool(config.get("tie_word_embeddings", False))


def qwen3_qkv(q, k, v, heads, kv_heads):
    """Families spec, Qwen3-MoE ``linear_qkv`` before the TP split: per kv group g the rows of its
    heads / kv_heads q heads, then its k head, then its v head; groups stacked. Shape [(nh + 2 ng) d, H]."""
    hidden = q.shape[1]
    return torch.cat(
        [q.reshape(kv_heads, -1, hidden), k.reshape(kv_heads, -1, hidden), v.reshape(kv_heads, -1, hidden)], 1
    ).reshape(-1, hidden)


def _qwen_validate(config, d, tp, pp, ep, num_real, experts, dualpipev, mtp_num_layers, mla_mm_split,
                   mla_key_names):
    problems = []
    for flag, value in (("tp", tp), ("pp", pp), ("ep", ep)):
        if not _is_int(value) or value < 1:
            problems.append(f"{flag} must be a positive int, got {value!r}")
    if problems:
        raise ValueError("; ".join(problems))
    if mla_mm_split or mla_key_names != "current":
        problems.append("mla_mm_split and mla_key_names apply to MLA (DeepSeek) only, not to qwen3_moe")
    if mtp_num_layers:
        problems.append(f"qwen3_moe has no MTP layers; mtp_num_layers must be 0, got {mtp_num_layers!r}")
    if config.get("decoder_sparse_step", 1) != 1 or config.get("mlp_only_layers"):
        problems.append("qwen3_moe: only every-layer-MoE models (decoder_sparse_step 1, no mlp_only_layers)")
    if config.get("attention_bias"):
        problems.append("qwen3_moe: attention_bias is not supported")
    if num_real > d.num_hf_layers:
        problems.append(
            f"num_layers minus noop layers = {num_real} real layers, more than the {d.num_hf_layers} HF layers"
        )
    if d.heads % d.kv_heads:
        problems.append(f"num_attention_heads {d.heads} not divisible by num_key_value_heads {d.kv_heads}")
    if d.kv_heads % tp:
        problems.append(f"num_key_value_heads {d.kv_heads} not divisible by tp {tp} (num_query_groups % TP)")
    if d.vocab % tp:
        problems.append(f"vocab_size {d.vocab} not divisible by tp {tp}")
    if d.experts % ep:
        problems.append(f"num_experts {d.experts} not divisible by ep {ep}")
    if experts == "extend" and d.experts % (ep * tp):
        problems.append(f"moe_tp_extend_ep: num_experts {d.experts} not divisible by ep * tp = {ep * tp}")
    if experts == "tp" and d.moe_ffn % tp:
        problems.append(f"moe_intermediate_size {d.moe_ffn} not divisible by tp {tp}")
    if dualpipev and tp > 1 and experts != "extend":
        problems.append("dualpipev with tp > 1 needs moe-tp-extend-ep (moe_tp_extend_ep=True)")
    if problems:
        raise ValueError("; ".join(problems))


def _qwen_expected_shapes(d, hf_layers):
    h, nd, kd = d.hidden, d.heads * d.head_dim, d.kv_heads * d.head_dim
    shapes = {"model.embed_tokens.weight": (d.vocab, h), "model.norm.weight": (h,)}
    if not d.tied:
        shapes["lm_head.weight"] = (d.vocab, h)
    for i in hf_layers:
        pre = f"model.layers.{i}."
        shapes.update({
            pre + "input_layernorm.weight": (h,),
            pre + "self_attn.q_proj.weight": (nd, h),
            pre + "self_attn.k_proj.weight": (kd, h),
            pre + "self_attn.v_proj.weight": (kd, h),
            pre + "self_attn.o_proj.weight": (h, nd),
            pre + "self_attn.q_norm.weight": (d.head_dim,),
            pre + "self_attn.k_norm.weight": (d.head_dim,),
            pre + "post_attention_layernorm.weight": (h,),
            pre + "mlp.gate.weight": (d.experts, h),
        })
        for j in range(d.experts):
            shapes[pre + f"mlp.experts.{j}.gate_proj.weight"] = (d.moe_ffn, h)
            shapes[pre + f"mlp.experts.{j}.up_proj.weight"] = (d.moe_ffn, h)
            shapes[pre + f"mlp.experts.{j}.down_proj.weight"] = (h, d.moe_ffn)
    return shapes


def _qwen_layer(hf, d, hf_index, dst, tp, t, ep, e, opts):
    src = f"model.layers.{hf_index}."
    a = src + "self_attn."
    s = dst + "self_attention."
    qkv = qwen3_qkv(hf[a + "q_proj.weight"], hf[a + "k_proj.weight"], hf[a + "v_proj.weight"], d.heads, d.kv_heads)
    out = [
        (dst + "input_layernorm.weight", hf[src + "input_layernorm.weight"]),
        (s + "linear_qkv.weight", _chunk(qkv, tp, 0, t)),
        (s + "q_layernorm.weight", hf[a + "q_norm.weight"]),
        (s + "k_layernorm.weight", hf[a + "k_norm.weight"]),
        (s + "linear_proj.weight", _chunk(hf[a + "o_proj.weight"], tp, 1, t)),
        (dst + "pre_mlp_layernorm.weight", hf[src + "post_attention_layernorm.weight"]),
        (dst + "mlp.router.weight", hf[src + "mlp.gate.weight"]),
    ]
    return out + _routed_experts(hf, d, src + "mlp.", dst, tp, t, ep, e, opts)


def _qwen3_moe(
    hf_dir, *, tp, pp, ep, moe_grouped_gemm, mtp_num_layers, num_layers, vpp_layers, noop_layers, num_layer_list,
    dualpipev, mla_mm_split, moe_tp_extend_ep, expert_tensor_parallel_size, mla_key_names,
):
    if mla_key_names not in ("current", "legacy"):
        raise ValueError(f"mla_key_names must be 'current' or 'legacy', got {mla_key_names!r}")
    if moe_tp_extend_ep and expert_tensor_parallel_size is not None:
        raise ValueError("moe_tp_extend_ep and expert_tensor_parallel_size 1 are mutually exclusive")
    experts = "extend" if moe_tp_extend_ep else "etp1" if expert_tensor_parallel_size == 1 else "tp"
    opts = _Opts(moe_grouped_gemm, experts=experts)
    config, hf = load_hf(hf_dir)
    d = _QwenDims(config)
    num_layers = d.num_hf_layers if num_layers is None else num_layers
    # reference_placement validates the layout (spec 4.2-4.5) first, as reference_hf_to_mcore does
    placement = reference_placement(
        num_layers, pp, vpp_layers=vpp_layers, noop_layers=noop_layers, num_layer_list=num_layer_list,
        dualpipev=dualpipev,
    )
    num_real = num_layers - len(noop_layers)
    _qwen_validate(config, d, tp, pp, ep, num_real, experts, dualpipev, mtp_num_layers, mla_mm_split, mla_key_names)
    if experts == "etp1":
        if dualpipev and tp > 1:
            raise ValueError("dualpipev with tp > 1 is only supported with moe_tp_extend_ep, not ETP 1")
        rank_pairs = _etp1_pairs(tp, ep)
    else:
        rank_pairs = [(t, e) for t in range(tp) for e in range(ep)]

    expected = _qwen_expected_shapes(d, range(num_real))
    problems = []
    for name, shape in expected.items():
        if name not in hf:
            problems.append(f"{name}: missing")
        elif tuple(hf[name].shape) != shape:
            problems.append(f"{name}: shape (expected {shape}, got {tuple(hf[name].shape)})")
    if problems:
        raise ValueError("HF checkpoint does not match config.json:\n  " + "\n  ".join(problems))
    embed = hf["model.embed_tokens.weight"]
    if d.tied:
        lm_head = hf.get("lm_head.weight")
        if lm_head is not None and not torch.equal(lm_head, embed):
            raise ValueError("tie_word_embeddings is true but lm_head.weight differs from model.embed_tokens.weight")
        output = embed if pp > 1 else None  # Megatron share_embeddings_and_output_weights (module docstring)
    else:
        output = hf["lm_head.weight"]

    final_chunk = reference_final_chunk(num_layers, pp, vpp_layers=vpp_layers, dualpipev=dualpipev)
    chunked = vpp_layers is not None or dualpipev
    num_chunks = max(v for _, v in placement) + 1
    files = {TRACKER_FILE: b"1"}
    for p in range(pp):
        for t, e in rank_pairs:
            chunks = []
            for v in range(num_chunks):
                items = []
                if (p, v) == (0, 0):
                    items.append(("embedding.word_embeddings.weight", _chunk(embed, tp, 0, t)))
                for local, hf_index in placement[(p, v)]:
                    items += _qwen_layer(hf, d, hf_index, f"decoder.layers.{local}.", tp, t, ep, e, opts)
                if (p, v) == final_chunk:
                    items.append(("decoder.final_layernorm.weight", hf["model.norm.weight"]))
                    if output is not None:
                        items.append(("output_layer.weight", _chunk(output, tp, 0, t)))
                state = OrderedDict()
                for key, tensor in items:
                    if key in state:
                        raise AssertionError(f"reference bug: duplicate key {key}")
                    state[key] = _own(tensor)
                chunks.append(state)
            path = f"{ITER_DIR}/{rank_dir_name(t, p, e, pp, ep)}/{RANK_FILE}"
            if chunked:
                obj = {"checkpoint_version": 3.0, "iteration": 1}
                for v, chunk_state in enumerate(chunks):
                    obj[f"model{v}"] = chunk_state
            else:
                obj = {"model": chunks[0], "checkpoint_version": 3.0, "iteration": 1}
            files[path] = obj
    return files
