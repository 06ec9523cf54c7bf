"""The Megatron-LM / MindSpeed-LLM hook: ``_load_base_checkpoint`` answers from a streamconv load directory.

Megatron's ``load_checkpoint`` gets each rank's state dict from one function,
``megatron.training.checkpointing._load_base_checkpoint(load_dir, args, rank0=False, ...)`` (``(load_dir,
rank0=False, ...)`` before core 0.9), and then loads ``state_dict['model']`` (``model0``, ``model1``... under
virtual pipeline parallelism) into the model with ``load_state_dict``.  That function is the narrowest place
to stand: everything before it (arguments, parallel state) and after it (the model load, ``--finetune``
handling) stays Megatron's.  MindSpeed-LLM wraps the same function (LoRA, high availability), so the hook
is a wrapper too, and with MindSpeed present it is registered through MindSpeed's patch manager, which keeps
it when MindSpeed re-applies its patches.

For a ``--load`` directory written by ``streamconv prepare-load`` the hooked function returns what the legacy
loader would have read from ``iter_0000001/mp_rank_.../model_optim_rng.pt``: the rank's tensors, materialised
from the source, with ``checkpoint_version`` and ``iteration``; the rank comes from Megatron's parallel state.
With ``rank0=True`` (reading arguments, detecting the format) it returns the scalars only, reading no
tensor.  Any other directory goes to the original function unchanged.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import sys
import time

from ..errors import StreamconvError, ValidationError
from ..layout.parallel import RankFile
from .loaddir import LoadDir, rank_path, read_load_dir

log = logging.getLogger(__name__)

MODULE = "megatron.training.checkpointing"
FUNCTION = "_load_base_checkpoint"
PATCH_NAME = f"{MODULE}.{FUNCTION}"
_MISSING = object()


class HookError(StreamconvError):
    """The hook cannot be installed (Megatron-LM's training package is not importable, or has no such function)."""


def install(module=None):
    """Hook ``_load_base_checkpoint`` of ``module`` (default: import :data:`MODULE`); idempotent.  Returns the
    function now in place."""
    if module is None:
        try:
            module = importlib.import_module(MODULE)
        except ImportError as exc:
            raise HookError(f"{MODULE}: not importable ({exc}). The hook needs Megatron-LM's training package "
                            f"(the megatron-core wheel does not ship it): put Megatron-LM's checkout on PYTHONPATH.") \
                from None
    current = getattr(module, FUNCTION, None)
    if current is None:
        raise HookError(f"{module.__name__}.{FUNCTION}: not found. This Megatron version is not one the hook "
                        f"was checked against (docs/loading.md lists them).")
    if _is_hooked(current):
        return current
    manager = _mindspeed_manager()
    if manager is not None and PATCH_NAME in getattr(manager, "patches_info", {}):
        # MindSpeed re-applies a patch from the original function plus its registered wrappers: registered
        # there, the hook survives MindSpeed applying its patches again.
        manager.register_patch(PATCH_NAME, streamconv_load_base_checkpoint_wrapper)
        manager.patches_info[PATCH_NAME].apply_patch()
        installed = getattr(module, FUNCTION)
        if _is_hooked(installed):
            log.info("streamconv hook registered with MindSpeed's patch manager for %s", PATCH_NAME)
            return installed
    hooked = streamconv_load_base_checkpoint_wrapper(current, module)
    setattr(module, FUNCTION, hooked)
    for other in list(sys.modules.values()):   # modules that imported the function by name
        if other is not module and getattr(other, FUNCTION, None) is current:
            setattr(other, FUNCTION, hooked)
    log.info("streamconv hook installed on %s", PATCH_NAME)
    return hooked


def _is_hooked(fn) -> bool:
    while fn is not None:
        if getattr(fn, "_streamconv_hook", False):
            return True
        fn = getattr(fn, "__wrapped__", None)
    return False


def _mindspeed_manager():
    mod = sys.modules.get("mindspeed.patch_utils")
    return getattr(mod, "MindSpeedPatchesManager", None) if mod is not None else None


def streamconv_load_base_checkpoint_wrapper(fn, module=None):
    """Wrap ``fn`` (Megatron's ``_load_base_checkpoint``, or a MindSpeed wrapper of it).  The name ends in
    ``wrapper`` on purpose: MindSpeed's patch manager stacks functions so named as decorators."""
    module = module if module is not None else sys.modules.get(MODULE)
    sig = inspect.signature(fn)
    with_type = "args" in sig.parameters     # core >= 0.9 returns (state_dict, name, release, ckpt_type)

    @functools.wraps(fn)
    def _load_base_checkpoint(*a, **kw):
        try:
            bound = sig.bind(*a, **kw)
        except TypeError:
            return fn(*a, **kw)
        desc = read_load_dir(bound.arguments.get("load_dir"))
        if desc is None:
            return fn(*a, **kw)
        args = bound.arguments.get("args", _MISSING)
        if args is _MISSING:
            args = _megatron_args(module)
        state_dict, name = load_base_checkpoint(desc, args, rank0=bool(bound.arguments.get("rank0", False)))
        if with_type:
            return state_dict, name, False, module.CheckpointType.LEGACY
        return state_dict, name, False

    _load_base_checkpoint._streamconv_hook = True
    return _load_base_checkpoint


def _megatron_args(module):
    get_args = getattr(module, "get_args", None)
    if get_args is None:
        get_args = importlib.import_module("megatron.training.global_vars").get_args
    return get_args()


def megatron_rank() -> RankFile:
    """This process's (tensor, pipeline, expert) model-parallel rank from Megatron's parallel state."""
    from megatron.core import parallel_state as mpu

    return RankFile(mpu.get_tensor_model_parallel_rank(), mpu.get_pipeline_model_parallel_rank(),
                    mpu.get_expert_model_parallel_rank())


def load_base_checkpoint(desc: LoadDir, args, *, rank0: bool = False, rank: RankFile | None = None):
    """``(state_dict, checkpoint_name)`` for Megatron from load directory ``desc``; see the module docstring."""
    if rank0:
        return dict(desc.attrs), rank_path(desc, RankFile(0, 0, 0))
    check_args(desc, args)
    r = rank if rank is not None else megatron_rank()
    start = time.monotonic()
    source = desc.open_rank(r.tp_rank, r.pp_rank, r.ep_rank)
    state_dict = source.state_dict(**desc.options)
    log.info("streamconv: rank tp %d pp %d ep %d, %.2f GB from %s in %.1f s (FP8 decoded on the %s)", r.tp_rank,
             r.pp_rank, r.ep_rank, source.nbytes / 1e9, desc.plan or desc.hf_dir, time.monotonic() - start,
             source.dequant_used)
    return state_dict, rank_path(desc, r)


def check_args(desc: LoadDir, args) -> None:
    """The training job's arguments against the layout the load directory was prepared for, before any read."""
    target, model = desc.target, desc.model
    tp = int(target.get("tp", 1))
    etp_planned = model.get("expert_tensor_parallel_size") or tp
    expected = {
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": int(target.get("pp", 1)),
        "expert_model_parallel_size": int(target.get("ep", 1)),
        "moe_grouped_gemm": bool(model.get("moe_grouped_gemm")),
        "moe_tp_extend_ep": bool(model.get("moe_tp_extend_ep")),
        "mtp_num_layers": int(model.get("mtp_num_layers") or 0),
    }
    if not model.get("dualpipev") and model.get("vpp_layers") is not None:
        expected["num_layers_per_virtual_pipeline_stage"] = model.get("vpp_layers")
    if model.get("dualpipev"):
        expected["schedules_method"] = "dualpipev"
    problems = []
    for name, want in expected.items():
        got = getattr(args, name, _MISSING)
        if got is _MISSING:
            continue
        if isinstance(want, bool):
            got = bool(got)
        elif name == "mtp_num_layers":
            got = int(got or 0)
        if got != want:
            problems.append(f"--{name.replace('_', '-')} {got} but {desc.path} was prepared for {want}. Use the "
                            f"layout of the load directory, or run `streamconv prepare-load` for this one.")
    etp = getattr(args, "expert_tensor_parallel_size", _MISSING)
    if etp is not _MISSING and etp is not None and not model.get("moe_tp_extend_ep") and etp != etp_planned:
        problems.append(f"--expert-tensor-parallel-size {etp} but {desc.path} was prepared for {etp_planned}.")
    finetune = bool(getattr(args, "finetune", False))
    if not finetune and not (getattr(args, "no_load_optim", False) and getattr(args, "no_load_rng", False)):
        problems.append(f"{desc.path}: a streamconv load directory holds weights only (no optimizer, no RNG state). "
                        f"Add --finetune --no-load-optim --no-load-rng.")
    if problems:
        raise ValidationError(problems)
