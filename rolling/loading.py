"""Checkpoint loading: the release's ``.pt`` (``generator_ema`` / ``generator``) and ``.safetensors``.

Only ``torch.load(weights_only=True)`` is used (no arbitrary pickles). Tensors are converted one by
one in place, so no second full copy of the weights is made; with ``mmap`` the file is not read
into memory twice either.

Refused with a :class:`CheckpointError` that says what to do: missing, empty (0-byte) or unreadable
files, non-Wan / I2V / VACE checkpoints, missing or mismatched keys, weights that are not floating
point (int8 / bool / quantized files), and weights holding NaN or infinite values (checked tensor by
tensor in the same pass that casts them, in bounded chunks: no copy of the weights).
"""
from __future__ import annotations

import os
import re
from collections.abc import MutableMapping

import torch

from .config import WanConfig
from .model import WanModel

WEIGHT_CHOICES = ("ema", "regular")  # generator_ema or generator of a release checkpoint
ACCEPTED = ".pt, .pth (a Rolling Forcing / Self-Forcing release checkpoint or a plain state dict) or .safetensors"
STRIP_INFIXES = ("_fsdp_wrapped_module.", "_orig_mod.", "_checkpoint_wrapped_module.")
STRIP_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


class CheckpointError(ValueError):
    """A file that is not a usable Wan2.1 T2V checkpoint; the message says why and what is accepted."""


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else "no message"


