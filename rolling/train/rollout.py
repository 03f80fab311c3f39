"""Training rollouts of the causal student (ALGORITHM.md 8.3 step 3): the Rolling-Forcing rollout and
the Self-Forcing rollout, as drivers over the same schedules as inference (:mod:`rolling.schedule`,
with ``writes="needed"``: clean-cache passes run only where something reads them, which changes no
value) and the same numerics (:class:`rolling.flow.Steps`); re-noising and cache passes run without
gradient (their inputs are detached).

Rolling-Forcing rollout: the ``rolling`` schedule. Window w runs with gradient iff w % T == k (the
offset k is shared by all ranks) and it reaches into the loss frames (:func:`windows.gradient_windows`).
Each block's *output* is its x0 prediction from its offset window (w % T == k), so the output mixes
noise levels across blocks exactly like the reference; blocks whose offset window runs without
gradient get that window's detached x0 (the reference leaves them zero), and gradient is kept only
on loss-frame blocks. ``final`` is the finished video (each block's last-step x0 = inference output).

Self-Forcing rollout: the ``chunk_causal`` schedule truncated at the shared exit step k (steps after
k are skipped, so step k finishes a block); the exit-step forward carries gradient for blocks
starting at or after N - loss_frames; the block's x0 at step k is its output and is written to the
cache (clean, t = context_noise; the reference's sigma = 0.00498 noise injection is available as
``cache_noise=True``). The student's cache read rules are Rolling Forcing's for both branches, as in
the reference's Self-Forcing branch on the RF attention code.

Shapes: latents [B, C, F, H, W]; ``context`` [B, tokens, text_dim].
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..config import RollingConfig
from ..flow import Steps, add_noise
from ..noise import NoiseSource
from ..schedule import forwards
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
        self.steps = Steps(cfg.steps, cfg.shift, cfg.frames_per_block, device, cfg.context_noise)
        a = self.arch
        self.cache = TrainKVCache(cfg, num_layers=a.num_layers, num_heads=a.num_heads, head_dim=a.head_dim,
                                  batch=batch, grid=(height // a.patch_size[1], width // a.patch_size[2]),
                                  device=device, dtype=dtype)

    @property
    def num_steps(self) -> int:
        return self.cfg.num_steps

    def run(self, context: torch.Tensor, choice: RolloutChoice, noise: NoiseSource, *, loss_frames: int,
            grad: bool = True, cache_noise: bool = False) -> RolloutResult:
        fb = self.cfg.frames_per_block
        if choice.num_frames % fb:
            raise ValueError(f"rollout length {choice.num_frames} is not a multiple of {fb}")
        if not 0 <= choice.offset < self.num_steps:
            raise ValueError(f"offset {choice.offset} out of range 0..{self.num_steps - 1}")
        loss_start(choice.num_frames, loss_frames)
        grad = grad and torch.is_grad_enabled()
        nb, k = choice.num_frames // fb, choice.offset
        start = choice.num_frames - loss_frames
        if choice.branch == "rolling":
            steps, items = self.steps, forwards("rolling", self.num_steps, nb, writes="needed")
            gset = set(gradient_windows(nb, self.num_steps, k, fb, loss_frames)) if grad else set()

            def with_grad(f):
                return f.window in gset

            def is_output(f, b):
                return f.window % self.num_steps == k
        else:
            steps = Steps(self.cfg.steps[:k + 1], self.cfg.shift, fb, self.device, self.cfg.context_noise)
            items = forwards("chunk_causal", k + 1, nb, writes="needed")
            gset = set(sf_gradient_blocks(nb, fb, loss_frames)) if grad else set()

            def with_grad(f):
                return f.steps == (k,) and f.blocks[0] in gset

            def is_output(f, b):
                return f.steps == (k,)
        out, final, records = [None] * nb, [None] * nb, []
        noisy, kept = {}, {}
        cache = self.cache
        cache.reset()

        def draw(b, j):
            shape = (self.batch, self.arch.in_dim, fb, self.height, self.width)
            return noise(b, j, shape, self.device, self.dtype)
        for f in items:
            g = bool(f.blocks) and with_grad(f)
            clean = kept
            if f.clean and cache_noise and choice.branch == "self":  # reference: add_noise(x0, eps, t=0)
                clean = {b: add_noise(kept[b], draw(b, -1), steps.table.sigma(steps.t_ctx)) for b in f.clean}
            x = steps.input(f, clean, noisy, draw)
            plan = cache.plan(f)
            with torch.set_grad_enabled(g):
                v = self.gen(x, steps.timesteps(f), context, plan=plan, cache=cache)
                at, renoised = steps.output(f, x, v, draw)
            cache.commit(plan)
            for b in f.clean:
                kept.pop(b)
            noisy.update(renoised)
            kept.update({b: at[b].detach() for b in f.keep})
            for b in f.finished:
                final[b] = at[b].detach()
            for b in f.blocks:
                if is_output(f, b):
                    out[b] = at[b] if g and (b + 1) * fb > start else at[b].detach()
            first, last = (f.clean or f.blocks)[0], (f.clean + f.blocks)[-1]
            records.append(ForwardRecord("denoise" if f.blocks else "update", f.window if choice.branch == "rolling"
                                         else first, (first * fb, (last + 1) * fb), f.steps, g))
        return RolloutResult(choice, torch.cat(out, dim=2), torch.cat(final, dim=2), sorted(gset), records)
