"""A run's outputs, filled block by block while sampling: the latent video and its decoded frames,
either all of them (preallocated) or, when the frames stream to a video file, only the last
``keep_blocks`` blocks (bounded memory however long the run).

:func:`collect` is the loop a host (the ComfyUI sampler node, the demo) runs over
:meth:`rolling.sampler.RollingSampler.stream`: per finished block, convert its latents, store them,
decode them (a streaming decoder may hold frames back until the next block, :meth:`flush` at the end),
store or write the frames, and tell the host (progress, preview, cancellation).

Shapes: latents [B, C, frames_per_block, h, w] per block; frames [B, T, H, W, 3] float in 0..1.
"""
from __future__ import annotations

from collections import deque
from typing import Callable, Iterator

import torch

from .timing import pixel_frames


class RunOutputs:
    """Latents and frames of a run of ``blocks`` blocks.

    With ``writer`` (anything with ``write(frames [T, H, W, 3])``), frames go to it and the outputs keep
    the last ``keep_blocks`` blocks; otherwise everything is kept in buffers preallocated on ``device``
    (frames only when ``frame_hw`` is given)."""

    def __init__(self, *, blocks: int, frames_per_block: int, latent_shape: tuple[int, int, int, int],
                 frame_hw: tuple[int, int] | None = None, writer=None, keep_blocks: int | None = None, device="cpu"):
        b, c, h, w = latent_shape
        self.fb, self.blocks, self.writer, self.device = frames_per_block, blocks, writer, torch.device(device)
        self.keep_blocks = blocks if writer is None else max(1, min(keep_blocks or blocks, blocks))
        self.keep_frames = pixel_frames(blocks * self.fb) - pixel_frames((blocks - self.keep_blocks) * self.fb)
        self.latents = deque(maxlen=self.keep_blocks) if writer is not None else \
            torch.empty((b, c, blocks * self.fb, h, w), dtype=torch.float32, device=self.device)
        self.frames: deque | torch.Tensor | None = None
        if frame_hw is not None:
            self.frames = deque() if writer is not None else \
                torch.empty((b, pixel_frames(blocks * self.fb), *frame_hw, 3), dtype=torch.float32, device=self.device)
        self.frames_done = 0

    def add_latents(self, block: int, raw: torch.Tensor) -> None:
        """Block ``block`` (0 = the first block of this run) of the latent video."""
        raw = raw.to(self.device)
        if isinstance(self.latents, deque):
            self.latents.append(raw)
        else:
            self.latents[:, :, block * self.fb:(block + 1) * self.fb] = raw

    def add_frames(self, frames: torch.Tensor) -> None:
        """The next decoded frames [B, t, H, W, 3] (t may be 0)."""
        if self.frames is None or not frames.shape[1]:
            return
        if self.writer is not None:
            self.writer.write(frames[0])
            self.frames.append(frames)
            while sum(f.shape[1] for f in self.frames) - self.frames[0].shape[1] >= self.keep_frames:
                self.frames.popleft()
        else:
            self.frames[:, self.frames_done:self.frames_done + frames.shape[1]] = frames
        self.frames_done += frames.shape[1]

    def result(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(latents [B, C, F, h, w], frames [B, T, H, W, 3] or None): everything, or the kept tail."""
        if self.writer is None:
            return self.latents, self.frames
        lat = torch.cat(list(self.latents), dim=2)
        frames = None if self.frames is None else torch.cat(list(self.frames), dim=1)[:, -self.keep_frames:]
        return lat, frames

    def clear(self) -> None:
        """Drop everything (after a cancel or an error, so nothing stays referenced)."""
        self.latents = self.frames = None


def collect(blocks: Iterator, out: RunOutputs, *, first_block: int = 0,
            to_output: Callable[[torch.Tensor], torch.Tensor] = lambda x: x, decoder=None,
            on_block: Callable | None = None) -> RunOutputs:
    """Run a stream of finished blocks into ``out``. ``to_output`` converts a block's latents (e.g. to a
    host's latent convention); ``decoder`` has ``decode(latents) -> frames`` and ``flush() -> frames``;
    ``on_block(block, frames or None)`` is called after each block (progress, preview; raise to stop)."""
    for blk in blocks:
        raw = to_output(blk.latents.float())
        out.add_latents(blk.index - first_block, raw)
        frames = decoder.decode(raw) if decoder is not None else None
        if frames is not None:
            out.add_frames(frames)
        if on_block is not None:
            on_block(blk, frames)
    if decoder is not None:  # latent frames the decoder held back for its chunking
        out.add_frames(decoder.flush())
    return out
