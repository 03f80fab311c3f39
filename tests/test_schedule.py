import pytest

from rolling.config import RollingConfig, parse_steps, validate_steps
from rolling.schedule import FlowSchedule, blocks_for_seconds, iter_windows, num_windows, pixel_frames, seconds_for_blocks


def test_warped_reference_steps():
    t = FlowSchedule(5.0).warp([1000, 800, 600, 400, 200])
    assert t == pytest.approx([1000.0, 952.381, 882.353, 769.231, 555.556], abs=1e-3)
    s = FlowSchedule(5.0)
    assert s.sigma(0.0) == pytest.approx(0.00498, abs=1e-5)
    assert s.sigma(t[1]) == pytest.approx(20 / 21, abs=1e-6)
    assert FlowSchedule(5.0).warp([1000, 750, 500, 250]) == pytest.approx([1000, 937.5, 833.333, 625.0], abs=1e-3)


@pytest.mark.parametrize("nb", [1, 2, 3, 4, 5, 6, 12])
@pytest.mark.parametrize("T", [1, 3, 5])
def test_every_block_sees_every_step_once_in_order(nb, T):
    seen = {b: [] for b in range(nb)}
    wins = list(iter_windows(nb, T))
    assert len(wins) == num_windows(nb, T)
    finished = []
    for w in wins:
        assert list(w.blocks) == list(range(max(0, w.index - T + 1), min(nb - 1, w.index) + 1))
        for b in w.blocks:
            seen[b].append(w.step(b))
        if w.finished_block is not None:
            finished.append(w.finished_block)
    assert all(v == list(range(T)) for v in seen.values())
    assert finished == list(range(nb))  # each block leaves exactly once, in order


def test_unbounded_windows():
    it = iter_windows(None, 5)
    ws = [next(it) for _ in range(20)]
    assert ws[-1].blocks == range(15, 20) and ws[-1].finished_block == 15


def test_time_units():
    assert pixel_frames(21) == 81 and pixel_frames(126) == 501
    assert blocks_for_seconds(5) == 7  # 81 frames = 5.06 s
    assert seconds_for_blocks(42) == pytest.approx(31.3125)
    for s in (0.1, 1, 4.9, 5, 30, 255.6):
        assert seconds_for_blocks(blocks_for_seconds(s)) >= s - 1 / 16
        assert seconds_for_blocks(blocks_for_seconds(s)) < s + 0.75 + 1 / 16
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="positive number of seconds"):
            blocks_for_seconds(bad)


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
    with pytest.raises(ValueError, match="span_frames"):
        RollingConfig(span_frames=17)
    with pytest.raises(ValueError, match="multiple of frames_per_block"):
        RollingConfig(capacity_frames=25)
    with pytest.raises(ValueError, match="update_mode"):
        RollingConfig(update_mode="fast")
    with pytest.raises(ValueError, match="sink"):
        RollingConfig(capacity_frames=3)
    RollingConfig(sink_blocks=0, steps=(1000, 500), span_frames=6, capacity_frames=6)
