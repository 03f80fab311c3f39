"""The rolling KV cache: attention sink, ring of recent clean blocks, and the reference's read and
write rules, expressed as per-forward *plans*.

All bookkeeping is plain Python integers decided before a forward runs, so the layers do no host
syncs. Storage is preallocated once per run and never grows with video length:

* sink: the first ``sink_blocks`` blocks, K stored **un-rotated** (RoPE is applied when read, at the
  positions just before the working cache), V as is;
* ring: ``ring_blocks`` slots of the most recent clean blocks (block b in slot (b - sink) % slots).
  In ``rope_mode="reference"`` their K is stored rotated at the block's absolute position; in
  ``"relative"`` mode it is stored un-rotated and rotated when read, relative to the attention span;
* scratch: one [B, span tokens, H, D] K and V buffer shared by all layers, where each attention's
  keys are assembled (key order does not matter: there is no mask and RoPE is already applied).

Read rules (ALGORITHM.md section 5), for a window whose first block is s:

* denoising pass: keys = sink (placed immediately before the working cache) + working cache (the
  clean blocks before s still in the ring, at most ``span - window - sink`` frames, newest last)
  + the window itself. With no finished block yet (s = 0) the window attends only to itself.
* clean-cache update pass for block s (after writing it): the last ``span`` frames of the cache
  content [sink | ring blocks .. s]; the sink is at its true positions and drops out of the slice
  once the ring is full (s >= 7 with the defaults).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import RollingConfig
from .rope import Rope, apply_rope


@dataclass(frozen=True)
class KeySource:
    """Frames ``f0:f1`` of a stored block (``block >= 0``) or of the forward's input (``block = -1``),
    presented to attention at absolute position ``pos`` (of frame f0)."""

    block: int
    f0: int
    f1: int
    pos: int

    @property
    def frames(self) -> int:
        return self.f1 - self.f0


@dataclass
class QueryGroup:
    """Input frames ``q0:q1`` attending to ``sources``; positions are rotated relative to ``base``."""

    q0: int
    q1: int
    q_pos: int
    sources: list[KeySource]
    base: int = 0

    @property
    def key_frames(self) -> int:
        return sum(s.frames for s in self.sources)


@dataclass
class ForwardPlan:
    """What one DiT forward reads and writes. Input frames are laid out in order; ``frame_pos[i]``
    is the absolute latent-frame position of input frame i."""

    kind: str
    frame_pos: list[int]
    writes: list[tuple[int, int]] = field(default_factory=list)  # (block, first input frame)
    groups: list[QueryGroup] = field(default_factory=list)
    # filled by RollingKVCache.prepare(): rotation tables keyed by (positions tuple)
    tables: dict = field(default_factory=dict, repr=False)

    @property
    def num_frames(self) -> int:
        return len(self.frame_pos)


class RollingKVCache:
    """KV cache for one run: B videos of one size. See the module docstring for the rules."""

    def __init__(self, cfg: RollingConfig, *, num_layers: int, num_heads: int, head_dim: int,
                 batch: int, grid: tuple[int, int], device, dtype, rope: Rope | None = None):
        self.cfg = cfg
        self.fb = cfg.frames_per_block
        self.grid = grid
        self.tpf = grid[0] * grid[1]  # tokens per latent frame
        self.bt = self.fb * self.tpf  # tokens per block
        self.device, self.dtype = torch.device(device), dtype
        self.rope = rope or Rope(head_dim)
        n_sink, n_ring = cfg.sink_blocks, cfg.ring_blocks
        shape = (num_layers, batch, 0, num_heads, head_dim)

        def buf(tokens):
            return torch.zeros(shape[:2] + (tokens,) + shape[3:], device=device, dtype=dtype)

        self.sink_k, self.sink_v = buf(n_sink * self.bt), buf(n_sink * self.bt)
        self.ring_k, self.ring_v = buf(n_ring * self.bt), buf(n_ring * self.bt)
        span_tokens = cfg.span_frames * self.tpf
        self.scratch_k = torch.empty((batch, span_tokens, num_heads, head_dim), device=device, dtype=dtype)
        self.scratch_v = torch.empty_like(self.scratch_k)
        self.reset()

    # ------------------------------------------------------------------ bookkeeping
    def reset(self) -> None:
        """Forget all blocks (the buffers are reused; nothing is reallocated)."""
        self.slot_block = [-1] * self.cfg.ring_blocks
        self.sink_written = [False] * self.cfg.sink_blocks
        self.latest = -1  # newest block written

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in
                   (self.sink_k, self.sink_v, self.ring_k, self.ring_v, self.scratch_k, self.scratch_v))

    def _in_cache(self, b: int) -> bool:
        if b < self.cfg.sink_blocks:
            return self.sink_written[b]
        return self.slot_block[(b - self.cfg.sink_blocks) % self.cfg.ring_blocks] == b

    def _ring_after_write(self, newest: int) -> list[int]:
        """Non-sink blocks in the ring once ``newest`` has been written (oldest first)."""
        lo = max(self.cfg.sink_blocks, newest - self.cfg.ring_blocks + 1)
        return list(range(lo, newest + 1))

    def _denoise_group(self, q0: int, first: int, num_frames: int) -> QueryGroup:
        """Keys of a denoising pass over ``num_frames`` input frames starting at block ``first``."""
        cfg, fb = self.cfg, self.fb
        pos = first * fb
        sink = [b for b in range(min(first, cfg.sink_blocks))]
        sources: list[KeySource] = []
        if sink:
            # working cache: clean non-sink blocks before `first` that survive the write of `first`
            cand = [b for b in self._ring_after_write(first) if b < first]
            budget = cfg.span_frames - num_frames - len(sink) * fb
            work: list[KeySource] = []
            for b in reversed(cand):
                if budget <= 0:
                    break
                take = min(fb, budget)
                work.insert(0, KeySource(b, fb - take, fb, b * fb + fb - take))
                budget -= take
            wf = sum(s.frames for s in work)
            sink_pos = pos - wf - len(sink) * fb
            sources += [KeySource(b, 0, fb, sink_pos + i * fb) for i, b in enumerate(sink)]
            sources += work
        sources.append(KeySource(-1, q0, q0 + num_frames, pos))
        return QueryGroup(q0, q0 + num_frames, pos, sources)

    def _update_group(self, q0: int, block: int) -> QueryGroup:
        """Keys of the clean-cache update pass of ``block`` (after it has been written)."""
        cfg, fb = self.cfg, self.fb
        content = [(b, b * fb) for b in range(min(block + 1, cfg.sink_blocks))]
        if block >= cfg.sink_blocks:
            content += [(b, b * fb) for b in self._ring_after_write(block)]
        sources: list[KeySource] = []
        budget = cfg.span_frames
        for b, p in reversed(content):
            if budget <= 0:
                break
            take = min(fb, budget)
            sources.insert(0, KeySource(b, fb - take, fb, p + fb - take))
            budget -= take
        return QueryGroup(q0, q0 + fb, block * fb, sources)

    # ------------------------------------------------------------------ plans
    def plan_denoise(self, first: int, num_blocks: int) -> ForwardPlan:
        nf = num_blocks * self.fb
        plan = ForwardPlan("denoise", list(range(first * self.fb, first * self.fb + nf)))
        plan.groups.append(self._denoise_group(0, first, nf))
        return self._finish(plan)

    def plan_update(self, block: int) -> ForwardPlan:
        plan = ForwardPlan("update", list(range(block * self.fb, (block + 1) * self.fb)), writes=[(block, 0)])
        plan.groups.append(self._update_group(0, block))
        return self._finish(plan)

    def plan_fused(self, clean_block: int, first: int, num_blocks: int) -> ForwardPlan:
        """[clean block ; window] in one forward: writes the clean block, two attention groups."""
        fb, nf = self.fb, num_blocks * self.fb
        pos = list(range(clean_block * fb, (clean_block + 1) * fb)) + list(range(first * fb, first * fb + nf))
        plan = ForwardPlan("fused", pos, writes=[(clean_block, 0)])
        plan.groups.append(self._update_group(0, clean_block))
        plan.groups.append(self._denoise_group(fb, first, nf))
        return self._finish(plan)

    def _finish(self, plan: ForwardPlan) -> ForwardPlan:
        relative = self.cfg.rope_mode == "relative"
        for g in plan.groups:
            g.base = min(s.pos for s in g.sources) if relative else 0
        return plan

    # ------------------------------------------------------------------ execution
    def prepare(self, plan: ForwardPlan) -> None:
        """Commit the plan's writes to the bookkeeping and build its rotation tables (once per forward)."""
        for b, _ in plan.writes:
            if b < self.cfg.sink_blocks:
                self.sink_written[b] = True
            else:
                self.slot_block[(b - self.cfg.sink_blocks) % self.cfg.ring_blocks] = b
            self.latest = max(self.latest, b)
        for g in plan.groups:
            for s in g.sources:
                if s.block >= 0 and not self._in_cache(s.block):
                    raise RuntimeError(f"internal error: block {s.block} is not in the KV cache")
        hp, wp = self.grid

        def table(first_pos: int, frames: int):
            key = (first_pos, frames)
            if key not in plan.tables:
                plan.tables[key] = self.rope.tables(range(first_pos, first_pos + frames), hp, wp, self.device)
            return plan.tables[key]
        plan.table = table  # type: ignore[attr-defined]

    def _stored_rotated(self, block: int) -> bool:
        return self.cfg.rope_mode == "reference" and block >= self.cfg.sink_blocks

    def _slot(self, layer: int, block: int):
        if block < self.cfg.sink_blocks:
            t0 = block * self.bt
            return self.sink_k[layer], self.sink_v[layer], t0
        t0 = ((block - self.cfg.sink_blocks) % self.cfg.ring_blocks) * self.bt
        return self.ring_k[layer], self.ring_v[layer], t0

    def attend(self, layer: int, plan: ForwardPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               attn) -> torch.Tensor:
        """Self-attention of one layer. q, k, v: [B, L, H, D] un-rotated, for the plan's input tokens.
        Writes the plan's blocks into the cache, then attends per query group. Returns [B, L, H, D]."""
        tpf, fb = self.tpf, self.fb
        table = plan.table  # type: ignore[attr-defined]
        for b, f0 in plan.writes:
            kb, vb = k[:, f0 * tpf:(f0 + fb) * tpf], v[:, f0 * tpf:(f0 + fb) * tpf]
            if self._stored_rotated(b):
                kb = apply_rope(kb, *table(plan.frame_pos[f0], fb))
            ks, vs, t0 = self._slot(layer, b)
            ks[:, t0:t0 + self.bt].copy_(kb)
            vs[:, t0:t0 + self.bt].copy_(vb)
        if len(plan.groups) == 1 and plan.groups[0].q0 == 0 and plan.groups[0].q1 == plan.num_frames:
            out = None
        else:
            out = torch.empty_like(q)
        for g in plan.groups:
            qg = q[:, g.q0 * tpf:g.q1 * tpf]
            qg = apply_rope(qg, *table(g.q_pos - g.base, g.q1 - g.q0))
            if len(g.sources) == 1 and g.sources[0].block < 0:
                s = g.sources[0]
                kk = apply_rope(k[:, s.f0 * tpf:s.f1 * tpf], *table(s.pos - g.base, s.frames))
                vv = v[:, s.f0 * tpf:s.f1 * tpf]
            else:
                n = 0
                for s in g.sources:
                    m = s.frames * tpf
                    if s.block < 0:
                        ks_ = apply_rope(k[:, s.f0 * tpf:s.f1 * tpf], *table(s.pos - g.base, s.frames))
                        vs_ = v[:, s.f0 * tpf:s.f1 * tpf]
                    else:
                        kst, vst, t0 = self._slot(layer, s.block)
                        ks_ = kst[:, t0 + s.f0 * tpf:t0 + s.f1 * tpf]
                        vs_ = vst[:, t0 + s.f0 * tpf:t0 + s.f1 * tpf]
                        if not (self._stored_rotated(s.block) and s.pos == s.block * fb + s.f0 and g.base == 0):
                            if self._stored_rotated(s.block):  # stored rotated but needed elsewhere
                                raise RuntimeError("internal error: re-positioning a rotated key")
                            ks_ = apply_rope(ks_, *table(s.pos - g.base, s.frames))
                    self.scratch_k[:, n:n + m].copy_(ks_)
                    self.scratch_v[:, n:n + m].copy_(vs_)
                    n += m
                kk, vv = self.scratch_k[:, :n], self.scratch_v[:, :n]
            o = attn(qg, kk, vv)
            if out is None:
                return o
            out[:, g.q0 * tpf:g.q1 * tpf] = o
        return out
