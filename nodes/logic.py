"""ComfyUI-free logic of the Rolling Forcing nodes: input validation, length planning, conditioning
handling, dtype choice and the memory estimate.

Everything here is a plain function over plain values (ints, strings, torch tensors and dtypes), so
it is unit-tested without ComfyUI (``tests/test_nodes_logic.py``). The node modules next to this
file only parse ComfyUI inputs, call these functions and the core (``rolling``), and format outputs.

Units: "latent frames" unless stated otherwise; a block is ``frames_per_block`` (3) latent frames;
N latent frames decode to 1 + 4 (N - 1) pixel frames at 16 fps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..rolling.config import PIXEL_FPS, REFERENCE_STEPS, RollingConfig, parse_steps
from ..rolling.timing import Timeline, pixel_frames

PREFIX = "RollingForcing"
CATEGORY = "RollingForcing"
CACHE_TYPE = "ROLLING_FORCING_CACHE"

WEIGHT_CHOICES = ("ema", "regular")
WEIGHT_DTYPES = ("default", "bf16", "fp16", "fp8_e4m3fn", "fp8_e5m2")
ATTENTION_BACKENDS = ("auto", "sdpa", "sage", "flash")
UPDATE_MODES = ("reference", "fused")
ROPE_MODES = ("reference", "relative")
CHECKPOINT_EXTENSIONS = (".pt", ".pth", ".safetensors")

TEXT_TOKENS = 512  # umT5 sequence length the release pads / cuts prompts to
SIZE_MULTIPLE = 16  # pixel size: VAE factor 8 x patch 2
MAX_SIZE = 4096
MAX_SECONDS = 3600.0
DEFAULT_WIDTH, DEFAULT_HEIGHT, DEFAULT_SECONDS = 832, 480, 5.0
DEFAULT_STEPS_TEXT = ",".join(str(s) for s in REFERENCE_STEPS)

# where the model loader records its choices on the ModelPatcher (model_options["transformer_options"])
OPTIONS_KEY = "rolling_forcing"

GIB = 1024 ** 3


# ----------------------------------------------------------------------------- model loading

def checkpoint_files(names: Sequence[str]) -> list[str]:
    """The diffusion_models entries the loader offers: .pt, .pth and .safetensors files."""
    return [n for n in names if n.lower().endswith(CHECKPOINT_EXTENSIONS)]


def weight_dtype_options(name: str) -> dict:
    """``model_options`` for ``comfy.sd.load_diffusion_model_state_dict`` (as the stock UNETLoader)."""
    table = {"default": None, "bf16": torch.bfloat16, "fp16": torch.float16,
             "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
    if name not in table:
        raise ValueError(f"weight dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {name!r}")
    return {} if table[name] is None else {"dtype": table[name]}


def check_choice(what: str, value, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"{what} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def attention_from_options(model_options: dict | None) -> str:
    """The attention backend stored by the model loader; ``auto`` for models from other loaders."""
    opts = ((model_options or {}).get("transformer_options") or {}).get(OPTIONS_KEY) or {}
    name = opts.get("attention", "auto")
    return name if name in ATTENTION_BACKENDS else "auto"


def with_attention(model_options: dict, attention: str) -> dict:
    """Return ``model_options`` with the attention choice recorded (mutates and returns the dict)."""
    check_choice("attention backend", attention, ATTENTION_BACKENDS)
    to = model_options.setdefault("transformer_options", {})
    to.setdefault(OPTIONS_KEY, {})["attention"] = attention
    return model_options


def wan_t2v_problem(*, class_name: str, model_type: str | None, has_image_embedding: bool,
                    in_dim: int | None, out_dim: int | None) -> str | None:
    """Why a loaded DiT cannot be used (None if it can). Inputs are read off ComfyUI's model."""
    if model_type not in (None, "t2v") or has_image_embedding:
        kind = "image-to-video (I2V)" if (has_image_embedding or model_type in ("i2v", "flf2v")) else model_type
        return (f"this MODEL is a {kind} Wan model ({class_name}); Rolling Forcing needs a text-to-video "
                f"Wan2.1 DiT (e.g. rolling_forcing_dmd.pt)")
    if in_dim not in (None, 16) or out_dim not in (None, 16):
        return (f"this MODEL has {in_dim} input / {out_dim} output latent channels; Rolling Forcing needs a "
                f"Wan2.1 text-to-video DiT with 16 (the Wan2.1 VAE's), not a Wan2.2 5B or other model")
    return None


def compute_dtype(manual_cast_dtype: torch.dtype | None, weight_dtype: torch.dtype, bf16_supported: bool = True
                  ) -> torch.dtype:
    """Dtype the sampler computes (and keeps the KV cache) in.

    ComfyUI's layers cast stored weights to ``manual_cast_dtype`` when it is set; otherwise they run
    in the stored dtype. fp8 storage is never a compute dtype: bf16 (or fp16 where bf16 is unsupported).
    """
    dt = manual_cast_dtype if manual_cast_dtype is not None else weight_dtype
    if dt in (torch.float8_e4m3fn, torch.float8_e5m2) or dt is None:
        return torch.bfloat16 if bf16_supported else torch.float16
    return dt


# ----------------------------------------------------------------------------- cache settings

