"""Training of the toy world's VAE and bidirectional flow-matching teacher on CPU, from a seed.

Data: random scenes rendered on the fly (the VAE) or a cached set of VAE latents of 81-frame clips
(the teacher). Training scenes use even scene seeds, evaluation scenes odd ones, so no evaluation
scene is ever trained on; the teacher additionally never sees :data:`HELD_OUT_CAPTIONS`.
Clip start frames are drawn from [0, T0_RANGE) pixel frames, so the models see every phase of the
(periodic) motions.

The command line is ``scripts/train_toy.py``; this module holds the loops and the evaluations.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..config import PIXEL_FPS, WanConfig
from ..model import build_model
from ..train.dit import WanDiT
from ..train.ema import EMA
from ..train.losses import frame_timesteps, noise_to, sample_timesteps
from . import detect
from .captions import all_captions, parse_caption
from .sampling import sample
from .text import TOKENS, TextEncoder
from .vae import ToyVAE, VAEConfig, count_parameters, pixel_frames
from .world import Scene, from_video, to_video

T0_RANGE = 100_000

HELD_OUT_CAPTIONS = (
    "a red square orbiting on a light background",
    "a green triangle drifting left on a dark background",
    "a blue circle bouncing on a light background",
    "a yellow square drifting right on a dark background",
    "a red triangle bouncing on a dark background",
    "a green circle orbiting on a light background",
    "a blue triangle drifting right on a light background",
    "a yellow circle drifting left on a dark background",
)
"""Attribute combinations the teacher is not trained on (every single attribute value still is)."""

TRAIN_CAPTIONS = tuple(c for c in all_captions() if c not in HELD_OUT_CAPTIONS)
EVAL_CAPTIONS = HELD_OUT_CAPTIONS + TRAIN_CAPTIONS[::len(TRAIN_CAPTIONS) // 16][:16]
"""The default evaluation captions: the held-out combinations and 16 seen ones."""

TEACHER_CONFIG = WanConfig(dim=128, ffn_dim=256, num_heads=4, num_layers=4, freq_dim=64, text_dim=32,
                           text_len=TOKENS)


# ------------------------------------------------------------------------------------------- data
def scene_for(rng: np.random.Generator, captions, split: str) -> Scene:
    """A random scene of one of ``captions``; ``split`` 'train' gives even seeds, 'eval' odd ones."""
    cap = captions[rng.integers(len(captions))]
    seed = 2 * int(rng.integers(2**30)) + (0 if split == "train" else 1)
    return Scene.from_caption(cap, seed=seed)


def clip(scene: Scene, t0: int, latent: int) -> torch.Tensor:
    """[3, 1 + 4(latent - 1), 64, 64] in [-1, 1]: pixel frames t0.. of the scene."""
    return to_video(scene.render(t0, pixel_frames(latent)))[0]


def clip_and_weight(scene: Scene, t0: int, latent: int, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The clip and a [1, T, 64, 64] loss weight: 1 on the background, ``weight`` on object pixels and a
    1-px ring around them (so that bleeding edges cost as much as eroded ones)."""
    frames = scene.render(t0, pixel_frames(latent))
    far = np.abs(frames - scene.background_image()[None]).sum(-1) > 0.05  # [T, H, W]
    far = far | np.roll(far, 1, 1) | np.roll(far, -1, 1) | np.roll(far, 1, 2) | np.roll(far, -1, 2)  # + 1 px ring
    w = torch.from_numpy(1 + (weight - 1) * far.astype(np.float32))[None]
    return to_video(frames)[0], w


def cosine_lr(step: int, total: int, lr: float, warmup: int, min_lr: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * p))


def optimizer_step(opt, loss: torch.Tensor, params, grad_clip: float, step: int, cfg) -> None:
    """Backward and one step of ``opt`` at :func:`cosine_lr` of ``step`` (``cfg``: steps, lr, warmup, min_lr),
    gradients clipped to norm ``grad_clip``."""
    for gr in opt.param_groups:
        gr["lr"] = cosine_lr(step, cfg.steps, cfg.lr, cfg.warmup, cfg.min_lr)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()


def curve_point(curve: list, acc: list, step: int, opt, t_start: float) -> dict:
    """Append {step, mean loss of ``acc`` (then cleared), lr, elapsed_s} to ``curve``; returns it."""
    curve.append({"step": step + 1, "loss": float(np.mean(acc)), "lr": opt.param_groups[0]["lr"],
                  "elapsed_s": round(time.perf_counter() - t_start, 1)})
    acc.clear()
    return curve[-1]


