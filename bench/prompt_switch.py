"""Effect of the prompt-switch options on a tiny random model (numbers for the issue note).

python bench/prompt_switch.py --json bench/results/prompt_switch_tiny.json
Per block: mean |x - x_single| against a run that keeps prompt A, and mean |x_b - x_{b-1}| (the jump
between consecutive blocks), for cut / blend / recache keep_sink / recache reanchor at block 10.
"""
import argparse
import json

import torch

from rolling.config import RollingConfig, WanConfig
from rolling.model import build_model
from rolling.prompts import PromptSchedule, PromptSegment
from rolling.sampler import RollingSampler


def ctx(seed, dim):
    g = torch.Generator().manual_seed(seed)
    c = torch.zeros(1, 512, dim)
    c[:, :8] = torch.randn(1, 8, dim, generator=g) * 2
    return c


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--json")
    a = p.parse_args()
    torch.set_num_threads(1)
    wc = WanConfig(dim=64, ffn_dim=128, num_heads=4, num_layers=4, freq_dim=32, text_dim=32)
    model = build_model(wc, seed=0)
    A, B = ctx(1, 32), ctx(2, 32)
    nb, sw = 20, 10

    def run(sched):
        s = RollingSampler(model, RollingConfig(), height=8, width=12, dtype=torch.float32, device="cpu", seed=3)
        return torch.stack([b.latents for b in s.stream(sched, nb)])  # [nb, 1, 16, 3, h, w]

    single = run(A)
    variants = {
        "cut": PromptSchedule([PromptSegment(0, A), PromptSegment(sw, B)]),
        "blend_4_blocks": PromptSchedule([PromptSegment(0, A), PromptSegment(sw, B, transition="blend", blend_blocks=4)]),
        "recache_keep_sink": PromptSchedule([PromptSegment(0, A), PromptSegment(sw, B, recache="keep_sink")]),
        "recache_reanchor": PromptSchedule([PromptSegment(0, A), PromptSegment(sw, B, recache="reanchor")]),
    }
    out = {"switch_block": sw, "blocks": nb, "model": wc.to_dict(),
           "note": "diff_vs_single[b] = mean|x_b - x_b(prompt A only)|; jump[b] = mean|x_b[first frame] - x_{b-1}[last frame]|"}
    outs = {}
    for name, sched in variants.items():
        x = outs[name] = run(sched)
        out[name] = {
            "diff_vs_single": [round((x[b] - single[b]).abs().mean().item(), 5) for b in range(nb)],
            "jump": [round((x[b][:, :, 0] - x[b - 1][:, :, -1]).abs().mean().item(), 5) for b in range(1, nb)],
        }
    out["single_jump"] = [round((single[b][:, :, 0] - single[b - 1][:, :, -1]).abs().mean().item(), 5) for b in range(1, nb)]
    for k in variants:
        print(f"{k:20s} first changed block {next(b for b, d in enumerate(out[k]['diff_vs_single']) if d > 0)}, "
              f"max jump around switch {max(out[k]['jump'][sw - 6:sw + 6]):.4f} (single-prompt max {max(out['single_jump']):.4f})")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
