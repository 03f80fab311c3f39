"""Prompt schedules: timed prompts that switch per block, with cut / blend transitions and optional
KV re-caching at a switch.

Time -> block rounding rule (:class:`rolling.timing.Timeline`): block b (b >= 1) starts at pixel
frame 4 fb b - 3 (12b - 3 with 3-frame blocks, i.e. (12b - 3) / 16 s; block 0 at 0 s); a segment
asked to start at t seconds starts at the block whose start time is nearest to t (ties go to the
later block), so a switch lands within half a block (0.375 s with 3-frame blocks) of the time asked.
"""
from __future__ import annotations

import itertools
import math
import re
import unicodedata
import warnings
from dataclasses import dataclass, field
from fractions import Fraction

import torch

from .timing import Timeline

TRANSITIONS = ("cut", "blend")
RECACHE = ("none", "keep_sink", "new_sink", "reanchor")
APPLIES = ("entering", "window")
_CHOICES = {"transition": TRANSITIONS, "recache": RECACHE, "applies": APPLIES}


def _check_choices(**values) -> None:
    """ValueError for the first option (in the order given) that is not one of its allowed values."""
    for name, v in values.items():
        if not isinstance(v, str) or v not in _CHOICES[name]:
            raise ValueError(f"{name} must be one of {', '.join(_CHOICES[name])}, got {v!r}")


@dataclass
class PromptSegment:
    """One segment: ``context`` [1 or B, tokens, text_dim] (umT5 embedding, padding zeroed) from
    ``start_block`` on. ``transition`` into it: ``cut`` or ``blend`` over ``blend_blocks`` blocks.
    ``recache`` at the switch (LongLive's re-encode of the recent clean history under this prompt,
    :func:`rolling.schedule.recache_blocks`; afterwards blocks still being generated are also cached
    under this prompt): ``keep_sink`` (LongLive ``global_sink: true``: the sink keeps its K/V),
    ``new_sink`` (``global_sink: false``: the oldest re-encoded block becomes the sink), ``reanchor``
    (like keep_sink, and this segment's first block becomes the sink once finished). ``applies``:
    the new prompt conditions only the blocks from ``start_block`` on (``entering``) or, from the
    switch on, every block still in the window (``window``). ``label`` is shown in progress text."""

    start_block: int
    context: torch.Tensor
    transition: str = "cut"
    blend_blocks: int = 0
    recache: str = "none"
    label: str = ""
    applies: str = "entering"

    def __post_init__(self):
        _check_choices(transition=self.transition, recache=self.recache, applies=self.applies)
        if self.blend_blocks < 0:
            raise ValueError(f"blend length must be >= 0 blocks, got {self.blend_blocks}")


@dataclass
class PromptSchedule:
    """Ordered segments, the first starting at block 0. See :meth:`conditioning` for the per-block rule."""

    segments: list[PromptSegment]
    warnings: list[str] = field(default_factory=list)
    window_blocks: int = 1  # blocks a denoising window holds (set by the sampler), for ``applies="window"``

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
        return max((j for j, s in enumerate(self.segments) if s.start_block <= block), default=0)

    def conditioning(self, block: int, newest: int | None = None) -> tuple:
        """Key of the text conditioning of a block: ``(i,)`` for segment i, or ``(i, w)`` inside a blend
        into segment i, where w in (0, 1) is the weight of segment i (the previous one gets 1 - w).
        ``newest``: the newest block of the forward denoising it (the switch to an ``applies="window"``
        segment has happened once that block has entered).

        A blend of n blocks into a segment starting at block s gives blocks s .. s+n-1 the weights
        1/(n+1) .. n/(n+1); block s+n on is fully the new segment."""
        i = self.segment_index(block)
        if newest is not None:
            for j, s in enumerate(self.segments[i + 1:], i + 1):
                if s.applies == "window" and s.start_block <= newest and block > s.start_block - self.window_blocks:
                    i = j
        seg = self.segments[i]
        k = max(0, block - seg.start_block)
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


MAX_STORY_SECONDS = 360_000.0  # 100 h: times and durations beyond this are refused (not a video length)
MAX_BLEND_SECONDS = 600.0
TIME_HELP = "seconds (20, 20.5, 20s), m:ss (0:20) or h:mm:ss (1:00:00)"


def _seconds_in(v, most: float) -> bool:
    """Whether ``v`` is a (non-bool) finite number of seconds in 0 .. ``most``."""
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and 0 <= v <= most


