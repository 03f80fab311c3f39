"""Prompt-schedule handling for the nodes, without ComfyUI (tested in CI).

A schedule travels between nodes as a :class:`PromptList`: segments with a start time in seconds,
the CONDITIONING tensor, and the transition into them. The sampler turns it into the core's
``PromptSchedule`` once it knows the video's length and the model's text width.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace

import torch

from ..rolling.prompts import RECACHE, TRANSITIONS, PromptSchedule, PromptSegment, block_start_seconds, \
    parse_prompt_lines, seconds_to_block

PROMPTS_TYPE = "ROLLING_FORCING_PROMPTS"


@dataclass(frozen=True)
class SegmentSpec:
    """One segment as the user gave it: start (seconds), conditioning [1, tokens, dim], options."""

    start_s: float
    cond: torch.Tensor
    label: str = ""
    transition: str = "cut"
    blend_s: float = 0.0
    recache: str = "none"
    source: str = ""  # e.g. "line 3" or "segment node", for error messages


@dataclass(frozen=True)
class PromptList:
    segments: tuple[SegmentSpec, ...] = field(default_factory=tuple)

    def add(self, seg: SegmentSpec) -> "PromptList":
        return PromptList(self.segments + (seg,))


def parse_time(text) -> float:
    """'20', '20.5', '20s' or 'm:ss' -> seconds; ValueError says what is allowed."""
    if isinstance(text, (int, float)):
        t = float(text)
    else:
        s = str(text).strip().rstrip("s").strip()
        try:
            if ":" in s:
                m, sec = s.split(":", 1)
                if float(sec) >= 60:
                    raise ValueError
                t = int(m) * 60 + float(sec)
            else:
                t = float(s)
        except ValueError:
            raise ValueError(f"start time {text!r} is not a time: write seconds (20, 20.5) or m:ss (0:20)") from None
    if t < 0:
        raise ValueError(f"start time must be >= 0, got {t:g} s")
    return t


def check_options(transition: str, blend_s: float, recache: str) -> None:
    if transition not in TRANSITIONS:
        raise ValueError(f"transition must be one of {', '.join(TRANSITIONS)}, got {transition!r}")
    if recache not in RECACHE:
        raise ValueError(f"recache must be one of {', '.join(RECACHE)}, got {recache!r}")
    if blend_s < 0:
        raise ValueError(f"blend length must be >= 0 seconds, got {blend_s:g}")


def story_segments(text: str, encode, *, transition="cut", blend_s=0.0, recache="none") -> PromptList:
    """Parse multi-line ``TIME prompt`` text and encode each prompt with ``encode(prompt) -> tensor``."""
    check_options(transition, blend_s, recache)
    items, _ = parse_prompt_lines(text)
    segs = tuple(SegmentSpec(t, encode(p), p[:60], transition, blend_s, recache, f"line {n}") for t, p, n in items)
    return PromptList(segs)


def build_schedule(prompts: PromptList, video_seconds: float, prepare) -> tuple[PromptSchedule, list[str]]:
    """Sorted, validated core schedule. ``prepare(cond) -> [B, 512, dim]`` pads/cuts and checks width.

    Segments starting at or beyond the video's length are dropped with a warning (the schedule can
    be previewed at a shorter length); unsorted or duplicate times and times that round to the same
    block are errors naming the segment."""
    if not prompts.segments:
        raise ValueError("the prompt schedule is empty; add at least one segment starting at 0:00")
    segs = list(prompts.segments)
    if segs[0].start_s != 0:
        raise ValueError(f"the first prompt ({segs[0].source or segs[0].label!r}) must start at 0:00, "
                         f"got {segs[0].start_s:g} s")
    warns, out = [], []
    for prev, seg in zip([None] + segs, segs):
        name = seg.source or repr(seg.label)
        if prev is not None and seg.start_s <= prev.start_s:
            kind = "the same time as" if seg.start_s == prev.start_s else "earlier than"
            raise ValueError(f"{name}: start {seg.start_s:g} s is {kind} the previous segment ({prev.start_s:g} s); "
                             "segments must be in increasing time order")
        if seg.start_s >= video_seconds:
            warns.append(f"{name}: starts at {seg.start_s:g} s, at or beyond the video's end ({video_seconds:g} s); dropped")
            continue
        b = seconds_to_block(seg.start_s)
        if out and b <= out[-1].start_block:
            raise ValueError(f"{name}: {seg.start_s:g} s rounds to block {b} like the previous segment; segments "
                             "must be at least 0.75 s apart")
        first = not out
        out.append(PromptSegment(b, prepare(seg.cond), "cut" if first else seg.transition,
                                 0 if first else int(round(seg.blend_s / 0.75)),
                                 "none" if first else seg.recache, seg.label))
    for w in warns:
        warnings.warn(w, stacklevel=2)
    return PromptSchedule(out), warns


def describe(schedule: PromptSchedule) -> str:
    """One line per segment: requested block and its actual start time (the rounding rule, visible)."""
    lines = []
    for s in schedule.segments:
        t = block_start_seconds(s.start_block)
        extra = "" if s.start_block == 0 else f", {s.transition}" + (
            f" over {s.blend_blocks} block(s)" if s.transition == "blend" else "") + (
            f", recache {s.recache}" if s.recache != "none" else "")
        lines.append(f"{int(t // 60)}:{t % 60:05.2f} (block {s.start_block}{extra}) {s.label}")
    return "\n".join(lines)
