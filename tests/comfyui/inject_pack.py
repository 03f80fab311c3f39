"""Test-only ComfyUI nodes, so that no text encoder or VAE download is needed.

ComfyUI loads this file like a single-file custom node (``nodes.load_custom_node(<this file>)``
in-process; copied into the server's ``custom_nodes`` folder): ``RFTestPromptEmbedding`` (a seeded
random umT5-like CONDITIONING), ``RFTestRandomWanVAE`` (a real ``comfy.sd.VAE`` of the Wan2.1
architecture with seeded random weights), ``RFTestRandomTAEHV`` (the same for ComfyUI's TAEHV tiny
video decoder; only where ComfyUI has TAEHV) and ``RFTestClip`` (stands in for the umT5-XXL CLIP:
each text -> a seeded random embedding). ``random_wan_vae_state_dict`` and ``random_taehv_state_dict``
are also imported directly (``tests.comfyui.inject_pack``) by tests and ``bench/gpu_smoke.py``.

ComfyUI is imported only when a node runs, so the module imports anywhere.
"""
import math
import os
import sys

import torch

GPU_FLAVOURS = {  # (bf16 supported, fp16 supported), as ComfyUI's should_use_bf16 / should_use_fp16 answer
    "ampere": (True, True),  # RTX 30xx and newer, A100, H100: ComfyUI picks fp16 first for Wan, bf16 on request
    "turing": (False, True),  # RTX 20xx, T4: no bf16
    "bf16_only": (True, False),  # where fp16 is ruled out: everything that is not fp32 runs in bf16
    "fp32": (False, False),  # ComfyUI's CPU answer: float32 everywhere (the fidelity references)
}
FORCE_ENV = "RF_TEST_GPU_DTYPES"
"""Set to a GPU_FLAVOURS name, this module makes the whole ComfyUI process (the in-process tests and the
test server, which both load it) choose dtypes as on that CUDA GPU, from the first model loaded on."""


def force_gpu_dtypes(flavour: str, setattr=setattr) -> None:
    """Make ComfyUI choose model/VAE dtypes as on a CUDA GPU of that flavour (see GPU_FLAVOURS): its
    ``should_use_bf16`` / ``should_use_fp16`` answer as there. ``setattr``: e.g. a monkeypatch's."""
    import comfy.model_management as mm

    if flavour not in GPU_FLAVOURS:
        raise ValueError(f"GPU dtype flavour must be one of {', '.join(GPU_FLAVOURS)}, got {flavour!r}")
    bf16, fp16 = GPU_FLAVOURS[flavour]
    setattr(mm, "should_use_bf16", lambda *a, **k: bf16)
    setattr(mm, "should_use_fp16", lambda *a, **k: fp16)


if os.environ.get(FORCE_ENV) and "comfy.model_management" in sys.modules:  # as ComfyUI loads it
    force_gpu_dtypes(os.environ[FORCE_ENV])

TEXT_TOKENS = 512  # umT5 sequence length (padding zeroed past the prompt's tokens)
TEXT_DIM = 4096  # umT5-XXL width


def random_conditioning(seed: int = 1, tokens: int = 12, width: int = TEXT_DIM, batch: int = 1) -> list:
    """CONDITIONING like CLIPTextEncode with the wan text encoder: [[c, {"pooled_output": None}]], c
    [batch, 512, width] with ``tokens`` seeded random rows and zeros after them."""
    g = torch.Generator().manual_seed(seed)
    c = torch.zeros(batch, TEXT_TOKENS, width)
    c[:, :tokens] = torch.randn(batch, tokens, width, generator=g)
    return [[c, {"pooled_output": None}]]


