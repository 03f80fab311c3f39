"""Rolling Forcing Model Loader: a release checkpoint (.pt with generator_ema / generator) or a plain
Wan2.1 T2V state dict -> ComfyUI's own Wan model as a normal MODEL (ModelPatcher).

The state dict is extracted with the core's safe loader (``torch.load(weights_only=True)``) and
handed to ``comfy.sd.load_diffusion_model_state_dict`` exactly like the stock Load Diffusion Model
node does, so ComfyUI's memory management, offloading, fp8 weights and LoRA loaders apply.

The first choice, ``toy (built-in, no download)``, is the toy world's causal student shipped in
``rolling/toy/weights`` (dim 128, 4 heads, text_dim 32: pair it with Rolling Forcing Toy Text Encode
and Toy Decode). What ComfyUI's Wan detection cannot read off the shapes (it assumes 128-wide heads,
freq_dim 256, text_dim 4096, text_len 512) comes from the file's ``wan_config`` metadata
(``model_options.architecture``) and is handed to ComfyUI's detection for this one load
(``comfy_adapter.wan_detection_overrides``), so the toy DiT is ComfyUI's own ``WanModel`` like any other.
ComfyUI's WanModel keeps its ``text_len`` (the toy's 16 prompt tokens); the sampler pads or cuts prompts to
it (``WanArch.text_len``).
"""
from __future__ import annotations

import logging
import math
import os

from ..rolling.loading import (WEIGHT_CHOICES, CheckpointError, config_from_state_dict, extract_state_dict,
                               prepare_weights, read_raw)
from . import comfy_adapter as comfy
from . import model_options as options
from .names import CATEGORY

io, folder_paths = comfy.io, comfy.folder_paths

log = logging.getLogger("RollingForcing")


class RollingForcingModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        files = options.model_choices(folder_paths.get_filename_list("diffusion_models"))
        return io.Schema(
            node_id="RollingForcingModelLoader",
            display_name="Rolling Forcing Model Loader",
            category=f"{CATEGORY}/loaders",
            description=(
                "Loads a Rolling Forcing (or Self-Forcing) Wan2.1-T2V-1.3B checkpoint from models/diffusion_models: "
                "the release's rolling_forcing_dmd.pt (generator_ema / generator weights) or a converted "
                ".safetensors; or the built-in toy model (a tiny causal student of the pack's toy world of "
                "coloured shapes, no download: use it with Rolling Forcing Toy Text Encode and Toy Decode). "
                "Builds ComfyUI's own Wan model, so memory management, fp8 weights and LoRA loaders work as "
                "for any MODEL."),
            inputs=[
                io.Combo.Input("model_name", options=files,
                               tooltip="Checkpoint in models/diffusion_models (.pt, .pth or .safetensors), e.g. "
                                       "rolling_forcing_dmd.pt from TencentARC/RollingForcing; or 'toy (built-in, "
                                       "no download)': the toy world's 1M-parameter student (64x64 video of a "
                                       "coloured shape; prompt it with Rolling Forcing Toy Text Encode, decode "
                                       "with Rolling Forcing Toy Decode)."),
                io.Combo.Input("weights", options=list(WEIGHT_CHOICES), default="ema",
                               tooltip="Which generator weights of a release .pt to use: ema (generator_ema, what "
                                       "the reference samples with) or regular (generator). Plain state dicts "
                                       "have only one set and ignore this."),
                io.Combo.Input("weight_dtype", options=list(options.WEIGHT_DTYPES), default="default",
                               tooltip="Storage dtype of the weights. default lets ComfyUI choose for your device; "
                                       "fp8 halves the weight memory (computation then runs in bf16/fp16)."),
                io.Combo.Input("attention", options=list(options.ATTENTION_BACKENDS), default="auto",
                               tooltip="Attention kernel the Rolling Forcing sampler uses with this model: auto "
                                       "(FlashAttention 3 where installed, else PyTorch's cuDNN kernel on Hopper and "
                                       "newer, else PyTorch SDPA), sdpa, cudnn, flash (flash-attn FA3/FA2) or sage "
                                       "(sageattention; faster, may oversaturate long videos). Unavailable ones fall "
                                       "back to sdpa; the sampler's info output says which kernel ran."),
            ],
            outputs=[io.Model.Output(display_name="model",
                                     tooltip="The Wan2.1 DiT as a ComfyUI MODEL; connect it to Rolling Forcing "
                                             "Sampler (LoRA loaders may go in between).")],
        )

    @classmethod
    def execute(cls, model_name: str, weights: str = "ema", weight_dtype: str = "default",
                attention: str = "auto") -> io.NodeOutput:
        options.check_choice("weights", weights, WEIGHT_CHOICES)
        options.check_choice("attention backend", attention, options.ATTENTION_BACKENDS)
        dtype_options = options.weight_dtype_options(weight_dtype)
        path = (options.toy_model_path() if model_name == options.TOY_MODEL
                else folder_paths.get_full_path_or_raise("diffusion_models", model_name))
        patcher = load_patcher(path, weights, dtype_options, attention)
        comfy.register_reload(patcher, load_patcher, (path, weights, dtype_options, attention))
        log.info("[RollingForcing] loaded %s (%s weights, dtype %s, manual cast %s, attention %s)", model_name, weights,
                 *comfy.model_dtypes(patcher)[::-1], attention)
        return io.NodeOutput(patcher)


