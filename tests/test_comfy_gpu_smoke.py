"""bench/gpu_smoke.py, run as users run it (a subprocess, from another folder), on the CPU with the tiny
config: the real node path end to end (loader, sampler with and without the VAE), one JSON per weight
dtype and the table. On a CUDA machine the same script runs at full 1.3B size (see its docstring)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.comfyui import env

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_smoke.py"


def _run(args, cwd, environ, timeout=900):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=environ, capture_output=True,
                          text=True, timeout=timeout)


def test_gpu_smoke_says_why_it_cannot_run_without_comfyui(tmp_path):
    environ = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
    proc = _run(["--device", "cpu", "--config", "tiny", "--out-dir", str(tmp_path)], tmp_path, environ, 120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "COMFYUI_PATH not set" in proc.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.comfy
def test_gpu_smoke_runs_tiny_on_cpu(tmp_path):
    env.require_comfyui()
    out = tmp_path / "results"
    args = ["--device", "cpu", "--config", "tiny", "--out-dir", str(out), "--models-dir", str(tmp_path / "models")]
    proc = _run(args, tmp_path, dict(os.environ))  # not the repository root: the script finds its imports itself
    log = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, log
    files = sorted(p.name for p in out.iterdir())
    assert files == ["gpu_smoke_cpu_tiny_bf16.json", "gpu_smoke_cpu_tiny_fp16.json"], files
    version = re.search(r'__version__ = "(.*)"', (Path(env.comfyui_path()) / "comfyui_version.py").read_text())[1]
    for name, dtype in zip(files, ("bf16", "fp16")):
        r = json.loads((out / name).read_text())
        assert r["ok"], r
        assert r["command"] == "python bench/gpu_smoke.py " + " ".join(args)
        assert (r["weight_dtype"], r["config"], r["width"], r["height"], r["blocks"]) == (dtype, "tiny", 64, 64, 2)
        assert (r["gpu"], r["device"], r["comfyui"], r["torch"]) == ("cpu", "cpu", version, torch.__version__)
        assert r["checkpoint"]["parameters"] > 0 and r["checkpoint"]["bytes"] > 0
        assert r["pixel_frames"] == 21 and r["conditioning"] == [1, 512, 4096]
        assert set(r["runs"]) == {"cold", "warm", "dit_only"}
        for run_name, run in r["runs"].items():
            assert run["ok"] and run["finite"] and run["progress_updates"] == 2, (run_name, run)
            assert run["latent_shape"] == [1, 16, 6, 8, 8]
            assert run["pixel_frames"] == (21 if run["vae"] else 0) and run["vae"] == (run_name != "dit_only")
            assert 0 < run["first_block_s"] < run["total_s"] and len(run["block_s"]) == 1
            assert run["steady_fps"] == pytest.approx(12 / run["block_s"][0], rel=0.01)
            assert run["peak_allocated_bytes"] is None  # CUDA only
        summary = r["summary"]
        assert summary["first_block_latency_s"] == r["runs"]["cold"]["first_block_s"]
        assert summary["steady_fps"] == r["runs"]["warm"]["steady_fps"]
        assert summary["dit_only_fps"] == r["runs"]["dit_only"]["steady_fps"]
        assert summary["compute_dtype"] in ("float32", "bfloat16", "float16")
    table = proc.stdout
    assert "gpu_smoke: cpu" in table and "first block s" in table
    assert sum(line.startswith(("bf16 ", "fp16 ")) for line in table.splitlines()) == 6, table
