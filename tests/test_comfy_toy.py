"""The built-in toy model in a real ComfyUI (in-process, CPU): Rolling Forcing Model Loader's
``toy (built-in, no download)``, Rolling Forcing Toy Text Encode and Toy Decode, and a whole graph
whose frames are checked for what the caption asked for (``rolling.toy.detect``), not only that
they exist.

Needs a ComfyUI checkout in COMFYUI_PATH (skipped otherwise). The toy DiT (dim 128, 4 heads,
freq_dim 64, text_dim 32, text_len 16) is not what ComfyUI's Wan detection guesses from the
shapes (1 head, freq_dim 256, text_dim 4096): the loader reads the rest from the file's
``wan_config`` metadata, and these tests check that ComfyUI's own WanModel built from it computes
exactly what ``rolling.toy``'s loading of the same file computes.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.comfyui import env

pytestmark = pytest.mark.comfy

TOY = "toy (built-in, no download)"
RED_DARK = "a red circle drifting left on a dark background"
BLUE_LIGHT = "a blue square drifting right on a light background"


def pack(cu):
    return cu["pack"]


def toy_reference():
    """(WanModel, WanConfig) of the file behind the toy choice, loaded by ``rolling.toy`` (not by the pack)."""
    from rolling.config import WanConfig
    from rolling.toy import store

    path = pack(env.comfyui()).nodes.model_options.toy_model_path()
    assert path == store.STUDENT_PATH
    return store.load_student(path), WanConfig.from_dict(store.student_metadata(path)["wan_config"])


@pytest.fixture(scope="module")
def toy(cu):
    return env.node_class("RollingForcingModelLoader").execute(TOY, "ema", "default", "sdpa")[0]


@pytest.fixture(scope="module")
def toy_fp32(cu):
    """The toy model loaded on ComfyUI's float32 path whatever the suite's dtype path (RF_TEST_GPU_DTYPES):
    for the check that ComfyUI's module tree computes exactly what rolling.toy's float32 model computes."""
    mp = pytest.MonkeyPatch()
    try:
        env.force_gpu_dtype_path(mp, "fp32")
        return env.node_class("RollingForcingModelLoader").execute(TOY, "ema", "default", "sdpa")[0]
    finally:
        mp.undo()


def rolling_latents(module, ctx, *, blocks=2, seed=5, sampler_cls=None):
    """The core's rolling sampler over a module tree, 8x8 latents, fp32 on CPU: [1, 16, 3 blocks, 8, 8]."""
    from rolling.sampler import RollingSampler

    cls = sampler_cls or RollingSampler
    with torch.inference_mode():
        return cls(module, height=8, width=8, device="cpu", dtype=torch.float32, attention="sdpa",
                   seed=seed).generate(ctx, blocks)


# ----------------------------------------------------------------------------- loader

def test_loader_offers_the_toy_model_first(cu):
    info = env.node_info("RollingForcingModelLoader")
    spec = info["input"]["required"]["model_name"]
    choices = spec[0] if isinstance(spec[0], list) else spec[1]["options"]
    assert choices[0] == TOY and "rolling_forcing_dmd.pt" in choices
    assert choices.count(TOY) == 1


def test_toy_model_is_comfyuis_wan_with_the_files_architecture(cu, toy):
    import comfy.ldm.wan.model
    import comfy.model_patcher

    ref, cfg = toy_reference()
    assert (cfg.dim, cfg.num_heads, cfg.freq_dim, cfg.text_dim, cfg.text_len) == (128, 4, 64, 32, 16)
    assert isinstance(toy, comfy.model_patcher.ModelPatcher) and type(toy.model).__name__ == "WAN21"
    dm = toy.model.diffusion_model
    assert isinstance(dm, comfy.ldm.wan.model.WanModel)
    assert (dm.num_heads, dm.freq_dim, dm.text_len) == (cfg.num_heads, cfg.freq_dim, cfg.text_len)
    got, want = dm.state_dict(), ref.state_dict()
    assert set(want) <= set(got)
    assert all(torch.equal(got[k], want[k].to(got[k].dtype)) for k in want)  # in the dtype ComfyUI chose
    assert toy.model_options["transformer_options"]["rolling_forcing"]["attention"] == "sdpa"


def test_toy_model_computes_what_rolling_toy_computes(cu, toy_fp32):
    """Same video from ComfyUI's module tree as from rolling.toy's model; a wrong head count (what
    ComfyUI's detection would guess: dim // 128 = 1) changes it, so this equality checks the heads."""
    from rolling.model import WanModel
    from rolling.toy import TextEncoder

    ref, cfg = toy_reference()
    ctx = TextEncoder().encode(RED_DARK)
    ours = rolling_latents(toy_fp32.model.diffusion_model, ctx)
    want = rolling_latents(ref, ctx)
    assert ours.shape == (1, 16, 6, 8, 8)
    torch.testing.assert_close(ours, want, rtol=0, atol=1e-5)
    with torch.device("meta"):
        one_head = WanModel(cfg.__class__.from_dict({**cfg.to_dict(), "num_heads": 1}))
    one_head.load_state_dict(ref.state_dict(), assign=True)
    wrong = rolling_latents(one_head.eval(), ctx)
    assert (wrong - want).abs().max() > 1e-2


