"""Streaming decode with ComfyUI's Wan2.1 VAE, or with TAEHV (the tiny video decoder, ``lighttaew2_1``):
each finished block is decoded as soon as it exists, with the decoder's causal state kept between
blocks, and the frames are identical to one ``VAE.decode`` of the whole latent video.

:func:`stream_decoder` picks the decoder by what the connected VAE holds: the Wan2.1 VAE
(:class:`StreamingVAEDecoder`, the default for final video) or a Wan2.1 TAEHV
(:class:`StreamingTAEHVDecoder`, much faster, preview quality).

``WanVAE.decode(z)`` applies ``conv2`` (a 1x1x1 causal conv, no temporal context) and then calls
``decoder`` on consecutive chunks of latent frames, threading a feature cache through the calls.
How it chunks depends on the ComfyUI version (one frame per call in 0.3.x; the first frame alone,
then pairs in 2026 versions), so this decoder asks the adapter how the installed version chunks
(:func:`comfy_adapter.wan_decode_chunking`) and makes exactly the same calls: latent frames that do
not yet fill a chunk are held back until the next block brings the rest, and :meth:`flush` decodes
the held-back tail at the end, as the one-shot decode's last (shorter) chunk. The first latent
frame gives 1 video frame, every later one 4.

TAEHV decodes one latent frame at a time through a sequence of 2-D layers; its only temporal
context is each ``MemBlock``'s input for the previous frame and ``TGrow`` turning one frame into
several (4 per latent frame in all). The first ``frames_to_trim`` (3) frames of the whole video are
dropped, so again the first latent frame gives 1 video frame and every later one 4, and nothing is
held back.

Works on the ``VAE`` object ComfyUI's VAE loaders produce (``comfy.sd.VAE``); the caller loads it
onto its device first.
"""
from __future__ import annotations

import math

import torch

from . import comfy_adapter as comfy

WAN21_LATENT_CHANNELS = 16
WAN_VAE_LABEL = "Wan2.1 VAE"
TAEHV_LABEL = "TAEHV (fast, preview quality)"
LOAD_HINT = ("Load VAE with wan_2.1_vae.safetensors (final quality), or with lighttaew2_1.safetensors "
             "(models/vae_approx or models/vae; fast, preview quality)")

# TAEHVs for other video models, as ComfyUI builds them (latent channels -> what they are for)
OTHER_TAEHVS = {48: "Wan2.2 (lighttaew2_2 / taew2_2)", 32: "HunyuanVideo 1.5 (lighttaehy1_5)",
                128: "LTX-2 (taeltx_2)", 24: "MiniMax H3 (taeh3)"}


def check_wan21_vae(vae) -> str:
    """Raise ValueError unless ``vae`` can decode Wan2.1 latents: the Wan2.1 VAE (16 latent channels,
    causal 3-D) or a Wan2.1 TAEHV (16 latent channels, raw latents). Returns which one
    (:data:`WAN_VAE_LABEL` or :data:`TAEHV_LABEL`)."""
    model = getattr(vae, "first_stage_model", None)
    if model is None:
        problem = comfy.taehv_problem()
        tae = "" if problem is None else f" A TAEHV file (lighttaew2_1) gives this here: {problem}"
        raise ValueError(f"the VAE input holds no VAE model (an invalid or empty VAE file?).{tae} {LOAD_HINT}")
    ch = getattr(vae, "latent_channels", "?")
    if comfy.is_taehv(model):
        if ch in OTHER_TAEHVS:
            raise ValueError(f"the connected VAE is the TAEHV for {OTHER_TAEHVS[ch]} ({ch} latent channels), not for "
                             f"Wan2.1; Rolling Forcing latents need a Wan2.1 decoder: {LOAD_HINT}")
        fmt = comfy.taehv_latent_format(model)
        if ch == WAN21_LATENT_CHANNELS and fmt is not None:
            raise ValueError(f"the connected VAE is a 16-channel TAEHV stored in float16, which ComfyUI reads as "
                             f"taehv for HunyuanVideo (it scales the latents as {fmt}, wrong for Wan2.1); "
                             f"{LOAD_HINT} (lighttaew2_1 in float32 or bfloat16)")
        if ch != WAN21_LATENT_CHANNELS or getattr(model, "patch_size", 1) != 1:
            raise ValueError(f"the connected VAE is a TAEHV for another model ({ch} latent channels), not for "
                             f"Wan2.1; {LOAD_HINT}")
        return TAEHV_LABEL
    if not isinstance(model, comfy.wan_vae_class()) or ch != WAN21_LATENT_CHANNELS:
        kind = type(model).__name__
        raise ValueError(f"the connected VAE is not the Wan2.1 VAE ({kind}, {ch} latent channels); Rolling Forcing "
                         f"latents need a Wan2.1 decoder: {LOAD_HINT}")
    return WAN_VAE_LABEL


