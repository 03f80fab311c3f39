"""Train (and evaluate) the toy world's VAE, bidirectional teacher and causal few-step student on CPU,
reproducibly from a seed.

    python scripts/train_toy.py vae       # -> rolling/toy/weights/toy_vae.safetensors, bench/results/toy_vae_train.json
    python scripts/train_toy.py teacher   # (needs the VAE) -> toy_teacher.safetensors, bench/results/toy_teacher_train.json
    python scripts/train_toy.py student   # (needs VAE + teacher) ODE init + Rolling Forcing DMD
                                          #   -> toy_student.safetensors, bench/results/toy_student_train.json
    python scripts/train_toy.py student-control   # the same with generator lr 0 -> toy_student_control.json
    python scripts/train_toy.py all       # vae, teacher, student, in order
    python scripts/train_toy.py eval      # re-evaluate the shipped weights -> bench/results/toy_eval.json

Training uses ``--threads`` (default 2) CPU threads; results depend only on the seed (and the thread
count, through float summation order). ``student`` caches its ODE-init student at ``--ode-init`` and a
later ``student`` / ``student-control`` with the same seed, ODE config, teacher file and thread count
reuses it (the control then starts DMD from the very same weights).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
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


def _ode_init_student(args, teacher, ev, scfg):
    """ODE init, or reuse of a cached ODE-init file written by an earlier run with the same seed and config."""
    from rolling.toy import distill
    import hashlib
    with open(args.teacher_out, "rb") as f:  # a retrained teacher (e.g. `all`) must not reuse an old ODE init
        teacher_sha = hashlib.sha256(f.read()).hexdigest()[:16]
    key = json.dumps({"seed": args.seed, "ode": distill.asdict(scfg.ode), "teacher_sha256": teacher_sha,
                       "threads": args.threads}, sort_keys=True)
    if os.path.isfile(args.ode_init):
        meta = store.student_metadata(args.ode_init)
        if meta.get("ode_key") == key:
            print(f"reusing the ODE-init student {args.ode_init} (same seed and ODE config)")
            rec = json.loads(meta["ode_record"])
            return store.load_student(args.ode_init), {**rec, "reused_from": args.ode_init}
    student = distill.causal_student_from(teacher)
    rec = distill.ode_init(student, teacher, scfg.ode, seed=args.seed, ev=ev, eval_every=scfg.eval_every_ode)
    store.save_student(student, training.TEACHER_CONFIG, args.ode_init, denoising_steps=distill.STUDENT_STEPS,
                       extra={"stage": "ode_init", "seed": args.seed, "ode_key": key,
                              "ode_record": json.dumps(_clean(rec))})
    return student, rec


def run_student(args, control: bool = False) -> None:
    from rolling.toy import distill
    t0, c0 = time.perf_counter(), time.process_time()
    machine = training.machine()
    vae, teacher = store.load_vae(args.vae_out), store.load_teacher(args.teacher_out)
    scfg = distill.StudentTrainConfig(seed=args.seed, control=control)
    if args.steps:
        scfg.dmd.steps = args.steps
    if args.ode_steps:
        scfg.ode.steps = args.ode_steps
    te = time.perf_counter()
    ev = distill.make_eval_set(teacher, distill.eval_captions(scfg.eval_captions), seed=4242 + args.seed)
    eval_set_s = time.perf_counter() - te
    te = time.perf_counter()
    before_ode = {"distances": distill.distances(distill.causal_student_from(teacher).eval(), ev),
                  "what": "the teacher's weights run causally as the few-step student (before any training)"}
    eval_set_s += time.perf_counter() - te
    student, ode_rec = _ode_init_student(args, teacher, ev, scfg)
    t_ode = time.perf_counter() - t0
    if not control and not args.no_early_save:  # a usable student as soon as the ODE init is done
        store.save_student(student, training.TEACHER_CONFIG, args.student_out, denoising_steps=distill.STUDENT_STEPS,
                           extra={"stage": "ode_init", "seed": args.seed, "command": command()})
    print(f"ODE init done in {t_ode:.0f} s; DMD ({'control, generator lr 0' if control else 'run'})")
    tr, dmd_rec = distill.dmd(args.ode_init, args.teacher_out, scfg.dmd, seed=args.seed, control=control, ev=ev,
                              vae=vae, eval_every=scfg.eval_every_dmd, accuracy_every=scfg.accuracy_every_dmd)
    final = distill.student_weights(tr)
    out = {"command": command(), "config": scfg.to_dict(), "machine": machine, "control": control,
           "eval_set": {"captions": ev.captions, "seed": ev.seed, "teacher_steps": ev.teacher_steps,
                        "guidance": ev.guidance, "seconds": round(eval_set_s, 1),
                        "distance": "mean squared latent distance per element between the student's rolling "
                                    "samples and the teacher's 50-step CFG samples, same noise and caption"},
           "before_ode_init": before_ode, "ode_init": ode_rec,
           "ode_init_distances": distill.distances(store.load_student(args.ode_init), ev), "dmd": dmd_rec}
    if not control:
        path = store.save_student(final, training.TEACHER_CONFIG, args.student_out,
                                  denoising_steps=distill.STUDENT_STEPS,
                                  extra={"stage": "ode_init+dmd", "seed": args.seed, "command": command(),
                                         "dmd_steps": tr.step})
        out.update(weights=os.path.relpath(path, ROOT), weights_bytes=os.path.getsize(path))
    te = time.perf_counter()
    out["eval"] = {"final": distill.evaluate_student(final, vae, teacher, samples_per_caption=args.samples),
                   "ode_init": distill.evaluate_student(store.load_student(args.ode_init), vae,
                                                        samples_per_caption=args.samples)}
    out["final_eval_seconds"] = round(time.perf_counter() - te, 1)
    out.update(wall_seconds=round(time.perf_counter() - t0, 1), process_cpu_seconds=round(time.process_time() - c0, 1))
    for k in ("final", "ode_init"):
        e = out["eval"][k]
        print(k, "student", json.dumps(_clean(e["student"]["all"])))
    print("teacher", json.dumps(_clean(out["eval"]["final"]["teacher"]["all"])))
    write_json(args.control_json if control else args.student_json, out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("vae", "teacher", "student", "student-control", "all", "eval"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=0, help="training steps (0 = the config's default; student: DMD steps)")
    p.add_argument("--ode-steps", type=int, default=0, help="student: ODE-init steps (0 = the config's default)")
    p.add_argument("--student-out", default=store.STUDENT_PATH)
    p.add_argument("--ode-init", default=os.path.join(tempfile.gettempdir(), "toy_student", "ode_init.safetensors"),
                   help="student: where the ODE-init student is cached (reused by a later run with the same seed)")
    p.add_argument("--no-early-save", action="store_true", help="student: do not write the ODE-init student to "
                   "--student-out before DMD")
    p.add_argument("--student-json", default="toy_student_train.json")
    p.add_argument("--control-json", default="toy_student_control.json")
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
    if args.what in ("student", "all"):
        run_student(args)
    if args.what == "student-control":
        run_student(args, control=True)
    if args.what == "eval":
        run_eval(args)


if __name__ == "__main__":
    main()
