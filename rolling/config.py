"""Configuration dataclasses: the Wan2.1 DiT architecture and the rolling-window sampler.

Units: "frames" are latent frames unless stated otherwise; a block is ``frames_per_block`` latent
frames (3 in the release); one latent frame decodes to 4 pixel frames (the first to 1).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Sequence

PIXEL_FPS = 16
"""Frame rate of the Wan2.1 VAE's decoded video (pixel frames per second)."""


@dataclass(frozen=True)
class WanConfig:
    """Hyper-parameters of a Wan2.1 text-to-video DiT (names as in the release's config)."""

    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    in_dim: int = 16
    out_dim: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True
    model_type: str = "t2v"

    def __post_init__(self) -> None:
        if self.dim <= 0 or self.num_heads <= 0 or self.dim % self.num_heads:
            raise ValueError(f"dim ({self.dim}) must be a positive multiple of num_heads ({self.num_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim (dim/num_heads = {self.head_dim}) must be even for RoPE")
        if self.freq_dim % 2:
            raise ValueError(f"freq_dim must be even, got {self.freq_dim}")
        if self.model_type != "t2v":
            raise ValueError(f"only text-to-video (t2v) Wan2.1 models are supported, got model_type={self.model_type!r}")
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @classmethod
    def preset(cls, name: str) -> "WanConfig":
        """``1.3B`` (Rolling Forcing / Self-Forcing generator), ``14B`` (the teacher) or ``tiny``."""
        try:
            return PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}") from None

    @classmethod
    def from_dict(cls, d: dict) -> "WanConfig":
        """Unknown keys are ignored (``patch_size`` becomes a tuple in ``__post_init__``)."""
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def to_dict(self) -> dict:
        return {**asdict(self), "patch_size": list(self.patch_size)}


PRESETS = {
    "1.3B": WanConfig(),
    "14B": WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    # Small enough for CPU tests and the demo; same structure as the release.
    "tiny": WanConfig(dim=64, ffn_dim=128, num_heads=4, num_layers=2, freq_dim=32, text_dim=32),
}

REFERENCE_STEPS = (1000, 800, 600, 400, 200)
UPDATE_MODES = ("fused", "reference")
ROPE_MODES = ("reference", "relative")
SCHEDULES = ("rolling", "chunk_causal")  # the generators live in rolling.schedule


