"""Quality benchmarks on the toy world (``python -m rolling bench quality``): the causal few-step toy
student sampled through the real sampler (:class:`rolling.sampler.RollingSampler`, the schedules of
:mod:`rolling.schedule`, the prompt schedules of :mod:`rolling.prompts`), decoded with the toy VAE and
scored with the toy detectors (:mod:`rolling.toy.detect`).

Benchmarks (one function each; every one returns a JSON-able dict with its settings and wall times):

* :func:`bench_drift`: attribute accuracy per minute over a long video, ``rolling`` vs ``chunk_causal``
  (Self-Forcing's schedule) on the same weights;
* :func:`bench_teacher`: the bidirectional many-step teacher (81 frames) vs the student (81 frames);
* :func:`bench_switch`: prompt switches (cut / blend / recache keep_sink, new_sink, reanchor; applies
  entering / window): blocks until the new prompt's attributes show, the jump at the switch, accuracy after;
* :func:`bench_rope`: the RoPE position modes (``reference``, ``relative``) in runs past 1,024 latent frames.

Units: time buckets are seconds of video at 16 fps; a bucket holds the latent frames whose first pixel
frame falls in it (latent frame l >= 1 shows pixel frames 4l-3 .. 4l). Accuracies are the detector's
frame-level fractions (motion: per 2-s window) from :func:`rolling.toy.detect.score`; ``latent_spatial``
and ``latent_temporal`` are :func:`rolling.toy.detect.latent_correlation` of the bucket's latents
(static latent noise: ~0; VAE latents of real clips: 0.43 / 0.77).

The causal model is the toy student (``rolling.toy.load_student``) when its weights exist; otherwise the
bidirectional teacher run causally with the reference steps stands in, and every result says so
(``model.name``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from .config import PIXEL_FPS, REFERENCE_STEPS, RollingConfig
from .prompts import PromptSchedule, TimedPrompt, schedule_from_times
from .sampler import RollingSampler
from .timing import Timeline

LATENT_HW = (8, 8)                 # toy latents: 64x64 pixels / 8
ATTRS = ("background", "colour", "shape", "motion")
METRICS = ATTRS + ("found", "latent_spatial", "latent_temporal")
DRIFT_CAPTIONS = ("a red circle drifting left on a dark background",
                  "a blue square bouncing on a light background",
                  "a green triangle orbiting on a dark background",
                  "a yellow square drifting right on a light background")
TEACHER_CAPTIONS = DRIFT_CAPTIONS + ("a red square orbiting on a light background",
                                     "a green triangle drifting left on a dark background",
                                     "a blue circle bouncing on a light background",
                                     "a yellow circle drifting left on a dark background")
SWITCH_PAIRS = (  # (before, after): colour + shape change; background change; colour + motion change
    ("a red circle drifting left on a dark background", "a blue square drifting left on a dark background"),
    ("a green triangle bouncing on a light background", "a yellow circle bouncing on a light background"),
    ("a red square orbiting on a dark background", "a red square orbiting on a light background"),
    ("a blue circle drifting right on a light background", "a yellow circle bouncing on a light background"),
)
SWITCH_VARIANTS = tuple((t, r, a) for t, r in (("cut", "none"), ("blend", "none"), ("cut", "keep_sink"),
                                               ("cut", "new_sink"), ("cut", "reanchor"))
                        for a in ("entering", "window"))
BLEND_SECONDS = 1.5
TL = Timeline()
ROPE_LIMIT = 1024  # latent frames: the published sampler's RoPE table length (255.6 s at 16 fps)


# ------------------------------------------------------------------------------------------- models
@dataclass
class CausalModel:
    """The model sampled causally: ``steps`` its nominal denoising steps, ``name`` what it is."""

    model: torch.nn.Module
    steps: tuple
    name: str
    path: str | None = None
    note: str = ""
    base: RollingConfig | None = None  # the sampler settings it was made for (steps, shift, block size)

    def info(self) -> dict:
        b = self.base or RollingConfig(steps=self.steps)
        d = {"name": self.name, "steps": list(self.steps), "shift": b.shift, "frames_per_block": b.frames_per_block,
             "path": self.path, "note": self.note}
        if self.path and os.path.isfile(self.path):
            with open(self.path, "rb") as f:
                d["sha256"] = hashlib.sha256(f.read()).hexdigest()[:16]
            d["mtime_utc"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(os.path.getmtime(self.path)))
        return d


def load_causal(path: str | None = None, *, teacher: bool = False) -> CausalModel:
    """The toy student (``rolling.toy.load_student`` + its ``store.student_metadata``), or, when it is not
    there (or ``teacher``), the bidirectional teacher run causally with the reference steps."""
    from . import toy
    from .toy import store
    if not teacher:
        try:
            model, meta = toy.load_student(path), store.student_metadata(path)
            note = ", ".join(f"{k} {meta[k]}" for k in ("stage", "command") if k in meta)
            return CausalModel(model, tuple(int(s) for s in meta["denoising_steps"]), "student",
                               path or store.STUDENT_PATH, note, base=store.student_rolling_config(path))
        except FileNotFoundError:
            if path is not None:
                raise
    return CausalModel(toy.load_teacher(), REFERENCE_STEPS, "teacher-as-causal", store.TEACHER_PATH,
                       "no student weights: the bidirectional teacher sampled causally with the reference steps "
                       "(a harness check, not a quality figure)")


def rolling_config(cm: CausalModel, **kw) -> RollingConfig:
    """The run's config: the model's steps, fused cache updates (the default), other settings as given."""
    cfg = (cm.base or RollingConfig(steps=cm.steps)).with_(**kw)
    if cfg.frames_per_block != 3:  # the bucket / switch arithmetic here is for 3-frame blocks (the release's)
        raise ValueError(f"the quality benchmarks expect 3 latent frames per block, the model has {cfg.frames_per_block}")
    return cfg


def sample(cm: CausalModel, context, num_blocks: int, *, seed: int = 0, **cfg) -> tuple[torch.Tensor, float]:
    """(latents [1, 16, 3 num_blocks, 8, 8], wall seconds) from the sampler; ``context`` an embedding
    or a PromptSchedule; ``cfg`` RollingConfig fields (schedule, rope_mode, ...)."""
    s = RollingSampler(cm.model, rolling_config(cm, **cfg), height=LATENT_HW[0], width=LATENT_HW[1],
                       device="cpu", dtype=torch.float32, seed=seed)
    t0 = time.perf_counter()
    z = s.generate(context, num_blocks)
    return z, time.perf_counter() - t0


# ------------------------------------------------------------------------------------------- scoring
def first_pixel(latent: int) -> int:
    """First pixel frame that latent frame ``latent`` decodes to."""
    return 0 if latent <= 0 else 4 * latent - 3


def latent_at(seconds: float) -> int:
    """First latent frame whose first pixel frame is at or after ``seconds``."""
    px = int(round(seconds * PIXEL_FPS))
    return 0 if px <= 0 else (px + 3 + 3) // 4


def decode(vae, latents: torch.Tensor, l0: int = 0, l1: int | None = None) -> np.ndarray:
    """Latent frames l0 .. l1-1 of a video -> their pixel frames, numpy [n, 64, 64, 3] in [0, 1]."""
    from .toy.world import from_video
    l1 = latents.shape[2] if l1 is None else l1
    with torch.no_grad():
        px = torch.cat([vae.decode_frame(latents[:, :, k], k == 0) for k in range(l0, l1)], dim=2)
    return from_video(px)[0]


def score_span(vae, latents: torch.Tensor, l0: int, l1: int, caption: str) -> dict:
    """Detector accuracy of latent frames l0 .. l1-1 against ``caption``, plus their latent correlation."""
    from .toy import detect
    frames = decode(vae, latents, l0, l1)
    s = detect.score(frames, caption)
    lc = detect.latent_correlation(latents[:, :, l0:l1])
    out = {k: float(s[k]) for k in ATTRS + ("found",)}
    out.update(latent_spatial=lc["spatial"], latent_temporal=lc["temporal"], frames=int(s["frames"]),
               start_s=first_pixel(l0) / PIXEL_FPS)
    return out


def buckets(latents: torch.Tensor, bucket_s: float, which: str = "all") -> list[tuple[int, int]]:
    """Latent-frame ranges of consecutive ``bucket_s``-second buckets (the last one only if it is at
    least half full); ``which`` = ``all`` or ``ends`` (first and last)."""
    n = latents.shape[2]
    edges, k = [], 0
    while True:
        a, b = latent_at(k * bucket_s), min(n, latent_at((k + 1) * bucket_s))
        if a >= n or (b - a) < 0.5 * bucket_s * PIXEL_FPS / 4:
            break
        edges.append((a, b))
        k += 1
    return edges if which == "all" or len(edges) < 3 else [edges[0], edges[-1]]


def mean_rows(rows: list[dict], keys=METRICS) -> dict:
    """Mean of each metric over rows (nan entries, e.g. motion of a short span, left out)."""
    vals = {k: [r[k] for r in rows if k in r and r[k] is not None and np.isfinite(r[k])] for k in keys}
    return {k: round(float(np.mean(v)), 4) if v else None for k, v in vals.items()}


def _rnd(d: dict) -> dict:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()}


# ------------------------------------------------------------------------------------------- drift
def long_runs(cm: CausalModel, vae, text, captions, seeds, *, seconds: float, bucket_s: float, which="all",
              keep_latents: bool = False, log=print, **cfg) -> dict:
    """Per-bucket scores of one long run per (caption, seed) under one config; the mean per bucket.
    ``keep_latents``: the runs' latents stay in the result under ``_latents`` (not written to JSON)."""
    blocks = TL.blocks_for(seconds)
    runs, t_sample, t_score, kept = [], 0.0, 0.0, []
    for cap in captions:
        ctx = text.encode(cap)
        for seed in seeds:
            z, dt = sample(cm, ctx, blocks, seed=seed, **cfg)
            t0 = time.perf_counter()
            rows = [score_span(vae, z, a, b, cap) for a, b in buckets(z, bucket_s, which)]
            ts = time.perf_counter() - t0
            t_sample, t_score = t_sample + dt, t_score + ts
            if keep_latents:
                kept.append(z)
            runs.append({"caption": cap, "seed": seed, "sample_s": round(dt, 2), "score_s": round(ts, 2),
                         "finite": bool(torch.isfinite(z).all()), "buckets": [_rnd(r) for r in rows]})
            log(f"  {cfg} {cap!r} seed {seed}: {blocks} blocks in {dt:.1f} s, scored in {ts:.1f} s; first / last "
                f"bucket colour {rows[0]['colour']:.2f} / {rows[-1]['colour']:.2f}, shape {rows[0]['shape']:.2f} / "
                f"{rows[-1]['shape']:.2f}")
    nb = min(len(r["buckets"]) for r in runs)
    per = [{"start_s": runs[0]["buckets"][i]["start_s"], **mean_rows([r["buckets"][i] for r in runs])}
           for i in range(nb)]
    out = {"config": cfg, "blocks": blocks, "latent_frames": 3 * blocks, "pixel_frames": TL.frames(blocks),
           "seconds": round(TL.seconds(blocks), 2), "sample_s": round(t_sample, 1), "score_s": round(t_score, 1),
           "sample_s_per_video_minute": round(t_sample / len(runs) / (TL.seconds(blocks) / 60), 2),
           "per_bucket": per, "runs": runs}
    if keep_latents:
        out["_latents"] = kept
    return out


