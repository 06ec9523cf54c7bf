"""The model registry and what every spec promises: lookups by model_type and MindSpeed name, config parsing
with one error listing every bad field, range checks, the layout checks' messages."""

import pytest

from streamconv.errors import ValidationError
from streamconv.layout.options import McoreOptions
from streamconv.layout.parallel import ParallelSizes
from streamconv.layout.placement import place
from streamconv.models import model_for_config, model_for_mindspeed, model_named, models

V3 = model_named("deepseek_v3")


def test_registry_lookups():
    assert {s.name for s in models()} >= {"deepseek_v3", "deepseek_v32", "qwen3_moe"}
    assert model_for_mindspeed("qwen3-moe").name == "qwen3_moe"
    assert model_for_mindspeed("deepseek32").name == "deepseek_v32"
    assert model_for_config({"model_type": "deepseek_v3"}, "c.json") is V3
    with pytest.raises(ValidationError, match=r"c.json: model_type 'llama' is not a family streamconv converts"):
        model_for_config({"model_type": "llama"}, "c.json")
    with pytest.raises(ValidationError, match=r"c.json: model_type None"):
        model_for_config({}, "c.json")
    with pytest.raises(ValidationError, match="model family 'gpt' is unknown"):
        model_named("gpt")


def test_every_preset_round_trips_through_its_config_json():
    for spec in models():
        for name, cfg in spec.presets.items():
            assert spec.parse_config(spec.config_json(cfg), f"{spec.name}/{name}") == cfg, (spec.name, name)


def test_config_errors_list_every_field():
    obj = V3.config_json(V3.presets["tiny"])
    with pytest.raises(ValidationError) as e:
        V3.parse_config({**obj, "hidden_size": 0, "first_k_dense_replace": -1, "vocab_size": 10**9}, "c.json")
    msg = str(e.value)
    assert "c.json: hidden_size: expected a positive int, got 0" in msg
    assert "c.json: first_k_dense_replace: expected an int >= 0, got -1" in msg
    assert "c.json: vocab_size: 1000000000 is beyond any real model" in msg
    with pytest.raises(ValidationError, match="num_hidden_layers: 1000000000000 is beyond any real model"):
        V3.parse_config({**obj, "num_hidden_layers": 10**12}, "c.json")
    with pytest.raises(ValidationError, match="missing or non-integer field.*q_lora_rank"):
        V3.parse_config({k: v for k, v in obj.items() if k != "q_lora_rank"}, "c.json")
    with pytest.raises(ValidationError, match="weight_block_size"):
        V3.parse_config({**obj, "quantization_config": {"quant_method": "fp8", "weight_block_size": [64, 64]}}, "c")


def test_qwen_config_reads_both_expert_count_names_and_refuses_what_it_cannot_convert():
    q = model_named("qwen3_moe")
    obj = q.config_json(q.presets["tiny"])
    renamed = {k: v for k, v in obj.items() if k != "num_experts"} | {"num_local_experts": 8}
    assert q.parse_config(renamed, "c").num_experts == 8
    with pytest.raises(ValidationError, match="expected one integer expert count"):
        q.parse_config({**obj, "num_local_experts": 16}, "c")
    with pytest.raises(ValidationError, match="only checkpoints whose every layer is MoE"):
        q.parse_config({**obj, "mlp_only_layers": [0]}, "c")
    with pytest.raises(ValidationError, match="attention_bias true"):
        q.parse_config({**obj, "attention_bias": True}, "c")
    with pytest.raises(ValidationError, match="multiple of num_key_value_heads"):
        q.parse_config({**obj, "num_attention_heads": 6}, "c")


def test_layout_checks_name_the_family_fields():
    q = model_named("qwen3_moe")
    cfg = q.presets["tiny"]
    with pytest.raises(ValidationError) as e:
        place(q.facts(cfg, ParallelSizes(8, 3, 3), McoreOptions(mla_mm_split=True)), ParallelSizes(8, 3, 3),
              McoreOptions(mla_mm_split=True))
    problems = e.value.problems
    assert any("does not divide num_key_value_heads = 4" in p for p in problems)
    assert any("does not divide num_experts = 8" in p for p in problems)
    assert any("--mla-mm-split: Qwen3-MoE has no multi-latent attention" in p for p in problems)
    assert any("is not divisible by --target-pipeline-parallel-size 3" in p for p in problems)
