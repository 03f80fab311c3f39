"""Prompt schedules: timed prompts that switch per block, with cut / blend transitions and optional
KV re-caching at a switch.

Time -> block rounding rule: block b (b >= 1) starts at pixel frame 12b - 3, i.e. at
(12b - 3) / 16 s (block 0 at 0 s); a segment asked to start at t seconds starts at the block whose
start time is nearest to t (ties go to the later block). Blocks are 0.75 s apart, so a switch lands
within 0.375 s of the requested time.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field

import torch

from .config import PIXEL_FPS

TRANSITIONS = ("cut", "blend")
RECACHE = ("none", "keep_sink", "reanchor")


def block_start_seconds(block: int, fps: float = PIXEL_FPS, frames_per_block: int = 3) -> float:
    """Time of the first pixel frame of a block (latent frame 0 -> 1 pixel frame, others -> 4)."""
    return 0.0 if block <= 0 else (4 * frames_per_block * block - 3) / fps


def seconds_to_block(seconds: float, fps: float = PIXEL_FPS, frames_per_block: int = 3) -> int:
    """The block whose start is nearest to ``seconds`` (ties -> later block)."""
    if seconds < 0:
        raise ValueError(f"segment start must be >= 0 seconds, got {seconds}")
    per = 4 * frames_per_block / fps
    b = max(0, int((seconds + 3 / fps) / per))
    cands = [c for c in (b - 1, b, b + 1) if c >= 0]
    return min(cands, key=lambda c: (abs(block_start_seconds(c, fps, frames_per_block) - seconds), -c))


@dataclass
class PromptSegment:
    """One segment: ``context`` [1 or B, tokens, text_dim] (umT5 embedding, padding zeroed) from
    ``start_block`` on. ``transition`` into it: ``cut`` or ``blend`` over ``blend_blocks`` blocks.
    ``recache``: at the switch, re-encode the cached clean blocks' K/V under this prompt
    (``keep_sink``: the attention sink is kept; ``reanchor``: this segment's first block becomes the
    new sink). ``label`` is shown in progress text."""

    start_block: int
    context: torch.Tensor
    transition: str = "cut"
    blend_blocks: int = 0
    recache: str = "none"
    label: str = ""

    def __post_init__(self):
        if self.transition not in TRANSITIONS:
            raise ValueError(f"transition must be one of {TRANSITIONS}, got {self.transition!r}")
        if self.recache not in RECACHE:
            raise ValueError(f"recache must be one of {RECACHE}, got {self.recache!r}")
        if self.blend_blocks < 0:
            raise ValueError(f"blend length must be >= 0 blocks, got {self.blend_blocks}")


@dataclass
class PromptSchedule:
    """Ordered segments, the first starting at block 0. See :meth:`conditioning` for the per-block rule."""

    segments: list[PromptSegment]
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self):
        if not self.segments:
            raise ValueError("a prompt schedule needs at least one segment")
        if self.segments[0].start_block != 0:
            raise ValueError(f"the first segment must start at 0:00 (block 0), got block {self.segments[0].start_block}")
        for a, b in zip(self.segments, self.segments[1:]):
            if b.start_block <= a.start_block:
                raise ValueError(f"segment {b.label or b.start_block!r} starts at block {b.start_block}, not after the "
                                 f"previous segment (block {a.start_block}); times must be increasing and at least "
                                 "one block (0.75 s) apart")

    def segment_index(self, block: int) -> int:
        i = 0
        for j, s in enumerate(self.segments):
            if s.start_block <= block:
                i = j
        return i

    def conditioning(self, block: int) -> tuple:
        """Key of the text conditioning of a block: ``(i,)`` for segment i, or ``(i, w)`` inside a blend
        into segment i, where w in (0, 1) is the weight of segment i (the previous one gets 1 - w).

        A blend of n blocks into a segment starting at block s gives blocks s .. s+n-1 the weights
        1/(n+1) .. n/(n+1); block s+n on is fully the new segment."""
        i = self.segment_index(block)
        seg = self.segments[i]
        k = block - seg.start_block
        if i > 0 and seg.transition == "blend" and k < seg.blend_blocks:
            return (i, (k + 1) / (seg.blend_blocks + 1))
        return (i,)

    def embedding(self, key: tuple) -> torch.Tensor:
        if len(key) == 1:
            return self.segments[key[0]].context
        i, w = key
        a, b = self.segments[i - 1].context, self.segments[i].context
        n = max(a.shape[1], b.shape[1])
        a, b = (torch.nn.functional.pad(t, (0, 0, 0, n - t.shape[1])) for t in (a, b))
        return (1 - w) * a.float() + w * b.float()

    def label(self, block: int) -> str:
        i = self.segment_index(block)
        return self.segments[i].label or f"segment {i + 1}"

    def switches(self) -> dict[int, PromptSegment]:
        """Blocks where a segment with re-caching begins."""
        return {s.start_block: s for s in self.segments[1:] if s.recache != "none"}

    @classmethod
    def single(cls, context: torch.Tensor, label: str = "") -> "PromptSchedule":
        return cls([PromptSegment(0, context, label=label)])


_TIME = re.compile(r"^\s*(?:(\d+):)?(\d+(?:\.\d+)?)\s*(?:s\b)?\s*[-:|]?\s*(.*)$")


def parse_prompt_lines(text: str, video_seconds: float | None = None) -> tuple[list[tuple[float, str, int]], list[str]]:
    """Parse ``"0:00 a quiet street\\n0:20 rain starts"`` -> [(0.0, 'a quiet street', 1), (20.0, ...)].

    Each non-blank line is ``TIME PROMPT`` with TIME in seconds (``20``, ``20.5``, ``20s``) or
    ``m:ss`` (``1:05``). Lines starting with ``#`` are comments. Errors name the line. Times at or
    beyond ``video_seconds`` are dropped with a warning (so a long story still previews at a short
    length). Returns (segments, warnings)."""
    out, warns = [], []
    for n, raw in enumerate((text or "").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _TIME.match(line)
        if not m:
            raise ValueError(f"line {n}: {raw.strip()!r} does not start with a time; write e.g. '0:20 rain starts' "
                             "(m:ss) or '20 rain starts' (seconds)")
        mins, secs, prompt = m.group(1), m.group(2), m.group(3).strip()
        if mins is not None and float(secs) >= 60:
            raise ValueError(f"line {n}: {mins}:{secs} has {secs} seconds; use m:ss with ss below 60")
        t = (int(mins) * 60 if mins else 0) + float(secs)
        if not prompt:
            raise ValueError(f"line {n}: the prompt after {m.group(0).split()[0]!r} is empty")
        if out and t <= out[-1][0]:
            kind = "duplicate" if t == out[-1][0] else "earlier than the previous line"
            raise ValueError(f"line {n}: time {t:g} s is {kind} ({out[-1][0]:g} s on line {out[-1][2]}); "
                             "times must be strictly increasing")
        if video_seconds is not None and t >= video_seconds:
            warns.append(f"line {n}: time {t:g} s is at or beyond the video's length ({video_seconds:g} s); dropped")
            continue
        out.append((t, prompt, n))
    if not out:
        raise ValueError("no prompts found: write one prompt per line, each starting with its time, e.g. '0:00 a street'")
    if out[0][0] != 0:
        raise ValueError(f"line {out[0][2]}: the first prompt must start at 0:00, got {out[0][0]:g} s")
    for w in warns:
        warnings.warn(w, stacklevel=2)
    return out, warns


def schedule_from_times(items: list[tuple[float, torch.Tensor, str]], *, transition: str = "cut",
                        blend_seconds: float = 0.0, recache: str = "none") -> PromptSchedule:
    """Build a schedule from (start seconds, embedding, label) with the rounding rule of this module."""
    blend_blocks = int(round(blend_seconds / 0.75))
    segs = []
    for t, ctx, label in items:
        b = seconds_to_block(t)
        if segs and b <= segs[-1].start_block:
            raise ValueError(f"segment {label!r} at {t:g} s rounds to block {b}, the same block as the previous "
                             f"segment; prompts must be at least 0.75 s apart")
        segs.append(PromptSegment(b, ctx, transition if segs else "cut", blend_blocks if segs else 0,
                                  recache if segs else "none", label))
    return PromptSchedule(segs)
