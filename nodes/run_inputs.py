"""The sampler node's inputs, checked and turned into core values (ComfyUI-free; tested without
ComfyUI): pixel size -> latent size, seconds -> whole blocks, the step list and cache settings ->
RollingConfig, a LATENT to continue from, CONDITIONING -> the prompt embedding.

Units: "latent frames" unless stated otherwise; a block is ``frames_per_block`` (3) latent frames;
N latent frames decode to 1 + 4 (N - 1) pixel frames at 16 fps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..rolling.config import PIXEL_FPS, REFERENCE_STEPS, RollingConfig, parse_steps
from ..rolling.timing import Timeline, pixel_frames
from .memory import TEXT_TOKENS

SIZE_MULTIPLE = 16  # pixel size: VAE factor 8 x patch 2
MAX_SIZE = 4096
MAX_SECONDS = 3600.0
DEFAULT_WIDTH, DEFAULT_HEIGHT, DEFAULT_SECONDS = 832, 480, 5.0
DEFAULT_STEPS_TEXT = ",".join(str(s) for s in REFERENCE_STEPS)
CACHE_LIMITS = {"sink_blocks": (0, 64), "span_frames": (3, 4096), "capacity_frames": (3, 4096),
                "context_noise": (0.0, 999.0)}


def cache_config(sink_blocks=1, span_frames=21, capacity_frames=24, context_noise=0.0, update_mode="fused",
                 rope_mode="reference", schedule="rolling") -> RollingConfig:
    """The cache node's values as a RollingConfig (the sampler sets the steps; until then the shortest
    window, one step, is checked). Raises ValueError saying which values are allowed."""
    values = {"sink_blocks": sink_blocks, "span_frames": span_frames, "capacity_frames": capacity_frames}
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{name} must be a whole number, got {v!r}")
    if isinstance(context_noise, bool) or not isinstance(context_noise, (int, float)) or math.isnan(context_noise):
        raise ValueError(f"context_noise must be a number (a timestep from 0 to 999), got {context_noise!r}")
    for name, v in {**values, "context_noise": context_noise}.items():
        lo, hi = CACHE_LIMITS[name]
        if not (lo <= v <= hi):
            raise ValueError(f"{name} must be between {lo} and {hi}, got {v}")
    try:
        return RollingConfig(steps=(1000,), sink_blocks=sink_blocks, span_frames=span_frames,
                             capacity_frames=capacity_frames, context_noise=float(context_noise),
                             update_mode=update_mode, rope_mode=rope_mode, schedule=schedule)
    except ValueError as e:
        raise ValueError(f"invalid Rolling Forcing cache settings: {e}") from None


def sampler_config(cache: RollingConfig | None, steps_text: str | None) -> RollingConfig:
    """The run's RollingConfig: the cache settings (reference ones when none) with the step list text
    (blank = reference steps)."""
    try:
        steps = parse_steps(steps_text or "")
    except ValueError as e:
        raise ValueError(f"invalid step list: {e}") from None
    try:
        return (cache or RollingConfig()).with_(steps=steps)
    except ValueError as e:
        raise ValueError(f"invalid Rolling Forcing cache settings with steps {','.join(map(str, steps))}: {e}") \
            from None


def check_dimension(name: str, v) -> int:
    """A pixel width/height: a whole multiple of 16 in 16..4096."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{name} must be a whole number of pixels, got {v!r}")
    if not (SIZE_MULTIPLE <= v <= MAX_SIZE) or v % SIZE_MULTIPLE:
        lo, hi = (v // SIZE_MULTIPLE) * SIZE_MULTIPLE, -(-v // SIZE_MULTIPLE) * SIZE_MULTIPLE
        hint = f" (e.g. {max(lo, SIZE_MULTIPLE)} or {min(hi, MAX_SIZE)})" if SIZE_MULTIPLE <= v <= MAX_SIZE else ""
        raise ValueError(f"{name} must be a multiple of {SIZE_MULTIPLE} between {SIZE_MULTIPLE} and {MAX_SIZE} "
                         f"pixels, got {v}{hint}")
    return v


def latent_size(width: int, height: int) -> tuple[int, int]:
    """Pixel size -> latent (height, width). Pixel sizes must be multiples of 16 in 16..4096."""
    check_dimension("width", width)
    check_dimension("height", height)
    return height // 8, width // 8


@dataclass(frozen=True)
class LengthPlan:
    """How a requested length maps onto whole blocks."""

    seconds: float  # asked for
    blocks: int
    latent_frames: int
    frames: int  # pixel frames the VAE decodes
    fps: int = PIXEL_FPS

    @property
    def actual_seconds(self) -> float:
        return self.frames / self.fps

    def describe(self) -> str:
        return (f"{self.seconds:g} s -> {self.blocks} block(s) = {self.latent_frames} latent frames = "
                f"{self.frames} frames ({self.actual_seconds:.2f} s at {self.fps} fps)")


def plan_length(seconds: float, frames_per_block: int = 3) -> LengthPlan:
    """Seconds at 16 fps -> whole blocks (rounded up, so the video is at least as long as asked)."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or math.isnan(seconds):
        raise ValueError(f"length must be a number of seconds, got {seconds!r}")
    if not (0 < seconds <= MAX_SECONDS):
        raise ValueError(f"length must be more than 0 and at most {MAX_SECONDS:g} seconds, got {seconds:g}")
    blocks = Timeline(frames_per_block, PIXEL_FPS).blocks_for(float(seconds))
    latent = blocks * frames_per_block
    return LengthPlan(float(seconds), blocks, latent, pixel_frames(latent))


def extend_latents(latent, batch: int, channels: int, lat_h: int, lat_w: int) -> torch.Tensor:
    """The frames of a LATENT to continue from, checked against the run: [B, C, F, H/8, W/8]."""
    x = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(x, torch.Tensor) or x.ndim != 5:
        raise ValueError("extend_from must be a video LATENT [batch, 16, frames, height/8, width/8] (e.g. a Rolling "
                         "Forcing LATENT or a Wan2.1 VAE Encode of a clip or image)")
    if x.shape[1] != channels or tuple(x.shape[3:]) != (lat_h, lat_w):
        raise ValueError(f"extend_from is {list(x.shape)} but this run needs [*, {channels}, *, {lat_h}, {lat_w}]: "
                         f"use the same width/height ({lat_w * 8}x{lat_h * 8}) as the latent you continue")
    if x.shape[0] not in (1, batch):
        raise ValueError(f"extend_from has batch {x.shape[0]}, the prompt batch is {batch}")
    return x


# ----------------------------------------------------------------------------- conditioning

def conditioning_tensor(conditioning) -> torch.Tensor:
    """The prompt embedding [B, tokens, width] of a ComfyUI CONDITIONING ([[tensor, {...}]])."""
    if not isinstance(conditioning, (list, tuple)) or not conditioning:
        raise ValueError("positive conditioning is empty; connect CLIPTextEncode (with a CLIPLoader of type wan)")
    if len(conditioning) > 1:
        raise ValueError(f"positive conditioning has {len(conditioning)} entries (e.g. from Conditioning Combine or "
                         "timestep/area conditioning); Rolling Forcing uses one prompt: connect a single "
                         "CLIPTextEncode")
    entry = conditioning[0]
    t = entry[0] if isinstance(entry, (list, tuple)) and entry else None
    if not isinstance(t, torch.Tensor) or t.ndim != 3:
        raise ValueError("positive conditioning does not hold a [batch, tokens, width] text embedding; connect "
                         "CLIPTextEncode with a CLIPLoader of type wan")
    return t


def prepare_text(cond: torch.Tensor, text_dim: int, tokens: int = TEXT_TOKENS) -> tuple[torch.Tensor, str | None]:
    """Check the embedding width and pad (zeros) or cut it to ``tokens`` as the reference does.

    Returns (embedding [B, tokens, text_dim] float32, note or None). Refused (ValueError naming the
    conditioning): not a [batch, tokens, width] floating tensor, an empty batch, zero tokens (nothing to
    condition on: padding it would silently run an unconditioned video), the wrong width, NaN/inf values."""
    if not isinstance(cond, torch.Tensor) or cond.ndim != 3:
        shape = list(cond.shape) if isinstance(cond, torch.Tensor) else type(cond).__name__
        raise ValueError(f"the conditioning's text embedding must be a [batch, tokens, width] tensor, got {shape}; "
                         "connect CLIPTextEncode with a CLIPLoader of type wan")
    if not cond.is_floating_point():
        dt = str(cond.dtype).replace("torch.", "")
        raise ValueError(f"the conditioning's text embedding must be floating point, got {dt}; connect "
                         "CLIPTextEncode with a CLIPLoader of type wan")
    if cond.shape[0] == 0:
        raise ValueError("the conditioning's text embedding has batch 0 (no prompt); connect CLIPTextEncode with "
                         "a CLIPLoader of type wan")
    if cond.shape[1] == 0:
        raise ValueError("the conditioning has 0 text tokens: there is no prompt to condition on (padding it would "
                         "generate an unconditioned video); encode a non-empty prompt with CLIPTextEncode and a "
                         "CLIPLoader of type wan")
    width = cond.shape[-1]
    if width != text_dim:
        raise ValueError(f"the conditioning is {width} wide but this model expects {text_dim} (umT5-XXL): use the "
                         f"umT5-XXL text encoder with type wan (CLIPLoader type 'wan', e.g. "
                         f"umt5_xxl_fp8_e4m3fn_scaled.safetensors) and CLIPTextEncode")
    n = cond.shape[1]
    cond = cond.float()
    if cond.device.type != "meta" and not bool(torch.isfinite(cond).all()):
        raise ValueError("the conditioning's text embedding holds NaN or infinite values; the text encoder's "
                         "weights or its dtype are broken: reload the umT5-XXL text encoder (CLIPLoader type wan)")
    note = None
    if n > tokens:
        note = f"prompt embedding has {n} tokens; cut to the first {tokens} as the reference does"
        cond = cond[:, :tokens]
    elif n < tokens:
        cond = torch.cat([cond, cond.new_zeros(cond.shape[0], tokens - n, width)], dim=1)
    return cond.contiguous(), note


def run_summary(length, cfg, width: int, height: int, batch: int, seed: int, attention: str, dtype: torch.dtype,
                est=None) -> str:
    lines = [f"Rolling Forcing: {width}x{height}, {length.describe()}" + (f", batch {batch}" if batch > 1 else ""),
             f"schedule {cfg.schedule}, steps {','.join(map(str, cfg.steps))}, sink {cfg.sink_blocks} block(s), span "
             f"{cfg.span_frames}, capacity {cfg.capacity_frames} latent frames, context noise {cfg.context_noise:g}, "
             f"update {cfg.update_mode}, RoPE {cfg.rope_mode}",
             f"seed {seed}, attention {attention}, compute {str(dtype).replace('torch.', '')}"]
    if est is not None:
        lines.append(f"memory: {est.describe()}")
    return "\n".join(lines)


def check_run_name(name: str) -> str:
    """A chunked run's name: a relative path under the output folder (``video/long_01``), whose video is
    ``<name>.mp4`` and whose state folder is ``<name>.run``. Raises ValueError saying what is allowed."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError("run_name must name the video, e.g. video/rolling_forcing_long")
    name = name.strip().replace("\\", "/")
    parts = name.split("/")
    if name.startswith("/") or ":" in name or any(p in ("", ".", "..") for p in parts) or \
            not all(c.isalnum() or c in "-_. " for p in parts for c in p):
        raise ValueError(f"run_name {name!r} must be a relative path inside the output folder made of letters, "
                         "digits, '-', '_', '.', ' ' and '/' (no '..', no drive or leading '/')")
    return name