# characters read as their ASCII counterparts in times and markers; one character for one, so positions in
# the ASCII view are positions in the text (Unicode decimal digits of any script are mapped too, other
# whitespace but newlines becomes a space)
_ASCII = {**{c: ":" for c in "\uff1a\u2236\ufe55\ufe13\ua789"},  # full-width / ratio / small / vertical colon
          **{c: "." for c in "\uff0e\u2024"},  # full-width full stop, one-dot leader
          **{c: "-" for c in "\u2010\u2011\u2012\u2013\u2014\u2015\u2212\uff0d\ufe63"},  # dashes, minus signs
          "\uff5c": "|", "\u2223": "|", "\uff3b": "[", "\uff3d": "]", "\u3010": "[", "\u3011": "]",
          "\uff03": "#", "\uff53": "s", "\uff33": "s", "S": "s"}


def _ascii_view(text: str) -> str:
    out = []
    for c in text:
        if c in _ASCII:
            c = _ASCII[c]
        elif not c.isascii():
            d = unicodedata.decimal(c, None)
            c = str(d) if d is not None else (" " if c.isspace() else c)
        elif c.isspace() and c != "\n":
            c = " "
        out.append(c)
    return "".join(out)


_CLOCK = re.compile(r"(\d+)(?::(\d+))?(?::(\d+))?(\.\d+)?", re.ASCII)


def parse_clock(text: str, what: str = "time") -> float:
    """``20``, ``20.5``, ``20s``, ``m:ss`` (``1:05``, ``1:05.5``) or ``h:mm:ss`` (``1:00:00``) -> seconds.

    Full-width colons / digits and other common Unicode forms are read as ASCII. The value is exact
    (no float rounding of the parts) and at most 100 h. Raises ValueError naming ``what``."""
    return float(_exact_clock(text, what))


def _exact_clock(text: str, what: str) -> Fraction:
    """:func:`parse_clock` as an exact Fraction (durations of a story add up exactly)."""
    if not isinstance(text, str):
        raise ValueError(f"{what} must be text such as '0:20', got {text!r}")
    v = _ascii_view(text).strip()
    v = v[:-1].rstrip() if v.endswith("s") else v
    m = _CLOCK.fullmatch(v)
    if not m or len(v) > 40:
        raise ValueError(f"{what} {text.strip()[:40]!r} is not a time: write {TIME_HELP}")
    head, p2, p3, frac = m.groups()
    parts = [head] + [p for p in (p2, p3) if p is not None]
    secs = Fraction(parts[-1] + (frac or ""))
    if len(parts) > 1 and secs >= 60:
        raise ValueError(f"{what} {text.strip()!r} has {float(secs):g} seconds; use m:ss or h:mm:ss with ss below 60")
    if len(parts) == 3 and int(parts[1]) >= 60:
        raise ValueError(f"{what} {text.strip()!r} has {int(parts[1])} minutes; use h:mm:ss with mm below 60")
    total = secs + sum(int(p) * 60 ** (len(parts) - 1 - i) for i, p in enumerate(parts[:-1]))
    if total > MAX_STORY_SECONDS:
        raise ValueError(f"{what} {text.strip()[:40]!r} is more than {MAX_STORY_SECONDS / 3600:g} hours")
    return total


@dataclass(frozen=True)
class StoryItem:
    """One prompt of a story text: ``start`` (seconds), ``prompt``, ``line`` (1-based, where its text
    begins), ``segment`` (1-based position in a timed-syntax story, 0 in the line format), ``cut``
    (``#``: a hard cut into it, whatever the story's transition) and ``duration`` (its ``[Ns]``, or None)."""

    start: float
    prompt: str
    line: int
    segment: int = 0
    cut: bool = False
    duration: float | None = None

    @property
    def source(self) -> str:
        return f"line {self.line}" + (f", segment {self.segment}" if self.segment else "")


