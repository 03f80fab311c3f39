"""Memory of a Rolling Forcing run, estimated before anything is allocated, and the early checks that
fail with a message saying what to change (ComfyUI-free; tested without ComfyUI).

Units: bytes; "latent frames" unless stated otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..rolling.config import RollingConfig

TEXT_TOKENS = 512  # umT5 sequence length the release pads / cuts prompts to
GIB = 1024 ** 3


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a run needs on the compute device. ``working`` must be free after the weights are loaded."""

    weights: int
    kv_cache: int
    text: int
    activations: int
    vae: int = 0  # streaming decode of one block (runs after the DiT forward, not at the same time)

    @property
    def working(self) -> int:
        return self.kv_cache + self.text + max(self.activations, self.vae)

    @property
    def total(self) -> int:
        return self.weights + self.working

    def describe(self) -> str:
        parts = [f"weights {fmt_bytes(self.weights)}", f"KV cache {fmt_bytes(self.kv_cache)}",
                 f"text {fmt_bytes(self.text)}", f"activations {fmt_bytes(self.activations)}"]
        if self.vae:
            parts.append(f"VAE decode {fmt_bytes(self.vae)}")
        return ", ".join(parts) + f"; total about {fmt_bytes(self.total)}"


def fmt_bytes(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 1024 ** 2:.1f} MiB"


def kv_cache_bytes(cfg: RollingConfig, *, num_layers: int, dim: int, tokens_per_frame: int, batch: int,
                   dtype_bytes: int) -> int:
    """Exactly what :class:`rolling.cache.RollingKVCache` allocates: K and V for the sink and ring
    (``capacity_frames``) in every layer, plus one shared span-sized K/V scratch buffer."""
    stored = 2 * num_layers * batch * cfg.capacity_frames * tokens_per_frame * dim
    scratch = 2 * batch * cfg.span_frames * tokens_per_frame * dim
    return (stored + scratch) * dtype_bytes


def estimate_memory(cfg: RollingConfig, *, num_layers: int, dim: int, ffn_dim: int, latent_h: int, latent_w: int,
                    batch: int = 1, dtype_bytes: int = 2, weight_bytes: int = 0, patch: Sequence[int] = (1, 2, 2),
                    text_tokens: int = TEXT_TOKENS, vae: bool = False, vae_dtype_bytes: int = 2,
                    vae_weight_bytes: int = 0) -> MemoryEstimate:
    """Device memory of one run (an estimate, except the KV cache, which is exact).

    * KV cache: see :func:`kv_cache_bytes` (6.4 GiB in bf16 at 832x480 with the reference settings).
    * text: per-layer cross-attention K/V of the prompt (``text_tokens``: 512, the toy model's 16).
    * activations: peak of one DiT layer over the largest forward (the window, plus the clean block
      in fused mode): residual, modulated input, q/k/v and their rotated copies, attention and
      projection outputs (~10 x dim) and the FFN hidden state and its activation (2 x ffn_dim) per
      token; assumes a memory-efficient attention kernel (SDPA flash/efficient, sage, flash).
    * VAE: decoding one latent frame at a time with the causal cache: ~6 full-resolution feature
      maps of 96 channels x 4 frames, plus the block's output frames.
    """
    tpf = (latent_h // patch[1]) * (latent_w // patch[2])
    kv = kv_cache_bytes(cfg, num_layers=num_layers, dim=dim, tokens_per_frame=tpf, batch=batch,
                        dtype_bytes=dtype_bytes)
    text = 2 * num_layers * batch * text_tokens * dim * dtype_bytes
    frames_in = cfg.window_frames + (cfg.frames_per_block if cfg.update_mode == "fused" else 0)
    tokens = batch * frames_in * tpf
    act = tokens * (10 * dim + 2 * ffn_dim) * dtype_bytes
    vae_b = 0
    if vae:
        h, w = latent_h * 8, latent_w * 8
        vae_b = batch * 4 * h * w * 96 * vae_dtype_bytes * 6 + batch * 4 * cfg.frames_per_block * h * w * 3 * 4
    return MemoryEstimate(weights=int(weight_bytes + (vae_weight_bytes if vae else 0)), kv_cache=kv, text=text,
                          activations=act, vae=vae_b)


class InsufficientMemoryError(RuntimeError):
    """Raised before sampling when the estimate does not fit; the message says what to change."""


def memory_advice() -> str:
    return ("lower the resolution (width/height), the cache capacity or attention span (Rolling Forcing Cache "
            "Settings), use fp8 weights in the model loader, or free other models")


def check_memory(est: MemoryEstimate, free_bytes: int, device: str, *, after_weights: bool = True) -> None:
    """Fail early when the working memory (KV cache, text, activations/VAE) cannot fit.

    ``free_bytes``: free memory on ``device``, measured after the weights were loaded
    (``after_weights=True``) or the whole device memory before loading (``False``: then the
    working memory alone must fit, weights can still be offloaded by ComfyUI)."""
    need = est.working
    if need > free_bytes:
        where = "free after loading the weights" if after_weights else "in total"
        raise InsufficientMemoryError(
            f"Rolling Forcing needs about {fmt_bytes(need)} on {device} for this run (KV cache "
            f"{fmt_bytes(est.kv_cache)}, text {fmt_bytes(est.text)}, activations {fmt_bytes(est.activations)}"
            + (f", VAE decode {fmt_bytes(est.vae)}" if est.vae else "")
            + f"), but only {fmt_bytes(free_bytes)} is {where} (weights {fmt_bytes(est.weights)}). "
            + memory_advice())


def image_bytes(frames: int, width: int, height: int, batch: int = 1) -> int:
    """Host memory of the IMAGE output (float32 [N, H, W, 3])."""
    return batch * frames * height * width * 3 * 4


def check_host_memory(frames: int, width: int, height: int, batch: int, available: int) -> None:
    need = image_bytes(frames, width, height, batch)
    if need > available:
        raise InsufficientMemoryError(
            f"the decoded video ({batch * frames} frames of {width}x{height}) needs {fmt_bytes(need)} of RAM as an "
            f"IMAGE batch, but only {fmt_bytes(available)} is available; make the video shorter or smaller")
