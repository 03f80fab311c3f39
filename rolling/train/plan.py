"""``--dry-run``: the memory and compute plan of a training run, without allocating any model.

Parameter counts come from the models built on the meta device; forward shapes (query frames, key
frames per forward, which forwards carry gradient) come from the real rollout bookkeeping (the core's
cache plans on a meta-device cache and :mod:`rolling.train.windows`), averaged exactly over the
random choices (rollout length, branch, offset).

FLOP model (per forward): linear layers 2 * tokens * layers * (6 dim^2 + 2 dim ffn) (self q,k,v,o;
cross q,o; FFN), cross K/V and the text MLP on the text tokens, self-attention 4 * Lq * Lk * dim per
layer, cross-attention 4 * Lq * Ltext * dim per layer. Backward = 2x forward; gradient checkpointing
adds one more forward of every gradient forward. Memory per rank under FSDP (full sharding over N
ranks): fp32 master weights, fp32 gradients and two fp32 AdamW moments of the trainable models
sharded 1/N, the frozen teacher sharded in its storage dtype, plus unsharded bf16 parameters of the
root and two blocks in flight (current + prefetch), the KV cache and activations. Activation bytes
per token and layer without checkpointing are *estimated* as 2 * (22 dim + 2 ffn) bytes (bf16
tensors kept for backward: norms, q/k/v, fp32 RoPE copies, attention and FFN in/outputs); with
checkpointing each block keeps only its bf16 input (2 dim bytes per token) plus one block's worth
during recompute (the cached keys it attends to are views of the KV cache, no copies).
"""
from __future__ import annotations

import itertools

import torch

from ..config import WanConfig
from ..model import build_model
from ..forward import WanArch
from .config import TrainConfig
from .rollout import Rollout, RolloutChoice

H100_BF16_DENSE = 989e12  # FLOP/s, for the time estimate only


def param_counts(cfg: WanConfig) -> dict:
    """Total / per-block / root (non-block) parameter counts, from a meta-device model."""
    m = build_model(cfg, device="meta")
    total = sum(p.numel() for p in m.parameters())
    block = sum(p.numel() for p in m.blocks[0].parameters())
    return {"total": total, "block": block, "root": total - block * len(m.blocks)}


def forward_flops(cfg: WanConfig, q_tokens: int, k_tokens: int, text_tokens: int) -> float:
    d, f, n = cfg.dim, cfg.ffn_dim, cfg.num_layers
    lin = 2 * q_tokens * n * (6 * d * d + 2 * d * f)
    text = 2 * text_tokens * (cfg.text_dim * d + d * d) + 2 * text_tokens * n * 2 * d * d
    attn = 4 * q_tokens * k_tokens * d * n + 4 * q_tokens * text_tokens * d * n
    return float(lin + text + attn)


def rollout_forwards(tc: TrainConfig, num_frames: int, branch: str, offset: int) -> list[tuple[int, int, bool]]:
    """(query frames, key frames, with gradient) of every student forward of one rollout: the real
    :class:`Rollout` on the meta device, with a stand-in generator that records each forward's plan."""
    rc = tc.rolling_config()
    seen = []

    def generator(x, timesteps, context, *, plan, cache):
        seen.append((plan.num_frames, sum(g.key_frames for g in plan.groups), torch.is_grad_enabled()))
        return torch.zeros_like(x)

    arch = WanArch(dim=2, num_heads=1, num_layers=1, freq_dim=2, text_dim=2, in_dim=16, out_dim=16, patch_size=(1, 1, 1))
    r = Rollout(generator, rc, height=1, width=1, batch=1, device="meta", arch=arch)
    with torch.enable_grad():
        r.run(torch.empty(1, 1, 2, device="meta"), RolloutChoice(num_frames, branch, offset),
              lambda b, j, shape, device, dtype: torch.empty(shape, device=device, dtype=dtype),
              loss_frames=tc.loss_frames)
    return seen


def _choices(tc: TrainConfig):
    T = len(tc.denoising_steps)
    for n, br, k in itertools.product(tc.rollout_frames, ("rolling", "self"), range(T)):
        p = tc.rolling_prob if br == "rolling" else 1 - tc.rolling_prob
        yield n, br, k, p / (len(tc.rollout_frames) * T)


