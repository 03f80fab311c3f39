"""A no-download demo: a tiny random Wan DiT on CPU streams a video to MP4 through the real sampler.

Frames come from :func:`rolling.preview.latent_to_rgb` (no VAE); each latent frame is shown for 4
pixel frames (1 for the very first), matching the VAE's 1 + 4(N - 1) frame count at 16 fps.
"""
from __future__ import annotations

import time

import torch

from .config import PIXEL_FPS, RollingConfig, WanConfig
from .model import build_model
from .preview import latent_to_rgb
from .sampler import RollingSampler
from .timing import Timeline, pixel_frames

DEMO_MODEL = WanConfig(dim=64, ffn_dim=128, num_heads=4, num_layers=2, freq_dim=32, text_dim=32)


def run_demo(out: str = "rolling_demo.mp4", seconds: float = 10.0, *, latent_hw=(16, 28), seed: int = 0,
             update_mode: str = "fused", device: str = "cpu", quiet: bool = False,
             flush: bool = False) -> dict:
    """Generate ``seconds`` of video with a tiny random model and write it to ``out`` as it streams.

    With ``flush`` every block is on disk (in a playable fragment) before the next one is generated,
    and progress is printed per block."""
    import os

    from .video import StreamingVideoWriter

    if os.path.isfile(out):  # the demo owns its output file: a rerun replaces it (the writer never overwrites)
        os.remove(out)
    torch.manual_seed(seed)
    model = build_model(DEMO_MODEL, device=device, seed=seed)
    context = torch.zeros(1, 512, DEMO_MODEL.text_dim)
    context[:, :16] = torch.randn(1, 16, DEMO_MODEL.text_dim)  # 16 "prompt tokens", rest zero padding
    cfg = RollingConfig(update_mode=update_mode)
    num_blocks = Timeline(cfg.frames_per_block).blocks_for(seconds)
    h, w = latent_hw
    sampler = RollingSampler(model, cfg, height=h, width=w, device=device, dtype=torch.float32, seed=seed)
    total_px = pixel_frames(num_blocks * cfg.frames_per_block)
    if not quiet:
        print(f"demo: {num_blocks} blocks = {num_blocks * cfg.frames_per_block} latent frames = {total_px} frames "
              f"({total_px / PIXEL_FPS:.2f} s at {PIXEL_FPS} fps), {w * 8}x{h * 8}, writing {out}", flush=True)
    t0 = time.perf_counter()
    first_latency = None
    written = 0
    with StreamingVideoWriter(out, w * 8, h * 8, fps=PIXEL_FPS, check_space_frames=total_px) as writer:
        for blk in sampler.stream(context, num_blocks):
            frames = latent_to_rgb(blk.latents)
            reps = torch.full((frames.shape[0],), 4)
            if blk.index == 0:
                reps[0] = 1
            writer.write(frames.repeat_interleave(reps, dim=0).numpy())
            written += int(reps.sum())
            if flush:
                writer.flush()
            if first_latency is None:
                first_latency = time.perf_counter() - t0
            if not quiet and (flush or blk.index % 10 == 0 or blk.index == num_blocks - 1):
                el = time.perf_counter() - t0
                print(f"  block {blk.index + 1}/{num_blocks}  {(blk.index + 1) / el:.2f} blocks/s", flush=True)
    elapsed = time.perf_counter() - t0
    stats = {"blocks": num_blocks, "frames": written, "seconds_of_video": written / PIXEL_FPS,
             "elapsed_s": elapsed, "blocks_per_s": num_blocks / elapsed, "first_block_s": first_latency,
             "forwards": sampler.forwards, "out": out}
    if not quiet:
        print(f"done: {num_blocks} blocks in {elapsed:.2f} s = {stats['blocks_per_s']:.2f} blocks/s "
              f"({written / elapsed:.1f} frames/s), first block after {first_latency:.2f} s -> {out}")
    return stats
