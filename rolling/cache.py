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
    sink: bool = False

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
        self.sink_ids = list(range(self.cfg.sink_blocks))  # block held (or to be held) by each sink slot
        self.sink_written = [False] * self.cfg.sink_blocks
        self.sink_pending: list[int] = []  # re-anchor targets: these blocks go to the sink when written

    def reanchor(self, first_block: int) -> None:
        """Scene change: blocks ``first_block ..`` (sink_blocks of them) replace the sink when written;
        older ring blocks are dropped then. Until that write the current sink stays in use."""
        self.sink_pending = list(range(first_block, first_block + self.cfg.sink_blocks))

    def state_dict(self) -> dict:
        """Full cache state (tensors are the live buffers: clone before mutating the cache further)."""
        return {"sink_k": self.sink_k, "sink_v": self.sink_v, "ring_k": self.ring_k, "ring_v": self.ring_v,
                "slot_block": list(self.slot_block), "sink_ids": list(self.sink_ids),
                "sink_written": list(self.sink_written), "sink_pending": list(self.sink_pending)}

    def load_state_dict(self, st: dict) -> None:
        for k in ("sink_k", "sink_v", "ring_k", "ring_v"):
            getattr(self, k).copy_(st[k])
        self.slot_block, self.sink_ids = list(st["slot_block"]), list(st["sink_ids"])
        self.sink_written, self.sink_pending = list(st["sink_written"]), list(st["sink_pending"])

    def cached_blocks(self) -> list[int]:
        """Blocks whose K/V are in the cache (sink first, then the ring, oldest first)."""
        sink = [b for b, w in zip(self.sink_ids, self.sink_written) if w]
        return sink + sorted(b for b in self.slot_block if b >= 0 and b not in sink)

    def _sink_slot(self, b: int) -> int | None:
        for i, (sb, w) in enumerate(zip(self.sink_ids, self.sink_written)):
            if w and sb == b:
                return i
        return None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in
                   (self.sink_k, self.sink_v, self.ring_k, self.ring_v, self.scratch_k, self.scratch_v))

    def _ring_slot(self, b: int) -> int:
        return (b - self.cfg.sink_blocks) % self.cfg.ring_blocks

    def _in_ring(self, b: int) -> bool:
        return b >= 0 and self.slot_block[self._ring_slot(b)] == b

    def _ring_after_write(self, newest: int) -> list[int]:
        """Non-sink blocks in the ring once ``newest`` has been written (oldest first)."""
        lo = max(self.cfg.sink_blocks, newest - self.cfg.ring_blocks + 1)
        sink = set(self.sink_ids)
        return [b for b in range(lo, newest + 1) if b not in sink and (b == newest or self._in_ring(b))]

    def _is_sink_target(self, b: int) -> bool:
        return b in self.sink_pending or (b in self.sink_ids and not self.sink_pending)

    def _denoise_group(self, q0: int, first: int, num_frames: int) -> QueryGroup:
        """Keys of a denoising pass over ``num_frames`` input frames starting at block ``first``."""
        cfg, fb = self.cfg, self.fb
        pos = first * fb
        sink = [b for b, w in zip(self.sink_ids, self.sink_written) if w and b < first]
        sources: list[KeySource] = []
        if sink or (cfg.sink_blocks == 0 and first > 0):  # history exists: sink (if any) + working cache
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
            sources += [KeySource(b, 0, fb, sink_pos + i * fb, sink=True) for i, b in enumerate(sink)]
            sources += work
        sources.append(KeySource(-1, q0, q0 + num_frames, pos))
        return QueryGroup(q0, q0 + num_frames, pos, sources)

    def _update_group(self, q0: int, block: int) -> QueryGroup:
        """Keys of the clean-cache update pass of ``block`` (after it has been written)."""
        cfg, fb = self.cfg, self.fb
        in_sink = self._sink_slot(block) is not None
        content = [(b, True) for b, w in zip(self.sink_ids, self.sink_written) if w and b <= block]
        if not in_sink:
            content += [(b, False) for b in self._ring_after_write(block)]
        sources: list[KeySource] = []
        budget = cfg.span_frames
        for b, is_sink in reversed(content):
            if budget <= 0:
                break
            take = min(fb, budget)
            sources.insert(0, KeySource(b, fb - take, fb, b * fb + fb - take, sink=is_sink))
            budget -= take
        return QueryGroup(q0, q0 + fb, block * fb, sources)

    # ------------------------------------------------------------------ plans
    def plan_denoise(self, first: int, num_blocks: int) -> ForwardPlan:
        nf = num_blocks * self.fb
        plan = ForwardPlan("denoise", list(range(first * self.fb, first * self.fb + nf)))
        self._commit(plan)
        plan.groups.append(self._denoise_group(0, first, nf))
        return self._finish(plan)

    def plan_update(self, block: int) -> ForwardPlan:
        plan = ForwardPlan("update", list(range(block * self.fb, (block + 1) * self.fb)), writes=[(block, 0)])
        self._commit(plan)
        plan.groups.append(self._update_group(0, block))
        return self._finish(plan)

    def plan_fused(self, clean_block: int, first: int, num_blocks: int) -> ForwardPlan:
        """[clean block ; window] in one forward: writes the clean block, two attention groups."""
        fb, nf = self.fb, num_blocks * self.fb
        pos = list(range(clean_block * fb, (clean_block + 1) * fb)) + list(range(first * fb, first * fb + nf))
        plan = ForwardPlan("fused", pos, writes=[(clean_block, 0)])
        self._commit(plan)
        plan.groups.append(self._update_group(0, clean_block))
        plan.groups.append(self._denoise_group(fb, first, nf))
        return self._finish(plan)

    def _commit(self, plan: ForwardPlan) -> None:
        """Record the plan's writes in the bookkeeping (the tensors are written when it runs)."""
        plan.targets = []  # type: ignore[attr-defined]
        for b, _ in plan.writes:
            if self._is_sink_target(b):
                if b in self.sink_pending:  # re-anchor: the new scene's first block(s) become the sink
                    i = self.sink_pending.index(b)
                    if i == 0:
                        self.slot_block = [x if x > b else -1 for x in self.slot_block]
                    self.sink_ids[i] = b
                    self.sink_written[i] = True
                    if i == len(self.sink_pending) - 1:
                        self.sink_pending = []
                else:
                    i = self.sink_ids.index(b)
                    self.sink_written[i] = True
                plan.targets.append(("sink", i))
            else:
                self.slot_block[self._ring_slot(b)] = b
                plan.targets.append(("ring", self._ring_slot(b)))

    def _finish(self, plan: ForwardPlan) -> ForwardPlan:
        relative = self.cfg.rope_mode == "relative"
        for g in plan.groups:
            g.base = min(s.pos for s in g.sources) if relative else 0
        return plan

    # ------------------------------------------------------------------ execution
    def prepare(self, plan: ForwardPlan) -> None:
        """Check the plan against the cache and build its rotation tables (once per forward)."""
        for g in plan.groups:
            for s in g.sources:
                if s.block >= 0 and (self._sink_slot(s.block) is None if s.sink else not self._in_ring(s.block)):
                    raise RuntimeError(f"internal error: block {s.block} is not in the KV cache")
        hp, wp = self.grid

        def table(first_pos: int, frames: int):
            key = (first_pos, frames)
            if key not in plan.tables:
                plan.tables[key] = self.rope.tables(range(first_pos, first_pos + frames), hp, wp, self.device)
            return plan.tables[key]
        plan.table = table  # type: ignore[attr-defined]

    def _stored_rotated(self, sink: bool) -> bool:
        return self.cfg.rope_mode == "reference" and not sink

    def _slot(self, layer: int, block: int, sink: bool):
        if sink:
            return self.sink_k[layer], self.sink_v[layer], self._sink_slot(block) * self.bt
        return self.ring_k[layer], self.ring_v[layer], self._ring_slot(block) * self.bt

    def write(self, layer: int, plan: ForwardPlan, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the plan's blocks from one layer's un-rotated k, v [B, L, H, D] (K rotated first where
        the cache keeps it rotated)."""
        tpf, fb = self.tpf, self.fb
        for (b, f0), (where, slot) in zip(plan.writes, plan.targets):  # type: ignore[attr-defined]
            kb, vb = k[:, f0 * tpf:(f0 + fb) * tpf], v[:, f0 * tpf:(f0 + fb) * tpf]
            if self._stored_rotated(where == "sink"):
                kb = apply_rope(kb, *plan.table(plan.frame_pos[f0], fb))  # type: ignore[attr-defined]
            store_k, store_v = (self.sink_k, self.sink_v) if where == "sink" else (self.ring_k, self.ring_v)
            t0 = slot * self.bt
            store_k[layer][:, t0:t0 + self.bt].copy_(kb)
            store_v[layer][:, t0:t0 + self.bt].copy_(vb)

    def attend(self, layer: int, plan: ForwardPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               attn) -> torch.Tensor:
        """Self-attention of one layer. q, k, v: [B, L, H, D] un-rotated, for the plan's input tokens.
        Writes the plan's blocks into the cache, then attends per query group. Returns [B, L, H, D]."""
        tpf, fb = self.tpf, self.fb
        table = plan.table  # type: ignore[attr-defined]
        self.write(layer, plan, k, v)
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
                        kst, vst, t0 = self._slot(layer, s.block, s.sink)
                        ks_ = kst[:, t0 + s.f0 * tpf:t0 + s.f1 * tpf]
                        vs_ = vst[:, t0 + s.f0 * tpf:t0 + s.f1 * tpf]
                        if not (self._stored_rotated(s.sink) and s.pos == s.block * fb + s.f0 and g.base == 0):
                            if self._stored_rotated(s.sink):  # stored rotated but needed elsewhere
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