def make_plan(tc: TrainConfig, gpus: int | None = None) -> dict:
    gpus = gpus or tc.num_gpus
    g_cfg, c_cfg, t_cfg = (tc.model_config(w) for w in ("generator", "critic", "teacher"))
    pc = {w: param_counts(c) for w, c in (("generator", g_cfg), ("critic", c_cfg), ("teacher", t_cfg))}
    tpf = (tc.latent_height // g_cfg.patch_size[1]) * (tc.latent_width // g_cfg.patch_size[2])
    B, L, txt = tc.batch_size, tc.loss_frames, tc.text_tokens
    ck = tc.gradient_checkpointing
    grad_mult = 4.0 if ck else 3.0  # forward + 2x backward (+ recompute)

    def student(q, k, grad):
        return forward_flops(g_cfg, q * tpf, k * tpf, txt) * B * (grad_mult if grad else 1.0)

    bidir = lambda cfg, frames, batch: forward_flops(cfg, frames * tpf, frames * tpf, txt) * batch
    gen_iter = crit_iter = 0.0
    worst_grad_frames = worst_saved = 0
    per_tok_layer = 2 * (22 * g_cfg.dim + 2 * g_cfg.ffn_dim)  # bytes kept for backward, no checkpointing
    kept = (2 * g_cfg.dim) if ck else per_tok_layer  # per query token and layer
    for n, br, k, p in _choices(tc):
        fw = rollout_forwards(tc, n, br, k)
        roll_grad = sum(student(q, kk, g) for q, kk, g in fw)
        roll_nograd = sum(student(q, kk, False) for q, kk, g in fw)
        worst_grad_frames = max(worst_grad_frames, sum(q for q, _, g in fw if g))
        # kept for backward per query token and layer; without checkpointing attention also keeps the
        # concatenated cached K/V it read (with checkpointing those are views of the cache: no copy)
        ctx_bytes = 0 if ck else 2 * 2 * g_cfg.dim
        saved = sum(q * kept + (kk - q) * ctx_bytes for q, kk, g in fw if g) * tpf * B * g_cfg.num_layers
        worst_saved = max(worst_saved, saved)
        gen_iter += p * roll_grad
        crit_iter += p * roll_nograd
    gen_iter += bidir(c_cfg, L, B) + bidir(t_cfg, L, 2 * B)  # fake score + teacher cond/uncond (no grad)
    crit_iter += bidir(c_cfg, L, B) * grad_mult
    per_iter = gen_iter / tc.gen_update_every + crit_iter  # generator every k-th iteration, critic every one

    gb = lambda n: n / 2**30
    tdt = 2 if tc.teacher_dtype == "bf16" else 4
    mem = {
        "generator weights fp32": 4 * pc["generator"]["total"] / gpus,
        "generator grads fp32": 4 * pc["generator"]["total"] / gpus,
        "generator AdamW (2 moments fp32)": 8 * pc["generator"]["total"] / gpus,
        "critic weights fp32": 4 * pc["critic"]["total"] / gpus,
        "critic grads fp32": 4 * pc["critic"]["total"] / gpus,
        "critic AdamW (2 moments fp32)": 8 * pc["critic"]["total"] / gpus,
        f"teacher weights {tc.teacher_dtype} (frozen)": tdt * pc["teacher"]["total"] / gpus,
    }
    unsharded = 2 * max(pc[w]["root"] for w in pc) + 2 * 2 * max(pc[w]["block"] for w in pc) \
        + 4 * max(pc["generator"]["block"], pc["critic"]["block"])  # bf16 root + 2 blocks; fp32 block grads
    mem["unsharded params in flight (bf16 root + 2 blocks, fp32 block grads)"] = unsharded
    rc = tc.rolling_config()
    kv = g_cfg.num_layers * B * rc.capacity_frames * tpf * g_cfg.dim * 2 * 2
    mem[f"KV cache ({rc.capacity_frames} frames, bf16)"] = kv
    crit_tok_layer = 2 * (22 * c_cfg.dim + 2 * c_cfg.ffn_dim)
    if ck:  # + one block's full activations while it is recomputed
        act_gen = worst_saved + rc.window_frames * tpf * B * per_tok_layer
        act_crit = L * tpf * B * (c_cfg.num_layers * 2 * c_cfg.dim + crit_tok_layer)
    else:
        act_gen = worst_saved
        act_crit = L * tpf * B * c_cfg.num_layers * crit_tok_layer
    # the teacher's no-grad forward runs while the generator's graph is alive: add its largest per-block
    # transients (q, k, v, attention out, FFN hidden; CFG batch 2B)
    teacher_tr = 2 * B * L * tpf * (8 * t_cfg.dim + 2 * t_cfg.ffn_dim) * 2
    mem["activations + transients (estimate, peak of generator / critic phase)"] = max(act_gen + teacher_tr, act_crit)
    total = sum(mem.values())
    host = {"EMA fp32 shard (CPU)": 4 * pc["generator"]["total"] / gpus}
    return {
        "gpus": gpus, "tokens_per_frame": tpf, "batch_per_rank": B,
        "params": {w: pc[w]["total"] for w in pc}, "params_per_block": {w: pc[w]["block"] for w in pc},
        "memory_bytes_per_rank": mem, "memory_total_bytes_per_rank": total, "host_bytes_per_rank": host,
        "worst_grad_frames": worst_grad_frames,
        "flops": {"generator_iteration_per_rank": gen_iter + crit_iter, "critic_only_iteration_per_rank": crit_iter,
                  "mean_iteration_per_rank": per_iter, "mean_iteration_all_ranks": per_iter * gpus},
        "gb": gb,
    }


def format_plan(tc: TrainConfig, plan: dict) -> str:
    gb, P = plan["gb"], plan["params"]
    lines = [
        f"Rolling Forcing DMD training plan: {plan['gpus']} GPUs, FSDP2 full shard, batch {plan['batch_per_rank']} "
        f"per rank, latent {tc.latent_height}x{tc.latent_width} ({plan['tokens_per_frame']} tokens/frame), "
        f"rollouts {list(tc.rollout_frames)} frames, loss on the last {tc.loss_frames}, "
        f"checkpointing {'on' if tc.gradient_checkpointing else 'off'}, "
        f"{'bf16 mixed precision' if tc.mixed_precision else 'fp32'}",
        f"parameters: generator {P['generator']:,} | critic {P['critic']:,} | teacher {P['teacher']:,}",
        "GPU memory per rank:",
    ]
    for k, v in plan["memory_bytes_per_rank"].items():
        lines.append(f"  {k:<70s} {gb(v):8.2f} GiB")
    lines.append(f"  {'total (upper bound: sums phases that do not overlap)':<70s} "
                 f"{gb(plan['memory_total_bytes_per_rank']):8.2f} GiB")
    for k, v in plan["host_bytes_per_rank"].items():
        lines.append(f"host memory per rank: {k} {gb(v):.2f} GiB")
    f = plan["flops"]
    lines += [
        f"largest gradient rollout: {plan['worst_grad_frames']} frames through gradient forwards",
        "FLOPs (exact expectation over rollout length / branch / offset):",
        f"  generator iteration (rollout with grad + critic/teacher scores + critic update): "
        f"{f['generator_iteration_per_rank'] / 1e12:,.1f} TFLOP per rank",
        f"  critic-only iteration: {f['critic_only_iteration_per_rank'] / 1e12:,.1f} TFLOP per rank",
        f"  mean per iteration (generator every {tc.gen_update_every}): "
        f"{f['mean_iteration_per_rank'] / 1e12:,.1f} TFLOP per rank, {f['mean_iteration_all_ranks'] / 1e15:,.2f} PFLOP "
        f"all ranks",
        f"  at 40% of H100 bf16 dense peak: ~{f['mean_iteration_per_rank'] / (0.4 * H100_BF16_DENSE):.1f} s per "
        f"iteration, {tc.max_steps} steps ~{tc.max_steps * f['mean_iteration_per_rank'] / (0.4 * H100_BF16_DENSE) / 3600:.1f} h",
    ]
    return "\n".join(lines)


def dry_run(tc: TrainConfig, gpus: int | None = None) -> str:
    text = format_plan(tc, make_plan(tc, gpus))
    print(text)
    return text
