"""The causal, KV-cached Wan2.1 forward as functions over any module tree with Wan2.1 names.

Works on :class:`rolling.model.WanModel` and on ComfyUI's loaded ``WanModel`` alike: only submodules
are called (``patch_embedding``, ``text_embedding``, ``time_embedding``, ``time_projection``,
``blocks[i].{norm1,self_attn,norm3,cross_attn,norm2,ffn}``, ``head.{norm,head}``), never the model's
own ``forward``, so every layer goes through the host's own casting and offloading (ComfyUI's
``comfy.ops`` layers cast their weights at use when ComfyUI asks them to). What the host does not
cast by itself is handled here the way ComfyUI's own WanModel does it:

* bare parameters (``modulation``) are cast to the compute dtype/device at use with a
  :data:`ParamCast` (``p.to(...)`` by default; inside ComfyUI its ``cast_to``), so weights kept in
  fp8 or offloaded to the CPU work;
* a float32 patch embedding (ComfyUI keeps it in float32 whatever the weight dtype) gets float32
  input and its output is cast back to the compute dtype (:func:`embed_patches`).

Shapes: latents are [B, C, F, H, W] (channel-first, F latent frames); tokens are [B, F*h*w, dim]
with (h, w) = (H, W) / patch, frame-major then row then column.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from einops import rearrange
from torch import nn

from .cache import ForwardPlan, RollingKVCache


@dataclass(frozen=True)
class WanArch:
    """Shapes read off a module tree (no config object needed)."""

    dim: int
    num_heads: int
    num_layers: int
    freq_dim: int
    text_dim: int
    in_dim: int
    out_dim: int
    patch_size: tuple[int, int, int]

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @classmethod
    def of(cls, model: nn.Module) -> "WanArch":
        try:
            pw = model.patch_embedding.weight
            dim, in_dim = pw.shape[0], pw.shape[1]
            patch = tuple(int(p) for p in pw.shape[2:])
            freq_dim = model.time_embedding[0].weight.shape[1]
            text_dim = model.text_embedding[0].weight.shape[1]
            out = model.head.head.weight.shape[0] // math.prod(patch)
            layers = len(model.blocks)
        except (AttributeError, IndexError, TypeError) as e:
            raise ValueError(f"not a Wan2.1 DiT module tree ({e}); expected patch_embedding, text_embedding, "
                             "time_embedding, blocks, head") from None
        heads = getattr(model, "num_heads", None) or getattr(model.blocks[0].self_attn, "num_heads", None) or dim // 128
        return cls(dim, int(heads), layers, freq_dim, text_dim, in_dim, out, patch)


ParamCast = Callable[[torch.Tensor, torch.dtype, torch.device], torch.Tensor]
"""``cast(parameter, dtype, device) -> tensor``: how a bare parameter reaches the compute dtype/device."""


def plain_cast(p: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return p.to(device=device, dtype=dtype)


def to_compute(p: torch.Tensor, like: torch.Tensor, cast: ParamCast | None = None) -> torch.Tensor:
    """A bare parameter in ``like``'s dtype and on its device."""
    return (cast or plain_cast)(p, like.dtype, like.device)