@dataclass(frozen=True)
class RollingConfig:
    """The rolling window, attention sink and KV cache. Defaults reproduce the published sampler.

    Attributes:
        steps: nominal denoising step list (strictly decreasing integers in 1..1000); it is warped
            through the shifted flow-matching table, and its length is the window length in blocks.
        shift: flow-matching timestep shift.
        frames_per_block: latent frames per block (3 in the release).
        sink_blocks: blocks at the start of the video kept as the attention sink (0 disables it).
        span_frames: latent frames one attention call may see (sink + working cache + window).
        capacity_frames: latent frames the KV cache holds (sink + most recent clean blocks).
        context_noise: timestep given to the clean-cache update pass (0 = clean).
        update_mode: ``fused`` (the default: the clean-cache pass rides in the next window's forward and
            passes nobody reads are skipped; within 3e-6 of the published sampler in float32 on every
            golden trace and bit-equal in bf16, see bench/results/fused_vs_reference.json) or
            ``reference`` (a separate clean-cache forward after every window, as published).
        rope_mode: ``reference`` (absolute latent-frame positions, as published, but without the
            1,024-position limit) or ``relative`` (positions relative to the attention span).
        schedule: ``rolling`` (Rolling Forcing's joint window, the default) or ``chunk_causal``
            (Self-Forcing / CausVid: one block at a time through all its steps; its sink, if any, keeps
            its absolute positions); see :mod:`rolling.schedule`.
    """

    steps: tuple[int, ...] = REFERENCE_STEPS
    shift: float = 5.0
    frames_per_block: int = 3
    sink_blocks: int = 1
    span_frames: int = 21
    capacity_frames: int = 24
    context_noise: float = 0.0
    update_mode: str = "fused"
    rope_mode: str = "reference"
    schedule: str = "rolling"

    def __post_init__(self) -> None:
        steps = validate_steps(self.steps)
        object.__setattr__(self, "steps", steps)
        fb = self.frames_per_block
        if not isinstance(fb, int) or fb < 1:
            raise ValueError(f"frames_per_block must be a positive integer, got {fb!r}")
        if not (self.shift > 0) or math.isinf(self.shift):
            raise ValueError(f"shift must be a finite number > 0, got {self.shift}")
        for name in ("span_frames", "capacity_frames"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive whole number of latent frames, got {v!r}")
        for name, allowed in (("schedule", SCHEDULES), ("update_mode", UPDATE_MODES), ("rope_mode", ROPE_MODES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if not isinstance(self.sink_blocks, int) or self.sink_blocks < 0:
            raise ValueError(f"sink_blocks must be an integer >= 0, got {self.sink_blocks!r}")
        window = self.window_frames
        if self.span_frames < window + self.sink_frames:
            what = f"{len(steps)} steps x {fb} frames" if self.schedule == "rolling" else f"one block of {fb} frames"
            raise ValueError(
                f"span_frames ({self.span_frames}) must be at least window ({window} = {what}) + sink "
                f"({self.sink_frames}) = {window + self.sink_frames} latent frames")
        if self.capacity_frames % fb:
            raise ValueError(f"capacity_frames ({self.capacity_frames}) must be a multiple of frames_per_block ({fb})")
        if self.capacity_frames < self.sink_frames + fb:
            raise ValueError(
                f"capacity_frames ({self.capacity_frames}) must hold the sink ({self.sink_frames}) plus at least "
                f"one block ({fb}): minimum {self.sink_frames + fb}")
        if not (0 <= self.context_noise < 1000):  # also refuses nan
            raise ValueError(f"context_noise must be in [0, 1000), got {self.context_noise}")

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    window_blocks = num_steps  # a rolling window holds one block per step

    @property
    def window_frames(self) -> int:
        """Latent frames one denoising forward holds: T blocks (rolling) or one block (chunk_causal)."""
        return (len(self.steps) if self.schedule == "rolling" else 1) * self.frames_per_block

    @property
    def writes(self) -> str:
        """How clean-cache writes are placed (rolling.schedule.WRITES): every (reference) or fused."""
        return "fused" if self.update_mode == "fused" else "every"

    @property
    def sink_frames(self) -> int:
        return self.sink_blocks * self.frames_per_block

    @property
    def ring_blocks(self) -> int:
        """Non-sink block slots in the KV cache."""
        return (self.capacity_frames - self.sink_frames) // self.frames_per_block

    def with_(self, **kw) -> "RollingConfig":
        return replace(self, **kw)


def validate_steps(steps: Sequence) -> tuple[int, ...]:
    """Check a nominal denoising step list; return it as a tuple of ints.

    Allowed: a non-empty, strictly decreasing list of whole numbers in 1..1000 (e.g. 1000,800,600,400,200).
    """
    try:
        vals = [float(s) for s in steps]
    except (TypeError, ValueError):
        raise ValueError(f"denoising steps must be numbers, got {steps!r}") from None
    if not vals:
        raise ValueError("denoising step list is empty; give at least one step in 1..1000, e.g. 1000,800,600,400,200")
    for v in vals:
        if not math.isfinite(v) or v != int(v) or not (1 <= v <= 1000):
            raise ValueError(f"denoising step {v:g} is not allowed: each step must be a whole number in 1..1000")
    ints = tuple(int(v) for v in vals)
    if any(a <= b for a, b in zip(ints, ints[1:])):
        raise ValueError(f"denoising steps must be strictly decreasing, got {list(ints)}")
    return ints


def parse_steps(text: str) -> tuple[int, ...]:
    """Parse ``"1000, 800, 600"`` into a validated step tuple (empty/blank -> reference steps)."""
    text = (text or "").strip()
    if not text:
        return REFERENCE_STEPS
    parts = [p for p in text.replace(";", ",").replace(" ", ",").split(",") if p]
    try:
        return validate_steps([float(p) for p in parts])
    except ValueError as e:
        if "could not convert" in str(e):
            raise ValueError(f"could not read the step list {text!r}: use comma-separated whole numbers in 1..1000") from None
        raise
