"""``streamconv prepare-load``: a load directory for a training job's ``--load`` (no weights; see docs/loading.md)."""

from __future__ import annotations

from . import common

LAYOUT_DESTS = ("target_tensor_parallel_size", "target_pipeline_parallel_size", "target_expert_parallel_size",
                "model_type_hf", "moe_grouped_gemm", "mtp_num_layers", "num_layers", "first_k_dense_replace",
                "num_layers_per_virtual_pipeline_stage", "noop_layers", "num_layer_list", "schedules_method",
                "moe_tp_extend_ep", "expert_tensor_parallel_size", "mla_mm_split", "mla_key_names")


def register(sub) -> None:
    p = sub.add_parser("prepare-load", help="write a load directory (tracker + description, no weights) from which "
                                            "every training rank materialises its own tensors")
    p.add_argument("plan", nargs="?",
                   help="an hf2mcore or mcore2mcore plan JSON (or give --load-dir and the layout flags)")
    p.add_argument("--save-dir", required=True, help="the directory to pass to training as --load")
    p.add_argument("--load-dir", default=None, metavar="DIR",
                   help="an HF checkpoint directory (or zarr store), or an mcore checkpoint streamconv wrote "
                        "(resharded on load), instead of a plan: each rank plans only itself at start-up")
    p.add_argument("--target-tensor-parallel-size", type=int, default=None, metavar="TP")
    p.add_argument("--target-pipeline-parallel-size", type=int, default=None, metavar="PP")
    p.add_argument("--target-expert-parallel-size", type=int, default=None, metavar="EP")
    common.add_layout_flags(p, recorded=True)
    p.add_argument("--device", default="cpu",
                   help="where each rank's tensors are materialised: cpu (default; as torch.load(map_location="
                        "'cpu')), cuda, npu (the state dict then also occupies device memory until Megatron has "
                        "copied it into the model)")
    p.add_argument("--dequant-on", choices=["host", "device"], default="host",
                   help="decode FP8 on the host (default) or on the device (the fp8 bytes move; self-checked "
                        "against the host kernel at start-up, falling back to the host if they differ)")
    p.add_argument("--dequant-method", choices=["table", "cast"], default=None,
                   help="device FP8 decode: table (256-entry gather; NPU default) or cast (CUDA default)")
    p.add_argument("--workers", type=int, default=4, help="threads per rank computing bands (default 4)")
    p.add_argument("--max-memory", type=common.parse_size, default="256MiB",
                   help="bytes of bands in flight per rank (default 256MiB)")
    p.add_argument("--overwrite", action="store_true", help="allow a non-empty --save-dir")
    p.set_defaults(func=cmd_prepare_load)


def cmd_prepare_load(args) -> int:
    from ..errors import ValidationError
    from ..loader.loaddir import prepare_load
    from ..loader.rank import LoadOptions

    layout = {k: getattr(args, k) for k in LAYOUT_DESTS if getattr(args, k) is not None}
    if "noop_layers" in layout:
        layout["noop_layers"] = list(layout["noop_layers"])
    if "num_layer_list" in layout:
        layout["num_layer_list"] = list(layout["num_layer_list"])
    if args.plan is None and args.load_dir is None:
        raise ValidationError("prepare-load: give a plan JSON, or --load-dir DIR with the layout flags.")
    options = LoadOptions(device=args.device, dequant_on=args.dequant_on, method=args.dequant_method,
                          workers=args.workers, max_memory=args.max_memory)
    desc = prepare_load(args.save_dir, plan=args.plan, hf_dir=args.load_dir, layout=layout, options=options,
                        overwrite=args.overwrite)
    t = desc.target
    print(f"load directory {desc.path}: TP {t.get('tp')} PP {t.get('pp')} EP {t.get('ep')} from "
          f"{desc.plan or desc.hf_dir}; no weights written.")
    print(f"train with: --load {desc.path} --finetune --no-load-optim --no-load-rng, under "
          f"`python -m streamconv.launch` or after `import streamconv.loader.megatron`")
    return 0
