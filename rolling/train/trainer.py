"""The DMD training loop of Rolling Forcing (ALGORITHM.md 8.3).

Per iteration ``step``: if step % 5 == 0 a generator update (rollout with gradient -> last 21 frames
-> DMD loss against the teacher's CFG x0 and the critic's x0 -> clip 10 -> AdamW -> EMA), then
always a critic update (a fresh no-grad rollout -> flow-matching loss -> clip 10 -> AdamW). The EMA
is created when the step counter reaches ``ema_start_step`` (as a copy of the generator) and updated
after every later generator step. Checkpoints every ``save_every`` steps in the release layout.
Options (off by default, as in the reference): ``lr_warmup_steps`` (linear warm-up of both learning
rates), ``critic_warmup_steps`` (the first iterations update only the critic), ``lr_decay = "cosine"``
(the generator's lr decays to 0 at ``max_steps``; the critic keeps its lr to keep tracking). The critic starts
from ``critic_ckpt``, else from the teacher's weights when it has the teacher's shape; a teacher of
another shape without a ``critic_ckpt`` is a :class:`CriticInitError` (it used to leave the critic
silently random).

Randomness: the rollout length, the branch and the gradient-window offset / exit step are drawn on
every rank and rank 0's values are broadcast (:meth:`Trainer.choose`); noise and DMD timesteps are
per rank (seeded with the rank); prompts are drawn by epoch without replacement from a stream shared
by all ranks (``data_rng``, same seed everywhere; each rank takes its own slice of every draw). Every
stream (and the global torch RNGs) is saved in the checkpoint and restored on resume, so a resumed
run is the continuation of the run it resumes (:mod:`.checkpoint`).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections import deque
from typing import Callable

import torch

from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import PromptBank
from .distributed import DistInfo, broadcast_ints, clip_grad_norm, device_mesh, init_distributed, mean_over_ranks
from .ema import EMA
from .losses import critic_loss, generator_loss, sample_timesteps
from .models import build_dit
from .rollout import BRANCHES, GeneratorNoise, Rollout, RolloutChoice, RolloutResult, identity_reencode, loss_clip


class CriticInitError(ValueError):
    """The critic (fake score) has no initial weights: no ``critic_ckpt`` and a teacher of another shape."""


def critic_init(cfg: TrainConfig, *, has_module: bool = False) -> str | None:
    """The checkpoint the critic starts from: ``critic_ckpt`` if given; else ``teacher_ckpt`` when the
    critic and teacher configs are equal (DMD's usual fake-score init); else None only if no weights
    are loaded at all (random smoke runs) or a critic module is supplied. A teacher checkpoint of
    another shape without a ``critic_ckpt`` used to leave the critic silently random; it raises
    :class:`CriticInitError` naming the differing config fields and parameter shapes."""
    if cfg.critic_ckpt is not None or has_module or not cfg.teacher_ckpt:
        return cfg.critic_ckpt
    cc, tc = cfg.model_config("critic"), cfg.model_config("teacher")
    if cc == tc:
        return cfg.teacher_ckpt
    from dataclasses import fields as _fields
    from ..model import WanModel
    diff = [f"{f.name}: critic {getattr(cc, f.name)} vs teacher {getattr(tc, f.name)}" for f in _fields(cc)
            if getattr(cc, f.name) != getattr(tc, f.name)]
    with torch.device("meta"):
        a, b = WanModel(cc).state_dict(), WanModel(tc).state_dict()
    keys = [f"{k}: critic {list(a[k].shape)} vs teacher {list(b[k].shape)}" for k in a
            if k in b and a[k].shape != b[k].shape]
    only = sorted(set(a) ^ set(b))
    raise CriticInitError(
        f"the critic cannot start from teacher_ckpt {cfg.teacher_ckpt!r}: the critic and teacher configs differ "
        f"({'; '.join(diff)}); {len(keys)} parameter shapes differ (e.g. {'; '.join(keys[:3]) or 'none'})"
        + (f", {len(only)} keys exist in only one (e.g. {', '.join(only[:3])})" if only else "")
        + ". Allowed: a critic config equal to the teacher's (it starts from teacher_ckpt), or an explicit "
          "critic_ckpt with the critic's shape (the reference starts its 1.3B critic from the base 1.3B Wan); "
          "a random critic only in runs that load no teacher weights")


class Trainer:
    """Generator (causal student), critic (fake score) and teacher (real score) with their optimizers.

    Args:
        cfg: the run's :class:`TrainConfig`.
        prompts: a :class:`PromptBank`; default: ``cfg.prompts`` or random embeddings.
        reencode: hook for N > loss_frames (VAE decode + re-encode of the last pixel frame in the
            reference); default keeps the latent frame (see :func:`rolling.train.rollout.identity_reencode`).
        modules: optional pre-built Wan module trees {"generator", "critic", "teacher"} (tests).
        log: callable receiving each step's stats dict (rank 0); default prints JSON lines.
    """

    def __init__(self, cfg: TrainConfig, *, prompts: PromptBank | None = None,
                 reencode: Callable[[torch.Tensor], torch.Tensor] = identity_reencode,
                 modules: dict | None = None, log: Callable[[dict], None] | None = None,
                 info: DistInfo | None = None):
        self.cfg = cfg
        for field in ("generator_ckpt", "critic_ckpt", "teacher_ckpt", "prompts", "resume"):
            path = getattr(cfg, field)  # before minutes of model building: a typo fails at once
            if path and not os.path.exists(path) and not (field == "prompts" and prompts is not None):
                raise ValueError(f"{field} = {path!r}: no such file or directory (see configs/train_1.3B.json for "
                                 "the reference's files)")
        self.info = info or init_distributed(cfg.device)
        self.device = self.info.device
        self.reencode = reencode
        self.log_fn = log
        self.rcfg = cfg.rolling_config()
        modules = modules or {}
        critic_ckpt = critic_init(cfg, has_module=modules.get("critic") is not None)  # before minutes of building
        dist_bf16 = self.info.distributed and cfg.mixed_precision
        mesh = device_mesh(self.info, cfg.sharding) if self.info.distributed else None
        common = dict(mesh=mesh, attention=cfg.attention)
        self.generator = build_dit(cfg.model_config("generator"), self.info, ckpt=cfg.generator_ckpt,
                                   seed=cfg.init_seed, trainable=True, checkpointing=cfg.gradient_checkpointing,
                                   compute_dtype=torch.bfloat16 if dist_bf16 else None, bf16=dist_bf16,
                                   module=modules.get("generator"), **common)
        t_dtype = torch.bfloat16 if cfg.teacher_dtype == "bf16" else torch.float32
        self.teacher = build_dit(cfg.model_config("teacher"), self.info, ckpt=cfg.teacher_ckpt,
                                 seed=cfg.init_seed + 2, trainable=False, dtype=t_dtype,
                                 compute_dtype=torch.bfloat16 if (t_dtype == torch.bfloat16 or dist_bf16) else None,
                                 bf16=dist_bf16 or t_dtype == torch.bfloat16, module=modules.get("teacher"), **common)
        self.critic = build_dit(cfg.model_config("critic"), self.info, ckpt=critic_ckpt, seed=cfg.init_seed + 1,
                                trainable=True, checkpointing=cfg.gradient_checkpointing,
                                compute_dtype=torch.bfloat16 if dist_bf16 else None, bf16=dist_bf16,
                                module=modules.get("critic"), **common)
        self.gen_opt = torch.optim.AdamW([p for p in self.generator.parameters() if p.requires_grad], lr=cfg.lr,
                                         betas=cfg.betas, weight_decay=cfg.weight_decay)
        self.critic_opt = torch.optim.AdamW([p for p in self.critic.parameters() if p.requires_grad],
                                            lr=cfg.lr_critic, betas=cfg.betas_critic, weight_decay=cfg.weight_decay)
        if prompts is None:
            text_dim = self.generator.arch.text_dim
            prompts = PromptBank.from_file(cfg.prompts) if cfg.prompts else \
                PromptBank.random(64, cfg.text_tokens, text_dim, seed=cfg.seed)
        self.prompts = prompts
        cache_dtype = torch.bfloat16 if cfg.mixed_precision else torch.float32
        self.rollout = Rollout(self.generator, self.rcfg, height=cfg.latent_height, width=cfg.latent_width,
                               batch=cfg.batch_size, device=self.device, dtype=cache_dtype, arch=self.generator.arch)
        rank = self.info.rank
        self.shared_rng = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 17 + rank)  # rank 0's draw wins
        self.local_rng = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 101 + 7919 * rank)
        self.noise_rng = torch.Generator(device=self.device).manual_seed(cfg.seed * 1_000_003 + 211 + 7919 * rank)
        self.data_rng = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 307)  # same on every rank
        self.noise = GeneratorNoise(self.noise_rng)
        self.step = 0
        self.last_saved_step: int | None = None  # step of the last checkpoint written or resumed from
        self.ema: EMA | None = None
        self.choices: deque = deque(maxlen=100_000)  # per rollout: {"step", "phase", "local": [...], "shared": [...]}
        self.last_rollout: RolloutResult | None = None  # of the last generator step (detached), for logs/tests
        if cfg.resume:
            self.load(cfg.resume)

    # ------------------------------------------------------------------ helpers
    def autocast(self):
        if self.cfg.mixed_precision and not self.info.distributed:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def choose(self, phase: str = "") -> RolloutChoice:
        """Draw (rollout length, branch, offset) locally, then take rank 0's draw on every rank."""
        c = self.cfg
        g = self.shared_rng
        n = c.rollout_frames[int(torch.randint(len(c.rollout_frames), (1,), generator=g))]
        rolling = int(float(torch.rand((), generator=g)) < c.rolling_prob)
        offset = int(torch.randint(self.rcfg.num_steps, (1,), generator=g))
        local = [n, rolling, offset]
        shared = broadcast_ints(local, src=0)
        self.choices.append({"step": self.step, "phase": phase, "local": local, "shared": shared})
        return RolloutChoice(shared[0], BRANCHES[0] if shared[1] else BRANCHES[1], shared[2])

    def _prompts(self, batch: int) -> torch.Tensor:
        return self.prompts.sample(batch, self.data_rng, self.device, rank=self.info.rank,
                                   world_size=self.info.world_size)

    def _timesteps(self, batch: int) -> torch.Tensor:
        c = self.cfg
        return sample_timesteps(batch, self.local_rng, shift=c.timestep_shift, t_min=c.min_timestep,
                                t_max=c.max_timestep, num_train_timesteps=c.num_train_timesteps, device=self.device)

    def _eps(self, like: torch.Tensor) -> torch.Tensor:
        return torch.randn(like.shape, generator=self.noise_rng, device=self.noise_rng.device,
                           dtype=torch.float32).to(device=like.device)

    def _clip(self, res):
        return loss_clip(res.video, res.choice.num_frames, self.cfg.loss_frames, self.cfg.frames_per_block,
                         self.reencode)

    # ------------------------------------------------------------------ updates
    def generator_step(self) -> dict:
        c = self.cfg
        self.gen_opt.zero_grad(set_to_none=True)
        ctx = self._prompts(c.batch_size)
        neg = self.prompts.negative_batch(c.batch_size, self.device)
        choice = self.choose("generator")
        with self.autocast():
            res = self.rollout.run(ctx, choice, self.noise, loss_frames=c.loss_frames, grad=True,
                                   cache_noise=c.sf_cache_noise)
            clip, mask = self._clip(res)
            loss, st = generator_loss(clip, mask, critic=self.critic, teacher=self.teacher, cond=ctx, uncond=neg,
                                      t=self._timesteps(c.batch_size), eps=self._eps(clip), guidance=c.guidance_scale)
        loss.backward()
        gnorm = clip_grad_norm(self.generator.parameters(), c.grad_clip)
        self.gen_opt.step()
        self.gen_opt.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.generator)
        self.last_rollout = RolloutResult(res.choice, res.video.detach(), res.final, res.grad_indices, res.records)
        return {"generator_loss": mean_over_ranks(loss.item()), "generator_grad_norm": gnorm,
                "dmd_gap": mean_over_ranks(st["dmd_gap"]), "frames": choice.num_frames, "branch": choice.branch,
                "offset": choice.offset, "grad_forwards": len(res.grad_indices)}

    def critic_step(self) -> dict:
        c = self.cfg
        self.critic_opt.zero_grad(set_to_none=True)
        ctx = self._prompts(c.batch_size)
        choice = self.choose("critic")
        with self.autocast():
            with torch.no_grad():
                res = self.rollout.run(ctx, choice, self.noise, loss_frames=c.loss_frames, grad=False,
                                       cache_noise=c.sf_cache_noise)
                clip, _ = self._clip(res)
            loss = critic_loss(clip, critic=self.critic, cond=ctx, t=self._timesteps(c.batch_size), eps=self._eps(clip))
        loss.backward()
        gnorm = clip_grad_norm(self.critic.parameters(), c.grad_clip)
        self.critic_opt.step()
        self.critic_opt.zero_grad(set_to_none=True)
        return {"critic_loss": mean_over_ranks(loss.item()), "critic_grad_norm": gnorm}

    def train_step(self) -> dict:
        """One iteration (reference ``trainer/distillation.py`` ``train``); returns its stats."""
        c = self.cfg
        t0 = time.perf_counter()
        stats: dict = {"step": self.step}
        if c.lr_warmup_steps or c.lr_decay != "constant":  # functions of the step: a resume continues exactly
            f = min(1.0, (self.step + 1) / c.lr_warmup_steps) if c.lr_warmup_steps else 1.0
            fg = f
            if c.lr_decay == "cosine" and self.step >= c.lr_warmup_steps:
                p = min(1.0, (self.step - c.lr_warmup_steps) / max(1, c.max_steps - c.lr_warmup_steps))
                fg = 0.5 * (1.0 + math.cos(math.pi * p))
            for opt, lr, k in ((self.gen_opt, c.lr, fg), (self.critic_opt, c.lr_critic, f)):
                for gr in opt.param_groups:
                    gr["lr"] = lr * k
        if self.step % c.gen_update_every == 0 and self.step >= c.critic_warmup_steps:
            stats.update(self.generator_step())
        stats.update(self.critic_step())
        self.step += 1
        if self.ema is None and c.ema_decay > 0 and self.step >= c.ema_start_step:
            self.ema = EMA(self.generator, c.ema_decay)
        if c.save_every and self.step % c.save_every == 0:
            self.save()
        stats["time_s"] = time.perf_counter() - t0
        return stats

    def train(self, steps: int | None = None) -> list[dict]:
        steps = self.cfg.max_steps - self.step if steps is None else steps
        history = []
        for _ in range(max(0, steps)):
            st = self.train_step()
            history.append(st)
            if self.info.is_main and self.cfg.log_every and st["step"] % self.cfg.log_every == 0:
                self._log(st)
        return history

    def _log(self, st: dict) -> None:
        if self.log_fn is not None:
            self.log_fn(st)
            return
        line = json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in st.items()})
        print(line, flush=True)
        os.makedirs(self.cfg.output_dir, exist_ok=True)
        with open(os.path.join(self.cfg.output_dir, "log.jsonl"), "a", encoding="utf-8") as f:
            f.write(line + "\n")

    # ------------------------------------------------------------------ checkpoints
    def save(self, directory: str | None = None) -> str:
        """Write ``<dir>/model.pt`` (release layout) and ``<dir>/train_state_rank<r>.pt``; returns the directory."""
        directory = directory or os.path.join(self.cfg.output_dir, f"checkpoint_model_{self.step:06d}")
        return save_checkpoint(self, directory)

    def save_final(self) -> str | None:
        """Save the weights at the current step unless that step is already saved (the end of a run,
        whatever ``save_every`` is, 0 included). Returns the directory written, or None."""
        if self.last_saved_step == self.step:
            return None
        return self.save()

    def load(self, directory: str) -> None:
        load_checkpoint(self, directory)
