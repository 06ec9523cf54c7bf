"""A stand-in for ``megatron/training/checkpointing.py`` of Megatron-LM core_r0.8.0 (what MindSpeed-LLM 2.0 and
2.1 run on), legacy path only: ``_load_base_checkpoint(load_dir, rank0=False, sharded_state_dict=None,
exit_on_missing_checkpoint=False, checkpoint_step=None)`` takes no ``args`` (it calls ``get_args()``) and returns
``(state_dict, checkpoint_name, release)``; ``load_checkpoint`` calls it with ``rank0=False`` and loads
``model`` / ``model%d`` as the later versions do.  Loaded under another module name by the tests."""

import os

import torch
from megatron.core import parallel_state as mpu

_GLOBAL_ARGS = None


def get_args():
    return _GLOBAL_ARGS


def _load_base_checkpoint(load_dir, rank0=False, sharded_state_dict=None, exit_on_missing_checkpoint=False,
                          checkpoint_step=None):
    tracker = os.path.join(load_dir, "latest_checkpointed_iteration.txt")
    if not os.path.isfile(tracker):
        return None, "", False
    with open(tracker) as f:
        iteration = int(f.read().strip())
    name = os.path.join(load_dir, "iter_{:07d}".format(iteration),
                        f"mp_rank_{mpu.get_tensor_model_parallel_rank():02d}", "model_optim_rng.pt")
    return torch.load(name, map_location="cpu", weights_only=False), name, False


def load_checkpoint(model, optimizer, opt_param_scheduler, load_arg="load", strict=True):
    args = get_args()
    state_dict, checkpoint_name, release = _load_base_checkpoint(getattr(args, load_arg), rank0=False)
    if state_dict is None:
        return 0
    iteration = 0 if (args.finetune or release) else state_dict["iteration"]
    if len(model) == 1:
        model[0].load_state_dict(state_dict["model"], strict=strict)
    else:
        for i in range(len(model)):
            model[i].load_state_dict(state_dict["model%d" % i], strict=strict)
    return iteration
