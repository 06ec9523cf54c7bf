"""plans/recipes: 671B recipe estimates, planned from a headers-only checkpoint, stay in sync."""

import json
import os

import pytest

from streamconv import synth
from streamconv.storage.safetensors import read_header

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_headers_only_checkpoint_is_sparse_and_readable(tmp_path):
    d = str(tmp_path / "hf")
    summary = synth.synth_checkpoint(d, synth.TINY, headers_only=True)
    shard = os.path.join(d, [f for f in summary["files"] if f.endswith(".safetensors")][0])
    header = read_header(shard)
    assert header.file_size == os.path.getsize(shard)
    assert max(t.end for t in header.tensors.values()) == header.file_size
    with open(os.path.join(d, "model.safetensors.index.json")) as f:
        assert json.load(f)["metadata"]["total_size"] == summary["bytes"]


@pytest.mark.slow
def test_recipes_in_sync(tmp_path):
    from plans.recipes import RECIPES, summaries

    synth.synth_checkpoint(str(tmp_path / "hf"), synth.DEEPSEEK_V3_671B, headers_only=True)
    fresh = summaries(str(tmp_path / "hf"))
    for name in RECIPES:
        with open(os.path.join(ROOT, "plans", "recipes", name + ".json")) as f:
            assert json.load(f) == fresh[name], f"plans/recipes/{name}.json is stale: run `make plans`"
