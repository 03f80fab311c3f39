"""The rolling-window sampler: an iterator that yields each finished block the moment it leaves the
window. Default settings reproduce the published Rolling Forcing sampler (ALGORITHM.md section 4).

Per window w (blocks s..e, block b at step j = w - b):
1. one forward denoises all blocks jointly (each frame with its own timestep);
2. each block's x0 prediction is re-noised to its next step with fresh noise, except the block at
   the last step, which is finished and yielded;
3. a clean-cache pass writes block s's clean K/V (``update_mode="reference"``: its own forward;
   ``"fused"``: folded into the next window's forward, and skipped where nothing reads it).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from .attention import get_attention
from .cache import RollingKVCache
from .config import RollingConfig
from .forward import TextContext, TimeEmbedder, WanArch, forward
from .noise import NoiseSource, SeededNoise
from .schedule import FlowSchedule, Window, add_noise, iter_windows, window_at, x0_from_flow


@dataclass
class FinishedBlock:
    """A finished block: ``latents`` [B, C, frames_per_block, H, W] (normalised latent space)."""

    index: int
    latents: torch.Tensor
    window: int
    elapsed_s: float
    timings: dict = field(default_factory=dict)

    @property
    def first_frame(self) -> int:
        return self.index * self.latents.shape[2]


@dataclass(frozen=True)
class CallRecord:
    """One logical DiT call, for schedule checks: ``updating_cache`` False = denoising pass."""

    start_frame: int
    num_frames: int
    updating_cache: bool
    timesteps: tuple[float, ...]
    forward_index: int


def validate_latent_size(height: int, width: int, patch: tuple[int, int, int] = (1, 2, 2)) -> None:
    for name, v, p in (("height", height, patch[1]), ("width", width, patch[2])):
        if not isinstance(v, int) or v <= 0 or v % p:
            raise ValueError(f"latent {name} must be a positive multiple of {p} (pixel size a multiple of "
                             f"{8 * p}), got {v}")


class RollingSampler:
    """Rolling Forcing sampling on any Wan2.1-named module tree.

    Args:
        model: the DiT (``rolling.model.WanModel`` or ComfyUI's ``WanModel``), weights on ``device``.
        cfg: window / sink / cache configuration (defaults = the reference).
        height, width: latent size (pixels / 8), both even.
        batch: videos generated together (same schedule, own noise and text).
        device, dtype: compute device and dtype (bf16 in the reference; fp32 for exact tests).
        attention: backend name (``sdpa``, ``sage``, ``flash``, ``auto``) or a callable.
        noise: a :class:`rolling.noise.NoiseSource`; default ``SeededNoise(seed)``.
        on_call: optional callback receiving a :class:`CallRecord` per logical DiT call.
    """

    def __init__(self, model: nn.Module, cfg: RollingConfig | None = None, *, height: int, width: int,
                 batch: int = 1, device=None, dtype=torch.bfloat16, attention="sdpa",
                 noise: NoiseSource | None = None, seed: int = 0,
                 on_call: Callable[[CallRecord], None] | None = None):
        self.model, self.cfg = model, cfg or RollingConfig()
        self.arch = WanArch.of(model)
        validate_latent_size(height, width, self.arch.patch_size)
        if not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be a positive integer, got {batch}")
        self.height, self.width, self.batch = height, width, batch
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.dtype = dtype
        self.attn = attention if callable(attention) else get_attention(attention, self.device)
        self.noise = noise or SeededNoise(seed)
        self.on_call = on_call
        self.schedule = FlowSchedule(self.cfg.shift)
        self.t = self.schedule.warp(self.cfg.steps)  # timestep per step index
        self.sigma = [self.schedule.sigma(t) for t in self.t]
        self.t_ctx = float(self.cfg.context_noise)
        self.grid = (height // self.arch.patch_size[1], width // self.arch.patch_size[2])
        self.cache: RollingKVCache | None = None
        self.time = TimeEmbedder(model, dtype=dtype, device=self.device)
        self._sigma_memo: dict = {}
        self.forwards = 0

    # ------------------------------------------------------------------ helpers
    def text_context(self, context) -> TextContext:
        """Accept a TextContext or a raw umT5 embedding [B, tokens, text_dim]."""
        if isinstance(context, TextContext):
            return context
        ctx = torch.as_tensor(context)
        if ctx.ndim == 2:
            ctx = ctx.unsqueeze(0)
        if ctx.ndim != 3 or ctx.shape[-1] != self.arch.text_dim:
            raise ValueError(f"text embedding must be [batch, tokens, {self.arch.text_dim}] for this model, got "
                             f"{list(ctx.shape)}; use the umT5-XXL text encoder (Wan2.1's)")
        if ctx.shape[0] == 1 and self.batch > 1:
            ctx = ctx.expand(self.batch, -1, -1)
        if ctx.shape[0] != self.batch:
            raise ValueError(f"text embedding batch {ctx.shape[0]} does not match batch {self.batch}")
        return TextContext(self.model, ctx, dtype=self.dtype, device=self.device)

    def _new_cache(self) -> RollingKVCache:
        a = self.arch
        return RollingKVCache(self.cfg, num_layers=a.num_layers, num_heads=a.num_heads, head_dim=a.head_dim,
                              batch=self.batch, grid=self.grid, device=self.device, dtype=self.dtype)

    def _sigmas(self, steps: tuple) -> torch.Tensor:
        s = self._sigma_memo.get(steps)
        if s is None:
            fb = self.cfg.frames_per_block
            vals = [self.sigma[j] for j in steps for _ in range(fb)]
            s = self._sigma_memo[steps] = torch.tensor(vals, dtype=torch.float32).view(1, 1, -1, 1, 1).to(self.device)
        return s

    def _draw(self, block: int, step: int) -> torch.Tensor:
        shape = (self.batch, self.arch.in_dim, self.cfg.frames_per_block, self.height, self.width)
        return self.noise(block, step, shape, self.device, self.dtype)

    def _record(self, start_frame, num_frames, updating, timesteps):
        if self.on_call is not None:
            self.on_call(CallRecord(start_frame, num_frames, updating, tuple(timesteps), self.forwards))

    def _text_plan(self, text, frames):
        return [(0, frames, text)]

    # ------------------------------------------------------------------ main loop
    @torch.no_grad()
    def stream(self, context, num_blocks: int | None) -> Iterator[FinishedBlock]:
        """Yield finished blocks in order. ``num_blocks=None`` streams without end (memory stays flat)."""
        if num_blocks is not None and (not isinstance(num_blocks, int) or num_blocks < 1):
            raise ValueError(f"number of blocks must be a positive integer, got {num_blocks!r}")
        text = self.text_context(context)
        cfg, fb, T = self.cfg, self.cfg.frames_per_block, self.cfg.num_steps
        fused = cfg.update_mode == "fused"
        if self.cache is None:
            self.cache = self._new_cache()
        cache = self.cache
        cache.reset()
        noisy: dict[int, torch.Tensor] = {}
        pending_clean: tuple[int, torch.Tensor] | None = None  # fused mode: block written next forward
        t_start = time.perf_counter()
        for win in iter_windows(num_blocks, T):
            steps = win.steps
            xs = [self._draw(b, 0) if win.step(b) == 0 else noisy.pop(b) for b in win.blocks]
            x = torch.cat(xs, dim=2) if len(xs) > 1 else xs[0]
            tsteps = [self.t[j] for j in steps for _ in range(fb)]
            nf = x.shape[2]
            if pending_clean is not None:
                cb, cx = pending_clean
                plan = cache.plan_fused(cb, win.first, len(steps))
                self._record(cb * fb, fb, True, [self.t_ctx] * fb)
                self._record(win.first * fb, nf, False, tsteps)
                v = forward(self.model, self.arch, torch.cat([cx, x], dim=2), [self.t_ctx] * fb + tsteps, plan,
                            cache, self._text_plan(text, fb + nf), self.time, self.attn)[:, :, fb:]
                pending_clean = None
            else:
                plan = cache.plan_denoise(win.first, len(steps))
                self._record(win.first * fb, nf, False, tsteps)
                v = forward(self.model, self.arch, x, tsteps, plan, cache, self._text_plan(text, nf),
                            self.time, self.attn)
            self.forwards += 1
            x0 = x0_from_flow(x, v, self._sigmas(steps))
            finished = None
            for i, b in enumerate(win.blocks):
                j = win.step(b)
                xb = x0[:, :, i * fb:(i + 1) * fb]
                if j < T - 1:
                    noisy[b] = add_noise(xb, self._draw(b, j + 1), self.sigma[j + 1])
                else:
                    finished = FinishedBlock(b, xb.clone(), win.index, time.perf_counter() - t_start)
            if finished is not None:
                yield finished
            clean = x0[:, :, :fb]
            if fused:
                nxt = None if num_blocks is not None and win.index + 1 >= num_blocks + T - 1 else \
                    window_at(win.index + 1, num_blocks, T)
                if nxt is not None and nxt.first > win.first:
                    pending_clean = (win.first, clean)
            else:
                plan = cache.plan_update(win.first)
                self._record(win.first * fb, fb, True, [self.t_ctx] * fb)
                forward(self.model, self.arch, clean, [self.t_ctx] * fb, plan, cache,
                        self._text_plan(text, fb), self.time, self.attn)
                self.forwards += 1

    def generate(self, context, num_blocks: int) -> torch.Tensor:
        """The whole latent video [B, C, num_blocks * frames_per_block, H, W]."""
        blocks = [blk.latents for blk in self.stream(context, num_blocks)]
        return torch.cat(blocks, dim=2)


def sample_video(model: nn.Module, context, num_blocks: int, *, height: int, width: int,
                 cfg: RollingConfig | None = None, **kw) -> torch.Tensor:
    """Convenience: generate ``num_blocks`` blocks and return the latent video [B, C, F, H, W]."""
    return RollingSampler(model, cfg, height=height, width=width, **kw).generate(context, num_blocks)
