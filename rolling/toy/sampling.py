"""Euler sampling of the bidirectional toy teacher (many steps, shifted flow-matching schedule).

sigma_i = shift*s/(1+(shift-1)*s) for s = linspace(1, 0, steps + 1), timestep = 1000 sigma (the law
of :mod:`rolling.train.losses`); x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v with v = eps - x0.
Classifier-free guidance as in :func:`rolling.train.losses.teacher_x0`: v = v_c + g (v_c - v_u),
so ``guidance=0`` is the plain conditional model.

Shapes: context / uncond [B or 1, tokens, text_dim]; returns latents [B, 16, frames, height, width]
(normalised latent space; ``frames`` latent frames, 21 = 81 pixel frames = 5.06 s at 16 fps).
"""
from __future__ import annotations

import torch
from torch import nn

from ..train.dit import WanDiT


def flow_sigmas(steps: int, shift: float = 5.0) -> list[float]:
    """steps + 1 noise levels from 1 down to 0 (shifted)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    s = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    if shift != 1:
        s = shift * s / (1 + (shift - 1) * s)
    return s.tolist()


def as_dit(model: nn.Module) -> WanDiT:
    """A WanDiT around a Wan2.1 module tree (returned as is if it already is one)."""
    return model if isinstance(model, WanDiT) else WanDiT(model)


@torch.no_grad()
def sample(model: nn.Module, context: torch.Tensor, uncond: torch.Tensor | None = None, *, frames: int = 21,
           height: int = 8, width: int = 8, steps: int = 50, shift: float = 5.0, guidance: float = 0.0,
           seed: int = 0, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Sample latents [B, 16, frames, height, width] with ``steps`` Euler steps (bidirectional forward)."""
    dit = as_dit(model)
    b = context.shape[0]
    if noise is None:
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(b, dit.arch.in_dim, frames, height, width, generator=g)
    x = noise.float().clone()
    use_cfg = guidance != 0 and uncond is not None
    ctx = context.float()
    if use_cfg:
        ctx = torch.cat([ctx, uncond.float().expand(b, -1, -1)], dim=0)
    sig = flow_sigmas(steps, shift)
    for s0, s1 in zip(sig[:-1], sig[1:]):
        t = [[1000.0 * s0] * x.shape[2]]
        if use_cfg:
            vc, vu = dit(torch.cat([x, x]), t, ctx).float().chunk(2)
            v = vc + guidance * (vc - vu)
        else:
            v = dit(x, t, ctx).float()
        x = x + (s1 - s0) * v
    return x
