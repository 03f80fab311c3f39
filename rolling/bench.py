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

``--compile`` (:func:`compile_probe`) runs the window forward through
:class:`rolling.forward.CompiledForward` (``fullgraph=True``, as the sampler compiles it) with
``--compile-backend`` eager / aot_eager / inductor, on an endless stream: the warm-up blocks
(:func:`warmup_blocks`: the cache fills, every ramp-up layout compiles its graph) and then one full
turn of the ring and one more block of steady windows. It reports ``graph_breaks`` (whole run),
``recompiles`` (frame compiles during the steady blocks: 0 means no steady window or ring position
compiled anything), ``compiled_graphs`` and the reasons Dynamo gives (:class:`rolling.probes.DynamoCounters`);
a fullgraph failure counts as a graph break (``compile_error`` says which), a recompile-limit hit as a
recompile (``recompile_limit_hit``), and ``graph_host_syncs`` counts ``.item()``-like reads Dynamo traced
into a graph without a break.

``--proxies`` (:func:`cpu_proxies`) measures what a CPU can say about real-time streaming:

* ``kernel_launches_per_block``: aten ops dispatched per steady block that launch a kernel,
  counted with a ``TorchDispatchMode`` (:class:`rolling.probes.OpProbe`) on an eager run
  (``kernel_launches_per_block_reference`` / ``_fused``: both update modes);
* ``write_path_host_ms_per_frame``: host-thread time per frame of handing decoded float frames to
  the video writer (``RunOutputs.add_frames`` -> ``StreamingVideoWriter.write``: float -> uint8, copy,
  queue), at the bench's frame size and at 832x480 (``..._832x480``), with the uint8 conversion alone
  and the encoder's own time beside it;
* ``decode_overlap_fraction``: sampling alone (t_sample), decoding the same latents alone
  (t_decode) and both through ``collect(overlap=True)`` (the decoder on the worker thread,
  t_overlapped): (t_sample + t_decode - t_overlapped) / t_decode clipped to [0, 1];
  ``decode_overlap_fraction_serial`` is the same with ``overlap=False`` (about 0), and
  ``decode_overlap_noise`` how far timing noise moves the fraction. The decoder is the toy
  VAE's streaming decoder (``rolling.toy.vae``, random weights: its cost does not depend on them;
  a stand-in conv decoder where the toy world is missing); ``decode_to_sample_time_ratio`` says how
  heavy it is next to the DiT. On a CPU the overlap is bounded by the cores the two threads share:
  ``cpu_threads`` (torch intra-op threads) and ``cpu_cores`` are reported with it.

These are CPU proxies (counts, host-side costs, concurrency structure), not GPU speed.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections import Counter
from contextlib import closing

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .chunks import atomic_write
from .config import RollingConfig, WanConfig
from .model import build_model
from .outputs import RunOutputs, collect
from .probes import SYNC_OPS, DynamoCounters, OpProbe
from .sampler import RollingSampler
from .timing import pixel_frames

#: bench-only model presets besides WanConfig's: "medium" is a CPU-sized Wan (head_dim 128 and the
#: umT5 text width of the release, 4 layers of width 512)
BENCH_MODELS = {"medium": WanConfig(dim=512, ffn_dim=2048, num_heads=4, num_layers=4, freq_dim=256, text_dim=4096)}
SIZES = {"tiny": (16, 24), "medium": (24, 40), "1.3B": (60, 104), "14B": (60, 104)}
COMPILE_BACKENDS = ("eager", "aot_eager", "inductor")
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


def wan_config(name: str) -> WanConfig:
    """The model preset ``name``: :data:`BENCH_MODELS` or :meth:`WanConfig.preset`."""
    return BENCH_MODELS[name] if name in BENCH_MODELS else WanConfig.preset(name)


def check_args(a) -> tuple[int, int]:
    """Validate the bench arguments; returns the latent (height, width)."""
    if a.config not in SIZES:
        raise ValueError(f"--config must be one of {sorted(SIZES)}, got {a.config!r}")
    backend = getattr(a, "compile_backend", "inductor")
    if backend not in COMPILE_BACKENDS:
        raise ValueError(f"--compile-backend must be one of {', '.join(COMPILE_BACKENDS)}, got {backend!r}")
    for flag in ("compile", "proxies"):
        if getattr(a, flag, False) and torch.device(a.device).type == "meta":
            raise ValueError(f"--{flag} runs the model: use --device cpu or cuda, not meta")
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
    atomic_write(path, lambda fh: fh.write(json.dumps(data, indent=1).encode()))


