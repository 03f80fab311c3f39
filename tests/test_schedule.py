"""The schedules (rolling.schedule) and the time and flow arithmetic: model-free, property-tested."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rolling.cache import OWN, RollingKVCache
from rolling.config import RollingConfig, parse_steps, validate_steps
from rolling.flow import FlowSchedule
from rolling.schedule import SCHEDULES, WRITES, Forward, Reanchor, chunk_windows, forwards, recache_blocks, rolling_windows
from rolling.timing import Timeline, pixel_frames

RUNS = st.tuples(st.sampled_from(SCHEDULES), st.integers(1, 5), st.integers(1, 10), st.sampled_from(WRITES),
                 st.integers(0, 2))


def _forwards(schedule, T, nb, writes, first=0, switches=None):
    return [f for f in forwards(schedule, T, nb, writes=writes, first_block=first, switches=switches)
            if isinstance(f, Forward)]


@settings(max_examples=150, deadline=None)
@given(RUNS)
def test_every_block_is_denoised_once_per_step_in_order(run):
    schedule, T, nb, writes, first = run
    first = min(first, nb - 1)
    seen = {b: [] for b in range(first, nb)}
    finished, noisy = [], {}
    for f in _forwards(schedule, T, nb, writes, first):
        for b, j in zip(f.blocks, f.steps):
            seen[b].append(j)
            assert (j == 0) == (b in f.fresh)
            assert j == 0 or noisy.pop(b) == j  # its input was re-noised to exactly this step
        for b, j in f.renoise:
            assert j == seen[b][-1] + 1 and b not in noisy
            noisy[b] = j
        for b in f.finished:
            assert seen[b][-1] == T - 1
        finished += f.finished
        assert list(f.blocks) == list(range(f.blocks[0], f.blocks[-1] + 1)) if f.blocks else f.clean
    assert all(v == list(range(T)) for v in seen.values())
    assert finished == list(range(first, nb)) and not noisy
    assert [f.index for f in _forwards(schedule, T, nb, writes, first)] == list(range(len(_forwards(
        schedule, T, nb, writes, first))))


def _replay(schedule, T, nb, writes, first=0, switches=None):
    """Run the plans through a real (tiny, CPU) KV cache: per denoising forward, what it reads, resolved to
    (block, frame, position, the step of the x0 that the *slot* read was written from), and the sink."""
    cfg = RollingConfig(steps=tuple(range(1000, 1000 - 100 * T, -100)), schedule=schedule,
                        update_mode="fused" if writes == "fused" else "reference")
    cache = RollingKVCache(cfg, num_layers=1, num_heads=1, head_dim=6, batch=1, grid=(1, 1), device="cpu",
                           dtype=torch.float32)
    fb = cfg.frames_per_block
    kept, clean_src, slot_src, reads = {b: "prefix" for b in range(first)}, {}, {}, []
    for f in forwards(schedule, T, nb, writes=writes, first_block=first, switches=switches,
                      span_frames=cfg.span_frames, sink_blocks=cfg.sink_blocks):
        if isinstance(f, Reanchor):
            cache.commit(cache.reanchored(f.block))
            continue
        plan = cache.plan(f)
        src_of = {b: clean_src[b] if f.kind == "recache" else kept[b] for b in f.clean}
        for g in plan.groups:
            window = []
            for s in g.sources:
                for i in range(s.f0, s.f1):
                    if s.block == OWN:
                        if i >= len(f.clean) * fb:
                            continue  # the forward's own noisy frames
                        blk, src = f.clean[i // fb], src_of[f.clean[i // fb]]
                    else:
                        blk = s.block
                        slot = ("sink", plan.book.sink.index(blk)) if s.sink else ("ring", plan.book.ring_slot(blk))
                        src = slot_src[slot]
                    window.append((blk, i % fb, s.pos + i - s.f0, src))
            if g.q0 >= len(f.clean) * fb and f.kind != "recache":
                reads.append((f.window, sorted(window), plan.book.sink))
        cache.commit(plan)
        for b, _, where, slot in plan.writes:
            slot_src[(where, slot)] = clean_src[b] = src_of[b]
        for b in f.clean:
            kept.pop(b, None)
        for b, j in zip(f.blocks, f.steps):
            if b in f.keep:
                kept[b] = j
    return reads, cfg


@settings(max_examples=100, deadline=None)
@given(RUNS)
def test_denoising_reads_see_only_finished_clean_blocks(run):
    """Every cached key a denoising forward reads was written (before it) from its block's final x0."""
    schedule, T, nb, writes, first = run
    first = min(first, nb - 1)
    reads, _ = _replay(schedule, T, nb, writes, first)
    for _, keys, _ in reads:
        assert all(src in ("prefix", T - 1) for *_, src in keys), keys


