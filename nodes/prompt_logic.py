"""Prompt-schedule handling for the nodes, without ComfyUI (tested in CI).

A schedule travels between nodes as a :class:`PromptList`: segments with a start time in seconds,
the CONDITIONING tensor, and the transition into them. The sampler turns it into the core's
``PromptSchedule`` once it knows the video's length and the model's text width.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace

import torch

from ..rolling.prompts import TimedPrompt, check_options, describe, parse_prompt_lines, schedule_from_times

from .names import PROMPTS_TYPE


@dataclass(frozen=True)
class PromptList:
    """A schedule as it travels between nodes: the timed prompts, each with its CONDITIONING tensor."""

    segments: tuple[TimedPrompt, ...] = field(default_factory=tuple)

    def add(self, seg: TimedPrompt) -> "PromptList":
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


def story_segments(text: str, encode, *, transition="cut", blend_s=0.0, recache="none") -> PromptList:
    """Parse multi-line ``TIME prompt`` text and encode each prompt with ``encode(prompt) -> tensor``."""
    check_options(transition, blend_s, recache)
    items, _ = parse_prompt_lines(text)
    return PromptList(tuple(TimedPrompt(t, encode(p), p[:60], transition, blend_s, recache, f"line {n}")
                            for t, p, n in items))


def build_schedule(prompts: PromptList, video_seconds: float, prepare, timeline=None):
    """The core schedule of a node's prompt list; ``prepare(cond) -> [B, 512, dim]`` pads/cuts and checks width."""
    items = [replace(s, context=prepare(s.context)) for s in prompts.segments]
    return schedule_from_times(items, timeline, video_seconds)


__all__ = ["PROMPTS_TYPE", "PromptList", "TimedPrompt", "build_schedule", "check_options", "describe", "parse_time",
           "story_segments"]
