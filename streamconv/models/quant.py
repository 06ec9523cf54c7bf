"""The block-scaled FP8 format of DeepSeek's releases (and of Qwen3's FP8 releases): the one definition.

Spec ``deepseek_v3_mindspeed.md`` §1.4: a weight of shape [M, N] is stored as float8_e4m3fn with a float32
``<name>_scale_inv`` of shape [ceil(M/128), ceil(N/128)];
``w_bf16[r, c] = bf16(float32(q[r, c]) * scale_inv[r // 128, c // 128])``, partial edge blocks included.
"""

from __future__ import annotations

from ..mapping.spec import BlockQuant

FP8_BLOCK_128 = BlockQuant(
    block=(128, 128),
    scale_suffix="_scale_inv",
    dtypes=("float8_e4m3fn", "float8_e5m2"),
    logical_dtype="bfloat16",
    config=(("activation_scheme", "dynamic"), ("fmt", "e4m3"), ("quant_method", "fp8"),
            ("weight_block_size", (128, 128))),
)