def load_patcher(path: str, weights: str, dtype_options: dict, attention: str, disable_dynamic: bool = False):
    """A checkpoint file -> ComfyUI's Wan model (ModelPatcher), refusing what Rolling Forcing cannot sample.
    Also ComfyUI's way to load the same MODEL again (see ``comfy_adapter.register_reload``)."""
    name = os.path.basename(path)
    try:
        sd = prepare_weights(extract_state_dict(read_raw(path), weights))  # floating point, finite
        inferred = config_from_state_dict(sd)  # non-Wan, I2V and VACE checkpoints are refused here
    except CheckpointError as e:
        raise ValueError(f"{name}: {e}") from None
    except ValueError as e:  # e.g. an unsupported architecture in the shapes
        raise ValueError(f"{name} is not a usable Wan2.1 text-to-video checkpoint: {e}") from None
    meta = options.file_metadata(path)
    cfg = options.architecture(inferred, meta, name)  # head count etc. the shapes cannot tell
    overrides = options.comfy_overrides(cfg)
    with comfy.wan_detection_overrides(overrides):
        patcher = comfy.load_diffusion_model(sd, dtype_options, disable_dynamic=disable_dynamic)
    del sd
    if patcher is None:
        raise ValueError(f"{name}: ComfyUI could not detect a Wan2.1 model in this checkpoint")
    problem = model_problem(patcher) or architecture_problem(patcher, cfg)
    if problem:
        raise ValueError(f"{name}: {problem}")
    if overrides and meta.get("causal") != "true":
        log.warning("[RollingForcing] %s is not a causal few-step model (no 'causal' metadata, e.g. the bidirectional "
                    "toy teacher): Rolling Forcing's few-step causal sampling of it gives rough video", name)
    options.with_attention(patcher.model_options, attention)
    return patcher


def model_problem(patcher) -> str | None:
    """Why a MODEL cannot be sampled with Rolling Forcing (None if it can)."""
    base = getattr(patcher, "model", None)
    dm = comfy.diffusion_model(patcher)
    if dm is None:
        return f"the MODEL input is not a diffusion model ({type(base).__name__})"
    pe = getattr(getattr(dm, "patch_embedding", None), "weight", None)
    head = getattr(getattr(getattr(dm, "head", None), "head", None), "weight", None)
    if pe is None or head is None or not hasattr(dm, "blocks"):
        return (f"the MODEL is a {type(dm).__name__} ({type(base).__name__}), not a Wan2.1 DiT; load "
                f"rolling_forcing_dmd.pt with Rolling Forcing Model Loader")
    return options.wan_t2v_problem(class_name=type(dm).__name__, model_type=getattr(dm, "model_type", None),
                                   has_image_embedding=getattr(dm, "img_emb", None) is not None,
                                   in_dim=int(pe.shape[1]), out_dim=int(head.shape[0]) // math.prod(pe.shape[2:]))


def architecture_problem(patcher, cfg) -> str | None:
    """Why the DiT ComfyUI built does not have the checkpoint's architecture (None if it has)."""
    dm = comfy.diffusion_model(patcher)
    got = {"num_heads": getattr(dm, "num_heads", None),
           "freq_dim": dm.time_embedding[0].weight.shape[1], "text_dim": dm.text_embedding[0].weight.shape[1]}
    want = {"num_heads": cfg.num_heads, "freq_dim": cfg.freq_dim, "text_dim": cfg.text_dim}
    if got != want:
        return (f"ComfyUI {comfy.comfyui_version()} built its Wan model with {got}, but the checkpoint needs {want}; "
                f"this ComfyUI's Wan detection does not take the pack's settings: please report this with the version")
    return None
