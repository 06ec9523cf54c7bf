"""Re-generate the saved example plans in plans/ (tests/golden checks that they stay in sync).

    python plans/generate.py            # from the repository root

demo_hf2mcore.json is the plan `make demo` runs: the tiny FP8 DeepSeek-V3 checkpoint that
`streamconv synth --preset tiny --fp8 --save-dir demo/hf` writes, converted to MindSpeed mcore at TP 2, PP 2,
EP 2 with grouped GEMM and MTP.  Its paths are relative, so it runs from the repository root:

    streamconv synth --preset tiny --fp8 --save-dir demo/hf && streamconv run plans/demo_hf2mcore.json
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from streamconv import synth  # noqa: E402
from streamconv.layout.parallel import ParallelSizes  # noqa: E402
from streamconv.layout.options import McoreOptions  # noqa: E402
from streamconv.plan.planner import plan_hf_to_mcore  # noqa: E402

DEMO_SIZES = ParallelSizes(tp=2, pp=2, ep=2)
DEMO_OPTIONS = McoreOptions(moe_grouped_gemm=True, mtp_num_layers=1)


def demo_plan(workdir: str):
    """Plan the demo conversion with paths relative to ``workdir`` (generating the checkpoint there)."""
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        synth.synth_checkpoint("demo/hf", dataclasses.replace(synth.TINY, fp8=True))
        return plan_hf_to_mcore("demo/hf", "demo/mcore", DEMO_SIZES, DEMO_OPTIONS)
    finally:
        os.chdir(cwd)


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        plan = demo_plan(tmp)
    target = os.path.join(HERE, "demo_hf2mcore.json")
    plan.save(target)
    print(f"wrote {target}: {len(plan.files)} files, {plan.tensor_count} tensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
