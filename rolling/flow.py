"""Flow-matching arithmetic of the release: the shifted timestep table, warped step lists, and the
one denoising step (x0 from the flow prediction, re-noise to the next level) that inference and
training share. No model needed.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .config import validate_steps


class FlowSchedule:
    """Shifted flow-matching table of the release (1000 entries, float32), as in the reference.

    sigma_k = shift*s/(1+(shift-1)*s) for s = linspace(1, 0, 1001)[:1000]; timestep_k = 1000*sigma_k.
    A nominal step v in 1..1000 is *warped* to timestep_k at k = 1000 - v.
    """

    def __init__(self, shift: float = 5.0, num_train_timesteps: int = 1000):
        if not shift > 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        self.shift, self.n = float(shift), num_train_timesteps
        s = torch.linspace(1.0, 0.0, num_train_timesteps + 1, dtype=torch.float32)[:-1]
        self.sigmas = shift * s / (1 + (shift - 1) * s)
        self.timesteps = self.sigmas * num_train_timesteps
        self._t = self.timesteps.tolist()
        self._s = self.sigmas.tolist()

    def warp(self, steps: Sequence[int]) -> list[float]:
        """Nominal steps (e.g. [1000, 800, 600, 400, 200]) -> timesteps fed to the model (float32 values)."""
        steps = validate_steps(steps)
        ext = self._t + [0.0]
        return [ext[self.n - v] for v in steps]

    def sigma(self, t: float) -> float:
        """sigma of the table entry nearest to timestep t (t = 0 maps to the last entry, 0.00498)."""
        k = min(range(self.n), key=lambda i: abs(self._t[i] - t))
        return self._s[k]


def add_noise(x0: torch.Tensor, eps: torch.Tensor, sigma: float) -> torch.Tensor:
    """(1 - sigma) x0 + sigma eps, computed in float32, returned in eps's dtype."""
    return ((1.0 - sigma) * x0.float() + sigma * eps.float()).to(eps.dtype)


def x0_from_flow(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x0 = x_t - sigma * v (v = eps - x0 is the model's flow prediction); float32 math, v's dtype out.

    ``sigma`` broadcasts against x (e.g. [1, 1, F, 1, 1] per latent frame for [B, C, F, H, W])."""
    return (x.float() - sigma * v.float()).to(v.dtype)


class Steps:
    """A run's step table: warped timesteps ``t[j]`` and their sigmas for steps j = 0..T-1, the
    per-frame sigma tensors the x0 conversion needs (memoised per step pattern, on ``device``), and
    what a forward plan (:class:`rolling.schedule.Forward`) means numerically: its input
    (:meth:`input`) and, from the flow prediction, each block's x0 and re-noised latent (:meth:`output`).
    ``context_noise`` is the timestep of clean blocks (0 = clean)."""

    def __init__(self, steps: Sequence[int], shift: float, frames_per_block: int, device=None,
                 context_noise: float = 0.0):
        self.table = FlowSchedule(shift)
        self.t = self.table.warp(steps)
        self.sigma = [self.table.sigma(t) for t in self.t]
        self.fb, self.device, self.t_ctx = frames_per_block, device, float(context_noise)
        self._memo: dict = {}

    def __len__(self) -> int:
        return len(self.t)

    def frame_timesteps(self, steps: Sequence[int]) -> list[float]:
        """Timestep of every latent frame of blocks at these steps (``frames_per_block`` each)."""
        return [self.t[j] for j in steps for _ in range(self.fb)]

    def frame_sigmas(self, steps: Sequence[int]) -> torch.Tensor:
        """[1, 1, F, 1, 1] float32 sigmas for blocks at these steps."""
        key = tuple(steps)
        s = self._memo.get(key)
        if s is None:
            vals = [self.sigma[j] for j in key for _ in range(self.fb)]
            s = self._memo[key] = torch.tensor(vals, dtype=torch.float32).view(1, 1, -1, 1, 1).to(self.device)
        return s

    def denoise(self, x: torch.Tensor, v: torch.Tensor, steps: Sequence[int]) -> torch.Tensor:
        """x0 of blocks at ``steps`` from their input x and flow prediction v ([B, C, F, H, W])."""
        return x0_from_flow(x, v, self.frame_sigmas(steps))

    def renoise(self, x0: torch.Tensor, eps: torch.Tensor, next_step: int) -> torch.Tensor:
        """A block's x0 prediction re-noised to step ``next_step`` with fresh noise ``eps``."""
        return add_noise(x0, eps, self.sigma[next_step])

    def timesteps(self, fwd) -> list[float]:
        """Per-frame timesteps of a forward's input: clean blocks at the context noise, then the steps."""
        return [self.t_ctx] * (self.fb * len(fwd.clean)) + self.frame_timesteps(fwd.steps)

    def input(self, fwd, clean: dict, noisy: dict, draw) -> torch.Tensor:
        """A forward's input latents [B, C, F, H, W]: its clean blocks (``clean[b]``), then each denoised
        block as fresh noise ``draw(b, 0)`` at step 0, else its latent re-noised earlier (``noisy[b]``)."""
        xs = [clean[b] for b in fwd.clean] + [draw(b, 0) if j == 0 else noisy[b] for b, j in zip(fwd.blocks, fwd.steps)]
        return torch.cat(xs, dim=2) if len(xs) > 1 else xs[0]

    def output(self, fwd, x: torch.Tensor, v: torch.Tensor, draw) -> tuple[dict, dict]:
        """From a forward's input x and flow prediction v: each denoised block's x0 (autograd kept) and
        the blocks re-noised to their next step with fresh noise ``draw(b, next_step)`` (from detached x0)."""
        nc = len(fwd.clean) * self.fb
        if not fwd.blocks:
            return {}, {}
        x0 = self.denoise(x[:, :, nc:], v[:, :, nc:], fwd.steps)
        at = {b: x0[:, :, i * self.fb:(i + 1) * self.fb] for i, b in enumerate(fwd.blocks)}
        return at, {b: self.renoise(at[b].detach(), draw(b, j), j) for b, j in fwd.renoise}
