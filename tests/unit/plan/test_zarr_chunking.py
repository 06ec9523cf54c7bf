"""How zarr_plans cuts arrays: chunks of whole FP8 blocks that tile each dim's TP/EP splits, shards that tile the
array, entries that tile the shard; on the real DeepSeek-V3 671B shapes and on awkward ones."""

from __future__ import annotations

import math

import pytest

from streamconv.errors import ValidationError
from streamconv.plan.zarr_plans import StoreOptions, chunking, stacked_chunking

OPTS = StoreOptions()
# (shape, itemsize): every 2-D tensor shape of DeepSeek-V3 671B (FP8 weights, bf16 embeddings and norms,
# float32 scale grids), plus odd ones
V3 = [((129280, 7168), 2), ((24576, 1536), 1), ((1536, 7168), 1), ((576, 7168), 1), ((32768, 512), 1),
      ((7168, 16384), 1), ((18432, 7168), 1), ((7168, 18432), 1), ((2048, 7168), 1), ((7168, 2048), 1),
      ((256, 7168), 2), ((7168, 14336), 1), ((7168,), 2), ((256,), 4), ((192, 56), 4), ((1010, 56), 4)]


@pytest.mark.parametrize("shape,itemsize", V3, ids=[f"{list(s)}x{i}" for s, i in V3])
def test_chunks_tile_and_align(shape, itemsize):
    chunk, shard, per_entry = chunking(shape, itemsize, 128, OPTS)
    assert len(chunk) == len(shard) == len(shape)
    for size, c, s in zip(shape, chunk, shard):
        assert size % s == 0 and s % c == 0, (shape, chunk, shard)     # no edge chunks, no edge shards
    assert shard[1:] == shape[1:]                                       # full-width shards
    assert (shard[0] // chunk[0]) % per_entry == 0                      # entries tile the shard
    assert math.prod(shard) * itemsize <= OPTS.shard_bytes or shard[0] == chunk[0]
    for size, c in zip(shape, chunk):
        if size % 128 == 0 and size > 128:
            assert c % 128 == 0                                         # whole FP8 blocks
            for tp in (1, 2, 4, 8):                                     # every split the dim allows is aligned
                if (size // tp) % 128 == 0:
                    assert (size // tp) % c == 0, (shape, chunk, tp)
    if len(shape) == 2 and shape[0] % 128 == 0 and shape[0] > 128:
        assert chunk[0] == 128                                          # rows: one FP8 block


def test_the_chunk_edge_and_sizes_are_options():
    chunk, shard, per_entry = chunking((4096, 4096), 2, 64, StoreOptions(chunk_bytes=1 << 16, shard_bytes=1 << 22,
                                                                          entry_bytes=1 << 20))
    assert chunk[0] == 64 and chunk[1] % 64 == 0 and chunk[0] * chunk[1] * 2 <= 1 << 16
    assert shard == (512, 4096) and per_entry == 2


def test_a_scalar_is_refused():
    with pytest.raises(ValidationError, match="0-d tensor"):
        chunking((), 4, 128, OPTS)


# stacked routed experts [experts, rows, cols]: DeepSeek-V3 671B FP8 weights and scales, Qwen3-235B bf16, odd ones
STACKS = [((256, 2048, 7168), 1), ((256, 7168, 2048), 1), ((256, 16, 56), 4), ((256, 56, 16), 4),
          ((128, 1536, 4096), 2), ((128, 4096, 1536), 2), ((7, 100, 30), 2), ((3, 4096, 16384), 2)]


@pytest.mark.parametrize("shape,itemsize", STACKS, ids=[f"{list(s)}x{i}" for s, i in STACKS])
def test_stacks_keep_experts_apart_and_cut_each_like_a_matrix(shape, itemsize):
    chunk, shard, per_entry = stacked_chunking(shape, itemsize, 128, OPTS)
    inner, _, _ = chunking(shape[1:], itemsize, 128, OPTS)
    assert chunk == (1,) + inner                     # one expert per chunk, cut as the expert alone would be
    assert shard[1:] == shape[1:] and shape[0] % shard[0] == 0 and shard[0] % per_entry == 0
    one = math.prod(shape[1:]) * itemsize
    assert shard[0] * one <= OPTS.shard_bytes or shard[0] == 1
    assert per_entry * one <= OPTS.entry_bytes or per_entry == 1
