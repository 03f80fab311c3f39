"""Time units in one place: seconds <-> blocks <-> latent frames <-> pixel frames.

N latent frames decode to 1 + 4 (N - 1) pixel frames (latent frame 0 -> 1 pixel frame, every later
one -> 4), at ``fps`` pixel frames per second (16 for the Wan2.1 VAE). A block is
``frames_per_block`` latent frames, so block b >= 1 starts at pixel frame 4 fb b - 3, block 0 at 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .config import PIXEL_FPS


def pixel_frames(latent_frames: int) -> int:
    """Pixel frames decoded from N latent frames: 1 + 4 (N - 1)."""
    return 0 if latent_frames <= 0 else 1 + 4 * (latent_frames - 1)


@dataclass(frozen=True)
class Timeline:
    """The time grid of a run: ``frames_per_block`` latent frames per block, ``fps`` pixel frames per second."""

    frames_per_block: int = 3
    fps: float = PIXEL_FPS

    @property
    def block_seconds(self) -> float:
        """Seconds between two block starts (0.75 s with 3-frame blocks at 16 fps)."""
        return 4 * self.frames_per_block / self.fps

    def block_start(self, block: int) -> float:
        """Seconds at which a block's first pixel frame is shown."""
        return 0.0 if block <= 0 else (4 * self.frames_per_block * block - 3) / self.fps

    def block_at(self, seconds: float) -> int:
        """The block whose start is nearest to ``seconds`` (ties go to the later block)."""
        if not (seconds >= 0) or math.isinf(seconds):
            raise ValueError(f"a time must be a finite number of seconds >= 0, got {seconds}")
        b = max(0, int((seconds + 3 / self.fps) / self.block_seconds))
        cands = [c for c in (b - 1, b, b + 1) if c >= 0]
        return min(cands, key=lambda c: (abs(self.block_start(c) - seconds), -c))

    def blocks_for(self, seconds: float) -> int:
        """Whole blocks for a duration, rounded up (the video is at most one block longer than asked)."""
        if not (seconds > 0) or math.isinf(seconds):
            raise ValueError(f"length must be a positive number of seconds, got {seconds}")
        px = max(1, round(seconds * self.fps))
        latent = (px - 1 + 3) // 4 + 1
        return max(1, -(-latent // self.frames_per_block))

    def blocks_in(self, seconds: float) -> int:
        """A duration as a whole number of blocks, rounded to nearest (e.g. a blend length)."""
        if not (seconds >= 0) or math.isinf(seconds):
            raise ValueError(f"a duration must be a finite number of seconds >= 0, got {seconds}")
        return int(round(seconds / self.block_seconds))

    def frames(self, blocks: int) -> int:
        """Pixel frames of a video of ``blocks`` blocks."""
        return pixel_frames(blocks * self.frames_per_block)

    def seconds(self, blocks: int) -> float:
        """Duration of a video of ``blocks`` blocks."""
        return self.frames(blocks) / self.fps

    @staticmethod
    def clock(seconds: float) -> str:
        """``m:ss.ss`` (``h:mm:ss.ss`` from an hour on)."""
        h, rest = divmod(seconds, 3600)
        m, s = divmod(rest, 60)
        return f"{int(h)}:{int(m):02d}:{s:05.2f}" if h else f"{int(m)}:{s:05.2f}"