def stream_decoder(vae):
    """The streaming decoder for what ``vae`` holds: :class:`StreamingTAEHVDecoder` for a Wan2.1 TAEHV,
    :class:`StreamingVAEDecoder` for the Wan2.1 VAE (anything else: ValueError naming what to load).
    Its ``label`` says which ran."""
    if check_wan21_vae(vae) == TAEHV_LABEL:
        return StreamingTAEHVDecoder(vae)
    return StreamingVAEDecoder(vae)


def _cpu(t):
    """A decoder state entry (tensor, list of tensors, None or a marker) copied to the CPU."""
    if isinstance(t, list):
        return [_cpu(u) for u in t]
    return t.detach().to("cpu", copy=True) if isinstance(t, torch.Tensor) else t  # one copy, also from CUDA


def _to(t, device):
    """A saved decoder state entry copied onto ``device``."""
    if isinstance(t, list):
        return [_to(u, device) for u in t]
    return t.to(device=device, copy=True) if isinstance(t, torch.Tensor) else t


class _StreamDecoder:
    """What both streaming decoders share: the input checks, decoder output -> IMAGE-style frames, and
    the context manager (``close()`` on exit)."""

    def _check(self, latents: torch.Tensor | None, state) -> None:
        if state is None:
            raise RuntimeError(f"{type(self).__name__} was closed")
        if latents is not None and (latents.ndim != 5 or latents.shape[1] != WAN21_LATENT_CHANNELS):
            raise ValueError(f"expected Wan2.1 latents [B, 16, F, H, W], got {list(latents.shape)}")

    def _image(self, out: torch.Tensor, clamp: bool = False) -> torch.Tensor:
        """Decoder output [B, 3, T, H, W] -> frames [B, T, H, W, 3] on ``vae.output_device`` (counted)."""
        out = out.to(device=self.vae.output_device, dtype=self.out_dtype, copy=True)
        frames = self.vae.process_output(out).movedim(1, -1)
        if clamp:
            frames = frames.clamp_(0.0, 1.0)
        self.frames += frames.shape[1]
        return frames

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class StreamingVAEDecoder(_StreamDecoder):
    """Decode a Wan2.1 latent video chunk by chunk; identical to one ``VAE.decode`` of the whole video.

    ``decode(latents)`` takes the next latent frames in ComfyUI's raw VAE latent space
    ([B, 16, F, H/8, W/8], what a LATENT holds) and returns the video frames that are now complete,
    IMAGE-style [B, T, H, W, 3] in 0..1 on ``vae.output_device`` (T may be 0 while frames are held
    back); ``flush()`` returns the rest at the end. Over a whole video the frames add up to
    1 + 4 (N - 1) for N latent frames. ``close()`` (or the context manager) drops the cache.
    """

    label = WAN_VAE_LABEL

    def __init__(self, vae):
        if check_wan21_vae(vae) != WAN_VAE_LABEL:
            raise ValueError(f"StreamingVAEDecoder decodes with the Wan2.1 VAE, got a {TAEHV_LABEL}; use stream_decoder()")
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
        self._check(latents, self._feat_map)
        vae = self.vae
        x = self.model.conv2(latents.to(device=vae.device, dtype=vae.vae_dtype))  # as VAE.decode converts
        if self._held is not None:
            x = torch.cat([self._held, x], dim=2)
        self.latent_frames += latents.shape[2]
        self._last = latents[:, :, :0]
        outs, i = [], 0
        self._held = None
        n = self.first if self.latent_frames == x.shape[2] else self.step  # the first chunk of the video
        while i + n <= x.shape[2]:
            outs.append(self._run(x[:, :, i:i + n]))
            i += n
            n = self.step
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
        if not outs:
            b = 1 if like is None else like.shape[0]
            h, w = (0, 0) if like is None else (like.shape[3] * 8, like.shape[4] * 8)
            return torch.empty((b, 0, h, w, 3), dtype=self.out_dtype, device=self.vae.output_device)
        return self._image(torch.cat(outs, dim=2) if len(outs) > 1 else outs[0])

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
        self._check(None, self._feat_map)
        return {"kind": "wan_vae", "feat_map": [_cpu(t) for t in self._feat_map], "held": _cpu(self._held),
                "last": _cpu(self._last),
                "latent_frames": self.latent_frames, "frames": self.frames, "chunking": [self.first, self.step]}

    def load_state_dict(self, state: dict) -> None:
        if "chunking" not in state or state.get("kind", "wan_vae") != "wan_vae":
            raise ValueError(f"the saved decoder state comes from another decoder ({state.get('kind', 'unknown')}, "
                             f"now the {WAN_VAE_LABEL}); connect the VAE the run started with, or start the run over")
        if list(state["chunking"]) != [self.first, self.step] or len(state["feat_map"]) != len(self._feat_map):
            raise ValueError("the saved decoder state comes from another VAE or ComfyUI version (decode chunking "
                             f"{state['chunking']}, {len(state['feat_map'])} cache slots; now {[self.first, self.step]}, "
                             f"{len(self._feat_map)}); start the run over")
        dev = self.vae.device
        self._feat_map = [_to(t, dev) for t in state["feat_map"]]
        self._held = _to(state["held"], dev)
        self.latent_frames, self.frames = int(state["latent_frames"]), int(state["frames"])
        self._last = _to(state["last"], dev)

    def close(self) -> None:
        self._feat_map = None
        self._held = None


