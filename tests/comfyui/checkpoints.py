"""Random Wan2.1 DiT checkpoints in the layouts users have, and the model folders the tests use.

The release ``.pt`` layout (TencentARC/RollingForcing's ``rolling_forcing_dmd.pt``) is
``{"generator_ema": {"model." + key: tensor}, "generator": {...}}`` with the Wan2.1 release's key
names. ``TINY_WAN`` is the smallest DiT ComfyUI's Wan detection accepts (``num_heads = dim // 128``,
``freq_dim`` 256, ``text_dim`` 4096).
"""
from __future__ import annotations

from pathlib import Path

from scripts.workflow_source import MODEL_FILES, UPSCALE_MODEL

TINY_WAN = dict(dim=256, ffn_dim=512, num_heads=2, num_layers=2, freq_dim=256, text_dim=4096)


def random_wan_state_dict(config="tiny-comfy", seed: int = 0, dtype=None, device: str = "cpu") -> dict:
    """A seeded random Wan2.1 DiT state dict (release key names) on the CPU, built with the core's
    ``rolling.model.build_model``. ``config``: a ``WanConfig``, a preset name (``"1.3B"``) or
    ``"tiny-comfy"`` (``TINY_WAN``); ``device`` is where the weights are drawn (``"cuda"`` is much faster
    for 1.3B; the values then differ from a CPU draw, reproducibly)."""
    import torch

    from rolling.config import WanConfig
    from rolling.model import build_model

    cfg = WanConfig(**TINY_WAN) if config == "tiny-comfy" else config
    model = build_model(cfg, seed=seed, device=device, dtype=dtype or torch.float32)
    # independent of the module (and on the CPU): what torch.save writes is only these tensors
    sd = {k: (v.to("cpu") if v.device.type != "cpu" else v.clone()) for k, v in model.state_dict().items()}
    del model
    return sd


def tiny_state_dict(seed: int = 0) -> dict:
    """The float32 tiny DiT (``TINY_WAN``) the tests' checkpoints hold."""
    return random_wan_state_dict("tiny-comfy", seed)


def write_release_checkpoint(path: Path, seed: int = 0, state_dict: dict | None = None, regular: bool = True) -> Path:
    """The release .pt layout: ``generator_ema`` = the weights (``state_dict`` or the tiny DiT of ``seed``),
    and with ``regular`` also ``generator`` = the same weights times 0.5 (so the two are told apart)."""
    import torch

    sd = tiny_state_dict(seed) if state_dict is None else state_dict
    raw = {"generator_ema": {"model." + k: v for k, v in sd.items()}}
    if regular:
        raw["generator"] = {"model." + k: v * 0.5 for k, v in sd.items()}
    torch.save(raw, path)
    return Path(path)


def write_safetensors_checkpoint(path: Path, seed: int = 0, metadata: dict | None = None) -> Path:
    """Bare Wan2.1 keys in .safetensors: what ComfyUI's stock Load Diffusion Model reads."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tiny_state_dict(seed).items()}, str(path), metadata=metadata)
    return Path(path)


def write_i2v_checkpoint(path: Path) -> Path:
    """An image-to-video Wan2.1 checkpoint (has ``img_emb``): the loader must refuse it."""
    import torch

    sd = tiny_state_dict(0)
    sd["img_emb.proj.0.weight"] = torch.ones(1280)
    sd["img_emb.proj.0.bias"] = torch.zeros(1280)
    torch.save({"generator_ema": {"model." + k: v for k, v in sd.items()}}, path)
    return Path(path)


def write_non_wan_checkpoint(path: Path) -> Path:
    """An SD1.x-like UNet state dict: the loader must refuse it."""
    import torch

    torch.save({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
                               "model.diffusion_model.out.2.weight": torch.zeros(4, 4, 3, 3)}}, path)
    return Path(path)


def write_tiny_upscale_model(path: Path, seed: int = 0, features: int = 4) -> Path:
    """A random 2x Real-ESRGAN *Compact* (SRVGGNetCompact) state dict, which ComfyUI's Load Upscale Model
    (spandrel) recognises: 3x3 conv, PReLU, one more conv + PReLU, then 3 x 2^2 channels pixel-shuffled."""
    import torch

    g = torch.Generator().manual_seed(seed)
    f = features
    sd = {"body.0.weight": torch.randn(f, 3, 3, 3, generator=g) * 0.1, "body.0.bias": torch.zeros(f),
          "body.1.weight": torch.full((f,), 0.25),
          "body.2.weight": torch.randn(f, f, 3, 3, generator=g) * 0.1, "body.2.bias": torch.zeros(f),
          "body.3.weight": torch.full((f,), 0.25),
          "body.4.weight": torch.randn(12, f, 3, 3, generator=g) * 0.1, "body.4.bias": torch.zeros(12)}
    torch.save(sd, path)
    return Path(path)


def model_folders(base: Path) -> dict[str, Path]:
    """diffusion_models / text_encoders / vae / upscale_models folders under ``base`` with the workflows'
    files: the DiT is the tiny release checkpoint, the upscale model a tiny 2x Compact, the text encoder
    and VAE are empty placeholders (only listed)."""
    dirs = {}
    for kind in ("dit", "clip", "vae"):
        d = Path(base) / MODEL_FILES[kind]["directory"]
        d.mkdir(parents=True, exist_ok=True)
        dirs[MODEL_FILES[kind]["directory"]] = d
    write_release_checkpoint(dirs["diffusion_models"] / MODEL_FILES["dit"]["name"])
    for kind in ("clip", "vae"):
        (dirs[MODEL_FILES[kind]["directory"]] / MODEL_FILES[kind]["name"]).write_bytes(b"")
    up = Path(base) / UPSCALE_MODEL["directory"]
    up.mkdir(parents=True, exist_ok=True)
    dirs[UPSCALE_MODEL["directory"]] = up
    write_tiny_upscale_model(up / UPSCALE_MODEL["name"])
    return dirs
