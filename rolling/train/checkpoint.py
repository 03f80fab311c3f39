"""Training checkpoints in the release layout (ALGORITHM.md 1.4).

``<dir>/model.pt``: ``{"generator": ..., "critic": ..., "generator_ema": ... (once the EMA exists),
"step": int}``; every state dict is full (unsharded), float32, keyed ``model.<Wan2.1 key>`` with no
FSDP infixes, so :func:`rolling.loading.load_model` opens it (``generator_ema`` by default) and the
reference's loaders accept it. ``<dir>/train_state_rank<r>.pt``: each rank's AdamW state shard
(resume needs the same number of ranks).
Everything is read back with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import os

import torch

from .distributed import barrier, full_state_dict, load_full_state_dict, reshard_all
from .ema import EMA


def _optim_state(opt) -> dict:
    """This rank's optimizer state with DTensor shards replaced by their local tensors (CPU)."""
    sd = opt.state_dict()
    state = {i: {k: (v.to_local() if hasattr(v, "to_local") else v).detach().to("cpu").clone()
                 if isinstance(v, torch.Tensor) else v for k, v in st.items()} for i, st in sd["state"].items()}
    return {"state": state, "param_groups": sd["param_groups"]}


def _load_optim_state(opt, sd) -> None:
    params = [p for g in opt.param_groups for p in g["params"]]
    state = {}
    for i, st in sd["state"].items():
        p = params[int(i)]
        out = {}
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and hasattr(p, "to_local") and v.ndim > 0:
                from torch.distributed.tensor import DTensor
                v = DTensor.from_local(v.to(p.to_local().device), p.device_mesh, p.placements, run_check=False,
                                       shape=p.shape, stride=p.stride())
            out[k] = v
        state[i] = out
    opt.load_state_dict({"state": state, "param_groups": sd["param_groups"]})


def save_checkpoint(trainer, directory: str) -> str:
    """Collective under FSDP (every rank gathers); rank 0 writes. Returns ``directory``."""
    info = trainer.info
    state = {"generator": full_state_dict(trainer.generator, info),
             "critic": full_state_dict(trainer.critic, info)}
    if trainer.ema is not None:
        state["generator_ema"] = trainer.ema.full_state_dict(trainer.generator)
    reshard_all(trainer.generator), reshard_all(trainer.critic)
    optim = {"generator_optim": _optim_state(trainer.gen_opt), "critic_optim": _optim_state(trainer.critic_opt),
             "step": int(trainer.step), "world_size": info.world_size}
    os.makedirs(directory, exist_ok=True)
    torch.save(optim, os.path.join(directory, f"train_state_rank{info.rank}.pt"))
    if info.is_main:
        state["step"] = int(trainer.step)
        tmp = os.path.join(directory, "model.pt.tmp")
        torch.save(state, tmp)
        os.replace(tmp, os.path.join(directory, "model.pt"))
    barrier()
    return directory


def load_checkpoint(trainer, directory: str) -> None:
    """Resume from a directory written by :func:`save_checkpoint` (weights, EMA, step, optimizers)."""
    path = os.path.join(directory, "model.pt")
    if not os.path.isfile(path):
        raise ValueError(f"no model.pt in {directory}")
    info = trainer.info
    raw = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    load_full_state_dict(trainer.generator, dict(raw["generator"]) if info.is_main else None, info)
    load_full_state_dict(trainer.critic, dict(raw["critic"]) if info.is_main else None, info)
    trainer.step = int(raw.get("step", 0))
    if "generator_ema" in raw:
        trainer.ema = EMA(trainer.generator, trainer.cfg.ema_decay)
        trainer.ema.load_full_state_dict(trainer.generator, raw["generator_ema"])
    opt_path = os.path.join(directory, f"train_state_rank{info.rank}.pt")
    if os.path.isfile(opt_path):
        opt = torch.load(opt_path, map_location="cpu", weights_only=True)
        if opt.get("world_size", 1) != info.world_size:
            raise ValueError(f"{directory}: optimizer shards were written by {opt.get('world_size')} ranks, "
                             f"this run has {info.world_size}; resume with the same number of ranks")
        reshard_all(trainer.generator), reshard_all(trainer.critic)
        _load_optim_state(trainer.gen_opt, opt["generator_optim"])
        _load_optim_state(trainer.critic_opt, opt["critic_optim"])
    # new random streams after a resume (do not replay the first run's draws)
    for g in (trainer.shared_rng, trainer.local_rng, trainer.noise_rng):
        g.manual_seed(int(g.initial_seed()) + 1_000_033 * trainer.step)
