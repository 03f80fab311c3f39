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

The transformer block (:func:`block_forward`), the time and text embeddings and the head are written
once and shared by inference (:func:`forward`, no autograd, memoised embeddings, a KV cache) and
training (:class:`rolling.train.dit.WanDiT`, autograd, the same cache plans or full attention).

Shapes: latents are [B, C, F, H, W] (channel-first, F latent frames); tokens are [B, F*h*w, dim]
with (h, w) = (H, W) / patch, frame-major then row then column; per-frame time embeddings are
[B or 1, F, dim] (``e``) and [B or 1, F, 6, dim] (``e0``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from einops import rearrange
from torch import nn

from .cache import KVPlan, RollingKVCache, attend_layer


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
    text_len: int = 512  # prompt tokens the DiT was trained to read (umT5's 512; the toy model's 16)

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
        return cls(dim, int(heads), layers, freq_dim, text_dim, in_dim, out, patch, int(getattr(model, "text_len", 512)))


ParamCast = Callable[[torch.Tensor, torch.dtype, torch.device], torch.Tensor]
"""``cast(parameter, dtype, device) -> tensor``: how a bare parameter reaches the compute dtype/device."""


def to_compute(p: torch.Tensor, like: torch.Tensor, cast: ParamCast | None = None) -> torch.Tensor:
    """A bare parameter in ``like``'s dtype and on its device."""
    return p.to(device=like.device, dtype=like.dtype) if cast is None else cast(p, like.dtype, like.device)


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


def sinusoid(freq_dim: int, t: float) -> list[float]:
    """Wan's timestep embedding of one value, in float64: [cos(t w_j)..., sin(t w_j)...], w_j = 10000^(-j/half)."""
    half = freq_dim // 2
    ang = [t * 10000.0 ** (-j / half) for j in range(half)]
    return [math.cos(a) for a in ang] + [math.sin(a) for a in ang]


def embed_time(model: nn.Module, values: Sequence[float], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e [U, dim] and e0 [U, 6, dim] of timesteps ``values`` (0..1000 scale; sinusoid in float64, then
    the time MLP in ``like``'s dtype on its device)."""
    sin = torch.tensor([sinusoid(model.time_embedding[0].weight.shape[1], t) for t in values], dtype=torch.float64)
    e = model.time_embedding(sin.to(device=like.device, dtype=like.dtype))
    return e, model.time_projection(e).unflatten(-1, (6, e.shape[-1]))


def embed_text(model: nn.Module, context: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The text MLP over umT5 embeddings [B, Lt, text_dim] -> [B, Lt, dim] (all positions, padding too)."""
    if context.ndim == 2:
        context = context.unsqueeze(0)
    text_dim = model.text_embedding[0].weight.shape[1]
    if context.ndim != 3 or context.shape[-1] != text_dim:
        raise ValueError(f"text context must be [B, tokens, {text_dim}] for this model, got {list(context.shape)}")
    return model.text_embedding(context.to(device=like.device, dtype=like.dtype))


def cross_kv(blk: nn.Module, emb: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A block's cross-attention keys and values [B, Lt, H, D] from the embedded text."""
    ca, shape = blk.cross_attn, (emb.shape[0], -1, heads, emb.shape[-1] // heads)
    return ca.norm_k(ca.k(emb)).view(shape), ca.v(emb).view(shape)


class TextContext:
    """Per-prompt cross-attention keys/values for every layer, computed once (text MLP included).

    ``context``: [B, Lt, text_dim] umT5 embeddings (padding zeroed). Attends to all Lt positions."""

    def __init__(self, model: nn.Module, context: torch.Tensor, *, dtype, device):
        heads = WanArch.of(model).num_heads
        with torch.no_grad():
            emb = embed_text(model, context, torch.empty(0, device=device, dtype=dtype))
            self.batch, self.tokens = emb.shape[0], emb.shape[1]
            self.kv = [cross_kv(blk, emb, heads) for blk in model.blocks]

    @property
    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for k, _ in self.kv)


class TimeEmbedder:
    """Per-frame ``e`` [1, F, dim] and ``e0`` [1, F, 6, dim] without autograd, memoised per timestep
    pattern (a run uses a handful), so the time MLP runs once per pattern, not per forward."""

    def __init__(self, model: nn.Module, *, dtype, device):
        self.model = model
        self.like = torch.empty(0, dtype=dtype, device=device)
        self._memo: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, timesteps: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
        key = tuple(float(t) for t in timesteps)
        hit = self._memo.get(key)
        if hit is None:
            uniq = sorted(set(key))
            with torch.no_grad():
                e, e0 = embed_time(self.model, uniq, self.like)
            sel = torch.tensor([uniq.index(t) for t in key], device=e.device)
            hit = self._memo[key] = (e[sel].unsqueeze(0), e0[sel].unsqueeze(0))
        return hit


def block_forward(blk: nn.Module, tok: torch.Tensor, e0: torch.Tensor, *, frames: int, heads: int,
                  self_attention: Callable, text, attn, cast: ParamCast | None = None, want_kv: bool = False):
    """One Wan2.1 transformer block (ALGORITHM.md 1.2 step 4) on tokens [B, F*tpf, dim].

    ``e0`` [B or 1, F, 6, dim]; ``self_attention(q, k, v) -> [B, L, H, D]`` takes un-rotated q/k/v;
    ``text`` is the embedded prompt [B, Lt, dim] (cross K/V projected here, inside autograd) or a list
    of (first frame, end frame, (k, v)) ranges with precomputed cross K/V [B, Lt, H, D]. With
    ``want_kv`` also returns the un-rotated self-attention k, v (for cache writes outside)."""
    b, n, dim = tok.shape
    tpf, hd = n // frames, dim // heads
    sh1, sc1, g1, sh2, sc2, g2 = (to_compute(blk.modulation, e0, cast) + e0).chunk(6, dim=2)  # [B|1, F, 1, dim]

    def per_frame(x):
        return x.view(b, frames, tpf, dim)

    h = (per_frame(blk.norm1(tok)) * (1 + sc1) + sh1).view(b, n, dim)
    sa = blk.self_attn
    q = sa.norm_q(sa.q(h)).view(b, n, heads, hd)
    k = sa.norm_k(sa.k(h)).view(b, n, heads, hd)
    v = sa.v(h).view(b, n, heads, hd)
    tok = tok + (per_frame(sa.o(self_attention(q, k, v).flatten(2))) * g1).view(b, n, dim)

    ca = blk.cross_attn
    cq = ca.norm_q(ca.q(blk.norm3(tok))).view(b, n, heads, hd)
    if isinstance(text, torch.Tensor):
        co = attn(cq, *cross_kv(blk, text, heads))
    elif len(text) == 1:
        co = attn(cq, *text[0][2])
    else:
        co = torch.cat([attn(cq[:, f0 * tpf:f1 * tpf], *kv) for f0, f1, kv in text], dim=1)
    tok = tok + ca.o(co.flatten(2))

    h = (per_frame(blk.norm2(tok)) * (1 + sc2) + sh2).view(b, n, dim)
    tok = tok + (per_frame(blk.ffn(h)) * g2).view(b, n, dim)
    return (tok, k, v) if want_kv else tok


def head_forward(model: nn.Module, tok: torch.Tensor, e: torch.Tensor, grid: tuple[int, int, int],
                 patch: tuple[int, int, int], cast: ParamCast | None = None) -> torch.Tensor:
    """The head on tokens [B, F*h*w, dim] with ``e`` [B or 1, F, dim] -> flow prediction [B, C, F, H, W]."""
    f, hp, wp = grid
    b, n, dim = tok.shape
    shift, scale = (to_compute(model.head.modulation, e, cast).unsqueeze(0) + e.unsqueeze(2)).chunk(2, dim=2)
    out = model.head.head(model.head.norm(tok).view(b, f, n // f, dim) * (1 + scale) + shift)
    return rearrange(out, "b f (h w) (p q r c) -> b c (f p) (h q) (w r)", h=hp, w=wp, p=patch[0], q=patch[1],
                     r=patch[2])


def run_layers(model: nn.Module, arch: WanArch, layout, text_ranges: tuple, attn, cast, x: torch.Tensor,
               e: torch.Tensor, e0: torch.Tensor, text_kv: tuple, args: tuple, stores: tuple, scratch) -> torch.Tensor:
    """The forward proper, a function of tensors given the static ``layout`` and ``text_ranges``
    ((first frame, end frame) per prompt; ``text_kv[r][i]`` = layer i's cross K/V of range r): what a
    compiled forward specialises on, so windows of one layout never recompile."""
    f = x.shape[2]
    hp, wp = x.shape[3] // arch.patch_size[1], x.shape[4] // arch.patch_size[2]
    tok = embed_patches(model, x)
    for i, blk in enumerate(model.blocks):
        def sa(q, k, v, i=i):
            return attend_layer(layout, args, i, q, k, v, stores, attn, scratch)
        tok = block_forward(blk, tok, e0, frames=f, heads=arch.num_heads, self_attention=sa,
                            text=[(f0, f1, kv[i]) for (f0, f1), kv in zip(text_ranges, text_kv)], attn=attn,
                            cast=cast)
    return head_forward(model, tok, e, (f, hp, wp), arch.patch_size, cast)


class CompiledForward:
    """``torch.compile`` of :func:`run_layers`, one graph per (layout, prompt ranges, input shape): a
    steady-state window compiles once and is reused for every later window and ring position (its
    positions and slots are tensor inputs). ``fullgraph=True``: a graph break is an error, not a slow
    path. The KV cache and scratch buffers are marked static, so ``mode="reduce-overhead"`` can
    capture the forward as a CUDA graph. ``graphs`` counts the compiled graphs."""

    def __init__(self, model: nn.Module, arch: WanArch, attn, cast=None, *, backend: str = "inductor",
                 mode: str | None = None):
        self.model, self.arch, self.attn, self.cast = model, arch, attn, cast
        self.backend, self.mode = backend, mode
        self._fns: dict = {}
        self._static: set = set()

    @property
    def graphs(self) -> int:
        return len(self._fns)

    def __call__(self, layout, text_ranges, x, e, e0, text_kv, args, stores, scratch):
        for t in (*stores, *(scratch or ())):
            if id(t) not in self._static and hasattr(torch._dynamo, "mark_static_address"):
                torch._dynamo.mark_static_address(t)
                self._static.add(id(t))
        key = (layout, text_ranges, tuple(x.shape), x.dtype)
        fn = self._fns.get(key)
        if fn is not None:
            return fn(x, e, e0, text_kv, args, stores, scratch)

        def run(x, e, e0, text_kv, args, stores, scratch):
            return run_layers(self.model, self.arch, layout, text_ranges, self.attn, self.cast, x, e, e0,
                              text_kv, args, stores, scratch)
        fn = self._fns[key] = torch.compile(run, backend=self.backend, mode=self.mode, fullgraph=True, dynamic=False)
        # every layout is one more entry of the same code object's cache (ramp-up / steady / ramp-down
        # windows, fused or not, prompt ranges): allow them all; a steady window never adds one
        with torch._dynamo.config.patch(recompile_limit=max(64, 4 * len(self._fns)),
                                        accumulated_recompile_limit=max(256, 8 * len(self._fns))):
            return fn(x, e, e0, text_kv, args, stores, scratch)


def forward(model: nn.Module, arch: WanArch, x: torch.Tensor, timesteps: Sequence[float], plan: KVPlan,
            cache: RollingKVCache, text: list[tuple[int, int, TextContext]], time: TimeEmbedder, attn,
            cast: ParamCast | None = None, compiled: CompiledForward | None = None) -> torch.Tensor:
    """One causal DiT forward without autograd over input latents x [B, C, F, H, W] with per-frame
    ``timesteps`` (F). ``plan`` (from ``cache.plan``) says what the self-attention reads and writes;
    ``text`` lists (first frame, end frame, TextContext) ranges covering the F input frames. Returns
    the flow prediction v [B, C_out, F, H, W] in x's dtype. ``cast`` moves bare parameters;
    ``compiled`` runs it through a :class:`CompiledForward`."""
    e, e0 = time(timesteps)
    ranges = tuple((f0, f1) for f0, f1, _ in text)
    kvs = tuple(tuple(ctx.kv) for _, _, ctx in text)
    scratch = (cache.scratch_k, cache.scratch_v) if cache.scratch else None
    if compiled is not None:
        return compiled(plan.layout, ranges, x, e, e0, kvs, plan.args, cache.stores, scratch)
    return run_layers(model, arch, plan.layout, ranges, attn, cast, x, e, e0, kvs, plan.args, cache.stores, scratch)
