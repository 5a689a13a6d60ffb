"""Activation checkpointing, per-block compile and FSDP2, applied in that order (the torchtitan order).

Works under plain ``torchrun``, Ray Train workers, or a single process (where only checkpointing and
compile apply). The model arrives on the meta device; ``materialize`` allocates and initialises it after
sharding, so no rank ever holds the full unsharded model.

FSDP2 shards over every rank by default. With ``cluster.shard_size`` it shards within groups of that many
ranks and replicates across the groups (HSDP): a 2D mesh ("replicate", "shard"), where each rank holds
1/shard_size of the state and only the gradient all-reduce crosses groups. Every rank still trains on its own
slice of the batch, so everything outside this file (data, RNG streams, metric reductions, checkpoints) sees
the same data-parallel world either way.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from infra.config import JobConfig


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group, or (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def resolve_device(cfg: JobConfig) -> torch.device:
    if cfg.train.device == "cpu" or (cfg.train.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    local = dist.get_rank() % torch.cuda.device_count() if dist.is_initialized() else 0
    return torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_initialized() else local)


# One mesh per process group and shape: the sCD teacher and student share it (and its sub-groups, which
# every rank must create together), so their DTensors copy into each other locally.
_MESHES: dict[tuple, DeviceMesh] = {}


def hsdp_mesh(cfg: JobConfig) -> DeviceMesh | None:
    """The 2D ("replicate", "shard") mesh of ``cluster.shard_size``, or None for plain FSDP2 over all ranks
    (shard_size 0, or equal to the world size). Ray Train and torchrun number ranks node by node, so a shard
    group (consecutive ranks) is a node when shard_size is the GPUs per node."""
    _, world_size = world()
    shard = cfg.cluster.shard_size
    if shard in (0, world_size):
        return None
    if world_size % shard:
        raise ValueError(
            f"cluster.shard_size={shard} does not divide the {world_size} ranks of this job; use a divisor of "
            f"the world size (the ranks of a node), or 0 to shard over all ranks"
        )
    device_type = resolve_device(cfg).type
    key = (dist.distributed_c10d._get_default_group(), device_type, shard)
    if key not in _MESHES:
        shape = (world_size // shard, shard)
        _MESHES[key] = init_device_mesh(device_type, shape, mesh_dim_names=("replicate", "shard"))
    return _MESHES[key]


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


def apply_fsdp(model: nn.Module, param_dtype: torch.dtype | None, mesh: DeviceMesh | None = None) -> None:
    """fully_shard each joint block, then the embedders and the final layer, then the root (which also
    holds whatever a wrapper adds around the network). ``mesh``: a 2D mesh for HSDP; None = all ranks."""
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
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=i < len(blocks) - 1)
    for name in ("x_embedder", "t_embedder", "y_embedder", "context_embedder", "final_layer"):
        fully_shard(getattr(net, name), mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    if dist.get_backend() == "gloo":
        # pytorch#162338: FSDP2's reduce-scatter with AVG on gloo can return the sum (and gloo's all-reduce has
        # no AVG). Forced to SUM, FSDP2 divides once after both reductions by the shard group's size times the
        # replicate group's, the world size: gradients equal a 1-process run. No explicit divide factor: with
        # a shard group of one rank FSDP2 would apply it twice (before the all-reduce and after).
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_force_sum_reduction_for_comms(True)


def parallelize(model: nn.Module, cfg: JobConfig, param_dtype: torch.dtype | None) -> nn.Module:
    if cfg.train.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.train.compile:
        apply_compile(model)
    if world()[1] > 1:
        apply_fsdp(model, param_dtype, hsdp_mesh(cfg))
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