class MetaNoise:
    def __call__(self, block, step, shape, device, dtype):
        x = torch.empty(shape, device=device, dtype=dtype)
        return x if torch.device(device).type == "meta" else x.normal_()


def _context(text_dim: int, device, dtype):
    ctx = torch.zeros(1, 512, text_dim, device=device, dtype=dtype)
    if torch.device(device).type != "meta":
        ctx[:, :8] = torch.randn(1, 8, text_dim, device=device, dtype=dtype, generator=None)
    return ctx


def count(cfg_name: str, rc: RollingConfig, hw, blocks: int = 14, steady_block: int = 9) -> dict:
    """Exact counts on the meta device. Steady window = the work producing block ``steady_block``."""
    calls = []
    s, ctx = make_sampler(cfg_name, rc, hw, torch.device("meta"), seed=None, noise=MetaNoise(), on_call=calls.append)
    probe = OpProbe("meta")
    it = s.stream(ctx, blocks)
    total_syncs, steady = 0, {}
    with probe:
        while True:
            probe.reset()
            f0, c0 = s.forwards, len(calls)
            with FlopCounterMode(display=False) as fc:
                blk = next(it, None)
            total_syncs += probe.num_syncs
            if blk is None:
                break
            if blk.index == steady_block:
                steady = {"flops": fc.get_total_flops(), "syncs": probe.num_syncs, "ops": probe.ops,
                          "launches": probe.launches, "f64": sum(probe.f64.values()), "forwards": s.forwards - f0,
                          "frames": sum(c.num_frames for c in calls[c0:])}
    tpf = (hw[0] // 2) * (hw[1] // 2)
    fwd_frames = sum(c.num_frames for c in calls)
    return {"forwards_per_block": s.forwards / blocks, "query_tokens_per_block": fwd_frames * tpf / blocks,
            "steady_forwards_per_block": steady["forwards"],
            "steady_query_tokens_per_block": steady["frames"] * tpf,
            "flops_per_block": steady["flops"], "flops_per_frame": steady["flops"] / (4 * rc.frames_per_block),
            "host_syncs_per_window": steady["syncs"], "host_syncs_total": total_syncs,
            "aten_ops_per_window": steady["ops"], "kernel_launches_per_window": steady["launches"],
            "float64_tensors_per_window": steady["f64"],
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

    from torch._subclasses.fake_tensor import FakeTensor  # what torch.compile leaves behind: no storage, not counted
    gc.collect()
    sizes = {}  # storage data_ptr -> bytes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for o in gc.get_objects():
            try:
                if isinstance(o, torch.Tensor) and o.device.type != "meta" and not isinstance(o, FakeTensor):
                    st = o.untyped_storage()
                    sizes.setdefault(st.data_ptr(), st.nbytes())
            except Exception:
                continue
    return sum(sizes.values())


def timing_summary(times: list[float], frames_per_block: int, total: float, blocks_done: int) -> dict:
    """Latency / fps figures from per-block times (seconds); the first block is left out of the steady ones."""
    steady = times[1:] or times
    med = statistics.median(steady)
    p99 = sorted(steady)[round(0.99 * (len(steady) - 1))]
    return {"first_block_ms": times[0] * 1e3, "block_ms_median": med * 1e3, "block_ms_p99": p99 * 1e3,
            "fps": 4 * frames_per_block / med, "fps_overall": pixel_frames(blocks_done * frames_per_block) / total,
            "timed_blocks_done": blocks_done}


def time_run(cfg_name: str, rc: RollingConfig, hw, device: str, blocks: int, attention: str,
             progress=None, every: int = JSON_EVERY) -> dict:
    """Time ``blocks`` blocks on ``device``. ``progress(partial)`` is called every ``every`` blocks with the
    figures so far (outside the timed spans)."""
    dev = check_device(device)
    s, ctx = make_sampler(cfg_name, rc, hw, dev, attention)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, soak, finite = [], {}, True
    busy = 0.0  # time spent in progress callbacks, not counted
    t0 = last = time.perf_counter()
    for blk in s.stream(ctx, blocks):
        _sync(dev)
        times.append(time.perf_counter() - last)
        finite = finite and bool(torch.isfinite(blk.latents).all())
        if blk.index in (100, blocks - 1):  # memory at block 100 and at the end, the block itself freed
            tag = "end" if blk.index == blocks - 1 else "block100"
            del blk
            soak[f"rss_bytes_{tag}"], soak[f"tensor_bytes_{tag}"] = rss_bytes(), live_tensor_bytes(dev)
            if "rss_bytes_block100" not in soak:  # at most 101 blocks: the end stands for block 100
                soak.update(rss_bytes_block100=soak["rss_bytes_end"], tensor_bytes_block100=soak["tensor_bytes_end"])
        if progress is not None and len(times) % every == 0 and len(times) < blocks:
            p0 = time.perf_counter()
            progress({**timing_summary(times, rc.frames_per_block, p0 - t0 - busy, len(times)), "finite": finite,
                      **soak})
            busy += time.perf_counter() - p0
        last = time.perf_counter()
    out = {**timing_summary(times, rc.frames_per_block, last - t0 - busy, len(times)), "timed_blocks": blocks,
           "finite": finite, **soak}
    if dev.type == "cuda":
        out.update(peak_bytes=torch.cuda.max_memory_allocated(), peak_bytes_kind="torch.cuda.max_memory_allocated",
                   device_name=torch.cuda.get_device_name(dev))
    else:
        out.update(peak_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                   peak_bytes_kind="process peak RSS", device_name=platform.processor() or platform.machine())
    out["kv_cache_bytes"] = s.cache.nbytes
    return out


def make_sampler(cfg_name: str, rc: RollingConfig, hw, dev: torch.device, attention: str = "sdpa", compile=False,
                 seed: int | None = 0, **kw):
    """(sampler, text context) of a random model of preset ``cfg_name`` on ``dev``, its weights seeded with
    ``seed`` (``None``: the global RNG, untouched); ``kw`` go to :class:`RollingSampler`."""
    dtype = DTYPES.get(dev.type, torch.bfloat16)
    wc = wan_config(cfg_name)
    model = build_model(wc, device=dev, dtype=dtype, seed=seed)
    s = RollingSampler(model, rc, height=hw[0], width=hw[1], device=dev, dtype=dtype, attention=attention, seed=0,
                       compile=compile, **kw)
    return s, _context(wc.text_dim, dev, dtype)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def machine_info() -> dict:
    """What bounds CPU concurrency: torch's intra-op threads, the cores this process may use, the load."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    try:
        load = round(os.getloadavg()[0], 2)
    except OSError:
        load = None
    return {"cpu_threads": torch.get_num_threads(), "cpu_interop_threads": torch.get_num_interop_threads(),
            "cpu_cores": os.cpu_count(), "cpu_cores_usable": usable, "load_average_1min": load,
            "cpu_name": _cpu_model() or platform.processor() or platform.machine(),
            "platform": platform.platform(), "python": platform.python_version()}


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        return None


def warmup_blocks(rc: RollingConfig) -> int:
    """Blocks before the steady state: until the KV cache is full (capacity / frames per block blocks)
    and one more, whose window is the first of the steady layout (it compiles the steady graph)."""
    return -(-rc.capacity_frames // rc.frames_per_block) + 1


# --------------------------------------------------------------------------- torch.compile


GRAPH_SYNC_METHODS = {"item", "tolist", "nonzero", "cpu", "numpy", "__bool__", "__int__", "__float__"}


def inspecting_backend(backend: str, syncs: Counter):
    """The ``torch.compile`` backend ``backend`` with a look at every graph Dynamo hands it first: the
    host syncs in it (:data:`GRAPH_SYNC_METHODS` calls, :data:`rolling.probes.SYNC_OPS`) are counted in
    ``syncs``."""
    from torch._dynamo.backends.registry import lookup_backend
    inner = lookup_backend(backend)
    sync_fns = {torch.Tensor.item, torch.Tensor.tolist, torch.nonzero, torch.masked_select, *SYNC_OPS}

    def compile_fn(gm, example_inputs, **kw):
        for n in gm.graph.nodes:
            if (n.op == "call_method" and n.target in GRAPH_SYNC_METHODS) or (
                    n.op == "call_function" and n.target in sync_fns):
                syncs[str(getattr(n.target, "__name__", n.target))] += 1
        return inner(gm, example_inputs, **kw)
    compile_fn.__name__ = f"inspecting_{backend}"
    return compile_fn


def compile_probe(cfg_name: str, rc: RollingConfig, hw, device: str, attention: str = "sdpa",
                  backend: str = "inductor", mode: str | None = None, steady: int | None = None) -> dict:
    """Graph breaks, recompiles and graphs of the compiled window forward (see the module docstring):
    :func:`warmup_blocks` blocks, then ``steady`` steady blocks (default: the ring's slots + 1, so every ring
    position is visited and one wraps). Resets ``torch._dynamo`` first, so the figures do not depend on what
    the process compiled before. ``fullgraph=True``: a graph break stops the run and is counted (the error in
    ``compile_error``)."""
    if backend not in COMPILE_BACKENDS:
        raise ValueError(f"compile backend must be one of {', '.join(COMPILE_BACKENDS)}, got {backend!r}")
    dev = check_device(device)
    torch._dynamo.reset()
    syncs: Counter = Counter()
    fn = backend if mode is not None else inspecting_backend(backend, syncs)  # inductor modes need the name
    s, ctx = make_sampler(cfg_name, rc, hw, dev, attention, compile={"backend": fn, "mode": mode})
    warm, steady = warmup_blocks(rc), steady or rc.ring_blocks + 1
    total, after = DynamoCounters(), None
    graphs, times, error, failure, warm_s = [], [], None, None, None
    t0 = last = time.perf_counter()
    try:
        with closing(s.stream(ctx, None)) as it:
            for blk in it:
                _sync(dev)
                now = time.perf_counter()
                times.append(now - last)
                graphs.append(s.compiled.graphs)
                if blk.index == warm - 1:
                    warm_s, after = now - t0, DynamoCounters()
                if blk.index == warm + steady - 1:
                    break
                last = time.perf_counter()
    except Exception as e:  # noqa: BLE001 - a graph break under fullgraph, a backend failure: reported
        lines = str(e).strip().splitlines()
        error, failure = f"{type(e).__name__}: {lines[0] if lines else ''}", e
    n_graphs = s.compiled.graphs
    whole = total.since()
    st = after.since() if after is not None else None
    steady_times = times[warm:]
    del s, it, ctx
    torch._dynamo.reset()  # the compiled graphs (and their fake tensors) go: later timings see an eager process
    breaks, reasons = whole["graph_breaks"], whole["graph_break_reasons"]
    exc = torch._dynamo.exc
    recompile_failure = isinstance(failure, (exc.FailOnRecompileLimitHit, exc.RecompileError))
    if (isinstance(failure, exc.TorchDynamoException) and not recompile_failure
            and not isinstance(failure, exc.BackendCompilerFailed) and breaks == 0):
        # fullgraph=True: code Dynamo cannot put in one graph (e.g. a branch on .item()) may raise
        # without a counter entry; it is a graph break all the same
        breaks, reasons = 1, [*reasons, error]
    return {
        "compile_backend": backend, "compile_mode": mode, "compile_fullgraph": True,
        "graph_breaks": breaks, "graph_break_reasons": reasons,
        "graph_host_syncs": None if mode is not None else sum(syncs.values()),
        "graph_host_sync_ops": None if mode is not None else dict(syncs),
        "recompile_limit_hit": bool(whole["recompile_limit_hits"]) or recompile_failure,
        "recompiles": None if st is None else st["frame_compiles"],
        "recompile_reasons": None if st is None else st["recompile_reasons"],
        "compiled_graphs": n_graphs, "dynamo_graphs": whole["graphs"],
        "dynamo_frame_compiles": whole["frame_compiles"], "dynamo_recompiles_warmup": whole["recompiles"] - (
            st["recompiles"] if st else 0),
        "compile_warmup_blocks": warm, "compile_steady_blocks": len(steady_times),
        "compiled_graphs_per_block": graphs,
        "compile_warmup_s": warm_s,
        "compiled_steady_block_ms_median": statistics.median(steady_times) * 1e3 if steady_times else None,
        "compile_error": error,
        "compile_definitions": {
            "graph_breaks": "Dynamo graph breaks plus untraceable code (fullgraph=True makes the first an error) "
                            "over the whole run (torch._dynamo.utils.counters graph_break + unimplemented)",
            "recompiles": "frame compiles during the steady blocks (after the warm-up blocks, across a full "
                          "turn of the ring): any is a recompile of the window forward; null when the run "
                          "stopped before the steady blocks (see compile_error)",
            "graph_host_syncs": "host syncs traced into the compiled graphs (.item(), .tolist(), nonzero, ...: "
                                "Dynamo may capture a scalar read without a graph break; 0 expected)",
            "recompile_limit_hit": "Dynamo hit its recompile limit (fullgraph=True makes it an error)",
            "compiled_graphs": "CompiledForward graphs: one per window layout (ramp-up layouts, then one steady)",
            "dynamo_recompiles_warmup": "Dynamo's recompiles during the warm-up: each new layout is a new "
                                        "cache entry of the same code object, expected",
        },
    }


# --------------------------------------------------------------------------- kernel launches


def launch_probe(cfg_name: str, rc: RollingConfig, hw, device: str, attention: str = "sdpa",
                 steady: int = 2) -> dict:
    """Kernel launches (and all aten ops, host syncs) per steady block of an eager run, counted with a
    TorchDispatchMode (:class:`rolling.probes.OpProbe`) over everything between two yielded blocks."""
    dev = check_device(device)
    s, ctx = make_sampler(cfg_name, rc, hw, dev, attention)
    warm = warmup_blocks(rc)
    rows, ops = [], Counter()
    with OpProbe(dev.type) as probe, closing(s.stream(ctx, None)) as it:
        for blk in it:
            if blk.index >= warm:
                rows.append((probe.launches, probe.ops, probe.num_syncs))
                ops = Counter({str(k): v for k, v in probe.by_op.items()})
            probe.reset()
            if len(rows) == steady:
                break
    launches = [r[0] for r in rows]
    return {"kernel_launches_per_block": launches[0], "kernel_launches_per_block_steady": launches,
            "kernel_launches_per_pixel_frame": launches[0] / (4 * rc.frames_per_block),
            "aten_ops_per_block": rows[0][1], "host_syncs_per_block": rows[0][2],
            "kernel_launches_top_ops": dict(ops.most_common(10)),
            "kernel_launch_count_method": "TorchDispatchMode (rolling.probes.OpProbe) on an eager run on "
                                          f"{dev.type}: every dispatched aten op except views, allocations and "
                                          "metadata ops, per steady block (blocks from the warm-up on)"}


# --------------------------------------------------------------------------- decoders


class FrameDecoder:
    """``collect``'s decoder over a streaming latent decoder that returns [B, 3, T, H, W] in [-1, 1]:
    frames [B, T, H, W, 3] in 0..1 (contiguous, as a VAE node hands them on), no autograd."""

    def __init__(self, streaming):
        self.streaming = streaming
        self._empty = torch.empty(1, 0, 1, 1, 3)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            px = self.streaming.decode(latents.float())
            frames = px.permute(0, 2, 3, 4, 1).add(1).mul_(0.5).contiguous()
        self._empty = frames[:, :0]
        return frames

    def flush(self) -> torch.Tensor:
        return self._empty


def standin_net(channels: int = 16, width: int = 64) -> nn.Module:
    """Used where ``rolling.toy`` is missing: per latent frame a 3x3 conv (channels -> width), SiLU, a 1x1
    conv to 4 frames x 3 colours x 8 x 8, a x8 pixel shuffle and tanh."""
    return nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.SiLU(), nn.Conv2d(width, 4 * 3 * 64, 1),
                         nn.PixelShuffle(8), nn.Tanh())


class StandInDecoder:
    """Streaming decode with :func:`standin_net`: [B, C, k, h, w] -> [B, 3, frames, 8h, 8w] in [-1, 1],
    1 frame for the first latent frame of a video, 4 for every other (the VAE's frame count)."""

    def __init__(self, net: nn.Module):
        self.net, self.latent_frames = net, 0

    def decode(self, chunk: torch.Tensor) -> torch.Tensor:
        b, _, k, h, w = chunk.shape
        px = self.net(chunk.transpose(1, 2).flatten(0, 1)).view(b, k, 4, 3, 8 * h, 8 * w)
        px = px.permute(0, 3, 1, 2, 4, 5).flatten(2, 3)  # [B, 3, 4k, H, W]
        if self.latent_frames == 0:
            px = px[:, :, 3:]
        self.latent_frames += k
        return px


def toy_decoder_factory(device="cpu", channels: int = 16, seed: int = 0, standin: bool = False):
    """(``make()`` -> a fresh :class:`FrameDecoder`, description): the toy VAE's streaming decoder with
    random weights (the same cost as trained ones), or :class:`StandInDecoder` (``standin``, or without
    ``rolling.toy``). Seeded; the global RNG is left as it was."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        try:
            from .toy.vae import ToyVAE, VAEConfig
        except ImportError:
            standin = True
        if standin:
            net = standin_net(channels).to(device).eval().requires_grad_(False)
            return (lambda: FrameDecoder(StandInDecoder(net)),
                    "bench StandInDecoder (3x3 conv 16->64, 1x1 conv, x8 pixel shuffle per latent frame)")
        cfg = VAEConfig(latent_channels=channels)
        vae = ToyVAE(cfg).to(device).eval().requires_grad_(False)
        return (lambda: FrameDecoder(vae.streaming_decoder()),
                f"rolling.toy.vae.ToyVAE streaming decoder, random weights, widths {list(cfg.widths)} (3x3 convs, "
                "a residual block, three x2 pixel-shuffle stages; per latent frame, no cache)")
    finally:
        torch.random.set_rng_state(state)


# --------------------------------------------------------------------------- decode overlap


def overlap_probe(make_stream, make_decoder, *, blocks: int, frames_per_block: int, latent_shape, frame_hw,
                  device="cpu") -> dict:
    """Wall times of sampling alone, decoding alone, and both through :func:`rolling.outputs.collect` with
    the decoder on the worker thread (``overlap=True``) and on the sampling thread (``overlap=False``).

    ``make_stream()``: a fresh iterator of ``blocks`` finished blocks (``.index``, ``.latents``);
    ``make_decoder()``: a fresh decoder (``decode``/``flush``, frames [B, T, H, W, 3]); ``latent_shape``
    (B, C, h, w); ``frame_hw`` (H, W). Decode-only decodes the latents the sampling-only run produced
    and hands the frames to a :class:`RunOutputs` too, as the worker does. Returns (figures, the
    decode-only outputs)."""
    dev = torch.device(device)

    def outputs(frames: bool):
        return RunOutputs(blocks=blocks, frames_per_block=frames_per_block, latent_shape=latent_shape,
                          frame_hw=frame_hw if frames else None)

    def run(decoder, overlap):
        out = outputs(decoder is not None)
        _sync(dev)
        t0 = time.perf_counter()
        collect(make_stream(), out, decoder=decoder, overlap=overlap)
        _sync(dev)
        return time.perf_counter() - t0, out

    t_sample, sampled = run(None, False)
    fb = frames_per_block
    dec, decoded = make_decoder(), outputs(True)
    lat = [sampled.latents[:, :, b * fb:(b + 1) * fb].to(dev) for b in range(blocks)]
    _sync(dev)
    t0 = time.perf_counter()
    for x in lat:
        decoded.add_frames(dec.decode(x))
    decoded.add_frames(dec.flush())
    _sync(dev)
    t_decode = time.perf_counter() - t0
    t_overlap, over = run(make_decoder(), True)
    t_serial, serial = run(make_decoder(), False)

    def fraction(t):
        return min(1.0, max(0.0, (t_sample + t_decode - t) / t_decode)) if t_decode > 0 else 0.0
    same = bool(torch.equal(over.frames, decoded.frames) and torch.equal(serial.frames, decoded.frames)
                and torch.equal(over.latents, sampled.latents))
    return {"decode_overlap_fraction": fraction(t_overlap), "decode_overlap_fraction_serial": fraction(t_serial),
            "t_sample_s": t_sample, "t_decode_s": t_decode, "t_overlapped_s": t_overlap, "t_serial_s": t_serial,
            "decode_to_sample_time_ratio": t_decode / t_sample if t_sample > 0 else None,
            "decode_overlap_noise": abs(t_serial - t_sample - t_decode) / t_decode if t_decode > 0 else None,
            "overlap_blocks": blocks, "overlap_frames": int(decoded.frames_done), "overlap_outputs_equal": same,
            "overlap_definitions": {
                "decode_overlap_fraction": "(t_sample + t_decode - t_overlapped) / t_decode clipped to [0, 1]; "
                                           "t_overlapped: collect(overlap=True), decoder on the worker thread",
                "decode_overlap_fraction_serial": "the same with collect(overlap=False): decode on the sampling "
                                                  "thread, about 0 (timing noise either way)",
                "t_decode_s": "decode of the sampled latents plus RunOutputs.add_frames, no sampling",
                "decode_overlap_noise": "|t_serial - t_sample - t_decode| / t_decode: how far timing noise moves "
                                        "the fraction (the serial run should equal the sum); above ~0.2 the "
                                        "fraction says little (a decode much cheaper than sampling, a busy machine)",
            }}, decoded


# --------------------------------------------------------------------------- write path


def _test_pattern(frames: int, h: int, w: int, t0: int = 0) -> torch.Tensor:
    """Smooth moving colour gradients [frames, h, w, 3] in 0..1 (encodes like video, not like noise)."""
    t = torch.arange(t0, t0 + frames, dtype=torch.float32).view(-1, 1, 1, 1)
    y = torch.linspace(0, 1, h).view(1, -1, 1, 1)
    x = torch.linspace(0, 1, w).view(1, 1, -1, 1)
    c = torch.tensor([0.0, 2.1, 4.2]).view(1, 1, 1, 3)
    return (0.5 + 0.5 * torch.sin(6.0 * x + 4.0 * y + 0.2 * t + c)).contiguous()


def write_path_probe(frame_blocks, frames_per_block: int = 3, fps: float = 16) -> dict:
    """Host-thread cost per frame of handing decoded frames to a :class:`rolling.video.StreamingVideoWriter`
    through :meth:`RunOutputs.add_frames` (as ``collect`` does): float -> uint8 on the frames' device, the
    copy to the host, the writer's queue. ``frame_blocks``: per block, frames [B, T, H, W, 3] in 0..1.
    The writer is drained after each block (outside the timed span), so the figure is the hand-off, not
    back-pressure from the encoder; the encoder's time per frame is reported beside it."""
    from .video import StreamingVideoWriter, _host_frames

    h, w = frame_blocks[0].shape[2:4]
    n = sum(int(f.shape[1]) for f in frame_blocks)
    convert = 0.0
    _host_frames(frame_blocks[0][0], w, h)  # first-call costs out of the figure
    for f in frame_blocks:  # the conversion alone (what write() does first)
        t0 = time.perf_counter()
        _host_frames(f[0], w, h)
        convert += time.perf_counter() - t0
    host = enc = 0.0
    written = 0
    with tempfile.TemporaryDirectory(prefix="rolling_bench_") as d:
        path = os.path.join(d, "write_path.mp4")
        with StreamingVideoWriter(path, w, h, fps=fps) as writer:
            out = RunOutputs(blocks=len(frame_blocks), frames_per_block=frames_per_block,
                             latent_shape=(1, 16, 1, 1), frame_hw=(h, w), writer=writer, keep_blocks=1)
            for f in frame_blocks:
                t0 = time.perf_counter()
                out.add_frames(f)
                t1 = time.perf_counter()
                written = writer.flush()
                host, enc = host + t1 - t0, enc + time.perf_counter() - t1
        size = os.path.getsize(path)
    return {"write_path_host_ms_per_frame": host / n * 1e3, "uint8_convert_ms_per_frame": convert / n * 1e3,
            "writer_handoff_ms_per_frame": max(0.0, host - convert) / n * 1e3,
            "encoder_wait_ms_per_frame": enc / n * 1e3, "write_path_frames": n, "write_path_frames_encoded": written,
            "write_path_frame_hw": [h, w], "write_path_video_bytes": size}


def cpu_proxies(cfg_name: str, rc: RollingConfig, hw, device: str, blocks: int, attention: str = "sdpa",
                wide: tuple[int, int] | None = (480, 832)) -> dict:
    """The CPU proxies of the module docstring: launches per block, the write path's host time per
    frame (the bench's size and ``wide``, default 832x480), the decode-overlap fraction."""
    dev = check_device(device)
    res = {**machine_info(), **launch_probe(cfg_name, rc, hw, device, attention)}
    for m in ("reference", "fused"):  # both update modes side by side (the bench's own mode is above)
        r = res if m == rc.update_mode else launch_probe(cfg_name, rc.with_(update_mode=m), hw, device, attention)
        res[f"kernel_launches_per_block_{m}"] = r["kernel_launches_per_block"]
    s, ctx = make_sampler(cfg_name, rc, hw, dev, attention)
    make_decoder, what = toy_decoder_factory(dev, s.arch.out_dim)
    fb = rc.frames_per_block
    list(s.stream(ctx, 2))  # warm-up outside the timings (allocations, first-call costs)
    make_decoder().decode(torch.zeros(1, s.arch.out_dim, fb, *hw, device=dev))
    ov, decoded = overlap_probe(lambda: s.stream(ctx, blocks), make_decoder, blocks=blocks, frames_per_block=fb,
                                latent_shape=(1, s.arch.out_dim, *hw), frame_hw=(8 * hw[0], 8 * hw[1]), device=dev)
    res.update(ov, overlap_decoder=what)
    res.update(write_path_probe([decoded.frames[:, a:b] for a, b in _block_spans(blocks, fb)], fb))
    if wide is not None:  # 4 blocks of a test pattern
        wb = [_test_pattern(b - a, *wide, a)[None].to(dev) for a, b in _block_spans(4, fb)]
        res.update({f"{k}_{wide[1]}x{wide[0]}": v for k, v in write_path_probe(wb, fb).items()})
    return res


def _block_spans(blocks: int, frames_per_block: int) -> list[tuple[int, int]]:
    """(first, end) pixel frame of each of ``blocks`` blocks."""
    cuts = [pixel_frames(b * frames_per_block) for b in range(blocks + 1)]
    return list(zip(cuts, cuts[1:]))


def run_bench(a) -> dict:
    hw = check_args(a)
    rc = RollingConfig(update_mode=a.mode, rope_mode=a.rope)
    argv = sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:]
    res = {"config": a.config, "model": wan_config(a.config).to_dict(), "mode": a.mode, "rope": a.rope,
           "device": a.device, "latent_hw": list(hw), "attention": a.attention, "blocks": a.blocks,
           "torch": torch.__version__, "command": "python -m rolling bench " + " ".join(argv), "complete": False}

    def snapshot(extra=None):  # the JSON so far (before the timed run: no timed blocks yet)
        if a.json:
            write_json(a.json, {**res, **(extra or {"timed_blocks_done": 0}), "complete": False})
    res.update(count(a.config, rc, hw))
    snapshot()
    compile_, proxies = getattr(a, "compile", False), getattr(a, "proxies", False)
    if compile_ or proxies:
        res.update(machine_info())
    if compile_:
        res.update(compile_probe(a.config, rc, hw, a.device, a.attention, backend=a.compile_backend))
        snapshot()
    if proxies:
        res.update(cpu_proxies(a.config, rc, hw, a.device, a.blocks, a.attention))
        snapshot()
    if torch.device(a.device).type != "meta":
        res.update(time_run(a.config, rc, hw, a.device, a.blocks, a.attention, progress=snapshot if a.json else None,
                            every=getattr(a, "json_every", JSON_EVERY)))
    res["complete"] = True
    keys = ["rss_bytes_block100", "rss_bytes_end", "tensor_bytes_block100", "tensor_bytes_end",
            "forwards_per_block", "steady_forwards_per_block", "query_tokens_per_block",
            "steady_query_tokens_per_block", "flops_per_frame", "host_syncs_per_window",
            "peak_bytes", "block_ms_median", "block_ms_p99", "first_block_ms", "fps",
            "graph_breaks", "recompiles", "compiled_graphs", "compiled_steady_block_ms_median", "compile_error",
            "kernel_launches_per_block", "write_path_host_ms_per_frame", "write_path_host_ms_per_frame_832x480",
            "kernel_launches_per_block_reference", "kernel_launches_per_block_fused",
            "decode_overlap_fraction", "decode_overlap_fraction_serial", "cpu_threads", "cpu_cores_usable"]
    for k, v in ((k, res[k]) for k in keys if k in res):
        print(f"{k:36s} {v:.4g}" if isinstance(v, float) else f"{k:36s} {v}")
    if a.json:
        write_json(a.json, res)
        print(f"wrote {a.json}")
    return res
