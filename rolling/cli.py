"""Command line: ``python -m rolling {demo,verify-trace,convert,bench,train}``."""
from __future__ import annotations

import argparse
import json
import sys


def _cmd_demo(a) -> int:
    from .demo import run_demo
    from .video import VideoWriteError
    try:
        run_demo(a.out, a.seconds, prompt=a.prompt, story=a.story, random_model=a.random_model, student=a.student,
                 scale=a.scale, seed=a.seed, update_mode=a.mode, flush=a.flush)
    except (VideoWriteError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def _cmd_verify(a) -> int:
    from .trace import load_trace, replay_calls
    tr = load_trace(a.dir)
    res = replay_calls(tr, rope_mode=a.rope)
    n_up = sum(1 for c in tr.calls if c["updating_cache"])
    print(f"{a.dir}: {res['calls']} calls ({res['calls'] - n_up} denoising, {n_up} cache updates), "
          f"{tr.config.num_layers} layers, {tr.config.num_heads} heads, dim {tr.config.dim}")
    print(f"worst |v - v_ref|  over all calls:       {res['v']:.3e}")
    print(f"worst |x0 - x0_ref| over denoising calls: {res['x0']:.3e}")
    ok = res["v"] <= a.tol and res["x0"] <= a.tol
    print(("PASS" if ok else "FAIL") + f" (tolerance {a.tol:g})")
    return 0 if ok else 1


def _cmd_convert(a) -> int:
    from .loading import convert
    info = convert(a.src, a.dst, weights=a.weights, dtype=a.dtype)
    print(f"wrote {a.dst}: {info['tensors']} tensors, config {json.dumps(info['config'])}")
    return 0


def _cmd_bench(a) -> int:
    from .bench import run_bench
    run_bench(a)
    return 0


def _cmd_train(a) -> int:
    from .train import main as train_main
    return train_main(a.config, dry_run=a.dry_run, gpus=a.gpus)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:2] == ["bench", "quality"]:  # the toy-world quality benchmarks have their own options
        from .quality import main as quality_main
        return quality_main(argv[2:])
    p = argparse.ArgumentParser(prog="python -m rolling", description="Rolling Forcing sampler core")
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="toy-world student on CPU, no downloads: stream a prompted video to MP4")
    d.add_argument("--out", default="rolling_demo.mp4", help="output .mp4 path")
    d.add_argument("--seconds", type=float, default=10.0, help="video length in seconds at 16 fps")
    d.add_argument("--prompt", default=None, help="a toy-world caption, 'a {colour} {shape} {motion} on a {background} "
                   "background' (default: 'a red circle drifting left on a dark background')")
    d.add_argument("--story", default=None, help="timed captions, one per line ('0:00 caption\\n0:05 caption'; a "
                   "written-out \\n counts as a line break), or a file holding them")
    d.add_argument("--random-model", action="store_true", help="the tiny random model instead (no text, no VAE; "
                   "for speed measurements)")
    d.add_argument("--student", default=None, help="toy student weights (default: the shipped ones)")
    d.add_argument("--scale", type=int, default=4, help="show the 64x64 toy frames this many times larger")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--mode", choices=("reference", "fused"), default="reference", help="cache update mode")
    d.add_argument("--flush", action="store_true", help="put every block on disk before generating the next")
    d.set_defaults(fn=_cmd_demo)

    v = sub.add_parser("verify-trace", help="replay a golden trace directory; exit 1 above tolerance")
    v.add_argument("dir")
    v.add_argument("--tol", type=float, default=1e-4)
    v.add_argument("--rope", choices=("reference", "relative"), default="reference")
    v.set_defaults(fn=_cmd_verify)

    c = sub.add_parser("convert", help="release .pt -> clean .safetensors (bare Wan2.1 keys)")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--weights", choices=("ema", "regular"), default="ema")
    c.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None, help="cast (default: keep)")
    c.set_defaults(fn=_cmd_convert)

    b = sub.add_parser("bench", help="forwards, tokens, FLOPs, host syncs, memory and timing per block")
    b.add_argument("--config", default="tiny", help="model preset: tiny, medium (a CPU-sized Wan: 4 layers of 512), "
                   "1.3B, 14B")
    b.add_argument("--device", default="cpu")
    b.add_argument("--blocks", type=int, default=12)
    b.add_argument("--mode", choices=("reference", "fused"), default="reference")
    b.add_argument("--attention", default="sdpa")
    b.add_argument("--rope", choices=("reference", "relative"), default="reference")
    b.add_argument("--height", type=int, default=None,
                   help="latent height, even, 2..1024 (pixels / 8; default: 60 for 1.3B/14B, 16 tiny)")
    b.add_argument("--width", type=int, default=None,
                   help="latent width, even, 2..1024 (pixels / 8; default: 104 for 1.3B/14B, 24 tiny)")
    b.add_argument("--json", default=None, help="write results to this JSON file (as the run goes: see --json-every)")
    b.add_argument("--json-every", type=int, default=100, metavar="N",
                   help='rewrite the JSON every N timed blocks with "complete": false (a killed soak keeps its '
                        'figures so far); the final write has "complete": true')
    b.add_argument("--compile", action="store_true",
                   help="also run the window forward through torch.compile (CompiledForward, fullgraph) and report "
                        "graph_breaks, recompiles in the steady state and compiled_graphs")
    b.add_argument("--compile-backend", choices=("eager", "aot_eager", "inductor"), default="inductor",
                   help="torch.compile backend for --compile (eager: Dynamo only, the fastest to compile)")
    b.add_argument("--proxies", action="store_true",
                   help="also measure the CPU proxies: kernel launches per block, host ms per frame on the video "
                        "write path, the fraction of decode time overlapped with sampling (--blocks blocks)")
    b.set_defaults(fn=_cmd_bench)

    t = sub.add_parser("train", help="DMD training (torchrun for several GPUs); --dry-run prints the memory/compute plan")
    t.add_argument("config", metavar="CONFIG", nargs="?", default=None,
                   help="training config (.json or .toml of TrainConfig fields), e.g. configs/train_1.3B.json; "
                        "optional with --dry-run (reference defaults)")
    t.add_argument("--dry-run", action="store_true", help="print the per-rank memory and FLOP plan; allocate nothing")
    t.add_argument("--gpus", type=int, default=None, help="GPUs for --dry-run (default: the config's num_gpus)")
    t.set_defaults(fn=_cmd_train)

    a = p.parse_args(argv)
    try:
        return a.fn(a)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
