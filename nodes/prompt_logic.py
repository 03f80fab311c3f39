"""Prompt-schedule handling for the nodes, without ComfyUI (tested in CI).

A schedule travels between nodes as a :class:`PromptList`: segments with a start time in seconds,
the CONDITIONING tensor, and the transition into them. The sampler turns it into the core's
``PromptSchedule`` once it knows the video's length and the model's text width.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from ..rolling.prompts import (MAX_STORY_SECONDS, TimedPrompt, check_options, describe, parse_clock, parse_story,
                               schedule_from_times)
from .names import PROMPTS_TYPE


@dataclass(frozen=True)
class PromptList:
    """A schedule as it travels between nodes: the timed prompts, each with its CONDITIONING tensor."""

    segments: tuple[TimedPrompt, ...] = field(default_factory=tuple)

    def add(self, seg: TimedPrompt) -> "PromptList":
        return PromptList(self.segments + (seg,))


def parse_time(text) -> float:
    """A segment's start: seconds as a number, or text '20', '20.5', '20s', 'm:ss' or 'h:mm:ss' (full-width
    colons and digits read as ASCII) -> seconds; ValueError naming the start time and what is allowed."""
    if isinstance(text, bool) or not isinstance(text, (int, float, str)):
        raise ValueError(f"start time must be seconds (20, 20.5) or m:ss (0:20), got {text!r}")
    if isinstance(text, str):
        return parse_clock(text, "start time")
    t = float(text)
    if not math.isfinite(t) or not 0 <= t <= MAX_STORY_SECONDS:
        raise ValueError(f"start time must be a number of seconds from 0 to {MAX_STORY_SECONDS:g}, got {text!r}")
    return t


def story_segments(text: str, encode, *, transition="cut", blend_s=0.0, recache="none",
                   applies="entering") -> PromptList:
    """Parse a story (``TIME prompt`` lines, or the timed syntax ``a[5s] | b[10s#]``: see
    :func:`rolling.prompts.parse_story`) and encode each prompt with ``encode(prompt) -> tensor``. A
    ``#`` hard cut makes that prompt's transition ``cut`` whatever ``transition`` says."""
    check_options(transition, blend_s, recache, applies)
    items, _ = parse_story(text)
    return PromptList(tuple(TimedPrompt(it.start, encode(it.prompt), it.prompt[:60],
                                        "cut" if it.cut else transition, blend_s, recache, it.source, applies)
                            for it in items))


def build_schedule(prompts: PromptList, video_seconds: float, prepare, timeline=None):
    """The core schedule of a node's prompt list; ``prepare(cond) -> [B, text_len, dim]`` pads/cuts and checks
    width."""
    items = [replace(s, context=prepare(s.context)) for s in prompts.segments]
    return schedule_from_times(items, timeline, video_seconds)


__all__ = ["PROMPTS_TYPE", "PromptList", "TimedPrompt", "build_schedule", "check_options", "describe", "parse_time",
           "story_segments"]
