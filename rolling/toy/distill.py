"""The toy world's causal few-step student: ODE initialisation, then Rolling Forcing DMD with the
project's own trainer (:mod:`rolling.train`), on CPU, from a seed.

Student: the teacher's :class:`WanConfig`, initialised from the teacher's weights and run causally
(the rolling schedule: 3-latent-frame blocks, a window of T = 5 blocks at staggered noise levels,
attention sink + previous block + window = 21 frames, clean K/V written by update passes), with the
release's denoising steps :data:`STUDENT_STEPS` = (1000, 800, 600, 400, 200) warped through the
shift-5 table to timesteps [1000, 952.4, 882.4, 769.2, 555.6] (sigma = t / 1000). The toy's geometry
is the release's in latent frames (21-frame loss window = the teacher's 81-pixel-frame clips); only
the frame is smaller (8x8 latents, 16 tokens).

1. **ODE init** (:func:`ode_pairs`, :func:`ode_init`), as CausVid / Self-Forcing / Rolling Forcing do
   before DMD: the teacher samples 21-frame clips with CFG from noise (Euler on the 50-step shift-5
   grid merged with the student's sigmas, so every trajectory passes through each of them exactly),
   which gives per clip the states x_{sigma_j} (j = 0..T-1; x_{sigma_0 = 1} is the noise) and the
   endpoint x0. The student is regressed onto x0 *teacher-forced through the rolling schedule*: every
   forward of a rolling run (the same plans, cache and read rules as inference) gets, for a block at
   step j, that block's trajectory state x_{sigma_j}, and, for a clean-cache write, the teacher's x0;
   loss = mean over forwards and blocks of MSE(student x0, teacher x0).
2. **DMD** (:func:`dmd`): :class:`rolling.train.trainer.Trainer` with generator = the ODE-init
   student, real score = the teacher with CFG, fake score (critic) = the teacher's weights; the toy's
   captions (text encoder) as prompts and the empty caption as the negative prompt.

Evaluation (:func:`distances`, :func:`evaluate_student`): the student's few-step rolling samples vs
the teacher's 50-step CFG samples (guidance 2) from the same initial noise and caption on 16 fixed
captions (8 held out) and seeds: the latent Frechet distance (:func:`frechet`, distributions: what DMD
minimises, the headline), the mean squared latent distance per element with the re-noise draws tied
to the initial noise (``mse``: per-noise, deterministic like the teacher's ODE) and with fresh
re-noise draws (``mse_fresh``; it *rises* as samples get sharper, since a blurry mean is closer in
MSE to any sample than a sharp sample is); and the detectors' accuracies
(:func:`rolling.toy.training.evaluate_teacher`'s protocol) on decoded frames.

Shapes: latents [B, 16, F, 8, 8] (normalised latent space, F latent frames); text [B, 16, 32].
"""
from __future__ import annotations

import copy
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field  # noqa: F401 (asdict re-exported)

import numpy as np
import torch
import torch.nn.functional as F

from ..config import REFERENCE_STEPS, RollingConfig
from ..flow import Steps
from ..model import WanModel, build_model
from ..schedule import forwards
from ..train.cache import TrainKVCache
from ..train.dit import WanDiT
from ..train.rollout import Rollout, RolloutChoice
from . import detect
from .sampling import flow_sigmas
from .text import TextEncoder
from .training import (ATTRS, EVAL_CAPTIONS, HELD_OUT_CAPTIONS, TEACHER_CONFIG, TRAIN_CAPTIONS, curve_point,
                       optimizer_step, score_rows, split_summary)
from .vae import ToyVAE, pixel_frames
from .world import from_video

STUDENT_STEPS = REFERENCE_STEPS
"""Nominal denoising steps of the student (the release's list; warped through the shift-5 table)."""
FRAMES_PER_BLOCK = 3
LATENT_FRAMES = 21  # the teacher's clip length (81 pixel frames) = the DMD loss window
SHIFT = 5.0