def bench_drift(cm, vae, text, *, captions=DRIFT_CAPTIONS[:2], seeds=(0, 1), seconds=600.0, bucket_s=60.0,
                schedules=("rolling", "chunk_causal"), keep_latents: bool = False, log=print) -> dict:
    """Accuracy per ``bucket_s`` over ``seconds`` of video for each schedule (same weights, captions, seeds)."""
    t0 = time.perf_counter()
    out = {"bench": "drift", "captions": list(captions), "seeds": list(seeds), "seconds": seconds,
           "bucket_s": bucket_s, "schedules": {}}
    for sch in schedules:
        log(f"drift: schedule {sch}")
        out["schedules"][sch] = long_runs(cm, vae, text, captions, seeds, seconds=seconds, bucket_s=bucket_s,
                                          keep_latents=keep_latents, log=log, schedule=sch)
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    return out


def bench_rope(cm, vae, text, *, captions=DRIFT_CAPTIONS[:2], seeds=(0, 1), seconds=600.0, bucket_s=60.0,
               modes=("reference", "relative"), schedules=("rolling", "chunk_causal"), which="all",
               reuse: dict | None = None, log=print) -> dict:
    """Runs longer than 1,024 latent frames in each RoPE mode, for each schedule (``rolling``: the sink
    re-rotated next to the working cache; ``chunk_causal``: the sink at its absolute positions, so the
    query-to-sink offset grows with the video). Accuracy before / after latent frame 1,024 and in the
    last bucket, and the largest latent difference between the modes (same seeds). ``reuse`` = a drift
    result made with ``keep_latents`` (reference mode, same captions / seeds / length / buckets): its
    runs stand for the reference mode."""
    t0 = time.perf_counter()
    blocks = TL.blocks_for(seconds)
    out = {"bench": "rope", "captions": list(captions), "seeds": list(seeds), "seconds": seconds,
           "bucket_s": bucket_s, "latent_frames": 3 * blocks, "rope_limit_latent_frames": ROPE_LIMIT,
           "rope_limit_s": round(first_pixel(ROPE_LIMIT) / PIXEL_FPS, 2), "runs": {}}
    same = reuse is not None and which == "all" and reuse["captions"] == list(captions) and \
        reuse["seeds"] == list(seeds) and reuse["bucket_s"] == bucket_s
    for sch in schedules:
        for mode in modes:
            name = f"{sch} / {mode}"
            prev = reuse["schedules"].get(sch) if same else None
            if mode == "reference" and prev is not None and prev["blocks"] == blocks and "_latents" in prev:
                out["runs"][name] = {**prev, "reused_from": f"drift (schedule {sch})"}
                continue
            log(f"rope: {name}")
            out["runs"][name] = long_runs(cm, vae, text, captions, seeds, seconds=seconds, bucket_s=bucket_s,
                                          which=which, keep_latents=True, log=log, schedule=sch, rope_mode=mode)
    for name, r in out["runs"].items():  # before / after the 1,024-latent-frame position
        rows = r["per_bucket"]
        lat = [latent_at(x["start_s"]) for x in rows]
        r["before_limit"] = mean_rows([x for x, a in zip(rows, lat) if a + latent_at(bucket_s) <= ROPE_LIMIT])
        r["after_limit"] = mean_rows([x for x, a in zip(rows, lat) if a >= ROPE_LIMIT])
        r["last_bucket"] = rows[-1]
    out["mode_difference"] = {}
    for sch in schedules:
        zs = [out["runs"].get(f"{sch} / {m}", {}).get("_latents") for m in modes]
        if all(z is not None for z in zs) and len(zs) > 1:
            d = [(a - b).abs() for a, b in zip(zs[0], zs[1])]
            per_frame = torch.stack([x.amax(dim=(0, 1, 3, 4)) for x in d]).amax(0)  # [latent frames]
            big = (per_frame > 1e-3).nonzero()
            out["mode_difference"][sch] = {
                "max_abs": float(per_frame.max()), "mean_abs": float(torch.stack([x.mean() for x in d]).mean()),
                "max_abs_before_limit": float(per_frame[:ROPE_LIMIT].max()),
                "max_abs_after_limit": float(per_frame[ROPE_LIMIT:].max()) if len(per_frame) > ROPE_LIMIT else None,
                "first_latent_frame_above_1e-3": int(big[0]) if len(big) else None,
                "modes": list(modes[:2])}
    for r in out["runs"].values():
        r.pop("_latents", None)
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    return out


