"""Per-segment prompt switching (issue 5): assignment, untouched windows, blend, recache, parsing."""
import pytest
import torch

from rolling.config import RollingConfig
from rolling.prompts import (PromptSchedule, PromptSegment, StoryItem, TimedPrompt, check_options, parse_clock,
                             parse_prompt_lines, parse_story, schedule_from_times)
from rolling.timing import Timeline
from rolling.sampler import RollingSampler


def _ctx(seed, dim=16):
    g = torch.Generator().manual_seed(seed)
    c = torch.zeros(1, 512, dim)
    c[:, :6] = torch.randn(1, 6, dim, generator=g) * 2
    return c


def _sampler(model, calls=None, **cfg):
    return RollingSampler(model, RollingConfig(**cfg), height=4, width=6, dtype=torch.float32, device="cpu", seed=5,
                          on_call=None if calls is None else calls.append)


def test_rounding_rule():
    tl = Timeline()
    assert tl.block_start(0) == 0 and tl.block_start(1) == 9 / 16 and tl.block_start(27) == 321 / 16
    assert tl.block_at(20) == 27  # 20.06 s
    for t in (0, 0.3, 5, 20, 45, 600):
        assert abs(tl.block_start(tl.block_at(t)) - t) <= 0.375 + 1e-9
    # other block lengths move the switch with them: 2-frame blocks are 0.5 s apart
    assert Timeline(2).block_at(20) == 40 and Timeline(2).block_start(40) == pytest.approx(19.8125)


