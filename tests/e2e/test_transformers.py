"""The HF output loads as is in transformers and computes exactly the original checkpoint's logits."""

import os

import pytest
import torch

from streamconv.execute.executor import RunOptions, run_plan
from streamconv.layout.parallel import ParallelSizes
from streamconv.layout.options import McoreOptions
from streamconv.plan.mcore2hf import plan_mcore_to_hf
from streamconv.plan.planner import plan_hf_to_mcore

transformers = pytest.importorskip("transformers")


def logits(model_dir):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16,
                                                                     output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    model.eval()
    ids = torch.tensor([[0, 5, 17, 42, 99, 200, 3, 7, 255, 1]])
    with torch.no_grad():
        return model(ids).logits


def test_round_trip_output_gives_the_original_logits(tiny_hf, tmp_path):
    src = tiny_hf["bf16"]
    sizes = ParallelSizes(2, 2, 2)
    layout = McoreOptions(moe_grouped_gemm=True, mtp_num_layers=1)
    mcore, out = str(tmp_path / "mcore"), str(tmp_path / "hf")
    run_plan(plan_hf_to_mcore(src, mcore, sizes, layout))
    run_plan(plan_mcore_to_hf(mcore, out, sizes, layout), RunOptions())
    assert os.path.isfile(os.path.join(out, "config.json"))
    want, got = logits(src), logits(out)
    assert want.abs().sum() > 0
    assert torch.equal(got, want)
