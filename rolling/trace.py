"""Golden-trace tools: replay a recorded run of a published sampler against this implementation.

A trace directory holds ``config.json`` (model config), ``checkpoint.pt`` (release layout),
``trace.json`` (ordered DiT calls: start_frame, num_frames, updating_cache, timesteps, plus run
metadata) and ``trace.safetensors`` (per call ``callNNNN.{x,t,v,x0}`` in [B, F, C, H, W], plus
``noise``, ``context``, ``latents``). See ../shared/fixtures/README.md. Rolling Forcing traces and
chunk-causal ones (Self-Forcing's, ``"schedule": "chunk_causal"``, which also record their re-noise
draws as ``renoise.bBBBB.sJ``) replay with the matching :class:`RollingConfig`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from .attention import sdpa_attention
from .cache import RollingKVCache
from .config import RollingConfig, WanConfig
from .flow import FlowSchedule
from .forward import TextContext, TimeEmbedder, WanArch, forward
from .loading import load_model
from .noise import TensorNoise
from .schedule import Forward, recache_blocks


@dataclass
class Trace:
    meta: dict
    tensors: dict
    model: torch.nn.Module
    config: WanConfig

    @property
    def calls(self) -> list[dict]:
        return self.meta["calls"]

    @property
    def schedule(self) -> str:
        return "chunk_causal" if str(self.meta.get("schedule", "rolling")).startswith("chunk_causal") else "rolling"

    @property
    def rolling_config(self) -> RollingConfig:
        m = self.meta
        fb = int(m.get("frames_per_block", 3))
        span = int(m.get("max_attention_frames", 21))
        if self.schedule == "rolling":
            capacity = int(m.get("kv_cache_frames", 24))
        else:  # the traced cache holds span frames; our ring holds whole blocks: the history plus the block
            capacity = -(-span // fb) * fb + fb
        return RollingConfig(
            steps=tuple(m.get("denoising_step_list", (1000, 800, 600, 400, 200))),
            shift=float(m.get("timestep_shift", 5.0)), frames_per_block=fb,
            sink_blocks=int(m.get("sink_frames", 3)) // fb, span_frames=span, capacity_frames=capacity,
            context_noise=float(m.get("context_noise", 0)), schedule=self.schedule,
            update_mode="reference")  # the published samplers' own calls

    def x(self, i: int, name: str) -> torch.Tensor:
        """Tensor ``name`` of call i, channel-first [B, C, F, H, W]."""
        return self.tensors[f"call{i:04d}.{name}"].permute(0, 2, 1, 3, 4)

    def context(self, prompt: int = 0) -> torch.Tensor:
        """The text context of prompt ``prompt`` (traces with prompt switches hold ``context0``, ``context1``...)."""
        return self.tensors.get(f"context{prompt}", self.tensors["context"])

    def prompts(self):
        """The run's prompts as a PromptSchedule: a segment from each block where the prompt changed
        (re-encoding at the switch, in the trace's sink mode), or the single context."""
        from .prompts import PromptSchedule, PromptSegment
        fb, segs = self.rolling_config.frames_per_block, []
        for c in self.calls:
            p = c.get("prompt", 0)
            if not c["updating_cache"] and (not segs or segs[-1][1] != p):
                segs.append((c["start_frame"] // fb, p))
        return PromptSchedule([PromptSegment(b, self.context(p), recache="none" if i == 0 else self.recache_mode)
                               for i, (b, p) in enumerate(segs)])

    @property
    def recache_mode(self) -> str:
        """The sink mode of a prompt-switching trace's re-encodes (LongLive's ``global_sink``)."""
        return "keep_sink" if self.meta.get("global_sink", True) else "new_sink"

    def forward_of(self, c: dict) -> Forward:
        """The forward plan of a recorded call."""
        fb = self.rolling_config.frames_per_block
        first = c["start_frame"] // fb
        blocks = tuple(range(first, first + c["num_frames"] // fb))
        if c.get("kind") == "recache":
            rc = self.rolling_config
            expect, qo = recache_blocks(blocks[-1] + 1, rc.span_frames, fb, rc.sink_blocks, self.recache_mode)
            if expect != blocks:
                raise ValueError(f"call {c['index']}: the trace re-encodes blocks {blocks}, the rule gives {expect}")
            return Forward(c["index"], "recache", clean=blocks, recache=self.recache_mode, query_only=qo)
        if c["updating_cache"]:
            return Forward(c["index"], "update", clean=blocks)
        return Forward(c["index"], "window", blocks=blocks, steps=(0,) * len(blocks))

    @property
    def latent_hw(self) -> tuple[int, int]:
        shape = self.meta["latent_shape"]
        return shape[3], shape[4]


def load_trace(path: str, dtype=torch.float32) -> Trace:
    from safetensors.torch import load_file
    for f in ("config.json", "checkpoint.pt", "trace.json", "trace.safetensors"):
        if not os.path.isfile(os.path.join(path, f)):
            raise ValueError(f"{path} is not a trace directory: {f} is missing (need config.json, checkpoint.pt, "
                             "trace.json, trace.safetensors)")
    with open(os.path.join(path, "trace.json")) as fh:
        meta = json.load(fh)
    with open(os.path.join(path, "config.json")) as fh:
        cfg = WanConfig.from_dict(json.load(fh))
    model = load_model(os.path.join(path, "checkpoint.pt"), dtype=dtype, num_heads=cfg.num_heads)
    return Trace(meta, load_file(os.path.join(path, "trace.safetensors")), model, cfg)


def replay_calls(tr: Trace, rope_mode: str = "reference") -> dict:
    """Replay every recorded call in order against a fresh cache; return the worst errors.

    Returns ``{"v": max |v - v_ref| over all calls, "x0": over denoising calls, "per_call": [...]}``.
    The update calls' x0 is not compared (the reference's sigma for t = 0 is a table artefact and the
    output is discarded); their v checks the cache-update read rule."""
    model, arch = tr.model, WanArch.of(tr.model)
    dtype = next(model.parameters()).dtype
    rc = tr.rolling_config.with_(rope_mode=rope_mode)
    h, w = tr.latent_hw
    b = tr.meta["latent_shape"][0]
    cache = RollingKVCache(rc, num_layers=arch.num_layers, num_heads=arch.num_heads, head_dim=arch.head_dim,
                           batch=b, grid=(h // arch.patch_size[1], w // arch.patch_size[2]), device="cpu", dtype=dtype)
    texts = {}
    time = TimeEmbedder(model, dtype=dtype, device="cpu")
    sched = FlowSchedule(rc.shift)
    worst_v = worst_x0 = 0.0
    per_call = []
    for c in tr.calls:
        i = c["index"]
        x = tr.x(i, "x").to(dtype)
        p = c.get("prompt", 0)
        if p not in texts:
            texts[p] = TextContext(model, tr.context(p), dtype=dtype, device="cpu")
        plan = cache.plan(tr.forward_of(c))
        ts = c.get("timesteps") or [float(tr.meta.get("context_noise", 0))] * c["num_frames"]
        v = forward(model, arch, x, ts, plan, cache, [(0, c["num_frames"], texts[p])], time, sdpa_attention)
        cache.commit(plan)
        ev = (v.float() - tr.x(i, "v").float()).abs().max().item()
        ex = None
        if not c["updating_cache"]:
            sig = torch.tensor([sched.sigma(t) for t in ts]).view(1, 1, -1, 1, 1)
            ex = (x.float() - sig * v.float() - tr.x(i, "x0").float()).abs().max().item()
            worst_x0 = max(worst_x0, ex)
        worst_v = max(worst_v, ev)
        per_call.append({"index": i, "v": ev, "x0": ex})
    return {"v": worst_v, "x0": worst_x0, "calls": len(tr.calls), "per_call": per_call}


def recover_noise(tr: Trace) -> TensorNoise:
    """Noise source that reproduces the traced run: the initial noise plus the re-noise draws, as
    recorded (``renoise.bBBBB.sJ``) or implied by consecutive inputs
    (x_in = (1 - sigma) x0_prev + sigma eps  =>  eps = (x_in - (1-sigma) x0_prev) / sigma)."""
    rc = tr.rolling_config
    fb = rc.frames_per_block
    noise = tr.tensors["noise"].permute(0, 2, 1, 3, 4)
    recorded = {k: v for k, v in tr.tensors.items() if k.startswith("renoise.b")}
    if recorded:
        return TensorNoise(noise, {(int(k[9:13]), int(k.split(".s")[1])): v.permute(0, 2, 1, 3, 4)
                                   for k, v in recorded.items()}, fb)
    sequential = sorted(k for k in tr.tensors if k.startswith("draw"))  # [B*fb, C, H, W], block then step order
    if sequential:
        per = rc.num_steps - 1
        return TensorNoise(noise, {(d // per, d % per + 1): tr.tensors[k].unsqueeze(0).permute(0, 2, 1, 3, 4)
                                   for d, k in enumerate(sequential)}, fb)
    sched = FlowSchedule(rc.shift)
    t_steps = sched.warp(rc.steps)
    last_x0: dict[int, tuple[int, torch.Tensor]] = {}  # block -> (step, x0)
    renoise = {}
    for c in tr.calls:
        if c["updating_cache"]:
            continue
        i, first = c["index"], c["start_frame"] // fb
        x, x0 = tr.x(i, "x"), tr.x(i, "x0")
        for k in range(c["num_frames"] // fb):
            b = first + k
            t = c["timesteps"][k * fb]
            j = min(range(len(t_steps)), key=lambda n: abs(t_steps[n] - t))
            xb = x[:, :, k * fb:(k + 1) * fb]
            if j > 0 and b in last_x0:
                sig = sched.sigma(t_steps[j])
                renoise[(b, j)] = (xb.float() - (1 - sig) * last_x0[b][1].float()) / sig
            last_x0[b] = (j, x0[:, :, k * fb:(k + 1) * fb])
    return TensorNoise(noise, renoise, fb)
