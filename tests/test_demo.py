"""The demo: the toy world's student streams a prompted video; the written MP4 is read back and checked
with the toy detectors (colour / shape of the prompt, structure unlike static, story switches)."""
import subprocess
import sys

import numpy as np
import pytest

from rolling.demo import read_video, run_demo
from rolling.toy import detect
from rolling.video import probe_frame_count

from conftest import ROOT

RED = "a red circle drifting left on a dark background"   # the demo's default prompt
BLUE = "a blue square bouncing on a light background"


def _labels(frames):
    dets = detect.detect(frames)
    return {k: detect.majority(d[k] for d in dets) for k in ("background", "colour", "shape")}, dets


def test_demo_command_writes_playable_mp4(tmp_path):
    out = tmp_path / "demo.mp4"
    r = subprocess.run([sys.executable, "-m", "rolling", "demo", "--seconds", "2", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "blocks/s" in r.stdout
    assert RED in r.stdout and "detector accuracy" in r.stdout  # the default prompt, scored at the end
    # 2 s -> 3 blocks = 9 latent frames = 33 pixel frames
    assert probe_frame_count(str(out)) == 33


def _shares(dets, key):
    found = [d for d in dets if d["found"]]
    return {v: sum(d[key] == v for d in found) / max(1, len(found)) for v in {d[key] for d in found}}


def test_default_demo_frames_show_the_prompted_colour_and_shape(tmp_path):
    out = str(tmp_path / "d.mp4")
    st = run_demo(out, 6.0, quiet=True)
    frames = read_video(out, scale=4)  # the written video, back at 64x64
    assert frames.shape == (st["frames"], 64, 64, 3)
    labels, dets = _labels(frames)
    assert (labels["background"], labels["colour"]) == ("dark", "red"), labels
    assert sum(d["found"] for d in dets) >= 0.9 * len(dets)
    assert _shares(dets, "colour").get("red", 0) >= 0.7
    seg = st["segments"]
    assert len(seg) == 1 and seg[0]["caption"] == RED and seg[0]["frames"] == st["frames"]
    assert seg[0]["colour"] >= 0.7 and seg[0]["background"] >= 0.95
    # the shape follows the prompt: the same run (seed, colour, motion) prompted with a square / a
    # triangle shows far fewer circles, and more of its own shape (the small student's shapes are its
    # weakest attribute, so this compares prompts instead of asking for a fixed accuracy)
    circle = _shares(dets, "shape")
    for other in ("square", "triangle"):
        out2 = str(tmp_path / f"{other}.mp4")
        run_demo(out2, 6.0, prompt=RED.replace("circle", other), quiet=True)
        shares = _shares(_labels(read_video(out2, scale=4))[1], "shape")
        assert circle.get("circle", 0) >= shares.get("circle", 0) + 0.15, (circle, other, shares)
        assert shares.get(other, 0) >= circle.get(other, 0) + 0.15, (circle, other, shares)
    # the same frames are not "blue": the detector discriminates
    assert detect.score(frames, "a blue circle drifting left on a dark background")["colour"] < 0.3


def test_demo_frames_are_structured_unlike_static(tmp_path):
    out = str(tmp_path / "d.mp4")
    run_demo(out, 3.0, prompt="a yellow triangle orbiting on a light background", quiet=True)
    frames = read_video(out, scale=4)
    corr = detect.spatial_correlation(frames)
    static = np.random.default_rng(0).random(frames.shape).astype(np.float32)
    assert corr.min() > 0.8, corr.min()
    assert abs(detect.spatial_correlation(static).mean()) < 0.05
    labels, _ = _labels(frames)
    assert labels["background"] == "light" and labels["colour"] == "yellow"


@pytest.mark.parametrize("prompt, word", [("a purple circle drifting left on a dark background", "purple"),
                                          ("a red circle", None)])
def test_demo_prompt_is_checked_against_the_grammar(tmp_path, prompt, word):
    out = tmp_path / "bad.mp4"
    r = subprocess.run([sys.executable, "-m", "rolling", "demo", "--prompt", prompt, "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    err = r.stderr
    if word:
        assert repr(word) in err and "allowed words: a, red, green, blue, yellow, circle" in err
    else:
        assert "does not follow the grammar" in err and "colours: red, green, blue, yellow" in err
    assert not out.exists()


def test_demo_story_line_errors_name_the_line(tmp_path):
    with pytest.raises(ValueError, match=r"story line 2: .*unknown word\(s\) \['pink'\]"):
        run_demo(str(tmp_path / "s.mp4"), 4.0, story=f"0:00 {RED}\n0:02 a pink circle bouncing on a dark background",
                 quiet=True)
    assert not (tmp_path / "s.mp4").exists()


def test_demo_story_switch_changes_the_detected_colour(tmp_path):
    out = str(tmp_path / "story.mp4")
    st = run_demo(out, 9.0, story=f"0:00 {RED}\\n0:04.5 {BLUE}", quiet=True)  # a written-out \n, as from a shell
    seg = st["segments"]
    assert [s["caption"] for s in seg] == [RED, BLUE]
    assert seg[1]["start_s"] == pytest.approx(4.5, abs=0.375)  # the nearest block start
    frames = read_video(out, scale=4)
    sw = int(round(seg[1]["start_s"] * 16))
    before, _ = _labels(frames[:sw])
    after, _ = _labels(frames[sw + 16:])  # from 1 s after the switch
    assert (before["colour"], before["background"]) == ("red", "dark"), before
    assert (after["colour"], after["background"]) == ("blue", "light"), after
    assert seg[0]["colour"] >= 0.6 and seg[1]["colour"] >= 0.6 and seg[1]["background"] >= 0.8


def test_random_model_demo_keeps_the_speed_path(tmp_path):
    out = tmp_path / "r.mp4"
    r = subprocess.run([sys.executable, "-m", "rolling", "demo", "--random-model", "--seconds", "2", "--out",
                        str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "random model" in r.stdout and "blocks/s" in r.stdout and "detector" not in r.stdout
    assert probe_frame_count(str(out)) == 33
