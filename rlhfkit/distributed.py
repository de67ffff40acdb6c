"""Sharded training (FSDP2) through accelerate, for every step.

Chosen the usual way: `accelerate launch --config_file configs/accelerate/fsdp2.yaml -m rlhfkit.cli sft ...`
sets accelerate's FSDP plugin (`fsdp_version: 2`) through the environment; `make_accelerator` (training.py)
then calls `enable_fsdp`. What a step does differently under FSDP2, each in one helper here:

- `wrap_blocks`: before `accelerator.prepare`, name the transformer block class to shard by (accelerate
  would read `_no_split_modules`, which rlhfkit's wrappers around the HF model do not have);
- `even_share`: this process's share of evaluation items, padded so that every process runs equally
  many forward passes (each FSDP2 forward all-gathers, a collective every process must join);
- `full_model`: the finished model gathered whole on the main process, for `save_pretrained`;
- `shard_frozen`: a frozen network (PPO's reference or reward model) sharded the same way, outside the
  optimiser and the checkpoint;
- `gathered`: a context in which a sharded model's weights are all-gathered once and kept, for generation
  (one gather per rollout instead of one per token);
- checkpoints need nothing: accelerate's `save_state` / `load_state` write and read the sharded
  model and optimiser as a distributed checkpoint (`pytorch_model_fsdp_0/`, `optimizer_0/`, `*.distcp`)
  when the plugin's state dict type is SHARDED_STATE_DICT.

Mixed precision is FSDP2's own policy: bf16 parameters and compute, fp32 gradient reduction, fp32 sharded
master weights and optimiser state (`precision: bf16`); accelerate's autocast is then off (it returns a
null context under FSDP). The same policy runs on CPU (gloo).
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Callable, Sequence

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

log = logging.getLogger("rlhfkit.distributed")


def uses_fsdp(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP


def fsdp_requested() -> bool:
    """`accelerate launch` with an FSDP config (or `--use_fsdp`) sets this for every process."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def enable_fsdp(accelerator: Accelerator, precision: str) -> None:
    """Finish setting up FSDP2 on a fresh `accelerator`: on CPU switch it on, and set the precision policy.

    accelerate turns its FSDP plugin on only for accelerator devices (MULTI_GPU, MULTI_XPU...); on CPU the
    processes form a gloo group (MULTI_CPU) and the plugin is ignored. FSDP2 itself runs on CPU with gloo,
    so there we switch accelerate's shared state to FSDP (in both singletons: `AcceleratorState()` copies
    PartialState's fields whenever it is re-created); everything after (prepare, save_state, load_state,
    get_state_dict, clip_grad_norm_, no_sync) is then accelerate's own FSDP2 path.
    """
    if not fsdp_requested():
        return
    cpu_group = accelerator.distributed_type in (DistributedType.MULTI_CPU, DistributedType.FSDP)
    # On CPU; and after `AcceleratorState._reset_state` (make_accelerator, a new precision), which leaves the type FSDP
    # but no plugin, on a GPU too.
    if cpu_group and getattr(accelerator.state, "fsdp_plugin", None) is None:
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # reads FSDP_* from the environment
        for shared in (PartialState._shared_state, AcceleratorState._shared_state):
            shared["distributed_type"] = DistributedType.FSDP
        log.info("FSDP2 switched on: %d processes (%s) shard the model", accelerator.num_processes, accelerator.device.type)
    if not uses_fsdp(accelerator):
        return
    plugin = accelerator.state.fsdp_plugin
    if plugin.fsdp_version != 2:
        raise ValueError(f"the accelerate config asks for FSDP version {plugin.fsdp_version}; rlhfkit supports fsdp_version: 2 (see configs/accelerate/fsdp2.yaml)")
    if precision == "bf16":
        from torch.distributed.fsdp import MixedPrecisionPolicy

        # accelerate's default for bf16 also reduces gradients in bf16; an fp32 reduction keeps the sum over many
        # processes exact enough (torchtitan's default too).
        plugin.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        plugin.mixed_precision_policy = None  # fp32 throughout


def wrap_blocks(accelerator: Accelerator, model: torch.nn.Module, block_class: type | None = None) -> None:
    """Shard by transformer block: each block is one FSDP2 unit, gathered just before it runs.

    accelerate's TRANSFORMER_BASED_WRAP reads the HF model's `_no_split_modules`, which the modules rlhfkit
    prepares (SFT's loss wrapper, the reward model, PPO's policy-and-value) do not carry; the block class
    is found here instead (the largest ModuleList's element type) unless the config names one."""
    if not uses_fsdp(accelerator):
        return
    plugin = accelerator.state.fsdp_plugin
    if plugin.transformer_cls_names_to_wrap:
        return
    if block_class is None:
        from .models import transformer_blocks

        hf = next((m for m in model.modules() if hasattr(m, "get_input_embeddings") and hasattr(m, "config")), model)
        block_class = type(transformer_blocks(hf)[0])
    plugin.transformer_cls_names_to_wrap = [block_class.__name__]  # used by fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP


