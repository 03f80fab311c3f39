"""Rolling Forcing Model Loader: a release checkpoint (.pt with generator_ema / generator) or a plain
Wan2.1 T2V state dict -> ComfyUI's own Wan model as a normal MODEL (ModelPatcher).

The state dict is extracted with the core's safe loader (``torch.load(weights_only=True)``) and
handed to ``comfy.sd.load_diffusion_model_state_dict`` exactly like the stock Load Diffusion Model
node does, so ComfyUI's memory management, offloading, fp8 weights and LoRA loaders apply.
"""
from __future__ import annotations

import logging
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
        files = options.checkpoint_files(folder_paths.get_filename_list("diffusion_models"))
        return io.Schema(
            node_id="RollingForcingModelLoader",
            display_name="Rolling Forcing Model Loader",
            category=f"{CATEGORY}/loaders",
            description=(
                "Loads a Rolling Forcing (or Self-Forcing) Wan2.1-T2V-1.3B checkpoint from models/diffusion_models: "
                "the release's rolling_forcing_dmd.pt (generator_ema / generator weights) or a converted "
                ".safetensors. Builds ComfyUI's own Wan model, so memory management, fp8 weights and LoRA "
                "loaders work as for any MODEL."),
            inputs=[
                io.Combo.Input("model_name", options=files,
                               tooltip="Checkpoint in models/diffusion_models (.pt, .pth or .safetensors), e.g. "
                                       "rolling_forcing_dmd.pt from TencentARC/RollingForcing."),
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
        path = folder_paths.get_full_path_or_raise("diffusion_models", model_name)
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
        config_from_state_dict(sd)  # non-Wan, I2V and VACE checkpoints are refused here
    except CheckpointError as e:
        raise ValueError(f"{name}: {e}") from None
    except ValueError as e:  # e.g. an unsupported architecture in the shapes
        raise ValueError(f"{name} is not a usable Wan2.1 text-to-video checkpoint: {e}") from None
    patcher = comfy.load_diffusion_model(sd, dtype_options, disable_dynamic=disable_dynamic)
    del sd
    if patcher is None:
        raise ValueError(f"{name}: ComfyUI could not detect a Wan2.1 model in this checkpoint")
    problem = model_problem(patcher)
    if problem:
        raise ValueError(f"{name}: {problem}")
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
    patch = 1
    for p in pe.shape[2:]:
        patch *= int(p)
    return options.wan_t2v_problem(class_name=type(dm).__name__, model_type=getattr(dm, "model_type", None),
                                 has_image_embedding=getattr(dm, "img_emb", None) is not None,
                                 in_dim=int(pe.shape[1]), out_dim=int(head.shape[0]) // patch)
