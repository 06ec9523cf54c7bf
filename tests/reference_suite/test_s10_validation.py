"""Refusals: sizes that do not divide, out-of-range and conflicting options, layouts the spec rules out (4.2-4.5,
10.4, 10.6) and checkpoints that do not match their config.json."""

import json

import pytest

from tests.hf_tiny import build_tiny_hf
from tests.reference import reference_hf_to_mcore, reference_placement


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"tp": 3}, "num_attention_heads"),
        ({"tp": 8}, "num_attention_heads"),
        ({"tp": 0}, "tp"),
        ({"ep": 3}, "n_routed_experts"),
        ({"ep": 16}, "n_routed_experts"),
        ({"pp": 3}, "num_layers"),
        ({"mtp_num_layers": 2}, "mtp_num_layers"),
        ({"mtp_num_layers": -1}, "mtp_num_layers"),
        ({"num_layers": 5}, "num_layers"),
        ({"num_layers": 0}, "num_layers"),
        ({"num_layers": 2, "pp": 4}, "num_layers"),
        ({"first_k_dense_replace": 2}, "first_k_dense_replace"),
    ],
)
def test_validation_errors(bf16_dir, kwargs, match):
    with pytest.raises(ValueError, match=match):
        reference_hf_to_mcore(bf16_dir, **kwargs)


@pytest.mark.parametrize(
    "overrides,kwargs,match",
    [
        ({"vocab_size": 250}, {"tp": 4}, "vocab_size"),
        ({"intermediate_size": 90}, {"tp": 4}, "intermediate_size"),
        ({"moe_intermediate_size": 30}, {"tp": 4}, "moe_intermediate_size"),
        ({"hidden_size": 66}, {"tp": 4, "mtp_num_layers": 1}, "hidden_size"),
    ],
)
def test_validation_errors_by_tp(tmp_path, overrides, kwargs, match):
    build_tiny_hf(tmp_path, num_shards=1, **overrides)
    reference_hf_to_mcore(str(tmp_path), tp=2)  # fine at TP 2
    with pytest.raises(ValueError, match=match):
        reference_hf_to_mcore(str(tmp_path), **kwargs)


def test_checkpoint_not_matching_config_is_rejected(tmp_path):
    build_tiny_hf(tmp_path, num_shards=1)
    config_path = tmp_path / "config.json"
    config = json.loads(config_path.read_text())
    config["q_lora_rank"] = 40
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="q_a_proj"):
        reference_hf_to_mcore(str(tmp_path))


@pytest.mark.parametrize(
    "num_layers,pp,kwargs,match",
    [
        (8, 2, {"vpp_layers": 3}, "vpp_layers"),
        (12, 2, {"vpp_layers": 4}, "vpp_layers"),  # (L % PP) % s == 0 would pass; (L / PP) % s does not
        (8, 2, {"vpp_layers": 0}, "vpp_layers"),
        (8, 3, {"vpp_layers": 1}, "not divisible by pp"),
        (6, 2, {"dualpipev": True}, "dualpipev"),
        (8, 2, {"dualpipev": True, "vpp_layers": 2}, "mutually exclusive"),
        (4, 2, {"num_layer_list": [1, 3], "noop_layers": [0]}, "mutually exclusive"),
        (4, 2, {"num_layer_list": [2, 2], "vpp_layers": 1}, "mutually exclusive"),
        (4, 2, {"num_layer_list": [2, 2], "dualpipev": True}, "mutually exclusive"),
        (4, 2, {"num_layer_list": [1, 2]}, "sums to 3"),
        (4, 2, {"num_layer_list": [4]}, "num_layer_list"),
        (4, 2, {"num_layer_list": [0, 4]}, "num_layer_list"),
        (4, 2, {"noop_layers": [4]}, "noop_layers"),
        (4, 2, {"noop_layers": [1, 1]}, "duplicates"),
        (2, 1, {"noop_layers": [0, 1]}, "no real layer"),
    ],
)
def test_placement_validation(num_layers, pp, kwargs, match):
    with pytest.raises(ValueError, match=match):
        reference_placement(num_layers, pp, **kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"dualpipev": True, "tp": 2}, "moe-tp-extend-ep"),
        ({"dualpipev": True, "pp": 4}, "dualpipev"),
        ({"dualpipev": True, "vpp_layers": 1}, "mutually exclusive"),
        ({"vpp_layers": 3}, "vpp_layers"),
        ({"pp": 2, "vpp_layers": 3}, "vpp_layers"),
        ({"pp": 2, "num_layer_list": [1, 2]}, "sums to 3"),
        ({"pp": 2, "num_layer_list": [2, 2], "noop_layers": [0]}, "mutually exclusive"),
        ({"noop_layers": [4]}, "noop_layers"),
        ({"dualpipev": True, "first_k_dense_replace": 0}, "first_k_dense_replace"),
    ],
)
def test_layout_validation_errors(bf16_dir, kwargs, match):
    with pytest.raises(ValueError, match=match):
        reference_hf_to_mcore(bf16_dir, **kwargs)