# the time at the start of a line (ASCII view): the clock token, an optional "s", then a boundary
_LINE_TIME = re.compile(r"^( *)(\d+(?:[:.]\d+)*)( *s\b)?", re.ASCII)
_CLOCK_START = re.compile(r"^ *\d+:\d+", re.ASCII)
_LINE_SEP = re.compile(r" *[-:|]? *", re.ASCII)
# a duration marker of the timed syntax: [5s], [2.5s], [1:30], [10s#], [ 5 s # ]
_MARKER = re.compile(r"\[ *([\d:.]+) *(s?) *([#@]*) *\]", re.ASCII)


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def parse_story(text: str, video_seconds: float | None = None) -> tuple[list[StoryItem], list[str]]:
    """Parse a prompt story in either syntax -> (items, warnings).

    *Line format* (one prompt per line): ``TIME PROMPT`` with TIME in seconds (``20``, ``20.5``,
    ``20s``), ``m:ss`` or ``h:mm:ss``, optionally followed by ``-``, ``:`` or ``|``; times strictly
    increasing, the first ``0:00``.

    *Timed syntax* (Infinity-RoPE style): ``a red circle[5s] | a blue square[10s#] | ...``: segments
    separated by ``|`` (over any number of lines), each ending in its DURATION ``[Ns]`` (or ``[m:ss]``);
    segment i starts at the sum of the durations before it (the first at 0:00), so the last duration
    only says where the story ends and may be left out. ``#`` in the marker is a hard cut into that
    segment: its transition is ``cut`` even when the story's transition is ``blend``. After the last
    marker, ``; subtitles`` (Infinity-RoPE's subtitle list) are ignored with a warning. A text with a
    duration marker is read in the timed syntax (a segment may not also start with an m:ss time);
    newlines inside a segment are read as spaces.

    Both: lines starting with ``#`` are comments; full-width colons / digits / brackets and other
    common Unicode punctuation in times are read as ASCII; errors are ValueErrors naming the line;
    prompts starting at or beyond ``video_seconds`` are dropped with a warning."""
    text = "" if text is None else text
    if not isinstance(text, str):
        raise ValueError(f"line 1: a prompt story must be text, got {type(text).__name__}")
    # comments blanked (not removed), so offsets and line numbers stay those of the text
    kept = ["" if ln.strip().startswith(("#", "\uff03")) else ln for ln in text.splitlines()]
    body = "\n".join(kept)
    view = _ascii_view(body)
    if _MARKER.search(view):
        items, warns = _parse_timed(body, view)
    else:
        items, warns = _parse_lines(kept), []
    if not items:
        raise ValueError("no prompts found: write one prompt per line, each starting with its time, e.g. "
                         "'0:00 a street', or the timed syntax 'a street[5s] | rain starts[10s]'")
    if items[0].start != 0:
        raise ValueError(f"line {items[0].line}: the first prompt must start at 0:00, got {items[0].start:g} s")
    if video_seconds is not None:
        warns += [f"{it.source}: time {it.start:g} s is at or beyond the video's length ({video_seconds:g} s); dropped"
                  for it in items if it.start >= video_seconds]
        items = [it for it in items if it.start < video_seconds]
    for w in warns:
        warnings.warn(w, stacklevel=3)
    return items, warns


def _parse_lines(lines: list[str]) -> list[StoryItem]:
    out: list[StoryItem] = []
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        view = _ascii_view(raw)
        m = _LINE_TIME.match(view)
        shown = raw.strip()[:60]
        if not m:
            raise ValueError(f"line {n}: {shown!r} does not start with a time; write e.g. '0:20 rain starts' "
                             "(m:ss), '20 rain starts' (seconds) or '1:00:00 night falls' (h:mm:ss), or the "
                             "whole story in the timed syntax 'a street[5s] | rain starts[10s]'")
        if view[m.end():m.end() + 1] not in ("", " ", "-", ":", "|"):
            raise ValueError(f"line {n}: {raw.strip()[:m.end() - len(m.group(1)) + 1]!r} is not a time: write "
                             f"{TIME_HELP}, then the prompt")
        try:
            t = parse_clock(m.group(2), "start time")
        except ValueError as e:
            raise ValueError(f"line {n}: {e}") from None
        sep = _LINE_SEP.match(view, m.end())
        prompt = raw[sep.end():].strip()
        if not prompt:
            raise ValueError(f"line {n}: the prompt after {raw.strip()[:m.end()].strip()!r} is empty")
        if out and t <= out[-1].start:
            kind = "duplicate" if t == out[-1].start else "earlier than the previous line"
            raise ValueError(f"line {n}: time {t:g} s is {kind} ({out[-1].start:g} s on line {out[-1].line}); "
                             "times must be strictly increasing")
        out.append(StoryItem(t, prompt, n))
    return out


