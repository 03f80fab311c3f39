#!/usr/bin/env python
"""GPU smoke benchmark of the real ComfyUI node path at full Wan2.1-T2V-1.3B size, no downloads.

    COMFYUI_PATH=/path/to/ComfyUI python bench/gpu_smoke.py            # CUDA, 1.3B, 832x480, 8 blocks
    COMFYUI_PATH=... python bench/gpu_smoke.py --device cpu --config tiny   # the CPU check the tests run

What it runs, in-process in the installed ComfyUI (``tests/comfyui/env.py``, imported from the
repository root, which this script puts on sys.path itself):

* a seeded random DiT of the chosen size (``rolling.model.build_model``, stored in bf16: ~2.8 GB for
  1.3B) written as a release checkpoint (``generator_ema``) to a temporary models folder;
* ``RollingForcingModelLoader.execute`` for each weight dtype (default bf16 and fp16: the loader's
  weight_dtype options), then ``RollingForcingSampler.execute`` with a random real Wan2.1 VAE (the
  injection pack's ``random_wan_vae_state_dict``) and a random umT5-like conditioning [1, 512, 4096];
* per dtype three runs: ``cold`` (right after loading: ComfyUI moves the weights, kernels warm up),
  ``warm`` (the same again) and ``dit_only`` (no VAE: latents only).

Measured with ``torch.cuda.synchronize`` at each ComfyUI ProgressBar update (one per block): first-block
latency (execute start -> first update), block times (median, p99), steady fps (pixel frames per
second after the first block: 12 per block), DiT-only fps, peak GPU memory (max allocated and
reserved). One JSON per weight dtype goes to ``--out-dir`` (default bench/results/), named
``gpu_smoke_<device>_<dtype>.json`` (``_<config>`` before the dtype for other configs than 1.3B),
with the GPU, torch, CUDA, ComfyUI versions and the exact command; a short table is printed.

Per attention kernel: ``--attention`` takes a comma-separated list of the loader's options (or ``all``:
auto, sdpa, cudnn, flash, sage); with more than one, every (dtype, option) pair is run and written as
``gpu_smoke_<device>_<dtype>_<option>.json``, each naming the kernel that actually ran
(``attention_backend``; an unavailable option falls back to sdpa). ``--kernels`` (default: on CUDA) also
times each attention option alone on the steady window's shapes (queries of the window, keys of the
span; :func:`time_attention_kernels`) and writes ``gpu_smoke_<device>_attention_kernels.json``: one line
per option with the kernel that ran, median / p99 ms per call, TFLOP/s, peak memory and the largest
difference from sdpa's output (a numerical check, not the toy-world quality measurement Sage needs).

Exit status: 0 when every run finished with finite outputs, 1 otherwise, 2 when it cannot run here.
"""
from __future__ import annotations

import argparse
import atexit
import datetime
import gc
import json
import math
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # rolling, scripts and tests.comfyui are imported from the repository root
    sys.path.insert(0, str(ROOT))

CONFIGS = {  # name -> (DiT config for checkpoints.random_wan_state_dict, default width, height, blocks)
    "1.3B": ("1.3B", 832, 480, 8),
    "tiny": ("tiny-comfy", 64, 64, 2),  # checkpoints.TINY_WAN: the smallest DiT ComfyUI detects as Wan
}
WEIGHT_DTYPES = ("bf16", "fp16")
PIXEL_FRAMES_PER_BLOCK = 12  # 3 latent frames -> 12 pixel frames at 16 fps (the first block: 9)
FPS = 16


def pixel_frames(blocks: int) -> int:
    """Pixel frames of ``blocks`` blocks: 3 latent frames each, N latent frames decode to 1 + 4 (N - 1)."""
    return 1 + 4 * (3 * blocks - 1)