def random_wan_vae_state_dict(seed: int = 0) -> dict:
    """Seeded random weights for ComfyUI's Wan2.1 VAE (``comfy.ldm.wan.vae.WanVAE``, the layout of
    ``wan_2.1_vae.safetensors``): normal weights scaled by 1/sqrt(fan-in), unit RMS-norm gains, zero biases."""
    from comfy.ldm.wan.vae import WanVAE

    with torch.device("meta"):
        shapes = WanVAE(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                        temperal_downsample=[False, True, True]).state_dict()
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in shapes.items():
        if k.endswith("gamma"):
            sd[k] = torch.ones(v.shape)
        elif k.endswith("bias"):
            sd[k] = torch.zeros(v.shape)
        else:
            fan_in = math.prod(v.shape[1:]) if v.ndim > 1 else 1
            sd[k] = torch.randn(v.shape, generator=g) / math.sqrt(fan_in)
    return sd


def random_taehv_state_dict(seed: int = 0, latent_channels: int = 16, dtype: torch.dtype = torch.float32) -> dict:
    """Seeded random weights for ComfyUI's TAEHV (``comfy.taesd.taehv.TAEHV``, the layout of
    ``lighttaew2_1.safetensors`` for 16 latent channels; 48 is Wan2.2's, 32 HunyuanVideo 1.5's):
    He-normal conv weights, small random biases, the last conv's bias 0.5 (frames mostly inside 0..1).
    ``comfy.sd.VAE`` reads a float16 16-channel one as HunyuanVideo's taehv, any other dtype as lighttaew2_1."""
    from comfy.taesd.taehv import TAEHV

    with torch.device("meta"):
        shapes = TAEHV(latent_channels=latent_channels).state_dict()
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in shapes.items():
        if k.endswith("bias"):
            sd[k] = torch.full(v.shape, 0.5) if k == "decoder.22.bias" else torch.randn(v.shape, generator=g) * 0.05
        else:
            fan_in = math.prod(v.shape[1:]) if v.ndim > 1 else 1
            sd[k] = torch.randn(v.shape, generator=g) * math.sqrt(1.0 / fan_in)
    return {k: t.to(dtype) for k, t in sd.items()}


class RFTestPromptEmbedding:
    """A random prompt embedding instead of umT5-XXL (see ``random_conditioning``)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 1}), "tokens": ("INT", {"default": 12, "min": 1}),
                             "width": ("INT", {"default": TEXT_DIM, "min": 1})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "run"
    CATEGORY = "testing"

    def run(self, seed, tokens, width):
        return (random_conditioning(seed, tokens, width),)


_VAES = {}


class RFTestRandomWanVAE:
    """A real comfy.sd.VAE (Wan2.1 architecture) with seeded random weights, one per seed."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0})}}

    RETURN_TYPES = ("VAE",)
    FUNCTION = "run"
    CATEGORY = "testing"

    def run(self, seed):
        import comfy.sd

        if seed not in _VAES:
            _VAES[seed] = comfy.sd.VAE(sd=random_wan_vae_state_dict(seed))
        return (_VAES[seed],)


class RFTestRandomTAEHV:
    """A real comfy.sd.VAE holding ComfyUI's TAEHV with seeded random weights (a stand-in for
    lighttaew2_1.safetensors), one per (seed, latent channels)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0}), "latent_channels": ("INT", {"default": 16, "min": 1})}}

    RETURN_TYPES = ("VAE",)
    FUNCTION = "run"
    CATEGORY = "testing"

    def run(self, seed, latent_channels=16):
        import comfy.sd

        key = ("taehv", seed, latent_channels)
        if key not in _VAES:
            _VAES[key] = comfy.sd.VAE(sd=random_taehv_state_dict(seed, latent_channels))
        return (_VAES[key],)


class _FakeWanClip:
    """Stands in for the umT5-XXL CLIP object: each prompt text -> a seeded random [1, 512, 4096] embedding."""

    def tokenize(self, text):
        return text

    def encode_from_tokens_scheduled(self, tokens):
        return random_conditioning(sum(map(ord, tokens)))


class RFTestClip:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "run"
    CATEGORY = "testing"

    def run(self):
        return (_FakeWanClip(),)


NODE_CLASS_MAPPINGS = {"RFTestPromptEmbedding": RFTestPromptEmbedding, "RFTestRandomWanVAE": RFTestRandomWanVAE,
                       "RFTestRandomTAEHV": RFTestRandomTAEHV, "RFTestClip": RFTestClip}
