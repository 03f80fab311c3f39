"""Differentiable Wan2.1 forwards for training: the causal student (rolling KV cache) and the
bidirectional teacher / critic (full attention over the clip), on the same module tree.

:class:`WanDiT` owns a Wan2.1 module tree as ``self.model`` (so its state dict has the release's
``model.`` prefix) and computes, unlike :mod:`rolling.forward`, the time embedding, the text MLP and
the cross-attention K/V *inside* the autograd graph on every call (the core memoises them under
no_grad). Math is otherwise identical to :func:`rolling.forward.forward` (checked in the tests).

Each transformer block gets a ``forward`` bound to the instance (:func:`bind_block_forward`), so
blocks are called as modules: this is what lets ``torch.distributed.fsdp.fully_shard`` gather a
block's parameters per block, and ``torch.utils.checkpoint`` re-run a block in backward. Cache writes
happen outside the (possibly checkpointed) block call, from detached tensors.

Shapes: latents [B, C, F, H, W] (channel-first); ``timesteps`` per frame as Python floats, either
[F] (shared by the batch) or [B][F] (0..1000 scale; floats, not tensors, so that mixed-precision
input casting never rounds them); ``context`` [B, tokens, text_dim] umT5 embeddings. Returns the flow
prediction v = eps - x0 [B, C_out, F, H, W].
"""
from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from ..attention import sdpa_attention
from ..cache import ForwardPlan
from ..forward import WanArch, sinusoid
from ..rope import Rope, apply_rope
from .cache import TrainKVCache


@dataclass
class GroupSpec:
    """One attention group of a block: input frames q0:q1 (queries rotated by ``q_rope``) attend to
    ``ctx`` (stored keys, one entry per layer, already rotated) plus the forward's own frames
    ``own`` = [(f0, f1, (cos, sin))]."""

    q0: int
    q1: int
    q_rope: tuple[torch.Tensor, torch.Tensor]
    own: list[tuple[int, int, tuple[torch.Tensor, torch.Tensor]]]