# ------------------------------------------------------------------------------------------- teacher
def bench_teacher(cm, vae, text, *, captions=TEACHER_CAPTIONS, seeds=(0, 1), teacher_steps=50,
                  guidance=(0.0, 2.0), latent_frames=21, log=print) -> dict:
    """Teacher samples (bidirectional, ``teacher_steps`` Euler steps, each guidance) vs the causal model
    under both schedules, all ``latent_frames`` long (21 = 81 pixel frames), same captions and seeds."""
    from .toy import load_teacher
    from .toy.sampling import sample as teacher_sample
    t0 = time.perf_counter()
    teacher, empty = load_teacher(), text.encode("")
    blocks = -(-latent_frames // 3)
    out = {"bench": "teacher_vs_student", "captions": list(captions), "seeds": list(seeds),
           "latent_frames": latent_frames, "pixel_frames": 1 + 4 * (latent_frames - 1), "rows": {}}
    ctx = text.encode_batch(captions)
    for g in guidance:
        name, rows, dt = f"teacher_{teacher_steps}steps_g{g:g}", [], 0.0
        for seed in seeds:
            t1 = time.perf_counter()
            z = teacher_sample(teacher, ctx, empty, frames=latent_frames, steps=teacher_steps, guidance=g, seed=seed)
            dt += time.perf_counter() - t1
            rows += [score_span(vae, z[i:i + 1], 0, latent_frames, c) for i, c in enumerate(captions)]
        out["rows"][name] = {**mean_rows(rows), "samples": len(rows), "sample_s_per_video": round(dt / len(rows), 3)}
        log(f"  {name}: {out['rows'][name]}")
    for sch in ("rolling", "chunk_causal"):
        name, rows, dt = f"{cm.name}_{sch}_{len(cm.steps)}steps", [], 0.0
        for seed in seeds:
            for c in captions:
                z, d = sample(cm, text.encode(c), blocks, seed=seed, schedule=sch)
                dt += d
                rows.append(score_span(vae, z, 0, latent_frames, c))
        out["rows"][name] = {**mean_rows(rows), "samples": len(rows), "sample_s_per_video": round(dt / len(rows), 3)}
        log(f"  {name}: {out['rows'][name]}")
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    return out


# ------------------------------------------------------------------------------------------- switch
def switch_schedule(text, before: str, after: str, switch_s: float, transition="cut", recache="none",
                    applies="entering", blend_seconds=BLEND_SECONDS) -> PromptSchedule:
    """Two timed prompts through the project's rounding rule (:func:`rolling.prompts.schedule_from_times`)."""
    items = [TimedPrompt(0.0, text.encode(before), before),
             TimedPrompt(float(switch_s), text.encode(after), after, transition,
                         blend_seconds if transition == "blend" else 0.0, recache, applies=applies)]
    return schedule_from_times(items, TL)[0]


def _rms(a: torch.Tensor | np.ndarray, b) -> float:
    d = (torch.as_tensor(a, dtype=torch.float64) - torch.as_tensor(b, dtype=torch.float64))
    return float(d.pow(2).mean().sqrt())


def block_labels(frames: np.ndarray, num_blocks: int) -> list[dict]:
    """Per block, the majority background / colour / shape the detector reads in its pixel frames."""
    from .toy import detect
    dets = detect.detect(frames)
    return [{k: detect.majority(d[k] for d in dets[first_pixel(3 * b):first_pixel(3 * b + 3)])
             for k in ("background", "colour", "shape")} for b in range(num_blocks)]


def switch_run(cm, vae, text, before: str, after: str, *, seconds: float, switch_s: float, seed: int,
               transition="cut", recache="none", applies="entering", settle_s: float = 2.0) -> dict:
    """One run with a switch: latency (blocks from the switch block to the first block from which the
    changed colour / background read as the new prompt's for 3 blocks in a row; negative = earlier,
    possible with ``applies=window``; per attribute, shape too, in ``latency_blocks_by_attribute``), jump at the switch (RMS change latent / pixel between the last frame before the
    switch block and its first, and the largest change within a window either side, over the run's
    median frame-to-frame change), accuracy before (vs ``before``) and after (``settle_s`` on, vs ``after``)."""
    from .toy.captions import parse_caption
    sched = switch_schedule(text, before, after, switch_s, transition, recache, applies)
    s = sched.segments[1].start_block
    n = TL.blocks_for(seconds)
    z, dt = sample(cm, sched, n, seed=seed)
    frames = decode(vae, z)
    A, B = parse_caption(before), parse_caption(after)
    changed = [k for k in ("background", "colour", "shape") if A[k] != B[k]]
    primary = [k for k in changed if k != "shape"]  # the attributes the detector reads reliably (shape: weakest)
    labels = block_labels(frames, n)
    T = len(cm.steps)
    shows = [all(lb[k] == B[k] for k in primary) for lb in labels]
    def first_shown(ok):
        for b in range(max(0, s - T), n - 2):
            if all(ok[b:b + 3]):
                return b - s
        return None
    latency = first_shown(shows) if primary else None
    by_attr = {k: first_shown([lb[k] == B[k] for lb in labels]) for k in changed}
    lat_d = [_rms(z[:, :, i + 1], z[:, :, i]) for i in range(z.shape[2] - 1)]
    px_d = [_rms(frames[i + 1], frames[i]) for i in range(len(frames) - 1)]
    ls, ps = 3 * s, first_pixel(3 * s)  # first latent / pixel frame of the switch block
    near_l = range(max(0, 3 * (s - T)), min(len(lat_d), 3 * (s + T)))
    near_p = range(max(0, first_pixel(3 * (s - T))), min(len(px_d), first_pixel(3 * (s + T))))
    typ_l = float(np.median([d for i, d in enumerate(lat_d) if i not in near_l]))
    typ_p = float(np.median([d for i, d in enumerate(px_d) if i not in near_p]))
    from .toy import detect
    settle = latent_at(TL.block_start(s) + settle_s)
    after_s = detect.score(frames[first_pixel(settle):], after)
    clean = s - T if s - T >= 2 else s  # blocks no window with the new prompt touched (if there are enough)
    before_s = detect.score(frames[:first_pixel(3 * clean)], before)
    return {"before": before, "after": {k: round(float(after_s[k]), 4) for k in ATTRS + ("found",)}, "seed": seed,
            "switch_block": s, "switch_s": round(TL.block_start(s), 3),
            "changed": changed, "latency_blocks": latency, "latency_blocks_by_attribute": by_attr,
            "latency_s": None if latency is None else round(latency * TL.block_seconds, 3),
            "jump_latent": round(lat_d[ls - 1] / typ_l, 3), "jump_pixel": round(px_d[ps - 1] / typ_p, 3),
            "max_jump_latent_near": round(max(lat_d[i] for i in near_l) / typ_l, 3),
            "max_jump_pixel_near": round(max(px_d[i] for i in near_p) / typ_p, 3),
            "typical_latent_step": round(typ_l, 4), "typical_pixel_step": round(typ_p, 4),
            "before_acc": {k: round(float(before_s[k]), 4) for k in ATTRS + ("found",)},
            "shows_new_by_block": [int(x) for x in shows], "sample_s": round(dt, 2),
            "after_caption": after}


def bench_switch(cm, vae, text, *, pairs=SWITCH_PAIRS, seeds=(0, 1), variants=SWITCH_VARIANTS, seconds=24.0,
                 switch_s=12.0, log=print) -> dict:
    """Every (transition, recache, applies) variant on every caption pair and seed; means per variant."""
    t0 = time.perf_counter()
    out = {"bench": "prompt_switch", "pairs": [list(p) for p in pairs], "seeds": list(seeds), "seconds": seconds,
           "switch_s": switch_s, "blend_seconds": BLEND_SECONDS, "variants": {}}
    for tr, rc, ap in variants:
        name = f"{tr}" + (f"+{rc}" if rc != "none" else "") + f" ({ap})"
        runs = [switch_run(cm, vae, text, a, b, seconds=seconds, switch_s=switch_s, seed=seed, transition=tr,
                           recache=rc, applies=ap) for a, b in pairs for seed in seeds]
        lat = [r["latency_blocks"] for r in runs if set(r["changed"]) - {"shape"}]
        ok = [x for x in lat if x is not None]
        summ = {"transition": tr, "recache": rc, "applies": ap, "runs": len(runs),
                "switched": round(len(ok) / len(lat), 3) if lat else None,
                "latency_blocks": round(float(np.mean(ok)), 2) if ok else None,
                "latency_blocks_max": max(ok) if ok else None}
        for k in ("colour", "background", "shape"):  # per attribute, over the runs that change it
            la = [r["latency_blocks_by_attribute"][k] for r in runs if k in r["changed"]]
            got = [x for x in la if x is not None]
            summ[f"{k}_switched"] = round(len(got) / len(la), 3) if la else None
            summ[f"{k}_latency_blocks"] = round(float(np.mean(got)), 2) if got else None
        for k in ("jump_latent", "jump_pixel", "max_jump_latent_near", "max_jump_pixel_near"):
            summ[k] = round(float(np.mean([r[k] for r in runs])), 3)
        summ["after"] = mean_rows([r["after"] for r in runs], ATTRS + ("found",))
        summ["before"] = mean_rows([r["before_acc"] for r in runs], ATTRS + ("found",))
        out["variants"][name] = {**summ, "per_run": runs}
        log(f"  switch {name}: switched {summ['switched']}, latency {summ['latency_blocks']} blocks, jump "
            f"latent {summ['jump_latent']} pixel {summ['jump_pixel']}, after {summ['after']}")
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    return out


# ------------------------------------------------------------------------------------------- tables
def _f(v, nd=2) -> str:
    return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def tables(results: dict) -> str:
    """Markdown tables of whichever benchmark results are present."""
    out = []
    head = "| " + " | ".join(("bg", "colour", "shape", "motion", "found", "lat. spatial", "lat. temporal")) + " |"
    sep = "|---" * (len(METRICS) + 2) + "|"  # two label columns (or one label and the seconds) + the metrics

    def cells(row: dict) -> str:
        return " | ".join(_f(row.get(c)) for c in METRICS) + " |"

    if "drift" in results:
        d = results["drift"]
        out += [f"Drift: accuracy per {d['bucket_s']:g} s bucket, {len(d['captions'])} captions x "
                f"{len(d['seeds'])} seeds, {d['seconds']:g} s per video", "", "| schedule | from (s) " + head, sep]
        out += [f"| {sch} | {row['start_s']:.0f} | " + cells(row)
                for sch, r in d["schedules"].items() for row in r["per_bucket"]]
        out += ["", "| schedule | sampling s per minute of video | all latents finite |", "|---|---|---|"]
        out += [f"| {sch} | {r['sample_s_per_video_minute']} | {all(x['finite'] for x in r['runs'])} |"
                for sch, r in d["schedules"].items()] + [""]
    if "teacher" in results:
        d = results["teacher"]
        out += [f"Teacher vs student: {len(d['captions'])} captions x {len(d['seeds'])} seeds, "
                f"{d['pixel_frames']} frames each", "", "| sampler " + head + " s per video |", sep]
        out += [f"| {name} | " + cells(r) + f" {r['sample_s_per_video']} |" for name, r in d["rows"].items()] + [""]
    if "switch" in results:
        d = results["switch"]
        out += [f"Prompt switches: {len(d['pairs'])} caption pairs x {len(d['seeds'])} seeds, switch at "
                f"{d['switch_s']:g} s of {d['seconds']:g} s; latency in blocks of 0.75 s (first block from which the "
                "changed colour and background read as the new prompt for 3 blocks; negative = before the switch block; "
                "shape separately: the weakest attribute); "
                "jumps = RMS change at the switch / the run's median frame-to-frame change", "",
                "| transition | applies | switched | latency (blocks) | max | colour: switched, latency | "
                "background: switched, latency | shape: switched, latency | jump latent | jump pixel | "
                "max jump near (latent / pixel) | after: bg | colour | shape | motion |", "|---" * 15 + "|"]
        for name, r in d["variants"].items():
            a = r["after"]
            tr = r["transition"] + (f" + recache {r['recache']}" if r["recache"] != "none" else "")
            per = " | ".join(f"{_f(r.get(k + '_switched'))}, {_f(r.get(k + '_latency_blocks'))}"
                             for k in ("colour", "background", "shape"))
            out.append(f"| {tr} | {r['applies']} | {_f(r['switched'])} | {_f(r['latency_blocks'])} | "
                       f"{_f(r['latency_blocks_max'])} | {per} | {_f(r['jump_latent'])} | {_f(r['jump_pixel'])} | "
                       f"{_f(r['max_jump_latent_near'])} / {_f(r['max_jump_pixel_near'])} | {_f(a['background'])} | "
                       f"{_f(a['colour'])} | {_f(a['shape'])} | {_f(a['motion'])} |")
        out.append("")
    if "rope" in results:
        d = results["rope"]
        out += [f"RoPE modes past {d['rope_limit_latent_frames']} latent frames ({d['rope_limit_s']} s): "
                f"{d['latent_frames']} latent frames per run, {len(d['captions'])} captions x {len(d['seeds'])} seeds",
                "", "| schedule / mode | part " + head, sep]
        out += [f"| {name} | {label} | " + cells(r[part]) for name, r in d["runs"].items()
                for part, label in (("before_limit", "before 1024"), ("after_limit", "after 1024"),
                                    ("last_bucket", "last bucket"))] + [""]
        if d.get("mode_difference"):
            e = (lambda v: "-" if v is None else f"{v:.2e}")
            out += ["| schedule | max abs latent difference reference vs relative | before 1024 | after 1024 | "
                    "mean abs |", "|---|---|---|---|---|"]
            out += [f"| {sch} | {e(m['max_abs'])} | {e(m['max_abs_before_limit'])} | "
                    f"{e(m['max_abs_after_limit'])} | {e(m['mean_abs'])} |"
                    for sch, m in d["mode_difference"].items()] + [""]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------- driver
BOUNDED = {"drift": dict(captions=DRIFT_CAPTIONS[:1], seeds=(0,), seconds=24.0, bucket_s=12.0),
           "teacher": dict(captions=TEACHER_CAPTIONS[:2], seeds=(0,), teacher_steps=8, guidance=(0.0,)),
           "switch": dict(pairs=SWITCH_PAIRS[:1], seeds=(0,), variants=(("cut", "none", "entering"),
                                                                       ("cut", "keep_sink", "window")),
                          seconds=12.0, switch_s=6.0),
           "rope": dict(captions=DRIFT_CAPTIONS[:1], seeds=(0,), seconds=262.0, bucket_s=6.0, which="ends",
                        schedules=("rolling",))}
BENCHES = ("drift", "teacher", "switch", "rope")


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run(benches=BENCHES, *, bounded: bool = False, student: str | None = None, teacher_as_student: bool = False,
        captions: int | None = None, seeds: int | None = None, seconds: float | None = None, log=print) -> dict:
    """Run the chosen benchmarks; returns {"model", "machine", bench name: result}."""
    from .toy import TextEncoder, load_vae
    for b in benches:
        if b not in BENCHES:
            raise ValueError(f"unknown quality benchmark {b!r}; choose from {', '.join(BENCHES)}")
    cm = load_causal(student, teacher=teacher_as_student)
    vae, text = load_vae(), TextEncoder()
    res = {"model": cm.info(), "machine": {"python": platform.python_version(), "torch": torch.__version__,
                                           "threads": torch.get_num_threads(), "cpu": platform.machine(),
                                           "load_avg": os.getloadavg()[0] if hasattr(os, "getloadavg") else None},
           "git_commit": _git_commit(), "bounded": bounded}
    log(f"quality: causal model = {cm.name} (steps {list(cm.steps)}){'; ' + cm.note if cm.note else ''}")
    for b in benches:
        kw = dict(BOUNDED[b]) if bounded else {}
        if b in ("drift", "rope") and not bounded:
            kw.update(captions=DRIFT_CAPTIONS[:captions or 2], seeds=tuple(range(seeds or 2)))
            if seconds:
                kw["seconds"] = seconds
        if b == "teacher" and not bounded and (captions or seeds):
            kw.update(captions=TEACHER_CAPTIONS[:captions or len(TEACHER_CAPTIONS)], seeds=tuple(range(seeds or 2)))
        if b == "switch" and not bounded and seeds:
            kw.update(seeds=tuple(range(seeds)))
        if b == "drift" and "rope" in benches:
            kw["keep_latents"] = True
        fn = {"drift": bench_drift, "teacher": bench_teacher, "switch": bench_switch, "rope": bench_rope}[b]
        if b == "rope" and "drift" in res:
            kw["reuse"] = res["drift"]
        log(f"quality: {b} ...")
        res[b] = fn(cm, vae, text, log=log, **kw)
        if b == "rope" and "drift" in res:
            for r in res["drift"]["schedules"].values():
                r.pop("_latents", None)
        log(f"quality: {b} done in {res[b]['wall_s']} s")
    return res


FILES = {"drift": "toy_quality_drift.json", "teacher": "toy_quality_teacher.json",
         "switch": "toy_quality_switch.json", "rope": "toy_quality_rope.json"}


def write(res: dict, out_dir: str, command: str) -> list[str]:
    """One JSON per benchmark in ``out_dir`` (each with the command, model and machine)."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for b, name in FILES.items():
        if b in res:
            p = os.path.join(out_dir, name)
            with open(p + ".tmp", "w") as f:
                json.dump({"command": command, "model": res["model"], "machine": res["machine"],
                           "git_commit": res["git_commit"], "bounded": res["bounded"], **res[b]}, f, indent=1)
            os.replace(p + ".tmp", p)
            paths.append(p)
    return paths


def read(out_dir: str) -> dict:
    """The results of :func:`write` back from ``out_dir`` (the benchmarks whose files exist)."""
    res = {}
    for b, name in FILES.items():
        p = os.path.join(out_dir, name)
        if os.path.isfile(p):
            with open(p) as f:
                res[b] = json.load(f)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m rolling bench quality",
                                description="toy-world quality benchmarks of the causal student (drift, teacher vs "
                                            "student, prompt switches, RoPE modes past 1,024 latent frames)")
    p.add_argument("--only", default=",".join(BENCHES), help=f"comma-separated subset of {','.join(BENCHES)}")
    p.add_argument("--bounded", action="store_true", help="a small end-to-end check (CI: under a minute on one core); "
                   "writes nothing unless --out-dir is given")
    p.add_argument("--student", default=None, help="student weights (default: rolling/toy/weights/toy_student"
                   ".safetensors; the teacher stands in when missing)")
    p.add_argument("--teacher-as-student", action="store_true", help="sample the teacher causally (harness check)")
    p.add_argument("--captions", type=int, default=None, help="captions per long run (drift / rope; default 2)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per caption (default 2)")
    p.add_argument("--seconds", type=float, default=None, help="length of the drift / rope videos (default 600)")
    p.add_argument("--out-dir", default=None, help="write the JSON files here (default bench/results; none with "
                   "--bounded)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--tables-from", default=None, metavar="DIR", help="print the tables of the JSON files in DIR "
                   "(written by an earlier run) and exit")
    a = p.parse_args(argv)
    if a.tables_from:
        print(tables(read(a.tables_from)))
        return 0
    if a.threads:
        torch.set_num_threads(a.threads)
    benches = tuple(x.strip() for x in a.only.split(",") if x.strip())
    t0 = time.perf_counter()
    try:
        res = run(benches, bounded=a.bounded, student=a.student, teacher_as_student=a.teacher_as_student,
                  captions=a.captions, seeds=a.seeds, seconds=a.seconds)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    print(tables(res))
    out_dir = a.out_dir or (None if a.bounded else os.path.join("bench", "results"))
    if out_dir:
        cmd = "python -m rolling bench quality " + " ".join(argv if argv is not None else sys.argv[1:])
        for path in write(res, out_dir, cmd.strip()):
            print(f"wrote {path}")
    print(f"quality: total {res['wall_s']} s")
    return 0
