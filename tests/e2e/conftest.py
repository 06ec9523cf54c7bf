"""Tiny DeepSeek-V3 checkpoints made once per session with the project's own generator."""

import dataclasses

import pytest

from streamconv import synth

# Small shards so that layers, and FP8 weights and their scales, straddle shard boundaries.
SHARD_BYTES = 200_000


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """{"bf16": dir, "fp8": dir}: the TINY preset in both formats."""
    root = tmp_path_factory.mktemp("tiny_hf")
    out = {}
    for kind, fp8 in (("bf16", False), ("fp8", True)):
        cfg = dataclasses.replace(synth.TINY, fp8=fp8, max_shard_bytes=SHARD_BYTES)
        synth.synth_checkpoint(str(root / kind), cfg)
        out[kind] = str(root / kind)
    return out
