"""Prompt schedules: timed prompts that switch per block, with cut / blend transitions and optional
KV re-caching at a switch.

Time -> block rounding rule (:class:`rolling.timing.Timeline`): block b (b >= 1) starts at pixel
frame 4 fb b - 3 (12b - 3 with 3-frame blocks, i.e. (12b - 3) / 16 s; block 0 at 0 s); a segment
asked to start at t seconds starts at the block whose start time is nearest to t (ties go to the
later block), so a switch lands within half a block (0.375 s with 3-frame blocks) of the time asked.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field

import torch

from .timing import Timeline

TRANSITIONS = ("cut", "blend")
RECACHE = ("none", "keep_sink", "reanchor")


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
                                 "one block apart")

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


@dataclass(frozen=True)
class TimedPrompt:
    """One prompt as the user gave it: start (seconds), embedding [1, tokens, dim], and the transition
    into it (``blend_seconds`` for a blend). ``source`` names it in errors (e.g. "line 3")."""

    start_s: float
    context: torch.Tensor
    label: str = ""
    transition: str = "cut"
    blend_seconds: float = 0.0
    recache: str = "none"
    source: str = ""

    def __post_init__(self):
        check_options(self.transition, self.blend_seconds, self.recache)


def check_options(transition: str, blend_seconds: float, recache: str) -> None:
    if transition not in TRANSITIONS:
        raise ValueError(f"transition must be one of {', '.join(TRANSITIONS)}, got {transition!r}")
    if recache not in RECACHE:
        raise ValueError(f"recache must be one of {', '.join(RECACHE)}, got {recache!r}")
    if not (blend_seconds >= 0) or blend_seconds == float("inf"):
        raise ValueError(f"blend length must be a finite number of seconds >= 0, got {blend_seconds:g}")


def schedule_from_times(items: list[TimedPrompt], timeline: Timeline | None = None,
                        video_seconds: float | None = None) -> tuple[PromptSchedule, list[str]]:
    """A validated schedule from timed prompts, with the rounding rule of this module: each start goes
    to the nearest block start, blends to whole blocks. Prompts at or beyond ``video_seconds`` are
    dropped with a warning (a story can be previewed at a shorter length); unsorted or duplicate times
    and times that round to the same block are errors naming the prompt. Returns (schedule, warnings)."""
    tl = timeline or Timeline()
    if not items:
        raise ValueError("the prompt schedule is empty; add at least one prompt starting at 0:00")
    if items[0].start_s != 0:
        raise ValueError(f"the first prompt ({items[0].source or items[0].label!r}) must start at 0:00, "
                         f"got {items[0].start_s:g} s")
    warns, segs = [], []
    for prev, it in zip([None] + list(items), items):
        name = it.source or repr(it.label)
        if prev is not None and it.start_s <= prev.start_s:
            kind = "the same time as" if it.start_s == prev.start_s else "earlier than"
            raise ValueError(f"{name}: start {it.start_s:g} s is {kind} the previous prompt ({prev.start_s:g} s); "
                             "prompts must be in increasing time order")
        if video_seconds is not None and it.start_s >= video_seconds:
            warns.append(f"{name}: starts at {it.start_s:g} s, at or beyond the video's end ({video_seconds:g} s); "
                         "dropped")
            continue
        b = tl.block_at(it.start_s)
        if segs and b <= segs[-1].start_block:
            raise ValueError(f"{name}: {it.start_s:g} s rounds to block {b} like the previous prompt; prompts must "
                             f"be at least one block ({tl.block_seconds:g} s) apart")
        first = not segs
        segs.append(PromptSegment(b, it.context, "cut" if first else it.transition,
                                  0 if first else tl.blocks_in(it.blend_seconds), "none" if first else it.recache,
                                  it.label))
    for w in warns:
        warnings.warn(w, stacklevel=2)
    return PromptSchedule(segs), warns


def describe(schedule: PromptSchedule, timeline: Timeline | None = None) -> str:
    """One line per segment: its block and actual start time (the rounding rule, visible)."""
    tl, lines = timeline or Timeline(), []
    for s in schedule.segments:
        extra = "" if s.start_block == 0 else f", {s.transition}" + (
            f" over {s.blend_blocks} block(s)" if s.transition == "blend" else "") + (
            f", recache {s.recache}" if s.recache != "none" else "")
        lines.append(f"{tl.clock(tl.block_start(s.start_block))} (block {s.start_block}{extra}) {s.label}")
    return "\n".join(lines)
