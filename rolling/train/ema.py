"""Exponential moving average of the generator's weights (ALGORITHM.md 8.2: decay 0.99, created at
step 200 as a copy of the current weights, updated after every generator step).

shadow <- d * shadow + (1 - d) * param, in float32 on the CPU (as the reference). Under FSDP each
rank keeps the EMA of its own parameter shard (DTensor local shards; no communication per update);
:meth:`EMA.full_state_dict` gathers full tensors for a checkpoint.
"""
from __future__ import annotations

import torch
from torch import nn

from .distributed import reshard_all


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


class EMA:
    """EMA over the trainable parameters of ``module`` (keys = ``module.named_parameters()`` names)."""

    def __init__(self, module: nn.Module, decay: float, *, device="cpu", dtype=torch.float32):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.device, self.dtype = torch.device(device), dtype
        with torch.no_grad():
            self.shadow = {n: _local(p).detach().to(device=self.device, dtype=dtype).clone()
                           for n, p in reshard_all(module).named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        d = self.decay
        for n, p in reshard_all(module).named_parameters():
            if n in self.shadow:
                s = self.shadow[n]
                s.mul_(d).add_(_local(p).detach().to(device=s.device, dtype=s.dtype), alpha=1.0 - d)

    @torch.no_grad()
    def full_state_dict(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """Full (unsharded) EMA tensors on the CPU, keyed like ``module.state_dict()`` without FSDP
        infixes. Collective under FSDP: call on every rank."""
        out = {}
        for n, p in reshard_all(module).named_parameters():
            if n not in self.shadow:
                continue
            s = self.shadow[n]
            if hasattr(p, "to_local"):  # DTensor shard -> full tensor (all-gather)
                from torch.distributed.tensor import DTensor
                dt = DTensor.from_local(s.to(device=p.to_local().device), p.device_mesh, p.placements,
                                        shape=p.shape, stride=p.stride())
                s = dt.full_tensor()
            out[n] = s.detach().to("cpu").clone()
        return out

    @torch.no_grad()
    def load_full_state_dict(self, module: nn.Module, sd: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`full_state_dict` (resume): keep this rank's shard of each full tensor."""
        missing = set(self.shadow) - set(sd)
        if missing:
            raise KeyError(f"EMA state is missing {len(missing)} keys, e.g. {sorted(missing)[:3]}")
        for n, p in reshard_all(module).named_parameters():
            if n not in self.shadow:
                continue
            full = sd[n]
            if hasattr(p, "to_local"):
                from torch.distributed.tensor import distribute_tensor
                full = distribute_tensor(full.to(device=p.to_local().device, dtype=p.dtype), p.device_mesh,
                                         p.placements).to_local()
            self.shadow[n].copy_(full)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(sd)
        if missing:
            raise KeyError(f"EMA state is missing {len(missing)} keys, e.g. {sorted(missing)[:3]}")
        for n in self.shadow:
            self.shadow[n].copy_(sd[n])
