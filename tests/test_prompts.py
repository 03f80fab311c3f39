"""Per-segment prompt switching (issue 5): assignment, untouched windows, blend, recache, parsing."""
import pytest
import torch

from rolling.config import RollingConfig
from rolling.prompts import PromptSchedule, PromptSegment, TimedPrompt, parse_prompt_lines, schedule_from_times
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


def _cache_after(model, sched, stop_block):
    s = _sampler(model)
    for blk in s.stream(sched, 14):
        if blk.index == stop_block:
            break
    return s


@pytest.mark.parametrize("mode", ["keep_sink", "reanchor"])
def test_recache_rewrites_exactly_the_cached_blocks(tiny_model, mode):
    A, B = _ctx(1), _ctx(2)
    switch = 9
    cut = PromptSchedule([PromptSegment(0, A), PromptSegment(switch, B)])
    rec = PromptSchedule([PromptSegment(0, A), PromptSegment(switch, B, recache=mode)])
    calls = []
    s = _sampler(tiny_model, calls)
    it = s.stream(rec, 14)
    # window 9 is where block 9 enters; blocks 0..4 are finished before it (yielded at windows 4..8)
    for blk in it:
        if blk.index == 4:
            break
    ref = _cache_after(tiny_model, cut, 4)
    # block 4's clean-cache pass is still pending here (it runs before window 9, then the recache)
    assert s.cache.cached_blocks() == ref.cache.cached_blocks() == [0, 1, 2, 3]
    k_before = s.cache.ring_k.clone(), s.cache.sink_k.clone()
    next(it)  # runs the recache, then windows 9..
    recs = [c for c in calls if c.kind == "recache"]
    expect = [1, 2, 3, 4] if mode in ("keep_sink", "reanchor") else []
    assert [c.start_frame // 3 for c in recs] == expect
    assert all(c.text == ((1,),) for c in recs)  # re-encoded under the new prompt
    # the sink is untouched by the recache itself
    assert torch.equal(s.cache.sink_k, k_before[1])
    if mode == "reanchor":
        for blk in it:
            if blk.index == switch:  # the new segment's first block is finished -> becomes the sink
                break
        next(it)  # its clean-cache pass runs before the next window
        assert s.cache.book.sink == (switch,) and s.cache.cached_blocks()[0] == switch
        assert all(b > switch or b == switch for b in s.cache.cached_blocks())
        assert not torch.equal(s.cache.sink_k, k_before[1])
    else:
        for blk in it:
            pass
        assert s.cache.book.sink == (0,)


def test_recache_changes_outputs_only_after_the_switch(tiny_model):
    A, B = _ctx(1), _ctx(2)
    cut = _sampler(tiny_model).generate(PromptSchedule([PromptSegment(0, A), PromptSegment(9, B)]), 14)
    for mode in ("keep_sink", "reanchor"):
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