RUNS = (("cold", True), ("warm", True), ("dit_only", False))  # (name, with the VAE)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--config", choices=sorted(CONFIGS), default="1.3B")
    p.add_argument("--blocks", type=int, help="blocks per run (default 8 for 1.3B: 93 frames, 5.8 s; 2 for tiny)")
    p.add_argument("--width", type=int, help="default 832 (1.3B) / 64 (tiny)")
    p.add_argument("--height", type=int, help="default 480 (1.3B) / 64 (tiny)")
    p.add_argument("--dtypes", default=",".join(WEIGHT_DTYPES),
                   help="comma-separated loader weight_dtype values (default bf16,fp16)")
    p.add_argument("--attention", default="auto",
                   help="the loader's attention option, or a comma-separated list of them, or 'all' (default auto)")
    p.add_argument("--kernels", choices=("auto", "on", "off"), default="auto",
                   help="time each attention option alone on the steady window's shapes (default: on CUDA only)")
    p.add_argument("--kernel-iters", type=int, default=20, help="timed calls per attention option (default 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random DiT, VAE, conditioning and noise")
    p.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--models-dir", type=Path,
                   help="keep the random checkpoint here and reuse it on the next run (default: a temporary folder)")
    a = p.parse_args(argv)
    _, w, h, blocks = CONFIGS[a.config]
    a.width, a.height, a.blocks = a.width or w, a.height or h, a.blocks or blocks
    a.dtypes = [d.strip() for d in a.dtypes.split(",") if d.strip()]
    from rolling.attention import BACKENDS
    a.attentions = list(BACKENDS) if a.attention == "all" else [x.strip() for x in a.attention.split(",") if x.strip()]
    bad = [x for x in a.attentions if x not in BACKENDS]
    if bad or not a.attentions:
        p.error(f"--attention: unknown option(s) {', '.join(bad) or '(none)'}; choose from {', '.join(BACKENDS)} or all")
    a.attention = a.attentions[0] if len(a.attentions) == 1 else ",".join(a.attentions)
    if a.blocks < 1:
        p.error("--blocks must be at least 1")
    if a.kernel_iters < 1:
        p.error("--kernel-iters must be at least 1")
    return a


def percentile(values, q: float):
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    s = sorted(values)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


