"""A tiny stand-in for umT5: fixed word embeddings for the toy grammar's vocabulary.

``TextEncoder().encode(caption)`` -> float32 [1, TOKENS, TEXT_DIM]: one vector per word, then an
end-of-sequence vector (umT5 ends every prompt with ``</s>``), then zero padding, like umT5's zeroed
padding positions. The empty prompt (the negative / unconditional prompt) encodes to just ``</s>``.
Embeddings are orthogonal vectors scaled to unit RMS, drawn once from ``seed``; nothing is trained.
"""
from __future__ import annotations

import torch

from .captions import VOCABULARY

TEXT_DIM = 32
TOKENS = 16
EOS = "</s>"


class TextEncoder:
    """Word-embedding text encoder: [1, tokens, text_dim] per caption (real tokens first, zero padding)."""

    def __init__(self, text_dim: int = TEXT_DIM, tokens: int = TOKENS, seed: int = 0):
        words = VOCABULARY + (EOS,)
        if text_dim < len(words):
            raise ValueError(f"text_dim must be at least the vocabulary size + 1 ({len(words)}) for orthogonal "
                             f"embeddings, got {text_dim}")
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(text_dim, text_dim, generator=g, dtype=torch.float64))
        self.table = (q[: len(words)] * text_dim ** 0.5).float()  # [V, text_dim], unit RMS per entry
        self.index = {w: i for i, w in enumerate(words)}
        self.text_dim, self.tokens = text_dim, tokens

    def tokenize(self, caption: str) -> list[str]:
        """Lower-cased words + ``</s>``; ValueError for words outside the vocabulary or too many tokens."""
        if not isinstance(caption, str):
            raise ValueError(f"a caption must be a string, got {type(caption).__name__}")
        words = caption.lower().split()
        unknown = [w for w in words if w not in self.index or w == EOS]
        if unknown:
            raise ValueError(f"unknown word(s) {unknown} in {caption!r}; the toy text encoder knows: "
                             f"{', '.join(VOCABULARY)}")
        if len(words) + 1 > self.tokens:
            raise ValueError(f"caption {caption!r} has {len(words)} words; at most {self.tokens - 1} fit "
                             f"in {self.tokens} tokens (one is </s>)")
        return words + [EOS]

    def encode(self, caption: str) -> torch.Tensor:
        """[1, tokens, text_dim] float32 embedding of one caption (any word sequence of the vocabulary)."""
        ids = [self.index[w] for w in self.tokenize(caption)]
        out = torch.zeros(1, self.tokens, self.text_dim)
        out[0, : len(ids)] = self.table[ids]
        return out

    def encode_batch(self, captions) -> torch.Tensor:
        """[B, tokens, text_dim] for a list of captions."""
        return torch.cat([self.encode(c) for c in captions], dim=0)

    __call__ = encode

    def prompt_bank(self, captions=None):
        """A :class:`rolling.train.data.PromptBank` of the captions (default: all 96) with the empty
        prompt as the negative, for distillation on the toy world."""
        from ..train.data import PromptBank
        from .captions import all_captions
        captions = all_captions() if captions is None else list(captions)
        return PromptBank(self.encode_batch(captions), self.encode("")[0])
