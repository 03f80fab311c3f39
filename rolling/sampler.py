"""The sampler: a thin driver that runs a schedule's forward plans (:mod:`rolling.schedule`) on a
Wan2.1 module tree and yields each finished block the moment it leaves. Default settings reproduce
the published Rolling Forcing sampler (ALGORITHM.md section 4); ``RollingConfig(schedule=
"chunk_causal")`` reproduces Self-Forcing's.

Per forward plan: assemble the input (clean blocks to write, then the denoised blocks: fresh noise
at step 0, else the latent re-noised by an earlier forward), plan the KV cache, run the DiT, take x0
and re-noise or finish each block (:class:`rolling.flow.Steps`), and only then commit the cache
bookkeeping and the run state. Between two forwards the whole run is a :class:`RunState` plus the
KV cache, so a run can be saved at any point (also after a cancelled forward) and resumed exactly
(:meth:`RollingSampler.save_state`), or started from given latent frames (``prefix=``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from itertools import islice
from typing import Callable, Iterator

import torch
from torch import nn

from .attention import get_attention
from .cache import CacheBook, RollingKVCache
from .config import RollingConfig
from .flow import Steps
from .forward import CompiledForward, ParamCast, TextContext, TimeEmbedder, WanArch, forward
from .noise import NoiseSource, SeededNoise
from .prompts import PromptSchedule
from .schedule import Forward, Reanchor, forwards

STATE_VERSION = 2


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
    """Everything between two forwards besides the KV cache. Latents are [B, C, frames_per_block, H, W].

    ``next`` is the position of the next schedule item; ``noisy`` block -> latent at its next step;
    ``kept`` block -> clean latent due to be written; ``clean`` block -> clean latent of cached blocks
    (for re-encodes and small-state resume)."""

    num_blocks: int | None
    first_block: int = 0  # blocks before it were given (prefix), not generated
    next: int = 0
    noisy: dict = field(default_factory=dict)
    kept: dict = field(default_factory=dict)
    clean: dict = field(default_factory=dict)


def validate_latent_size(height: int, width: int, patch: tuple[int, int, int] = (1, 2, 2)) -> None:
    for name, v, p in (("height", height, patch[1]), ("width", width, patch[2])):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0 or v % p:
            raise ValueError(f"latent {name} must be a positive multiple of {p} (pixel size a multiple of "
                             f"{8 * p}), got {v}")


class RollingSampler:
    """Rolling Forcing (or Self-Forcing) sampling on any Wan2.1-named module tree.

    Args:
        model: the DiT (``rolling.model.WanModel`` or ComfyUI's ``WanModel``), weights on ``device``.
        cfg: schedule / window / sink / cache configuration (defaults = the reference).
        height, width: latent size (pixels / 8), both even.
        batch: videos generated together (same schedule, own noise; text [1 or B, tokens, dim]).
        device, dtype: compute device and dtype (bf16 in the reference; fp32 for exact tests).
        attention: backend name (``sdpa``, ``sage``, ``flash``, ``auto``) or a callable.
        noise: a :class:`rolling.noise.NoiseSource`; default ``SeededNoise(seed)``.
        on_call: optional callback receiving a :class:`CallRecord` before every logical DiT call
            (raise from it to stop, e.g. on Cancel).
        on_window: optional callback ``(window_index, num_windows_or_None)`` after every window.
        param_cast: how bare parameters (``modulation``) reach the compute dtype/device
            (:data:`rolling.forward.ParamCast`); inside ComfyUI, its ``cast_to``.
        compile: run the forward through ``torch.compile`` (:class:`rolling.forward.CompiledForward`):
            False, True (inductor), or a dict of its options (``backend``, ``mode``).
    """

    def __init__(self, model: nn.Module, cfg: RollingConfig | None = None, *, height: int, width: int,
                 batch: int = 1, device=None, dtype=torch.bfloat16, attention="sdpa",
                 noise: NoiseSource | None = None, seed: int = 0,
                 on_call: Callable[[CallRecord], None] | None = None,
                 on_window: Callable[[int, int | None], None] | None = None,
                 param_cast: ParamCast | None = None, compile: bool | dict = False):
        self.model, self.cfg = model, cfg or RollingConfig()
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
        self.on_call, self.on_window, self.param_cast = on_call, on_window, param_cast
        self.steps = Steps(self.cfg.steps, self.cfg.shift, self.cfg.frames_per_block, self.device,
                           self.cfg.context_noise)
        self.t, self.sigma = self.steps.t, self.steps.sigma  # timestep / sigma per step index
        self.t_ctx = float(self.cfg.context_noise)
        self.grid = (height // self.arch.patch_size[1], width // self.arch.patch_size[2])
        self.cache: RollingKVCache | None = None
        self.time = TimeEmbedder(model, dtype=dtype, device=self.device)
        self.compiled = None if not compile else CompiledForward(
            model, self.arch, self.attn, param_cast, **(compile if isinstance(compile, dict) else {}))
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
        if ctx.shape[1] == 0:
            raise ValueError("text embedding has no tokens; encode a prompt (the reference pads it to 512 tokens)")
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
        context.window_blocks = self.cfg.num_steps if self.cfg.schedule == "rolling" else 1
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

    def _text_keys(self, fwd: Forward) -> list[tuple]:
        """The prompt of every input block: clean blocks their own (or, after a re-encoding switch, the
        new segment's, fully), denoised blocks theirs (as seen from the forward's newest block)."""
        p = self.prompts
        clean = [(p.segment_index(fwd.text_from),) if fwd.text_from is not None else p.conditioning(b)
                 for b in fwd.clean]
        newest = max(fwd.blocks) if fwd.blocks else None
        return clean + [p.conditioning(b, newest) for b in fwd.blocks]

    def _text_plan(self, keys: list[tuple]) -> tuple[list, tuple]:
        """(first frame, end frame, TextContext) ranges of consecutive input blocks sharing a prompt."""
        fb = self.cfg.frames_per_block
        plan = []
        for i, k in enumerate(keys):
            if plan and plan[-1][2] == k:
                plan[-1][1] = (i + 1) * fb
            else:
                plan.append([i * fb, (i + 1) * fb, k])
        return [(a, b, self._text(k)) for a, b, k in plan], tuple(keys)

    # ------------------------------------------------------------------ the schedule
    def _new_cache(self) -> RollingKVCache:
        a = self.arch
        return RollingKVCache(self.cfg, num_layers=a.num_layers, num_heads=a.num_heads, head_dim=a.head_dim,
                              batch=self.batch, grid=self.grid, device=self.device, dtype=self.dtype)

    def _items(self, st: RunState):
        c = self.cfg
        return forwards(c.schedule, c.num_steps, st.num_blocks, writes=c.writes, first_block=st.first_block,
                        switches={b: s.recache for b, s in self.prompts.switches().items()},
                        span_frames=c.span_frames, frames_per_block=c.frames_per_block, sink_blocks=c.sink_blocks)

    def num_windows(self, st: RunState) -> int | None:
        if st.num_blocks is None:
            return None
        T = self.cfg.num_steps
        return st.num_blocks + T - 1 if self.cfg.schedule == "rolling" else st.num_blocks * T

    def _draw(self, block: int, step: int) -> torch.Tensor:
        shape = (self.batch, self.arch.in_dim, self.cfg.frames_per_block, self.height, self.width)
        return self.noise(block, step, shape, self.device, self.dtype)

    def _run(self, st: RunState, fwd: Forward, sources: dict) -> dict:
        """Run one forward plan; returns the outputs, changing no state but the cache storage it plans."""
        fb = self.cfg.frames_per_block
        x = self.steps.input(fwd, sources, st.noisy, self._draw)
        ts = self.steps.timesteps(fwd)
        tp, keys = self._text_plan(self._text_keys(fwd))
        nc = len(fwd.clean) * fb
        if fwd.kind == "recache":  # one joint call
            self._record(fwd.clean[0] * fb, nc, True, [self.t_ctx] * nc, keys[:len(fwd.clean)], fwd.kind)
        else:
            for i, b in enumerate(fwd.clean):
                self._record(b * fb, fb, True, [self.t_ctx] * fb, keys[i:i + 1], "update" if fwd.blocks else fwd.kind)
        if fwd.blocks:
            self._record(fwd.blocks[0] * fb, x.shape[2] - nc, False, ts[nc:], keys[len(fwd.clean):], "denoise")
        plan = self.cache.plan(fwd, tag=keys[0] if fwd.clean else None)
        v = forward(self.model, self.arch, x, ts, plan, self.cache, tp, self.time, self.attn, self.param_cast,
                    self.compiled)
        self.forwards += 1
        at, noisy = self.steps.output(fwd, x, v, self._draw)
        return {"plan": plan, "clean": {b: sources[b] for b in fwd.clean}, "noisy": noisy,
                "kept": {b: at[b].clone() for b in fwd.keep}, "finished": [(b, at[b].clone()) for b in fwd.finished]}

    def _commit(self, st: RunState, fwd: Forward, out: dict) -> None:
        """Install a forward's results: the cache bookkeeping, then the run state (no failure possible)."""
        self.cache.commit(out["plan"])
        for b in fwd.blocks:
            st.noisy.pop(b, None)
        st.noisy.update(out["noisy"])
        for b, lat in out["clean"].items():
            if fwd.kind != "recache":
                st.kept.pop(b, None)
            st.clean[b] = lat
        st.kept.update(out["kept"])
        cached = set(self.cache.cached_blocks())
        for b in [b for b in st.clean if b not in cached]:
            del st.clean[b]

    def _loop(self, st: RunState) -> Iterator[FinishedBlock]:
        self._warm(st)
        t_start = time.perf_counter()
        nw = self.num_windows(st)
        for pos, item in islice(enumerate(self._items(st)), st.next, None):
            if isinstance(item, Reanchor):
                self.cache.commit(self.cache.reanchored(item.block))
                st.next = pos + 1
                continue
            if item.kind == "recache":  # only what the cache still holds (a tiny cache may have lost the oldest)
                keep = tuple(b for b in item.clean if b in st.clean)
                item = replace(item, clean=keep, query_only=max(0, item.query_only - (len(item.clean) - len(keep))))
                if not keep:
                    st.next = pos + 1
                    continue
            out = self._run(st, item, st.clean if item.kind == "recache" else st.kept)
            self._commit(st, item, out)
            st.next = pos + 1
            if item.blocks:
                if len(self.prompts.segments) > 1:
                    self._release_texts(min(item.blocks))
                if self.on_window is not None:
                    self.on_window(item.window, nw)
            for b, lat in out["finished"]:
                yield FinishedBlock(b, lat, item.window, time.perf_counter() - t_start, self.prompts.label(b))

    def _warm(self, st: RunState) -> None:
        """Build the time embeddings and sigma tables of every forward shape up front, so nothing is
        allocated late in a run (the whole schedule of a bounded run; the first windows of a stream)."""
        for f in islice(self._items(st), None if st.num_blocks is not None else 6 * self.cfg.num_steps + 1):
            if isinstance(f, Forward):
                self.time(self.steps.timesteps(f))
                if f.blocks:
                    self.steps.frame_sigmas(f.steps)
        self.time([self.t_ctx] * self.cfg.frames_per_block)

    def _record(self, start_frame, num_frames, updating, timesteps, text=(), kind=""):
        if self.on_call is not None:
            self.on_call(CallRecord(start_frame, num_frames, updating, tuple(timesteps), self.forwards, text, kind))

    # ------------------------------------------------------------------ entry points
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
        if num_blocks is not None and (not isinstance(num_blocks, int) or isinstance(num_blocks, bool)
                                       or num_blocks < 1):
            raise ValueError(f"number of blocks must be a positive integer, got {num_blocks!r}")
        self._set_prompts(context)
        if self.cache is None:
            self.cache = self._new_cache()
        self.cache.reset()
        if resume is not None:
            st = self._restore(resume, num_blocks)
        else:
            st = self.state = RunState(num_blocks)
            if prefix is not None:
                st.kept.update(self._prefix_blocks(prefix))
                st.first_block = len(st.kept)
                if num_blocks is not None and st.first_block >= num_blocks:
                    raise ValueError(f"the prefix fills {st.first_block} blocks but the video has only {num_blocks}; "
                                     "ask for more length")
        yield from self._loop(st)

    def _prefix_blocks(self, prefix: torch.Tensor) -> dict:
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
        return {b: prefix[:, :, b * fb:(b + 1) * fb].contiguous() for b in range(prefix.shape[2] // fb)}

    def generate(self, context, num_blocks: int, **kw) -> torch.Tensor:
        """The whole latent video [B, C, F, H, W] (generated blocks only, prefix excluded)."""
        return torch.cat([blk.latents for blk in self.stream(context, num_blocks, **kw)], dim=2)

    # ------------------------------------------------------------------ save / resume
    def save_state(self, full: bool = True, copy: bool = True) -> dict:
        """Snapshot between two forwards: after a block was yielded, or after the run stopped inside a
        forward (a cancel): the state is then the one before that forward, which a resume re-runs.

        ``full=True`` includes the KV cache: resuming equals an uninterrupted run exactly.
        ``full=False`` keeps only latents (cached clean blocks, noisy blocks in flight; megabytes) and
        rebuilds the cache with clean-cache passes on resume: an approximation, since the cached keys
        of a block depend on history that is no longer kept.

        ``copy=False`` hands out the live KV cache buffers on their device instead of CPU copies, for a
        ``torch.save`` right away (before the run goes on): it then copies one buffer at a time to the
        host, so saving needs host memory for the largest buffer, not for the whole cache."""
        st = self.state
        if st is None:
            raise RuntimeError("no run in progress: call save_state while iterating stream()")

        def cpu(d):
            return {str(b): t.detach().cpu().clone() for b, t in d.items()}
        out = {"version": STATE_VERSION, "next": st.next, "first_block": st.first_block,
               "num_blocks": -1 if st.num_blocks is None else st.num_blocks, "seed": self.seed,
               "size": [self.batch, self.height, self.width], "config": repr(self.cfg),
               "noisy": cpu(st.noisy), "kept": cpu(st.kept), "clean": cpu(st.clean), "full": bool(full)}
        cs = self.cache.state_dict()
        out["book"] = {k: cs[k] for k in ("ring", "sink", "targets")}
        if full:
            out["cache"] = {k: cs[k].detach().cpu().clone() if copy else cs[k].detach()
                            for k in ("sink_k", "sink_v", "ring_k", "ring_v")}
        return out

    def _restore(self, s: dict, num_blocks: int | None) -> RunState:
        if s.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported run-state version {s.get('version')!r} (expected {STATE_VERSION})")
        if s["size"] != [self.batch, self.height, self.width] or s["config"] != repr(self.cfg):
            raise ValueError("the saved state was made with another size or cache configuration: "
                             f"saved size {s['size']}, now {[self.batch, self.height, self.width]}")
        dev = dict(device=self.device, dtype=self.dtype)

        def load(d):  # own copies (a state may be memory-mapped from its file)
            return {int(b): t.to(**dev, copy=True) for b, t in d.items()}
        st = self.state = RunState(num_blocks, int(s["first_block"]), int(s["next"]), load(s["noisy"]),
                                   load(s["kept"]))
        clean, book = load(s["clean"]), s["book"]
        if s.get("full") and "cache" in s:
            self.cache.load_state_dict({**s["cache"], **book})  # copied into the cache's buffers
            st.clean = clean
            return st
        # small state: rebuild the cache, the (re-anchored) sink first, then the ring, oldest first
        self.cache.book = CacheBook((-1,) * len(book["ring"]), (-1,) * len(book["sink"]), tuple(book["sink"]))
        for b in sorted(clean, key=lambda b: (b not in book["sink"], b)):
            fwd = Forward(-1, "rebuild", clean=(b,))
            self._commit(st, fwd, self._run(st, fwd, clean))
        self.cache.book = replace(self.cache.book, targets=tuple(book["targets"]))  # keeps the rebuilt blocks' tags
        return st


def sample_video(model: nn.Module, context, num_blocks: int, *, height: int, width: int,
                 cfg: RollingConfig | None = None, **kw) -> torch.Tensor:
    """Convenience: generate ``num_blocks`` blocks and return the latent video [B, C, F, H, W]."""
    return RollingSampler(model, cfg, height=height, width=width, **kw).generate(context, num_blocks)
