"""Prompt embeddings for training. The core has no text encoder: encode the prompt list (the
reference uses ``vidprom_filtered_extended.txt``) and the negative prompt with umT5-XXL offline and
store them as ``context`` [N, tokens, 4096] and ``negative`` [tokens, 4096] (padding positions zero)
in a ``.safetensors`` (or weights-only ``.pt``) file.
"""
from __future__ import annotations

import os

import torch


class PromptBank:
    """Precomputed text embeddings; :meth:`sample` draws a batch with the caller's generator."""

    def __init__(self, context: torch.Tensor, negative: torch.Tensor):
        if context.ndim != 3:
            raise ValueError(f"prompt embeddings must be [N, tokens, text_dim], got {list(context.shape)}")
        if negative.ndim == 2:
            negative = negative.unsqueeze(0)
        if negative.ndim != 3 or negative.shape[0] != 1 or negative.shape[-1] != context.shape[-1]:
            raise ValueError(f"negative embedding must be [tokens, {context.shape[-1]}], got {list(negative.shape)}")
        self.context, self.negative = context, negative

    @classmethod
    def from_file(cls, path: str) -> "PromptBank":
        if not os.path.isfile(path):
            raise ValueError(f"prompt embedding file not found: {path}")
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            d = load_file(path, device="cpu")
        else:
            d = torch.load(path, map_location="cpu", weights_only=True)
        if "context" not in d or "negative" not in d:
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

    def sample(self, batch: int, generator: torch.Generator, device) -> torch.Tensor:
        idx = torch.randint(0, self.context.shape[0], (batch,), generator=generator)
        return self.context[idx].to(device)

    def negative_batch(self, batch: int, device) -> torch.Tensor:
        return self.negative.expand(batch, -1, -1).to(device)