def machine() -> dict:
    import os
    import platform
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "loadavg_at_start": load}


# -------------------------------------------------------------------------------------------- VAE
@dataclass
class VAETrainConfig:
    """Reconstruction training: per step ``clips`` random 17-frame clips (5 latent frames each, so 1
    in 5 groups is a first-frame group). Loss: object-weighted MSE (``loss="l1"``: L1) on pixels in
    [-1, 1] (``object_weight`` on the object and a 1-px ring), decoded from latents with relative
    Gaussian noise ``latent_noise`` (robustness to imperfect DiT samples), plus ``latent_l2`` *
    mean(z^2), plus ``motion_weight`` * MSE of frame-to-frame differences (off: it did not reduce the
    temporal blur of fast motions in a 1200-step trial)."""

    steps: int = 4000
    clips: int = 8
    latent_frames: int = 5
    lr: float = 2e-3
    min_lr: float = 5e-5
    warmup: int = 100
    object_weight: float = 10.0
    latent_noise: float = 0.05
    latent_l2: float = 1e-4
    loss: str = "mse"
    motion_weight: float = 0.0
    stats_clips: int = 256
    eval_scenes: int = 48
    log_every: int = 50
    seed: int = 0
    model: VAEConfig = field(default_factory=VAEConfig)


def train_vae(cfg: VAETrainConfig, log=print) -> tuple[ToyVAE, dict]:
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    caps = all_captions()
    vae = ToyVAE(cfg.model)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    curve, acc, t_start = [], [], time.perf_counter()
    for step in range(cfg.steps):
        pairs = [clip_and_weight(scene_for(rng, caps, "train"), int(rng.integers(T0_RANGE)), cfg.latent_frames,
                                 cfg.object_weight) for _ in range(cfg.clips)]
        video, w = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])  # [B, 3|1, T, H, W]
        g = ToyVAE.groups(video).flatten(0, 1)  # [N, 12, 64, 64]
        wg = ToyVAE.groups(w.expand(-1, 3, -1, -1, -1)).flatten(0, 1)
        z = vae.encode_groups(g)
        zn = z + cfg.latent_noise * z.detach().std(dim=(0, 2, 3), keepdim=True) * torch.randn_like(z)
        rec = vae.decode_groups(zn)
        err = (rec - g).abs() if cfg.loss == "l1" else (rec - g) ** 2
        rec_loss = (wg * err).sum() / wg.sum()
        if cfg.motion_weight:  # frame-to-frame differences inside each group (4 frames x RGB on channels)
            d_rec, d_g = rec[:, 3:] - rec[:, :-3], g[:, 3:] - g[:, :-3]
            w_d = torch.maximum(wg[:, 3:], wg[:, :-3])
            rec_loss = rec_loss + cfg.motion_weight * (w_d * (d_rec - d_g) ** 2).sum() / w_d.sum()
        optimizer_step(opt, rec_loss + cfg.latent_l2 * z.pow(2).mean(), vae.parameters(), 1.0, step, cfg)
        acc.append(rec_loss.item())
        if (step + 1) % cfg.log_every == 0 or step == cfg.steps - 1:
            row = curve_point(curve, acc, step, opt, t_start)
            log(f"vae step {row['step']:5d}  loss {row['loss']:.5f}  lr {row['lr']:.2e}  {row['elapsed_s']:.0f} s")
    train_s = time.perf_counter() - t_start
    vae.eval().requires_grad_(False)
    fit_latent_stats(vae, rng, cfg.stats_clips)
    record = {"config": {**asdict(cfg), "model": cfg.model.to_dict()}, "parameters": count_parameters(vae),
              "train_seconds": round(train_s, 1), "curve": curve}
    return vae, record


@torch.no_grad()
def fit_latent_stats(vae: ToyVAE, rng: np.random.Generator, clips: int, latent: int = 21) -> None:
    """Set the VAE's per-channel latent mean / std from ``clips`` random 81-frame training clips."""
    caps = all_captions()
    vae.latent_mean.zero_(), vae.latent_std.fill_(1.0)
    zs = [vae.encode(torch.stack([clip(scene_for(rng, caps, "train"), int(rng.integers(T0_RANGE)), latent)
                                  for _ in range(min(16, clips - i))])) for i in range(0, clips, 16)]
    z = torch.cat(zs).transpose(0, 1).flatten(1)  # [16, N]
    vae.latent_mean.copy_(z.mean(1))
    vae.latent_std.copy_(z.std(1).clamp_min(1e-3))


