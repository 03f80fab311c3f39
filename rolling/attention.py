"""Attention kernels, chosen by name (``BACKENDS``), each saying what actually runs.

* ``sdpa``: PyTorch's scaled_dot_product_attention, PyTorch picks the kernel (flash / memory-efficient
  / cuDNN / math);
* ``cudnn``: SDPA restricted to the cuDNN kernel (the FA3-class kernel PyTorch ships for Hopper);
* ``flash``: the flash-attn package, FA3 (``flash_attn_interface``) where installed, else FA2;
* ``sage``: SageAttention (INT8 QK, FP8 PV; CUDA only; peers report oversaturation over long runs:
  measure it on the toy world before trusting it);
* ``auto``: on CUDA, FA3 where installed, else cuDNN SDPA on Hopper (sm 9.x) and newer, else sdpa;
  on other devices sdpa. Sage is never picked automatically.

An unavailable backend falls back to ``sdpa`` with a warning naming what is missing. Every returned
function carries ``.kernel``, the name of what runs (e.g. ``"sdpa"`` after a fallback). All take
q [B, Lq, H, D], k/v [B, Lk, H, D] (no mask, scale 1/sqrt(D)) and return [B, Lq, H, D].
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
BACKENDS = ("auto", "sdpa", "cudnn", "flash", "sage")


def _named(fn, kernel: str):
    fn.kernel = kernel
    return fn


def sdpa_attention(q, k, v):
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


sdpa_attention.kernel = "sdpa"


def _cuda(device) -> bool:
    return device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available()


def _cudnn(device) -> AttentionFn | str:
    if not _cuda(device):
        return "cuDNN attention needs a CUDA device"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def cudnn(q, k, v):
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return sdpa_attention(q, k, v)
    return _named(cudnn, "cudnn")


def _flash(device) -> AttentionFn | str:
    if not _cuda(device):
        return "flash-attn needs a CUDA device"
    for module, kernel in (("flash_attn_interface", "flash (FA3)"), ("flash_attn", "flash (FA2)")):
        try:
            mod = importlib.import_module(module)
        except Exception:  # ImportError or a broken CUDA build
            continue

        def flash(q, k, v, mod=mod):
            out = mod.flash_attn_func(q, k, v)
            return out[0] if isinstance(out, tuple) else out  # FA3 returns (out, lse)
        return _named(flash, kernel)
    return "neither flash_attn_interface (FA3) nor flash_attn (FA2) is importable; pip install flash-attn"


def _sage(device) -> AttentionFn | str:
    if not _cuda(device):
        return "sageattention needs a CUDA device"
    try:
        mod = importlib.import_module("sageattention")
    except Exception as e:
        return f"the sageattention package is not importable ({e.__class__.__name__}: {e}); pip install sageattention"

    def sage(q, k, v):
        return mod.sageattn(q, k, v, tensor_layout="NHD", is_causal=False)
    return _named(sage, "sage")


def get_attention(name: str = "sdpa", device=None) -> AttentionFn:
    """The attention function for ``name`` on ``device`` (its ``.kernel`` says what runs); an unavailable
    choice falls back to sdpa with a warning, except ``auto``, which falls back quietly."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "sdpa":
        return sdpa_attention
    if name == "auto":
        if _cuda(device):
            fn = _flash(device)
            if callable(fn) and "FA3" in fn.kernel:
                return fn
            if torch.cuda.get_device_capability(torch.device(device))[0] >= 9:
                return _cudnn(device)
        return sdpa_attention
    fn = {"cudnn": _cudnn, "flash": _flash, "sage": _sage}[name](device)
    if callable(fn):
        return fn
    warnings.warn(f"attention backend {name!r} unavailable: {fn}; falling back to 'sdpa'", RuntimeWarning, stacklevel=2)
    return sdpa_attention
