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
    forward; ``tables`` the RoPE tables by (first position, frames).

    For execution the plan is also a static :class:`Layout` (shapes and structure only: equal for every
    steady-state window) plus ``args``, the tensors that differ between windows (RoPE tables, cache
    token indices), so a compiled forward specialises on the layout and never on positions or slots."""

    frame_pos: tuple[int, ...]
    writes: tuple[tuple[int, int, str, int], ...]
    groups: tuple[QueryGroup, ...]
    book: CacheBook
    tables: dict = field(default_factory=dict, repr=False, compare=False)
    layout: "Layout | None" = field(default=None, compare=False)
    args: tuple = field(default=(), repr=False, compare=False)

    @property
    def num_frames(self) -> int:
        return len(self.frame_pos)


@dataclass(frozen=True)
class Layout:
    """The static structure of a forward's attention: per group, its query frames, the own-frame key
    ranges, how many stored ring / sink key tokens it gathers (and whether they are rotated on read);
    per write, where and from which input frame. Its tensors come in ``KVPlan.args``, in the order of
    :func:`attend_layer`."""

    tpf: int
    bt: int
    groups: tuple  # (q0, q1, own ranges ((f0, f1), ...), ring tokens, ring rotated on read, sink tokens)
    writes: tuple  # (where, f0, rotate on write)


def attend_layer(layout: Layout, args, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, stores, attn,
                 scratch=None, write: bool = True) -> torch.Tensor:
    """Self-attention of one layer over a plan (its ``layout`` and ``args``): write the plan's blocks into
    ``stores`` = (sink_k, sink_v, ring_k, ring_v) [layers, B, tokens, H, D], then, per query group, rotate
    the queries and attend to: the forward's own frames (rotated), stored ring keys and sink keys
    (gathered by token index, rotated where stored un-rotated). q, k, v: un-rotated [B, L, H, D].
    ``scratch=(K, V)`` buffers receive the keys (no allocation; inference); without, they are
    concatenated (autograd-safe: training). Only tensor values vary between windows of one layout."""
    tpf, it = layout.tpf, iter(args)
    store = None if stores is None else {"sink": (stores[0][layer], stores[1][layer]),
                                         "ring": (stores[2][layer], stores[3][layer])}
    with torch.no_grad():
        for where, f0, rotate in layout.writes:  # their tensors come first in args, also when not writing
            idx, rope = next(it), ((next(it), next(it)) if rotate else None)
            if write:
                kb, vb = k[:, f0 * tpf:f0 * tpf + layout.bt].detach(), v[:, f0 * tpf:f0 * tpf + layout.bt].detach()
                if rope is not None:
                    kb = apply_rope(kb, *rope)
                store[where][0].index_copy_(1, idx, kb)
                store[where][1].index_copy_(1, idx, vb)
    outs = []
    for q0, q1, own, ring_tokens, ring_rotate, sink_tokens in layout.groups:
        qg = apply_rope(q[:, q0 * tpf:q1 * tpf], next(it), next(it))
        ks, vs = [], []
        for f0, f1 in own:
            ks.append(apply_rope(k[:, f0 * tpf:f1 * tpf], next(it), next(it)))
            vs.append(v[:, f0 * tpf:f1 * tpf])
        for where, tokens, rotate in (("ring", ring_tokens, ring_rotate), ("sink", sink_tokens, True)):
            if tokens:
                idx = next(it)
                kk, vv = store[where][0].index_select(1, idx), store[where][1].index_select(1, idx)
                ks.append(apply_rope(kk, next(it), next(it)) if rotate else kk)
                vs.append(vv)
        if len(ks) == 1:
            kk, vv = ks[0], vs[0]
        elif scratch is None:
            kk, vv = torch.cat(ks, dim=1), torch.cat(vs, dim=1)
        else:
            n = 0
            for a, b in zip(ks, vs):
                scratch[0][:, n:n + a.shape[1]].copy_(a)
                scratch[1][:, n:n + b.shape[1]].copy_(b)
                n += a.shape[1]
            kk, vv = scratch[0][:, :n], scratch[1][:, :n]
        outs.append(attn(qg, kk, vv))
    if not outs:
        return None
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
        self._idx: dict = {}  # token-index tensors by (store, slots and frames)

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
        bufs = self.stores + ((self.scratch_k, self.scratch_v) if self.scratch else ())
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
        hp, wp = self.grid
        needed = [(b * fb, fb) for b, _, _, _ in writes]  # stored rotated at the block's own position
        for g in groups:
            needed += [(g.q_pos - g.base, g.q1 - g.q0)] + [(s.pos - g.base, s.frames) for s in g.sources]
        tables = {(p, n): self.rope.tables(range(p, p + n), hp, wp, self.device) for p, n in dict.fromkeys(needed)}
        plan = KVPlan(tuple(pos), tuple(writes), tuple(groups), book, tables)
        self.check(plan)
        layout, args = self._layout(plan)
        return replace(plan, layout=layout, args=args)

    def _layout(self, plan: KVPlan) -> tuple[Layout, tuple]:
        """The plan as a static layout plus the tensors of this forward (see :func:`attend_layer`)."""
        tpf, fb, hp, wp = self.tpf, self.fb, *self.grid
        args, writes, groups = [], [], []
        ring_rotated = self.cfg.rope_mode == "reference"  # ring keys are stored rotated; sink keys never

        def tokens(where, blocks_frames):  # token indices in a store, memoised (ring positions cycle)
            key = (where, blocks_frames)
            t = self._idx.get(key)
            if t is None:
                idx = [slot * self.bt + f * tpf + i for slot, f0, f1 in blocks_frames for f in range(f0, f1)
                       for i in range(tpf)]
                t = self._idx[key] = torch.tensor(idx, dtype=torch.long, device=self.device)
            return t
        for b, f0, where, slot in plan.writes:
            rotate = ring_rotated and where == "ring"
            args.append(tokens(where, ((slot, 0, fb),)))
            if rotate:
                args += plan.tables[(b * fb, fb)]
            writes.append((where, f0, rotate))
        for g in plan.groups:
            args += plan.tables[(g.q_pos - g.base, g.q1 - g.q0)]
            own = [s for s in g.sources if s.block == OWN]
            for s in own:
                args += plan.tables[(s.pos - g.base, s.frames)]
            layout_g = [g.q0, g.q1, tuple((s.f0, s.f1) for s in own)]
            for sink in (False, True):
                stored = [s for s in g.sources if s.block != OWN and s.sink == sink]
                n = sum(s.frames for s in stored) * tpf
                rotate = sink or not ring_rotated
                if n:
                    where = "sink" if sink else "ring"
                    slot = plan.book.sink.index if sink else plan.book.ring_slot
                    args.append(tokens(where, tuple((slot(s.block), s.f0, s.f1) for s in stored)))
                    if rotate:
                        positions = [p for s in stored for p in range(s.pos - g.base, s.pos - g.base + s.frames)]
                        args += self.rope.tables(positions, hp, wp, self.device)
                    elif any(s.pos != s.block * fb + s.f0 or g.base for s in stored):
                        raise RuntimeError("internal error: re-positioning a rotated key")
                layout_g += [n, rotate] if not sink else [n]
            groups.append(tuple(layout_g))
        return Layout(tpf, self.bt, tuple(groups), tuple(writes)), tuple(args)

    def reanchored(self, first: int) -> KVPlan:
        """A plan that runs nothing and re-anchors the sink on blocks ``first ..`` (see CacheBook)."""
        return KVPlan((), (), (), self.book.reanchor(first))

    def _own(self, b: int, f0: int, f1: int, written: dict) -> KeySource | None:
        """Frames f0:f1 of block b served from this forward's input, if it writes b."""
        if b not in written:
            return None
        return KeySource(OWN, written[b] + f0, written[b] + f1, b * self.fb + f0)

    def _newest(self, content: list[tuple[int, bool]], budget: int, written: dict) -> list[KeySource]:
        """Keys of the newest ``budget`` frames of ``content`` ((block, in the sink) pairs, oldest first)."""
        fb, out = self.fb, []
        for b, sink in reversed(content):
            if budget <= 0:
                break
            take = min(fb, budget)
            out.insert(0, self._own(b, fb - take, fb, written)
                       or KeySource(b, fb - take, fb, b * fb + fb - take, sink=sink))
            budget -= take
        return out

    def _denoise_group(self, book: CacheBook, q0: int, first: int, frames: int, written: dict) -> QueryGroup:
        """Keys of ``frames`` input frames from q0 on, denoised blocks starting at block ``first``."""
        cfg, fb = self.cfg, self.fb
        pos = first * fb
        sink = [b for b in book.sink_blocks() if b < first]
        sources: list[KeySource] = []
        if sink or (cfg.sink_blocks == 0 and first > 0):  # history exists
            # working cache: the newest clean non-sink blocks before ``first``
            work = self._newest([(b, False) for b in book.ring_after(first) if b < first],
                                cfg.span_frames - frames - len(sink) * fb, written)
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
        fb = self.fb
        if not self.adjacent_sink:  # chunk_causal: the history a denoising query of the block reads
            return self._denoise_group(book, q0, block, fb, {b: f for b, f in written.items() if b != block})
        content = [(b, True) for b in book.sink_blocks() if b <= block]
        if block not in book.sink:
            content += [(b, False) for b in book.ring_after(block)]
        return QueryGroup(q0, q0 + fb, block * fb, tuple(self._newest(content, self.cfg.span_frames, written)))

    # ------------------------------------------------------------------ execution
    def check(self, plan: KVPlan) -> None:
        """Every stored key a plan reads must be in the cache (a bookkeeping invariant)."""
        for g in plan.groups:
            for s in g.sources:
                if s.block >= 0 and (s.block not in plan.book.sink if s.sink else not plan.book.in_ring(s.block)):
                    raise RuntimeError(f"internal error: block {s.block} is not in the KV cache")

    @property
    def stores(self) -> tuple:
        return self.sink_k, self.sink_v, self.ring_k, self.ring_v

    def write(self, layer: int, plan: KVPlan, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the plan's blocks from one layer's un-rotated k, v [B, L, H, D] (detached copies)."""
        attend_layer(replace(plan.layout, groups=()), plan.args, layer, k, k, v, self.stores, None)
