"""Streaming decode with ComfyUI's Wan2.1 VAE: each finished block is decoded as soon as it exists,
with the VAE's causal feature cache kept between blocks, and the frames are identical to one
``VAE.decode`` of the whole latent video.

``WanVAE.decode(z)`` applies ``conv2`` (a 1x1x1 causal conv, no temporal context) and then calls
``decoder`` on consecutive chunks of latent frames, threading a feature cache through the calls.
How it chunks depends on the ComfyUI version (one frame per call in 0.3.x; the first frame alone,
then pairs in 2026 versions), so this decoder asks the adapter how the installed version chunks
(:func:`comfy_adapter.wan_decode_chunking`) and makes exactly the same calls: latent frames that do
not yet fill a chunk are held back until the next block brings the rest, and :meth:`flush` decodes
the held-back tail at the end, as the one-shot decode's last (shorter) chunk. The first latent
frame gives 1 video frame, every later one 4.

Works on the ``VAE`` object ComfyUI's VAE loaders produce (``comfy.sd.VAE``); the caller loads it
onto its device first.
"""
from __future__ import annotations

import torch

from . import comfy_adapter as comfy

WAN21_LATENT_CHANNELS = 16


def check_wan21_vae(vae) -> None:
    """Raise ValueError unless ``vae`` is a loaded Wan2.1 VAE (16 latent channels, causal 3-D)."""
    model = getattr(vae, "first_stage_model", None)
    if model is None:
        raise ValueError("the VAE input holds no VAE model (an invalid or empty VAE file?); connect "
                         "Load VAE with wan_2.1_vae.safetensors")
    if not isinstance(model, comfy.wan_vae_class()) or getattr(vae, "latent_channels", None) != WAN21_LATENT_CHANNELS:
        kind = type(model).__name__
        ch = getattr(vae, "latent_channels", "?")
        raise ValueError(f"the connected VAE is not the Wan2.1 VAE ({kind}, {ch} latent channels); Rolling Forcing "
                         f"latents need the Wan2.1 VAE: Load VAE with wan_2.1_vae.safetensors")


class StreamingVAEDecoder:
    """Decode a Wan2.1 latent video chunk by chunk; identical to one ``VAE.decode`` of the whole video.

    ``decode(latents)`` takes the next latent frames in ComfyUI's raw VAE latent space
    ([B, 16, F, H/8, W/8], what a LATENT holds) and returns the video frames that are now complete,
    IMAGE-style [B, T, H, W, 3] in 0..1 on ``vae.output_device`` (T may be 0 while frames are held
    back); ``flush()`` returns the rest at the end. Over a whole video the frames add up to
    1 + 4 (N - 1) for N latent frames. ``close()`` (or the context manager) drops the cache.
    """

    def __init__(self, vae):
        check_wan21_vae(vae)
        self.vae = vae
        self.model = vae.first_stage_model
        self.first, self.step = comfy.wan_decode_chunking(vae)
        self.out_dtype = comfy.vae_output_dtype(vae)
        self._feat_map: list | None = [None] * comfy.decoder_cache_slots(self.model.decoder)
        self._held: torch.Tensor | None = None  # conv2 output not yet decoded [B, 16, f < chunk, h, w]
        self._last: torch.Tensor | None = None  # the last latents received (for empty outputs' shape)
        self.latent_frames = 0  # latent frames received
        self.frames = 0  # video frames returned

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self._feat_map is None:
            raise RuntimeError("StreamingVAEDecoder was closed")
        if latents.ndim != 5 or latents.shape[1] != WAN21_LATENT_CHANNELS:
            raise ValueError(f"expected Wan2.1 latents [B, 16, F, H, W], got {list(latents.shape)}")
        vae = self.vae
        x = self.model.conv2(latents.to(device=vae.device, dtype=vae.vae_dtype))  # as VAE.decode converts
        if self._held is not None:
            x = torch.cat([self._held, x], dim=2)
        self.latent_frames += latents.shape[2]
        self._last = latents[:, :, :0]
        outs, i = [], 0
        self._held = None
        start = self.latent_frames - x.shape[2]  # latent frames decoded before this call
        while True:
            n = self.first if start + i == 0 else self.step
            if i + n > x.shape[2]:
                break
            outs.append(self._run(x[:, :, i:i + n]))
            i += n
        if i < x.shape[2]:
            self._held = x[:, :, i:]
        return self._frames(outs, latents)

    @torch.no_grad()
    def flush(self) -> torch.Tensor:
        """The frames of held-back latent frames (decoded as one last, shorter chunk)."""
        if self._held is None or self._feat_map is None:
            return self._frames([], self._last)
        x, self._held = self._held, None
        return self._frames([self._run(x)], x)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        return comfy.decoder_output(self.model.decoder(x, feat_cache=self._feat_map, feat_idx=[0]))

    def _frames(self, outs: list, like) -> torch.Tensor:
        """Decoder outputs -> IMAGE-style frames; no outputs -> an empty [B, 0, H, W, 3] (sizes of ``like``
        latents, or 0 when unknown)."""
        vae = self.vae
        if not outs:
            b = 1 if like is None else like.shape[0]
            h, w = (0, 0) if like is None else (like.shape[3] * 8, like.shape[4] * 8)
            return torch.empty((b, 0, h, w, 3), dtype=self.out_dtype, device=vae.output_device)
        out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
        out = out.to(device=vae.output_device, dtype=self.out_dtype, copy=True)
        frames = vae.process_output(out).movedim(1, -1)
        self.frames += frames.shape[1]
        return frames

    def frames_after(self, latent_frames: int, final: bool) -> int:
        """Video frames returned in total once ``latent_frames`` latent frames were received (and, with
        ``final``, flushed): the latent frames filling whole decoder chunks give 1 frame (the first)
        and 4 (every later one)."""
        done = latent_frames
        if not final:
            done = 0 if latent_frames < self.first else \
                self.first + (latent_frames - self.first) // self.step * self.step
        return 0 if done == 0 else 1 + 4 * (done - 1)

    def state_dict(self) -> dict:
        """The decoder's whole state on the CPU (the causal feature cache, whose entries are tensors, None
        or the marker string ``"Rep"``, and the held-back frames): loading it into a new decoder over
        the same VAE continues the video exactly. Loads with ``torch.load(weights_only=True)``."""
        if self._feat_map is None:
            raise RuntimeError("StreamingVAEDecoder was closed")

        def cpu(t):
            return t.detach().cpu().clone() if isinstance(t, torch.Tensor) else t
        return {"feat_map": [cpu(t) for t in self._feat_map], "held": cpu(self._held),
                "last": cpu(self._last),
                "latent_frames": self.latent_frames, "frames": self.frames, "chunking": [self.first, self.step]}

    def load_state_dict(self, state: dict) -> None:
        if list(state["chunking"]) != [self.first, self.step] or len(state["feat_map"]) != len(self._feat_map):
            raise ValueError("the saved decoder state comes from another VAE or ComfyUI version (decode chunking "
                             f"{state['chunking']}, {len(state['feat_map'])} cache slots; now {[self.first, self.step]}, "
                             f"{len(self._feat_map)}); start the run over")
        dev = dict(device=self.vae.device)

        def load(t):
            return t.to(**dev, copy=True) if isinstance(t, torch.Tensor) else t
        self._feat_map = [load(t) for t in state["feat_map"]]
        self._held = load(state["held"])
        self.latent_frames, self.frames = int(state["latent_frames"]), int(state["frames"])
        self._last = load(state["last"])

    def close(self) -> None:
        self._feat_map = None
        self._held = None

    def __enter__(self) -> "StreamingVAEDecoder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
