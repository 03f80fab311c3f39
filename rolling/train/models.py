"""Building the three Wan2.1 networks of DMD training (generator, critic, teacher) as
:class:`rolling.train.dit.WanDiT` modules, on one device or sharded with FSDP2.

Weights: a file (release ``.pt``: ``generator`` key; plain state dict; ``.safetensors``) read with the
core's safe loader, or a directory of ``.safetensors`` shards (HF Wan2.1-T2V-14B), or random init
from a seed. Under FSDP the model is built on the meta device, sharded, materialised empty and
filled from rank 0 (only rank 0 ever holds a full copy in host memory). Random init (no checkpoint;
tests and smoke runs) builds the same seeded weights on every rank and shards them in place.
"""
from __future__ import annotations

import glob
import os

import torch

from ..attention import get_attention
from ..config import WanConfig
from ..loading import CheckpointError, check_keys, extract_state_dict, prepare_weights, read_raw
from ..model import WanModel, build_model
from .dit import WanDiT
from .distributed import DistInfo, load_full_state_dict, shard


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """Bare Wan2.1 state dict (``blocks.0...``) from a checkpoint file or a directory of safetensors shards."""
    if os.path.isdir(path):
        from safetensors.torch import load_file
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            raise CheckpointError(f"no .safetensors files in {path}")
        raw: dict = {}
        for f in files:
            raw.update(load_file(f, device="cpu"))
        return extract_state_dict(raw, "regular")
    return extract_state_dict(read_raw(path), "regular")


def _initial_state(cfg: WanConfig, ckpt: str | None, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    if ckpt:
        sd = read_weights(ckpt)
        with torch.device("meta"):
            check_keys(WanModel(cfg), sd)
        prepare_weights(sd, dtype)  # floating point and finite (a diverged checkpoint is refused), cast in place
    else:
        sd = build_model(cfg, seed=seed).state_dict()
    return {"model." + k: v.to(dtype) for k, v in sd.items()}


def build_dit(cfg: WanConfig, info: DistInfo, *, ckpt: str | None = None, seed: int = 0, trainable: bool,
              dtype: torch.dtype = torch.float32, compute_dtype: torch.dtype | None = None,
              checkpointing: bool = False, attention: str = "sdpa", mesh=None, bf16: bool = False,
              module: torch.nn.Module | None = None) -> WanDiT:
    """One network. ``dtype``: storage (master) dtype; ``compute_dtype``: input cast (bf16 for a bf16
    teacher or under FSDP mixed precision); ``module``: use this Wan module tree (tests)."""
    attn = get_attention(attention, info.device)
    if not info.distributed:
        if module is not None:
            model = module
        elif ckpt:
            with torch.device("meta"):
                model = WanModel(cfg)
            sd = _initial_state(cfg, ckpt, seed, dtype)
            model.load_state_dict({k[len("model."):]: v for k, v in sd.items()}, strict=True, assign=True)
        else:
            model = build_model(cfg, seed=seed)
        model = model.to(device=info.device, dtype=dtype)
        dit = WanDiT(model, attention=attn, checkpointing=checkpointing, compute_dtype=compute_dtype)
        dit.requires_grad_(trainable)
        return dit.eval()
    if ckpt is None:  # random init (tests, smoke runs): every rank builds the same weights from the seed
        model = module if module is not None else build_model(cfg, seed=seed)
        model = model.to(device=info.device, dtype=dtype)
        dit = WanDiT(model, attention=attn, checkpointing=checkpointing, compute_dtype=compute_dtype)
        dit.requires_grad_(trainable)
        shard(dit, mesh, bf16=bf16)
        return dit.eval()
    sd = _initial_state(cfg, ckpt, seed, dtype) if info.is_main else None
    with torch.device("meta"):
        model = WanModel(cfg).to(dtype=dtype)
    dit = WanDiT(model, attention=attn, checkpointing=checkpointing, compute_dtype=compute_dtype)
    dit.requires_grad_(trainable)
    shard(dit, mesh, bf16=bf16)
    dit.to_empty(device=info.device)
    load_full_state_dict(dit, sd, info)  # rank 0 reads the file, the shards are broadcast
    return dit.eval()
