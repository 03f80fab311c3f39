"""A no-download demo: the toy world's causal student streams a prompted video to MP4 through the real
sampler on CPU, and the toy detectors read the written video back.

Default (toy world): the prompt is a caption of the toy grammar (``a {colour} {shape} {motion} on a
{background} background``, :mod:`rolling.toy.captions`), encoded by the toy text encoder, sampled by
the toy student (:func:`rolling.quality.load_causal`; the bidirectional teacher run causally stands in
while no student weights exist, and the demo says so), decoded block by block by the toy VAE's
streaming decoder (64x64 at 16 fps, shown ``scale`` times larger, nearest neighbour). ``story`` gives
timed prompt switches (``"0:00 caption\\n0:05 caption"``, :func:`rolling.prompts.parse_story`). At the
end the MP4 is decoded again, scaled back to 64x64, and each prompt segment's frames are scored with
:func:`rolling.toy.detect.score` against its caption.

``random_model``: the earlier demo, a tiny random Wan DiT with :func:`rolling.preview.latent_to_rgb`
frames (no VAE; each latent frame shown for 4 pixel frames, 1 for the very first), for speed measurements.
"""
from __future__ import annotations

import os
import time

import numpy as np
import torch

from .config import PIXEL_FPS, RollingConfig, WanConfig
from .model import build_model
from .preview import latent_to_rgb
from .sampler import RollingSampler
from .timing import Timeline, pixel_frames

DEMO_MODEL = WanConfig(dim=64, ffn_dim=128, num_heads=4, num_layers=2, freq_dim=32, text_dim=32)
DEFAULT_PROMPT = "a red circle drifting left on a dark background"
TOY_LATENT_HW = (8, 8)
ATTRS = ("background", "colour", "shape", "motion", "found")


def story_prompts(prompt: str | None, story: str | None, seconds: float, text) -> tuple:
    """(PromptSchedule, [(start block, caption)], warnings) from ``prompt`` or a ``story`` text; every
    caption is checked against the toy grammar (ValueError naming the line and the allowed words)."""
    from .prompts import TimedPrompt, parse_story, schedule_from_times
    from .toy import parse_caption
    if prompt is not None and story is not None:
        raise ValueError("give either a prompt or a story, not both")
    if story is None:
        prompt = DEFAULT_PROMPT if prompt is None else " ".join(prompt.split())
        parse_caption(prompt)
        items = [TimedPrompt(0.0, text.encode(prompt), prompt)]
        warns: list[str] = []
    else:
        if os.path.isfile(story):
            with open(story, encoding="utf-8") as f:
                story = f.read()
        elif "\n" not in story and "\\n" in story:
            story = story.replace("\\n", "\n")  # a one-line shell argument with written-out \n
        parsed, warns = parse_story(story, seconds)
        items = []
        for it in parsed:
            cap = " ".join(it.prompt.split())
            try:
                parse_caption(cap)
            except ValueError as e:
                raise ValueError(f"story {it.source}: {e}") from None
            items.append(TimedPrompt(it.start, text.encode(cap), cap, source=it.source))
    sched, w2 = schedule_from_times(items, Timeline(), seconds)
    return sched, [(s.start_block, s.label) for s in sched.segments], warns + w2


