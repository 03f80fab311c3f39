"""A tiny causal video autoencoder with Wan2.1's shape of compression.

16 latent channels, 8x spatial and 4x temporal compression: ``T = 1 + 4 (n - 1)`` pixel frames <->
``n`` latent frames. Latent frame 0 holds pixel frame 0 alone (encoded as that frame repeated 4
times); latent frame k >= 1 holds pixel frames 4k-3 .. 4k. Each latent frame is encoded and decoded
independently (a 4-frame group stacked on channels through a 2-D conv net), so decoding is causal
with no cache, and :class:`StreamingDecoder` over consecutive chunks is bit-equal to one-shot
:meth:`ToyVAE.decode`.

Latents are *normalised* like the DiT expects (per-channel mean / std of the training latents are
buffers of the module, applied inside :meth:`encode` / :meth:`decode`).

Shapes: video [B, 3, T, H, W] in [-1, 1] (H, W multiples of 8; 64x64 in the toy world);
latents [B, 16, n, H/8, W/8].
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

TEMPORAL, SPATIAL, LATENT_CHANNELS = 4, 8, 16


@dataclass(frozen=True)
class VAEConfig:
    """Conv widths at 1/2, 1/4 and 1/8 resolution; ``latent_channels`` = 16 as in Wan2.1."""

    widths: tuple[int, int, int] = (32, 48, 64)
    latent_channels: int = LATENT_CHANNELS

    def to_dict(self) -> dict:
        d = asdict(self)
        d["widths"] = list(self.widths)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "VAEConfig":
        return cls(widths=tuple(int(w) for w in d["widths"]), latent_channels=int(d["latent_channels"]))


def latent_frames(pixel_frames: int) -> int:
    """Latent frames for T = 1 + 4 (n - 1) pixel frames; ValueError for any other T."""
    if pixel_frames < 1 or (pixel_frames - 1) % TEMPORAL:
        raise ValueError(f"a video must have 1 + 4(n-1) pixel frames (1, 5, 9, ..., 81), got {pixel_frames}")
    return 1 + (pixel_frames - 1) // TEMPORAL


def pixel_frames(latent: int) -> int:
    """Pixel frames decoded from n latent frames: 1 + 4 (n - 1)."""
    return 0 if latent <= 0 else 1 + TEMPORAL * (latent - 1)


class ResBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(nn.functional.silu(self.conv1(nn.functional.silu(x))))


def _up(cin: int, cout: int) -> nn.Sequential:
    """x2 upsampling: 3x3 conv to 4*cout channels, then pixel shuffle."""
    return nn.Sequential(nn.Conv2d(cin, cout * 4, 3, padding=1), nn.PixelShuffle(2))


class ToyVAE(nn.Module):
    """Per-latent-frame conv autoencoder (see the module docstring for the frame layout)."""

    def __init__(self, cfg: VAEConfig | None = None):
        super().__init__()
        cfg = cfg or VAEConfig()
        self.config = cfg
        w1, w2, w3 = cfg.widths
        c_in = 3 * TEMPORAL
        act = nn.SiLU
        self.encoder = nn.Sequential(
            nn.Conv2d(c_in, w1, 3, stride=2, padding=1), act(),
            nn.Conv2d(w1, w2, 3, stride=2, padding=1), act(),
            nn.Conv2d(w2, w3, 3, stride=2, padding=1), ResBlock(w3), act(),
            nn.Conv2d(w3, cfg.latent_channels, 1))
        self.decoder = nn.Sequential(
            nn.Conv2d(cfg.latent_channels, w3, 3, padding=1), ResBlock(w3), act(),
            _up(w3, w2), act(), nn.Conv2d(w2, w2, 3, padding=1), act(),
            _up(w2, w1), act(), nn.Conv2d(w1, w1, 3, padding=1), act(),
            _up(w1, c_in))
        self.register_buffer("latent_mean", torch.zeros(cfg.latent_channels))
        self.register_buffer("latent_std", torch.ones(cfg.latent_channels))

    # ---------------------------------------------------------------- groups <-> latent frames (raw)
    @staticmethod
    def groups(video: torch.Tensor) -> torch.Tensor:
        """[B, 3, T, H, W] -> [B, n, 12, H, W]: 4-frame groups (frame 0 repeated 4x for group 0)."""
        b, c, t, h, w = video.shape
        n = latent_frames(t)
        first = video[:, :, :1].expand(b, c, TEMPORAL, h, w)
        g = torch.cat([first, video[:, :, 1:]], dim=2).reshape(b, c, n, TEMPORAL, h, w)
        return g.permute(0, 2, 3, 1, 4, 5).reshape(b, n, TEMPORAL * c, h, w)

    def encode_groups(self, g: torch.Tensor) -> torch.Tensor:
        """[N, 12, H, W] pixel groups -> [N, 16, H/8, W/8] raw (un-normalised) latents."""
        return self.encoder(g)

    def decode_groups(self, z: torch.Tensor) -> torch.Tensor:
        """[N, 16, h, w] raw latents -> [N, 12, 8h, 8w] pixel groups (unclamped)."""
        return self.decoder(z)

    # ---------------------------------------------------------------- public API (normalised latents)
    def normalise(self, z: torch.Tensor) -> torch.Tensor:
        """Raw [B, 16, n, h, w] -> normalised latents (per channel)."""
        return (z - self.latent_mean.view(1, -1, 1, 1, 1)) / self.latent_std.view(1, -1, 1, 1, 1)

    def denormalise(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.latent_std.view(1, -1, 1, 1, 1) + self.latent_mean.view(1, -1, 1, 1, 1)

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """video [B, 3, T, H, W] in [-1, 1], T = 1 + 4(n-1) -> normalised latents [B, 16, n, H/8, W/8]."""
        if video.ndim != 5 or video.shape[1] != 3 or video.shape[-1] % SPATIAL or video.shape[-2] % SPATIAL:
            raise ValueError(f"video must be [B, 3, T, H, W] with H, W multiples of 8, got {list(video.shape)}")
        g = self.groups(video.float())
        b, n = g.shape[:2]
        z = self.encode_groups(g.flatten(0, 1))
        z = z.view(b, n, *z.shape[1:]).transpose(1, 2)
        return self.normalise(z)

    def decode_frame(self, z: torch.Tensor, first: bool) -> torch.Tensor:
        """One normalised latent frame [B, 16, h, w] -> its pixel frames [B, 3, 1 or 4, 8h, 8w] in [-1, 1]
        (1 frame for latent frame 0 of a video, ``first``; else 4)."""
        raw = self.denormalise(z[:, :, None])[:, :, 0]
        px = self.decode_groups(raw.float())
        b, _, h, w = px.shape
        px = px.view(b, TEMPORAL, 3, h, w).transpose(1, 2).clamp(-1, 1)
        return px[:, :, -1:] if first else px

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B, 16, n, h, w] -> video [B, 3, 1 + 4(n-1), 8h, 8w] in [-1, 1]."""
        if latents.ndim != 5 or latents.shape[1] != self.config.latent_channels:
            raise ValueError(f"latents must be [B, {self.config.latent_channels}, n, h, w], got {list(latents.shape)}")
        return torch.cat([self.decode_frame(latents[:, :, k], k == 0) for k in range(latents.shape[2])], dim=2)

    def streaming_decoder(self) -> "StreamingDecoder":
        return StreamingDecoder(self)