def read_raw(path: str) -> MutableMapping:
    """Read a checkpoint file into a (possibly nested) dict of tensors, safely."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path}")
    ext = os.path.splitext(path)[1].lower()
    if ext in (".safetensors", ".pt", ".pth", ".ckpt", ".bin") and os.path.getsize(path) == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): the download or copy did not finish; download or copy "
                              f"it again (accepted: {ACCEPTED})")
    if ext == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(path, device="cpu")
        except Exception as e:
            raise CheckpointError(f"{path} is not a readable safetensors file ({_first_line(e)}); it may be "
                                  f"truncated: download it again; accepted: {ACCEPTED}") from None
    if ext not in (".pt", ".pth", ".ckpt", ".bin"):
        raise CheckpointError(f"unsupported checkpoint type {ext or '(none)'!r} for {path}; accepted: {ACCEPTED}")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{path} could not be loaded as a weights-only torch checkpoint ({e.__class__.__name__}: "
            f"{_first_line(e)}); it may be truncated or not a checkpoint: download it again; accepted: {ACCEPTED}"
        ) from None


def extract_state_dict(raw: MutableMapping, weights: str = "ema") -> dict[str, torch.Tensor]:
    """Pick the generator weights and strip wrapper names.

    ``weights="ema"`` takes ``generator_ema`` (falling back to ``generator``), ``"regular"`` takes
    ``generator``. Plain state dicts (optionally under ``model`` / ``state_dict``) are accepted too.
    Returns keys as in the Wan2.1 release (``blocks.0.self_attn.q.weight``...).
    """
    if weights not in WEIGHT_CHOICES:
        raise ValueError(f"weights must be one of {', '.join(WEIGHT_CHOICES)}, got {weights!r}")
    if not isinstance(raw, MutableMapping):
        raise CheckpointError(f"checkpoint holds a {type(raw).__name__}, not a state dict; accepted: {ACCEPTED}")
    order = (("generator_ema", "generator") if weights == "ema" else ("generator",)) + ("model", "state_dict", "module")
    sd = next((raw[k] for k in order if isinstance(raw.get(k), MutableMapping)), None)
    if weights == "regular" and sd is not None and "generator" not in raw and "generator_ema" in raw:
        raise CheckpointError("weights='regular' asked for, but the checkpoint has only 'generator_ema'; use weights='ema'")
    if sd is None:
        sd = raw
    out: dict[str, torch.Tensor] = {}
    for k in list(sd.keys()):
        v = sd.pop(k) if hasattr(sd, "pop") else sd[k]
        if not isinstance(v, torch.Tensor):
            continue
        for inf in STRIP_INFIXES:
            k = k.replace(inf, "")
        out[next((k[len(p):] for p in STRIP_PREFIXES if k.startswith(p)), k)] = v
    if not out:
        raise CheckpointError(f"no tensors found in the checkpoint; accepted: {ACCEPTED}")
    return out


def config_from_state_dict(sd: dict[str, torch.Tensor], num_heads: int | None = None) -> WanConfig:
    """Infer the Wan2.1 T2V config from weight shapes. Raises CheckpointError for non-Wan or I2V files."""
    if "head.modulation" not in sd or "patch_embedding.weight" not in sd:
        sample = ", ".join(list(sd)[:3])
        raise CheckpointError(f"not a Wan2.1 DiT checkpoint (no head.modulation / patch_embedding.weight; "
                              f"first keys: {sample}); accepted: {ACCEPTED}")
    if any(k.startswith("img_emb.") or ".k_img." in k for k in sd):
        raise CheckpointError("this is an image-to-video (I2V) Wan checkpoint; Rolling Forcing needs a "
                              "text-to-video (T2V) Wan2.1 model")
    if any(k.startswith("vace_") for k in sd):
        raise CheckpointError("this is a VACE Wan checkpoint; Rolling Forcing needs a plain text-to-video Wan2.1 model")
    for k in ("patch_embedding.weight", "head.modulation"):
        _check_dtype(k, sd[k])
    pe = sd["patch_embedding.weight"]
    dim = pe.shape[0]
    layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    return WanConfig(
        dim=dim, in_dim=pe.shape[1], patch_size=tuple(pe.shape[2:]),
        ffn_dim=sd["blocks.0.ffn.0.weight"].shape[0], num_layers=layers,
        num_heads=num_heads or max(1, dim // 128),
        freq_dim=sd["time_embedding.0.weight"].shape[1], text_dim=sd["text_embedding.0.weight"].shape[1],
        out_dim=sd["head.head.weight"].shape[0] // (pe.shape[2] * pe.shape[3] * pe.shape[4]),
        cross_attn_norm="blocks.0.norm3.weight" in sd, qk_norm="blocks.0.self_attn.norm_q.weight" in sd)


FLOAT_KINDS = "fp32, bf16, fp16 or fp8"
_CHUNK = 1 << 22  # elements per finiteness check (a 4 MiB bool temporary at most)


def _check_dtype(key: str, t: torch.Tensor) -> None:
    if not t.is_floating_point():
        raise CheckpointError(
            f"tensor {key} is {str(t.dtype).replace('torch.', '')}, but Wan2.1 weights are floating point "
            f"({FLOAT_KINDS}): this file holds quantized or non-weight data; use the original release checkpoint "
            f"(e.g. rolling_forcing_dmd.pt) or a safetensors made from it with `python -m rolling convert`")


def _chunks(t: torch.Tensor):
    """Bounded pieces of a tensor to check (views; fp8 pieces widened to bf16: isfinite lacks fp8)."""
    if t.is_contiguous():
        flat = t.view(-1)
        pieces = (flat[i:i + _CHUNK] for i in range(0, flat.numel(), _CHUNK))
    else:  # rare (a strided view saved as is): whole, a bool temporary of numel bytes
        pieces = (t,)
    for c in pieces:
        yield c if c.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16) else c.to(torch.bfloat16)


def _all_finite(t: torch.Tensor) -> bool:
    """True if every value is finite; reads the tensor once in bounded chunks (stops at the first bad one)."""
    if t.device.type == "meta" or t.numel() == 0:
        return True
    return all(bool(torch.isfinite(c).all()) for c in _chunks(t))


def _count_nonfinite(t: torch.Tensor) -> tuple[int, int]:
    """(NaN count, inf count) of a floating tensor (error path only)."""
    nan = inf = 0
    for c in _chunks(t):
        nan += int(torch.isnan(c).sum())
        inf += int(torch.isinf(c).sum())
    return nan, inf


def _nonfinite_error(key: str, t: torch.Tensor, source: torch.Tensor | None) -> CheckpointError:
    nan, inf = _count_nonfinite(t)
    dt = str(t.dtype).replace("torch.", "")
    what = ", ".join(x for x in (f"{nan:,} NaN" if nan else "", f"{inf:,} infinite" if inf else "") if x)
    if source is not None and _all_finite(source):
        sdt = str(source.dtype).replace("torch.", "")
        return CheckpointError(f"tensor {key} has {what} values of {t.numel():,} after casting {sdt} -> {dt}: the "
                               f"file's values exceed {dt}'s range; load it as bf16 or fp32 instead")
    return CheckpointError(f"tensor {key} ({dt}) holds {what} values of {t.numel():,}: the checkpoint is corrupt "
                           f"(e.g. saved from a diverged training run or damaged in transfer); use another "
                           f"checkpoint or download it again")


def prepare_weights(sd: dict[str, torch.Tensor], dtype: torch.dtype | None = None, *,
                    check_finite: bool = True) -> dict[str, torch.Tensor]:
    """Check and cast the weights in one pass, tensor by tensor in place (the old tensor is dropped as
    soon as it is replaced; no second copy): every tensor must be floating point, is cast to ``dtype``
    (None = keep) and, with ``check_finite``, must hold only finite values. Raises
    :class:`CheckpointError` naming the first bad tensor (in the state dict's order)."""
    for k in list(sd):
        t = sd[k]
        _check_dtype(k, t)
        new = t.to(dtype) if dtype is not None and t.dtype != dtype else t
        if check_finite and not _all_finite(new):
            raise _nonfinite_error(k, new, t if new is not t else None)
        sd[k] = new
        del t, new
    return sd


def check_keys(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Raise CheckpointError listing missing / unexpected keys and shape mismatches."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {expected[k]}"
              for k in expected if k in sd and tuple(sd[k].shape) != expected[k]]
    lists = (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes))
    parts = [f"{len(xs)} {what}: {', '.join(xs[:8])}" + (f" (+{len(xs) - 8} more)" if len(xs) > 8 else "")
             for what, xs in lists if xs]
    if parts:
        raise CheckpointError("checkpoint does not match the Wan2.1 model: " + "; ".join(parts))