class StreamingTAEHVDecoder(_StreamDecoder):
    """Decode Wan2.1 latents block by block with ComfyUI's TAEHV (``lighttaew2_1``); the frames are
    identical to one ``VAE.decode`` of the whole latent video with the same VAE.

    Same interface as :class:`StreamingVAEDecoder`: ``decode(latents)`` takes the next latent frames
    (raw LATENT space, [B, 16, F, H/8, W/8]) and returns the frames now complete, [B, T, H, W, 3] in
    0..1 on ``vae.output_device``; nothing is held back (``flush()`` returns no frames). TAEHV's output
    is not clamped by ComfyUI (it may leave 0..1 slightly); with ``clamp`` (the default) the frames are
    clamped to 0..1 like the Wan2.1 VAE's, without it they are exactly ``VAE.decode``'s.

    It makes the calls ``TAEHV.decode`` makes for one latent frame after another (sequential mode,
    what ``comfy.sd.VAE`` builds): layer by layer, depth first, ``TGrow``'s frames in order, each
    ``MemBlock`` given its input of the previous frame (zeros for the first); that memory (and any
    ``TPool`` queue) is the state kept between blocks, in :meth:`state_dict`.
    """

    label = TAEHV_LABEL

    def __init__(self, vae, clamp: bool = True):
        self.layers = comfy.taehv_decoder_layers(getattr(vae, "first_stage_model", None))  # needs TAEHV support
        if check_wan21_vae(vae) != TAEHV_LABEL:
            raise ValueError(f"StreamingTAEHVDecoder decodes with a TAEHV, got the {WAN_VAE_LABEL}; use stream_decoder()")
        self.vae = vae
        self.model = vae.first_stage_model
        self.clamp = clamp
        self.process_in = comfy.taehv_process_in(self.model)
        self.out_dtype = comfy.vae_output_dtype(vae)
        self.t_up = math.prod(layer.stride for kind, layer in self.layers if kind == "grow")
        self.trim = int(getattr(self.model, "frames_to_trim", self.t_up - 1))
        self.scale = math.prod(int(getattr(layer, "scale_factor", 1) or 1) for _k, layer in self.layers
                               if isinstance(layer, torch.nn.Upsample))
        self._mem: list | None = [None] * len(self.layers)
        self._shape: tuple | None = None  # (B, h, w) of the latents received (for empty outputs)
        self.latent_frames = 0  # latent frames received
        self.raw_frames = 0  # frames the decoder made (the first ``trim`` of them are dropped)
        self.frames = 0  # video frames returned

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        self._check(latents, self._mem)
        vae = self.vae
        # as VAE.decode converts, then TAEHV.decode scales ([B, C, T, H, W]; frame t is x[:, :, t])
        x = self.process_in(latents.to(device=vae.device, dtype=vae.vae_dtype))
        self._shape = (latents.shape[0], latents.shape[3], latents.shape[4])
        out = []
        for t in range(x.shape[2]):
            self._frame(x[:, :, t], out)
        self.latent_frames += x.shape[2]
        return self._frames(out)

    def flush(self) -> torch.Tensor:
        """No frames are held back: an empty [B, 0, H, W, 3]."""
        return self._frames([])

    def _frame(self, xt: torch.Tensor, out: list) -> None:
        """One latent frame through the decoder (depth first, as TAEHV's work queue runs it)."""
        mem = self._mem
        batch = xt.shape[0]
        work = [(xt, 0)]  # a stack: the next item to run is the last
        while work:
            xt, i = work.pop()
            if i == len(self.layers):
                self.raw_frames += 1
                if self.raw_frames > self.trim:
                    out.append(xt.to(self.vae.output_device))
                continue
            kind, layer = self.layers[i]
            if kind == "mem":
                past = mem[i] if mem[i] is not None else xt * 0
                nxt = layer(xt, past)
                mem[i] = xt.detach().clone()
                work.append((nxt, i + 1))
            elif kind == "pool":
                mem[i] = (mem[i] or []) + [xt.detach().clone()]
                if len(mem[i]) == layer.stride:
                    _b, c, h, w = xt.shape
                    pooled = layer(torch.cat(mem[i], 1).view(batch * layer.stride, c, h, w))
                    mem[i] = []
                    work.append((pooled, i + 1))
            elif kind == "grow":
                grown = layer(xt)
                _nt, c, h, w = grown.shape
                # frame 0 of the grown ones runs first: push them last to first
                for part in reversed(grown.view(batch, layer.stride * c, h, w).chunk(layer.stride, 1)):
                    work.append((part, i + 1))
            else:
                work.append((layer(xt), i + 1))

    def _frames(self, outs: list) -> torch.Tensor:
        """Decoder output frames [B, 3, H, W] each -> IMAGE-style [B, T, H, W, 3] (empty when none)."""
        if not outs:
            b, h, w = self._shape if self._shape is not None else (1, 0, 0)
            return torch.empty((b, 0, h * self.scale, w * self.scale, 3), dtype=self.out_dtype,
                               device=self.vae.output_device)
        return self._image(torch.stack(outs, 2), self.clamp)  # [B, 3, T, H, W] as TAEHV.decode returns

    def frames_after(self, latent_frames: int, final: bool) -> int:
        """Video frames returned in total once ``latent_frames`` latent frames were received: 4 per latent
        frame less the first 3 (1 + 4 (N - 1)); ``final`` changes nothing (nothing is held back)."""
        return max(0, self.t_up * latent_frames - self.trim)

    def state_dict(self) -> dict:
        """The decoder's whole state on the CPU (each MemBlock's last input, TPool queues, the counters):
        loading it into a new decoder over the same TAEHV continues the video exactly. Loads with
        ``torch.load(weights_only=True)``."""
        self._check(None, self._mem)
        return {"kind": "taehv", "mem": [_cpu(t) for t in self._mem], "shape": list(self._shape or []),
                "layers": [kind for kind, _layer in self.layers], "latent_frames": self.latent_frames,
                "raw_frames": self.raw_frames, "frames": self.frames}

    def load_state_dict(self, state: dict) -> None:
        layers = [kind for kind, _layer in self.layers]
        if state.get("kind") != "taehv":
            raise ValueError(f"the saved decoder state comes from another decoder ({state.get('kind', 'the Wan2.1 VAE')}"
                             f", now a {TAEHV_LABEL}); connect the VAE the run started with, or start the run over")
        if list(state["layers"]) != layers:
            raise ValueError(f"the saved decoder state comes from another TAEHV or ComfyUI version (layers "
                             f"{state['layers']}, now {layers}); start the run over")
        self._mem = [_to(t, self.vae.device) for t in state["mem"]]
        self._shape = tuple(state["shape"]) or None
        self.latent_frames, self.raw_frames = int(state["latent_frames"]), int(state["raw_frames"])
        self.frames = int(state["frames"])

    def close(self) -> None:
        self._mem = None
