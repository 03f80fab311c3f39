"""What the model loader offers and records, and what a loaded DiT must be (ComfyUI-free; tested
without ComfyUI): checkpoint files, weight dtypes, the attention choice stored on the MODEL, the
compute dtype ComfyUI will use, and why a MODEL cannot be sampled.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..rolling.attention import BACKENDS as ATTENTION_BACKENDS
from ..rolling.loading import WEIGHT_CHOICES

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
