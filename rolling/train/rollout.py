"""Training rollouts of the causal student (ALGORITHM.md 8.3 step 3): the Rolling-Forcing rollout and
the Self-Forcing rollout, on the core's window schedule and KV-cache rules.

Rolling-Forcing rollout (mirrors :meth:`rolling.sampler.RollingSampler.stream`): windows, per-block
timesteps, re-noising and clean-cache passes exactly as at inference; re-noising and cache passes run
without gradient (their inputs are detached). Window w runs with gradient iff w % T == k (the offset
k is shared by all ranks) and it reaches into the loss frames (:func:`windows.gradient_windows`).
Each block's *output* is its x0 prediction from its offset window (w % T == k), so the output
mixes noise levels across blocks exactly like the reference; blocks whose offset window runs without
gradient get that window's detached x0 (the reference leaves them zero), and gradient is kept only on
loss-frame blocks. ``final`` is the finished video (each block's last-step x0 = inference output).

Self-Forcing rollout: block by block, steps 0..k with the shared exit step k (steps after k are
skipped), the exit-step forward carries gradient for blocks starting at or after N - loss_frames;
the block's x0 at step k is its output and is written to the cache (clean, t = context_noise; the
reference's sigma = 0.00498 noise injection is available as ``cache_noise=True``). Each step's
keys follow the core's ``plan_denoise(block, 1)``: re-rotated sink + up to span - 6 frames of clean
history + the block itself, as in the reference's Self-Forcing branch on the RF attention code.

Only clean-cache passes that something reads are run (those of the ramp-up windows 0..T-2 and of the
last window are overwritten / never read), which changes no value.

Shapes: latents [B, C, F, H, W]; ``context`` [B, tokens, text_dim].
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..config import RollingConfig
from ..noise import NoiseSource
from ..schedule import FlowSchedule, add_noise, iter_windows, window_at, x0_from_flow
from .cache import TrainKVCache
from .windows import gradient_windows, loss_frame_mask, loss_start, sf_gradient_blocks

BRANCHES = ("rolling", "self")


@dataclass(frozen=True)
class RolloutChoice:
    """The random decisions of one rollout, identical on all ranks.

    ``num_frames``: rollout length N (latent frames); ``branch``: ``rolling`` or ``self``;
    ``offset``: gradient-window offset k (rolling) or shared exit step (self), in 0..T-1."""

    num_frames: int
    branch: str
    offset: int

    def __post_init__(self):
        if self.branch not in BRANCHES:
            raise ValueError(f"branch must be one of {BRANCHES}, got {self.branch!r}")


@dataclass(frozen=True)
class ForwardRecord:
    """One student forward of a rollout. ``index``: window (rolling) or block (self);
    ``frames``: input latent frames [f0, f1); ``steps``: step index per block; ``grad``: ran with autograd."""

    kind: str
    index: int
    frames: tuple[int, int]
    steps: tuple[int, ...]
    grad: bool


@dataclass
class RolloutResult:
    """``video`` [B, C, N, H, W]: per-block outputs (see module docstring), with autograd on the loss
    blocks of gradient forwards; ``final`` [B, C, N, H, W]: the finished (detached) video."""

    choice: RolloutChoice
    video: torch.Tensor
    final: torch.Tensor
    grad_indices: list[int]
    records: list[ForwardRecord] = field(default_factory=list)


class GeneratorNoise:
    """Noise source drawing sequentially from a ``torch.Generator`` (one stream per rank)."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def __call__(self, block, step, shape, device, dtype):
        g = self.generator
        return torch.randn(shape, generator=g, device=g.device, dtype=torch.float32).to(device=device, dtype=dtype)


def identity_reencode(prefix: torch.Tensor) -> torch.Tensor:
    """Default re-encode hook: the last latent frame of ``prefix`` [B, C, n, H, W] as is -> [B, C, 1, H, W].

    The reference decodes ``prefix`` with the VAE, takes the last pixel frame and re-encodes it as a
    1-frame image latent; without a VAE the latent frame itself is kept (a documented deviation)."""
    return prefix[:, :, -1:]