def even_batches(accelerator: Accelerator, mine: Sequence[Any], counts: Sequence[int], batch_size: int, filler: Any) -> list[Any]:
    """`mine` padded with copies of `filler` to as many batches of `batch_size` as the process with the most
    items has (`counts`: every process's number of items), so that under FSDP every process runs the same
    number of forward passes (each all-gathers: a collective all must join). Without FSDP, `mine` as it is.
    The padding's results are to be dropped."""
    if not uses_fsdp(accelerator) or not counts:
        return list(mine)
    batches = -(-max(counts) // batch_size)
    return list(mine) + [filler] * (batches * batch_size - len(mine))


def even_share(items: Sequence[Any], accelerator: Accelerator, batch_size: int) -> tuple[list[Any], int]:
    """This process's items ``items[rank::world]`` (padded by `even_batches`) and how many of them are real."""
    world = accelerator.num_processes
    mine = list(items[accelerator.process_index :: world])
    if not items:
        return mine, 0
    counts = [len(items[r::world]) for r in range(world)]
    return even_batches(accelerator, mine, counts, batch_size, items[0]), len(mine)


def full_model(accelerator: Accelerator, wrapped: torch.nn.Module, rebuild: Callable[[], torch.nn.Module]) -> torch.nn.Module | None:
    """The trained model whole, on the main process (None on the others); every process must call it.

    Without FSDP the prepared model is unwrapped. Under FSDP every parameter is a shard: the full state
    dict is gathered on the main process (accelerate's `get_state_dict`, offloaded to CPU) and loaded into a
    fresh unsharded copy built by `rebuild()` (same architecture, adapters and head), which then saves with
    `save_pretrained` (LoRA merged if asked) like any model."""
    if not uses_fsdp(accelerator):
        return accelerator.unwrap_model(wrapped) if accelerator.is_main_process else None
    state = accelerator.get_state_dict(wrapped)
    if not accelerator.is_main_process:
        return None
    model = rebuild()
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in tied_names(model)]
    if missing or unexpected:
        raise RuntimeError(f"gathering the sharded model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def tied_names(model: torch.nn.Module) -> set[str]:
    """Names of parameters that share storage with an earlier one (tied embeddings): the gathered state dict may list one."""
    seen, tied = {}, set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied |= {name, seen[id(p)]}
        seen.setdefault(id(p), name)
    return tied


def shard_frozen(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """A frozen network (no gradients, no optimiser), sharded by transformer block under FSDP2 with the run's
    precision policy; without FSDP moved to the device whole. It is not registered with the accelerator, so
    checkpoints do not save it (it never changes). Every process must run its forwards in step (collectives)."""
    model.requires_grad_(False)
    if not uses_fsdp(accelerator):
        return model.to(accelerator.device)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from .models import transformer_blocks

    plugin = accelerator.state.fsdp_plugin
    kwargs = {"reshard_after_forward": True, "mp_policy": plugin.mixed_precision_policy or MixedPrecisionPolicy()}
    hf = next((m for m in model.modules() if hasattr(m, "get_input_embeddings") and hasattr(m, "config")), model)
    for block in transformer_blocks(hf):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


@contextlib.contextmanager
def gathered(accelerator: Accelerator, model: torch.nn.Module):
    """Within the context `model`'s sharded weights are all-gathered once and kept whole across forward passes;
    on exit they are freed (sharded again). For generation: without it every new token gathers every block
    again. Costs the whole model's (param_dtype) weights on each process while inside. No-op without FSDP."""
    if not uses_fsdp(accelerator):
        yield model
        return
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        # Set up the root now (FSDP does it in the first forward of a root): a block that ran first outside the
        # root's forward (generation calls the policy, not the module around it) would take the root's place.
        model._get_fsdp_state()._lazy_init()
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    # FSDP keeps no public getter; each unit's setting is read from its parameter groups to restore it on exit.
    before = [any(g.post_forward_mesh_info is not None for g in m._get_fsdp_state()._fsdp_param_groups) for m in units]
    for m in units:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield model
    finally:
        for m, reshard in zip(units, before):
            m.reshard()
            m.set_reshard_after_forward(reshard, recurse=False)


def parameter_bytes_per_process(*models: torch.nn.Module | None) -> dict[str, int]:
    """Bytes of this process's share of the trained and of the frozen parameters of ``models`` (a shard under
    FSDP), each tensor counted once (step 3's networks may share some)."""
    out, seen = {"trained": 0, "frozen": 0}, set()
    for p in (p for m in models if m is not None for p in m.parameters()):
        if id(p) in seen:
            continue
        seen.add(id(p))
        local = p.to_local() if hasattr(p, "to_local") else p
        out["trained" if p.requires_grad else "frozen"] += local.numel() * local.element_size()
    return out
