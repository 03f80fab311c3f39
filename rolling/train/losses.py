"""DMD losses (ALGORITHM.md 8.2, 8.3 steps 5-6): timestep law, teacher CFG, the generator's
distribution-matching loss and the critic's flow-matching loss.

One schedule everywhere: a DMD/critic timestep t (0..1000, continuous after the shift) uses
sigma = t / 1000 for noising, for x0 <-> flow conversion and (as t) for the time embedding. This is
the shift-5 flow-matching law itself (the table's entries are sigma_k = t_k / 1000); the reference
instead quantises sigma to the nearest entry of a 1000-entry table, and of a *shift-8* table in the
score wrappers, while embedding the unquantised t (fixed here, see :mod:`rolling.train`).

Shapes: x [B, C, F, H, W]; t [B] (one timestep per sample, shared by its frames); sigma broadcast as
[B, 1, 1, 1, 1].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def shifted_timestep(t: torch.Tensor, shift: float, t_min: float = 20.0, t_max: float = 980.0,
                     num_train_timesteps: int = 1000) -> torch.Tensor:
    """t' = T * shift*u / (1 + (shift-1)*u), u = t/T, clamped to [t_min, t_max] (float32)."""
    u = t.float() / num_train_timesteps
    if shift > 1:
        u = shift * u / (1 + (shift - 1) * u)
    return (u * num_train_timesteps).clamp(t_min, t_max)


def sample_timesteps(batch: int, generator: torch.Generator, *, shift: float = 5.0, t_min: float = 20.0,
                     t_max: float = 980.0, num_train_timesteps: int = 1000, device=None) -> torch.Tensor:
    """ALGORITHM 8.2: t ~ randint[0, 1000) per sample, shifted, clamped to [20, 980]. Returns [B] float32."""
    t = torch.randint(0, num_train_timesteps, (batch,), generator=generator, device=generator.device)
    return shifted_timestep(t, shift, t_min, t_max, num_train_timesteps).to(device or generator.device)


def _sig(t: torch.Tensor, num_train_timesteps: int = 1000) -> torch.Tensor:
    return (t.float() / num_train_timesteps).view(-1, 1, 1, 1, 1)


def noise_to(x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, num_train_timesteps: int = 1000) -> torch.Tensor:
    """x_t = (1 - sigma) x + sigma eps (float32 math, x's dtype out)."""
    s = _sig(t, num_train_timesteps).to(x.device)
    return ((1 - s) * x.float() + s * eps.float()).to(x.dtype)


def flow_to_x0(xt: torch.Tensor, v: torch.Tensor, t: torch.Tensor, num_train_timesteps: int = 1000) -> torch.Tensor:
    """x0 = x_t - sigma v (float32)."""
    return xt.float() - _sig(t, num_train_timesteps).to(xt.device) * v.float()


def frame_timesteps(t: torch.Tensor, frames: int) -> list[list[float]]:
    """[B] timesteps -> per-frame rows [B][F] of Python floats (the DiT's timestep format)."""
    return [[float(v)] * frames for v in t.tolist()]


def teacher_x0(teacher, xt: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
               guidance: float) -> torch.Tensor:
    """Real score with CFG in x0 space: cond + g * (cond - uncond); cond/uncond in one batched forward."""
    b, f = xt.shape[0], xt.shape[2]
    if uncond.shape[0] != b:
        uncond = uncond.expand(b, -1, -1)
    if cond.shape[0] != b:
        cond = cond.expand(b, -1, -1)
    ctx = torch.cat([cond, uncond.to(cond.dtype)], dim=0) if cond.shape[1] == uncond.shape[1] else None
    tt = torch.cat([t, t])
    if ctx is not None:
        v = teacher(torch.cat([xt, xt]), frame_timesteps(tt, f), ctx)
        x0 = flow_to_x0(torch.cat([xt, xt]), v, tt)
        x0c, x0u = x0[:b], x0[b:]
    else:  # different token counts: two forwards
        x0c = flow_to_x0(xt, teacher(xt, frame_timesteps(t, f), cond), t)
        x0u = flow_to_x0(xt, teacher(xt, frame_timesteps(t, f), uncond), t)
    return x0c + guidance * (x0c - x0u)


def dmd_gradient(x: torch.Tensor, fake_x0: torch.Tensor, real_x0: torch.Tensor) -> torch.Tensor:
    """DMD gradient (fake - real) / mean_{C,F,H,W} |x - real| per sample, NaN/inf -> finite (float32)."""
    norm = (x.float() - real_x0.float()).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    return torch.nan_to_num((fake_x0.float() - real_x0.float()) / norm)


def dmd_loss(x: torch.Tensor, grad: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """0.5 * MSE(x, stopgrad(x - grad)) in float64 over the frames in ``mask`` ([F] bool) or all."""
    xd = x.double()
    target = (xd - grad.double()).detach()
    if mask is not None:
        xd, target = xd[:, :, mask], target[:, :, mask]
    return 0.5 * F.mse_loss(xd, target, reduction="mean")


def generator_loss(x: torch.Tensor, mask: torch.Tensor | None, *, critic, teacher, cond: torch.Tensor,
                   uncond: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, guidance: float = 3.0):
    """DMD generator loss on the student's clip x [B, C, F, H, W] at timesteps t [B] with noise eps.

    Returns (loss, stats) with stats: ``dmd_gap`` = mean |fake x0 - real x0| and ``grad_norm`` =
    mean |grad| (both detached floats)."""
    f = x.shape[2]
    with torch.no_grad():
        xt = noise_to(x.detach(), eps, t)
        fake = flow_to_x0(xt, critic(xt, frame_timesteps(t, f), cond), t)
        real = teacher_x0(teacher, xt, t, cond, uncond, guidance)
        grad = dmd_gradient(x.detach(), fake, real)
    loss = dmd_loss(x, grad, mask)
    return loss, {"dmd_gap": (fake - real).abs().mean().item(), "dmd_grad": grad.abs().mean().item()}


def critic_loss(x: torch.Tensor, *, critic, cond: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Flow-matching loss of the fake score on generated x (detached): mean((v - (eps - x))^2), float32."""
    x = x.detach()
    xt = noise_to(x, eps, t)
    v = critic(xt, frame_timesteps(t, x.shape[2]), cond)
    return torch.mean((v.float() - (eps.float() - x.float())) ** 2)
