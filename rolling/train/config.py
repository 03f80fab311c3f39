"""Training configuration: :class:`TrainConfig` with the reference's defaults (ALGORITHM.md 8.2),
read from a JSON or TOML file.

Units: frames are latent frames; timesteps are on the 0..1000 scale; learning rates per optimizer
step. Every field may be given in the file; unknown keys are an error (typos must not pass silently).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields, replace

from ..config import REFERENCE_STEPS, RollingConfig, WanConfig, validate_steps


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs. Defaults reproduce the published run (1.3B student, 14B
    teacher, 480x832, 8 GPUs x batch 1), except for the documented bug fixes (see
    :mod:`rolling.train`).

    Models (``generator``, ``critic``, ``teacher``): a preset name (``1.3B``, ``14B``, ``tiny``) or a
    dict of :class:`rolling.config.WanConfig` fields. ``*_ckpt``: a weights file (release ``.pt`` with
    ``generator``/``generator_ema`` keys, a plain state dict, ``.safetensors``) or a directory of
    ``.safetensors`` shards (the HF Wan2.1-T2V-14B layout). No checkpoint = random init from
    ``init_seed`` (tests / smoke runs). ``critic_ckpt`` defaults to ``teacher_ckpt`` when both models
    have the same shape, else it must be given (the reference initialises the critic from the base
    1.3B Wan).

    Prompts: ``prompts`` is a ``.safetensors``/``.pt`` file of precomputed umT5 embeddings with a
    tensor ``context`` [N, tokens, text_dim] and ``negative`` [tokens, text_dim] (the negative-prompt
    embedding for the teacher's CFG); None = random embeddings (smoke tests only).
    """

    # ---------------------------------------------------------------- models
    generator: str | dict = "1.3B"
    critic: str | dict = "1.3B"
    teacher: str | dict = "14B"
    generator_ckpt: str | None = None  # reference: checkpoints/ode_init.pt (key "generator")
    critic_ckpt: str | None = None  # reference: base Wan2.1-T2V-1.3B
    teacher_ckpt: str | None = None  # reference: Wan2.1-T2V-14B
    init_seed: int = 0
    # ---------------------------------------------------------------- data
    prompts: str | None = None
    text_tokens: int = 512  # only for random prompts
    latent_height: int = 60  # 480 px / 8
    latent_width: int = 104  # 832 px / 8
    batch_size: int = 1  # prompts per rank per update (reference: 1; 8 GPUs -> global batch 8)
    # ---------------------------------------------------------------- rollout / schedule
    denoising_steps: tuple[int, ...] = REFERENCE_STEPS  # warped through the shift table
    timestep_shift: float = 5.0
    frames_per_block: int = 3
    rollout_frames: tuple[int, ...] = (21, 24, 27)  # drawn uniformly per rollout, shared by all ranks
    loss_frames: int = 21  # the loss (and the teacher) sees the last loss_frames frames
    span_frames: int | None = None  # attention span of the causal student; None = loss_frames (21)
    rolling_prob: float = 0.5  # probability of the Rolling-Forcing rollout (else Self-Forcing)
    context_noise: float = 0.0  # timestep of the clean-cache passes
    sf_cache_noise: bool = False  # True = reference: SF branch adds sigma(0)=0.00498 noise to the cache input
    reencode: str = "identity"  # N > loss_frames: first loss frame hook ("identity" = keep latent; see rollout)
    # ---------------------------------------------------------------- DMD
    guidance_scale: float = 3.0  # teacher CFG: cond + g * (cond - uncond)
    num_train_timesteps: int = 1000
    min_timestep: float = 20.0  # clamp of the shifted DMD / critic timestep (0.02 * 1000)
    max_timestep: float = 980.0  # (0.98 * 1000)
    # ---------------------------------------------------------------- optimisation
    lr: float = 1.5e-6
    lr_critic: float = 4.0e-7
    betas: tuple[float, float] = (0.0, 0.999)
    betas_critic: tuple[float, float] = (0.0, 0.999)
    weight_decay: float = 0.01
    grad_clip: float = 10.0
    gen_update_every: int = 5  # generator step when step % 5 == 0; critic every step
    lr_warmup_steps: int = 0  # linear warm-up of both learning rates over the first N iterations (0 = off, reference)
    critic_warmup_steps: int = 0  # first N iterations update only the critic (0 = off, reference)
    lr_decay: str = "constant"  # generator lr after the warm-up: "constant" (reference) or "cosine" (to 0 at max_steps)
    ema_decay: float = 0.99
    ema_start_step: int = 200
    max_steps: int = 3000
    # ---------------------------------------------------------------- run
    seed: int = 0
    output_dir: str = "runs/rolling_forcing"
    save_every: int = 100
    log_every: int = 1
    resume: str | None = None  # a checkpoint directory written by this trainer
    device: str = "auto"  # auto = cuda if available else cpu
    mixed_precision: bool = True  # bf16 compute (FSDP: param bf16, reduce fp32; single device: autocast)
    teacher_dtype: str = "bf16"  # storage dtype of the frozen teacher
    gradient_checkpointing: bool = True
    sharding: str = "full"  # FSDP2 over all ranks: "full" (shard everything) or "hybrid" (shard in-node, replicate across nodes)
    attention: str = "sdpa"
    num_gpus: int = 8  # only for --dry-run

    def __post_init__(self) -> None:
        object.__setattr__(self, "denoising_steps", validate_steps(self.denoising_steps))
        object.__setattr__(self, "rollout_frames", tuple(int(n) for n in self.rollout_frames))
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        object.__setattr__(self, "betas_critic", tuple(float(b) for b in self.betas_critic))
        fb = self.frames_per_block
        if fb < 1:
            raise ValueError(f"frames_per_block must be >= 1, got {fb}")
        if not self.rollout_frames or any(n % fb or n < self.loss_frames for n in self.rollout_frames):
            raise ValueError(f"rollout_frames {self.rollout_frames} must be multiples of frames_per_block ({fb}) "
                             f"and >= loss_frames ({self.loss_frames})")
        if self.loss_frames % fb or self.loss_frames < fb:
            raise ValueError(f"loss_frames ({self.loss_frames}) must be a positive multiple of {fb}")
        if not 0.0 <= self.rolling_prob <= 1.0:
            raise ValueError(f"rolling_prob must be in [0, 1], got {self.rolling_prob}")
        if not 0 <= self.min_timestep <= self.max_timestep <= self.num_train_timesteps:
            raise ValueError("need 0 <= min_timestep <= max_timestep <= num_train_timesteps")
        if self.gen_update_every < 1:
            raise ValueError("gen_update_every must be >= 1")
        if self.lr_decay not in ("constant", "cosine"):
            raise ValueError(f"lr_decay must be 'constant' or 'cosine', got {self.lr_decay!r}")
        if self.lr_warmup_steps < 0 or self.critic_warmup_steps < 0:
            raise ValueError(f"lr_warmup_steps ({self.lr_warmup_steps}) and critic_warmup_steps "
                             f"({self.critic_warmup_steps}) must be >= 0")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.sharding not in ("full", "hybrid"):
            raise ValueError(f"sharding must be 'full' or 'hybrid', got {self.sharding!r}")
        if self.teacher_dtype not in ("bf16", "fp32"):
            raise ValueError(f"teacher_dtype must be 'bf16' or 'fp32', got {self.teacher_dtype!r}")
        if self.reencode not in ("identity",):
            raise ValueError(f"reencode must be 'identity' (plug a VAE via Trainer(reencode=...)), got {self.reencode!r}")
        self.rolling_config()  # validates the window / span geometry

    # ---------------------------------------------------------------- derived
    def rolling_config(self) -> RollingConfig:
        """The causal student's window / sink / cache geometry. Reads are limited by the attention span
        (21 frames), so they are those of inference; the cache holds the longest rollout without
        eviction (27 frames, as the reference's training cache), so every slot is written once per
        rollout and K/V read by gradient forwards stay valid until backward."""
        span = self.span_frames or self.loss_frames
        fb = self.frames_per_block
        return RollingConfig(steps=self.denoising_steps, shift=self.timestep_shift, frames_per_block=fb,
                             span_frames=span, capacity_frames=max(span + fb, max(self.rollout_frames)),
                             context_noise=self.context_noise)

    def model_config(self, which: str) -> WanConfig:
        spec = getattr(self, which)
        return WanConfig.preset(spec) if isinstance(spec, str) else WanConfig.from_dict(spec)

    def with_(self, **kw) -> "TrainConfig":
        return replace(self, **kw)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training config keys: {', '.join(unknown)}")
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}
        return cls(**kw)


def load_config(path: str) -> TrainConfig:
    """Read a ``.json`` or ``.toml`` file (a flat table of :class:`TrainConfig` fields)."""
    if not os.path.isfile(path):
        raise ValueError(f"training config not found: {path}")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".json":
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    elif ext == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            try:
                import tomli as tomllib  # type: ignore[no-redef]
            except ImportError:
                raise ValueError("reading .toml needs Python >= 3.11 (tomllib) or the tomli package; "
                                 "or use a .json config") from None
        with open(path, "rb") as f:
            d = tomllib.load(f)
    else:
        raise ValueError(f"training config must be .json or .toml, got {path}")
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a table of TrainConfig fields")
    return TrainConfig.from_dict(d)