@torch.no_grad()
def evaluate_vae(vae: ToyVAE, scenes: int = 48, seed: int = 12345, latent: int = 21) -> dict:
    """Held-out scenes (odd seeds): PSNR (dB, on [0, 1] frames) and detector scores on ground truth
    and on reconstructions; latent statistics; streamed (3 latent frames per call) == one-shot."""
    rng = np.random.default_rng(seed)
    caps = all_captions()
    keys = ("found", "background", "colour", "shape", "motion", "position_within_2px", "position_error_px")
    gt, rec, psnr, lat = [], [], [], []
    stream_equal = True
    for i in range(scenes):
        sc = scene_for(rng, caps, "eval")
        t0 = int(rng.integers(T0_RANGE))
        video = clip(sc, t0, latent)[None]
        z = vae.encode(video)
        out = vae.decode(z)
        if i < 4:
            sd = vae.streaming_decoder()
            streamed = torch.cat([sd.decode(z[:, :, k:k + 3]) for k in range(0, z.shape[2], 3)], dim=2)
            stream_equal &= bool(torch.equal(streamed, out))
        lat.append(z)
        a, b = from_video(video)[0], from_video(out)[0]
        psnr.append(float(10 * np.log10(1.0 / np.mean((a - b) ** 2))))
        gt.append(detect.score(a, sc, t0=t0))
        rec.append(detect.score(b, sc, t0=t0))
    z = torch.cat(lat)
    return {"scenes": scenes, "pixel_frames_per_scene": pixel_frames(latent),
            "psnr_db_mean": float(np.mean(psnr)), "psnr_db_min": float(np.min(psnr)),
            "ground_truth": {k: float(np.mean([s[k] for s in gt])) for k in keys},
            "reconstruction": {k: float(np.mean([s[k] for s in rec])) for k in keys},
            "latent_mean_abs_channel_mean": float(z.mean(dim=(0, 2, 3, 4)).abs().mean()),
            "latent_channel_std": [round(float(s), 3) for s in z.transpose(0, 1).flatten(1).std(1)],
            "streamed_equals_one_shot": stream_equal}


# ---------------------------------------------------------------------------------------- teacher
@dataclass
class TeacherTrainConfig:
    """Flow matching on cached VAE latents of ``dataset_clips`` 81-frame clips (21 latent frames) of
    TRAIN_CAPTIONS: t ~ shifted uniform (shift 5, full 0..1000 range), one t per sample for all its
    frames, x_t = (1 - t/1000) x0 + t/1000 eps, target v = eps - x0. Captions are replaced by the
    empty prompt with probability ``uncond_prob`` (for classifier-free guidance). AdamW with linear
    warmup and cosine decay; EMA (rolling.train.ema) from step ``ema_start``."""

    steps: int = 6000
    batch: int = 8
    lr: float = 3e-3
    min_lr: float = 2e-5
    warmup: int = 300
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    shift: float = 5.0
    uncond_prob: float = 0.1
    ema_decay: float = 0.999
    ema_start: int = 1000
    dataset_clips: int = 5000
    latent_frames: int = 21
    eval_every: int = 2000
    log_every: int = 100
    seed: int = 0
    model: WanConfig = TEACHER_CONFIG


