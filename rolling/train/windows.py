"""Pure bookkeeping of which forwards carry gradient in a training rollout (no torch).

Rolling-Forcing rollout over ``num_blocks`` blocks with ``T`` steps: window w covers blocks
max(0, w-T+1) .. min(num_blocks-1, w) (as at inference). For an offset k in 0..T-1 the *offset
windows* are those with w % T == k; consecutive ones are T windows apart and a window spans at most T
blocks, so they are disjoint and every block lies in exactly one of them. Gradient windows are the
offset windows that reach into the loss frames (end frame > N - loss_frames, as in the reference);
they cover every loss frame exactly once.

Self-Forcing rollout: the forward at the shared exit step carries gradient for the blocks that start
at or after frame N - loss_frames.
"""
from __future__ import annotations

from ..schedule import rolling_windows


def window_blocks(w: int, num_blocks: int, num_steps: int) -> tuple[int, ...]:
    """Blocks of window w."""
    return next(rolling_windows(num_steps, num_blocks, start=w)).blocks


def offset_windows(num_blocks: int, num_steps: int, offset: int) -> list[int]:
    """All windows w with w % num_steps == offset (disjoint, together covering every block once)."""
    if not 0 <= offset < num_steps:
        raise ValueError(f"offset must be in 0..{num_steps - 1}, got {offset}")
    return [w.index for w in rolling_windows(num_steps, num_blocks) if w.index % num_steps == offset]


def loss_start(num_frames: int, loss_frames: int) -> int:
    """First latent frame of the loss slice (the last ``loss_frames`` frames)."""
    if num_frames < loss_frames:
        raise ValueError(f"rollout of {num_frames} frames is shorter than the loss window ({loss_frames})")
    return num_frames - loss_frames


def gradient_windows(num_blocks: int, num_steps: int, offset: int, frames_per_block: int,
                     loss_frames: int) -> list[int]:
    """Rolling-Forcing gradient windows: offset windows whose end frame lies after N - loss_frames."""
    start = loss_start(num_blocks * frames_per_block, loss_frames)
    return [w for w in offset_windows(num_blocks, num_steps, offset)
            if (window_blocks(w, num_blocks, num_steps)[-1] + 1) * frames_per_block > start]


def block_window(block: int, num_blocks: int, num_steps: int, offset: int) -> int:
    """The offset window containing ``block`` (the window whose x0 becomes the block's output)."""
    for w in range(block, block + num_steps):
        if w % num_steps == offset:
            return w
    raise AssertionError("unreachable")


def sf_gradient_blocks(num_blocks: int, frames_per_block: int, loss_frames: int) -> list[int]:
    """Self-Forcing rollout: blocks whose exit-step forward carries gradient (start >= N - loss_frames)."""
    start = loss_start(num_blocks * frames_per_block, loss_frames)
    return [b for b in range(num_blocks) if b * frames_per_block >= start]


def loss_frame_mask(num_frames: int, loss_frames: int, frames_per_block: int) -> list[bool]:
    """Which of the ``loss_frames`` loss frames receive the DMD gradient: all, except the first block
    when the rollout is longer than the loss window (its first frame is the re-encoded context frame;
    reference ``base.py`` L154-180)."""
    loss_start(num_frames, loss_frames)
    mask = [True] * loss_frames
    if num_frames != loss_frames:
        mask[:frames_per_block] = [False] * frames_per_block
    return mask

