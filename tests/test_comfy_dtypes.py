"""The sampler where users run it: ComfyUI's GPU dtype path (forced on CPU), every weight dtype, and
the VRAM modes that change how layers get their weights.

ComfyUI on a CUDA GPU picks fp16 for Wan's weights and computation (its first supported inference
dtype; bf16 when asked for bf16 weights, or where fp16 is ruled out); fp8 weights are computed in
fp16/bf16 with every layer casting at use. On a CPU it picks float32, which hides dtype bugs, so
these tests make ComfyUI believe the device supports bf16 / fp16 (``should_use_bf16`` /
``should_use_fp16``, see ``GPU_FLAVOURS`` in tests/comfyui/env.py) before the model is loaded.

VRAM modes: ``normal`` (weights resident), ``lowvram`` (ComfyUI's partial load: only part of the
weights resident, the rest cast and moved at use by ``comfy.ops``) and ``cast_all`` (every layer
casts at use, what dynamic VRAM does to all layers; dynamic VRAM itself needs CUDA and
``comfy_aimdo``'s native library, so it cannot run here).

Each cell runs the Rolling Forcing Sampler end to end with the Wan VAE (decoded in float32, as with
``--fp32-vae``: half-precision 3-D convolutions take ~15 s per decode on a CPU) and is compared with
the float32 run (same seed, same weights); the tolerances below are the measured error with a
margin. The VAE's own half-precision path is checked once, in bf16 (streamed == one-shot decode).
"""
from __future__ import annotations

import pytest
import torch

from scripts.workflow_source import MODEL_FILES
from tests.comfyui import env
from tests.comfyui.inject_pack import random_conditioning, random_wan_vae_state_dict

pytestmark = pytest.mark.comfy

SIZE = dict(width=32, height=32, seconds=1.0)  # 2 blocks = 6 latent frames = 21 frames

# cell: (loader weight dtype, GPU flavour, compute dtype ComfyUI must pick)
CELLS = {
    "ampere, default weights": ("default", "ampere", torch.float16),
    "ampere, bf16 weights": ("bf16", "ampere", torch.bfloat16),
    "ampere, fp16 weights": ("fp16", "ampere", torch.float16),
    "ampere, fp8_e4m3fn weights": ("fp8_e4m3fn", "ampere", torch.float16),
    "ampere, fp8_e5m2 weights": ("fp8_e5m2", "ampere", torch.float16),
    "turing, bf16 weights": ("bf16", "turing", torch.float16),  # no bf16 on the card: manual cast to fp16
    "bf16-only, default weights": ("default", "bf16_only", torch.bfloat16),
    "bf16-only, fp8_e4m3fn weights": ("fp8_e4m3fn", "bf16_only", torch.bfloat16),
    "bf16-only, fp8_e5m2 weights": ("fp8_e5m2", "bf16_only", torch.bfloat16),
}
MODES = ("normal", "lowvram", "cast_all")

# max |latent - latent_fp32| / std(latent_fp32) and max |image - image_fp32| (0..1): the measured
# error on the tiny model (the test prints it; identical in every VRAM mode) with about 2x margin.
# Measured: fp16 0.0022 / 0.0007, bf16 0.021 / 0.006, bf16 weights in fp16 0.004 / 0.002,
# fp8_e4m3fn 0.060-0.063 / 0.027, fp8_e5m2 0.120 / 0.054-0.056.
TOL = {torch.float16: (0.005, 0.002), torch.bfloat16: (0.045, 0.015), "turing-bf16": (0.01, 0.005),
       "fp8_e4m3fn": (0.13, 0.06), "fp8_e5m2": (0.25, 0.12)}


def run_cell(weight_dtype: str, gpu: str | None, mode: str, cond, monkeypatch):
    """Load the DiT and a Wan VAE as ComfyUI would on that GPU, run the sampler, return (latent,
    images, info, patcher)."""
    import comfy.model_management as mm
    import comfy.sd

    from comfy.cli_args import args

    with monkeypatch.context() as m:
        m.setattr(args, "fp32_vae", True)
        env.force_gpu_dtype_path(m, gpu or "fp32")  # None: the float32 path, also under RF_TEST_GPU_DTYPES
        if mode == "lowvram":
            env.force_lowvram(m, fraction=0.4)
        model = env.node_class("RollingForcingModelLoader").execute(MODEL_FILES["dit"]["name"], "ema",
                                                                  weight_dtype, "sdpa")[0]
        if mode == "cast_all":
            model.force_cast_weights = True
        vae = comfy.sd.VAE(sd=random_wan_vae_state_dict(0))
        with torch.inference_mode():
            out = env.prepared_node("RollingForcingSampler", "6").execute(model, cond, SIZE["width"], SIZE["height"],
                                                                        SIZE["seconds"], 3, vae=vae)
        latent, images, info = out.result[:3]
        casting = env.layers_casting_at_use(model.model.diffusion_model)
        mm.unload_all_models()
    return latent["samples"], images, info, casting


