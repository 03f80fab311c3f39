"""The toy-world quality benchmarks (rolling.quality): the bounded run end to end (CI-sized), the time
bucketing, and the switch measurements on a run whose answer is known."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from rolling import quality
from rolling.timing import Timeline

from conftest import ROOT


@pytest.fixture(scope="module")
def bounded(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality")
    lines = []
    res = quality.run(bounded=True, log=lines.append)
    paths = quality.write(res, str(out), "python -m rolling bench quality --bounded")
    return res, paths, lines


def test_latent_pixel_bucketing():
    tl = Timeline()
    for b in range(0, 50):  # block starts are latent-frame starts
        assert quality.first_pixel(3 * b) == round(tl.block_start(b) * 16)
    for t in np.arange(0, 30, 0.37):
        la = quality.latent_at(t)
        assert quality.first_pixel(la) >= round(t * 16) and (la == 0 or quality.first_pixel(la - 1) < round(t * 16))
    z = torch.zeros(1, 16, 3 * Timeline().blocks_for(20.0), 8, 8)
    edges = quality.buckets(z, 5.0)
    assert edges[0][0] == 0 and all(a[1] == b[0] for a, b in zip(edges, edges[1:]))  # contiguous
    assert len(edges) == 4 and edges[-1][1] == z.shape[2]
    assert quality.buckets(z, 5.0, "ends") == [edges[0], edges[-1]]


def test_bounded_bench_end_to_end(bounded):
    res, paths, lines = bounded
    assert {"drift", "teacher", "switch", "rope"} <= set(res)
    d = res["drift"]["schedules"]
    assert set(d) == {"rolling", "chunk_causal"}
    for r in d.values():
        assert len(r["per_bucket"]) == 2 and r["seconds"] >= 24 and all(x["finite"] for x in r["runs"])
        for row in r["per_bucket"]:
            assert all(0 <= row[k] <= 1 for k in ("background", "colour", "shape", "found"))
            assert 0.1 < row["latent_spatial"] < 0.9  # structured latents: not static noise (~0), not constant
    t = res["teacher"]["rows"]
    assert any(k.startswith("teacher_8steps") for k in t) and len(t) == 3
    assert all(r["background"] >= 0.9 for r in t.values())  # every sampler gets the easiest attribute
    sw = res["switch"]["variants"]
    assert len(sw) == 2
    for v in sw.values():
        run = v["per_run"][0]
        assert run["changed"] == ["colour", "shape"] and run["switch_block"] == Timeline().block_at(6.0)
        assert run["typical_latent_step"] > 0 and run["jump_latent"] > 0
    rope = res["rope"]
    assert rope["latent_frames"] > 1024 and rope["rope_limit_latent_frames"] == 1024
    r = rope["runs"]["rolling / reference"]
    assert r["after_limit"]["found"] is not None and r["last_bucket"]["start_s"] > 256
    # the two RoPE modes are the same attention (RoPE scores depend on offsets only): float rounding apart
    assert rope["mode_difference"]["rolling"]["max_abs"] < 1e-2
    # written files carry the command and the model; the tables print
    names = sorted(p.rsplit("/", 1)[1] for p in paths)
    assert names == sorted(quality.FILES.values())
    for p in paths:
        j = json.loads(open(p).read())
        assert j["command"].startswith("python -m rolling bench quality") and j["model"]["name"]
        assert "_latents" not in json.dumps(j)
    text = quality.tables(res)
    for head in ("Drift", "Teacher vs student", "Prompt switches", "RoPE modes"):
        assert head in text
    assert any("drift: schedule chunk_causal" in x for x in lines)


def test_switch_run_measures_a_known_switch():
    """A switch between two prompts that differ in colour: the latency search finds the block from
    which the detector reads the new colour, and the switch block is the one the rounding rule gives."""
    from rolling.toy import TextEncoder, load_vae
    cm = quality.load_causal()
    r = quality.switch_run(cm, load_vae(), TextEncoder(), "a red circle drifting left on a dark background",
                           "a red circle drifting left on a light background", seconds=9.0, switch_s=4.5, seed=0)
    assert r["changed"] == ["background"] and r["switch_block"] == Timeline().block_at(4.5)
    shows, s, T = r["shows_new_by_block"], r["switch_block"], len(cm.steps)
    # blocks finished before the switch block entered the window never saw the new prompt: still dark
    assert not any(shows[:s - T + 1]), shows
    assert r["latency_blocks"] is not None and -T < r["latency_blocks"] <= 3, r["latency_blocks"]
    b = r["switch_block"] + r["latency_blocks"]
    assert all(shows[b:b + 3]) and not all(shows[b - 1:b + 2])  # the first such block
    assert r["after"]["background"] >= 0.8  # a background switch is what even a weak model gets
    assert r["before_acc"]["background"] >= 0.8


def test_cli_dispatch_and_unknown_bench():
    r = subprocess.run([sys.executable, "-m", "rolling", "bench", "quality", "--bounded", "--only", "nope"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "unknown quality benchmark 'nope'" in r.stderr
