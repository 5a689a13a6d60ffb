"""Activation checkpointing, per-block compile and FSDP2, applied in that order (the torchtitan order).

Works under plain ``torchrun``, Ray Train workers, or a single process (where only checkpointing and
compile apply). The model arrives on the meta device; ``materialize`` allocates and initialises it after
sharding, so no rank ever holds the full unsharded model.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from infra.config import JobConfig


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group, or (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def network(model: nn.Module) -> nn.Module:
    """The MM-DiT inside ``model``: the model itself, or ``model.net`` for a wrapper such as the sCD student
    (the network plus its log-variance head)."""
    return getattr(model, "net", model)


def apply_activation_checkpointing(model: nn.Module) -> None:
    net = network(model)
    for i, block in enumerate(net.joint_blocks):
        net.joint_blocks[i] = checkpoint_wrapper(block, preserve_rng_state=False)


def apply_compile(model: nn.Module) -> None:
    # One compiled graph per variant of a block's call: the pre-only last block, grad on or off, with or without
    # sCD's tangent, the frozen teacher's blocks. sCD's separate pass reaches dynamo's default of 8 per code
    # object, past which it would run further variants eagerly, without an error.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    for block in network(model).joint_blocks:
        block.compile(fullgraph=False)


def apply_fsdp(model: nn.Module, param_dtype: torch.dtype | None) -> None:
    """fully_shard each joint block, then the embedders and the final layer, then the root (which also
    holds whatever a wrapper adds around the network)."""
    if getattr(model, "fp32_compute_params", False):
        # The sCD student runs its JVP pass in fp32 (SCD.md section 3); bf16 compute comes from autocast.
        param_dtype = None
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    # The embedders' and the final layer's outputs are views (Linear on 3D input); FSDP2 warns that an
    # in-place op on them would skip its pre-backward hook. The model only uses them out of place.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    net = network(model)
    blocks = list(net.joint_blocks)
    for i, block in enumerate(blocks):
        # The last block is needed again first in backward: keep it gathered after forward.
        fully_shard(block, mp_policy=mp, reshard_after_forward=i < len(blocks) - 1)
    for name in ("x_embedder", "t_embedder", "y_embedder", "context_embedder", "final_layer"):
        fully_shard(getattr(net, name), mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    if dist.get_backend() == "gloo":
        # pytorch#162338: FSDP2's reduce-scatter with AVG on gloo can return the sum. Reduce with SUM
        # and divide ourselves, so gradients equal a 1-process run on every backend.
        for module in model.modules():
            if hasattr(module, "set_force_sum_reduction_for_comms"):
                module.set_force_sum_reduction_for_comms(True)
                module.set_gradient_divide_factor(float(dist.get_world_size()))


def parallelize(model: nn.Module, cfg: JobConfig, param_dtype: torch.dtype | None) -> nn.Module:
    if cfg.train.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.train.compile:
        apply_compile(model)
    if world()[1] > 1:
        apply_fsdp(model, param_dtype)
    return model


def reshard(model: nn.Module) -> None:
    """Return every FSDP2 module to its sharded parameters. A forward without backward (validation,
    sampling) leaves the last block gathered (it does not reshard after forward), and code that walks
    ``named_parameters`` must see the sharded DTensors."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _assign(param: nn.Parameter, full: torch.Tensor) -> None:
    """Copy a full initial value into a parameter, or into just its local shard when it is a DTensor."""
    if isinstance(param, DTensor):
        # src_data_rank=None: every rank holds the same full value and keeps its own slice, no comms.
        shard = distribute_tensor(full.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(shard.to_local())
    else:
        param.data.copy_(full.to(param.device))


def materialize(model: nn.Module, device: torch.device, seed: int) -> nn.Module:
    """Allocate a meta-built (possibly sharded) model on ``device`` and set its initial weights."""
    model.to_empty(device=device)
    model.init_weights(seed, assign=_assign)
    return model