def student_rolling_config(steps=STUDENT_STEPS) -> RollingConfig:
    """The student's sampler geometry (the release's: 3-frame blocks, 21-frame span, 24-frame cache)."""
    return RollingConfig(steps=tuple(steps), shift=SHIFT, frames_per_block=FRAMES_PER_BLOCK)


def student_sigmas(steps=STUDENT_STEPS) -> list[float]:
    """The student's noise levels sigma_j (float, 0..1) for its warped timesteps."""
    return list(Steps(steps, SHIFT, FRAMES_PER_BLOCK).sigma)


# ------------------------------------------------------------------------------------ ODE pairs
@torch.no_grad()
def ode_pairs(teacher: torch.nn.Module, context: torch.Tensor, uncond: torch.Tensor, noise: torch.Tensor, *,
              sigmas: list[float], steps: int = 50, shift: float = SHIFT, guidance: float = 2.0,
              batch: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher CFG trajectories from ``noise`` [N, 16, F, H, W] with ``context`` [N, tokens, dim].

    Euler integration of v = v_c + g (v_c - v_u) over the ``steps``-step shifted grid merged with
    ``sigmas`` (the student's levels, descending, sigmas[0] = 1). Returns (states [N, len(sigmas), 16,
    F, H, W]: x at each of ``sigmas``, x0 [N, 16, F, H, W]: the endpoint at sigma 0)."""
    if not sigmas or abs(sigmas[0] - 1.0) > 1e-6 or any(a <= b for a, b in zip(sigmas, sigmas[1:])):
        raise ValueError(f"sigmas must be strictly decreasing and start at 1, got {sigmas}")
    if noise.shape[0] != context.shape[0]:
        raise ValueError(f"noise ({noise.shape[0]}) and context ({context.shape[0]}) batch sizes differ")
    grid = sorted({round(s, 9) for s in [*flow_sigmas(steps, shift), *sigmas]}, reverse=True)
    want = {round(s, 9): j for j, s in enumerate(sigmas)}
    dit = teacher if isinstance(teacher, WanDiT) else WanDiT(teacher)
    states, ends = [], []
    for i in range(0, noise.shape[0], batch):
        x = noise[i:i + batch].float().clone()
        ctx = torch.cat([context[i:i + batch].float(), uncond.float().expand(x.shape[0], -1, -1)])
        got = [None] * len(sigmas)
        for s0, s1 in zip(grid[:-1], grid[1:]):
            if s0 in want:
                got[want[s0]] = x.clone()
            vc, vu = dit(torch.cat([x, x]), [1000.0 * s0] * x.shape[2], ctx).float().chunk(2)
            x = x + (s1 - s0) * (vc + guidance * (vc - vu))
        states.append(torch.stack(got, 1))
        ends.append(x)
    return torch.cat(states), torch.cat(ends)


# ------------------------------------------------------------------- teacher-forced rolling pass
def teacher_forced_loss(student: WanDiT, cache: TrainKVCache, steps: Steps, states: torch.Tensor,
                        x0: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """ODE-regression loss of one batch through the rolling schedule (module docstring, 1.).

    ``states`` [B, T, 16, F, H, W] (x at the student's sigmas), ``x0`` [B, 16, F, H, W] (the teacher's
    endpoints), ``context`` [B, tokens, dim]. Every denoising forward runs with autograd; clean-cache
    writes (of the teacher's x0) run without. Returns the mean over denoising forwards of the MSE
    between the student's x0 and the teacher's x0 (float32 scalar)."""
    fb, T = steps.fb, len(steps)
    f_total = x0.shape[2]
    if f_total % fb or states.shape[1] != T:
        raise ValueError(f"need F divisible by {fb} and {T} states per clip, got F={f_total}, "
                         f"states {list(states.shape)}")
    nb = f_total // fb
    blk = lambda t, b: t[:, :, b * fb:(b + 1) * fb]  # noqa: E731
    cache.reset()
    losses = []
    for f in forwards("rolling", T, nb, writes="needed"):
        xs = [blk(x0, b) for b in f.clean] + [blk(states[:, j], b) for b, j in zip(f.blocks, f.steps)]
        x = torch.cat(xs, dim=2)
        plan = cache.plan(f)
        with torch.set_grad_enabled(bool(f.blocks) and torch.is_grad_enabled()):
            v = student(x, steps.timesteps(f), context, plan=plan, cache=cache)
        cache.commit(plan)
        if f.blocks:
            nc = len(f.clean) * fb
            pred = steps.denoise(x[:, :, nc:], v[:, :, nc:], f.steps)
            target = torch.cat([blk(x0, b) for b in f.blocks], dim=2)
            losses.append(F.mse_loss(pred.float(), target.float()))
    return torch.stack(losses).mean()


def new_cache(arch, rcfg: RollingConfig, batch: int, height: int = 8, width: int = 8) -> TrainKVCache:
    """A training KV cache for ``batch`` clips (capacity: the longest rollout, no eviction)."""
    return TrainKVCache(rcfg.with_(capacity_frames=max(rcfg.capacity_frames, 27)), num_layers=arch.num_layers,
                        num_heads=arch.num_heads, head_dim=arch.head_dim, batch=batch,
                        grid=(height // arch.patch_size[1], width // arch.patch_size[2]), device="cpu",
                        dtype=torch.float32)


# ------------------------------------------------------------------------------------- sampling
RENOISE = ("fresh", "initial")


class _InitialNoise:
    """Noise source for the student's rolling sampler: block b's fresh noise at step 0 is the given
    initial noise's frames of block b (so student and teacher start from the same noise); re-noise
    draws are seeded from (seed, block, step) (``renoise="fresh"``, as at inference) or are the
    block's initial noise again (``"initial"``: the sample is a deterministic function of the initial
    noise, the way an ODE sample is, so per-noise distances to the teacher mean something)."""

    def __init__(self, initial: torch.Tensor, seed: int, frames_per_block: int = FRAMES_PER_BLOCK,
                 renoise: str = "fresh"):
        if renoise not in RENOISE:
            raise ValueError(f"renoise must be one of {RENOISE}, got {renoise!r}")
        self.initial, self.seed, self.fb, self.renoise = initial, int(seed), frames_per_block, renoise

    def __call__(self, block, step, shape, device, dtype):
        if step == 0 or self.renoise == "initial":
            out = self.initial[:, :, block * self.fb:(block + 1) * self.fb]
            if tuple(out.shape) != tuple(shape):
                raise ValueError(f"initial noise gives {list(out.shape)} for block {block}, the sampler wants "
                                 f"{list(shape)}")
            return out.to(device=device, dtype=dtype)
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + block * 1009 + step * 7 + 5) % 2**63)
        return torch.randn(shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)


@torch.no_grad()
def student_sample(student: torch.nn.Module, context: torch.Tensor, noise: torch.Tensor, *, seed: int = 0,
                   rcfg: RollingConfig | None = None, renoise: str = "fresh") -> torch.Tensor:
    """The student's rolling samples [B, 16, F, H, W] (each block's last-step x0, i.e. the inference
    output) from initial ``noise`` [B, 16, F, H, W] (F a multiple of 3) with ``context`` [B, tokens, dim];
    ``renoise``: see :class:`_InitialNoise`."""
    rcfg = rcfg or student_rolling_config()
    dit = student if isinstance(student, WanDiT) else WanDiT(student)
    b, _, f, h, w = noise.shape
    ro = Rollout(dit, rcfg.with_(capacity_frames=max(rcfg.capacity_frames, f)), height=h, width=w, batch=b,
                 device="cpu")
    return ro.run(context.float(), RolloutChoice(f, "rolling", 0), _InitialNoise(noise.float(), seed, renoise=renoise),
                  loss_frames=f, grad=False).final


# ------------------------------------------------------------------------------------ eval set
@dataclass
class EvalSet:
    """Fixed held-out evaluation: ``captions`` (len N), ``context`` [N, 16, 32], ``noise`` [N, 16, F, 8, 8]
    and the teacher's 50-step CFG samples ``reference`` [N, 16, F, 8, 8] from that noise."""

    captions: list
    context: torch.Tensor
    noise: torch.Tensor
    reference: torch.Tensor
    seed: int
    guidance: float
    teacher_steps: int


