"""Train (and evaluate) the toy world's VAE and bidirectional teacher on CPU, reproducibly from a seed.

    python scripts/train_toy.py vae       # -> rolling/toy/weights/toy_vae.safetensors, bench/results/toy_vae_train.json
    python scripts/train_toy.py teacher   # (needs the VAE) -> toy_teacher.safetensors, bench/results/toy_teacher_train.json
    python scripts/train_toy.py all       # both, in order
    python scripts/train_toy.py eval      # re-evaluate the shipped weights -> bench/results/toy_eval.json

Training uses ``--threads`` (default 2) CPU threads; results depend only on the seed (and the thread
count, through float summation order).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# Idle OpenMP threads sleep instead of spinning: on a shared machine spinning threads that lose
# their core make every op wait (measured: 2-10x slower steps with 2 threads under load).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from rolling.toy import store, training  # noqa: E402

RESULTS = os.path.join(ROOT, "bench", "results")


def _clean(x):
    """JSON-safe: NaN / inf -> None, tuples -> lists."""
    if isinstance(x, float):
        return None if math.isnan(x) or math.isinf(x) else x
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_json(name: str, obj: dict) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, name)
    with open(path, "w") as f:
        json.dump(_clean(obj), f, indent=1)
    print(f"wrote {os.path.relpath(path, ROOT)}")
    return path


def command() -> str:
    return "python scripts/train_toy.py " + " ".join(sys.argv[1:])


def run_vae(args) -> None:
    t0, c0 = time.perf_counter(), time.process_time()
    cfg = training.VAETrainConfig(seed=args.seed, **({"steps": args.steps} if args.steps else {}))
    machine = training.machine()
    vae, record = training.train_vae(cfg)
    t_eval = time.perf_counter()
    ev = training.evaluate_vae(vae, scenes=cfg.eval_scenes)
    record["eval_seconds"] = round(time.perf_counter() - t_eval, 1)
    path = store.save_vae(vae, args.vae_out, extra={"seed": args.seed, "command": command()})
    record.update(command=command(), wall_seconds=round(time.perf_counter() - t0, 1),
                  process_cpu_seconds=round(time.process_time() - c0, 1), machine=machine,
                  weights=os.path.relpath(path, ROOT), weights_bytes=os.path.getsize(path), eval=ev)
    print(json.dumps(_clean(ev), indent=1))
    write_json(args.vae_json, record)


def run_teacher(args) -> None:
    t0, c0 = time.perf_counter(), time.process_time()
    vae = store.load_vae(args.vae_out)
    cfg = training.TeacherTrainConfig(seed=args.seed, **({"steps": args.steps} if args.steps else {}))
    machine = training.machine()
    model, record = training.train_teacher(cfg, vae)
    path = store.save_teacher(model, cfg.model, args.teacher_out, extra={"seed": args.seed, "command": command()})
    t_eval = time.perf_counter()
    ev = training.evaluate_teacher(model, vae)
    record["eval_seconds"] = round(time.perf_counter() - t_eval, 1)
    record.update(command=command(), wall_seconds=round(time.perf_counter() - t0, 1),
                  process_cpu_seconds=round(time.process_time() - c0, 1), machine=machine,
                  weights=os.path.relpath(path, ROOT), weights_bytes=os.path.getsize(path), eval=ev)
    print(json.dumps(_clean({k: v for k, v in ev.items() if not k.startswith("guidance")}), indent=1))
    for k, v in ev.items():
        if k.startswith("guidance"):
            print(k, json.dumps(_clean({s: v[s] for s in ("all", "held_out", "seen")})))
    write_json(args.teacher_json, record)


def run_eval(args) -> None:
    t0 = time.perf_counter()
    vae = store.load_vae(args.vae_out)
    out = {"command": command(), "machine": training.machine(), "vae": training.evaluate_vae(vae)}
    if os.path.isfile(args.teacher_out):
        out["teacher"] = training.evaluate_teacher(store.load_teacher(args.teacher_out), vae,
                                                   samples_per_caption=args.samples)
    out["wall_seconds"] = round(time.perf_counter() - t0, 1)
    write_json("toy_eval.json", out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("vae", "teacher", "all", "eval"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=0, help="training steps (0 = the config's default)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--samples", type=int, default=2, help="eval: samples per caption")
    p.add_argument("--vae-out", default=store.VAE_PATH)
    p.add_argument("--teacher-out", default=store.TEACHER_PATH)
    p.add_argument("--vae-json", default="toy_vae_train.json")
    p.add_argument("--teacher-json", default="toy_teacher_train.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.what in ("vae", "all"):
        run_vae(args)
    if args.what in ("teacher", "all"):
        run_teacher(args)
    if args.what == "eval":
        run_eval(args)


if __name__ == "__main__":
    main()
