"""Prompt-schedule node logic (no ComfyUI needed)."""
import importlib
import importlib.util
import sys

import pytest
import torch

from conftest import ROOT


def _pack():
    if "rf_pack" not in sys.modules:
        spec = importlib.util.spec_from_file_location("rf_pack", ROOT / "__init__.py",
                                                      submodule_search_locations=[str(ROOT)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["rf_pack"] = mod
        spec.loader.exec_module(mod)
    return importlib.import_module("rf_pack.nodes.prompt_logic")


def enc(p):
    g = torch.Generator().manual_seed(len(p))
    return torch.randn(1, 7, 8, generator=g)


def test_story_to_schedule():
    pl = _pack()
    prompts = pl.story_segments("0:00 a quiet street at dusk\n0:20 rain starts, neon reflections\n0:45 the camera rises",
                                enc, transition="blend", blend_s=1.5, recache="keep_sink")
    sched, warns = pl.build_schedule(prompts, 60.0, lambda c: torch.nn.functional.pad(c, (0, 0, 0, 512 - c.shape[1])))
    assert [s.start_block for s in sched.segments] == [0, 27, 60]
    assert sched.segments[0].transition == "cut" and sched.segments[1].blend_blocks == 2
    assert sched.segments[2].recache == "keep_sink" and sched.segments[1].context.shape == (1, 512, 8)
    text = pl.describe(sched)
    assert "0:20.06 (block 27, blend over 2 block(s), recache keep_sink)" in text
    assert not warns


def test_story_applies_reaches_the_core_schedule():
    """``applies=window`` (the new prompt conditions every block still in the window) travels from the
    node options into the core's segments (not the first one) and shows in the info text."""
    pl = _pack()
    prompts = pl.story_segments("0:00 a street\n0:20 rain", enc, recache="new_sink", applies="window")
    sched, _ = pl.build_schedule(prompts, 30.0, lambda c: c)
    assert [s.applies for s in sched.segments] == ["entering", "window"]
    assert sched.segments[1].recache == "new_sink"
    assert "recache new_sink, applies to the window" in pl.describe(sched)
    with pytest.raises(ValueError, match="applies must be one of entering, window, got 'all'"):
        pl.story_segments("0:00 a", enc, applies="all")


def test_schedule_errors_name_the_segment():
    pl = _pack()
    ident = lambda c: c  # noqa: E731
    with pytest.warns(UserWarning, match="line 2: starts at 90 s"):
        sched, warns = pl.build_schedule(pl.story_segments("0 a\n1:30 b", enc), 60.0, ident)
    assert len(sched.segments) == 1
    seg = pl.TimedPrompt
    bad = pl.PromptList((seg(0, enc("a"), "a", source="segment 1"), seg(10, enc("b"), "b", source="segment 2"),
                         seg(10, enc("c"), "c", source="segment 3")))
    with pytest.raises(ValueError, match="segment 3: start 10 s is the same time as"):
        pl.build_schedule(bad, 60, ident)
    close = pl.PromptList((seg(0, enc("a"), "a"), seg(10, enc("b"), "b", source="segment 2"),
                           seg(10.1, enc("c"), "c", source="segment 3")))
    with pytest.raises(ValueError, match="segment 3: 10.1 s rounds to block"):
        pl.build_schedule(close, 60, ident)
    with pytest.raises(ValueError, match="must start at 0:00"):
        pl.build_schedule(pl.PromptList((seg(5, enc("a"), "a"),)), 60, ident)
    with pytest.raises(ValueError, match="empty"):
        pl.build_schedule(pl.PromptList(), 60, ident)
    with pytest.raises(ValueError, match="line 2: the prompt after"):
        pl.story_segments("0 a\n0:10", enc)


def test_parse_time():
    pl = _pack()
    assert pl.parse_time("0:20") == 20 and pl.parse_time("1:05.5") == 65.5 and pl.parse_time("20s") == 20
    assert pl.parse_time(3) == 3.0
    for bad in ("x", "1:75", "-3"):
        with pytest.raises(ValueError):
            pl.parse_time(bad)


@pytest.mark.parametrize("text, seconds", [("1:00:00", 3600.0), ("0\uff1a20", 20.0), ("\uff12\uff10s", 20.0),
                                           (" 1:02:03.5 ", 3723.5), (0, 0.0), (12.5, 12.5)])
def test_parse_time_hours_and_unicode(text, seconds):
    assert _pack().parse_time(text) == seconds


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf", float("nan"), float("inf"), -1, 1e12, True, None, [1], "",
                                 "1:00:60", "1e3"])
def test_parse_time_refuses_non_times_by_name(bad):
    with pytest.raises(ValueError, match="start time"):
        _pack().parse_time(bad)


def test_story_timed_syntax_hash_is_a_cut_even_when_blending():
    pl = _pack()
    prompts = pl.story_segments("a red circle[5s] | a blue square[10s#] | a green triangle[5s]", enc,
                                transition="blend", blend_s=1.5, recache="keep_sink")
    segs = prompts.segments
    assert [(s.start_s, s.label, s.transition, s.source) for s in segs] == [
        (0.0, "a red circle", "blend", "line 1, segment 1"), (5.0, "a blue square", "cut", "line 1, segment 2"),
        (15.0, "a green triangle", "blend", "line 1, segment 3")]
    assert all(s.recache == "keep_sink" and s.blend_seconds == 1.5 for s in segs)
    sched, _ = pl.build_schedule(prompts, 20.0, lambda c: c)
    assert [(s.start_block, s.transition, s.blend_blocks) for s in sched.segments] == [
        (0, "cut", 0), (7, "cut", 2), (20, "blend", 2)]


@pytest.mark.parametrize("kw, msg", [({"blend_s": float("nan")}, "blend_seconds"), ({"blend_s": 1e9}, "from 0 to 600"),
                                     ({"transition": "fade"}, "transition must be one of")])
def test_story_refuses_bad_options_by_name(kw, msg):
    with pytest.raises(ValueError, match=msg):
        _pack().story_segments("0 a", enc, **kw)
