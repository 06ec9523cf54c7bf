"""Stock PEFT loads the exported adapter onto the transformers model, and its logits are the merged
checkpoint's (float32), from TP 1 and TP 2 sources, for the ``peft`` and ``peft-fused`` layouts.

The base's targeted weights are coarse (``tests/lora_reference.coarse_base``) so that every merged weight is
exact in bf16: PEFT computing ``W + s * B @ A`` in float32 and the merged checkpoint are then the same model,
and the logits agree to float32 rounding.
"""

from __future__ import annotations

import pytest
import torch

from streamconv.execute.executor import run_plan
from streamconv.plan.lora import LoraOptions
from streamconv.plan.mcore2hf import plan_mcore_to_hf
from tests import lora_reference as L
from tests.e2e.test_lora import RUN, build, split_layout

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft", reason="peft (the test extra) is not installed")

TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "linear_q_up_proj", "linear_kv_up_proj")
IDS = torch.tensor([[0, 5, 17, 42, 99, 200, 3, 7, 255, 1]])


def logits(model):
    model.eval()
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("tp", [1, 2])
def test_peft_loads_the_adapter_and_matches_the_merge(tiny_hf, tmp_path, tp):
    transformers.logging.set_verbosity_error()
    hf = L.coarse_base(tiny_hf["bf16"], str(tmp_path / "hf"), TARGETS)
    case = dict(tp=tp, ep=2, moe_grouped_gemm=True)
    base, lora, _ = build(hf, tmp_path, case, TARGETS, kind="type2", factors_kw=dict(a=(2, -3), b=(2, -4)))
    sizes, o = split_layout(case)
    merged = str(tmp_path / "merged")
    run_plan(plan_mcore_to_hf(base, merged, sizes, o, lora=LoraOptions(r=L.R, alpha="16", load=lora)), RUN)
    want = logits(transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32))
    plain = logits(transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32))
    assert (plain - want).abs().max() > 0.1   # the adapter matters
    for layout in ("peft", "peft-fused"):
        out = str(tmp_path / layout)
        run_plan(plan_mcore_to_hf(lora, out, sizes, o, hf_config_dir=hf,
                                  lora=LoraOptions(r=L.R, alpha="16", save_to_hf=True, export_layout=layout)), RUN)
        model = peft.PeftModel.from_pretrained(
            transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32), out)
        torch.testing.assert_close(logits(model), want, rtol=1e-5, atol=1e-5, msg=layout)
