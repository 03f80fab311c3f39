"""Noise sources for the sampler.

A noise source is a callable ``noise(block, step, shape, device, dtype) -> Tensor``:
``step == 0`` is the block's initial noise (it enters the window as pure noise), ``step == j >= 1``
is the fresh Gaussian used to re-noise the block from step j-1's x0 prediction to step j.
"""
from __future__ import annotations

import hashlib
from typing import Protocol

import torch


class NoiseSource(Protocol):
    def __call__(self, block: int, step: int, shape: tuple[int, ...], device, dtype) -> torch.Tensor: ...


def block_seed(seed: int, block: int, step: int) -> int:
    """A 63-bit seed derived from (seed, block, step): every draw is reproducible on its own."""
    h = hashlib.blake2b(f"{int(seed)}:{int(block)}:{int(step)}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


class SeededNoise:
    """Default source: each (block, step) draw is seeded from (seed, block, step).

    So a long run is reproducible block by block, and resuming at any block gives the same noise.
    Draws happen on ``generator_device`` (default: the compute device; CPU and CUDA streams differ)."""

    def __init__(self, seed: int = 0, generator_device=None):
        self.seed = int(seed)
        self.generator_device = generator_device
        self._gens: dict[str, torch.Generator] = {}

    def __call__(self, block, step, shape, device, dtype):
        gdev = torch.device(self.generator_device or device)
        gen = self._gens.get(str(gdev))
        if gen is None:
            gen = self._gens[str(gdev)] = torch.Generator(device=gdev)
        gen.manual_seed(block_seed(self.seed, block, step))
        return torch.randn(shape, generator=gen, device=gdev, dtype=torch.float32).to(device=device, dtype=dtype)


class TensorNoise:
    """Noise given up front: ``initial`` [B, C, F, H, W] per block, and optional re-noise draws
    ``renoise[(block, step)]`` (e.g. recovered from a trace). Missing draws fall back to ``fallback``."""

    def __init__(self, initial: torch.Tensor, renoise: dict | None = None, frames_per_block: int = 3,
                 fallback: NoiseSource | None = None):
        self.initial, self.renoise, self.fb = initial, renoise or {}, frames_per_block
        self.fallback = fallback

    def __call__(self, block, step, shape, device, dtype):
        if step == 0 and (block + 1) * self.fb <= self.initial.shape[2]:
            t = self.initial[:, :, block * self.fb:(block + 1) * self.fb]
        elif (block, step) in self.renoise:
            t = self.renoise[(block, step)]
        elif self.fallback is not None:
            return self.fallback(block, step, shape, device, dtype)
        else:
            raise KeyError(f"no noise for block {block}, step {step}")
        return t.to(device=device, dtype=dtype)
