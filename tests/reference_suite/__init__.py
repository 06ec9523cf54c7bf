"""Checks of the eager reference converters (tests/reference.py, tests/reference_families.py) against the specs, on
tiny checkpoints, one file per spec section.

The references are the oracles for the streaming converter, so they are themselves checked here from a second
angle: per-rank shapes follow the Appendix A formulas, TP pieces put back together restore the HF tensors, the
grouped-GEMM buffers have the Megatron view semantics, EP covers every expert once, MTP lands on the last stage,
FP8 dequantization matches the per-element rule, and bad sizes raise. Layer placement (noop layers,
num-layer-list, VPP, dualpipev) is checked against the worked examples of spec 4.3-4.5 and end to end on the tiny
checkpoint. test_families.py does the same for Qwen3-MoE and DeepSeek-V3.2 (spec/mindspeed_v2_families.md).
"""
