"""Cheap latent -> RGB projection for previews and the demo (no VAE).

Latents here are in the model's normalised space [B, 16, F, H, W]. The projection is a fixed
linear map (our own rough fit of Wan2.1 latent channels to RGB); it shows structure and motion,
not true colours.
"""
from __future__ import annotations

import torch

# 16 x 3: a rough linear map; rows are latent channels, columns R, G, B
_FACTORS = [
    [-0.10, -0.07, -0.05], [0.03, 0.05, 0.11], [0.06, 0.15, 0.20], [0.21, 0.14, 0.10],
    [-0.13, -0.08, -0.01], [0.18, 0.14, 0.06], [0.05, -0.03, -0.11], [0.06, 0.07, 0.17],
    [0.08, 0.06, 0.02], [-0.09, -0.02, 0.06], [0.10, 0.10, 0.11], [0.01, 0.04, 0.05],
    [0.11, 0.08, 0.05], [-0.09, -0.11, -0.13], [-0.03, 0.04, 0.03], [-0.16, -0.10, -0.09],
]


def latent_to_rgb(latents: torch.Tensor, upscale: int = 8) -> torch.Tensor:
    """[B, 16, F, H, W] latents -> uint8 frames [B*F, H*upscale, W*upscale, 3] on the CPU.

    One latent frame gives one preview frame (not the 4 pixel frames a VAE would decode)."""
    b, c, f, h, w = latents.shape
    m = torch.tensor(_FACTORS, dtype=torch.float32)[:c]
    rgb = torch.einsum("bcfhw,cr->bfhwr", latents.detach().float().cpu(), m)
    rgb = (rgb * 1.5 + 0.5).clamp(0, 1)
    if upscale > 1:
        rgb = rgb.repeat_interleave(upscale, dim=2).repeat_interleave(upscale, dim=3)
    return (rgb * 255).to(torch.uint8).reshape(b * f, h * upscale, w * upscale, 3)
