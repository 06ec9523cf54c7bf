"""Model families: one file per family, each a registered :class:`~streamconv.mapping.spec.ModelSpec` (tables
from HF names to mcore names and split rules).  The only place in streamconv that knows what a DeepSeek-V3 or
a Qwen3-MoE is.

    from streamconv.models import model_for_config, model_named, models
"""

from . import deepseek_v3, deepseek_v32, qwen3_moe  # noqa: F401  (each registers its family)
from .registry import model_for_config, model_for_mindspeed, model_named, models, register_model

__all__ = ["model_for_config", "model_for_mindspeed", "model_named", "models", "register_model"]