@torch.no_grad()
def encode_dataset(vae: ToyVAE, clips: int, latent: int, seed: int, log=print) -> tuple[torch.Tensor, list[str]]:
    """[clips, 16, latent, 8, 8] float16 latents of random TRAIN_CAPTIONS clips and their captions."""
    rng = np.random.default_rng(seed)
    out, caps, t = [], [], time.perf_counter()
    for i in range(0, clips, 32):
        scenes = [scene_for(rng, TRAIN_CAPTIONS, "train") for _ in range(min(32, clips - i))]
        video = torch.stack([clip(s, int(rng.integers(T0_RANGE)), latent) for s in scenes])
        out.append(vae.encode(video).half())
        caps += [s.caption() for s in scenes]
        if (i // 32) % 50 == 0:
            log(f"  encoded {i + len(scenes)}/{clips} clips  {time.perf_counter() - t:.0f} s")
    return torch.cat(out), caps


def train_teacher(cfg: TeacherTrainConfig, vae: ToyVAE, log=print, dataset=None) -> tuple[torch.nn.Module, dict]:
    """Returns the EMA teacher (a WanModel, eval mode) and the training record. ``dataset``: an
    already encoded (latents, captions) pair (else :func:`encode_dataset` with the config's seed)."""
    torch.manual_seed(cfg.seed)
    text = TextEncoder()
    t_data = time.perf_counter()
    data, caps = dataset if dataset is not None else encode_dataset(vae, cfg.dataset_clips, cfg.latent_frames,
                                                                    cfg.seed, log)
    data_s = time.perf_counter() - t_data
    log(f"dataset: {tuple(data.shape)} in {data_s:.0f} s")
    cap_index = {c: i for i, c in enumerate(TRAIN_CAPTIONS)}
    emb = text.encode_batch(TRAIN_CAPTIONS)  # [C, tokens, dim]
    empty = text.encode("")
    cap_ids = torch.tensor([cap_index[c] for c in caps])

    model = build_model(cfg.model, seed=cfg.seed).requires_grad_(True).train()
    dit = WanDiT(model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    ema = None
    curve, evals, acc = [], [], []
    t_start = time.perf_counter()
    for step in range(cfg.steps):
        idx = torch.randint(0, data.shape[0], (cfg.batch,), generator=gen)
        x0 = data[idx].float()
        ctx = emb[cap_ids[idx]]
        drop = torch.rand(cfg.batch, generator=gen) < cfg.uncond_prob
        ctx = torch.where(drop.view(-1, 1, 1), empty.expand_as(ctx), ctx)
        t = sample_timesteps(cfg.batch, gen, shift=cfg.shift, t_min=0.0, t_max=1000.0)
        eps = torch.randn(x0.shape, generator=gen)
        xt = noise_to(x0, eps, t)
        v = dit(xt, frame_timesteps(t, x0.shape[2]), ctx)
        loss = F.mse_loss(v.float(), eps - x0)
        optimizer_step(opt, loss, model.parameters(), cfg.grad_clip, step, cfg)
        if step + 1 == cfg.ema_start:
            ema = EMA(model, cfg.ema_decay)
        elif ema is not None:
            ema.update(model)
        acc.append(loss.item())
        if (step + 1) % cfg.log_every == 0 or step == cfg.steps - 1:
            row = curve_point(curve, acc, step, opt, t_start)
            log(f"teacher step {row['step']:5d}  loss {row['loss']:.4f}  lr {row['lr']:.2e}  {row['elapsed_s']:.0f} s")
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            probe = ema_model(model, ema, cfg.model)
            te = time.perf_counter()
            r = evaluate_teacher(probe, vae, captions=list(HELD_OUT_CAPTIONS[:4]) + list(TRAIN_CAPTIONS[::11][:8]),
                                 steps=25, guidance=(0.0,))
            evals.append({"step": step + 1, "eval_seconds": round(time.perf_counter() - te, 1),
                          **{k: r["guidance_0"][k] for k in ("all", "held_out", "seen")}})
            log(f"  eval @ {step + 1}: {evals[-1]['all']}")
            t_start += time.perf_counter() - te  # training time excludes the probes
    train_s = time.perf_counter() - t_start
    final = ema_model(model, ema, cfg.model)
    record = {"config": {**asdict(cfg), "model": cfg.model.to_dict()},
              "parameters": sum(p.numel() for p in final.parameters()),
              "dataset": {"clips": int(data.shape[0]), "shape": list(data.shape), "seconds": round(data_s, 1),
                          "captions": len(TRAIN_CAPTIONS), "held_out_captions": list(HELD_OUT_CAPTIONS)},
              "train_seconds": round(train_s, 1), "curve": curve, "evals_during_training": evals}
    return final, record


def ema_model(model: torch.nn.Module, ema: EMA | None, cfg: WanConfig) -> torch.nn.Module:
    """A fresh WanModel (eval, no grad) holding the EMA weights (or the live ones before the EMA)."""
    out = build_model(cfg)
    sd = ema.full_state_dict(model) if ema is not None else {k: v.detach().clone() for k, v in model.state_dict().items()}
    out.load_state_dict(sd, strict=True)
    return out.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------ eval
ATTRS = ("background", "colour", "shape", "motion")


def _clip_labels(frames: np.ndarray) -> dict:
    dets = detect.detect(frames)
    return {**{k: detect.majority(d[k] for d in dets) for k in ATTRS[:3]},
            "motion": detect.majority(detect.detect_motion(dets))}


def score_rows(captions, video) -> list[dict]:
    """Per decoded sample (``video`` [N, T, 64, 64, 3]): its caption, held-out flag, target attributes,
    frame-level scores (:func:`detect.score`) and clip-level (majority) labels."""
    return [{"caption": c, "held_out": c in HELD_OUT_CAPTIONS, "target": parse_caption(c),
             "frame": detect.score(fr, c), "clip": _clip_labels(fr)} for c, fr in zip(captions, video)]


def split_summary(rows: list[dict]) -> dict:
    """:func:`_summary` of all rows, of the held-out captions' and of the seen ones'."""
    return {"all": _summary(rows), "held_out": _summary([r for r in rows if r["held_out"]]),
            "seen": _summary([r for r in rows if not r["held_out"]])}


def _summary(rows: list[dict]) -> dict:
    if not rows:
        return {}
    out = {k: round(float(np.mean([r["frame"][k] for r in rows])), 4) for k in ATTRS + ("found", "spatial_correlation")}
    out.update({f"clip_{k}": round(float(np.mean([r["clip"][k] == r["target"][k] for r in rows])), 4) for k in ATTRS})
    out["clip_all_four"] = round(float(np.mean([all(r["clip"][k] == r["target"][k] for k in ATTRS) for r in rows])), 4)
    out["samples"] = len(rows)
    return out


@torch.no_grad()
def evaluate_teacher(model, vae: ToyVAE, captions=None, *, samples_per_caption: int = 1, steps: int = 50,
                     shift: float = 5.0, guidance=(0.0, 2.0, 4.0), frames: int = 21, seed: int = 777,
                     batch: int = 16) -> dict:
    """Sample ``captions`` (default: the held-out ones + 16 seen ones) from noise with ``steps`` Euler
    steps, decode, run the detectors. Per guidance value: frame-level accuracy per attribute (motion:
    per 2-s window), clip-level accuracy (majority label), mean spatial correlation; split into
    held-out and seen captions; latent correlation (:func:`detect.latent_correlation`) of the samples.
    Baselines: static noise frames, decoded random latents, latents of real clips."""
    text = TextEncoder()
    captions = [c for c in (EVAL_CAPTIONS if captions is None else captions) for _ in range(samples_per_caption)]
    empty = text.encode("")
    res: dict = {"captions": len(set(captions)), "samples": len(captions), "steps": steps, "shift": shift,
                 "latent_frames": frames, "pixel_frames": pixel_frames(frames),
                 "seconds_per_sample": pixel_frames(frames) / PIXEL_FPS}
    t0 = time.perf_counter()
    for g in guidance:
        rows, lat = [], []
        for i in range(0, len(captions), batch):
            cs = captions[i:i + batch]
            z = sample(model, text.encode_batch(cs), empty, frames=frames, steps=steps, shift=shift,
                       guidance=g, seed=seed + i)
            lat.append(detect.latent_correlation(z))
            rows += score_rows(cs, from_video(vae.decode(z)))
        res[f"guidance_{g:g}"] = {**split_summary(rows),
                                  "latent_correlation": {k: round(float(np.mean([c[k] for c in lat])), 4)
                                                         for k in ("spatial", "temporal")},
                                  "per_sample": [{"caption": r["caption"], "detected": r["clip"],
                                                  "spatial_correlation": round(r["frame"]["spatial_correlation"], 4)}
                                                 for r in rows]}
    res["sampling_seconds"] = round(time.perf_counter() - t0, 1)
    rng = np.random.default_rng(seed)
    noise_frames = rng.random((pixel_frames(frames), 64, 64, 3)).astype(np.float32)
    rand_lat = from_video(vae.decode(torch.randn(1, 16, frames, 8, 8, generator=torch.Generator().manual_seed(seed))))[0]
    real = torch.stack([clip(scene_for(rng, TRAIN_CAPTIONS, "eval"), int(rng.integers(T0_RANGE)), frames)
                        for _ in range(8)])
    res["baselines"] = {
        "static_noise_frames": {k: round(float(v), 4) for k, v in detect.score(noise_frames, captions[0]).items()},
        "decoded_random_latents": {**{k: round(float(v), 4) for k, v in detect.score(rand_lat, captions[0]).items()},
                                   "latent_correlation": detect.latent_correlation(torch.randn(8, 16, frames, 8, 8))},
        "encoded_real_clips": {"latent_correlation": detect.latent_correlation(vae.encode(real))}}
    return res
