"""Recipe estimates for DeepSeek-V3 671B in the layouts of MindSpeed-LLM's training scripts.

    python plans/recipes.py          # from the repository root; ~1 min, a few MB of disk

Each recipe is planned on a headers-only 671B checkpoint (`synth_checkpoint(..., headers_only=True)`: real
headers, sparse files) and summarised in plans/recipes/<name>.json as a dry-run estimate: the command line,
files, tensors and bytes per rank file.  (Full 671B plans are ~40 MB of JSON each, so only summaries are kept.)
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from streamconv import synth  # noqa: E402
from streamconv.layout.parallel import ParallelSizes  # noqa: E402
from streamconv.layout.options import McoreOptions  # noqa: E402
from streamconv.plan.planner import plan_hf_to_mcore  # noqa: E402

# name -> (sizes, options, where the layout comes from)
RECIPES = {
    "pretrain_dualpipev_tp_extend_ep": (
        ParallelSizes(4, 8, 8),
        McoreOptions(moe_grouped_gemm=True, mtp_num_layers=1, num_layers=64, noop_layers=(61, 62, 63),
                     dualpipev=True, moe_tp_extend_ep=True),
        "pretrain script until 2025-11: 64 slots, noop 61-63, dualpipev, TP 4 EP 8 with tp-extend-ep"),
    "pretrain_etp1": (
        ParallelSizes(4, 8, 32),
        McoreOptions(moe_grouped_gemm=True, mtp_num_layers=1, num_layers=64, noop_layers=(61, 62, 63),
                     expert_tensor_parallel_size=1),
        "pretrain scripts since 2025-11-29: TP 4 EP 32 with --expert-tensor-parallel-size 1 (32 files per stage)"),
    "convert_example_vpp": (
        ParallelSizes(2, 8, 32),
        McoreOptions(moe_grouped_gemm=True, mtp_num_layers=1, num_layers=64, noop_layers=(47, 62, 63), vpp_layers=2),
        "the conversion example: 64 slots, PP 8, 2 layers per virtual stage, noop 47,62,63"),
    "sft_num_layer_list": (
        ParallelSizes(1, 8, 4),
        McoreOptions(moe_grouped_gemm=True, mtp_num_layers=1, num_layer_list=(7, 7, 7, 8, 8, 8, 8, 8)),
        "SFT scripts: PP 8 with --num-layer-list 7,7,7,8,8,8,8,8, EP 4"),
}


def command(sizes: ParallelSizes, o: McoreOptions) -> str:
    flags = [f"--target-tensor-parallel-size {sizes.tp}", f"--target-pipeline-parallel-size {sizes.pp}",
             f"--target-expert-parallel-size {sizes.ep}"]
    if o.moe_grouped_gemm:
        flags.append("--moe-grouped-gemm")
    if o.mtp_num_layers:
        flags.append(f"--mtp-num-layers {o.mtp_num_layers}")
    if o.num_layers is not None:
        flags.append(f"--num-layers {o.num_layers}")
    if o.noop_layers:
        flags.append("--noop-layers " + ",".join(map(str, o.noop_layers)))
    if o.vpp_layers:
        flags.append(f"--num-layers-per-virtual-pipeline-stage {o.vpp_layers}")
    if o.num_layer_list:
        flags.append("--num-layer-list " + ",".join(map(str, o.num_layer_list)))
    if o.dualpipev:
        flags.append("--schedules-method dualpipev")
    if o.moe_tp_extend_ep:
        flags.append("--moe-tp-extend-ep")
    if o.expert_tensor_parallel_size:
        flags.append(f"--expert-tensor-parallel-size {o.expert_tensor_parallel_size}")
    return "streamconv plan hf2mcore --load-dir DeepSeek-V3 --save-dir ds3-mcore " + " ".join(flags)


def summaries(hf_dir: str) -> dict[str, dict]:
    out = {}
    for name, (sizes, options, source) in RECIPES.items():
        plan = plan_hf_to_mcore(hf_dir, "ds3-mcore", sizes, options)
        out[name] = {
            "layout": source,
            "command": command(sizes, options),
            "files": len(plan.files),
            "tensors": plan.tensor_count,
            "bytes": plan.nbytes,
            "dropped": len(plan.dropped),
            "per_rank": [{"path": f.path, "tensors": len(f.tensors), "bytes": f.nbytes} for f in plan.files],
        }
    return out


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        synth.synth_checkpoint(os.path.join(tmp, "hf"), synth.DEEPSEEK_V3_671B, headers_only=True)
        result = summaries(os.path.join(tmp, "hf"))
    os.makedirs(os.path.join(HERE, "recipes"), exist_ok=True)
    for name, summary in result.items():
        with open(os.path.join(HERE, "recipes", name + ".json"), "w") as f:
            json.dump(summary, f, indent=1)
            f.write("\n")
        print(f"{name}: {summary['files']} files, {summary['tensors']} tensors, {summary['bytes'] / 1e12:.2f} TB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
