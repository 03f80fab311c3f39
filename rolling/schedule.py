"""Pure schedule bookkeeping: the shifted flow-matching table, warped timesteps, noise arithmetic,
the rolling window layout, and seconds <-> blocks <-> frames conversion. No model needed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from .config import PIXEL_FPS, validate_steps


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


# ---------------------------------------------------------------- rolling window layout

@dataclass(frozen=True)
class Window:
    """One rolling window: blocks ``first..last`` (inclusive), block b at step ``index - b``."""

    index: int
    first: int
    last: int
    num_steps: int

    @property
    def blocks(self) -> range:
        return range(self.first, self.last + 1)

    def step(self, block: int) -> int:
        return self.index - block

    @property
    def steps(self) -> tuple[int, ...]:
        return tuple(self.index - b for b in self.blocks)

    @property
    def new_block(self) -> int | None:
        """The block entering as pure noise (step 0), if any."""
        return self.index if self.first <= self.index <= self.last else None

    @property
    def finished_block(self) -> int | None:
        """The block that leaves the window finished after this forward, if any."""
        b = self.index - (self.num_steps - 1)
        return b if self.first <= b <= self.last else None


def num_windows(num_blocks: int | None, num_steps: int) -> int | None:
    """Windows of a video of ``num_blocks`` blocks (None for an unbounded stream)."""
    return None if num_blocks is None else num_blocks + num_steps - 1


def window_at(w: int, num_blocks: int | None, num_steps: int, first_block: int = 0) -> Window:
    """Window ``w``: blocks max(first_block, w - T + 1) .. min(num_blocks - 1, w).

    Unlike the reference (which breaks below T blocks), this closed form is right for any
    ``num_blocks >= 1``: each block b is denoised at step w - b in windows b .. b + T - 1.
    ``num_blocks=None`` means an unbounded stream; blocks before ``first_block`` were given (a prefix).
    """
    last = w if num_blocks is None else min(num_blocks - 1, w)
    return Window(w, max(first_block, w - num_steps + 1), last, num_steps)


def iter_windows(num_blocks: int | None, num_steps: int, start: int = 0) -> Iterator[Window]:
    w = start
    while num_blocks is None or w < num_windows(num_blocks, num_steps):
        yield window_at(w, num_blocks, num_steps)
        w += 1


# ---------------------------------------------------------------- time units

def pixel_frames(latent_frames: int) -> int:
    """Pixel frames decoded from N latent frames: 1 + 4 (N - 1)."""
    return 0 if latent_frames <= 0 else 1 + 4 * (latent_frames - 1)


def blocks_for_seconds(seconds: float, fps: float = PIXEL_FPS, frames_per_block: int = 3) -> int:
    """Whole blocks for a duration: latent frames = ceil((seconds*fps - 1)/4) + 1, rounded up to blocks.

    Rounds *up*, so the video is at least as long as asked (at most one block, 0.75 s, longer)."""
    if not (seconds > 0) or math.isinf(seconds):
        raise ValueError(f"length must be a positive number of seconds, got {seconds}")
    px = max(1, round(seconds * fps))
    latent = (px - 1 + 3) // 4 + 1
    return max(1, -(-latent // frames_per_block))


def seconds_for_blocks(num_blocks: int, fps: float = PIXEL_FPS, frames_per_block: int = 3) -> float:
    return pixel_frames(num_blocks * frames_per_block) / fps

