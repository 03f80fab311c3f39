"""Process group, rank-shared random decisions and FSDP2 sharding (``torch.distributed.fsdp.fully_shard``).

Launch with ``torchrun --nproc_per_node=N -m rolling train CONFIG``; a plain ``python -m rolling train``
runs on one device without a process group. Backend: NCCL on CUDA, gloo on CPU.

Sharding: every transformer block is one FSDP unit, the wrapper (embeddings, head) the root unit.
``full`` shards over all ranks; ``hybrid`` shards within a node and replicates across nodes (HSDP,
the reference's HYBRID_SHARD). Mixed precision: parameters in bf16 for compute, gradients reduced in
fp32, master weights and optimizer states fp32 (the reference's MixedPrecision(bf16, fp32, fp32)).
Inputs are cast by :class:`rolling.train.dit.WanDiT` itself (``cast_forward_inputs=False``), so
timesteps and RoPE tables are never rounded to bf16.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group torchrun set up (env RANK / WORLD_SIZE / LOCAL_RANK), if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    return DistInfo(rank, world, local_rank, local_world, dev)


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_ints(values: list[int], src: int = 0) -> list[int]:
    """Rank ``src``'s integers on every rank (identity without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [int(v) for v in values]
    t = torch.tensor([int(v) for v in values], dtype=torch.long, device=_comm_device())
    dist.broadcast(t, src=src)
    return [int(v) for v in t.tolist()]


def all_gather_ints(values: list[int]) -> list[list[int]]:
    """Every rank's integers (for checks and logging)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [[int(v) for v in values]]
    t = torch.tensor([int(v) for v in values], dtype=torch.long, device=_comm_device())
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [[int(v) for v in o.tolist()] for o in out]


def mean_over_ranks(x: float) -> float:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return float(x)
    t = torch.tensor([float(x)], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group: wait for every rank, then destroy it (no-op without one). Without the
    barrier a rank that finishes first tears gloo's connections down under the other's last
    collective, which on CPU aborts the process at exit ("terminate called without an active
    exception") after all its work was done."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def device_mesh(info: DistInfo, sharding: str = "full"):
    from torch.distributed.device_mesh import init_device_mesh
    if sharding == "hybrid" and info.local_world_size < info.world_size:
        if info.world_size % info.local_world_size:
            raise ValueError("hybrid sharding needs the same number of ranks on every node")
        return init_device_mesh(info.device.type, (info.world_size // info.local_world_size, info.local_world_size),
                                mesh_dim_names=("replicate", "shard"))
    return init_device_mesh(info.device.type, (info.world_size,))


def shard(module: nn.Module, mesh, *, bf16: bool) -> nn.Module:
    """FSDP2: one unit per transformer block of ``module.model`` plus the root; in place, returns module."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
                              reduce_dtype=torch.float32 if bf16 else None, cast_forward_inputs=False)
    for blk in module.model.blocks:
        fully_shard(blk, mesh=mesh, mp_policy=mp)
    fully_shard(module, mesh=mesh, mp_policy=mp)
    return module


def load_full_state_dict(module: nn.Module, sd: dict | None, info: DistInfo) -> None:
    """Load a full state dict held by rank 0 (``sd`` None elsewhere) into a sharded or plain module."""
    if info.distributed:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        set_model_state_dict(module, sd if info.is_main else {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    else:
        module.load_state_dict(sd, strict=True)


def reshard_all(module: nn.Module) -> nn.Module:
    """FSDP2 leaves the root's parameters unsharded after a no-grad forward: reshard every FSDP unit,
    so ``named_parameters()`` / ``state_dict()`` yield the sharded DTensors (no-op without FSDP)."""
    for m in module.modules():
        fn = getattr(m, "reshard", None)
        if callable(fn) and type(m).__name__.startswith("FSDP"):
            fn()
    return module


def full_state_dict(module: nn.Module, info: DistInfo) -> dict[str, torch.Tensor]:
    """Full CPU state dict on rank 0 (empty elsewhere), gathered tensor by tensor (so no rank ever
    holds more than one full tensor on the device). Collective under FSDP: call on all ranks."""
    out = {}
    for k, v in reshard_all(module).state_dict().items():
        if hasattr(v, "full_tensor"):
            v = v.full_tensor()
        if info.is_main:
            out[k] = v.detach().to("cpu").clone()
    return out


def clip_grad_norm(params, max_norm: float) -> float:
    """Clip the global gradient norm (DTensor-aware under FSDP); returns the norm before clipping."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    n = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(n, "full_tensor"):
        n = n.full_tensor()
    return float(n)
