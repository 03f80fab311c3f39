"""The toy world's text encoder and decoder as nodes, for the built-in toy model (Rolling Forcing Model
Loader's ``toy (built-in, no download)``): a whole text-to-video graph that runs on a CPU in seconds,
with no download, whose frames can be checked (``rolling.toy.detect``: colour, shape, motion, background).

* ``RollingForcingToyTextEncode``: a caption of the toy grammar (``a red circle drifting left on a dark
  background``) -> CONDITIONING [1, 16, 32] from the toy word-embedding text encoder
  (``rolling.toy.TextEncoder``), the stand-in for umT5 the toy model was trained with.
* ``RollingForcingToyDecode``: LATENT (the sampler's, ComfyUI's Wan2.1 convention) -> IMAGE with the toy
  video autoencoder (``rolling.toy.load_vae``). The Wan2.1 VAE cannot decode toy latents: they live in
  the toy VAE's latent space (same compression: 16 channels, 8x spatial, 4x temporal).
"""
from __future__ import annotations

import functools

import torch

from ..rolling.toy import BACKGROUNDS, COLOURS, MOTIONS, SHAPES, TextEncoder, captions, load_vae
from . import comfy_adapter as comfy
from .names import CATEGORY

io = comfy.io

DEFAULT_CAPTION = "a red circle drifting left on a dark background"


def check_caption(text: str) -> str:
    """The caption, stripped; ValueError naming the grammar and its allowed words otherwise."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"the toy caption is empty; write one like {DEFAULT_CAPTION!r} (grammar "
                         f"{captions.TEMPLATE!r}; allowed words: {', '.join(captions.VOCABULARY)})")
    captions.parse_caption(text)  # ValueError listing the allowed words / the grammar's choices
    return " ".join(text.split())


_text_encoder = functools.lru_cache(maxsize=1)(TextEncoder)  # each built once, on first use
_toy_vae = functools.lru_cache(maxsize=1)(load_vae)


def encode_caption(text: str) -> torch.Tensor:
    """[1, 16, 32] float32 embedding of a grammar caption."""
    return _text_encoder().encode(check_caption(text))


def decode_latent(samples: torch.Tensor) -> torch.Tensor:
    """A LATENT's samples (ComfyUI's raw Wan2.1 convention, [B, 16, F, h, w]) -> IMAGE [B * T, 8h, 8w, 3] in
    0..1, T = 1 + 4 (F - 1) frames per video (batch entries one after the other)."""
    if not isinstance(samples, torch.Tensor) or samples.ndim != 5 or samples.shape[1] != 16:
        shape = list(samples.shape) if isinstance(samples, torch.Tensor) else type(samples).__name__
        raise ValueError(f"Rolling Forcing Toy Decode needs a video LATENT [batch, 16, frames, h, w] from the "
                         f"Rolling Forcing Sampler with the toy model, got {shape}")
    z = comfy.wan21_latent_format().process_in(samples.float().cpu())  # -> the sampler's normalised latents
    with torch.no_grad():
        video = _toy_vae().decode(z)  # [B, 3, T, H, W] in -1..1
    return ((video.permute(0, 2, 3, 4, 1) + 1) / 2).clamp(0, 1).flatten(0, 1).contiguous()


class RollingForcingToyTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RollingForcingToyTextEncode",
            display_name="Rolling Forcing Toy Text Encode",
            category=f"{CATEGORY}/toy",
            description=("Encodes a caption of the toy world for the built-in toy model (Rolling Forcing Model "
                         "Loader: 'toy (built-in, no download)'): 'a {colour} {shape} {motion} on a {background} "
                         "background', e.g. 'a red circle drifting left on a dark background'. Colours: "
                         f"{', '.join(COLOURS)}; shapes: {', '.join(SHAPES)}; motions: {', '.join(MOTIONS)}; "
                         f"backgrounds: {', '.join(BACKGROUNDS)}. Gives the [1, 16, 32] word embedding the toy "
                         "model was trained on (its stand-in for umT5)."),
            inputs=[
                io.String.Input("caption", default=DEFAULT_CAPTION,
                                tooltip="A caption of the toy grammar: 'a {colour} {shape} {motion} on a "
                                        "{background} background' (case and extra spaces ignored). Other words "
                                        "are refused with the list of allowed ones."),
            ],
            outputs=[io.Conditioning.Output(display_name="conditioning",
                                            tooltip="The caption's toy text embedding [1, 16, 32]; connect it "
                                                    "to the Rolling Forcing Sampler's positive input (or a Prompt "
                                                    "Segment) with the toy model.")],
        )

    @classmethod
    def validate_inputs(cls, caption=None):
        return True if caption is None else comfy.validation(check_caption, caption)  # None: linked, checked later

    @classmethod
    def execute(cls, caption: str) -> io.NodeOutput:
        return io.NodeOutput([[encode_caption(caption), {}]])


class RollingForcingToyDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RollingForcingToyDecode",
            display_name="Rolling Forcing Toy Decode",
            category=f"{CATEGORY}/toy",
            description=("Decodes the toy model's LATENT (from the Rolling Forcing Sampler with 'toy (built-in, "
                         "no download)') to frames with the toy world's video autoencoder, shipped with the pack. "
                         "The Wan2.1 VAE cannot decode toy latents. 64x64 frames at 16 fps for the 64x64 size "
                         "the toy model was trained at."),
            inputs=[
                io.Latent.Input("latent", tooltip="The video LATENT [1, 16, frames, H/8, W/8] of the Rolling "
                                                  "Forcing Sampler run with the toy model (its latent output)."),
            ],
            outputs=[io.Image.Output(display_name="images",
                                     tooltip="The decoded frames [N, H, W, 3] in 0..1 at 16 fps (1 + 4 (F - 1) "
                                             "frames for F latent frames), e.g. for Create Video or Preview "
                                             "Image.")],
        )

    @classmethod
    def execute(cls, latent) -> io.NodeOutput:
        samples = latent.get("samples") if isinstance(latent, dict) else None
        return io.NodeOutput(decode_latent(samples))
