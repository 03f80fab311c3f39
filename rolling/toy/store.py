"""Saving and loading the toy world's weights as safetensors (configs in the file's metadata).

``toy_vae.safetensors``: the :class:`ToyVAE` state dict (latent mean / std buffers included),
metadata ``vae_config`` (JSON). ``toy_teacher.safetensors``: the bidirectional teacher with bare
Wan2.1 keys (``blocks.0.self_attn.q.weight``...; loadable by :func:`rolling.loading.load_model` with
``num_heads`` from the metadata), metadata ``wan_config`` (JSON :meth:`WanConfig.to_dict`). ``toy_student.safetensors``: the causal
few-step student (same key layout and ``wan_config``), plus metadata ``causal`` ("true"),
``frames_per_block`` ("3"), ``denoising_steps`` (JSON list of nominal steps, 0..1000, e.g.
[1000, 800, 600, 400, 200]: what :class:`rolling.config.RollingConfig` ``steps`` takes),
``timesteps`` (JSON: the warped timesteps the model sees), ``sigmas`` (JSON) and ``shift``.
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
STUDENT_PATH = os.path.join(WEIGHTS_DIR, "toy_student.safetensors")


def _read(path: str, what: str, script: str, key: str | None = None) -> tuple[dict, dict]:
    """(state dict, metadata) of a weights file; ValueError if ``key`` is not in its metadata."""
    from safetensors import safe_open
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} weights not found at {path}; rebuild them with `python scripts/train_toy.py "
                                f"{script}`")
    with safe_open(path, framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        sd = {k: f.get_tensor(k) for k in f.keys()}
    if key is not None and key not in meta:
        raise ValueError(f"{path} has no '{key}' metadata: not a {what} file")
    return sd, meta


def _save(state_dict: dict, path: str, meta: dict, extra: dict | None) -> str:
    from safetensors.torch import save_file
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    meta = {"format": "pt", **meta, **{k: str(v) for k, v in (extra or {}).items()}}
    save_file({k: v.detach().float().contiguous() for k, v in state_dict.items()}, path, metadata=meta)
    return path


def _wan_model(sd: dict, meta: dict, dtype: torch.dtype, device) -> WanModel:
    with torch.device("meta"):
        model = WanModel(WanConfig.from_dict(json.loads(meta["wan_config"])))
    model.load_state_dict(sd, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def save_vae(vae: ToyVAE, path: str = VAE_PATH, extra: dict | None = None) -> str:
    return _save(vae.state_dict(), path, {"vae_config": json.dumps(vae.config.to_dict())}, extra)


def load_vae(path: str = VAE_PATH) -> ToyVAE:
    """The toy VAE in eval mode, float32, CPU, no grad."""
    sd, meta = _read(path, "toy VAE", "vae", "vae_config")
    vae = ToyVAE(VAEConfig.from_dict(json.loads(meta["vae_config"])))
    vae.load_state_dict(sd, strict=True)
    return vae.eval().requires_grad_(False)


def save_teacher(model: WanModel, cfg: WanConfig, path: str = TEACHER_PATH, extra: dict | None = None) -> str:
    return _save(model.state_dict(), path, {"wan_config": json.dumps(cfg.to_dict())}, extra)


def teacher_config(path: str = TEACHER_PATH) -> WanConfig:
    return WanConfig.from_dict(json.loads(_read(path, "toy teacher", "teacher", "wan_config")[1]["wan_config"]))


def load_teacher(path: str = TEACHER_PATH, dtype: torch.dtype = torch.float32, device="cpu") -> WanModel:
    """The bidirectional toy teacher as a :class:`WanModel` (eval, no grad). Wrap it in
    :class:`rolling.train.dit.WanDiT` for the bidirectional forward (or use :mod:`rolling.toy.sampling`)."""
    return _wan_model(*_read(path, "toy teacher", "teacher", "wan_config"), dtype, device)


# ---------------------------------------------------------------------------------------- student
def save_student(model: WanModel, cfg: WanConfig, path: str = STUDENT_PATH, *, denoising_steps,
                 frames_per_block: int = 3, shift: float = 5.0, extra: dict | None = None) -> str:
    """Write the causal student (bare Wan2.1 keys, float32) with its sampler metadata (module docstring).
    ``denoising_steps``: the nominal steps (strictly decreasing ints in 1..1000) it was distilled for."""
    from ..config import validate_steps
    from ..flow import Steps
    steps = [int(v) for v in validate_steps(denoising_steps)]
    if not isinstance(frames_per_block, int) or frames_per_block < 1:
        raise ValueError(f"frames_per_block must be a positive integer, got {frames_per_block!r}")
    table = Steps(steps, shift, frames_per_block)
    meta = {"wan_config": json.dumps(cfg.to_dict()), "causal": "true", "frames_per_block": str(frames_per_block),
            "denoising_steps": json.dumps(steps), "timesteps": json.dumps([round(t, 4) for t in table.t]),
            "sigmas": json.dumps([round(s, 7) for s in table.sigma]), "shift": str(float(shift))}
    return _save(model.state_dict(), path, meta, extra)


def _student_meta(path: str) -> tuple[dict, dict]:
    sd, meta = _read(path, "toy student", "student")
    if "wan_config" not in meta or meta.get("causal") != "true" or "denoising_steps" not in meta:
        raise ValueError(f"{path} is not a toy student file (needs metadata 'wan_config', 'causal' = 'true' and "
                         f"'denoising_steps'; found keys {sorted(meta)})")
    return sd, meta


def student_metadata(path: str | None = None) -> dict:
    """The student file's metadata, parsed: wan_config (dict), causal (bool), frames_per_block (int),
    denoising_steps (list[int]), timesteps / sigmas (list[float]), shift (float), and the rest as strings."""
    _, meta = _student_meta(path or STUDENT_PATH)
    return {**meta, **{k: json.loads(meta[k]) for k in ("wan_config", "denoising_steps", "timesteps", "sigmas")},
            "causal": True, "frames_per_block": int(meta["frames_per_block"]), "shift": float(meta["shift"])}


def student_timesteps(path: str | None = None) -> list[int]:
    """The nominal denoising steps (0..1000 scale, strictly decreasing) the student was distilled for,
    e.g. [1000, 800, 600, 400, 200]: pass them as ``RollingConfig(steps=...)`` (the rolling schedule
    warps them through the shift table; the warped values are in :func:`student_metadata`)."""
    return [int(v) for v in student_metadata(path)["denoising_steps"]]


def student_rolling_config(path: str | None = None):
    """The :class:`rolling.config.RollingConfig` the student was distilled for (steps, shift, block size)."""
    from ..config import RollingConfig
    m = student_metadata(path)
    return RollingConfig(steps=tuple(m["denoising_steps"]), shift=m["shift"], frames_per_block=m["frames_per_block"])


def load_student(path: str | None = None, dtype: torch.dtype = torch.float32, device="cpu") -> WanModel:
    """The causal few-step toy student as a :class:`WanModel` (eval, no grad, float32, CPU by default).
    Sample it with :class:`rolling.sampler.RollingSampler` and :func:`student_rolling_config`."""
    return _wan_model(*_student_meta(path or STUDENT_PATH), dtype, device)