def git_commit(path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(path), "describe", "--always", "--dirty", "--abbrev=12"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


class Clock:
    """Wall-clock times of the ProgressBar updates, each after synchronizing the device."""

    def __init__(self, sync):
        self.sync = sync
        self.updates: list[tuple[int, float]] = []

    def hook(self, value, total, preview, node_id=None, **kw):
        self.sync()
        self.updates.append((value, time.perf_counter()))

    def now(self) -> float:
        self.sync()
        return time.perf_counter()


def write_checkpoint(a, device: str) -> tuple[Path, dict]:
    """The random DiT in the release layout (bf16 storage) in the models folder; reused when there."""
    import torch

    from tests.comfyui import checkpoints

    if a.models_dir is None:
        folder = Path(tempfile.mkdtemp(prefix="rf_gpu_smoke_"))
        atexit.register(shutil.rmtree, folder, True)  # ~2.8 GB for 1.3B: not left behind
    else:
        folder = a.models_dir
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"rolling_forcing_random_{slug(a.config)}_seed{a.seed}.pt"
    t0 = time.perf_counter()
    reused = path.exists()
    if not reused:
        sd = checkpoints.random_wan_state_dict(CONFIGS[a.config][0], seed=a.seed, dtype=torch.bfloat16,
                                               device=device)
        params = sum(v.numel() for v in sd.values())
        checkpoints.write_release_checkpoint(path.with_suffix(".tmp"), state_dict=sd, regular=False)
        path.with_suffix(".tmp").rename(path)
        del sd
        gc.collect()
    else:
        params = None
    return path, {"file": path.name, "bytes": path.stat().st_size, "parameters": params, "reused": reused,
                  "write_s": round(time.perf_counter() - t0, 3), "layout": "release .pt, generator_ema, bf16"}


def run_once(a, model, vae, cond, seconds: float, clock: Clock, cuda: bool, env) -> dict:
    import comfy.utils
    import torch

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    clock.updates.clear()
    old = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(clock.hook)
    try:
        node = env.prepared_node("RollingForcingSampler", "smoke")
        t0 = clock.now()
        with torch.inference_mode():
            out = node.execute(model, cond, a.width, a.height, seconds, a.seed, vae=vae)
        t_end = clock.now()
    finally:
        comfy.utils.set_progress_bar_global_hook(old)
    latent, images, info = out.result[:3]
    times = [t for _, t in clock.updates]
    blocks = [b - a_ for a_, b in zip(times, times[1:])]
    steady = PIXEL_FRAMES_PER_BLOCK * len(blocks) / (times[-1] - times[0]) if len(blocks) else None
    frames = int(images.shape[0]) if isinstance(images, torch.Tensor) else 0
    r = {
        "vae": vae is not None,
        "total_s": round(t_end - t0, 4),
        "first_block_s": round(times[0] - t0, 4) if times else None,
        "block_s": [round(b, 4) for b in blocks],
        "block_ms_median": round(statistics.median(blocks) * 1e3, 2) if blocks else None,
        "block_ms_p99": round(percentile(blocks, 99) * 1e3, 2) if blocks else None,
        "steady_fps": round(steady, 2) if steady else None,
        "overall_fps": round(frames / (t_end - t0), 2) if frames else None,
        "progress_updates": len(times),
        "pixel_frames": frames,
        "latent_shape": list(latent["samples"].shape),
        "finite": bool(torch.isfinite(latent["samples"]).all()) and (
            not frames or bool(torch.isfinite(images).all())),
        "compute_dtype": (re.search(r"compute (\w+)", info) or [None, None])[1],
        "peak_allocated_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "peak_reserved_bytes": torch.cuda.max_memory_reserved() if cuda else None,
    }
    r["ok"] = r["finite"] and r["progress_updates"] == a.blocks
    return r


def attention_shapes(width: int, height: int, heads: int = 12, head_dim: int = 128) -> dict:
    """q / k shapes [B, L, H, D] of a steady window's self-attention at ``width`` x ``height`` pixels
    (1.3B: 12 heads of 128): queries of the denoising window, keys of the attention span."""
    from rolling.config import RollingConfig

    rc = RollingConfig()
    tokens = (height // 8 // 2) * (width // 8 // 2)  # VAE x8, patch 2x2
    return {"q": [1, rc.window_frames * tokens, heads, head_dim], "kv": [1, rc.span_frames * tokens, heads, head_dim],
            "tokens_per_frame": tokens, "window_frames": rc.window_frames, "span_frames": rc.span_frames}


def time_attention_kernels(device: str, options, shapes: dict, dtype=None, iters: int = 20, warmup: int = 3,
                           seed: int = 0) -> list[dict]:
    """Each attention option (``rolling.attention.get_attention``) alone on random q/k/v of ``shapes``
    (:func:`attention_shapes`): one dict per option with the kernel that ran (``fallback`` when it is
    sdpa instead), median / p99 ms per call (synchronized), TFLOP/s (4 * B * H * Lq * Lk * D per call),
    peak memory (CUDA) and the largest absolute difference from sdpa's output on the same inputs."""
    import warnings

    import torch

    from rolling.attention import get_attention, sdpa_attention

    cuda = torch.device(device).type == "cuda"
    dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(shapes["q"], device=device, dtype=dtype, generator=g)
    k = torch.randn(shapes["kv"], device=device, dtype=dtype, generator=g)
    v = torch.randn(shapes["kv"], device=device, dtype=dtype, generator=g)
    b, lq, h, d = shapes["q"]
    flops = 4 * b * h * lq * shapes["kv"][1] * d
    with torch.inference_mode():
        ref = sdpa_attention(q, k, v).float()
    rows = []
    for name in options:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn = get_attention(name, device)
        row = {"option": name, "kernel": fn.kernel, "fallback": name not in ("auto", "sdpa") and fn.kernel == "sdpa",
               "warning": str(caught[0].message) if caught else None, "shapes": {"q": shapes["q"], "kv": shapes["kv"]},
               "dtype": str(dtype).replace("torch.", "")}
        try:
            with torch.inference_mode():
                for _ in range(warmup):
                    out = fn(q, k, v)
                sync()
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                times = []
                for _ in range(iters):
                    t0 = time.perf_counter()
                    out = fn(q, k, v)
                    sync()
                    times.append(time.perf_counter() - t0)
            med = statistics.median(times)
            row.update(ms_median=round(med * 1e3, 4), ms_p99=round(percentile(times, 99) * 1e3, 4), iters=iters,
                       tflops_per_s=round(flops / med / 1e12, 3), flops_per_call=flops,
                       peak_allocated_bytes=torch.cuda.max_memory_allocated() if cuda else None,
                       max_abs_diff_vs_sdpa=float((out.float() - ref).abs().max()),
                       finite=bool(torch.isfinite(out).all()), ok=True)
        except Exception as e:  # one kernel failing (e.g. an unsupported head size) does not hide the others
            row.update(ok=False, error=f"{type(e).__name__}: {e}")
        rows.append(row)
    return rows


def gib(n):
    return None if n is None else round(n / 2 ** 30, 2)


def main(argv=None) -> int:
    a = parse_args(argv)
    command = shlex.join(["python", "bench/gpu_smoke.py", *(sys.argv[1:] if argv is None else argv)])
    from tests.comfyui import env, inject_pack

    reason = env.missing_reason()
    if reason:
        print(f"gpu_smoke: cannot run: {reason}", file=sys.stderr)
        return 2
    import torch

    cuda = a.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("gpu_smoke: cannot run: no CUDA device (torch.cuda.is_available() is False); "
              "use --device cpu --config tiny for the CPU check", file=sys.stderr)
        return 2
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t_import = time.perf_counter()
    cu = env.comfyui(cpu=not cuda)
    import comfy.model_management as mm
    import comfy.sd

    import_s = time.perf_counter() - t_import
    seconds = pixel_frames(a.blocks) / FPS  # exactly a.blocks blocks (the sampler rounds seconds up to blocks)
    device = mm.get_torch_device()
    gpu = torch.cuda.get_device_name(device) if cuda else "cpu"
    ckpt, ckpt_info = write_checkpoint(a, "cuda" if cuda else "cpu")
    cu["folder_paths"].add_model_folder_path("diffusion_models", str(ckpt.parent))
    vae = comfy.sd.VAE(sd=inject_pack.random_wan_vae_state_dict(a.seed))
    cond = inject_pack.random_conditioning(a.seed + 1, tokens=24)
    backend = cu["pack"].rolling.attention.get_attention(a.attentions[0], device)  # what "auto" resolves to here
    common = {
        "benchmark": "gpu_smoke", "command": command, "comfyui_path": env.comfyui_path(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device), "gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda if cuda else None,
        "cudnn": torch.backends.cudnn.version() if cuda else None, "comfyui": env.comfyui_version(),
        "comfyui_commit": git_commit(env.comfyui_path()), "pack_commit": git_commit(ROOT),
        "python": platform.python_version(), "host": platform.node(),
        "config": a.config, "width": a.width, "height": a.height, "blocks": a.blocks, "seconds": seconds,
        "pixel_frames": pixel_frames(a.blocks), "seed": a.seed, "attention": a.attention,
        "attention_backend": getattr(backend, "__name__", str(backend)),
        "vae_dtype": str(vae.vae_dtype).replace("torch.", ""), "conditioning": [1, 512, 4096],
        "checkpoint": ckpt_info, "comfyui_import_s": round(import_s, 3),
        "definitions": {
            "first_block_s": "RollingForcingSampler.execute start -> first ProgressBar update (cuda-synchronized)",
            "block_s": "intervals between consecutive ProgressBar updates (one per block; decode included with the "
                       "VAE; the update synchronizes the whole device, a background decode stream too)",
            "overall_fps": "decoded pixel frames / total_s (execute start to end, cold: with the weight upload)",
            "steady_fps": f"{PIXEL_FRAMES_PER_BLOCK} pixel frames per block after the first / time from the first "
                          "to the last update",
            "cold": "first sampler run after the loader (ComfyUI loads the weights to the device inside it)",
            "warm": "the same run again", "dit_only": "no VAE: latents only (latent-to-RGB previews)",
        },
    }
    a.out_dir.mkdir(parents=True, exist_ok=True)
    loader = env.node_class("RollingForcingModelLoader")
    rows, ok_all = [], True
    many = len(a.attentions) > 1
    for dtype, attention in [(d, x) for d in a.dtypes for x in a.attentions]:
        res = dict(common, weight_dtype=dtype, runs={}, ok=False)
        if many:
            kernel = cu["pack"].rolling.attention.get_attention(attention, device)
            res.update(attention=attention, attention_backend=getattr(kernel, "kernel", str(kernel)))
        try:
            t0 = time.perf_counter()
            model = loader.execute(ckpt.name, "ema", dtype, attention)[0]
            res["model_load_s"] = round(time.perf_counter() - t0, 3)
            clock = Clock(sync)
            for name, with_vae in RUNS:
                res["runs"][name] = run_once(a, model, vae if with_vae else None, cond, seconds, clock, cuda, env)
                gc.collect()
            del model
        except Exception as e:  # recorded in the JSON: one dtype failing does not hide the other's numbers
            res["error"] = f"{type(e).__name__}: {e}"
            print(f"gpu_smoke: {dtype}: {res['error']}", file=sys.stderr)
        finally:
            mm.unload_all_models()
            gc.collect()
            mm.soft_empty_cache()
        runs = res["runs"]
        res["ok"] = "error" not in res and all(r["ok"] for r in runs.values()) and len(runs) == len(RUNS)
        if res["ok"]:
            peak_alloc = max(r["peak_allocated_bytes"] or 0 for r in runs.values()) if cuda else None
            peak_res = max(r["peak_reserved_bytes"] or 0 for r in runs.values()) if cuda else None
            res["summary"] = {
                "compute_dtype": runs["warm"]["compute_dtype"],
                "first_block_latency_s": runs["cold"]["first_block_s"],
                "first_block_latency_warm_s": runs["warm"]["first_block_s"],
                "steady_fps": runs["warm"]["steady_fps"],
                "block_ms_median": runs["warm"]["block_ms_median"],
                "block_ms_p99": runs["warm"]["block_ms_p99"],
                "dit_only_fps": runs["dit_only"]["steady_fps"],
                "dit_only_block_ms_median": runs["dit_only"]["block_ms_median"],
                "realtime_factor": (round(runs["warm"]["steady_fps"] / 16, 3)
                                    if runs["warm"]["steady_fps"] else None),
                "peak_allocated_gib": gib(peak_alloc), "peak_reserved_gib": gib(peak_res),
            }
        ok_all &= res["ok"]
        suffix = "" if a.config == "1.3B" else f"_{slug(a.config)}"
        out = a.out_dir / f"gpu_smoke_{slug(gpu)}{suffix}_{dtype}{'_' + slug(attention) if many else ''}.json"
        out.write_text(json.dumps(res, indent=1) + "\n")
        res["_file"] = out
        rows.append(res)
    print_table(rows, common)
    if a.kernels == "on" or (a.kernels == "auto" and cuda):
        from rolling.attention import BACKENDS
        shapes = attention_shapes(a.width, a.height)
        kernels = time_attention_kernels(str(device), [x for x in BACKENDS], shapes, iters=a.kernel_iters,
                                         seed=a.seed)
        kres = {k: common[k] for k in ("benchmark", "command", "date", "device", "gpu", "torch", "cuda", "cudnn",
                                       "python", "host", "pack_commit", "width", "height")}
        kres.update(what="each attention option alone on a steady window's self-attention shapes (1.3B heads)",
                    shapes=shapes, kernels=kernels, ok=all(r["ok"] and r["finite"] for r in kernels))
        out = a.out_dir / f"gpu_smoke_{slug(gpu)}_attention_kernels.json"
        out.write_text(json.dumps(kres, indent=1) + "\n")
        print(f"\n{'option':7} {'kernel':12} {'ms med':>9} {'p99':>9} {'TFLOP/s':>8} {'max |diff| vs sdpa':>19}")
        for r in kernels:
            if not r["ok"]:
                print(f"{r['option']:7} {r['kernel']:12} FAILED: {r['error']}")
                continue
            print(f"{r['option']:7} {r['kernel']:12} {r['ms_median']:9.3f} {r['ms_p99']:9.3f} {r['tflops_per_s']:8.1f} "
                  f"{r['max_abs_diff_vs_sdpa']:19.3g}" + ("  (fallback)" if r["fallback"] else ""))
        print(f"wrote {out}")
        ok_all &= kres["ok"]
    return 0 if ok_all else 1


def print_table(rows, common) -> None:
    def f(v, fmt="{:.3f}"):
        return "-" if v is None else fmt.format(v)

    print(f"\ngpu_smoke: {common['gpu']}, torch {common['torch']}, ComfyUI {common['comfyui']}, {common['config']} "
          f"{common['width']}x{common['height']}, {common['blocks']} blocks ({common['pixel_frames']} frames), "
          f"attention {common['attention']} ({common['attention_backend']}), VAE {common['vae_dtype']}")
    head = (f"{'weights':8} {'compute':9} {'run':9} {'first block s':>13} {'block ms med':>12} {'p99':>8} "
            f"{'fps':>7} {'peak alloc GiB':>14} {'reserved GiB':>12}")
    print(head)
    print("-" * len(head))
    for res in rows:
        if "error" in res:
            print(f"{res['weight_dtype']:8} FAILED: {res['error']}")
            continue
        many = "," in str(common["attention"])
        for name, r in res["runs"].items():
            if many:  # one row set per attention option: name it (and the kernel that ran)
                name = f"{name} [{res['attention']}: {res['attention_backend']}]"
            print(f"{res['weight_dtype']:8} {str(r['compute_dtype']):9} {name:9} {f(r['first_block_s']):>13} "
                  f"{f(r['block_ms_median'], '{:.1f}'):>12} {f(r['block_ms_p99'], '{:.1f}'):>8} "
                  f"{f(r['steady_fps'], '{:.2f}'):>7} {f(gib(r['peak_allocated_bytes']), '{:.2f}'):>14} "
                  f"{f(gib(r['peak_reserved_bytes']), '{:.2f}'):>12}" + ("" if r["ok"] else "  NOT OK"))
    for res in rows:
        print(f"wrote {res['_file']}" + ("" if res["ok"] else " (NOT OK)"))
        del res["_file"]


if __name__ == "__main__":
    sys.exit(main())
