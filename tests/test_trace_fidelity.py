"""Fidelity against the golden trace of the published sampler (../shared/fixtures/reference-tiny)."""
import dataclasses
import subprocess
import sys

import pytest
import torch

from rolling.sampler import RollingSampler
from rolling.trace import recover_noise, replay_calls

from conftest import ROOT, TRACE_DIR

TOL = 1e-4


@pytest.mark.parametrize("rope", ["reference", "relative"])
def test_every_call_within_tolerance(trace, rope):
    res = replay_calls(trace, rope_mode=rope)
    assert res["calls"] == 32
    assert res["v"] < TOL, res
    assert res["x0"] < TOL, res
    assert all(c["v"] < TOL for c in res["per_call"])


def _run(trace, **cfg):
    calls = []
    h, w = trace.latent_hw
    s = RollingSampler(trace.model, trace.rolling_config.with_(**cfg), height=h, width=w, dtype=torch.float32,
                       device="cpu", noise=recover_noise(trace), on_call=calls.append)
    out = s.generate(trace.tensors["context"], 12)
    return out, calls, s.forwards


def test_sampler_schedule_equals_trace(trace):
    _, calls, forwards = _run(trace)
    ref = trace.calls
    assert forwards == len(ref) == len(calls)
    for mine, theirs in zip(calls, ref):
        assert mine.start_frame == theirs["start_frame"]
        assert mine.num_frames == theirs["num_frames"]
        assert mine.updating_cache == theirs["updating_cache"]
        assert mine.timesteps == pytest.approx(theirs["timesteps"], abs=1e-4)


@pytest.mark.parametrize("mode,rope", [("reference", "reference"), ("reference", "relative"),
                                       ("fused", "reference"), ("fused", "relative")])
def test_end_to_end_replay_reproduces_latents(trace, mode, rope):
    out, calls, forwards = _run(trace, update_mode=mode, rope_mode=rope)
    ref = trace.tensors["latents"].permute(0, 2, 1, 3, 4)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() < TOL
    if mode == "fused":
        # same denoising calls as the trace; the needless update passes are skipped
        den = [(c.start_frame, c.num_frames) for c in calls if not c.updating_cache]
        assert den == [(c["start_frame"], c["num_frames"]) for c in trace.calls if not c["updating_cache"]]
        assert forwards == 16 < 32


def test_wrong_rule_is_caught(trace):
    """Sanity: the check is sensitive. A sink at fixed positions (a known mistake) breaks the 1e-4 bound."""
    from rolling.cache import RollingKVCache
    orig = RollingKVCache._denoise_group

    def fixed_sink(self, *a):
        g = orig(self, *a)
        return dataclasses.replace(g, sources=tuple(dataclasses.replace(s, pos=0) if s.sink else s
                                                    for s in g.sources))
    RollingKVCache._denoise_group = fixed_sink
    try:
        res = replay_calls(trace)
    finally:
        RollingKVCache._denoise_group = orig
    assert res["v"] > 1e-2


def test_verify_trace_command(trace):  # the fixture says how to get the shared fixtures when missing
    r = subprocess.run([sys.executable, "-m", "rolling", "verify-trace", str(TRACE_DIR)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PASS" in r.stdout
    r = subprocess.run([sys.executable, "-m", "rolling", "verify-trace", str(TRACE_DIR), "--tol", "1e-9"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "FAIL" in r.stdout


EXTRA = ROOT / "tests" / "data" / "traces"


@pytest.mark.parametrize("name", ["l3h6", "ctxnoise", "long"])
@pytest.mark.parametrize("mode", ["reference", "fused"])
def test_other_traces(name, mode):
    """Traces of other sizes, depths, head counts and context noise, produced the same way."""
    from rolling.trace import load_trace
    tr = load_trace(str(EXTRA / name))
    if mode == "reference":
        res = replay_calls(tr)
        assert res["v"] < TOL and res["x0"] < TOL, res
    n = tr.meta["latent_shape"][1] // 3
    h, w = tr.latent_hw
    s = RollingSampler(tr.model, tr.rolling_config.with_(update_mode=mode), height=h, width=w, dtype=torch.float32,
                       device="cpu", noise=recover_noise(tr))
    out = s.generate(tr.tensors["context"], n)
    assert (out - tr.tensors["latents"].permute(0, 2, 1, 3, 4)).abs().max().item() < TOL


SELF_FORCING = ["default_21f", "local12_sink3", "local10_nosink", "ctxnoise"]


@pytest.mark.parametrize("name", SELF_FORCING)
@pytest.mark.parametrize("mode", ["reference", "fused"])
def test_self_forcing_traces(name, mode):
    """The chunk-causal schedule against Self-Forcing's published inference code: every call (reference
    mode: same calls in the same order), and an end-to-end run from the recorded noise, both write modes."""
    from rolling.trace import load_trace
    tr = load_trace(str(EXTRA / "self_forcing" / name))
    assert tr.rolling_config.schedule == "chunk_causal"
    calls = []
    h, w = tr.latent_hw
    s = RollingSampler(tr.model, tr.rolling_config.with_(update_mode=mode), height=h, width=w, dtype=torch.float32,
                       device="cpu", noise=recover_noise(tr), on_call=calls.append)
    out = s.generate(tr.tensors["context"], tr.meta["num_blocks"])
    assert (out - tr.tensors["latents"].permute(0, 2, 1, 3, 4)).abs().max().item() < TOL
    if mode == "reference":
        res = replay_calls(tr)
        assert res["v"] < TOL and res["x0"] < TOL, res
        assert [(c.start_frame, c.num_frames, c.updating_cache) for c in calls] == \
            [(c["start_frame"], c["num_frames"], c["updating_cache"]) for c in tr.calls]
        assert all(c.timesteps == pytest.approx(t["timesteps"], abs=1e-4) for c, t in zip(calls, tr.calls))
    else:  # the last block's clean pass is never read; the others ride in the next block's first forward
        assert s.forwards == len(tr.calls) - tr.meta["num_blocks"]


LONGLIVE = ["gsink_late", "nosink_late", "gsink_early", "nosink_early", "gsink_edge"]


@pytest.mark.parametrize("name", LONGLIVE)
@pytest.mark.parametrize("mode", ["reference", "fused"])
def test_longlive_prompt_switch_traces(name, mode):
    """LongLive 1.0's interactive pipeline (prompt switches with its re-encode of the recent history, both
    sink modes, early and edge switches): every call, including the re-encode, and the run end to end."""
    from rolling.trace import load_trace
    tr = load_trace(str(EXTRA / "longlive" / name))
    calls = []
    h, w = tr.latent_hw
    s = RollingSampler(tr.model, tr.rolling_config.with_(update_mode=mode), height=h, width=w, dtype=torch.float32,
                       device="cpu", noise=recover_noise(tr), on_call=calls.append)
    out = s.generate(tr.prompts(), tr.meta["latent_shape"][1] // 3)
    assert (out - tr.tensors["latents"].permute(0, 2, 1, 3, 4)).abs().max().item() < TOL
    recaches = [c for c in tr.calls if c["kind"] == "recache"]
    assert [(c.start_frame, c.num_frames) for c in calls if c.kind == "recache"] == \
        [(c["start_frame"], c["num_frames"]) for c in recaches]
    if mode == "reference":
        res = replay_calls(tr)
        assert res["v"] < TOL and res["x0"] < TOL, res
        assert [(c.start_frame, c.num_frames, c.updating_cache) for c in calls] == \
            [(c["start_frame"], c["num_frames"], c["updating_cache"]) for c in tr.calls]
