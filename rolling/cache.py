"""The KV cache: attention sink, ring of recent clean blocks, and the read rules of the schedules,
as per-forward *plans*.

Bookkeeping (which block sits in which slot) is a :class:`CacheBook` value. :meth:`RollingKVCache.plan`
is a pure function of the book and a :class:`rolling.schedule.Forward`: it says what the forward
writes (which slot) and what each of its query groups reads, and carries the book as it will be
after the forward. :meth:`RollingKVCache.commit` installs that book once the forward has run, so a
forward cancelled half-way leaves the bookkeeping as it was: a plan writes only slots whose old
contents nothing reads again, so the state can be saved and the same forward re-run exactly.

Storage is preallocated once per run and never grows with video length:

* sink: the first ``sink_blocks`` blocks (or, after a re-anchor, the new scene's first blocks),
  K stored **un-rotated** (RoPE applied when read), V as is;
* ring: ``ring_blocks`` slots of recent clean blocks (block b in slot (b - sink) % slots); in
  ``rope_mode="reference"`` K is stored rotated at the block's absolute position, in ``"relative"``
  un-rotated and rotated when read, relative to the attention span;
* scratch: one [B, span tokens, H, D] K and V buffer shared by all layers (inference only), where
  each attention's keys are assembled (no mask, so key order does not matter).

Read rules (``RollingConfig.schedule``), for a forward whose denoised blocks start at block s:

* denoising queries: sink + working cache (clean blocks before s still in the ring, newest last, at
  most ``span - query frames - sink`` frames) + the forward's own denoised frames. The sink sits
  immediately before the working cache (``rolling``, ALGORITHM.md section 5) or at its own absolute
  positions (``chunk_causal``, as Self-Forcing/LongLive). With nothing finished yet (s = 0) a
  window attends only to itself;
* clean-cache queries of block c (``rolling``): the last ``span`` frames of the cache content
  [sink | ring blocks .. c]; the sink is at its true positions and drops out of the slice once the
  ring fills the span. (``chunk_causal``): the same keys as a denoising query of c, with c clean.

Keys the forward writes itself are served from its own fresh K/V (the same values the storage
receives), so reads never depend on the order of writes inside a forward.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .config import RollingConfig
from .rope import Rope, apply_rope

OWN = -1  # KeySource.block of keys taken from the forward's own input frames


@dataclass(frozen=True)
class KeySource:
    """Frames ``f0:f1`` of stored block ``block`` (or, with ``block = OWN``, input frames f0:f1 of the
    forward), presented to attention at absolute position ``pos`` (of frame f0)."""

    block: int
    f0: int
    f1: int
    pos: int
    sink: bool = False

    @property
    def frames(self) -> int:
        return self.f1 - self.f0


@dataclass(frozen=True)
class QueryGroup:
    """Input frames ``q0:q1`` (absolute position ``q_pos``) attending to ``sources``; positions are
    rotated relative to ``base`` (0 in absolute RoPE mode)."""

    q0: int
    q1: int
    q_pos: int
    sources: tuple[KeySource, ...]
    base: int = 0

    @property
    def key_frames(self) -> int:
        return sum(s.frames for s in self.sources)


@dataclass(frozen=True)
class CacheBook:
    """Who is where: ``ring[i]`` = block in ring slot i (-1 empty); ``sink[i]`` = block in sink slot i
    (-1 not written yet); ``targets`` = blocks that go to the sink slots when written (the first
    blocks, or a re-anchored scene's first blocks; a re-anchor replaces the sink and drops older ring
    blocks when its first target is written). ``tags`` record, per stored block, what it was encoded
    with (the prompt key of its clean pass), so a plan can say what each read sees."""

    ring: tuple[int, ...]
    sink: tuple[int, ...]
    targets: tuple[int, ...]
    tags: tuple = ()  # (block, tag) pairs of stored blocks

    @classmethod
    def empty(cls, cfg: RollingConfig) -> "CacheBook":
        return cls((-1,) * cfg.ring_blocks, (-1,) * cfg.sink_blocks, tuple(range(cfg.sink_blocks)))

    def tag(self, b: int):
        return dict(self.tags).get(b)

    def sink_blocks(self) -> list[int]:
        return [b for b in self.sink if b >= 0]

    def cached(self) -> list[int]:
        """Blocks whose K/V are stored (sink first, then the ring, oldest first)."""
        sink = self.sink_blocks()
        return sink + sorted(b for b in self.ring if b >= 0 and b not in sink)

    def ring_slot(self, b: int) -> int:
        return (b - len(self.sink)) % len(self.ring)

    def in_ring(self, b: int) -> bool:
        return b >= 0 and bool(self.ring) and self.ring[self.ring_slot(b)] == b

    def write(self, b: int, tag=None) -> tuple["CacheBook", tuple[str, int]]:
        """The book after writing block b, and where b goes: ("sink", i) or ("ring", i). A block in the
        sink is rewritten in place (also while a re-anchor waits for its new sink blocks)."""
        keep = tuple((x, t) for x, t in self.tags if x != b)
        if b in self.sink or b in self.targets:
            i = self.sink.index(b) if b in self.sink else self.targets.index(b)
            ring = self.ring
            if b not in self.sink and i == 0 and self.targets != tuple(range(len(self.targets))):
                ring = tuple(x if x > b else -1 for x in ring)  # re-anchor: the new scene replaces the old
            sink = self.sink[:i] + (b,) + self.sink[i + 1:]
            where = ("sink", i)
        else:
            s = self.ring_slot(b)
            ring, sink, where = self.ring[:s] + (b,) + self.ring[s + 1:], self.sink, ("ring", s)
        stored = set(ring) | set(sink)
        return replace(self, ring=ring, sink=sink, tags=tuple((x, t) for x, t in keep if x in stored) + ((b, tag),)), where

    def reanchor(self, first: int) -> "CacheBook":
        """Blocks ``first ..`` become the sink when written; until then the current sink stays in use."""
        return replace(self, targets=tuple(range(first, first + len(self.sink))))

    def resink(self, first: int) -> "CacheBook":
        """Start over from blocks ``first ..`` as the sink (to be written next): everything else is dropped
        (LongLive's recache with ``global_sink: false``)."""
        return replace(self, ring=(-1,) * len(self.ring), sink=(-1,) * len(self.sink), tags=(),
                       targets=tuple(range(first, first + len(self.sink))))

    def ring_after(self, newest: int) -> list[int]:
        """Non-sink blocks in the ring once ``newest`` is there (oldest first)."""
        lo = max(len(self.sink), newest - len(self.ring) + 1)
        sink = set(self.sink) | set(self.targets)
        return [b for b in range(lo, newest + 1) if b not in sink and (b == newest or self.in_ring(b))]


@dataclass(frozen=True)
class KVPlan:
    """What one DiT forward writes and reads. Input frame i is at absolute position ``frame_pos[i]``;
    ``writes`` are (block, first input frame, "sink"/"ring", slot); ``book`` is the bookkeeping after the
    forward; ``tables`` the RoPE tables by (first position, frames)."""

    frame_pos: tuple[int, ...]
    writes: tuple[tuple[int, int, str, int], ...]
    groups: tuple[QueryGroup, ...]
    book: CacheBook
    tables: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_frames(self) -> int:
        return len(self.frame_pos)


def assemble_keys(parts: list, k: torch.Tensor, v: torch.Tensor, tpf: int, out=None):
    """Keys and values [B, L, H, D] of one query group from its ``parts`` (:meth:`RollingKVCache.key_parts`):
    stored views rotated where needed, and slices of the forward's own un-rotated k, v rotated at their
    positions. ``out=(K, V)`` buffers receive them (no allocation); without it they are concatenated
    (autograd-safe: training)."""
    ks, vs = [], []
    for src, a, b, rope in parts:
        if src == "own":
            kk, vv = apply_rope(k[:, a * tpf:b * tpf], *rope), v[:, a * tpf:b * tpf]
        else:
            kk, vv = (apply_rope(a, *rope) if rope is not None else a), b
        ks.append(kk.to(k.dtype))
        vs.append(vv.to(v.dtype))
    if len(ks) == 1:
        return ks[0], vs[0]
    if out is None:
        return torch.cat(ks, dim=1), torch.cat(vs, dim=1)
    n = 0
    for kk, vv in zip(ks, vs):
        m = kk.shape[1]
        out[0][:, n:n + m].copy_(kk)
        out[1][:, n:n + m].copy_(vv)
        n += m
    return out[0][:, :n], out[1][:, :n]


def cached_attention(plan: KVPlan, parts: list, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn,
                     tpf: int, scratch=None) -> torch.Tensor:
    """Self-attention of one layer over a KV plan: each query group (rotated at its positions) attends
    to its keys (``parts[g]``, see :func:`rolling.cache.assemble_keys`). q, k, v un-rotated [B, L, H, D]."""
    outs = []
    for g, pg in zip(plan.groups, parts):
        qg = apply_rope(q[:, g.q0 * tpf:g.q1 * tpf], *plan.tables[(g.q_pos - g.base, g.q1 - g.q0)])
        outs.append(attn(qg, *assemble_keys(pg, k, v, tpf, scratch)))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


class RollingKVCache:
    """KV cache for one run: B videos of one size. See the module docstring for the rules."""

    scratch = True  # inference assembles keys in a preallocated buffer

    def __init__(self, cfg: RollingConfig, *, num_layers: int, num_heads: int, head_dim: int,
                 batch: int, grid: tuple[int, int], device, dtype, rope: Rope | None = None):
        self.cfg = cfg
        self.fb = cfg.frames_per_block
        self.grid = grid
        self.tpf = grid[0] * grid[1]  # tokens per latent frame
        self.bt = self.fb * self.tpf  # tokens per block
        self.device, self.dtype = torch.device(device), dtype
        self.rope = rope or Rope(head_dim)
        self.adjacent_sink = cfg.schedule == "rolling"

        def buf(blocks):
            return torch.zeros((num_layers, batch, blocks * self.bt, num_heads, head_dim), device=device, dtype=dtype)

        self.sink_k, self.sink_v = buf(cfg.sink_blocks), buf(cfg.sink_blocks)
        self.ring_k, self.ring_v = buf(cfg.ring_blocks), buf(cfg.ring_blocks)
        if self.scratch:
            span = cfg.span_frames * self.tpf
            self.scratch_k = torch.empty((batch, span, num_heads, head_dim), device=device, dtype=dtype)
            self.scratch_v = torch.empty_like(self.scratch_k)
        self.reset()

    # ------------------------------------------------------------------ bookkeeping
    def reset(self) -> None:
        """Forget all blocks (the buffers are reused; nothing is reallocated)."""
        self.book = CacheBook.empty(self.cfg)

    def commit(self, plan: KVPlan) -> None:
        """Install the bookkeeping of a forward that has run."""
        self.book = plan.book

    def cached_blocks(self) -> list[int]:
        return self.book.cached()

    def state_dict(self) -> dict:
        """Full cache state (tensors are the live buffers: clone before mutating the cache further)."""
        b = self.book
        return {"sink_k": self.sink_k, "sink_v": self.sink_v, "ring_k": self.ring_k, "ring_v": self.ring_v,
                "ring": list(b.ring), "sink": list(b.sink), "targets": list(b.targets)}

    def load_state_dict(self, st: dict) -> None:
        for k in ("sink_k", "sink_v", "ring_k", "ring_v"):
            getattr(self, k).copy_(st[k])
        self.book = CacheBook(tuple(st["ring"]), tuple(st["sink"]), tuple(st["targets"]))

    @property
    def nbytes(self) -> int:
        bufs = [self.sink_k, self.sink_v, self.ring_k, self.ring_v]
        if self.scratch:
            bufs += [self.scratch_k, self.scratch_v]
        return sum(t.numel() * t.element_size() for t in bufs)

    # ------------------------------------------------------------------ plans (pure)
    def plan(self, fwd, tag=None) -> KVPlan:
        """The plan of a :class:`rolling.schedule.Forward` (its clean blocks, then its denoised blocks);
        ``tag`` is recorded with the blocks it writes (e.g. the prompt they are encoded under)."""
        fb = self.fb
        book, writes = self.book, []
        if fwd.kind == "recache" and fwd.recache == "new_sink":
            book = book.resink(fwd.clean[0])
        for i, b in enumerate(fwd.clean):
            if i >= fwd.query_only:
                book, (where, slot) = book.write(b, tag)
                writes.append((b, i * fb, where, slot))
        pos = [b * fb + f for b in fwd.clean + fwd.blocks for f in range(fb)]
        written = {b: f0 for b, f0, _, _ in writes}
        if fwd.kind == "recache":
            groups = [self._recache_group(book, fwd)]
        else:
            groups = [self._clean_group(book, i * fb, b, written) for i, b in enumerate(fwd.clean)]
        if fwd.blocks:
            groups.append(self._denoise_group(book, len(fwd.clean) * fb, fwd.blocks[0], len(fwd.blocks) * fb,
                                              written))
        if self.cfg.rope_mode == "relative":
            groups = [replace(g, base=min(s.pos for s in g.sources)) for g in groups]
        tables = {}
        hp, wp = self.grid
        needed = [(b * fb, fb) for b, _, _, _ in writes]  # stored rotated at the block's own position
        for g in groups:
            needed += [(g.q_pos - g.base, g.q1 - g.q0)] + [(s.pos - g.base, s.frames) for s in g.sources]
        for p, n in needed:
            if (p, n) not in tables:
                tables[(p, n)] = self.rope.tables(range(p, p + n), hp, wp, self.device)
        plan = KVPlan(tuple(pos), tuple(writes), tuple(groups), book, tables)
        self.check(plan)
        return plan

    def reanchored(self, first: int) -> KVPlan:
        """A plan that runs nothing and re-anchors the sink on blocks ``first ..`` (see CacheBook)."""
        return KVPlan((), (), (), self.book.reanchor(first))

    def _own(self, b: int, f0: int, f1: int, written: dict) -> KeySource | None:
        """Frames f0:f1 of block b served from this forward's input, if it writes b."""
        if b not in written:
            return None
        return KeySource(OWN, written[b] + f0, written[b] + f1, b * self.fb + f0)

    def _history(self, book: CacheBook, first: int, budget: int, written: dict) -> list[KeySource]:
        """Working cache: the newest clean non-sink blocks before ``first``, up to ``budget`` frames."""
        fb, out = self.fb, []
        for b in reversed([b for b in book.ring_after(first) if b < first]):
            if budget <= 0:
                break
            take = min(fb, budget)
            out.insert(0, self._own(b, fb - take, fb, written) or KeySource(b, fb - take, fb, b * fb + fb - take))
            budget -= take
        return out

    def _denoise_group(self, book: CacheBook, q0: int, first: int, frames: int, written: dict) -> QueryGroup:
        """Keys of ``frames`` input frames from q0 on, denoised blocks starting at block ``first``."""
        cfg, fb = self.cfg, self.fb
        pos = first * fb
        sink = [b for b in book.sink_blocks() if b < first]
        sources: list[KeySource] = []
        if sink or (cfg.sink_blocks == 0 and first > 0):  # history exists
            work = self._history(book, first, cfg.span_frames - frames - len(sink) * fb, written)
            wf = sum(s.frames for s in work)
            for i, b in enumerate(sink):
                p = pos - wf - (len(sink) - i) * fb if self.adjacent_sink else b * fb
                own = self._own(b, 0, fb, written)
                sources.append(replace(own, pos=p) if own else KeySource(b, 0, fb, p, sink=True))
            sources += work
        sources.append(KeySource(OWN, q0, q0 + frames, pos))
        return QueryGroup(q0, q0 + frames, pos, tuple(sources))

    def _recache_group(self, book: CacheBook, fwd) -> QueryGroup:
        """A prompt-switch re-encode (as LongLive's ``_recache_after_switch``): all ``fwd.clean`` frames
        are queries; the keys are the re-encoded frames after the ``query_only`` leading blocks (those map
        onto the kept sink: computed, not stored, not attended to), both ways, plus the kept sink."""
        fb, blocks, qo = self.fb, fwd.clean, fwd.query_only
        sources = []
        if qo:
            first_key = blocks[qo] * fb
            sink = [b for b in book.sink_blocks() if b not in blocks]
            for i, b in enumerate(sink):
                p = first_key - (len(sink) - i) * fb if self.adjacent_sink else b * fb
                sources.append(KeySource(b, 0, fb, p, sink=True))
        sources.append(KeySource(OWN, qo * fb, len(blocks) * fb, blocks[qo] * fb))
        return QueryGroup(0, len(blocks) * fb, blocks[0] * fb, tuple(sources))

    def _clean_group(self, book: CacheBook, q0: int, block: int, written: dict) -> QueryGroup:
        """Keys of the clean-cache pass of ``block`` (input frames q0 .. q0 + fb), after it is written."""
        cfg, fb = self.cfg, self.fb
        if not self.adjacent_sink:  # chunk_causal: the history a denoising query of the block reads
            return self._denoise_group(book, q0, block, fb, {b: f for b, f in written.items() if b != block})
        in_sink = block in book.sink
        content = [(b, True) for b in book.sink_blocks() if b <= block]
        if not in_sink:
            content += [(b, False) for b in book.ring_after(block)]
        sources: list[KeySource] = []
        budget = cfg.span_frames
        for b, is_sink in reversed(content):
            if budget <= 0:
                break
            take = min(fb, budget)
            sources.insert(0, self._own(b, fb - take, fb, written)
                           or KeySource(b, fb - take, fb, b * fb + fb - take, sink=is_sink))
            budget -= take
        return QueryGroup(q0, q0 + fb, block * fb, tuple(sources))

    # ------------------------------------------------------------------ execution
    def check(self, plan: KVPlan) -> None:
        """Every stored key a plan reads must be in the cache (a bookkeeping invariant)."""
        for g in plan.groups:
            for s in g.sources:
                if s.block >= 0 and (s.block not in plan.book.sink if s.sink else not plan.book.in_ring(s.block)):
                    raise RuntimeError(f"internal error: block {s.block} is not in the KV cache")

    def _stored_rotated(self, sink: bool) -> bool:
        return self.cfg.rope_mode == "reference" and not sink

    def _slot(self, layer: int, book: CacheBook, block: int, sink: bool):
        if sink:
            return self.sink_k[layer], self.sink_v[layer], book.sink.index(block) * self.bt
        return self.ring_k[layer], self.ring_v[layer], book.ring_slot(block) * self.bt

    def key_parts(self, layer: int, plan: KVPlan, g: QueryGroup) -> list:
        """What :func:`assemble_keys` needs for group g in ``layer``: ("own", f0, f1, rope) for the
        forward's own frames, ("stored", k view, v view, rope or None) for cached keys (detached views)."""
        tpf, fb, parts = self.tpf, self.fb, []
        for s in g.sources:
            rope = plan.tables[(s.pos - g.base, s.frames)]
            if s.block == OWN:
                parts.append(("own", s.f0, s.f1, rope))
                continue
            kst, vst, t0 = self._slot(layer, plan.book, s.block, s.sink)
            kv = kst[:, t0 + s.f0 * tpf:t0 + s.f1 * tpf].detach(), vst[:, t0 + s.f0 * tpf:t0 + s.f1 * tpf].detach()
            if self._stored_rotated(s.sink):
                if not (s.pos == s.block * fb + s.f0 and g.base == 0):
                    raise RuntimeError("internal error: re-positioning a rotated key")
                rope = None
            parts.append(("stored", *kv, rope))
        return parts

    @torch.no_grad()
    def write(self, layer: int, plan: KVPlan, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the plan's blocks from one layer's un-rotated k, v [B, L, H, D] (K rotated first where
        the cache keeps it rotated); detached copies."""
        tpf, fb = self.tpf, self.fb
        for b, f0, where, slot in plan.writes:
            kb, vb = k[:, f0 * tpf:(f0 + fb) * tpf], v[:, f0 * tpf:(f0 + fb) * tpf]
            if self._stored_rotated(where == "sink"):
                kb = apply_rope(kb, *plan.tables[(plan.frame_pos[f0], fb)])
            sk, sv = (self.sink_k, self.sink_v) if where == "sink" else (self.ring_k, self.ring_v)
            t0 = slot * self.bt
            sk[layer][:, t0:t0 + self.bt].copy_(kb)
            sv[layer][:, t0:t0 + self.bt].copy_(vb)

    def attend(self, layer: int, plan: KVPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               attn) -> torch.Tensor:
        """Self-attention of one layer (inference). q, k, v: [B, L, H, D] un-rotated, for the plan's input
        tokens. Writes the plan's blocks into the cache and attends per query group. Returns [B, L, H, D]."""
        self.write(layer, plan, k, v)
        parts = [self.key_parts(layer, plan, g) for g in plan.groups]
        return cached_attention(plan, parts, q, k, v, attn, self.tpf, (self.scratch_k, self.scratch_v))
