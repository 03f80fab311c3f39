"""What the model loader offers and records, and what a loaded DiT must be (ComfyUI-free; tested
without ComfyUI): checkpoint files and the built-in toy model, weight dtypes, the architecture of a
checkpoint (shapes + the file's metadata), the attention choice stored on the MODEL, the compute
dtype ComfyUI will use, and why a MODEL cannot be sampled.
"""
from __future__ import annotations

import json
import os
from dataclasses import replace
from typing import Sequence

import torch

from ..rolling.attention import BACKENDS as ATTENTION_BACKENDS
from ..rolling.config import WanConfig
from ..rolling.toy import store as toy_store

WEIGHT_DTYPES = {"default": None, "bf16": torch.bfloat16, "fp16": torch.float16,
                 "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
CHECKPOINT_EXTENSIONS = (".pt", ".pth", ".safetensors")
OPTIONS_KEY = "rolling_forcing"  # where the loader records its choices (model_options["transformer_options"])


def check_choice(what: str, value, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"{what} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def checkpoint_files(names: Sequence[str]) -> list[str]:
    """The diffusion_models entries the loader offers: .pt, .pth and .safetensors files."""
    return [n for n in names if n.lower().endswith(CHECKPOINT_EXTENSIONS)]


# ----------------------------------------------------------------------------- the built-in toy model

TOY_MODEL = "toy (built-in, no download)"
"""The loader's choice for the toy world's causal student (``rolling/toy/weights``), listed before the files."""
TOY_STUDENT_PATH = toy_store.STUDENT_PATH


def model_choices(names: Sequence[str]) -> list[str]:
    """Everything the loader's ``model_name`` offers (the one source of that list): the built-in toy
    model, then the checkpoint files of models/diffusion_models."""
    return [TOY_MODEL] + [n for n in checkpoint_files(names) if n != TOY_MODEL]


def toy_model_path() -> str:
    """The file behind :data:`TOY_MODEL`: the toy world's causal few-step student."""
    if not os.path.isfile(TOY_STUDENT_PATH):
        raise ValueError(f"{TOY_MODEL}: the toy student's weights are missing ({TOY_STUDENT_PATH}); reinstall the pack "
                         f"or rebuild them with `python scripts/train_toy.py student`")
    return TOY_STUDENT_PATH


# ----------------------------------------------------------------------------- architecture from shapes + metadata

WAN_HEAD_DIM = 128  # every released Wan2.1 DiT (1.3B: 1536 / 12, 14B: 5120 / 40); ComfyUI assumes it
WAN_FREQ_DIM, WAN_TEXT_DIM, WAN_TEXT_LEN = 256, 4096, 512  # what ComfyUI's Wan detection assumes
COMFY_CONFIG_KEYS = ("dim", "ffn_dim", "num_heads", "num_layers", "freq_dim", "text_dim", "text_len", "in_dim",
                     "out_dim", "patch_size", "eps", "qk_norm", "cross_attn_norm")  # WanModel(...) arguments
SHAPE_KEYS = ("dim", "ffn_dim", "num_layers", "freq_dim", "text_dim", "in_dim", "out_dim", "patch_size")


def file_metadata(path: str) -> dict:
    """The string metadata of a ``.safetensors`` file ({} for other files or none)."""
    if not str(path).lower().endswith(".safetensors"):
        return {}
    try:
        from safetensors import safe_open

        with safe_open(path, framework="pt", device="cpu") as f:
            return dict(f.metadata() or {})
    except Exception:  # noqa: BLE001 - unreadable files are refused by the loader with its own message
        return {}


def architecture(inferred: WanConfig, metadata: dict, name: str = "checkpoint") -> WanConfig:
    """The DiT's full config: the shapes' ``inferred`` config, with what weights cannot tell (head
    count, text length) from the file's metadata ``wan_config`` (JSON ``WanConfig.to_dict``, as
    ``rolling/toy/store.py`` writes it). Without it the head count follows Wan2.1's 128-wide heads,
    which is only known to hold for the standard architecture (freq_dim 256, text_dim 4096, dim a
    multiple of 128); anything else is ambiguous and refused with what to add. Metadata that
    contradicts the weights is refused too."""
    raw = metadata.get("wan_config") if metadata else None
    if raw is None:
        standard = (inferred.dim % WAN_HEAD_DIM == 0 and inferred.freq_dim == WAN_FREQ_DIM
                    and inferred.text_dim == WAN_TEXT_DIM)
        if not standard:
            raise ValueError(
                f"{name}: the attention head count cannot be told from the weights (dim {inferred.dim}, freq_dim "
                f"{inferred.freq_dim}, text_dim {inferred.text_dim}: not the standard Wan2.1 architecture, whose "
                f"heads are {WAN_HEAD_DIM} wide), and the file has no 'wan_config' metadata; save it as a "
                f".safetensors with metadata wan_config = JSON of rolling.config.WanConfig.to_dict() (with "
                f"num_heads and text_len), as rolling/toy/store.py does")
        return replace(inferred, num_heads=inferred.dim // WAN_HEAD_DIM)
    try:
        d = json.loads(raw)
        if not isinstance(d, dict) or "num_heads" not in d:
            raise ValueError("no num_heads in it")
        meta_cfg = WanConfig.from_dict({**inferred.to_dict(), **d})
    except (ValueError, TypeError) as e:
        raise ValueError(f"{name}: its 'wan_config' metadata is not a usable Wan2.1 config ({e}); expected JSON of "
                         f"rolling.config.WanConfig.to_dict() with num_heads") from None
    clash = [f"{k}: metadata {getattr(meta_cfg, k)} vs weights {getattr(inferred, k)}" for k in SHAPE_KEYS
             if getattr(meta_cfg, k) != getattr(inferred, k)]
    if clash:
        raise ValueError(f"{name}: its 'wan_config' metadata contradicts the weights ({'; '.join(clash)}); the file "
                         f"was edited or mislabelled")
    return meta_cfg


def comfy_overrides(cfg: WanConfig) -> dict:
    """What ComfyUI's Wan2.1 detection (which assumes 128-wide heads, freq_dim 256, patch (1, 2, 2),
    text_dim 4096, text_len 512) must be told to build this DiT; {} for the standard architecture."""
    standard = (cfg.num_heads == cfg.dim // WAN_HEAD_DIM and cfg.freq_dim == WAN_FREQ_DIM
                and cfg.text_dim == WAN_TEXT_DIM and cfg.text_len == WAN_TEXT_LEN and cfg.patch_size == (1, 2, 2))
    if standard:
        return {}
    d = {**cfg.to_dict(), "patch_size": tuple(cfg.patch_size)}
    return {k: d[k] for k in COMFY_CONFIG_KEYS}


def weight_dtype_options(name: str) -> dict:
    """``model_options`` for ``comfy.sd.load_diffusion_model_state_dict`` (as the stock UNETLoader)."""
    check_choice("weight dtype", name, list(WEIGHT_DTYPES))
    return {} if WEIGHT_DTYPES[name] is None else {"dtype": WEIGHT_DTYPES[name]}


def attention_from_options(model_options: dict | None) -> str:
    """The attention backend stored by the model loader; ``auto`` for models from other loaders."""
    opts = model_options
    for key in ("transformer_options", OPTIONS_KEY):
        opts = opts.get(key) if isinstance(opts, dict) else None
    name = opts.get("attention", "auto") if isinstance(opts, dict) else "auto"
    return name if name in ATTENTION_BACKENDS else "auto"


def with_attention(model_options: dict, attention: str) -> dict:
    """Return ``model_options`` with the attention choice recorded (mutates and returns the dict)."""
    check_choice("attention backend", attention, ATTENTION_BACKENDS)
    to = model_options.setdefault("transformer_options", {})
    to.setdefault(OPTIONS_KEY, {})["attention"] = attention
    return model_options


def wan_t2v_problem(*, class_name: str, model_type: str | None, has_image_embedding: bool,
                    in_dim: int | None, out_dim: int | None) -> str | None:
    """Why a loaded DiT cannot be used (None if it can). Inputs are read off ComfyUI's model."""
    if model_type not in (None, "t2v") or has_image_embedding:
        kind = "image-to-video (I2V)" if (has_image_embedding or model_type in ("i2v", "flf2v")) else model_type
        return (f"this MODEL is a {kind} Wan model ({class_name}); Rolling Forcing needs a text-to-video "
                f"Wan2.1 DiT (e.g. rolling_forcing_dmd.pt)")
    if in_dim not in (None, 16) or out_dim not in (None, 16):
        return (f"this MODEL has {in_dim} input / {out_dim} output latent channels; Rolling Forcing needs a "
                f"Wan2.1 text-to-video DiT with 16 (the Wan2.1 VAE's), not a Wan2.2 5B or other model")
    return None


def compute_dtype(manual_cast_dtype: torch.dtype | None, weight_dtype: torch.dtype, bf16_supported: bool = True
                  ) -> torch.dtype:
    """Dtype the sampler computes (and keeps the KV cache) in.

    ComfyUI's layers cast stored weights to ``manual_cast_dtype`` when it is set; otherwise they run
    in the stored dtype. fp8 storage is never a compute dtype: bf16 (or fp16 where bf16 is unsupported).
    """
    dt = manual_cast_dtype if manual_cast_dtype is not None else weight_dtype
    if dt in (torch.float8_e4m3fn, torch.float8_e5m2) or dt is None:
        return torch.bfloat16 if bf16_supported else torch.float16
    return dt
