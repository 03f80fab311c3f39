"""Saving and loading the toy world's weights as safetensors (configs in the file's metadata).

``toy_vae.safetensors``: the :class:`ToyVAE` state dict (latent mean / std buffers included),
metadata ``vae_config`` (JSON). ``toy_teacher.safetensors``: the bidirectional teacher with bare
Wan2.1 keys (``blocks.0.self_attn.q.weight``...; loadable by :func:`rolling.loading.load_model` with
``num_heads`` from the metadata), metadata ``wan_config`` (JSON :meth:`WanConfig.to_dict`).
"""
from __future__ import annotations

import json
import os

import torch

from ..config import WanConfig
from ..model import WanModel
from .vae import ToyVAE, VAEConfig

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
VAE_PATH = os.path.join(WEIGHTS_DIR, "toy_vae.safetensors")
TEACHER_PATH = os.path.join(WEIGHTS_DIR, "toy_teacher.safetensors")


def _read(path: str, what: str, script: str):
    from safetensors import safe_open
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} weights not found at {path}; rebuild them with `python scripts/train_toy.py "
                                f"{script}`")
    with safe_open(path, framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        sd = {k: f.get_tensor(k) for k in f.keys()}
    return sd, meta


def save_vae(vae: ToyVAE, path: str = VAE_PATH, extra: dict | None = None) -> str:
    from safetensors.torch import save_file
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    meta = {"format": "pt", "vae_config": json.dumps(vae.config.to_dict()), **{k: str(v) for k, v in (extra or {}).items()}}
    save_file({k: v.detach().float().contiguous() for k, v in vae.state_dict().items()}, path, metadata=meta)
    return path


def load_vae(path: str = VAE_PATH) -> ToyVAE:
    """The toy VAE in eval mode, float32, CPU, no grad."""
    sd, meta = _read(path, "toy VAE", "vae")
    if "vae_config" not in meta:
        raise ValueError(f"{path} has no 'vae_config' metadata: not a toy VAE file")
    vae = ToyVAE(VAEConfig.from_dict(json.loads(meta["vae_config"])))
    vae.load_state_dict(sd, strict=True)
    return vae.eval().requires_grad_(False)


def save_teacher(model: WanModel, cfg: WanConfig, path: str = TEACHER_PATH, extra: dict | None = None) -> str:
    from safetensors.torch import save_file
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    meta = {"format": "pt", "wan_config": json.dumps(cfg.to_dict()), **{k: str(v) for k, v in (extra or {}).items()}}
    save_file({k: v.detach().float().contiguous() for k, v in model.state_dict().items()}, path, metadata=meta)
    return path


def teacher_config(path: str = TEACHER_PATH) -> WanConfig:
    _, meta = _read(path, "toy teacher", "teacher")
    if "wan_config" not in meta:
        raise ValueError(f"{path} has no 'wan_config' metadata: not a toy teacher file")
    return WanConfig.from_dict(json.loads(meta["wan_config"]))


def load_teacher(path: str = TEACHER_PATH, dtype: torch.dtype = torch.float32, device="cpu") -> WanModel:
    """The bidirectional toy teacher as a :class:`WanModel` (eval, no grad). Wrap it in
    :class:`rolling.train.dit.WanDiT` for the bidirectional forward (or use :mod:`rolling.toy.sampling`)."""
    sd, meta = _read(path, "toy teacher", "teacher")
    if "wan_config" not in meta:
        raise ValueError(f"{path} has no 'wan_config' metadata: not a toy teacher file")
    cfg = WanConfig.from_dict(json.loads(meta["wan_config"]))
    with torch.device("meta"):
        model = WanModel(cfg)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
