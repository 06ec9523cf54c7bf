"""A stand-in for ``megatron/training/checkpointing.py`` of Megatron-LM, for driving streamconv's hook the way
Megatron calls it.  Megatron-LM's training package is not on PyPI (the megatron-core wheel ships only
``megatron.core``), so tests put this directory on ``sys.path``; ``megatron`` is a namespace package, so
``megatron.core`` stays the installed one.

What it reproduces, written from Megatron-LM's source (core_v0.12.1 ... main; see docs/loading.md), reduced
to the legacy ``torch`` checkpoint path:

- ``_load_base_checkpoint(load_dir, args, rank0=False, sharded_state_dict=None, checkpointing_context=None)``
  reads the tracker, names this rank's file with ``get_checkpoint_name`` (ranks from ``megatron.core``'s
  parallel state), ``torch.load``s it and returns ``(state_dict, checkpoint_name, release, ckpt_type)``, or
  ``(None, '', False, None)`` without a tracker.
- ``load_checkpoint(ddp_model, optimizer, opt_param_scheduler, load_arg='load', strict=True, ...)`` calls it
  (first with ``rank0=True`` when ``args.auto_detect_ckpt_format``), sets the checkpoint version, takes the
  iteration (0 under ``--finetune`` or a release), loads ``state_dict['model']`` into a single model chunk or
  ``state_dict['model%d' % i]`` into chunk i, then the optimizer and RNG state unless ``--finetune`` /
  ``--no-load-optim`` / ``--no-load-rng``, and returns ``(iteration, num_floating_point_operations_so_far)``.
"""

import os
from enum import Enum, auto

import torch
from megatron.core import parallel_state as mpu

_GLOBAL_ARGS = None
_CHECKPOINT_VERSION = None


class CheckpointType(Enum):
    LEGACY = auto()
    LOCAL = auto()
    GLOBAL = auto()
    TORCH_DCP = auto()
    FSDP_DTENSOR = auto()


def get_args():
    return _GLOBAL_ARGS


def set_checkpoint_version(value):
    global _CHECKPOINT_VERSION
    _CHECKPOINT_VERSION = value


def get_checkpoint_tracker_filename(checkpoints_path):
    return os.path.join(checkpoints_path, "latest_checkpointed_iteration.txt")


def read_metadata(tracker_filename):
    with open(tracker_filename) as f:
        text = f.read().strip()
    if text == "release":
        return 0, True
    return int(text), False


def get_checkpoint_name(checkpoints_path, iteration, release=False, pipeline_parallel=None, tensor_rank=None,
                        pipeline_rank=None, expert_parallel=None, expert_rank=None, return_base_dir=False,
                        basename="model_optim_rng.pt"):
    directory = "release" if release else "iter_{:07d}".format(iteration)
    if return_base_dir:
        return os.path.join(checkpoints_path, directory)
    if pipeline_parallel is None:
        pipeline_parallel = mpu.get_pipeline_model_parallel_world_size() > 1
    if tensor_rank is None:
        tensor_rank = mpu.get_tensor_model_parallel_rank()
    if pipeline_rank is None:
        pipeline_rank = mpu.get_pipeline_model_parallel_rank()
    if expert_parallel is None:
        expert_parallel = mpu.get_expert_model_parallel_world_size() > 1
    if expert_rank is None:
        expert_rank = mpu.get_expert_model_parallel_rank()
    if not pipeline_parallel:
        common = os.path.join(checkpoints_path, directory, f"mp_rank_{tensor_rank:02d}")
    else:
        common = os.path.join(checkpoints_path, directory, f"mp_rank_{tensor_rank:02d}_{pipeline_rank:03d}")
    if expert_parallel:
        common += f"_{expert_rank:03d}"
    return os.path.join(common, basename)


def _load_base_checkpoint(load_dir, args, rank0=False, sharded_state_dict=None, checkpointing_context=None):
    tracker = get_checkpoint_tracker_filename(load_dir)
    if not os.path.isfile(tracker):
        return None, "", False, None
    iteration, release = read_metadata(tracker)
    checkpoint_name = get_checkpoint_name(load_dir, iteration, release, return_base_dir=False)
    state_dict = torch.load(checkpoint_name, map_location="cpu", weights_only=False)
    return state_dict, checkpoint_name, release, CheckpointType.LEGACY


def load_checkpoint(ddp_model, optimizer, opt_param_scheduler, load_arg="load", strict=True,
                    checkpointing_context=None, skip_load_to_model_and_opt=False):
    args = get_args()
    load_dir = getattr(args, load_arg)
    if getattr(args, "auto_detect_ckpt_format", False):
        _load_base_checkpoint(load_dir, args, rank0=True, checkpointing_context=checkpointing_context)
    state_dict, checkpoint_name, release, ckpt_type = _load_base_checkpoint(
        load_dir, args, rank0=False, checkpointing_context=checkpointing_context)
    if state_dict is None:
        return 0, 0
    set_checkpoint_version(state_dict.get("checkpoint_version", 0))
    iteration = 0 if (args.finetune or release) else state_dict["iteration"]
    if len(ddp_model) == 1:
        ddp_model[0].load_state_dict(state_dict["model"], strict=strict)
    else:
        for i in range(len(ddp_model)):
            if "model%d" % i not in state_dict:
                continue
            ddp_model[i].load_state_dict(state_dict["model%d" % i], strict=strict)
    if not release and not args.finetune and not args.no_load_optim:
        optimizer.load_state_dict(state_dict["optimizer"])
    if not release and not args.finetune and not args.no_load_rng:
        torch.set_rng_state(state_dict["rng_state"][0]["torch_rng_state"])
    return iteration, state_dict.get("num_floating_point_operations_so_far", 0)