def eval_captions(n: int = 8) -> list[str]:
    """Half held-out combinations (never seen by the teacher), half seen ones, deterministic."""
    seen = list(TRAIN_CAPTIONS[::max(1, len(TRAIN_CAPTIONS) // 16)])
    return (list(HELD_OUT_CAPTIONS[:(n + 1) // 2]) + seen[:n // 2])[:n]


@torch.no_grad()
def make_eval_set(teacher, captions: list[str], *, seed: int = 4242, guidance: float = 2.0, steps: int = 50,
                  frames: int = LATENT_FRAMES) -> EvalSet:
    text = TextEncoder()
    ctx = text.encode_batch(captions)
    noise = torch.randn(len(captions), 16, frames, 8, 8, generator=torch.Generator().manual_seed(seed))
    _, ref = ode_pairs(teacher, ctx, text.encode(""), noise, sigmas=[1.0], steps=steps, guidance=guidance)
    return EvalSet(list(captions), ctx, noise, ref, seed, guidance, steps)


def frechet(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussian fits (mean, 16x16 covariance) of the per-token channel vectors
    of two latent sets [B, C, F, H, W] (a latent-space analogue of FID; also the measure of tests/test_train_gap.py)."""
    c = a.shape[1]
    a = a.permute(0, 2, 3, 4, 1).reshape(-1, c).double()
    b = b.permute(0, 2, 3, 4, 1).reshape(-1, c).double()
    m1, m2, s1, s2 = a.mean(0), b.mean(0), torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(s1)
    r1 = v @ torch.diag(w.clamp(min=0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(r1 @ s2 @ r1).clamp(min=0).sqrt().sum()
    return float(((m1 - m2) ** 2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * cross)


@torch.no_grad()
def distances(student, ev: EvalSet) -> dict:
    """Distances of the student's rolling samples to the teacher's 50-step CFG samples (``ev``: same
    captions, same initial noise): ``mse`` = mean squared latent distance per element (normalised latent
    space) with the re-noise draws equal to the initial noise (a deterministic map noise -> sample like
    the teacher's ODE); ``mse_fresh`` = the same with fresh re-noise draws (as at inference);
    ``frechet`` = :func:`frechet` between the fresh-noise samples and the teacher's."""
    z_det = student_sample(student, ev.context, ev.noise, seed=ev.seed, renoise="initial")
    z = student_sample(student, ev.context, ev.noise, seed=ev.seed, renoise="fresh")
    return _distances(z_det, z, ev.reference)


def _distances(z_det: torch.Tensor, z: torch.Tensor, ref: torch.Tensor) -> dict:
    return {"mse": float(((z_det - ref) ** 2).mean()), "mse_fresh": float(((z - ref) ** 2).mean()),
            "frechet": frechet(z, ref)}


@torch.no_grad()
def attribute_accuracy(latents: torch.Tensor, captions: list[str], vae: ToyVAE) -> dict:
    """Decode latents [N, 16, F, 8, 8] and score them with the detectors (frame level; clip level =
    majority label), as in :func:`rolling.toy.training.evaluate_teacher`."""
    return split_summary(score_rows(captions, from_video(vae.decode(latents))))


@torch.no_grad()
def evaluate_student(student, vae: ToyVAE, teacher=None, captions=None, *, samples_per_caption: int = 2,
                     guidance: float = 2.0, seed: int = 777, batch: int = 16, frames: int = LATENT_FRAMES) -> dict:
    """The student's rolling samples of ``captions`` (default: evaluate_teacher's 24) decoded and
    scored; with ``teacher``, the teacher's 50-step CFG samples from the same noise too, and their
    mean squared latent distance."""
    text = TextEncoder()
    caps = [c for c in (EVAL_CAPTIONS if captions is None else captions) for _ in range(samples_per_caption)]
    zs, zt, zd = [], [], []
    t0 = time.perf_counter()
    for i in range(0, len(caps), batch):
        cs = caps[i:i + batch]
        ctx = text.encode_batch(cs)
        noise = torch.randn(len(cs), 16, frames, 8, 8, generator=torch.Generator().manual_seed(seed + i))
        zs.append(student_sample(student, ctx, noise, seed=seed + i))
        if teacher is not None:
            zd.append(student_sample(student, ctx, noise, seed=seed + i, renoise="initial"))
            zt.append(ode_pairs(teacher, ctx, text.encode(""), noise, sigmas=[1.0], guidance=guidance)[1])
    z = torch.cat(zs)
    out = {"samples": len(caps), "captions": len(set(caps)), "latent_frames": frames,
           "pixel_frames": pixel_frames(frames), "sampling_seconds": round(time.perf_counter() - t0, 1),
           "student": {**attribute_accuracy(z, caps, vae), "latent_correlation": detect.latent_correlation(z)}}
    if teacher is not None:
        ref = torch.cat(zt)
        out["teacher"] = {**attribute_accuracy(ref, caps, vae), "latent_correlation": detect.latent_correlation(ref),
                          "guidance": guidance, "steps": 50}
        out["distances"] = _distances(torch.cat(zd), z, ref)
    return out


# ------------------------------------------------------------------------------------ configs
def _require_int(cfg, name: str, low: int) -> None:
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        what = "a positive integer" if low == 1 else f"an integer >= {low}"
        raise ValueError(f"{type(cfg).__name__}.{name} must be {what}, got {v!r}")


@dataclass
class ODEInitConfig:
    """ODE initialisation: ``trajectories`` teacher CFG (``guidance``) trajectories of 21-frame clips
    of TRAIN_CAPTIONS with ``teacher_steps`` Euler steps, then ``steps`` AdamW steps of ``batch``
    clips of teacher-forced rolling regression (lr warm-up ``warmup`` steps, cosine to ``min_lr``)."""

    trajectories: int = 192
    teacher_steps: int = 50
    guidance: float = 2.0
    steps: int = 200
    batch: int = 8
    lr: float = 5e-4
    min_lr: float = 2e-5
    warmup: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        for name in ("trajectories", "teacher_steps", "steps", "batch"):
            _require_int(self, name, 1)
        if self.batch > self.trajectories:
            raise ValueError(f"ODEInitConfig.batch ({self.batch}) must be <= trajectories ({self.trajectories})")
        if not (self.lr >= 0 and self.min_lr >= 0 and self.warmup >= 0):
            raise ValueError(f"ODEInitConfig lr ({self.lr}), min_lr ({self.min_lr}), warmup ({self.warmup}) must be >= 0")


@dataclass
class DMDConfig:
    """DMD with :class:`rolling.train.trainer.Trainer` (fields map onto :class:`TrainConfig`): ``steps``
    iterations of ``batch`` prompts, a generator update every ``gen_update_every``-th iteration
    (critic every one), teacher CFG ``guidance``, rollouts of ``rollout_frames`` latent frames (loss on
    the last 21), Rolling-Forcing rollouts with probability ``rolling_prob`` (else Self-Forcing).

    Convergence (bench/results/toy_world.md, "Student"): with the reference's recipe scaled up (generator
    lr 2e-5, critic lr 1e-4, Adam betas (0, 0.999), no warm-up) the latent Frechet distance to the
    teacher's samples fell for ~125 iterations, then rose past its start by iteration 300 (the known
    "DMD gap falls, then rises" symptom): with beta1 = 0 every generator step has the size of the
    learning rate whatever the signal-to-noise of the batch-4 DMD gradient, so once the signal is small
    the generator random-walks away. Defaults: generator lr 8e-6 with beta1 0.9 (the noisy DMD
    gradient is averaged over ~10 generator steps), a critic 20x faster than the generator (lr 2e-4,
    5 critic updates per generator update), the first 25 iterations critic-only (the critic first
    fits the ODE-init student instead of chasing it) and a 50-iteration linear lr warm-up."""

    steps: int = 800
    batch: int = 4
    lr: float = 8e-6
    lr_critic: float = 2e-4
    gen_update_every: int = 5
    guidance: float = 2.0
    rollout_frames: tuple = (21, 24, 27)
    rolling_prob: float = 0.5
    grad_clip: float = 10.0
    ema_decay: float = 0.0
    ema_start_step: int = 200
    warmup: int = 50
    critic_warmup: int = 25
    betas: tuple = (0.9, 0.999)
    betas_critic: tuple = (0.0, 0.999)
    lr_decay: str = "cosine"

    def __post_init__(self) -> None:
        _require_int(self, "steps", 0)
        _require_int(self, "batch", 1)
        # the rest (lrs, ratio, rollout lengths, warm-ups, lr_decay) is validated by TrainConfig


@dataclass
class StudentTrainConfig:
    """The whole student recipe (ODE init, then DMD) and its evaluation cadence."""

    seed: int = 0
    ode: ODEInitConfig = field(default_factory=ODEInitConfig)
    dmd: DMDConfig = field(default_factory=DMDConfig)
    eval_captions: int = 16
    eval_every_ode: int = 50
    eval_every_dmd: int = 25
    accuracy_every_dmd: int = 100
    control: bool = False  # True: DMD with generator lr 0 (the control run)

    def to_dict(self) -> dict:
        return {**asdict(self), "model": TEACHER_CONFIG.to_dict(), "student_steps": list(STUDENT_STEPS)}


# ------------------------------------------------------------------------------------ ODE init
def causal_student_from(teacher: WanModel) -> WanModel:
    """A trainable copy of the teacher's weights (the student starts as the teacher, run causally)."""
    return copy.deepcopy(teacher).float().train().requires_grad_(True)


def ode_init(student: WanModel, teacher: WanModel, cfg: ODEInitConfig, *, seed: int = 0, ev: EvalSet | None = None,
             eval_every: int = 50, log=print) -> dict:
    """Regress ``student`` (in place) onto teacher ODE trajectories; returns the record (curves, seconds)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed + 11)
    text = TextEncoder()
    caps = [TRAIN_CAPTIONS[i] for i in rng.integers(len(TRAIN_CAPTIONS), size=cfg.trajectories)]
    ctx = text.encode_batch(caps)
    noise = torch.randn(cfg.trajectories, 16, LATENT_FRAMES, 8, 8, generator=torch.Generator().manual_seed(seed + 13))
    t0 = time.perf_counter()
    states, x0 = ode_pairs(teacher, ctx, text.encode(""), noise, sigmas=student_sigmas(), steps=cfg.teacher_steps,
                           guidance=cfg.guidance)
    data_s = time.perf_counter() - t0
    log(f"ode pairs: {cfg.trajectories} trajectories x {cfg.teacher_steps} teacher steps in {data_s:.0f} s")
    dit = WanDiT(student)
    dit.requires_grad_(True)
    steps = Steps(STUDENT_STEPS, SHIFT, FRAMES_PER_BLOCK)
    cache = new_cache(dit.arch, student_rolling_config(), cfg.batch)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    g = torch.Generator().manual_seed(seed + 17)
    curve, dist_curve, acc, t1 = [], [], [], time.perf_counter()
    if ev is not None:
        dist_curve.append({"step": 0, **distances(student, ev), "elapsed_s": 0.0})
        log(f"ode step     0  {_fmt(dist_curve[-1])}")
    for step in range(cfg.steps):
        idx = torch.randint(cfg.trajectories, (cfg.batch,), generator=g)
        loss = teacher_forced_loss(dit, cache, steps, states[idx], x0[idx], ctx[idx])
        optimizer_step(opt, loss, student.parameters(), cfg.grad_clip, step, cfg)
        acc.append(loss.item())
        if (step + 1) % 10 == 0 or step == cfg.steps - 1:
            curve_point(curve, acc, step, opt, t1)
        if ev is not None and ((step + 1) % eval_every == 0 or step == cfg.steps - 1):
            dist_curve.append({"step": step + 1, **distances(student, ev),
                               "elapsed_s": round(time.perf_counter() - t1, 1)})
            log(f"ode step {step + 1:5d}  loss {curve[-1]['loss']:.4f}  {_fmt(dist_curve[-1])}  "
                f"{dist_curve[-1]['elapsed_s']:.0f} s")
    student.eval().requires_grad_(False)
    return {"config": asdict(cfg), "data_seconds": round(data_s, 1), "train_seconds": round(time.perf_counter() - t1, 1),
            "loss_curve": curve, "distance_curve": dist_curve}


# ------------------------------------------------------------------------------------ DMD
def train_config(cfg: DMDConfig, *, generator_ckpt: str, teacher_ckpt: str, seed: int, control: bool = False,
                 model_config=None, latent_size: tuple[int, int] = (8, 8)):
    """The :class:`rolling.train.config.TrainConfig` of the toy DMD run (CPU, fp32). ``model_config``
    (default: the teacher's :data:`TEACHER_CONFIG`) is used for generator, critic and teacher alike, so
    the critic starts from ``teacher_ckpt``; ``latent_size`` (H, W) in latents."""
    from ..train.config import TrainConfig
    mc = (model_config or TEACHER_CONFIG).to_dict()
    return TrainConfig(generator=mc, critic=mc, teacher=mc, generator_ckpt=generator_ckpt, teacher_ckpt=teacher_ckpt,
                       critic_ckpt=None, latent_height=latent_size[0], latent_width=latent_size[1],
                       text_tokens=16, batch_size=cfg.batch,
                       denoising_steps=tuple(STUDENT_STEPS), timestep_shift=SHIFT, frames_per_block=FRAMES_PER_BLOCK,
                       rollout_frames=tuple(cfg.rollout_frames), loss_frames=LATENT_FRAMES,
                       rolling_prob=cfg.rolling_prob, guidance_scale=cfg.guidance,
                       lr=0.0 if control else cfg.lr, lr_critic=cfg.lr_critic, grad_clip=cfg.grad_clip,
                       gen_update_every=cfg.gen_update_every, ema_decay=cfg.ema_decay,
                       ema_start_step=cfg.ema_start_step, lr_warmup_steps=cfg.warmup,
                       critic_warmup_steps=cfg.critic_warmup, betas=tuple(cfg.betas),
                       betas_critic=tuple(cfg.betas_critic), lr_decay=cfg.lr_decay,
                       max_steps=cfg.steps, seed=seed, output_dir=os.path.join(tempfile.gettempdir(), "toy_student_dmd"),
                       save_every=0, log_every=0, device="cpu", mixed_precision=False, teacher_dtype="fp32",
                       gradient_checkpointing=False, attention="sdpa")


def toy_prompts():
    """A :class:`PromptBank` of the TRAIN_CAPTIONS' embeddings [88, 16, 32], negative = the empty caption."""
    from ..train.data import PromptBank
    text = TextEncoder()
    return PromptBank(text.encode_batch(list(TRAIN_CAPTIONS)), text.encode("")[0])


def dmd(generator_ckpt: str, teacher_ckpt: str, cfg: DMDConfig, *, seed: int = 0, control: bool = False,
        ev: EvalSet | None = None, vae: ToyVAE | None = None, eval_every: int = 25, accuracy_every: int = 100,
        log=print, model_config=None, latent_size: tuple[int, int] = (8, 8), prompts=None):
    """Run ``cfg.steps`` DMD iterations from the weight files ``generator_ckpt`` (the ODE-init student)
    and ``teacher_ckpt`` (teacher and critic init); ``control`` = generator lr 0. With ``ev``, the
    distance every ``eval_every`` iterations (and with ``vae`` the detector accuracies every
    ``accuracy_every``). Returns (the trainer, a record: per-iteration stats, curves, seconds)."""
    from ..train.trainer import Trainer
    tc = train_config(cfg, generator_ckpt=generator_ckpt, teacher_ckpt=teacher_ckpt, seed=seed, control=control,
                      model_config=model_config, latent_size=latent_size)
    tr = Trainer(tc, prompts=prompts or toy_prompts(), log=lambda st: None)
    gen_model = tr.generator.model
    stats, dist_curve, acc_curve, eval_s, t0 = [], [], [], 0.0, time.perf_counter()

    def evaluate(step):
        nonlocal eval_s
        te = time.perf_counter()
        gen_model.eval()
        row = {"step": step, **distances(gen_model, ev), "elapsed_s": round(te - t0 - eval_s, 1)}
        if vae is not None and accuracy_every and step % accuracy_every == 0:
            z = student_sample(gen_model, ev.context, ev.noise, seed=ev.seed)  # fresh re-noise, as at inference
            a = attribute_accuracy(z, ev.captions, vae)["all"]
            row["accuracy"] = {k: a[k] for k in ATTRS + ("found",)}
            acc_curve.append({"step": step, **row["accuracy"]})
        dist_curve.append(row)
        eval_s += time.perf_counter() - te
        recent = [s for s in stats[-eval_every:] if "dmd_gap" in s]
        gap = np.mean([s["dmd_gap"] for s in recent]) if recent else float("nan")
        crit = np.mean([s["critic_loss"] for s in stats[-eval_every:]]) if stats else float("nan")
        log(f"dmd step {step:5d}  {_fmt(row)}  dmd_gap {gap:.4f}  critic {crit:.4f}"
            + (f"  acc {row['accuracy']}" if "accuracy" in row else "") + f"  {row['elapsed_s']:.0f} s")

    if ev is not None:
        evaluate(0)
    for _ in range(cfg.steps):
        st = tr.train_step()
        stats.append({k: (round(v, 6) if isinstance(v, float) else v) for k, v in st.items()})
        if ev is not None and (tr.step % eval_every == 0 or tr.step == cfg.steps):
            evaluate(tr.step)
    return tr, {"config": asdict(cfg), "control": control, "train_config": _jsonable(tc.to_dict()),
                "train_seconds": round(time.perf_counter() - t0 - eval_s, 1), "eval_seconds": round(eval_s, 1),
                "stats": stats, "distance_curve": dist_curve, "accuracy_curve": acc_curve}


def _fmt(row: dict) -> str:
    return f"mse {row['mse']:.4f}  mse_fresh {row['mse_fresh']:.4f}  frechet {row['frechet']:.4f}"


def _jsonable(d):
    if isinstance(d, dict):
        return {k: _jsonable(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_jsonable(v) for v in d]
    return d


def student_weights(tr) -> WanModel:
    """The trained generator's weights (EMA if the run has one) as a fresh eval WanModel."""
    sd = tr.ema.full_state_dict(tr.generator) if tr.ema is not None else tr.generator.state_dict()
    sd = {k[len("model."):] if k.startswith("model.") else k: v.detach().clone().float() for k, v in sd.items()}
    m = build_model(tr.cfg.model_config("generator"))
    m.load_state_dict(sd, strict=True)
    return m.eval().requires_grad_(False)
