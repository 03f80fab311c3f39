"""The KV cache for training rollouts: the core's :class:`rolling.cache.RollingKVCache` (same plans,
same read rules, same key assembly), made autograd-safe.

* No scratch buffer: a gradient forward's keys are concatenated (:func:`rolling.cache.attend_layer`
  without ``scratch``), so no later in-place write can invalidate what backward needs.
* Stored keys are gathered inside the block (the buffers need no gradient), so a checkpointed block
  recomputes exactly the first pass as long as the slots it reads keep their contents until backward. That is guaranteed, not assumed: the training cache holds the
  longest rollout without eviction (27 frames, as the reference's training cache), every slot is
  written once per rollout, and :meth:`TrainKVCache.plan` raises if a forward would overwrite a slot
  that a gradient forward has read since :meth:`reset`.
* Writes store detached copies (history is self-generated and detached, as in the reference's
  no_grad cache updates) and happen outside any checkpointed region.
"""
from __future__ import annotations

import torch

from ..cache import OWN, KVPlan, RollingKVCache


class TrainKVCache(RollingKVCache):
    """RollingKVCache with concatenated key assembly and a guard for K/V a pending backward needs."""

    scratch = False

    def reset(self) -> None:
        super().reset()
        self.grad_reads: set[tuple[str, int]] = set()  # (sink|ring, slot) read by a gradient forward

    def plan(self, fwd) -> KVPlan:
        plan = super().plan(fwd)
        clash = [(w, s) for _, _, w, s in plan.writes if (w, s) in self.grad_reads]
        if clash:
            raise RuntimeError(f"training KV cache: {fwd.kind} forward of blocks {fwd.clean} would overwrite slots "
                               f"{clash} that a gradient forward reads; the cache must hold the whole rollout "
                               "(capacity_frames)")
        return plan

    def note_reads(self, plan: KVPlan) -> None:
        """Record the stored slots a gradient forward reads (a later write to them would be refused)."""
        for g in plan.groups:
            for s in g.sources:
                if s.block != OWN:
                    self.grad_reads.add(("sink", plan.book.sink.index(s.block)) if s.sink
                                        else ("ring", plan.book.ring_slot(s.block)))
