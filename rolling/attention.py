"""Attention backends selected by name: ``sdpa`` (default), ``sage`` (sageattention, CUDA only),
``flash`` (flash-attn). An unavailable backend falls back to ``sdpa`` with a warning naming what is
missing. All take q [B, Lq, H, D], k/v [B, Lk, H, D] (no mask, scale 1/sqrt(D)) and return [B, Lq, H, D].
"""
from __future__ import annotations

import importlib
import logging
import warnings
from typing import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
BACKENDS = ("auto", "sdpa", "sage", "flash")


def sdpa_attention(q, k, v):
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _sage(device) -> AttentionFn | str:
    if device is not None and torch.device(device).type != "cuda":
        return "sageattention needs a CUDA device"
    try:
        mod = importlib.import_module("sageattention")
    except Exception as e:  # ImportError or a broken CUDA build
        return f"the sageattention package is not importable ({e.__class__.__name__}: {e}); pip install sageattention"

    def sage(q, k, v):
        return mod.sageattn(q, k, v, tensor_layout="NHD", is_causal=False)
    return sage


def _flash(device) -> AttentionFn | str:
    if device is not None and torch.device(device).type != "cuda":
        return "flash-attn needs a CUDA device"
    try:
        mod = importlib.import_module("flash_attn")
    except Exception as e:
        return f"the flash_attn package is not importable ({e.__class__.__name__}: {e}); pip install flash-attn"

    def flash(q, k, v):
        if q.dtype not in (torch.float16, torch.bfloat16):
            return sdpa_attention(q, k, v)
        return mod.flash_attn_func(q, k, v)
    return flash


def get_attention(name: str = "sdpa", device=None) -> AttentionFn:
    """Return the attention function for ``name`` on ``device``; fall back to sdpa with a warning."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name in ("sdpa", "auto"):
        if name == "auto" and device is not None and torch.device(device).type == "cuda":
            fn = _sage(device)
            if callable(fn):
                return fn
        return sdpa_attention
    fn = {"sage": _sage, "flash": _flash}[name](device)
    if callable(fn):
        return fn
    warnings.warn(f"attention backend {name!r} unavailable: {fn}; falling back to 'sdpa'", RuntimeWarning, stacklevel=2)
    return sdpa_attention
