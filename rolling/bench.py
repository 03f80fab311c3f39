"""``python -m rolling bench``: forwards, query tokens and FLOPs per block, host syncs per window,
peak memory, per-block latency and fps, for the reference and fused modes.

Counting (forwards, tokens, FLOPs, syncs, aten ops) runs the same sampler on the ``meta`` device, so
it is exact for any model size without memory or compute. Timing runs on ``--device`` (skipped for
``meta``). A "steady" window is the work between two yielded blocks once the cache is full.

``--json F`` is written as the run goes (atomically: a temporary file renamed over F): after the
counts, then every ``--json-every`` timed blocks with ``"complete": false`` and the timing so far
(``timed_blocks_done``), and at the end with ``"complete": true``; a killed soak leaves its last
snapshot. Arguments are checked first (:func:`check_args`): a bad ``--device``, ``--height`` or
``--width`` is a ValueError saying what is allowed.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from .config import RollingConfig, WanConfig
from .model import build_model
from .probes import OpProbe
from .sampler import RollingSampler
from .timing import pixel_frames

SIZES = {"tiny": (16, 24), "1.3B": (60, 104), "14B": (60, 104)}
DTYPES = {"cpu": torch.float32, "meta": torch.bfloat16, "cuda": torch.bfloat16}
MAX_LATENT = 1024  # latent rows / columns (8192 pixels)
JSON_EVERY = 100  # default: timed blocks between JSON snapshots


def check_device(name) -> torch.device:
    """``--device``: cpu, meta, or an available CUDA device (cuda, cuda:N)."""
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"--device {name!r} is not a device: use cpu, cuda, cuda:N or meta") from None
    if dev.type not in DTYPES:
        raise ValueError(f"--device {name!r}: the bench runs on cpu, cuda[:N] or meta, not {dev.type}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"--device {name}: CUDA is not available ({why}, torch {torch.__version__}); use "
                             "--device cpu, or --device meta for the counts only")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"--device {name}: there are {n} CUDA device(s) (cuda:0..cuda:{n - 1})")
    return dev


def check_args(a) -> tuple[int, int]:
    """Validate the bench arguments; returns the latent (height, width)."""
    if a.config not in SIZES:
        raise ValueError(f"--config must be one of {sorted(SIZES)}, got {a.config!r}")
    if isinstance(a.blocks, bool) or not isinstance(a.blocks, int) or a.blocks < 2:
        raise ValueError(f"--blocks must be at least 2 (first block + steady state), got {a.blocks}")
    every = getattr(a, "json_every", JSON_EVERY)
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"--json-every must be a whole number of blocks >= 1, got {every}")
    check_device(a.device)
    hw = []
    for name, v, default in (("height", a.height, SIZES[a.config][0]), ("width", a.width, SIZES[a.config][1])):
        if v is None:
            v = default
        elif isinstance(v, bool) or not isinstance(v, int) or not (2 <= v <= MAX_LATENT) or v % 2:
            raise ValueError(f"--{name} is in latent {'rows' if name == 'height' else 'columns'} (pixels / 8) and "
                             f"must be an even number from 2 to {MAX_LATENT} (the DiT's patches are 2 x 2), got {v}; "
                             f"leave it out for the default ({default} for {a.config})")
        hw.append(v)
    return hw[0], hw[1]


def write_json(path: str, data: dict) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, then rename)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class MetaNoise:
    def __call__(self, block, step, shape, device, dtype):
        return torch.empty(shape, device=device, dtype=dtype).normal_() if torch.device(device).type != "meta" \
            else torch.empty(shape, device=device, dtype=dtype)


def _context(text_dim: int, device, dtype):
    ctx = torch.zeros(1, 512, text_dim, device=device, dtype=dtype)
    if torch.device(device).type != "meta":
        ctx[:, :8] = torch.randn(1, 8, text_dim, device=device, dtype=dtype, generator=None)
    return ctx


def count(cfg_name: str, rc: RollingConfig, hw, blocks: int = 14, steady_block: int = 9) -> dict:
    """Exact counts on the meta device. Steady window = the work producing block ``steady_block``."""
    wc = WanConfig.preset(cfg_name)
    model = build_model(wc, device="meta", dtype=torch.bfloat16)
    calls = []
    s = RollingSampler(model, rc, height=hw[0], width=hw[1], device="meta", dtype=torch.bfloat16,
                       noise=MetaNoise(), on_call=calls.append)
    probe = OpProbe("meta")
    steady = {}
    it = s.stream(_context(wc.text_dim, "meta", torch.bfloat16), blocks)
    total_syncs = 0
    with probe:
        while True:
            probe.reset()
            f0, c0 = s.forwards, len(calls)
            with FlopCounterMode(display=False) as fc:
                try:
                    blk = next(it)
                except StopIteration:
                    total_syncs += probe.num_syncs
                    break
            total_syncs += probe.num_syncs
            if blk.index == steady_block:
                steady = {"flops": fc.get_total_flops(), "syncs": probe.num_syncs, "ops": probe.ops,
                          "f64": sum(probe.f64.values()), "forwards": s.forwards - f0, "sync_ops": dict(probe.syncs),
                          "frames": sum(c.num_frames for c in calls[c0:])}
    tpf = (hw[0] // 2) * (hw[1] // 2)
    fwd_frames = sum(c.num_frames for c in calls)
    return {"forwards_per_block": s.forwards / blocks, "query_tokens_per_block": fwd_frames * tpf / blocks,
            "steady_forwards_per_block": steady["forwards"],
            "steady_query_tokens_per_block": steady["frames"] * tpf,
            "flops_per_block": steady["flops"], "flops_per_frame": steady["flops"] / (4 * rc.frames_per_block),
            "host_syncs_per_window": steady["syncs"], "host_syncs_total": total_syncs,
            "aten_ops_per_window": steady["ops"], "float64_tensors_per_window": steady["f64"],
            "count_blocks": blocks}


def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc; peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * resource.getpagesize()
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def live_tensor_bytes(device) -> int:
    """Bytes of live tensors: the CUDA allocator's count, or all reachable CPU tensors' storages."""
    if torch.device(device).type == "cuda":
        return torch.cuda.memory_allocated(device)
    import gc
    import warnings
    gc.collect()
    seen, total = set(), 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        objs = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    for o in objs:
        try:
            if isinstance(o, torch.Tensor) and o.device.type != "meta":
                st = o.untyped_storage()
                if st.data_ptr() not in seen:
                    seen.add(st.data_ptr())
                    total += st.nbytes()
        except Exception:
            continue
    return total


def timing_summary(times: list[float], frames_per_block: int, total: float, blocks_done: int) -> dict:
    """Latency / fps figures from per-block times (seconds); the first block is left out of the steady ones."""
    steady = times[1:] or times
    med = statistics.median(steady)
    p99 = sorted(steady)[min(len(steady) - 1, int(round(0.99 * (len(steady) - 1))))]
    return {"first_block_ms": times[0] * 1e3, "block_ms_median": med * 1e3, "block_ms_p99": p99 * 1e3,
            "fps": 4 * frames_per_block / med, "fps_overall": pixel_frames(blocks_done * frames_per_block) / total,
            "timed_blocks_done": blocks_done}


def time_run(cfg_name: str, rc: RollingConfig, hw, device: str, blocks: int, attention: str,
             progress=None, every: int = JSON_EVERY) -> dict:
    """Time ``blocks`` blocks on ``device``. ``progress(partial)`` is called every ``every`` blocks with the
    figures so far (outside the timed spans)."""
    dev = check_device(device)
    dtype = DTYPES.get(dev.type, torch.bfloat16)
    wc = WanConfig.preset(cfg_name)
    model = build_model(wc, device=dev, dtype=dtype, seed=0)
    s = RollingSampler(model, rc, height=hw[0], width=hw[1], device=dev, dtype=dtype, attention=attention, seed=0)
    ctx = _context(wc.text_dim, dev, dtype)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    t0 = time.perf_counter()
    last = t0
    finite = True
    soak = {}
    busy = 0.0  # time spent in progress callbacks, not counted
    for blk in s.stream(ctx, blocks):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        times.append(now - last)
        finite = finite and bool(torch.isfinite(blk.latents).all())
        if blk.index == min(100, blocks - 1) or blk.index == blocks - 1:
            tag = "end" if blk.index == blocks - 1 else "block100"
            del blk
            soak[f"rss_bytes_{tag}"] = rss_bytes()
            soak[f"tensor_bytes_{tag}"] = live_tensor_bytes(dev)
            if tag == "end" and "rss_bytes_block100" not in soak:
                soak["rss_bytes_block100"], soak["tensor_bytes_block100"] = soak["rss_bytes_end"], soak["tensor_bytes_end"]
        if progress is not None and len(times) % every == 0 and len(times) < blocks:
            p0 = time.perf_counter()
            progress({**timing_summary(times, rc.frames_per_block, p0 - t0 - busy, len(times)), "finite": finite,
                      **soak})
            busy += time.perf_counter() - p0
        last = time.perf_counter()
    total = last - t0 - busy
    out = {**timing_summary(times, rc.frames_per_block, total, len(times)), "timed_blocks": blocks, "finite": finite,
           **soak}
    if dev.type == "cuda":
        out["peak_bytes"] = torch.cuda.max_memory_allocated()
        out["peak_bytes_kind"] = "torch.cuda.max_memory_allocated"
        out["device_name"] = torch.cuda.get_device_name(dev)
        out["kv_cache_bytes"] = s.cache.nbytes
    else:
        out["peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out["peak_bytes_kind"] = "process peak RSS"
        out["device_name"] = platform.processor() or platform.machine()
        out["kv_cache_bytes"] = s.cache.nbytes
    return out


def run_bench(a) -> dict:
    hw = check_args(a)
    every = getattr(a, "json_every", JSON_EVERY)
    rc = RollingConfig(update_mode=a.mode, rope_mode=a.rope)
    res = {"config": a.config, "mode": a.mode, "rope": a.rope, "device": a.device, "latent_hw": list(hw),
           "attention": a.attention, "blocks": a.blocks, "torch": torch.__version__,
           "command": "python -m rolling bench " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:]),
           "complete": False}
    snapshot = (lambda extra: write_json(a.json, {**res, **extra, "complete": False})) if a.json else None
    res.update(count(a.config, rc, hw))
    if snapshot:
        snapshot({"timed_blocks_done": 0})
    if torch.device(a.device).type != "meta":
        res.update(time_run(a.config, rc, hw, a.device, a.blocks, a.attention, progress=snapshot, every=every))
    res["complete"] = True
    keys = ["rss_bytes_block100", "rss_bytes_end", "tensor_bytes_block100", "tensor_bytes_end",
            "forwards_per_block", "steady_forwards_per_block", "query_tokens_per_block",
            "steady_query_tokens_per_block", "flops_per_frame", "host_syncs_per_window",
            "peak_bytes", "block_ms_median", "block_ms_p99", "first_block_ms", "fps"]
    for k in keys:
        if k in res:
            v = res[k]
            print(f"{k:24s} {v:.4g}" if isinstance(v, float) else f"{k:24s} {v}")
    if a.json:
        write_json(a.json, res)
        print(f"wrote {a.json}")
    return res