def _param(p: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return p.to(device=like.device, dtype=like.dtype)


def block_forward(blk: nn.Module, tok: torch.Tensor, e0: torch.Tensor, text: torch.Tensor, *,
                  grid: tuple[int, int, int], heads: int, groups: Sequence[GroupSpec],
                  ctx: Sequence, attn: Callable, want_kv: bool = False):
    """One Wan2.1 block. tok [B, F*tpf, dim]; e0 [B or 1, F, 6, dim] time projection; text [B, Lt, dim]
    embedded text; ctx[g] = stored keys of group g: a list of (k, v, rope or None), k/v [B, Lk, H, D]
    (views of the KV cache; ``rope`` = tables to rotate k with, for keys stored un-rotated). Returns tok and,
    with ``want_kv``, the un-rotated self-attention k, v [B, F*tpf, H, D] (for cache writes)."""
    b, f, tpf = grid
    hd = tok.shape[-1] // heads
    mod = (_param(blk.modulation, e0) + e0).chunk(6, dim=2)  # each [B|1, F, 1, dim]
    sh1, sc1, g1, sh2, sc2, g2 = mod

    h = (blk.norm1(tok).view(b, f, tpf, -1) * (1 + sc1) + sh1).view(b, f * tpf, -1)
    sa = blk.self_attn
    q = sa.norm_q(sa.q(h)).view(b, -1, heads, hd)
    k = sa.norm_k(sa.k(h)).view(b, -1, heads, hd)
    v = sa.v(h).view(b, -1, heads, hd)
    outs = []
    for g, c in zip(groups, ctx):
        qg = apply_rope(q[:, g.q0 * tpf:g.q1 * tpf], *g.q_rope)
        ks, vs = [], []
        for ck, cv, rope in c or ():
            ks.append(apply_rope(ck, *rope).to(k.dtype) if rope is not None else ck.to(k.dtype))
            vs.append(cv.to(v.dtype))
        for f0, f1, rope in g.own:
            ks.append(apply_rope(k[:, f0 * tpf:f1 * tpf], *rope))
            vs.append(v[:, f0 * tpf:f1 * tpf])
        kk = ks[0] if len(ks) == 1 else torch.cat(ks, dim=1)
        vv = vs[0] if len(vs) == 1 else torch.cat(vs, dim=1)
        outs.append(attn(qg, kk, vv))
    y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    y = sa.o(y.flatten(2))
    tok = tok + (y.view(b, f, tpf, -1) * g1).view(b, f * tpf, -1)

    ca = blk.cross_attn
    cq = ca.norm_q(ca.q(blk.norm3(tok))).view(b, -1, heads, hd)
    ck = ca.norm_k(ca.k(text)).view(b, -1, heads, hd)
    cv = ca.v(text).view(b, -1, heads, hd)
    tok = tok + ca.o(attn(cq, ck, cv).flatten(2))

    h = (blk.norm2(tok).view(b, f, tpf, -1) * (1 + sc2) + sh2).view(b, f * tpf, -1)
    tok = tok + (blk.ffn(h).view(b, f, tpf, -1) * g2).view(b, f * tpf, -1)
    if want_kv:
        return tok, k, v
    return tok


def bind_block_forward(model: nn.Module) -> None:
    """Give every block of a Wan2.1 module tree a ``forward`` (= :func:`block_forward`), bound to the
    instance, so blocks can be called as modules (FSDP per-block sharding, checkpointing)."""
    for blk in model.blocks:
        blk.forward = types.MethodType(block_forward, blk)


def _timestep_rows(timesteps, batch: int, frames: int) -> list[list[float]]:
    if isinstance(timesteps, torch.Tensor):
        timesteps = timesteps.tolist()
    ts = list(timesteps)
    if ts and isinstance(ts[0], (list, tuple)):
        rows = [[float(t) for t in r] for r in ts]
    else:
        rows = [[float(t) for t in ts]]
    if any(len(r) != frames for r in rows) or len(rows) not in (1, batch):
        raise ValueError(f"timesteps must be [F={frames}] or [B={batch}][F], got {len(rows)} rows of "
                         f"{[len(r) for r in rows][:3]}")
    return rows


class WanDiT(nn.Module):
    """A Wan2.1 DiT for training (the release wrapper's key layout: ``model.<wan key>``).

    Call ``dit(x, timesteps, context)`` for the bidirectional forward (teacher, critic: every frame
    attends to every frame, RoPE at positions 0..F-1), or ``dit(x, timesteps, context, plan=...,
    cache=...)`` for the causal student's forward over a :class:`TrainKVCache` plan.
    """

    def __init__(self, model: nn.Module, *, attention: Callable = sdpa_attention, checkpointing: bool = False,
                 compute_dtype: torch.dtype | None = None):
        super().__init__()
        self.model = model
        self.compute_dtype = compute_dtype  # cast inputs to this (FSDP bf16 params); None = keep x's dtype
        self.arch = WanArch.of(model)
        self.attn = attention
        self.checkpointing = checkpointing
        self.rope = Rope(self.arch.head_dim)
        self._tables: dict = {}
        bind_block_forward(model)

    # ------------------------------------------------------------------ embeddings (with autograd)
    def time_embed(self, rows: list[list[float]], like: torch.Tensor):
        """e [B|1, F, dim], e0 [B|1, F, 6, dim] from per-frame timesteps (sinusoid in float64)."""
        uniq = sorted({t for r in rows for t in r})
        idx = {t: i for i, t in enumerate(uniq)}
        sin = torch.tensor([sinusoid(self.arch.freq_dim, t) for t in uniq], dtype=torch.float64)
        sin = sin.to(device=like.device, dtype=like.dtype)
        e_u = self.model.time_embedding(sin)  # [U, dim]
        e0_u = self.model.time_projection(e_u).unflatten(-1, (6, self.arch.dim))  # [U, 6, dim]
        sel = torch.tensor([[idx[t] for t in r] for r in rows], device=like.device)
        return e_u[sel], e0_u[sel]

    def text_embed(self, context: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if context.ndim == 2:
            context = context.unsqueeze(0)
        if context.shape[-1] != self.arch.text_dim:
            raise ValueError(f"text context must be [B, tokens, {self.arch.text_dim}], got {list(context.shape)}")
        return self.model.text_embedding(context.to(device=like.device, dtype=like.dtype))

    def _rope(self, first: int, frames: int, hp: int, wp: int, device):
        key = (first, frames, hp, wp, str(device))
        t = self._tables.get(key)
        if t is None:
            if len(self._tables) > 256:
                self._tables.clear()
            t = self._tables[key] = self.rope.tables(range(first, first + frames), hp, wp, device)
        return t

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, timesteps, context: torch.Tensor, *, plan: ForwardPlan | None = None,
                cache: TrainKVCache | None = None) -> torch.Tensor:
        b, _, f, hh, ww = x.shape
        a = self.arch
        _, ph, pw = a.patch_size
        hp, wp = hh // ph, ww // pw
        tpf = hp * wp
        rows = _timestep_rows(timesteps, b, f)
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        tok = self.model.patch_embedding(x).flatten(2).transpose(1, 2)  # [B, F*tpf, dim]
        e, e0 = self.time_embed(rows, tok)
        text = self.text_embed(context, tok)
        if text.shape[0] != b:
            text = text.expand(b, -1, -1)

        if plan is None:  # bidirectional: one group, all frames, absolute positions 0..F-1
            rope = self._rope(0, f, hp, wp, x.device)
            groups = [GroupSpec(0, f, rope, [(0, f, rope)])]
        else:
            if cache is None:
                raise ValueError("a causal forward needs both plan and cache")
            cache.prepare(plan)
            table = plan.table  # type: ignore[attr-defined]
            groups = []
            for g in plan.groups:
                own = [(f0, f1, table(p, f1 - f0)) for f0, f1, p in cache.self_sources(plan, g)]
                groups.append(GroupSpec(g.q0, g.q1, table(g.q_pos - g.base, g.q1 - g.q0), own))
            if [(g.q0, g.q1) for g in groups] != sorted((g.q0, g.q1) for g in groups) or \
                    groups[0].q0 != 0 or groups[-1].q1 != f or \
                    any(g1.q0 != g0.q1 for g0, g1 in zip(groups, groups[1:])):
                raise RuntimeError("internal error: query groups must tile the input frames in order")
        writes = plan is not None and bool(plan.writes)
        ckpt = self.checkpointing and torch.is_grad_enabled()

        for i, blk in enumerate(self.model.blocks):
            ctx = [None] * len(groups) if plan is None else [cache.context(i, plan, g) for g in plan.groups]
            kw = dict(grid=(b, f, tpf), heads=a.num_heads, groups=groups, ctx=ctx, attn=self.attn, want_kv=writes)
            if ckpt:
                res = torch_checkpoint(blk, tok, e0, text, use_reentrant=False, **kw)
            else:
                res = blk(tok, e0, text, **kw)
            if writes:
                tok, k, v = res
                cache.write(i, plan, k, v)
            else:
                tok = res

        hm = (_param(self.model.head.modulation, e).unsqueeze(0) + e.unsqueeze(2)).chunk(2, dim=2)
        shift, scale = hm  # each [B|1, F, 1, dim]
        out = self.model.head.head(self.model.head.norm(tok).view(b, f, tpf, -1) * (1 + scale) + shift)
        return rearrange(out, "b f (h w) (p q r c) -> b c (f p) (h q) (w r)", h=hp, w=wp,
                         p=a.patch_size[0], q=ph, r=pw)
