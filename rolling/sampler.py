"""The rolling-window sampler: an iterator that yields each finished block the moment it leaves the
window. Default settings reproduce the published Rolling Forcing sampler (ALGORITHM.md section 4).

Per window w (blocks s..e, block b at step j = w - b):
1. one forward denoises all blocks jointly (each frame with its own timestep, each block with the
   text of its own prompt segment);
2. each block's x0 prediction is re-noised to its next step with fresh noise, except the block at
   the last step, which is finished and yielded;
3. a clean-cache pass writes block s's clean K/V (``update_mode="reference"``: its own forward, run
   before the next window; ``"fused"``: folded into the next window's forward, and skipped where
   nothing reads it).

Between two windows the whole run is described by a :class:`RunState` (window index, noisy blocks in
flight, the pending clean-cache write, clean latents of cached blocks) plus the KV cache, so a run
can be saved at any block boundary and resumed (:meth:`RollingSampler.save_state`), or started
from given latent frames (``prefix=``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from .attention import get_attention
from .cache import RollingKVCache
from .config import RollingConfig
from .forward import ParamCast, TextContext, TimeEmbedder, WanArch, forward
from .noise import NoiseSource, SeededNoise
from .prompts import PromptSchedule
from .schedule import FlowSchedule, Window, add_noise, num_windows, window_at, x0_from_flow

STATE_VERSION = 1


@dataclass
class FinishedBlock:
    """A finished block: ``latents`` [B, C, frames_per_block, H, W] (the model's normalised latent space)."""

    index: int
    latents: torch.Tensor
    window: int
    elapsed_s: float
    segment: str = ""

    @property
    def first_frame(self) -> int:
        return self.index * self.latents.shape[2]


@dataclass(frozen=True)
class CallRecord:
    """One logical DiT call, for schedule checks: ``updating_cache`` False = denoising pass.
    ``text`` holds the conditioning key of each block in the call (see PromptSchedule.conditioning)."""

    start_frame: int
    num_frames: int
    updating_cache: bool
    timesteps: tuple[float, ...]
    forward_index: int
    text: tuple = ()
    kind: str = ""


@dataclass
class RunState:
    """Everything between two windows, besides the KV cache. Latents are [B, C, frames_per_block, H, W]."""

    window: int
    num_blocks: int | None
    first_block: int = 0  # blocks before it were given (prefix), not generated
    noisy: dict = field(default_factory=dict)  # block -> noisy latent at its next step
    pending: tuple | None = None  # (block, clean latent): its clean-cache write is due
    clean: dict = field(default_factory=dict)  # block -> clean latent, for blocks in the KV cache


def validate_latent_size(height: int, width: int, patch: tuple[int, int, int] = (1, 2, 2)) -> None:
    for name, v, p in (("height", height, patch[1]), ("width", width, patch[2])):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0 or v % p:
            raise ValueError(f"latent {name} must be a positive multiple of {p} (pixel size a multiple of "
                             f"{8 * p}), got {v}")


class RollingSampler:
    """Rolling Forcing sampling on any Wan2.1-named module tree.

    Args:
        model: the DiT (``rolling.model.WanModel`` or ComfyUI's ``WanModel``), weights on ``device``.
        cfg: window / sink / cache configuration (defaults = the reference).
        height, width: latent size (pixels / 8), both even.
        batch: videos generated together (same schedule, own noise; text [1 or B, tokens, dim]).
        device, dtype: compute device and dtype (bf16 in the reference; fp32 for exact tests).
        attention: backend name (``sdpa``, ``sage``, ``flash``, ``auto``) or a callable.
        noise: a :class:`rolling.noise.NoiseSource`; default ``SeededNoise(seed)``.
        on_call: optional callback receiving a :class:`CallRecord` per logical DiT call.
        on_window: optional callback ``(window_index, num_windows_or_None)`` after every window
            (for progress and cancellation: raise from it to stop).
        param_cast: how bare parameters (``modulation``) reach the compute dtype/device
            (:data:`rolling.forward.ParamCast`); inside ComfyUI, its ``cast_to``.
    """

    def __init__(self, model: nn.Module, cfg: RollingConfig | None = None, *, height: int, width: int,
                 batch: int = 1, device=None, dtype=torch.bfloat16, attention="sdpa",
                 noise: NoiseSource | None = None, seed: int = 0,
                 on_call: Callable[[CallRecord], None] | None = None,
                 on_window: Callable[[int, int | None], None] | None = None,
                 param_cast: ParamCast | None = None):
        self.model, self.cfg = model, cfg or RollingConfig()
        self.param_cast = param_cast
        self.arch = WanArch.of(model)
        validate_latent_size(height, width, self.arch.patch_size)
        if not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be a positive integer, got {batch}")
        self.height, self.width, self.batch = height, width, batch
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.dtype = dtype
        self.attn = attention if callable(attention) else get_attention(attention, self.device)
        self.seed = seed
        self.noise = noise or SeededNoise(seed)
        self.on_call, self.on_window = on_call, on_window
        self.schedule = FlowSchedule(self.cfg.shift)
        self.t = self.schedule.warp(self.cfg.steps)  # timestep per step index
        self.sigma = [self.schedule.sigma(t) for t in self.t]
        self.t_ctx = float(self.cfg.context_noise)
        self.grid = (height // self.arch.patch_size[1], width // self.arch.patch_size[2])
        self.cache: RollingKVCache | None = None
        self.time = TimeEmbedder(model, dtype=dtype, device=self.device)
        self._sigma_memo: dict = {}
        self._texts: dict = {}
        self.prompts: PromptSchedule | None = None
        self.state: RunState | None = None
        self.forwards = 0

    # ------------------------------------------------------------------ text
    def _check_embedding(self, ctx: torch.Tensor) -> torch.Tensor:
        ctx = torch.as_tensor(ctx)
        if ctx.ndim == 2:
            ctx = ctx.unsqueeze(0)
        if ctx.ndim != 3 or ctx.shape[-1] != self.arch.text_dim:
            raise ValueError(f"text embedding must be [batch, tokens, {self.arch.text_dim}] for this model, got "
                             f"{list(ctx.shape)}; use the umT5-XXL text encoder (Wan2.1's)")
        if ctx.shape[0] not in (1, self.batch):
            raise ValueError(f"text embedding batch {ctx.shape[0]} does not match batch {self.batch}")
        return ctx

    def _set_prompts(self, context) -> None:
        self._texts = {}
        if isinstance(context, TextContext):
            self.prompts = PromptSchedule.single(torch.zeros(1, 1, self.arch.text_dim))
            self._texts[(0,)] = context
            return
        if not isinstance(context, PromptSchedule):
            context = PromptSchedule.single(context)
        for s in context.segments:
            s.context = self._check_embedding(s.context)
        self.prompts = context

    def _text(self, key: tuple) -> TextContext:
        t = self._texts.get(key)
        if t is None:
            ctx = self.prompts.embedding(key)
            if ctx.shape[0] == 1 and self.batch > 1:
                ctx = ctx.expand(self.batch, -1, -1)
            t = self._texts[key] = TextContext(self.model, ctx, dtype=self.dtype, device=self.device)
        return t

    def _release_texts(self, first_needed: int) -> None:
        """Drop text K/V that no block from ``first_needed`` on can use (conditioning only moves forward)."""
        def rank(k):
            return k[0] if len(k) == 1 else k[0] - 1 + k[1]
        floor = rank(self.prompts.conditioning(first_needed))
        for k in [k for k in self._texts if rank(k) < floor]:
            del self._texts[k]

    def _text_plan(self, blocks: list[int]) -> tuple[list, tuple]:
        fb = self.cfg.frames_per_block
        keys = [self.prompts.conditioning(b) for b in blocks]
        plan = []
        for i, k in enumerate(keys):
            if plan and plan[-1][3] == k:
                plan[-1][1] = (i + 1) * fb
            else:
                plan.append([i * fb, (i + 1) * fb, None, k])
        return [(a, b, self._text(k)) for a, b, _, k in plan], tuple(keys)

    # ------------------------------------------------------------------ helpers
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

    def _record(self, start_frame, num_frames, updating, timesteps, text=(), kind=""):
        if self.on_call is not None:
            self.on_call(CallRecord(start_frame, num_frames, updating, tuple(timesteps), self.forwards, text, kind))

    def _window(self, st: RunState, w: int) -> Window:
        return window_at(w, st.num_blocks, self.cfg.num_steps, st.first_block)

    def _keep_clean(self, st: RunState, block: int, latent: torch.Tensor) -> None:
        st.clean[block] = latent
        cached = set(self.cache.cached_blocks())
        for b in [b for b in st.clean if b not in cached and b != block]:
            del st.clean[b]

    def _update_pass(self, st: RunState, block: int, latent: torch.Tensor, kind: str = "update",
                     text_block: int | None = None) -> None:
        fb = self.cfg.frames_per_block
        plan = self.cache.plan_update(block)
        tp, keys = self._text_plan([block if text_block is None else text_block])
        self._record(block * fb, fb, True, [self.t_ctx] * fb, keys, kind)
        forward(self.model, self.arch, latent, [self.t_ctx] * fb, plan, self.cache, tp, self.time, self.attn, self.param_cast)
        self.forwards += 1
        self._keep_clean(st, block, latent)

    def _recache(self, st: RunState, new_block: int, mode: str) -> None:
        """Re-encode the cached clean blocks under the prompt of ``new_block``'s segment."""
        blocks = self.cache.cached_blocks()
        sink = {b for b, w in zip(self.cache.sink_ids, self.cache.sink_written) if w}
        for b in blocks:
            if b in sink and mode == "keep_sink":
                continue
            if b in sink and mode == "reanchor":
                continue  # replaced by the new segment's first block when it is finished
            self._update_pass(st, b, st.clean[b], kind="recache", text_block=new_block)
        if mode == "reanchor":
            self.cache.reanchor(new_block)

    # ------------------------------------------------------------------ main loop
    @torch.no_grad()
    def stream(self, context, num_blocks: int | None, *, prefix: torch.Tensor | None = None,
               resume: dict | None = None) -> Iterator[FinishedBlock]:
        """Yield finished blocks in order.

        Args:
            context: a umT5 embedding [1 or B, tokens, text_dim], a TextContext, or a PromptSchedule.
            num_blocks: total blocks of the video (including a prefix); ``None`` streams without end.
            prefix: latent frames [B, C, F, H, W] (normalised space) to continue from: they are written
                into the KV cache with clean-cache passes and generation continues after them. If F is
                not a multiple of the block size, the first frame is repeated in front to fill a block.
            resume: a state from :meth:`save_state` (the same config, size and prompts are assumed).
        """
        if num_blocks is not None and (not isinstance(num_blocks, int) or num_blocks < 1):
            raise ValueError(f"number of blocks must be a positive integer, got {num_blocks!r}")
        self._set_prompts(context)
        if self.cache is None:
            self.cache = self._new_cache()
        self.cache.reset()
        if resume is not None:
            st = self._restore(resume, num_blocks)
        else:
            st = self.state = RunState(window=0, num_blocks=num_blocks)
            if prefix is not None:
                self._write_prefix(st, prefix)
        yield from self._loop(st)

    def _write_prefix(self, st: RunState, prefix: torch.Tensor) -> None:
        fb = self.cfg.frames_per_block
        exp = (self.arch.in_dim, self.height, self.width)
        if prefix.ndim != 5 or tuple(prefix.shape[i] for i in (1, 3, 4)) != exp or prefix.shape[2] < 1:
            raise ValueError(f"prefix latents must be [B, {exp[0]}, F>=1, {exp[1]}, {exp[2]}] for this run, got "
                             f"{list(prefix.shape)}")
        prefix = prefix.to(device=self.device, dtype=self.dtype)
        if prefix.shape[0] == 1 and self.batch > 1:
            prefix = prefix.expand(self.batch, -1, -1, -1, -1)
        pad = (-prefix.shape[2]) % fb
        if pad:
            prefix = torch.cat([prefix[:, :, :1].expand(-1, -1, pad, -1, -1), prefix], dim=2)
        nb = prefix.shape[2] // fb
        if st.num_blocks is not None and nb >= st.num_blocks:
            raise ValueError(f"the prefix fills {nb} blocks but the video has only {st.num_blocks}; ask for more length")
        for b in range(nb):
            self._update_pass(st, b, prefix[:, :, b * fb:(b + 1) * fb].contiguous(), kind="prefix")
        st.first_block = st.window = nb

    def _warm(self, st: RunState) -> None:
        """Build the time embeddings and sigma tables of every window shape up front (ramp-up, steady,
        ramp-down; with and without a fused clean block), so nothing is allocated late in a run."""
        fb, T = self.cfg.frames_per_block, self.cfg.num_steps
        nw = num_windows(st.num_blocks, T)
        ws = set(range(st.first_block, st.first_block + 2 * T))
        if nw is not None:
            ws = {w for w in ws | set(range(nw - T, nw)) if st.window <= w < nw}
        shapes = {self._window(st, w).steps for w in ws} - {()}
        for steps in shapes:
            ts = [self.t[j] for j in steps for _ in range(fb)]
            self._sigmas(steps)
            self.time(ts)
            self.time([self.t_ctx] * fb + ts)
        self.time([self.t_ctx] * fb)

    def _loop(self, st: RunState) -> Iterator[FinishedBlock]:
        cfg, fb, T = self.cfg, self.cfg.frames_per_block, self.cfg.num_steps
        fused = cfg.update_mode == "fused"
        self._warm(st)
        switches = self.prompts.switches()
        t_start = time.perf_counter()
        nw = num_windows(st.num_blocks, T)
        while nw is None or st.window < nw:
            win = self._window(st, st.window)
            recache = switches.get(win.new_block) if win.new_block is not None else None
            if st.pending is not None and (not fused or recache is not None):
                self._update_pass(st, *st.pending)
                st.pending = None
            if recache is not None:
                self._recache(st, win.new_block, recache.recache)
            steps = win.steps
            blocks = list(win.blocks)
            xs = [self._draw(b, 0) if win.step(b) == 0 else st.noisy.pop(b) for b in blocks]
            x = torch.cat(xs, dim=2) if len(xs) > 1 else xs[0]
            tsteps = [self.t[j] for j in steps for _ in range(fb)]
            nf = x.shape[2]
            if st.pending is not None:  # fused: [clean block ; window] in one forward
                cb, cx = st.pending
                plan = self.cache.plan_fused(cb, win.first, len(steps))
                tp, keys = self._text_plan([cb] + blocks)
                self._record(cb * fb, fb, True, [self.t_ctx] * fb, keys[:1], "update")
                self._record(win.first * fb, nf, False, tsteps, keys[1:], "denoise")
                v = forward(self.model, self.arch, torch.cat([cx, x], dim=2), [self.t_ctx] * fb + tsteps, plan,
                            self.cache, tp, self.time, self.attn, self.param_cast)[:, :, fb:]
                self._keep_clean(st, cb, cx)
                st.pending = None
            else:
                plan = self.cache.plan_denoise(win.first, len(steps))
                tp, keys = self._text_plan(blocks)
                self._record(win.first * fb, nf, False, tsteps, keys, "denoise")
                v = forward(self.model, self.arch, x, tsteps, plan, self.cache, tp, self.time, self.attn, self.param_cast)
            self.forwards += 1
            x0 = x0_from_flow(x, v, self._sigmas(steps))
            finished = None
            for i, b in enumerate(blocks):
                j = win.step(b)
                xb = x0[:, :, i * fb:(i + 1) * fb]
                if j < T - 1:
                    st.noisy[b] = add_noise(xb, self._draw(b, j + 1), self.sigma[j + 1])
                else:
                    finished = FinishedBlock(b, xb.clone(), win.index, time.perf_counter() - t_start,
                                             self.prompts.label(b))
            clean = x0[:, :, :fb]
            last = nw is not None and win.index + 1 >= nw
            if not fused:
                st.pending = (win.first, clean)
            elif not last and self._window(st, win.index + 1).first > win.first:
                st.pending = (win.first, clean.clone())
            st.window += 1
            if len(self.prompts.segments) > 1:
                self._release_texts(self._window(st, st.window).first if not last else win.first)
            if self.on_window is not None:
                self.on_window(win.index, nw)
            if finished is not None:
                yield finished
        if st.pending is not None and not fused:  # the reference's update pass of the last window
            self._update_pass(st, *st.pending)
            st.pending = None

    def generate(self, context, num_blocks: int, **kw) -> torch.Tensor:
        """The whole latent video [B, C, F, H, W] (generated blocks only, prefix excluded)."""
        return torch.cat([blk.latents for blk in self.stream(context, num_blocks, **kw)], dim=2)

    # ------------------------------------------------------------------ save / resume
    def save_state(self, full: bool = True) -> dict:
        """Snapshot between two blocks (call it after a block was yielded, before the next ``next()``).

        ``full=True`` includes the KV cache: resuming equals an uninterrupted run exactly.
        ``full=False`` keeps only latents (sink and cached clean blocks, noisy blocks in flight;
        megabytes) and rebuilds the cache with clean-cache passes on resume: an approximation,
        since the cached keys of a block depend on history that is no longer kept."""
        st = self.state
        if st is None:
            raise RuntimeError("no run in progress: call save_state while iterating stream()")
        out = {"version": STATE_VERSION, "window": st.window, "first_block": st.first_block,
               "num_blocks": -1 if st.num_blocks is None else st.num_blocks, "seed": self.seed,
               "size": [self.batch, self.height, self.width], "config": repr(self.cfg),
               "noisy": {str(b): t.detach().cpu().clone() for b, t in st.noisy.items()},
               "clean": {str(b): t.detach().cpu().clone() for b, t in st.clean.items()},
               "pending": None if st.pending is None else [st.pending[0], st.pending[1].detach().cpu().clone()],
               "full": bool(full), "sink_ids": list(self.cache.sink_ids),
               "sink_pending": list(self.cache.sink_pending)}
        if full:
            cs = self.cache.state_dict()
            out["cache"] = {k: (v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v) for k, v in cs.items()}
        return out

    def _restore(self, s: dict, num_blocks: int | None) -> RunState:
        if s.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported run-state version {s.get('version')!r} (expected {STATE_VERSION})")
        if s["size"] != [self.batch, self.height, self.width] or s["config"] != repr(self.cfg):
            raise ValueError("the saved state was made with another size or cache configuration: "
                             f"saved size {s['size']}, now {[self.batch, self.height, self.width]}")
        dev = dict(device=self.device, dtype=self.dtype)
        st = self.state = RunState(window=int(s["window"]), num_blocks=num_blocks,
                                   first_block=int(s["first_block"]))
        st.noisy = {int(b): t.to(**dev) for b, t in s["noisy"].items()}
        st.pending = None if s["pending"] is None else (int(s["pending"][0]), s["pending"][1].to(**dev))
        clean = {int(b): t.to(**dev) for b, t in s["clean"].items()}
        if s.get("full") and "cache" in s:
            self.cache.load_state_dict({k: (v.to(**dev) if isinstance(v, torch.Tensor) else v)
                                        for k, v in s["cache"].items()})
            st.clean = clean
        else:
            self.cache.sink_ids = list(s["sink_ids"])  # a re-anchored sink stays the sink
            for b in sorted(clean, key=lambda b: (b not in self.cache.sink_ids, b)):
                self._update_pass(st, b, clean[b], kind="rebuild")
            self.cache.sink_pending = list(s["sink_pending"])
        return st


def sample_video(model: nn.Module, context, num_blocks: int, *, height: int, width: int,
                 cfg: RollingConfig | None = None, **kw) -> torch.Tensor:
    """Convenience: generate ``num_blocks`` blocks and return the latent video [B, C, F, H, W]."""
    return RollingSampler(model, cfg, height=height, width=width, **kw).generate(context, num_blocks)