class StreamingDecoder:
    """Decode a latent video chunk by chunk (e.g. a 3-latent-frame block at a time), causally.

    The first call's first latent frame gives 1 pixel frame, every other latent frame 4, so chunks
    of sizes n1, n2, ... give exactly the frames of ``vae.decode`` on their concatenation."""

    def __init__(self, vae: ToyVAE):
        self.vae = vae
        self.latent_frames = 0  # latent frames decoded so far

    @property
    def pixel_frames(self) -> int:
        """Pixel frames returned so far."""
        return pixel_frames(self.latent_frames)

    def decode(self, chunk: torch.Tensor) -> torch.Tensor:
        """chunk [B, 16, k, h, w] (normalised) -> [B, 3, frames, 8h, 8w] in [-1, 1]."""
        if chunk.ndim != 5:
            raise ValueError(f"a latent chunk must be [B, 16, k, h, w], got {list(chunk.shape)}")
        if chunk.shape[2] == 0:
            b, _, _, h, w = chunk.shape
            return chunk.new_zeros(b, 3, 0, h * SPATIAL, w * SPATIAL)
        out = [self.vae.decode_frame(chunk[:, :, k], self.latent_frames + k == 0) for k in range(chunk.shape[2])]
        self.latent_frames += chunk.shape[2]
        return torch.cat(out, dim=2)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