def _parse_timed(body: str, view: str) -> tuple[list[StoryItem], list[str]]:
    warns: list[str] = []
    last = list(_MARKER.finditer(view))[-1]
    end = len(view)
    if view[last.end():].strip().startswith(";"):
        end = last.end()
        warns.append(f"line {_line_of(view, last.end())}: the subtitles after ';' are ignored (the story sets "
                     "prompts only)")
    out: list[StoryItem] = []
    start, pos = Fraction(0), 0
    for k in itertools.count(1):
        bar = view.find("|", pos, end)
        stop = end if bar < 0 else bar
        piece_v, piece = view[pos:stop], body[pos:stop]
        line = _line_of(view, pos + len(piece_v) - len(piece_v.lstrip()))
        where = f"line {line}, segment {k}"
        found = list(_MARKER.finditer(piece_v))
        if not piece_v.strip():
            where = f"line {_line_of(view, max(pos - 1, 0))}, segment {k}"  # where the '|' before it is
            raise ValueError(f"{where}: empty segment (two '|' in a row, or a '|' at the end); write "
                             "'prompt[5s] | prompt[10s]'")
        dur, cut = None, False
        if found:
            m = found[-1]
            if len(found) > 1:
                raise ValueError(f"{where}: two duration markers ({found[0].group(0)!r} and {m.group(0)!r}); each "
                                 "segment ends in one '[Ns]', segments are separated by '|'")
            if piece_v[m.end():].strip():
                raise ValueError(f"{where}: text {piece[m.end():].strip()[:30]!r} after the duration marker "
                                 f"{m.group(0)!r}; the marker ends its segment: put a '|' before the next prompt")
            num, unit, flags = m.groups()
            if "@" in flags:
                raise ValueError(f"{where}: '@' (scene recall) in {m.group(0)!r} is not supported; use '#' for a "
                                 "hard cut or nothing for the story's transition")
            try:
                dur = _exact_clock(num + unit, "duration")
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            if dur <= 0:
                raise ValueError(f"{where}: duration {m.group(0)!r} must be more than 0 seconds")
            cut = "#" in flags
            prompt = piece[:m.start()].strip()
        else:
            if bar >= 0:
                raise ValueError(f"{where}: {piece.strip()[:40]!r} has no duration; end it with its length in "
                                 "seconds, e.g. '[5s]' (only the last segment may leave it out)")
            prompt = piece.strip()
        if not prompt:
            raise ValueError(f"{where}: the prompt before {found[-1].group(0)!r} is empty")
        if _CLOCK_START.match(_ascii_view(prompt)):
            raise ValueError(f"{where}: {prompt[:40]!r} starts with a time, but the story uses duration markers "
                             "('[5s]'); write it in one syntax: lines 'TIME PROMPT', or 'prompt[5s] | prompt[10s#]'")
        prompt = re.sub(r"\s*\n\s*", " ", prompt)
        if start > MAX_STORY_SECONDS:
            raise ValueError(f"{where}: starts after {MAX_STORY_SECONDS / 3600:g} hours")
        out.append(StoryItem(float(start), prompt, line, k, cut and k > 1, None if dur is None else float(dur)))
        start += dur or 0
        if bar < 0:
            break
        pos = bar + 1
    return out, warns


def parse_prompt_lines(text: str, video_seconds: float | None = None) -> tuple[list[tuple[float, str, int]], list[str]]:
    """Parse ``"0:00 a quiet street\\n0:20 rain starts"`` -> [(0.0, 'a quiet street', 1), (20.0, ...)].

    Either syntax of :func:`parse_story` (the line format, or the timed syntax ``a[5s] | b[10s#]``;
    use :func:`parse_story` for its hard cuts and durations). Errors are ValueErrors naming the line.
    Times at or beyond ``video_seconds`` are dropped with a warning (so a long story still previews
    at a short length). Returns (list of (start seconds, prompt, line number), warnings)."""
    items, warns = parse_story(text, video_seconds)
    return [(it.start, it.prompt, it.line) for it in items], warns


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
    applies: str = "entering"

    def __post_init__(self):
        if not _seconds_in(self.start_s, MAX_STORY_SECONDS):
            raise ValueError(f"{self.source or (repr(self.label) if self.label else 'prompt')}: start time must be a "
                             f"number of seconds from 0 to {MAX_STORY_SECONDS:g}, got {self.start_s!r}")
        check_options(self.transition, self.blend_seconds, self.recache, self.applies)


def check_options(transition: str, blend_seconds: float, recache: str, applies: str = "entering") -> None:
    """The transition options of a prompt (node inputs): ValueError naming the input and what is allowed."""
    _check_choices(applies=applies, transition=transition, recache=recache)
    if not _seconds_in(blend_seconds, MAX_BLEND_SECONDS):
        raise ValueError(f"blend_seconds must be a number of seconds from 0 to {MAX_BLEND_SECONDS:g}, "
                         f"got {blend_seconds!r}")


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
                                  it.label, "entering" if first else it.applies))
    for w in warns:
        warnings.warn(w, stacklevel=2)
    return PromptSchedule(segs), warns


def describe(schedule: PromptSchedule, timeline: Timeline | None = None) -> str:
    """One line per segment: its block and actual start time (the rounding rule, visible)."""
    tl, lines = timeline or Timeline(), []
    for s in schedule.segments:
        extra = "" if s.start_block == 0 else f", {s.transition}" + (
            f" over {s.blend_blocks} block(s)" if s.transition == "blend" else "") + (
            f", recache {s.recache}" if s.recache != "none" else "") + (
            ", applies to the window" if s.applies == "window" else "")
        lines.append(f"{tl.clock(tl.block_start(s.start_block))} (block {s.start_block}{extra}) {s.label}")
    return "\n".join(lines)