@pytest.fixture(scope="module")
def reference(cu):
    """The float32 run (ComfyUI's CPU path, weights resident), with the ``cond`` fixture's conditioning."""
    mp = pytest.MonkeyPatch()
    try:
        latent, images, info, casting = run_cell("default", None, "normal", random_conditioning(1, 12), mp)
    finally:
        mp.undo()
    assert "compute float32" in info and casting == (0, casting[1])
    return latent, images


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cell", list(CELLS))
def test_dtype_matrix(cu, cond, reference, monkeypatch, cell, mode):
    weight_dtype, gpu, compute = CELLS[cell]
    latent, images, info, (casting, layers) = run_cell(weight_dtype, gpu, mode, cond, monkeypatch)
    name = str(compute).replace("torch.", "")
    assert f"compute {name}" in info, info
    # how the layers got their weights: what the mode promises (a manual cast casts every layer)
    if mode == "cast_all" or weight_dtype.startswith("fp8") or (gpu == "turing" and weight_dtype == "bf16"):
        assert casting == layers, (casting, layers)
    elif mode == "lowvram":
        assert 0 < casting < layers, (casting, layers)
    else:
        assert casting == 0, casting
    ref_latent, ref_images = reference
    assert latent.dtype == torch.float32 and torch.isfinite(latent).all()
    assert images.shape == ref_images.shape and torch.isfinite(images).all()
    err_latent = ((latent - ref_latent).abs().max() / ref_latent.std()).item()
    err_images = (images.float() - ref_images).abs().max().item()
    tol = TOL[weight_dtype if weight_dtype.startswith("fp8") else "turing-bf16" if gpu == "turing" else compute]
    print(f"\n{cell} / {mode}: compute {name}, {casting}/{layers} layers cast at use; "
          f"latent err {err_latent:.4f} (of std), image err {err_images:.4f}")
    assert err_latent < tol[0] and err_images < tol[1]
    assert err_latent > 0  # it really ran in the lower precision


def test_the_suite_wide_gpu_dtype_path_is_in_force(cu):
    """With RF_TEST_GPU_DTYPES=<flavour> every ComfyUI test runs on that GPU's dtype path: a model loaded
    with default weights computes in half precision (skipped when the variable is unset)."""
    import os

    from tests.comfyui.inject_pack import FORCE_ENV, GPU_FLAVOURS

    flavour = os.environ.get(FORCE_ENV)
    if not flavour:
        pytest.skip(f"{FORCE_ENV} not set: the suite runs on ComfyUI's CPU float32 path")
    model = env.node_class("RollingForcingModelLoader").execute(MODEL_FILES["dit"]["name"], "ema", "default",
                                                              "sdpa")[0]
    want = torch.float16 if GPU_FLAVOURS[flavour][1] else torch.bfloat16
    assert model.model.get_dtype() == want


def test_forced_gpu_path_is_what_comfyui_picks(cu, monkeypatch):
    """The forcing does what a GPU would: default weights become fp16, bf16 stays bf16, fp8 gets a manual cast."""
    with monkeypatch.context() as m:
        env.force_gpu_dtype_path(m, "ampere")
        load = env.node_class("RollingForcingModelLoader").execute
        de = load(MODEL_FILES["dit"]["name"], "ema", "default", "sdpa")[0]
        bf = load(MODEL_FILES["dit"]["name"], "ema", "bf16", "sdpa")[0]
        f8 = load(MODEL_FILES["dit"]["name"], "ema", "fp8_e4m3fn", "sdpa")[0]
    assert de.model.get_dtype() == torch.float16 and de.model.manual_cast_dtype is None  # Wan: fp16 first
    assert bf.model.get_dtype() == torch.bfloat16 and bf.model.manual_cast_dtype is None
    assert bf.model.diffusion_model.patch_embedding.weight.dtype == torch.float32  # ComfyUI keeps it fp32
    assert f8.model.get_dtype() == torch.float8_e4m3fn and f8.model.manual_cast_dtype == torch.float16


def test_model_compute_dtype_node_is_honoured(cu, cond, monkeypatch):
    """ComfyUI's ModelComputeDtype (an object patch on manual_cast_dtype): bf16 weights computed in fp16."""
    import comfy.model_management as mm

    with monkeypatch.context() as m:
        env.force_gpu_dtype_path(m, "ampere")
        model = env.node_class("RollingForcingModelLoader").execute(MODEL_FILES["dit"]["name"], "ema", "bf16",
                                                                  "sdpa")[0]
        patched = model.clone()
        patched.set_model_compute_dtype(torch.float16)
        with torch.inference_mode():
            out = env.prepared_node("RollingForcingSampler", "6").execute(patched, cond, 32, 32, 0.5, 3)
        mm.unload_all_models()
    assert "compute float16" in out.result[2]
    assert torch.isfinite(out.result[0]["samples"]).all()


def test_half_precision_vae_streams_like_one_shot_decode(cu, monkeypatch):
    """The VAE on the bf16 GPU path: the block-by-block decode (with the installed version's chunking and
    the held-back frame) gives exactly the frames of one VAE.decode, in bf16 too."""
    import comfy.sd

    pack = cu["pack"]
    with monkeypatch.context() as m:
        env.force_gpu_dtype_path(m, "bf16_only")
        vae = comfy.sd.VAE(sd=random_wan_vae_state_dict(0))
    assert vae.vae_dtype == torch.bfloat16
    z = torch.randn(1, 16, 6, 1, 1, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        oneshot = vae.decode(z)
        with pack.nodes.stream_decode.StreamingVAEDecoder(vae) as dec:
            parts = [dec.decode(z[:, :, :3]), dec.decode(z[:, :, 3:]), dec.flush()]
    streamed = torch.cat(parts, dim=1)
    assert [p.shape[1] for p in parts][0] == 9 and streamed.shape[1] == 21 == oneshot.shape[1]
    assert torch.equal(streamed.to(oneshot.dtype), oneshot)