def read_video(path: str, scale: int = 1) -> np.ndarray:
    """The frames of an MP4 as float32 [n, H / scale, W / scale, 3] in [0, 1] (scale x scale means)."""
    import av
    with av.open(path) as c:
        f = np.stack([fr.to_ndarray(format="rgb24") for fr in c.decode(video=0)]).astype(np.float32) / 255.0
    if scale > 1:
        n, h, w, _ = f.shape
        f = f.reshape(n, h // scale, scale, w // scale, scale, 3).mean(axis=(2, 4))
    return f


def score_segments(frames: np.ndarray, segments: list[tuple[int, str]], fb: int = 3) -> list[dict]:
    """Detector accuracy per prompt segment (its pixel frames vs its caption)."""
    from .toy import detect
    tl = Timeline(fb)
    out = []
    starts = [tl.frames(b) if b else 0 for b, _ in segments] + [len(frames)]
    for (b, cap), a, e in zip(segments, starts, starts[1:]):
        seg = frames[a:e]
        res = {"caption": cap, "start_s": round(tl.block_start(b), 3), "frames": int(len(seg))}
        if len(seg):
            s = detect.score(seg, cap)
            res.update({k: round(float(s[k]), 4) for k in ATTRS + ("spatial_correlation",)})
        out.append(res)
    return out


def _stream_to_mp4(out: str, model, cfg: RollingConfig, source, seconds: float, latent_hw, px_per_latent: int,
                   to_frames, label: str, *, seed: int, device: str, flush: bool, quiet: bool) -> dict:
    """Sample ``seconds`` of video from ``model`` (``source``: a prompt embedding or a PromptSchedule) and write
    each finished block's frames (``to_frames(block)`` -> [n, H, W, 3], H = latent height x ``px_per_latent``)
    to ``out`` as the sampler yields them; returns the timing (frames written, elapsed and first-block seconds,
    blocks/s) and the sampler's forward count."""
    from .video import StreamingVideoWriter

    if os.path.isfile(out):  # the demo owns its output file: a rerun replaces it (the writer never overwrites)
        os.remove(out)
    num_blocks = Timeline(cfg.frames_per_block).blocks_for(seconds)
    h, w = latent_hw
    sampler = RollingSampler(model, cfg, height=h, width=w, device=device, dtype=torch.float32, seed=seed)
    total_px = pixel_frames(num_blocks * cfg.frames_per_block)
    width, height = w * px_per_latent, h * px_per_latent
    if not quiet:
        print(f"demo: {label}{num_blocks} blocks = {num_blocks * cfg.frames_per_block} latent frames = {total_px} "
              f"frames ({total_px / PIXEL_FPS:.2f} s at {PIXEL_FPS} fps), {width}x{height}, writing {out}", flush=True)
    t0 = time.perf_counter()
    first_latency, written = None, 0
    with StreamingVideoWriter(out, width, height, fps=PIXEL_FPS, check_space_frames=total_px) as writer:
        for blk in sampler.stream(source, num_blocks):
            frames = to_frames(blk)
            writer.write(frames)
            written += len(frames)
            if flush:
                writer.flush()
            if first_latency is None:
                first_latency = time.perf_counter() - t0
            if not quiet and (flush or blk.index % 10 == 0 or blk.index == num_blocks - 1):
                el = time.perf_counter() - t0
                print(f"  block {blk.index + 1}/{num_blocks}  {(blk.index + 1) / el:.2f} blocks/s", flush=True)
    elapsed = time.perf_counter() - t0
    stats = {"blocks": num_blocks, "frames": written, "seconds_of_video": written / PIXEL_FPS,
             "elapsed_s": elapsed, "blocks_per_s": num_blocks / elapsed, "first_block_s": first_latency, "out": out}
    if not quiet:
        print(f"done: {num_blocks} blocks in {elapsed:.2f} s = {stats['blocks_per_s']:.2f} blocks/s "
              f"({written / elapsed:.1f} frames/s), first block after {first_latency:.2f} s -> {out}")
    stats["forwards"] = sampler.forwards
    return stats


def run_demo(out: str = "rolling_demo.mp4", seconds: float = 10.0, *, prompt: str | None = None,
             story: str | None = None, random_model: bool = False, student: str | None = None,
             scale: int = 4, latent_hw=None, seed: int = 0, update_mode: str = "fused", device: str = "cpu",
             quiet: bool = False, flush: bool = False) -> dict:
    """Generate ``seconds`` of video and write it to ``out`` as it streams (see the module docstring).

    With ``flush`` every block is on disk (in a playable fragment) before the next one is generated,
    and progress is printed per block. Returns stats; in the toy world also ``segments``: the
    detector's accuracy per prompt segment of the written video."""
    if random_model:
        if prompt is not None or story is not None:
            raise ValueError("--prompt / --story need the toy model; --random-model has no text encoder")
        return _random_demo(out, seconds, latent_hw=latent_hw or (16, 28), seed=seed, update_mode=update_mode,
                            device=device, quiet=quiet, flush=flush)
    from .quality import load_causal, rolling_config
    from .toy import TextEncoder, load_vae
    from .toy.world import from_video

    if not isinstance(scale, int) or not 1 <= scale <= 16:
        raise ValueError(f"scale must be a whole number from 1 to 16, got {scale!r}")
    text = TextEncoder()
    sched, segments, warns = story_prompts(prompt, story, seconds, text)
    cm = load_causal(student)
    vae = load_vae()
    torch.manual_seed(seed)
    cfg = rolling_config(cm, update_mode=update_mode)
    decoder = vae.streaming_decoder()
    if not quiet:
        print(f"demo: toy world, {cm.name} ({len(cm.steps)} steps){' - ' + cm.note if cm.note else ''}", flush=True)
        for b, cap in segments:
            print(f"  {Timeline().clock(Timeline().block_start(b))} (block {b}) {cap}", flush=True)

    def toy_frames(blk):
        with torch.no_grad():
            frames = from_video(decoder.decode(blk.latents.float()))[0]  # [n, 64, 64, 3] in [0, 1]
        return frames.repeat(scale, axis=1).repeat(scale, axis=2) if scale > 1 else frames

    stats = _stream_to_mp4(out, cm.model, cfg, sched, seconds, latent_hw or TOY_LATENT_HW, 8 * scale, toy_frames, "",
                           seed=seed, device=device, flush=flush, quiet=quiet)
    scores = score_segments(read_video(out, scale), segments, cfg.frames_per_block)
    stats.update(model=cm.name, segments=scores, warnings=warns)
    if not quiet:
        print("detector accuracy of the written video, per prompt segment (fraction of frames; motion per 2-s window):")
        for s in scores:
            acc = "  ".join(f"{k} {s[k]:.2f}" for k in ATTRS if k in s and s[k] == s[k]) or "too short to score"
            print(f"  {Timeline.clock(s['start_s'])} {s['caption']!r} ({s['frames']} frames): {acc}")
    return stats


def _random_demo(out: str, seconds: float, *, latent_hw, seed: int, update_mode: str, device: str, quiet: bool,
                 flush: bool) -> dict:
    """The tiny random model (no text encoder, no VAE): sampler speed with preview frames."""
    torch.manual_seed(seed)
    model = build_model(DEMO_MODEL, device=device, seed=seed)
    context = torch.zeros(1, 512, DEMO_MODEL.text_dim)
    context[:, :16] = torch.randn(1, 16, DEMO_MODEL.text_dim)  # 16 "prompt tokens", rest zero padding

    def random_frames(blk):
        frames = latent_to_rgb(blk.latents)
        reps = torch.full((frames.shape[0],), 4)  # each latent frame shown for 4 pixel frames, the very first for 1
        if blk.index == 0:
            reps[0] = 1
        return frames.repeat_interleave(reps, dim=0).numpy()

    stats = _stream_to_mp4(out, model, RollingConfig(update_mode=update_mode), context, seconds, latent_hw, 8,
                           random_frames, "random model, ", seed=seed, device=device, flush=flush, quiet=quiet)
    stats["model"] = "random"
    return stats
