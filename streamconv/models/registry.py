"""The model families streamconv knows, by name, by HF ``model_type`` and by MindSpeed's ``--model-type-hf``.

    register_model(DeepSeekV3())                      # in the family's own module
    spec = model_for_config(config_json, path)        # the family of an HF checkpoint
    spec = model_named("qwen3_moe")
"""

from __future__ import annotations

from ..errors import ValidationError
from ..mapping.spec import ModelSpec

_BY_NAME: dict[str, ModelSpec] = {}
_BY_MODEL_TYPE: dict[str, ModelSpec] = {}
_BY_MINDSPEED: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    """Make ``spec`` known under its name, its HF model_type values and its MindSpeed names."""
    for table, keys in ((_BY_NAME, (spec.name,)), (_BY_MODEL_TYPE, spec.model_types),
                        (_BY_MINDSPEED, spec.mindspeed_names)):
        for key in keys:
            if key in table and table[key] is not spec:
                raise ValueError(f"model {spec.name!r}: {key!r} is already registered by {table[key].name!r}")
            table[key] = spec
    return spec


def models() -> list[ModelSpec]:
    return list(_BY_NAME.values())


def model_named(name: str) -> ModelSpec:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValidationError(f"model family {name!r} is unknown (expected one of {', '.join(sorted(_BY_NAME))}).") from None


def model_for_mindspeed(name: str) -> ModelSpec:
    """The family MindSpeed-LLM's ``--model-type-hf NAME`` means."""
    try:
        return _BY_MINDSPEED[name]
    except KeyError:
        raise ValidationError(f"--model-type-hf {name}: not a family streamconv converts (expected one of "
                              f"{', '.join(sorted(_BY_MINDSPEED))}).") from None


def model_for_config(obj: dict, path: str, *, model_type_hf: str | None = None) -> ModelSpec:
    """The family of a config.json object (its ``model_type``), checked against ``--model-type-hf``."""
    model_type = obj.get("model_type")
    spec = _BY_MODEL_TYPE.get(model_type) if isinstance(model_type, str) else None
    if spec is None:
        raise ValidationError(f"{path}: model_type {model_type!r} is not a family streamconv converts (expected "
                              f"one of {', '.join(sorted(_BY_MODEL_TYPE))}).")
    if model_type_hf is not None:
        named = model_for_mindspeed(model_type_hf)
        if named is not spec:
            raise ValidationError(f"--model-type-hf {model_type_hf} names {named.title}, but {path} describes a "
                                  f"{spec.title} (model_type {model_type!r}). Drop the flag or fix --load-dir.")
    return spec