def embed_patches(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Patch embedding: latents [B, C, F, H, W] -> tokens [B, F*h*w, dim] in x's dtype.

    A float32 patch embedding runs in float32 (as ComfyUI's WanModel runs it: ``x.float()``), and so
    does one that casts its weights at use (a ComfyUI layer; its weight tensor may then hold the
    checkpoint's dtype, the model's being recorded beside it); otherwise the layer runs in x's dtype
    (the release casts the whole model, so the weights match)."""
    pe = model.patch_embedding
    declared = getattr(pe, "weight_comfy_model_dtype", None) or pe.weight.dtype
    fp32 = declared == torch.float32 or getattr(pe, "comfy_cast_weights", False)
    return pe(x.float() if fp32 else x).to(x.dtype).flatten(2).transpose(1, 2)


class TextContext:
    """Per-prompt cross-attention keys/values for every layer, computed once (text MLP included).

    ``context``: [B, Lt, text_dim] umT5 embeddings (padding zeroed). Attends to all Lt positions."""

    def __init__(self, model: nn.Module, context: torch.Tensor, *, dtype, device):
        arch = WanArch.of(model)
        if context.ndim == 2:
            context = context.unsqueeze(0)
        if context.ndim != 3 or context.shape[-1] != arch.text_dim:
            raise ValueError(f"text context must be [B, tokens, {arch.text_dim}] for this model, got "
                             f"{list(context.shape)}")
        self.batch, self.tokens = context.shape[0], context.shape[1]
        with torch.no_grad():
            emb = model.text_embedding(context.to(device=device, dtype=dtype))
            h, d = arch.num_heads, arch.head_dim
            self.kv = []
            for blk in model.blocks:
                ca = blk.cross_attn
                k = ca.norm_k(ca.k(emb)).view(self.batch, -1, h, d)
                v = ca.v(emb).view(self.batch, -1, h, d)
                self.kv.append((k, v))

    @property
    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for k, _ in self.kv)


def sinusoid(freq_dim: int, t: float) -> list[float]:
    """Wan's timestep embedding of one value, in float64: [cos(t w_j)..., sin(t w_j)...], w_j = 10000^(-j/half)."""
    half = freq_dim // 2
    ang = [t * 10000.0 ** (-j / half) for j in range(half)]
    return [math.cos(a) for a in ang] + [math.sin(a) for a in ang]


class TimeEmbedder:
    """Per-frame time embedding ``e`` [F, dim] and projection ``e0`` [F, 6, dim], memoised per
    timestep pattern (a run uses a handful), so the time MLP runs once per pattern, not per forward."""

    def __init__(self, model: nn.Module, *, dtype, device):
        self.model, self.arch = model, WanArch.of(model)
        self.dtype, self.device = dtype, torch.device(device)
        self._memo: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, timesteps: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
        key = tuple(float(t) for t in timesteps)
        hit = self._memo.get(key)
        if hit is None:
            sin = torch.tensor([sinusoid(self.arch.freq_dim, t) for t in key], dtype=torch.float64)
            with torch.no_grad():
                e = self.model.time_embedding(sin.to(self.dtype).to(self.device))
                e0 = self.model.time_projection(e).view(len(key), 6, self.arch.dim)
            hit = self._memo[key] = (e, e0)
        return hit


def forward(model: nn.Module, arch: WanArch, x: torch.Tensor, timesteps: Sequence[float],
            plan: ForwardPlan, cache: RollingKVCache, text: list[tuple[int, int, TextContext]],
            time: TimeEmbedder, attn, cast: ParamCast | None = None) -> torch.Tensor:
    """One causal DiT forward over input latents x [B, C, F, H, W] with per-frame ``timesteps`` (F).

    ``plan`` (from ``cache.plan_*``) says what the self-attention reads and writes; ``text`` lists
    (first frame, end frame, TextContext) ranges covering the F input frames. Returns the flow
    prediction v [B, C_out, F, H, W] in x's dtype. ``cast`` moves bare parameters (see the module docstring).
    """
    b, _, f, hh, ww = x.shape
    pt, ph, pw = arch.patch_size
    hp, wp = hh // ph, ww // pw
    tpf = hp * wp
    heads, hd = arch.num_heads, arch.head_dim
    cache.prepare(plan)
    e, e0 = time(timesteps)  # [F, dim], [F, 6, dim]

    tok = embed_patches(model, x)  # [B, F*tpf, dim]
    for i, blk in enumerate(model.blocks):
        mod = (to_compute(blk.modulation, e0, cast) + e0).unsqueeze(1).chunk(6, dim=2)  # each [F, 1, 1, dim]
        sh1, sc1, g1, sh2, sc2, g2 = (m.squeeze(2) for m in mod)  # [F, 1, dim]

        h = (blk.norm1(tok).view(b, f, tpf, -1) * (1 + sc1) + sh1).view(b, f * tpf, -1)
        sa = blk.self_attn
        q = sa.norm_q(sa.q(h)).view(b, -1, heads, hd)
        k = sa.norm_k(sa.k(h)).view(b, -1, heads, hd)
        v = sa.v(h).view(b, -1, heads, hd)
        y = sa.o(cache.attend(i, plan, q, k, v, attn).flatten(2))
        tok = tok + (y.view(b, f, tpf, -1) * g1).view(b, f * tpf, -1)

        ca = blk.cross_attn
        cq = ca.norm_q(ca.q(blk.norm3(tok))).view(b, -1, heads, hd)
        if len(text) == 1:
            ck, cv = text[0][2].kv[i]
            co = attn(cq, ck, cv)
        else:
            co = torch.empty_like(cq)
            for f0, f1, ctx in text:
                ck, cv = ctx.kv[i]
                co[:, f0 * tpf:f1 * tpf] = attn(cq[:, f0 * tpf:f1 * tpf], ck, cv)
        tok = tok + ca.o(co.flatten(2))

        h = (blk.norm2(tok).view(b, f, tpf, -1) * (1 + sc2) + sh2).view(b, f * tpf, -1)
        tok = tok + (blk.ffn(h).view(b, f, tpf, -1) * g2).view(b, f * tpf, -1)

    hm = (to_compute(model.head.modulation, e, cast) + e.unsqueeze(1)).chunk(2, dim=1)  # each [F, 1, dim]
    shift, scale = hm
    out = model.head.head(model.head.norm(tok).view(b, f, tpf, -1) * (1 + scale) + shift)
    return rearrange(out, "b f (h w) (p q r c) -> b c (f p) (h q) (w r)", h=hp, w=wp, p=pt, q=ph, r=pw)
