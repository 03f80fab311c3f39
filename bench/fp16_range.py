"""Activation range of the toy student (a trained Wan2.1 DiT) in float32, against float16's limit, and the
float16 run's error: what fp16 compute risks (issue 10).

    python bench/fp16_range.py [--blocks 6] [--json bench/results/fp16_range_toy.json]

Every module output of the DiT is hooked; the peak |value| per module kind is recorded. Some parts are
computed by the core outside module calls (the residual stream, RoPE, the time embedding's sinusoid);
the core keeps those in float32 as ComfyUI's Wan does (see README, Compatibility).
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from rolling.bench import write_json  # noqa: E402

FP16_MAX = float(torch.finfo(torch.float16).max)
CAPTION = "a red circle drifting left on a dark background"


def module_kind(name: str, module: torch.nn.Module) -> str:
    """``Linear:blocks.*.self_attn.k``-style name: the class and the path with the block index folded."""
    parts = name.split(".")
    if parts[0] == "blocks" and len(parts) > 1:
        parts[1] = "*"
    return f"{type(module).__name__}:{'.'.join(parts)}"


def activation_peaks(model: torch.nn.Module, run) -> dict[str, float]:
    """Peak |output| per module kind (:func:`module_kind`) while ``run()`` calls ``model``."""
    peaks: dict[str, float] = {}
    handles = []
    for name, mod in model.named_modules():
        if not name:
            continue
        kind = module_kind(name, mod)

        def hook(_m, _i, out, kind=kind):
            if isinstance(out, torch.Tensor) and out.is_floating_point() and out.numel():
                peaks[kind] = max(peaks.get(kind, 0.0), out.detach().abs().max().item())
        handles.append(mod.register_forward_hook(hook))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return peaks


def measure(blocks: int = 6, seed: int = 3) -> dict:
    """Peaks of the float32 run, the float16 run's latent error (max / std of the fp32 latents) and finiteness."""
    from rolling.sampler import RollingSampler
    from rolling.toy import TextEncoder, load_student
    from rolling.toy.store import student_rolling_config

    ctx = TextEncoder().encode(CAPTION)
    cfg = student_rolling_config()
    model = load_student()
    out = {}

    def run32():
        with torch.inference_mode():
            out["fp32"] = RollingSampler(model, cfg, height=8, width=8, device="cpu", dtype=torch.float32,
                                         attention="sdpa", seed=seed).generate(ctx, blocks)
    peaks = activation_peaks(model, run32)
    half = load_student(dtype=torch.float16)
    with torch.inference_mode():
        lat16 = RollingSampler(half, cfg, height=8, width=8, device="cpu", dtype=torch.float16, attention="sdpa",
                               seed=seed).generate(ctx.half(), blocks)
    ref = out["fp32"]
    peak = max(peaks.values())
    return {"model": "toy student (rolling/toy/weights/toy_student.safetensors)", "caption": CAPTION,
            "blocks": blocks, "seed": seed, "fp16_max": FP16_MAX, "peak_abs_activation": peak,
            "headroom_vs_fp16": FP16_MAX / peak,
            "peaks_by_module": dict(sorted(peaks.items(), key=lambda kv: -kv[1])),
            "fp16_latent_error_max_over_std": ((lat16.float() - ref).abs().max() / ref.std()).item(),
            "fp16_all_finite": bool(torch.isfinite(lat16).all())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", type=int, default=6)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    res = measure(a.blocks)
    res["command"] = "python bench/fp16_range.py " + " ".join(argv if argv is not None else sys.argv[1:])
    top = list(res["peaks_by_module"].items())[:8]
    print(f"peak |activation| {res['peak_abs_activation']:.2f} (fp16 max {FP16_MAX:.0f}, headroom "
          f"{res['headroom_vs_fp16']:.0f}x); fp16 latent error {res['fp16_latent_error_max_over_std']:.4f} of std")
    for k, v in top:
        print(f"  {v:9.2f}  {k}")
    if a.json:
        write_json(a.json, res)  # atomic, as the bench's JSONs
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
