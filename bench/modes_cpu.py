"""CPU time per block, reference vs fused, as a ratio (interleaved A/B runs, one thread).

python bench/modes_cpu.py --json bench/results/modes_cpu_tiny.json
Absolute CPU milliseconds mean little for the GPU goal; the ratio and the deterministic counts of
`python -m rolling bench` (forwards, tokens, FLOPs, syncs) are what carry over.
"""
import argparse
import json
import statistics

import torch

from rolling.bench import time_run
from rolling.config import RollingConfig


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=4)
    p.add_argument("--blocks", type=int, default=12)
    p.add_argument("--json")
    a = p.parse_args()
    torch.set_num_threads(1)
    res = {"reference": [], "fused": []}
    for _ in range(a.reps):
        for mode in ("reference", "fused"):
            r = time_run("tiny", RollingConfig(update_mode=mode), (16, 24), "cpu", a.blocks, "sdpa")
            res[mode].append(r["block_ms_median"])
    out = {m: {"block_ms_median_of_runs": statistics.median(v), "runs": v} for m, v in res.items()}
    out["fused_over_reference"] = out["fused"]["block_ms_median_of_runs"] / out["reference"]["block_ms_median_of_runs"]
    out["command"] = f"python bench/modes_cpu.py --reps {a.reps} --blocks {a.blocks}"
    out["note"] = "tiny config (dim 64, 2 layers), latent 16x24, float32, 1 thread, shared 2-core machine"
    print(json.dumps(out, indent=1))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
