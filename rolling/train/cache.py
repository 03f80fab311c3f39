"""An autograd-safe view of the core's :class:`rolling.cache.RollingKVCache` for training rollouts.

The core cache assembles keys in a shared in-place scratch buffer and writes blocks with ``copy_``
into preallocated storage: fine for inference, wrong under autograd (a later in-place write would
invalidate tensors saved for backward, and a checkpointed block recomputed during backward would read
whatever the buffer holds by then). Here:

* :meth:`TrainKVCache.context` returns, per layer and query group, the *stored* keys/values the core
  would read, as detached **views** of the cache buffers (no copies) plus the RoPE table to apply
  when a key is stored un-rotated (the sink, re-rotated to its place). The block rotates them itself,
  so a checkpointed block recomputes exactly the first pass as long as the viewed slots keep their
  contents until backward. That is guaranteed, not assumed: the training cache holds the longest
  rollout without eviction (27 frames, as the reference's training cache), every slot is written
  once per rollout, and :meth:`TrainKVCache.prepare` raises if a write would overwrite a slot that a
  gradient forward has read since :meth:`reset`;
* sources the same forward writes (the clean-cache pass reads the block it writes) and the forward's
  own frames are served from the fresh K/V inside the block (identical values: the same rotation of
  the same keys), never from the buffer;
* :meth:`TrainKVCache.write` stores a forward's written block *detached* (history is self-generated
  and detached, as in the reference's no_grad cache updates). It is called outside any checkpointed
  region.

Bookkeeping (plans, read/write rules, eviction, slot assignment in ``prepare``) is the core's,
unchanged; slot lookup mirrors ``RollingKVCache.attend`` (``_slot`` / ``_stored_rotated`` /
``plan.targets``), which the tests check value for value against the core's forward.
"""
from __future__ import annotations

import torch

from ..cache import ForwardPlan, QueryGroup, RollingKVCache
from ..rope import apply_rope


class TrainKVCache(RollingKVCache):
    """RollingKVCache with functional reads and detached writes (see the module docstring)."""

    def reset(self) -> None:
        super().reset()
        self.grad_reads: set[tuple[str, int]] = set()  # (sink|ring, slot) read by a gradient forward

    def prepare(self, plan: ForwardPlan) -> None:
        """The core's prepare (bookkeeping, slot assignment), a guard against overwriting K/V that a
        pending backward still needs, and RoPE tables memoised across forwards."""
        super().prepare(plan)
        clash = [t for t in plan.targets if tuple(t) in self.grad_reads]  # type: ignore[attr-defined]
        if clash:
            raise RuntimeError(f"training KV cache: writing {plan.writes} would overwrite slots {clash} that a "
                               "gradient forward reads; the cache must hold the whole rollout (capacity_frames)")
        inner = plan.table  # type: ignore[attr-defined]
        memo = self.__dict__.setdefault("_rope_memo", {})

        def table(first_pos: int, frames: int):
            key = (first_pos, frames)
            t = memo.get(key)
            if t is None:
                t = memo[key] = inner(first_pos, frames)
            return t
        plan.table = table  # type: ignore[attr-defined]

    def written_blocks(self, plan: ForwardPlan) -> dict[int, int]:
        """block -> first input frame, for the blocks ``plan`` writes."""
        return {b: f0 for b, f0 in plan.writes}

    def self_sources(self, plan: ForwardPlan, group: QueryGroup) -> list[tuple[int, int, int]]:
        """(first input frame, end input frame, position - base) of keys taken from the forward's own K."""
        writes = self.written_blocks(plan)
        out = []
        for s in group.sources:
            if s.block < 0:
                out.append((s.f0, s.f1, s.pos - group.base))
            elif s.block in writes:
                f0 = writes[s.block] + s.f0
                out.append((f0, f0 + s.frames, s.pos - group.base))
        return out

    def context(self, layer: int, plan: ForwardPlan, group: QueryGroup) -> list:
        """Stored keys/values of ``group`` in ``layer``: [(k, v, rope or None)], k/v [B, L, H, D] detached
        views of the buffers; ``rope`` = (cos, sin) to apply to k (stored un-rotated), None if k is
        stored rotated at the right position."""
        writes = self.written_blocks(plan)
        table = plan.table  # type: ignore[attr-defined]
        tpf, fb = self.tpf, self.fb
        out = []
        grad = torch.is_grad_enabled()
        for s in group.sources:
            if s.block < 0 or s.block in writes:
                continue
            kst, vst, t0 = self._slot(layer, s.block, s.sink)
            k = kst[:, t0 + s.f0 * tpf:t0 + s.f1 * tpf].detach()
            v = vst[:, t0 + s.f0 * tpf:t0 + s.f1 * tpf].detach()
            rope = None
            rotated = self._stored_rotated(s.sink)
            if not (rotated and s.pos == s.block * fb + s.f0 and group.base == 0):
                if rotated:
                    raise RuntimeError("internal error: re-positioning a rotated key")
                rope = table(s.pos - group.base, s.frames)
            out.append((k, v, rope))
            if grad:
                self.grad_reads.add(("sink", self._sink_slot(s.block)) if s.sink else ("ring", self._ring_slot(s.block)))
        return out

    @torch.no_grad()
    def write(self, layer: int, plan: ForwardPlan, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the plan's blocks from this layer's un-rotated k, v [B, L, H, D] (detached copies)."""
        super().write(layer, plan, k.detach(), v.detach())