def test_toy_model_reloads_with_its_architecture(cu, toy):
    """2026 ComfyUI reloads a MODEL through ``cached_patcher_init`` (non-dynamic / per-GPU copies): the
    copy has the toy's head count too."""
    if not hasattr(toy, "cached_patcher_init"):
        pytest.skip("this ComfyUI has no cached_patcher_init (added in 2026)")
    fn, args = toy.cached_patcher_init
    again = fn(*args, disable_dynamic=True)
    assert again.model.diffusion_model.num_heads == toy.model.diffusion_model.num_heads == 4
    ref, got = toy.model.diffusion_model.state_dict(), again.model.diffusion_model.state_dict()
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


def test_the_sampler_gives_each_model_its_trained_prompt_length(cu, toy, model, cond):
    """The toy DiT was trained on 16 prompt tokens (text_len, recorded by the loader): the sampler cuts or
    pads its prompts to 16, not to umT5's 512 (zero tokens would draw most of its cross-attention: colour
    accuracy 0.54 padded to 512 vs 1.00 at 16). A release-layout model, or a MODEL from another loader,
    still gets 512; the DiT itself is ComfyUI's, unhooked."""
    from rolling.toy import TextEncoder

    nodes = pack(cu).nodes
    steps = nodes.run_inputs.DEFAULT_STEPS_TEXT

    def prompt(m, c, width=64):
        return nodes.sampler_run.SamplerRun.prepare(m, c, width, width, 1.0, 0, steps, None, None, False, 0.0,
                                                    None).prompt
    ctx = TextEncoder().encode(RED_DARK)
    assert torch.equal(prompt(toy, [[ctx, {}]]), ctx)
    padded = torch.cat([ctx, ctx.new_zeros(1, 512 - ctx.shape[1], ctx.shape[2])], dim=1)
    assert torch.equal(prompt(toy, [[padded, {}]]), ctx)
    assert not toy.model.diffusion_model.text_embedding._forward_pre_hooks
    arch = pack(cu).rolling.forward.WanArch.of  # the sampler reads text_len off ComfyUI's WanModel itself
    assert arch(toy.model.diffusion_model).text_len == 16 and arch(model.model.diffusion_model).text_len == 512
    assert prompt(model, cond, 32).shape == (1, 512, 4096)


def _save(path: Path, sd: dict, metadata: dict | None) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)


def test_loader_refuses_an_ambiguous_or_contradicting_head_count(cu):
    """Without wan_config metadata the toy DiT's head count cannot be read off its shapes: refused
    with what to add; metadata contradicting the weights is refused too; with it the file loads."""
    ref, cfg = toy_reference()
    folder = cu["models"] / "diffusion_models"
    sd = ref.state_dict()
    _save(folder / "toy_no_meta.safetensors", sd, {"format": "pt"})
    bad = {**cfg.to_dict(), "text_dim": 64}
    _save(folder / "toy_bad_meta.safetensors", sd, {"format": "pt", "wan_config": json.dumps(bad)})
    _save(folder / "toy_copy.safetensors", sd, {"format": "pt", "wan_config": json.dumps(cfg.to_dict())})
    loader = env.node_class("RollingForcingModelLoader")
    with pytest.raises(ValueError, match=r"toy_no_meta.safetensors: the attention head count cannot be told.*"
                                         r"wan_config"):
        loader.execute("toy_no_meta.safetensors", "ema", "default", "auto")
    with pytest.raises(ValueError, match=r"contradicts the weights \(text_dim: metadata 64 vs weights 32\)"):
        loader.execute("toy_bad_meta.safetensors", "ema", "default", "auto")
    copy = loader.execute("toy_copy.safetensors", "ema", "default", "auto")[0]
    assert copy.model.diffusion_model.num_heads == cfg.num_heads


def test_standard_checkpoints_load_as_before(cu, model):
    """The release layout (no metadata, standard Wan2.1 architecture) needs no overrides: ComfyUI's
    detection alone, and its detection is left as it was."""
    import comfy.model_detection

    opts = pack(cu).nodes.model_options
    assert opts.comfy_overrides(opts.architecture(
        pack(cu).rolling.loading.config_from_state_dict(model.model.diffusion_model.state_dict()), {})) == {}
    assert comfy.model_detection.detect_unet_config.__module__ == "comfy.model_detection"
    assert model.model.diffusion_model.num_heads == 2  # TINY_WAN: dim 256 -> 2 heads of 128


# ----------------------------------------------------------------------------- toy text encode and decode