@pytest.mark.parametrize("switch", [1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("writes", WRITES)
@pytest.mark.parametrize("mode", ["reanchor", "keep_sink", "new_sink"])
def test_recache_and_reanchor_at_every_early_block(switch, writes, mode):
    """A re-encoding switch at blocks 1..6 (inside the first windows, where block 0 is still rewritten
    by ramp-up passes): every read still sees finished clean blocks only; with reanchor the sink is the
    new segment's first block from the window after its clean write on (before, block 0, finished)."""
    T, nb = 5, 14
    reads, _ = _replay("rolling", T, nb, writes, switches={switch: mode})
    for w, keys, sink in reads:
        assert all(src in ("prefix", T - 1) for *_, src in keys), (w, keys)
        if mode == "reanchor" and w > switch + T - 1:
            assert sink == (switch,), (w, sink)
        elif mode != "new_sink":
            assert sink in ((0,), (-1,)), (w, sink)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(SCHEDULES), st.integers(1, 5), st.integers(1, 10), st.integers(0, 2))
def test_all_write_placements_read_the_same_keys(schedule, T, nb, first):
    """fused / needed / every: different forwards, the same keys (block, frame, position) for every window."""
    first = min(first, nb - 1)
    def keys(*a, **kw):
        return [(w, k) for w, k, _ in _replay(*a, **kw)[0]]
    runs = [keys(schedule, T, nb, w, first) for w in WRITES]
    assert runs[0] == runs[1] == runs[2]
    switched = [keys(schedule, T, nb + 6, w, first, switches={first + 3: "keep_sink"}) for w in WRITES]
    assert switched[0] == switched[1] == switched[2]


def test_reference_schedules_count_the_published_forwards():
    # Rolling Forcing: 12 blocks, 5 steps -> 16 windows + 16 update passes (the shared golden trace: 32 calls)
    rf = _forwards("rolling", 5, 12, "every")
    assert len(rf) == 32 and sum(not f.blocks for f in rf) == 16
    assert len(_forwards("rolling", 5, 12, "fused")) == 16  # one forward per window
    # Self-Forcing: 7 blocks x (4 steps + 1 update) = 35 calls
    sf = _forwards("chunk_causal", 4, 7, "every")
    assert len(sf) == 35 and [f.kind for f in sf[:5]] == ["window"] * 4 + ["update"]
    assert [f.kind for f in _forwards("chunk_causal", 4, 3, "fused")] == ["window"] * 4 + ["fused"] + \
        ["window"] * 3 + ["fused"] + ["window"] * 3


def test_windows_closed_form_and_streams():
    assert [w.blocks for w in rolling_windows(5, 3)] == [(0,), (0, 1), (0, 1, 2), (0, 1, 2), (0, 1, 2), (1, 2), (2,)]
    it = rolling_windows(5, None)
    ws = [next(it) for _ in range(20)]
    assert ws[-1].blocks == tuple(range(15, 20)) and ws[-1].write == 15
    c = chunk_windows(4, None, start=9)
    assert [(w.blocks, w.steps, w.write) for w in (next(c), next(c), next(c))] == [
        ((2,), (1,), None), ((2,), (2,), None), ((2,), (3,), 2)]


def test_recache_comes_before_the_switch_window_and_in_flight_blocks_follow_the_new_prompt():
    items = list(forwards("rolling", 5, 10, writes="fused", switches={6: "keep_sink"}))
    i = next(n for n, it in enumerate(items) if isinstance(it, Forward) and it.kind == "recache")
    # window 6 holds blocks 2..6: blocks 0, 1 are clean; both are re-encoded (the sink too: an early switch)
    assert items[i].clean == (0, 1) and items[i].query_only == 0 and items[i].text_from == 6
    assert items[i - 1].kind == "update" and items[i - 1].clean == (1,)  # the due write is flushed first
    assert 6 in items[i + 1].fresh
    later = [f for f in items[i + 1:] if f.clean]
    assert [f.text_from for f in later if f.clean[0] < 6] == [6, 6, 6, 6]  # blocks 2..5 cached under the new prompt
    assert all(f.text_from is None for f in later if f.clean[0] >= 6)
    assert isinstance(list(forwards("rolling", 5, 20, switches={12: "reanchor"}))[13], (Forward, Reanchor))
    assert any(isinstance(it, Reanchor) and it.block == 12 for it in forwards("rolling", 5, 20, switches={12: "reanchor"}))


@pytest.mark.parametrize("first, expect", [
    (0, ((), 0)), (1, ((0,), 0)), (4, ((0, 1, 2, 3), 0)),  # early: everything, the sink too
    (5, ((1, 2, 3, 4), 1)), (9, ((5, 6, 7, 8), 1)),  # late: the oldest maps onto the kept sink, query only
])
def test_recache_blocks_is_longlives_rule(first, expect):
    """LongLive (span 12 frames = 4 blocks, sink 3 frames): n = min(span, s) frames before the switch."""
    assert recache_blocks(first, 12, 3, 1, "keep_sink") == expect
    assert recache_blocks(first, 12, 3, 1, "new_sink") == (expect[0], 0)


def test_warped_reference_steps():
    t = FlowSchedule(5.0).warp([1000, 800, 600, 400, 200])
    assert t == pytest.approx([1000.0, 952.381, 882.353, 769.231, 555.556], abs=1e-3)
    s = FlowSchedule(5.0)
    assert s.sigma(0.0) == pytest.approx(0.00498, abs=1e-5)
    assert s.sigma(t[1]) == pytest.approx(20 / 21, abs=1e-6)
    assert FlowSchedule(5.0).warp([1000, 750, 500, 250]) == pytest.approx([1000, 937.5, 833.333, 625.0], abs=1e-3)


@pytest.mark.parametrize("fb", [1, 2, 3, 4])
def test_time_units(fb):
    tl = Timeline(fb)
    assert pixel_frames(21) == 81 and pixel_frames(126) == 501
    assert Timeline().blocks_for(5) == 7 and Timeline().seconds(42) == pytest.approx(31.3125)
    assert tl.block_seconds == 4 * fb / 16 and tl.block_start(1) == (4 * fb - 3) / 16
    for s in (0.1, 1, 4.9, 5, 30, 255.6):
        assert tl.seconds(tl.blocks_for(s)) >= s - 1 / 16
        assert tl.seconds(tl.blocks_for(s)) < s + tl.block_seconds + 1 / 16
    for t in (0.0, 0.3, 5.0, 20.0, 61.7, 3599.0):  # a switch lands within half a block of the time asked
        assert abs(tl.block_start(tl.block_at(t)) - t) <= tl.block_seconds / 2 + 1e-9
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="positive number of seconds"):
            tl.blocks_for(bad)
    with pytest.raises(ValueError, match="finite"):
        tl.block_at(float("nan"))
    assert Timeline.clock(20.0625) == "0:20.06" and Timeline.clock(3725.5) == "1:02:05.50"


