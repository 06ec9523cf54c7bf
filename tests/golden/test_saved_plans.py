"""Saved plans in plans/ are what the planner produces today (re-generate with `make plans`)."""

import json
import os

from plans.generate import demo_plan

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_demo_plan_in_sync(tmp_path):
    with open(os.path.join(ROOT, "plans", "demo_hf2mcore.json")) as f:
        saved = json.load(f)
    fresh = demo_plan(str(tmp_path)).to_json()
    assert fresh == saved, "plans/demo_hf2mcore.json is stale: run `make plans`"


def test_saved_plan_runs(tmp_path, monkeypatch):
    """The saved plan, exactly as shipped, converts the demo checkpoint (relative paths, from its root)."""
    from streamconv.execute.executor import run_plan
    from streamconv.plan.plan import Plan
    from tests.reference import assert_same_checkpoint, load_mcore_dir, reference_hf_to_mcore

    demo_plan(str(tmp_path))  # writes tmp/demo/hf
    monkeypatch.chdir(tmp_path)
    run_plan(Plan.load(os.path.join(ROOT, "plans", "demo_hf2mcore.json")))
    expected = reference_hf_to_mcore("demo/hf", tp=2, pp=2, ep=2, moe_grouped_gemm=True, mtp_num_layers=1)
    assert_same_checkpoint(load_mcore_dir("demo/mcore"), expected)
