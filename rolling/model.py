"""A plain-torch Wan2.1 DiT whose parameter names are exactly the release's (after ``model.``).

The module only holds weights; the causal, KV-cached forward lives in :mod:`rolling.forward` and works
on any module tree with these names (this class or ComfyUI's ``WanModel``).
"""
from __future__ import annotations

import torch
from torch import nn

from .config import WanConfig


class WanRMSNorm(nn.Module):
    """RMSNorm with statistics in float32, cast back to the input dtype, then scaled by the weight."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)).type_as(x)
        return y * self.weight.to(device=x.device, dtype=x.dtype)


class WanLayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32, output cast back to the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = False):
        super().__init__(dim, eps=eps, elementwise_affine=elementwise_affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return nn.functional.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).type_as(x)


class WanAttention(nn.Module):
    """Projections of one attention layer (self or cross): q, k, v, o and q/k RMSNorm over ``dim``."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float):
        super().__init__()
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = WanRMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = WanRMSNorm(dim, eps) if qk_norm else nn.Identity()


class WanBlock(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        d = cfg.dim
        self.norm1 = WanLayerNorm(d, cfg.eps)
        self.self_attn = WanAttention(d, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm3 = WanLayerNorm(d, cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = WanAttention(d, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm2 = WanLayerNorm(d, cfg.eps)
        self.ffn = nn.Sequential(nn.Linear(d, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, d))
        self.modulation = nn.Parameter(torch.randn(1, 6, d) / d**0.5)


class WanHead(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        out = cfg.out_dim * cfg.patch_size[0] * cfg.patch_size[1] * cfg.patch_size[2]
        self.norm = WanLayerNorm(cfg.dim, cfg.eps)
        self.head = nn.Linear(cfg.dim, out)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)


class WanModel(nn.Module):
    """Wan2.1 text-to-video DiT (weights only; see :func:`rolling.forward.forward`)."""

    def __init__(self, cfg: WanConfig | None = None):
        super().__init__()
        cfg = cfg or WanConfig()
        self.config = cfg
        self.dim, self.num_heads, self.freq_dim = cfg.dim, cfg.num_heads, cfg.freq_dim
        self.patch_size, self.out_dim, self.text_len = cfg.patch_size, cfg.out_dim, cfg.text_len
        self.patch_embedding = nn.Conv3d(cfg.in_dim, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(
            nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.dim, cfg.dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, cfg.dim * 6))
        self.blocks = nn.ModuleList(WanBlock(cfg) for _ in range(cfg.num_layers))
        self.head = WanHead(cfg)


def build_model(cfg: WanConfig | str = "1.3B", *, device="cpu", dtype=torch.float32, seed: int | None = None) -> WanModel:
    """Build a Wan DiT; on ``device="meta"`` no memory is used. ``seed`` makes random weights reproducible.

    Random weights are scaled so that a tiny model produces well-behaved outputs (for tests and demos).
    """
    if isinstance(cfg, str):
        cfg = WanConfig.preset(cfg)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device):
        model = WanModel(cfg)
    return model.to(dtype=dtype).eval().requires_grad_(False)
