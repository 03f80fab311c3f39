"""The node pack's ComfyUI-free modules (nodes/run_inputs.py, memory.py, model_options.py): run in CI without ComfyUI.

The pack root is loaded as a package (``rolling_forcing_pack``), as ComfyUI does with its own name,
so ``nodes/`` can use relative imports of the core (``from ..rolling ...``).
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PACK = "rolling_forcing_pack"


def _load_pack():
    if PACK not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK, ROOT / "__init__.py",
                                                      submodule_search_locations=[str(ROOT)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[PACK] = mod
        spec.loader.exec_module(mod)
    return sys.modules[PACK]


_load_pack()
inputs = importlib.import_module(f"{PACK}.nodes.run_inputs")
memory = importlib.import_module(f"{PACK}.nodes.memory")
options = importlib.import_module(f"{PACK}.nodes.model_options")
core_config = importlib.import_module(f"{PACK}.rolling.config")
core_cache = importlib.import_module(f"{PACK}.rolling.cache")
core_timing = importlib.import_module(f"{PACK}.rolling.timing")
RollingConfig = core_config.RollingConfig


# ----------------------------------------------------------------------------- package / import

def test_nodes_package_imports_without_comfyui():
    nodes_pkg = importlib.import_module(f"{PACK}.nodes")
    if importlib.util.find_spec("comfy_api") is not None:
        pytest.skip("ComfyUI is importable here")
    assert not hasattr(nodes_pkg, "RollingForcingExtension")
    # what needs ComfyUI says so, naming the missing piece (the adapter is the only door to it)
    with pytest.raises(RuntimeError, match=r"ComfyUI .* has no module comfy_api.latest, which Rolling Forcing needs"):
        importlib.import_module(f"{PACK}.nodes.stream_decode")


# ----------------------------------------------------------------------------- loader options

def test_checkpoint_files_lists_pt_pth_safetensors():
    names = ["a.pt", "b.PTH", "c.safetensors", "d.ckpt", "e.bin", "sub/f.pt", "g.gguf"]
    assert options.checkpoint_files(names) == ["a.pt", "b.PTH", "c.safetensors", "sub/f.pt"]


@pytest.mark.parametrize("name, dtype", [("default", None), ("bf16", torch.bfloat16), ("fp16", torch.float16),
                                         ("fp8_e4m3fn", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)])
def test_weight_dtype_options(name, dtype):
    assert options.weight_dtype_options(name) == ({} if dtype is None else {"dtype": dtype})


def test_weight_dtype_rejects_unknown():
    with pytest.raises(ValueError, match="default, bf16, fp16, fp8_e4m3fn, fp8_e5m2"):
        options.weight_dtype_options("int4")


def test_attention_choice_roundtrip():
    assert options.attention_from_options({}) == "auto"
    assert options.attention_from_options(None) == "auto"
    assert options.attention_from_options({"transformer_options": {"other": 1}}) == "auto"
    opts = {"transformer_options": {"patches": {}}}
    options.with_attention(opts, "sage")
    assert opts["transformer_options"]["patches"] == {}
    assert options.attention_from_options(opts) == "sage"
    assert options.attention_from_options({"transformer_options": {"rolling_forcing": {"attention": "bogus"}}}) == "auto"
    with pytest.raises(ValueError, match="auto, sdpa, cudnn, flash, sage"):
        options.with_attention({}, "xformers")


def test_wan_t2v_problem():
    ok = dict(class_name="WanModel", model_type="t2v", has_image_embedding=False, in_dim=16, out_dim=16)
    assert options.wan_t2v_problem(**ok) is None
    msg = options.wan_t2v_problem(**{**ok, "model_type": "i2v", "has_image_embedding": True})
    assert "image-to-video (I2V)" in msg and "text-to-video" in msg
    assert "vace" in options.wan_t2v_problem(**{**ok, "model_type": "vace", "class_name": "VaceWanModel"})
    assert "48 input" in options.wan_t2v_problem(**{**ok, "in_dim": 48, "out_dim": 48})


def test_compute_dtype():
    assert options.compute_dtype(None, torch.float32) == torch.float32
    assert options.compute_dtype(None, torch.bfloat16) == torch.bfloat16
    assert options.compute_dtype(torch.float16, torch.float8_e4m3fn) == torch.float16
    assert options.compute_dtype(None, torch.float8_e4m3fn) == torch.bfloat16
    assert options.compute_dtype(None, torch.float8_e5m2, bf16_supported=False) == torch.float16


# ----------------------------------------------------------------------------- cache settings

def test_cache_defaults_reproduce_the_reference():
    s = inputs.cache_config()
    assert s == RollingConfig(steps=(1000,))  # the cache node's config; the sampler sets the steps
    cfg = inputs.sampler_config(s, inputs.DEFAULT_STEPS_TEXT)
    ref = RollingConfig()
    assert cfg == ref
    assert inputs.sampler_config(None, "") == ref
    assert inputs.sampler_config(None, None) == ref


@pytest.mark.parametrize("kw, pattern", [
    ({"capacity_frames": 25}, r"capacity_frames \(25\) must be a multiple of frames_per_block \(3\)"),
    ({"sink_blocks": -1}, r"sink_blocks must be between 0 and 64"),
    ({"span_frames": 5, "sink_blocks": 1}, r"span_frames \(5\) must be at least .* = 6 latent frames"),
    ({"capacity_frames": 3, "sink_blocks": 1},
     r"capacity_frames \(3\) must hold the sink \(3\) plus at least one block"),
    ({"context_noise": 1000.0}, r"context_noise must be between 0.0 and 999.0"),
    ({"update_mode": "lazy"}, r"update_mode must be one of fused, reference"),
    ({"rope_mode": "absolute"}, r"rope_mode must be one of reference, relative"),
    ({"schedule": "diagonal"}, r"schedule must be one of rolling, chunk_causal"),
    ({"span_frames": 21.5}, r"span_frames must be a whole number"),
])
def test_cache_settings_rejected_with_allowed_values(kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        inputs.cache_config(**kw)


def test_cache_span_checked_against_the_step_list():
    s = inputs.cache_config(span_frames=15)  # fine for a short window...
    with pytest.raises(ValueError, match=r"span_frames \(15\) must be at least window \(15 = 5 steps x 3 frames\) "
                                         r"\+ sink \(3\) = 18"):
        inputs.sampler_config(s, "1000,800,600,400,200")  # ...not for the reference's 5 steps
    cfg = inputs.sampler_config(s, "1000,750,500,250")  # 12 + 3 = 15: allowed
    assert cfg.steps == (1000, 750, 500, 250) and cfg.span_frames == 15


@pytest.mark.parametrize("text, pattern", [("abc", "could not read the step list"),
                                           ("1000,1000", "strictly decreasing"),
                                           ("1200,800", "whole number in 1..1000")])
def test_bad_step_lists(text, pattern):
    with pytest.raises(ValueError, match=pattern):
        inputs.sampler_config(None, text)


# ----------------------------------------------------------------------------- size and length

def test_latent_size():
    assert inputs.latent_size(832, 480) == (60, 104)
    assert inputs.latent_size(16, 16) == (2, 2)
    with pytest.raises(ValueError, match=r"width must be a multiple of 16 .* got 850 \(e.g. 848 or 864\)"):
        inputs.latent_size(850, 480)
    with pytest.raises(ValueError, match="height must be a multiple of 16"):
        inputs.latent_size(832, 0)
    with pytest.raises(ValueError, match="height must be a multiple of 16 between 16 and 4096"):
        inputs.latent_size(832, 8192)
    with pytest.raises(ValueError, match="whole number"):
        inputs.latent_size(832.0, 480)


@pytest.mark.parametrize("seconds, blocks, latent, frames", [
    (5.0, 7, 21, 81),  # Wan's usual 81 frames
    (1 / 16, 1, 3, 9),
    (1.0, 2, 6, 21),
    (10.0, 14, 42, 165),
    (60.0, 81, 243, 969),
])
def test_plan_length(seconds, blocks, latent, frames):
    plan = inputs.plan_length(seconds)
    assert (plan.blocks, plan.latent_frames, plan.frames) == (blocks, latent, frames)
    assert plan.blocks == core_timing.Timeline().blocks_for(seconds)
    assert plan.frames == core_timing.pixel_frames(latent)
    assert plan.actual_seconds >= seconds - 1 / 16  # never shorter than asked (to the frame)
    assert f"= {frames} frames" in plan.describe()


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), 3601.0, "5", True])
def test_plan_length_rejects(bad):
    with pytest.raises(ValueError, match="length must be"):
        inputs.plan_length(bad)


# ----------------------------------------------------------------------------- conditioning

def test_conditioning_tensor():
    t = torch.randn(1, 512, 4096)
    assert inputs.conditioning_tensor([[t, {"pooled_output": None}]]) is t
    with pytest.raises(ValueError, match="empty"):
        inputs.conditioning_tensor([])
    with pytest.raises(ValueError, match="2 entries .* one prompt"):
        inputs.conditioning_tensor([[t, {}], [t, {}]])
    with pytest.raises(ValueError, match=r"\[batch, tokens, width\]"):
        inputs.conditioning_tensor([[torch.randn(4096), {}]])


def test_prepare_text_pads_with_zeros():
    c = torch.randn(2, 20, 64)
    out, note = inputs.prepare_text(c, 64)
    assert note is None and out.shape == (2, 512, 64) and out.dtype == torch.float32
    assert torch.equal(out[:, :20], c) and not out[:, 20:].any()


def test_prepare_text_cuts_long_prompts_like_the_reference():
    c = torch.randn(1, 700, 64, dtype=torch.float16)
    out, note = inputs.prepare_text(c, 64)
    assert out.shape == (1, 512, 64) and torch.equal(out, c[:, :512].float())
    assert "700 tokens" in note and "512" in note


def test_prepare_text_exact_length_unchanged():
    c = torch.randn(1, 512, 64)
    out, note = inputs.prepare_text(c, 64)
    assert note is None and torch.equal(out, c)


def test_prepare_text_rejects_other_text_encoders():
    with pytest.raises(ValueError, match="use the umT5-XXL text encoder with type wan") as e:
        inputs.prepare_text(torch.randn(1, 77, 768), 4096)  # CLIP-L
    assert "768 wide" in str(e.value) and "4096" in str(e.value)


@pytest.mark.parametrize("cond, pattern", [
    (torch.zeros(1, 0, 64), "the conditioning has 0 text tokens: there is no prompt to condition on"),
    (torch.zeros(0, 20, 64), "batch 0"),
    (torch.full((1, 20, 64), float("nan")), "holds NaN or infinite values"),
    (torch.ones(1, 20, 64, dtype=torch.int64), "must be floating point, got int64"),
    (torch.ones(20, 64), r"must be a \[batch, tokens, width\] tensor, got \[20, 64\]"),
    ([[1.0]], r"must be a \[batch, tokens, width\] tensor, got list"),
])
def test_prepare_text_refuses_empty_and_broken_conditioning(cond, pattern):
    with pytest.raises(ValueError, match=pattern):
        inputs.prepare_text(cond, 64)


# ----------------------------------------------------------------------------- memory

@pytest.mark.parametrize("kw", [{}, {"update_mode": "fused"},
                                {"sink_blocks": 0, "capacity_frames": 12, "span_frames": 15},
                                {"steps": (1000, 500), "span_frames": 9, "capacity_frames": 9}])
@pytest.mark.parametrize("batch, grid", [(1, (4, 6)), (2, (3, 5))])
def test_kv_cache_bytes_match_the_core_allocation(kw, batch, grid):
    cfg = RollingConfig(**kw)
    layers, heads, head_dim = 3, 2, 8
    cache = core_cache.RollingKVCache(cfg, num_layers=layers, num_heads=heads, head_dim=head_dim, batch=batch,
                                      grid=grid, device="meta", dtype=torch.bfloat16)
    est = memory.kv_cache_bytes(cfg, num_layers=layers, dim=heads * head_dim, tokens_per_frame=grid[0] * grid[1],
                               batch=batch, dtype_bytes=2)
    assert est == cache.nbytes


def test_memory_estimate_reference_1_3b():
    cfg = RollingConfig()
    est = memory.estimate_memory(cfg, num_layers=30, dim=1536, ffn_dim=8960, latent_h=60, latent_w=104,
                                dtype_bytes=2, weight_bytes=2_840_000_000)
    # 30 layers x (24 stored + 21/30 scratch) frames x 1560 tokens x 1536 x K,V x bf16
    assert est.kv_cache == (2 * 30 * 24 * 1560 * 1536 + 2 * 21 * 1560 * 1536) * 2
    stored = 2 * 30 * 24 * 1560 * 1536 * 2
    assert 6.4 < stored / memory.GIB < 6.45  # the well-known ~6.4 GiB of K/V ...
    assert 6.6 < est.kv_cache / memory.GIB < 6.62  # ... plus the span-sized scratch buffer
    assert est.text == 2 * 30 * 512 * 1536 * 2
    assert 1.0 < est.activations / memory.GIB < 3.0
    assert est.vae == 0 and est.working == est.kv_cache + est.text + est.activations
    assert est.total == est.working + 2_840_000_000
    text = est.describe()
    assert "KV cache 6.61 GiB" in text and "weights 2.64 GiB" in text and "total about" in text


def test_memory_estimate_scales():
    cfg = RollingConfig(update_mode="reference")
    kw = dict(num_layers=30, dim=1536, ffn_dim=8960, dtype_bytes=2)
    base = memory.estimate_memory(cfg, latent_h=60, latent_w=104, **kw)
    fused = memory.estimate_memory(RollingConfig(update_mode="fused"), latent_h=60, latent_w=104, **kw)
    assert fused.kv_cache == base.kv_cache and fused.activations == base.activations * 18 // 15
    small = memory.estimate_memory(cfg, latent_h=30, latent_w=52, **kw)
    assert small.kv_cache * 4 == base.kv_cache
    fp32 = memory.estimate_memory(cfg, latent_h=60, latent_w=104, **{**kw, "dtype_bytes": 4})
    assert fp32.kv_cache == 2 * base.kv_cache
    b2 = memory.estimate_memory(cfg, latent_h=60, latent_w=104, batch=2, **kw)
    assert b2.kv_cache == 2 * base.kv_cache
    with_vae = memory.estimate_memory(cfg, latent_h=60, latent_w=104, vae=True, vae_weight_bytes=250_000_000, **kw)
    assert with_vae.vae > 0 and with_vae.weights == 250_000_000
    assert with_vae.working == base.kv_cache + base.text + max(base.activations, with_vae.vae)


def test_check_memory():
    est = memory.MemoryEstimate(weights=3 * memory.GIB, kv_cache=6 * memory.GIB, text=0, activations=2 * memory.GIB)
    memory.check_memory(est, 9 * memory.GIB, "cuda:0")
    with pytest.raises(memory.InsufficientMemoryError) as e:
        memory.check_memory(est, 4 * memory.GIB, "cuda:0")
    msg = str(e.value)
    assert "8.00 GiB on cuda:0" in msg and "KV cache 6.00 GiB" in msg and "only 4.00 GiB is free" in msg
    assert "lower the resolution" in msg
    with pytest.raises(memory.InsufficientMemoryError, match="in total"):
        memory.check_memory(est, 4 * memory.GIB, "cuda:0", after_weights=False)


def test_host_memory_check():
    assert memory.image_bytes(81, 832, 480) == 81 * 832 * 480 * 12
    memory.check_host_memory(81, 832, 480, 1, 10 * memory.GIB)
    with pytest.raises(memory.InsufficientMemoryError, match="969 frames of 832x480"):
        memory.check_host_memory(969, 832, 480, 1, memory.GIB)


def test_run_summary():
    plan = inputs.plan_length(5.0)
    text = inputs.run_summary(plan, RollingConfig(), 832, 480, 1, 7, "sdpa", torch.bfloat16)
    assert "832x480" in text and "81 frames" in text and "seed 7" in text and "bfloat16" in text
    assert "steps 1000,800,600,400,200" in text


def test_fmt_bytes():
    assert memory.fmt_bytes(1.5 * memory.GIB) == "1.50 GiB"
    assert memory.fmt_bytes(3 * 1024 ** 2) == "3.0 MiB"
    assert math.isclose(memory.GIB, 2 ** 30)