def loss_clip(video: torch.Tensor, num_frames: int, loss_frames: int, frames_per_block: int,
              reencode: Callable[[torch.Tensor], torch.Tensor] = identity_reencode):
    """The last ``loss_frames`` frames of ``video`` and their gradient mask (ALGORITHM.md 8.3 step 4).

    If N > loss_frames, the first loss frame is replaced (no gradient) by ``reencode(video[:, :, :N-L+1])``
    and the mask drops the first block; returns (clip [B, C, L, H, W], mask [L] bool tensor or None)."""
    start = loss_start(num_frames, loss_frames)
    if num_frames == loss_frames:
        return video, None
    with torch.no_grad():
        first = reencode(video[:, :, :start + 1].detach())
    if first.shape[2] != 1:
        raise ValueError(f"reencode hook must return one latent frame, got {list(first.shape)}")
    clip = torch.cat([first.to(device=video.device, dtype=video.dtype), video[:, :, start + 1:]], dim=2)
    mask = torch.tensor(loss_frame_mask(num_frames, loss_frames, frames_per_block), device=video.device)
    return clip, mask


class Rollout:
    """Runs student rollouts. ``generator(x, timesteps, context, plan=, cache=) -> flow`` is a
    :class:`rolling.train.dit.WanDiT` (possibly FSDP-sharded); ``dtype`` is the KV-cache dtype."""

    def __init__(self, generator, cfg: RollingConfig, *, height: int, width: int, batch: int, device,
                 dtype=torch.float32, arch=None):
        self.gen, self.cfg = generator, cfg
        self.arch = arch or generator.arch
        self.height, self.width, self.batch = height, width, batch
        self.device, self.dtype = torch.device(device), dtype
        self.schedule = FlowSchedule(cfg.shift)
        self.t = self.schedule.warp(cfg.steps)
        self.sigma = [self.schedule.sigma(t) for t in self.t]
        self.t_ctx = float(cfg.context_noise)
        a = self.arch
        self.cache = TrainKVCache(cfg, num_layers=a.num_layers, num_heads=a.num_heads, head_dim=a.head_dim,
                                  batch=batch, grid=(height // a.patch_size[1], width // a.patch_size[2]),
                                  device=device, dtype=dtype)

    @property
    def num_steps(self) -> int:
        return self.cfg.num_steps

    def _draw(self, noise: NoiseSource, block: int, step: int) -> torch.Tensor:
        shape = (self.batch, self.arch.in_dim, self.cfg.frames_per_block, self.height, self.width)
        return noise(block, step, shape, self.device, self.dtype)

    def _sigmas(self, steps) -> torch.Tensor:
        fb = self.cfg.frames_per_block
        vals = [self.sigma[j] for j in steps for _ in range(fb)]
        return torch.tensor(vals, dtype=torch.float32, device=self.device).view(1, 1, -1, 1, 1)

    def run(self, context: torch.Tensor, choice: RolloutChoice, noise: NoiseSource, *, loss_frames: int,
            grad: bool = True, cache_noise: bool = False) -> RolloutResult:
        fb = self.cfg.frames_per_block
        if choice.num_frames % fb:
            raise ValueError(f"rollout length {choice.num_frames} is not a multiple of {fb}")
        if not 0 <= choice.offset < self.num_steps:
            raise ValueError(f"offset {choice.offset} out of range 0..{self.num_steps - 1}")
        loss_start(choice.num_frames, loss_frames)
        grad = grad and torch.is_grad_enabled()
        if choice.branch == "rolling":
            return self._rolling(context, choice, noise, loss_frames, grad)
        return self._self_forcing(context, choice, noise, loss_frames, grad, cache_noise)

    # ------------------------------------------------------------------ Rolling Forcing
    def _rolling(self, ctx, choice, noise, loss_frames, grad) -> RolloutResult:
        fb, T = self.cfg.frames_per_block, self.num_steps
        nb, k = choice.num_frames // fb, choice.offset
        start = choice.num_frames - loss_frames
        gws = gradient_windows(nb, T, k, fb, loss_frames)
        gset = set(gws) if grad else set()
        cache = self.cache
        cache.reset()
        noisy: dict[int, torch.Tensor] = {}
        out: list = [None] * nb
        final: list = [None] * nb
        records = []
        for win in iter_windows(nb, T):
            xs = [self._draw(noise, b, 0) if win.step(b) == 0 else noisy.pop(b) for b in win.blocks]
            x = torch.cat(xs, dim=2) if len(xs) > 1 else xs[0]
            tsteps = [self.t[j] for j in win.steps for _ in range(fb)]
            plan = cache.plan_denoise(win.first, len(win.steps))
            g = win.index in gset
            with torch.set_grad_enabled(g):
                v = self.gen(x, tsteps, ctx, plan=plan, cache=cache)
                x0 = x0_from_flow(x, v, self._sigmas(win.steps))
            records.append(ForwardRecord("denoise", win.index, (win.first * fb, (win.last + 1) * fb), win.steps, g))
            x0d = x0.detach()
            for i, b in enumerate(win.blocks):
                if win.index % T == k:  # the block's offset window: its output
                    keep = g and (b + 1) * fb > start
                    out[b] = x0[:, :, i * fb:(i + 1) * fb] if keep else x0d[:, :, i * fb:(i + 1) * fb]
                j = win.step(b)
                xb = x0d[:, :, i * fb:(i + 1) * fb]
                if j < T - 1:
                    noisy[b] = add_noise(xb, self._draw(noise, b, j + 1), self.sigma[j + 1])
                else:
                    final[b] = xb
            nxt = window_at(win.index + 1, nb, T) if win.index + 1 < nb + T - 1 else None
            if nxt is not None and nxt.first > win.first:  # block win.first is read later: write it clean
                with torch.no_grad():
                    self.gen(x0d[:, :, :fb], [self.t_ctx] * fb, ctx, plan=cache.plan_update(win.first), cache=cache)
                records.append(ForwardRecord("update", win.index, (win.first * fb, (win.first + 1) * fb), (), False))
        return RolloutResult(choice, torch.cat(out, dim=2), torch.cat(final, dim=2), gws if grad else [], records)

    # ------------------------------------------------------------------ Self Forcing
    def _self_forcing(self, ctx, choice, noise, loss_frames, grad, cache_noise) -> RolloutResult:
        fb = self.cfg.frames_per_block
        nb, k = choice.num_frames // fb, choice.offset
        gblocks = sf_gradient_blocks(nb, fb, loss_frames)
        gset = set(gblocks) if grad else set()
        cache = self.cache
        cache.reset()
        out, final, records = [], [], []
        for b in range(nb):
            x = self._draw(noise, b, 0)
            for j in range(k + 1):
                g = j == k and b in gset
                with torch.set_grad_enabled(g):
                    v = self.gen(x, [self.t[j]] * fb, ctx, plan=cache.plan_denoise(b, 1), cache=cache)
                    x0 = x0_from_flow(x, v, self._sigmas((j,)))
                records.append(ForwardRecord("denoise", b, (b * fb, (b + 1) * fb), (j,), g))
                if j < k:
                    x = add_noise(x0.detach(), self._draw(noise, b, j + 1), self.sigma[j + 1])
            out.append(x0)
            final.append(x0.detach())
            if b < nb - 1:
                xin = x0.detach()
                if cache_noise:  # reference: add_noise(x0, eps, t=0) -> sigma 0.00498
                    xin = add_noise(xin, self._draw(noise, b, -1), self.schedule.sigma(self.t_ctx))
                with torch.no_grad():
                    self.gen(xin, [self.t_ctx] * fb, ctx, plan=cache.plan_update(b), cache=cache)
                records.append(ForwardRecord("update", b, (b * fb, (b + 1) * fb), (), False))
        return RolloutResult(choice, torch.cat(out, dim=2), torch.cat(final, dim=2), gblocks if grad else [], records)