@pytest.mark.parametrize("steps,msg", [([], "empty"), ([1000, 1000], "strictly decreasing"),
                                       ([800, 1000], "strictly decreasing"), ([1200, 800], "1..1000"),
                                       ([1000, 0], "1..1000"), ([1000, 500.5], "whole number"), (["a"], "numbers")])
def test_bad_step_lists(steps, msg):
    with pytest.raises(ValueError, match=msg):
        validate_steps(steps)


def test_parse_steps():
    assert parse_steps("") == (1000, 800, 600, 400, 200)
    assert parse_steps("1000, 750,500 250") == (1000, 750, 500, 250)
    with pytest.raises(ValueError, match="comma-separated"):
        parse_steps("1000, x")


def test_rolling_config_validation():
    assert RollingConfig().window_frames == 15 and RollingConfig().ring_blocks == 7
    assert RollingConfig(schedule="chunk_causal", span_frames=12, capacity_frames=15).window_frames == 3
    for kw, msg in [({"span_frames": 17}, "span_frames"), ({"capacity_frames": 25}, "multiple of frames_per_block"),
                    ({"update_mode": "fast"}, "update_mode"), ({"capacity_frames": 3}, "sink"),
                    ({"span_frames": float("nan")}, "span_frames"), ({"schedule": "diagonal"}, "schedule"),
                    ({"shift": float("inf")}, "shift"), ({"context_noise": float("nan")}, "context_noise")]:
        with pytest.raises(ValueError, match=msg):
            RollingConfig(**kw)
    RollingConfig(sink_blocks=0, steps=(1000, 500), span_frames=6, capacity_frames=6)