def test_toy_text_encode_gives_the_toy_embedding(cu):
    from rolling.toy import TextEncoder

    node = env.node_class("RollingForcingToyTextEncode")
    cond = node.execute("  A Red circle   drifting left on a dark background ")[0]
    assert len(cond) == 1 and cond[0][0].shape == (1, 16, 32)
    assert torch.equal(cond[0][0], TextEncoder().encode(RED_DARK))
    assert node.validate_inputs(caption=RED_DARK) is True
    msg = node.validate_inputs(caption="a purple circle drifting left on a dark background")
    assert isinstance(msg, str) and "purple" in msg and "allowed words: a, red, green" in msg
    msg = node.validate_inputs(caption="a red circle on a dark background")  # a word missing
    assert isinstance(msg, str) and "does not follow the grammar" in msg and "motions: drifting left" in msg
    with pytest.raises(ValueError, match="allowed words"):
        node.execute("")


def test_toy_decode_is_the_toy_vae(cu):
    from rolling.toy import load_vae

    import comfy.latent_formats

    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 16, 3, 8, 8, generator=g)  # normalised (the sampler's) latent space
    raw = comfy.latent_formats.Wan21().process_out(z)  # what a LATENT holds
    images = env.node_class("RollingForcingToyDecode").execute({"samples": raw})[0]
    assert images.shape == (9, 64, 64, 3) and images.dtype == torch.float32
    with torch.no_grad():
        want = ((load_vae().decode(z)[0].permute(1, 2, 3, 0) + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(images, want, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="Toy Decode needs a video LATENT"):
        env.node_class("RollingForcingToyDecode").execute({"samples": torch.zeros(1, 4, 8, 8)})


# ----------------------------------------------------------------------------- what the frames show

def toy_graph(caption: str, prefix: str, seconds: float = 3.0, seed: int = 0) -> dict:
    """Loader (toy) -> Toy Text Encode -> Rolling Forcing Sampler (64x64, no VAE) -> Toy Decode -> Save Image."""
    return {
        "1": {"class_type": "RollingForcingModelLoader",
              "inputs": {"model_name": TOY, "weights": "ema", "weight_dtype": "default", "attention": "sdpa"}},
        "2": {"class_type": "RollingForcingToyTextEncode", "inputs": {"caption": caption}},
        "3": {"class_type": "RollingForcingSampler",
              "inputs": {"model": ["1", 0], "positive": ["2", 0], "width": 64, "height": 64, "seconds": seconds,
                         "seed": seed, "steps": ""}},
        "4": {"class_type": "RollingForcingToyDecode", "inputs": {"latent": ["3", 0]}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": prefix}},
    }


def run_toy_graph(cu, caption: str, prefix: str, **kw) -> np.ndarray:
    """The saved frames [n, 64, 64, 3] (uint8 PNGs read back) of one run of ``toy_graph`` through
    ComfyUI's own validation and executor."""
    from PIL import Image

    ex, valid, srv = env.run_prompt(toy_graph(caption, prefix, **kw))
    assert ex.success, srv.messages[-3:]
    saved = ex.history_result["outputs"]["5"]["images"]
    frames = [np.asarray(Image.open(cu["out"] / s["subfolder"] / s["filename"]).convert("RGB")) for s in saved]
    return np.stack(frames)


def test_the_frames_show_what_the_caption_asks_for(cu):
    """Two captions through the whole graph: each video shows its caption's colour and background
    (detectors on the saved frames), and the two videos differ in what they show."""
    from rolling.toy import detect
    t0 = time.perf_counter()
    shown = {}
    for caption, prefix in ((RED_DARK, "toy/red_dark"), (BLUE_LIGHT, "toy/blue_light")):
        frames = run_toy_graph(cu, caption, prefix)
        assert frames.shape == (57, 64, 64, 3)  # 3 s -> 5 blocks = 15 latent frames = 57 frames
        score = detect.score(frames, caption)
        dets = detect.detect(frames)
        shown[caption] = (detect.majority([d["colour"] for d in dets]),
                          detect.majority([d["background"] for d in dets]))
        print(f"\n{caption!r}: shows {shown[caption]}, score "
              f"{ {k: round(v, 2) for k, v in score.items() if isinstance(v, float)} }")
        assert score["background"] >= 0.9, (caption, score)
        assert score["found"] >= 0.8, (caption, score)
        assert score["colour"] >= 0.6, (caption, score)
    assert shown[RED_DARK] == ("red", "dark") and shown[BLUE_LIGHT] == ("blue", "light")
    print(f"two toy videos through ComfyUI's executor: {time.perf_counter() - t0:.2f} s")


def test_the_toy_model_with_a_wan_vae_is_refused_before_sampling(cu, toy, vae):
    """A Wan2.1 VAE cannot decode toy latents: the sampler says so (and what to use) instead of decoding garbage."""
    cond = env.node_class("RollingForcingToyTextEncode").execute(RED_DARK)[0]
    node = env.prepared_node("RollingForcingSampler", "61")
    with pytest.raises(ValueError, match="toy model.*leave the sampler's vae input empty.*Rolling Forcing Toy Decode"):
        node.execute(toy, cond, 64, 64, 1.0, 0, vae=vae)
