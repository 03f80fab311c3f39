"""Streaming decode with ComfyUI's Wan2.1 VAE: each finished block is decoded as soon as it exists,
with the VAE's causal feature cache kept between blocks.

``comfy.ldm.wan.vae.WanVAE.decode(z)`` applies ``conv2`` (a 1x1x1 causal conv, no temporal context)
to the whole latent and then runs ``decoder`` one latent frame at a time, threading a ``feat_map``
list (the last two frames seen by each causal conv) through the calls. Keeping that ``feat_map``
alive across blocks and feeding the blocks' frames through the same two modules runs exactly the
same operations in the same order, so the frames are identical to decoding the whole latent at
once with ``VAE.decode`` (tested: max difference 0.0). The first latent frame gives 1 video frame,
every later one 4.

Works on the ``VAE`` object ComfyUI's VAE loaders produce (``comfy.sd.VAE``); the caller loads it
onto its device first (``comfy.model_management.load_models_gpu([vae.patcher], ...)``).
"""
from __future__ import annotations

import torch

WAN21_LATENT_CHANNELS = 16


def check_wan21_vae(vae) -> None:
    """Raise ValueError unless ``vae`` is a loaded Wan2.1 VAE (16 latent channels, causal 3-D)."""
    model = getattr(vae, "first_stage_model", None)
    if model is None:
        raise ValueError("the VAE input holds no VAE model (an invalid or empty VAE file?); connect "
                         "Load VAE with wan_2.1_vae.safetensors")
    from comfy.ldm.wan.vae import WanVAE  # ComfyUI's Wan2.1 VAE class

    if not isinstance(model, WanVAE) or getattr(vae, "latent_channels", None) != WAN21_LATENT_CHANNELS:
        kind = type(model).__name__
        ch = getattr(vae, "latent_channels", "?")
        raise ValueError(f"the connected VAE is not the Wan2.1 VAE ({kind}, {ch} latent channels); Rolling Forcing "
                         f"latents need the Wan2.1 VAE: Load VAE with wan_2.1_vae.safetensors")


class StreamingVAEDecoder:
    """Decode a Wan2.1 latent video chunk by chunk; identical to one ``VAE.decode`` of the whole video.

    ``decode(latents)`` takes the next chunk of latent frames in ComfyUI's raw VAE latent space
    ([B, 16, F, H/8, W/8], i.e. what a LATENT holds) and returns its frames as IMAGE-style
    [B, T, H, W, 3] float32 in 0..1 on ``vae.output_device`` (T = 1 + 4 (F - 1) for the first chunk,
    4 F afterwards). Call ``close()`` (or use it as a context manager) to drop the cache.
    """

    def __init__(self, vae):
        check_wan21_vae(vae)
        from comfy.ldm.wan.vae import count_conv3d

        self.vae = vae
        self.model = vae.first_stage_model
        self._feat_map: list | None = [None] * count_conv3d(self.model.decoder)
        self.latent_frames = 0  # latent frames decoded so far
        self.frames = 0  # video frames produced so far

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self._feat_map is None:
            raise RuntimeError("StreamingVAEDecoder was closed")
        if latents.ndim != 5 or latents.shape[1] != WAN21_LATENT_CHANNELS:
            raise ValueError(f"expected Wan2.1 latents [B, 16, F, H, W], got {list(latents.shape)}")
        vae = self.vae
        z = latents.to(vae.vae_dtype).to(vae.device)  # same conversion order as VAE.decode
        x = self.model.conv2(z)
        outs = []
        for i in range(x.shape[2]):
            outs.append(self.model.decoder(x[:, :, i:i + 1], feat_cache=self._feat_map, feat_idx=[0]))
        out = torch.cat(outs, 2) if len(outs) > 1 else outs[0]
        frames = vae.process_output(out.to(vae.output_device).float()).movedim(1, -1)
        self.latent_frames += latents.shape[2]
        self.frames += frames.shape[1]
        return frames

    def close(self) -> None:
        self._feat_map = None

    def __enter__(self) -> "StreamingVAEDecoder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
