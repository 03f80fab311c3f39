"""Training checkpoints in the release layout (ALGORITHM.md 1.4).

``<dir>/model.pt``: ``{"generator": ..., "critic": ..., "generator_ema": ... (once the EMA exists),
"step": int}``; every state dict is full (unsharded), float32, keyed ``model.<Wan2.1 key>`` with no
FSDP infixes, so :func:`rolling.loading.load_model` opens it (``generator_ema`` by default) and the
reference's loaders accept it. ``<dir>/train_state_rank<r>.pt``: each rank's AdamW state shard
and every random stream of the rank (the trainer's generators, the prompt sampler's epoch position, the
global torch RNGs), so a resumed run continues exactly where the saved one was (same draws, bit for
bit on the same hardware); resume needs the same number of ranks.
Everything is read back with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import os
import warnings

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


def rng_state(trainer) -> dict:
    """Every random stream a training step draws from (per rank)."""
    st = {"shared_rng": trainer.shared_rng.get_state(), "local_rng": trainer.local_rng.get_state(),
          "noise_rng": trainer.noise_rng.get_state(), "data_rng": trainer.data_rng.get_state(),
          "torch_cpu": torch.get_rng_state(), "prompts": trainer.prompts.state_dict()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["torch_cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(trainer, st: dict) -> None:
    for name in ("shared_rng", "local_rng", "noise_rng", "data_rng"):
        getattr(trainer, name).set_state(st[name])
    torch.set_rng_state(st["torch_cpu"])
    if "torch_cuda" in st and torch.cuda.is_available():
        cuda = st["torch_cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    trainer.prompts.load_state_dict(st["prompts"])


def save_checkpoint(trainer, directory: str) -> str:
    """Collective under FSDP (every rank gathers); rank 0 writes. Returns ``directory``."""
    info = trainer.info
    state = {"generator": full_state_dict(trainer.generator, info),
             "critic": full_state_dict(trainer.critic, info)}
    if trainer.ema is not None:
        state["generator_ema"] = trainer.ema.full_state_dict(trainer.generator)
    reshard_all(trainer.generator), reshard_all(trainer.critic)
    optim = {"generator_optim": _optim_state(trainer.gen_opt), "critic_optim": _optim_state(trainer.critic_opt),
             "step": int(trainer.step), "world_size": info.world_size, "rng": rng_state(trainer)}
    os.makedirs(directory, exist_ok=True)
    torch.save(optim, os.path.join(directory, f"train_state_rank{info.rank}.pt"))
    if info.is_main:
        state["step"] = int(trainer.step)
        tmp = os.path.join(directory, "model.pt.tmp")
        torch.save(state, tmp)
        os.replace(tmp, os.path.join(directory, "model.pt"))
    barrier()
    trainer.last_saved_step = int(trainer.step)
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
    rng = None
    if os.path.isfile(opt_path):
        opt = torch.load(opt_path, map_location="cpu", weights_only=True)
        if opt.get("world_size", 1) != info.world_size:
            raise ValueError(f"{directory}: optimizer shards were written by {opt.get('world_size')} ranks, "
                             f"this run has {info.world_size}; resume with the same number of ranks")
        reshard_all(trainer.generator), reshard_all(trainer.critic)
        _load_optim_state(trainer.gen_opt, opt["generator_optim"])
        _load_optim_state(trainer.critic_opt, opt["critic_optim"])
        rng = opt.get("rng")
    if rng is not None:  # continue every random stream exactly where the saved run was
        set_rng_state(trainer, rng)
    else:  # a checkpoint without random state (older trainer, or weights only): fresh streams
        warnings.warn(f"{directory} holds no random-stream state (train_state_rank{info.rank}.pt missing or "
                      "written by an older version): the resumed run draws new random streams and is not a "
                      "bit-exact continuation", stacklevel=2)
        for g in (trainer.shared_rng, trainer.local_rng, trainer.noise_rng):
            g.manual_seed(int(g.initial_seed()) + 1_000_033 * trainer.step)
    trainer.last_saved_step = trainer.step