@dataclass(frozen=True)
class CacheSettings:
    """What the cache node outputs (socket type ROLLING_FORCING_CACHE). Defaults = the reference."""

    sink_blocks: int = 1
    span_frames: int = 21
    capacity_frames: int = 24
    context_noise: float = 0.0
    update_mode: str = "reference"
    rope_mode: str = "reference"

    def to_config(self, steps: Sequence[int] = REFERENCE_STEPS) -> RollingConfig:
        """The full sampler configuration for a step list; RollingConfig's ValueError says what is allowed."""
        try:
            return RollingConfig(steps=tuple(steps), sink_blocks=self.sink_blocks, span_frames=self.span_frames,
                                 capacity_frames=self.capacity_frames, context_noise=float(self.context_noise),
                                 update_mode=self.update_mode, rope_mode=self.rope_mode)
        except ValueError as e:
            steps_text = ",".join(map(str, steps))
            raise ValueError(f"invalid Rolling Forcing cache settings with steps {steps_text}: {e}") from None

    def describe(self) -> str:
        return (f"sink {self.sink_blocks} block(s), span {self.span_frames}, capacity {self.capacity_frames} latent "
                f"frames, context noise {self.context_noise:g}, update {self.update_mode}, RoPE {self.rope_mode}")


CACHE_LIMITS = {"sink_blocks": (0, 64), "span_frames": (3, 4096), "capacity_frames": (3, 4096),
                "context_noise": (0.0, 999.0)}


def make_cache_settings(sink_blocks=1, span_frames=21, capacity_frames=24, context_noise=0.0,
                        update_mode="reference", rope_mode="reference") -> CacheSettings:
    """Validate the cache node's values (everything that does not depend on the step list) and
    return them. Raises ValueError saying which values are allowed.

    The span/window check needs the steps (the window is steps x 3 frames), so it is done here
    for the shortest possible window (one step) and again, fully, by the sampler."""
    for name, v in (("sink_blocks", sink_blocks), ("span_frames", span_frames), ("capacity_frames", capacity_frames)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{name} must be a whole number, got {v!r}")
    for name, v in (("sink_blocks", sink_blocks), ("span_frames", span_frames), ("capacity_frames", capacity_frames),
                    ("context_noise", context_noise)):
        lo, hi = CACHE_LIMITS[name]
        if not (lo <= v <= hi):
            raise ValueError(f"{name} must be between {lo} and {hi}, got {v}")
    check_choice("cache update mode", update_mode, UPDATE_MODES)
    check_choice("RoPE positions", rope_mode, ROPE_MODES)
    s = CacheSettings(int(sink_blocks), int(span_frames), int(capacity_frames), float(context_noise), update_mode,
                      rope_mode)
    try:
        RollingConfig(steps=(1000,), sink_blocks=s.sink_blocks, span_frames=s.span_frames,
                      capacity_frames=s.capacity_frames, context_noise=s.context_noise,
                      update_mode=s.update_mode, rope_mode=s.rope_mode)
    except ValueError as e:
        raise ValueError(f"invalid Rolling Forcing cache settings: {e}") from None
    return s


def sampler_config(cache: CacheSettings | None, steps_text: str | None) -> RollingConfig:
    """RollingConfig from the optional cache settings and the step list text (blank = reference)."""
    try:
        steps = parse_steps(steps_text or "")
    except ValueError as e:
        raise ValueError(f"invalid step list: {e}") from None
    return (cache or CacheSettings()).to_config(steps)


# ----------------------------------------------------------------------------- size and length

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

    Returns (embedding [B, tokens, text_dim] float32, note or None)."""
    if cond.ndim != 3:
        raise ValueError(f"text embedding must be [batch, tokens, width], got shape {list(cond.shape)}")
    width = cond.shape[-1]
    if width != text_dim:
        raise ValueError(f"the conditioning is {width} wide but this model expects {text_dim} (umT5-XXL): use the "
                         f"umT5-XXL text encoder with type wan (CLIPLoader type 'wan', e.g. "
                         f"umt5_xxl_fp8_e4m3fn_scaled.safetensors) and CLIPTextEncode")
    n = cond.shape[1]
    cond = cond.float()
    note = None
    if n > tokens:
        note = f"prompt embedding has {n} tokens; cut to the first {tokens} as the reference does"
        cond = cond[:, :tokens]
    elif n < tokens:
        cond = torch.cat([cond, cond.new_zeros(cond.shape[0], tokens - n, width)], dim=1)
    return cond.contiguous(), note


# ----------------------------------------------------------------------------- memory

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
    if n >= GIB:
        return f"{n / GIB:.2f} GiB"
    return f"{n / 1024 ** 2:.1f} MiB"


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
    * text: per-layer cross-attention K/V of the prompt (512 tokens).
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


# ----------------------------------------------------------------------------- reporting

def run_summary(plan: LengthPlan, cfg: RollingConfig, width: int, height: int, batch: int, seed: int,
                attention: str, dtype: torch.dtype, est: MemoryEstimate | None = None) -> str:
    lines = [f"Rolling Forcing: {width}x{height}, {plan.describe()}" + (f", batch {batch}" if batch > 1 else ""),
             f"steps {','.join(map(str, cfg.steps))}, sink {cfg.sink_blocks} block(s), span {cfg.span_frames}, "
             f"capacity {cfg.capacity_frames} latent frames, context noise {cfg.context_noise:g}, update "
             f"{cfg.update_mode}, RoPE {cfg.rope_mode}",
             f"seed {seed}, attention {attention}, compute {str(dtype).replace('torch.', '')}"]
    if est is not None:
        lines.append(f"memory: {est.describe()}")
    return "\n".join(lines)