def _dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """A torch dtype from one of :data:`DTYPES`' names (a torch dtype or None passes through)."""
    if isinstance(name, str) and name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name] if isinstance(name, str) else name


def load_model(path: str, *, weights: str = "ema", dtype: str | torch.dtype = "bf16", device="cpu",
               num_heads: int | None = None) -> WanModel:
    """Load a checkpoint into :class:`WanModel` (config inferred from shapes). No second weight copy."""
    dt = _dtype(dtype)
    sd = extract_state_dict(read_raw(path), weights)
    cfg = config_from_state_dict(sd, num_heads)
    with torch.device("meta"):
        model = WanModel(cfg)
    check_keys(model, sd)
    prepare_weights(sd, dt)  # floating point and finite, cast: one pass, in place
    model.load_state_dict(sd, strict=True, assign=True)
    return model.to(device).eval().requires_grad_(False)


def convert(src: str, dst: str, *, weights: str = "ema", dtype: str | None = None) -> dict:
    """Write a clean ``.safetensors`` (bare Wan2.1 key names, loadable by ComfyUI's Load Diffusion Model)."""
    from safetensors.torch import save_file
    if not dst.endswith(".safetensors"):
        raise ValueError(f"output must be a .safetensors file, got {dst}")
    sd = extract_state_dict(read_raw(src), weights)
    cfg = config_from_state_dict(sd)
    dt = _dtype(dtype)
    with torch.device("meta"):
        check_keys(WanModel(cfg), sd)
    prepare_weights(sd, dt)  # refuses int/bool and NaN/inf before writing
    save_file({k: v.contiguous() for k, v in sd.items()}, dst, metadata={"format": "pt", "source": "rolling-forcing convert"})
    return {"tensors": len(sd), "config": cfg.to_dict()}
