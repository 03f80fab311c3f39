"""Prompt embeddings for training. The core has no text encoder: encode the prompt list (the
reference uses ``vidprom_filtered_extended.txt``) and the negative prompt with umT5-XXL offline and
store them as ``context`` [N, tokens, 4096] and ``negative`` [tokens, 4096] (padding positions zero)
in a ``.safetensors`` (or weights-only ``.pt``) file.

Sampling is by epoch, without replacement: the prompts are drawn in the order of a random permutation
(from the caller's generator), reshuffled when it is used up, so every prompt is seen once per epoch.
With several ranks the stream is shared (every rank passes an identically seeded generator) and each
call takes ``batch * world_size`` entries, rank r the r-th ``batch`` of them: within an epoch no two
ranks see the same prompt. :meth:`PromptBank.state_dict` / :meth:`load_state_dict` carry the position
for an exact resume.
"""
from __future__ import annotations

import os

import torch


class PromptBank:
    """Precomputed text embeddings; :meth:`sample` draws the next batch of an epoch (without
    replacement) with the caller's generator."""

    def __init__(self, context: torch.Tensor, negative: torch.Tensor):
        if context.ndim != 3:
            raise ValueError(f"prompt embeddings must be [N, tokens, text_dim], got {list(context.shape)}")
        if negative.ndim == 2:
            negative = negative.unsqueeze(0)
        if negative.ndim != 3 or negative.shape[0] != 1 or negative.shape[-1] != context.shape[-1]:
            raise ValueError(f"negative embedding must be [tokens, {context.shape[-1]}], got {list(negative.shape)}")
        self.context, self.negative = context, negative
        self._order = torch.empty(0, dtype=torch.long)  # the current epoch's permutation (drawn on first use)
        self._pos = 0
        self.epoch = 0  # epochs started

    @classmethod
    def from_file(cls, path: str) -> "PromptBank":
        from ..loading import read_raw  # safe reading with named errors (missing, empty, truncated files)
        if not os.path.isfile(path):
            raise ValueError(f"prompt embedding file not found: {path}")
        d = read_raw(path)
        if not isinstance(d, dict) or "context" not in d or "negative" not in d:
            raise ValueError(f"{path} must hold tensors 'context' [N, tokens, dim] and 'negative' [tokens, dim]")
        return cls(d["context"], d["negative"])

    @classmethod
    def random(cls, n: int, tokens: int, text_dim: int, seed: int = 0, active: int = 8) -> "PromptBank":
        """Random stand-ins (smoke tests): ``active`` non-zero tokens, the rest zero padding."""
        g = torch.Generator().manual_seed(seed)
        ctx = torch.zeros(n + 1, tokens, text_dim)
        a = min(active, tokens)
        ctx[:, :a] = torch.randn(n + 1, a, text_dim, generator=g)
        return cls(ctx[:n], ctx[n])

    @property
    def text_dim(self) -> int:
        return self.context.shape[-1]

    def sample(self, batch: int, generator: torch.Generator, device, *, rank: int = 0,
               world_size: int = 1) -> torch.Tensor:
        """The next ``batch`` prompts of this rank [batch, tokens, dim]: without replacement within an
        epoch (a permutation drawn from ``generator``, reshuffled when used up); see the module docstring."""
        if batch < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch >= 1 and 0 <= rank < world_size, got {batch}, {rank}, {world_size}")
        take = self._take(batch * world_size, generator)
        idx = take[rank * batch:(rank + 1) * batch]
        return self.context[idx].to(device)

    def _take(self, k: int, generator: torch.Generator) -> torch.Tensor:
        n = self.context.shape[0]
        parts, need = [], k
        while need:
            if self._pos >= self._order.numel():
                self._order = torch.randperm(n, generator=generator)
                self._pos = 0
                self.epoch += 1
            got = self._order[self._pos:self._pos + need]
            parts.append(got)
            self._pos += got.numel()
            need -= got.numel()
        return torch.cat(parts)

    def state_dict(self) -> dict:
        """Where the sampling stands (the epoch's permutation and position), for a checkpoint."""
        return {"order": self._order.clone(), "pos": int(self._pos), "epoch": int(self.epoch)}

    def load_state_dict(self, sd: dict) -> None:
        order = sd["order"].long()
        if order.numel() and (order.numel() != self.context.shape[0] or
                              not torch.equal(order.sort().values, torch.arange(order.numel()))):
            raise ValueError(f"prompt sampling state is for {order.numel()} prompts, this bank has "
                             f"{self.context.shape[0]}; resume with the same prompt file")
        self._order, self._pos, self.epoch = order, int(sd["pos"]), int(sd["epoch"])

    def negative_batch(self, batch: int, device) -> torch.Tensor:
        return self.negative.expand(batch, -1, -1).to(device)