@pytest.mark.parametrize("mode", ["reference", "fused"])
def test_blocks_use_their_own_segment_and_untouched_windows_are_identical(tiny_model, mode):
    A, B = _ctx(1), _ctx(2)
    sched = PromptSchedule([PromptSegment(0, A, label="A"), PromptSegment(7, B, label="B")])
    calls = []
    out = {b.index: b for b in _sampler(tiny_model, calls, update_mode=mode).stream(sched, 12)}
    single = {b.index: b for b in _sampler(tiny_model, update_mode=mode).stream(A, 12)}
    # every block of every denoising call is conditioned on its own segment
    for c in calls:
        if c.kind != "denoise":
            continue
        first = c.start_frame // 3
        assert c.text == tuple((0,) if first + k < 7 else (1,) for k in range(c.num_frames // 3))
    # windows 0..6 contain no block of B: the blocks they finish (0..2) are identical to a single-prompt run
    for b in range(3):
        assert torch.equal(out[b].latents, single[b].latents)
    assert not torch.allclose(out[11].latents, single[11].latents)
    assert out[3].segment == "A" and out[8].segment == "B"


def test_blend_moves_block_by_block(tiny_model):
    A, B = _ctx(1), _ctx(2)
    sched = PromptSchedule([PromptSegment(0, A), PromptSegment(4, B, transition="blend", blend_blocks=3)])
    assert [sched.conditioning(b) for b in range(3, 9)] == [(0,), (1, 0.25), (1, 0.5), (1, 0.75), (1,), (1,)]
    assert torch.allclose(sched.embedding((1, 0.25)), 0.75 * A + 0.25 * B)
    calls = []
    out = _sampler(tiny_model, calls).generate(sched, 10)
    assert torch.isfinite(out).all()
    keys = {k for c in calls for k in c.text}
    assert {(0,), (1, 0.25), (1, 0.5), (1, 0.75), (1,)} <= keys


def _reads(model, sched, num_blocks, **cfg):
    """Run a schedule; per denoising forward, what its denoising queries read from the KV cache:
    {window: [(block, prompt key it was encoded under), ...]}, and the forwards themselves."""
    from rolling.cache import OWN
    s = _sampler(model, **cfg)
    plans, fwds = [], []
    orig = s._run

    def run(st, fwd, sources):
        out = orig(st, fwd, sources)
        plans.append(out["plan"])
        fwds.append(fwd)
        return out
    s._run = run
    s.generate(sched, num_blocks)
    reads = {}
    for fwd, plan in zip(fwds, plans):
        if not fwd.blocks:
            continue
        g = plan.groups[-1]
        got = []
        for src in g.sources:
            if src.block == OWN:
                if src.f0 < len(fwd.clean) * 3:  # a clean block written in this (fused) forward
                    got.append((fwd.clean[0], plan.book.tag(fwd.clean[0])))
            else:
                got.append((src.block, plan.book.tag(src.block)))
        reads[fwd.window] = got
    return reads, fwds


@pytest.mark.parametrize("mode", ["keep_sink", "new_sink", "reanchor"])
@pytest.mark.parametrize("update", ["reference", "fused"])
def test_every_window_after_a_switch_reads_the_new_prompt(tiny_model, mode, update):
    """After a re-encoding switch at block 14 (late: the clean history is longer than the span), every
    cached block a window reads was encoded under the new prompt, except the sink, which keeps the old
    prompt (keep_sink; reanchor until block 14 is finished), or is the oldest re-encoded block (new_sink)."""
    A, B = _ctx(1), _ctx(2)
    switch = 14
    sched = PromptSchedule([PromptSegment(0, A), PromptSegment(switch, B, recache=mode)])
    reads, fwds = _reads(tiny_model, sched, 22, update_mode=update)
    rec = [f for f in fwds if f.kind == "recache"]
    # window 14 holds blocks 10..14: blocks 0..9 are clean; the last span (21 frames = 7 blocks) is re-encoded
    assert len(rec) == 1 and rec[0].clean == (3, 4, 5, 6, 7, 8, 9)
    assert rec[0].query_only == (0 if mode == "new_sink" else 1)
    for w, got in reads.items():
        if w < switch:
            assert all(tag == (0,) for _, tag in got), (w, got)  # before the switch: the old prompt only
            continue
        sink, rest = got[0], got[1:]
        assert all(tag == (1,) for _, tag in rest), (w, got)  # every non-sink read: the new prompt
        if mode == "new_sink":
            assert sink == (3, (1,)), (w, got)  # the oldest re-encoded block is the sink
        elif mode == "reanchor" and w > switch + 4:  # block 14 finished at window 18, written after it
            assert sink == (switch, (1,)), (w, got)
        else:
            assert sink == (0, (0,)), (w, got)  # the sink kept its old K/V
    # blocks in flight at the switch (10..13) are cached under the new prompt when they finish
    late = [f for f in fwds if f.clean and f.kind != "recache" and 10 <= f.clean[0] < switch]
    assert late and all(f.text_from == switch for f in late)


def test_early_switch_rewrites_the_sink_in_every_mode(tiny_model):
    """Switch at block 6 (window 6 holds blocks 2..6): the clean history (blocks 0, 1) fits in the span,
    so it is all re-encoded, the sink too (as LongLive does when the history fits its window)."""
    A, B = _ctx(1), _ctx(2)
    for mode in ("keep_sink", "new_sink"):
        reads, fwds = _reads(tiny_model, PromptSchedule([PromptSegment(0, A), PromptSegment(6, B, recache=mode)]), 12)
        assert [f.clean for f in fwds if f.kind == "recache"] == [(0, 1)]
        assert all(tag == (1,) for w, got in reads.items() if w >= 6 for _, tag in got), reads


def test_window_applies_the_new_prompt_to_blocks_in_flight(tiny_model):
    A, B = _ctx(1), _ctx(2)
    calls = []
    sched = PromptSchedule([PromptSegment(0, A), PromptSegment(9, B, applies="window")])
    _sampler(tiny_model, calls).generate(sched, 12)
    den = [c for c in calls if c.kind == "denoise"]
    w8, w9 = den[8], den[9]  # window 8 (blocks 4..8) is before the switch, window 9 (blocks 5..9) after
    assert w8.text == ((0,),) * 5 and w9.text == ((1,),) * 5
    entering = []
    _sampler(tiny_model, entering).generate(PromptSchedule([PromptSegment(0, A), PromptSegment(9, B)]), 12)
    assert [c for c in entering if c.kind == "denoise"][9].text == ((0,),) * 4 + ((1,),)


def test_blend_with_recache_reencodes_under_the_new_prompt(tiny_model):
    """The re-encode at a blended switch uses the new prompt itself, not the blend's first weight."""
    A, B = _ctx(1), _ctx(2)
    calls = []
    sched = PromptSchedule([PromptSegment(0, A), PromptSegment(9, B, "blend", 3, recache="keep_sink")])
    _sampler(tiny_model, calls).generate(sched, 14)
    rec = [c for c in calls if c.kind == "recache"]
    assert rec and all(k == (1,) for c in rec for k in c.text)
    assert {(1, 0.25), (1, 0.5), (1, 0.75)} <= {k for c in calls if c.kind == "denoise" for k in c.text}


def test_recache_changes_outputs_only_after_the_switch(tiny_model):
    A, B = _ctx(1), _ctx(2)
    cut = _sampler(tiny_model).generate(PromptSchedule([PromptSegment(0, A), PromptSegment(9, B)]), 14)
    for mode in ("keep_sink", "new_sink", "reanchor"):
        rec = _sampler(tiny_model).generate(PromptSchedule([PromptSegment(0, A), PromptSegment(9, B, recache=mode)]), 14)
        # blocks finished before window 9 (0..4) are identical; later ones differ
        assert torch.equal(rec[:, :, :15], cut[:, :, :15])
        assert not torch.allclose(rec[:, :, 27:], cut[:, :, 27:])


def test_parse_prompt_lines():
    segs, warns = parse_prompt_lines("0:00 a quiet street at dusk\n# comment\n\n0:20 rain starts, neon reflections\n"
                                     "45.5 the camera rises", video_seconds=60)
    assert segs == [(0.0, "a quiet street at dusk", 1), (20.0, "rain starts, neon reflections", 4),
                    (45.5, "the camera rises", 5)]
    assert warns == []
    with pytest.warns(UserWarning, match="line 2: time 90 s is at or beyond"):
        segs, warns = parse_prompt_lines("0 a\n1:30 b", video_seconds=60)
    assert len(segs) == 1 and warns


@pytest.mark.parametrize("text,msg", [
    ("0:00 a\n0:10 b\n0:05 c", "line 3: time 5 s is earlier"),
    ("0:00 a\n0:10 b\n0:10 c", "line 3: time 10 s is duplicate"),
    ("0:00 a\n0:10", "line 2: the prompt after"),
    ("a street", "line 1: 'a street' does not start with a time"),
    ("0:05 a", "first prompt must start at 0:00"),
    ("", "no prompts found"),
    ("0:75 a", "ss below 60"),
])
def test_parse_errors_name_the_line(text, msg):
    with pytest.raises(ValueError, match=msg):
        parse_prompt_lines(text)


@pytest.mark.parametrize("text,expect", [
    ("0\uff1a00 a\n0\uff1a20 b", [(0.0, "a", 1), (20.0, "b", 2)]),  # full-width colons
    ("\uff10:\uff10\uff10 a\n\uff10:\uff12\uff10 b", [(0.0, "a", 1), (20.0, "b", 2)]),  # full-width digits
    ("0:00 a\n0\u223630 b\n0\ufe5540 c", [(0.0, "a", 1), (30.0, "b", 2), (40.0, "c", 3)]),  # ratio, small colon
    ("0 a\n20\uff0e5\uff53 \u2013 b\n0:30\u3000c", [(0.0, "a", 1), (20.5, "b", 2), (30.0, "c", 3)]),
    ("0:00 a\n1:00:00 b\n1:02:03.5 c", [(0.0, "a", 1), (3600.0, "b", 2), (3723.5, "c", 3)]),  # h:mm:ss
    ("0:00 a\n0:20: b\n0:30 | c\n40 - d", [(0.0, "a", 1), (20.0, "b", 2), (30.0, "c", 3), (40.0, "d", 4)]),
])
def test_parse_times_unicode_and_hours(text, expect):
    assert parse_prompt_lines(text)[0] == expect


@pytest.mark.parametrize("text,msg", [
    ("0:00 a\n1:00:60 b", "line 2: start time '1:00:60' has 60 seconds"),
    ("0:00 a\n1:60:00 b", "line 2: start time '1:60:00' has 60 minutes"),
    ("0:00 a\n1:2:3:4 b", "line 2: start time '1:2:3:4' is not a time"),
    ("0:00 a\n20x b", "line 2: '20x' is not a time"),
    ("0:00 a\n20,5 b", "line 2: '20,' is not a time"),
    ("0:00 a\n1.5.5 b", "line 2: start time '1.5.5' is not a time"),
    ("0 a\n999999999999:00 b", "line 2: start time .* is more than 100 hours"),
    ("nan a", "line 1: 'nan a' does not start with a time"),
    ("0 a\ninf b", "line 2: 'inf b' does not start with a time"),
])
def test_parse_time_errors_name_the_line(text, msg):
    with pytest.raises(ValueError, match=msg):
        parse_prompt_lines(text)


def test_timed_syntax_durations_add_up_and_hash_is_a_cut():
    items, warns = parse_story("a red circle[5s] | a blue square[10s#] | a green\n  triangle[2.5s] | the end")
    assert items == [StoryItem(0.0, "a red circle", 1, 1, False, 5.0),
                     StoryItem(5.0, "a blue square", 1, 2, True, 10.0),
                     StoryItem(15.0, "a green triangle", 1, 3, False, 2.5),
                     StoryItem(17.5, "the end", 2, 4, False, None)]
    assert not warns and items[1].source == "line 1, segment 2"
    # the 3-tuple interface reads the same story
    assert parse_prompt_lines("a[5s] | b[10s#]")[0] == [(0.0, "a", 1), (5.0, "b", 1)]
    # exact sums (0.1 + 0.2 is 0.3 here), m:ss durations, full-width brackets/bar, comments, line numbers
    items, _ = parse_story("# story\na[0.1s] |\nb[0.2s] \uff5c c\uff3b1:00#\uff3d | d")
    assert [(i.start, i.prompt, i.line, i.cut) for i in items] == [(0.0, "a", 2, False), (0.1, "b", 3, False),
                                                                  (0.3, "c", 3, True), (60.3, "d", 3, False)]
    # Infinity-RoPE's subtitle list after ';' is ignored, with a warning
    with pytest.warns(UserWarning, match="subtitles after ';' are ignored"):
        items, warns = parse_story("a[10s] | b[10s#] ; sub 1 | sub 2")
    assert [i.prompt for i in items] == ["a", "b"] and len(warns) == 1
    # beyond the video: dropped with a warning naming the segment
    with pytest.warns(UserWarning, match="line 1, segment 3: time 20 s is at or beyond"):
        items, _ = parse_story("a[10s] | b[10s] | c", video_seconds=15)
    assert [i.prompt for i in items] == ["a", "b"]


@pytest.mark.parametrize("text,msg", [
    ("a[5s] | b | c[2s]", "line 1, segment 2: 'b' has no duration"),
    ("a[5s] b", "line 1, segment 1: text 'b' after the duration marker"),
    ("[5s] | b", "line 1, segment 1: the prompt before '\\[5s\\]' is empty"),
    ("a[0s] | b", "line 1, segment 1: duration '\\[0s\\]' must be more than 0"),
    ("a[5s@] | b", "'@' .* is not supported"),
    ("a[5s][3s] | b", "two duration markers"),
    ("a[5s] |\n\n| b", "line 1, segment 2: empty segment"),
    ("a[5s] | b[1:75]", "line 1, segment 2: duration '1:75' has 75 seconds"),
    ("0:00 a[5s] | b", "line 1, segment 1: '0:00 a' starts with a time, but the story uses duration markers"),
])
def test_timed_syntax_errors_name_line_and_segment(text, msg):
    with pytest.raises(ValueError, match=msg):
        parse_story(text)


def test_parse_clock():
    assert parse_clock("1:00:00") == 3600 and parse_clock("0:20") == 20 and parse_clock("20.5s") == 20.5
    assert parse_clock(" 0\uff1a05 ") == 5 and parse_clock("1:05.25") == 65.25
    for bad in ("", "-3", "nan", "inf", "1e3", "1:", ":5", "0x10", "1:2:3:4"):
        with pytest.raises(ValueError, match="time"):
            parse_clock(bad)


@pytest.mark.parametrize("blend,ok", [(0, True), (2.5, True), (600, True), (600.5, False), (1e9, False),
                                      (-1, False), (float("nan"), False), (float("inf"), False), (True, False),
                                      ("2", False), (None, False)])
def test_blend_seconds_range(blend, ok):
    if ok:
        check_options("blend", blend, "none")
        return
    with pytest.raises(ValueError, match=r"blend_seconds must be a number of seconds from 0 to 600, got"):
        check_options("blend", blend, "none")


@pytest.mark.parametrize("start", [float("nan"), float("inf"), -1.0, 1e12, "5", None, True])
def test_timed_prompt_refuses_bad_start_times(start):
    with pytest.raises(ValueError, match="segment 2: start time must be a number of seconds from 0 to"):
        TimedPrompt(start, _ctx(1), "b", source="segment 2")


def test_schedule_from_times_and_errors():
    A, B = _ctx(1), _ctx(2)
    s, _ = schedule_from_times([TimedPrompt(0, A, "a"), TimedPrompt(20, B, "b", "blend", 1.5, "keep_sink")])
    assert [x.start_block for x in s.segments] == [0, 27]
    assert s.segments[1].blend_blocks == 2 and s.segments[1].recache == "keep_sink"
    s2, _ = schedule_from_times([TimedPrompt(0, A, "a"), TimedPrompt(20, B, "b", "blend", 1.5)], Timeline(2))
    assert [x.start_block for x in s2.segments] == [0, 40] and s2.segments[1].blend_blocks == 3
    with pytest.raises(ValueError, match="at least one block"):
        schedule_from_times([TimedPrompt(0, A, "a"), TimedPrompt(0.2, B, "b")])
    with pytest.raises(ValueError, match="must start at 0:00"):
        PromptSchedule([PromptSegment(2, A)])
    with pytest.raises(ValueError, match="transition"):
        PromptSegment(0, A, transition="fade")
