"""Differentiable Wan2.1 forwards for training: the causal student (rolling KV cache) and the
bidirectional teacher / critic (full attention over the clip), on the same module tree.

:class:`WanDiT` owns a Wan2.1 module tree as ``self.model`` (so its state dict has the release's
``model.`` prefix) and runs the core's own pieces (:func:`rolling.forward.block_forward`, the
embeddings, the head, the cache plans and key assembly), but computes the time embedding, the text
MLP and the cross-attention K/V *inside* the autograd graph on every call (inference memoises them
under no_grad).

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
from typing import Callable
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from ..attention import sdpa_attention
from ..cache import KVPlan, Layout, attend_layer
from ..forward import WanArch, block_forward, embed_patches, embed_text, embed_time, head_forward
from ..rope import Rope
from .cache import TrainKVCache


def bind_block_forward(model: nn.Module) -> None:
    """Give every block of a Wan2.1 module tree a ``forward`` (= :func:`rolling.forward.block_forward`),
    bound to the instance, so blocks can be called as modules (FSDP per-block sharding, checkpointing)."""
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
        bind_block_forward(model)

    # ------------------------------------------------------------------ embeddings (with autograd)
    def time_embed(self, rows: list[list[float]], like: torch.Tensor):
        """e [B|1, F, dim], e0 [B|1, F, 6, dim] from per-frame timesteps (sinusoid in float64)."""
        uniq = sorted({t for r in rows for t in r})
        e_u, e0_u = embed_time(self.model, uniq, like)
        sel = torch.tensor([[uniq.index(t) for t in r] for r in rows], device=like.device)
        return e_u[sel], e0_u[sel]

    def _full_attention(self, frames: int, hp: int, wp: int, device) -> tuple[Layout, tuple]:
        """Every frame attends to every frame, RoPE at positions 0..F-1 (teacher / critic)."""
        rope = self.rope.tables(range(frames), hp, wp, device)
        return Layout(hp * wp, 0, ((0, frames, ((0, frames),), 0, False, 0),), ()), (*rope, *rope)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, timesteps, context: torch.Tensor, *, plan: KVPlan | None = None,
                cache: TrainKVCache | None = None) -> torch.Tensor:
        b, _, f, hh, ww = x.shape
        a = self.arch
        hp, wp = hh // a.patch_size[1], ww // a.patch_size[2]
        tpf = hp * wp
        rows = _timestep_rows(timesteps, b, f)
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        tok = embed_patches(self.model, x)  # [B, F*tpf, dim]
        e, e0 = self.time_embed(rows, tok)
        text = embed_text(self.model, context, tok)
        if text.shape[0] != b:
            text = text.expand(b, -1, -1)
        if plan is None:
            layout, args = self._full_attention(f, hp, wp, x.device)
            stores, writes = None, False
        elif cache is None:
            raise ValueError("a causal forward needs both plan and cache")
        else:
            layout, args, stores, writes = plan.layout, plan.args, cache.stores, bool(plan.writes)
            if torch.is_grad_enabled():
                cache.note_reads(plan)
        ckpt = self.checkpointing and torch.is_grad_enabled()
        attn = self.attn
        for i, blk in enumerate(self.model.blocks):
            def sa(q, k, v, i=i):
                return attend_layer(layout, args, i, q, k, v, stores, attn, write=False)
            kw = dict(frames=f, heads=a.num_heads, self_attention=sa, text=text, attn=attn, want_kv=writes)
            if ckpt:
                res = torch_checkpoint(blk, tok, e0, use_reentrant=False, **kw)
            else:
                res = blk(tok, e0, **kw)
            if writes:
                tok, k, v = res
                cache.write(i, plan, k, v)
            else:
                tok = res
        return head_forward(self.model, tok, e, (f, hp, wp), a.patch_size)
