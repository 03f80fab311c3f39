"""The node pack inside a real ComfyUI, in-process, on CPU with tiny random weights.

Needs a ComfyUI checkout in COMFYUI_PATH (skipped otherwise). The pack is loaded the way ComfyUI
loads custom nodes (``nodes.load_custom_node``); graphs run through ComfyUI's own validation
(``execution.validate_prompt``) and executor (``execution.PromptExecutor``). The text encoder and
the VAE are replaced by test nodes (a random prompt embedding, a random real Wan2.1 VAE).
"""
from __future__ import annotations

import gc
import time
import weakref

import numpy as np
import pytest
import torch

from scripts import workflow_source as W
from tests.comfyui import checkpoints as C
from tests.comfyui import env
from tests.comfyui.graphs import TINY_SAMPLER, canonical, ui_to_api, with_test_nodes

pytestmark = pytest.mark.comfy


def sampler(unique_id="6"):
    return env.prepared_node("RollingForcingSampler", unique_id)


def run_sampler(model, cond, vae=None, full=False, **kw):
    """(latent, images, info), or with ``full`` also the video output and the ui dict. By default
    ``TINY_SAMPLER``: 32x32, 1 s = 2 blocks = 6 latent frames = 21 frames, seed 3."""
    args = {**TINY_SAMPLER, **kw}
    with torch.inference_mode():
        out = sampler().execute(model, cond, args.pop("width"), args.pop("height"), args.pop("seconds"),
                                args.pop("seed"), vae=vae, **args)
    return (*out.result, out.ui) if full else out.result[:3]


# ----------------------------------------------------------------------------- loading and schema

def _listed(cu):
    return env.run_coro(cu["pack"].nodes.RollingForcingExtension().get_node_list())


def test_pack_loads_like_comfyui_loads_it(cu):
    import nodes

    assert hasattr(cu["pack"], "comfy_entrypoint")
    listed = [c.GET_SCHEMA().node_id for c in _listed(cu)]
    assert set(env.OUR_NODES) <= set(listed) and len(set(listed)) == len(listed)
    for name in listed:
        assert name in nodes.NODE_CLASS_MAPPINGS
        assert nodes.NODE_CLASS_MAPPINGS[name].RELATIVE_PYTHON_MODULE.startswith("custom_nodes.")


def check_schema(cls):
    schema = cls.GET_SCHEMA()
    name = schema.node_id
    assert name.startswith("RollingForcing"), name
    assert schema.category.startswith("RollingForcing/"), name
    assert schema.display_name and schema.display_name.startswith("Rolling Forcing"), name
    assert len(schema.description) > 40, name
    for inp in schema.inputs:
        assert inp.tooltip and len(inp.tooltip) > 15, f"{name}.{inp.id} has no tooltip"
    for out in schema.outputs:
        assert out.tooltip and len(out.tooltip) > 15, f"{name} output {out.display_name} has no tooltip"
    info = cls.GET_NODE_INFO_V1()  # what /object_info serves
    assert info["description"] == schema.description and info["category"] == schema.category
    for group in ("required", "optional"):
        for key, spec in info["input"].get(group, {}).items():
            assert len(spec) > 1 and spec[1].get("tooltip"), (name, key)
    assert all(info["output_tooltips"]), name


@pytest.mark.parametrize("name", env.OUR_NODES)
def test_schema_conventions(cu, name):
    check_schema(env.node_class(name))


def test_every_listed_node_follows_the_conventions(cu):
    for cls in _listed(cu):
        check_schema(cls)


def test_custom_cache_type_connects_only_to_the_sampler(cu):
    cache_out = env.node_class("RollingForcingCacheConfig").GET_NODE_INFO_V1()["output"]
    sampler_in = env.node_class("RollingForcingSampler").GET_NODE_INFO_V1()["input"]["optional"]["cache"]
    assert cache_out == ["ROLLING_FORCING_CACHE"] and sampler_in[0] == "ROLLING_FORCING_CACHE"


# ----------------------------------------------------------------------------- model loader

def test_loader_builds_comfyuis_own_wan_model(cu, model):
    import comfy.ldm.wan.model
    import comfy.model_patcher

    assert isinstance(model, comfy.model_patcher.ModelPatcher)
    assert type(model.model).__name__ == "WAN21"
    assert isinstance(model.model.diffusion_model, comfy.ldm.wan.model.WanModel)
    assert model.model_options["transformer_options"]["rolling_forcing"]["attention"] == "sdpa"
    ref = C.tiny_state_dict(0)
    got = model.model.diffusion_model.state_dict()
    assert set(ref) <= set(got)
    assert all(torch.equal(got[k], ref[k].to(got[k].dtype)) for k in ref)  # stored in the dtype ComfyUI chose


def test_loader_regular_weights_and_fp8(cu):
    loader = env.node_class("RollingForcingModelLoader")
    reg = loader.execute(W.MODEL_FILES["dit"]["name"], "regular", "default", "auto")[0]
    k = "blocks.0.self_attn.q.weight"
    got = reg.model.diffusion_model.state_dict()[k]
    assert torch.equal(got, (C.tiny_state_dict(0)[k] * 0.5).to(got.dtype))
    assert reg.model_options["transformer_options"]["rolling_forcing"]["attention"] == "auto"
    fp8 = loader.execute(W.MODEL_FILES["dit"]["name"], "ema", "fp8_e4m3fn", "auto")[0]
    assert fp8.model.diffusion_model.blocks[0].self_attn.q.weight.dtype == torch.float8_e4m3fn
    assert fp8.model.manual_cast_dtype is not None  # computation in a real float type


def test_fp8_weights_sample(cu, cond):
    fp8 = env.node_class("RollingForcingModelLoader").execute(W.MODEL_FILES["dit"]["name"], "ema", "fp8_e4m3fn",
                                                            "auto")[0]
    latent, _, info = run_sampler(fp8, cond, seconds=0.5)
    assert torch.isfinite(latent["samples"]).all()
    assert "compute float32" in info or "compute bfloat16" in info or "compute float16" in info


@pytest.mark.parametrize("writer, pattern", [(C.write_i2v_checkpoint, "image-to-video"),
                                             (C.write_non_wan_checkpoint, "not a Wan2.1 DiT checkpoint")])
def test_loader_refuses_other_checkpoints(cu, writer, pattern):
    d = cu["models"] / "diffusion_models"
    name = f"bad_{writer.__name__}.pt"
    writer(d / name)
    with pytest.raises(ValueError, match=pattern) as e:
        env.node_class("RollingForcingModelLoader").execute(name, "ema", "default", "auto")
    assert name in str(e.value)


# ----------------------------------------------------------------------------- sampler

def test_stock_load_diffusion_model_works_with_the_sampler(cu, model, cond):
    import nodes

    name = "rolling_forcing_converted.safetensors"
    C.write_safetensors_checkpoint(cu["models"] / "diffusion_models" / name)
    stock = nodes.UNETLoader().load_unet(name, "default")[0]
    a = run_sampler(stock, cond)[0]["samples"]
    b = run_sampler(model, cond)[0]["samples"]
    assert torch.equal(a, b)


def test_native_lora_loader_applies(cu, cond):
    """LoraLoaderModelOnly on our MODEL: the patch reaches the weights the sampler runs with."""
    import nodes
    from safetensors.torch import save_file

    loras = cu["models"] / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    cu["folder_paths"].add_model_folder_path("loras", str(loras))
    g = torch.Generator().manual_seed(5)
    up, down = torch.randn(256, 4, generator=g) * 0.05, torch.randn(4, 256, generator=g) * 0.05
    key = "diffusion_model.blocks.0.self_attn.q"
    save_file({f"{key}.lora_up.weight": up, f"{key}.lora_down.weight": down}, str(loras / "tiny_lora.safetensors"))
    load = env.node_class("RollingForcingModelLoader").execute
    base = load(W.MODEL_FILES["dit"]["name"], "ema", "default", "sdpa")[0]
    lora = nodes.LoraLoaderModelOnly().load_lora_model_only(base, "tiny_lora.safetensors", 1.0)[0]
    manual = load(W.MODEL_FILES["dit"]["name"], "ema", "default", "sdpa")[0]
    w = manual.model.diffusion_model.blocks[0].self_attn.q.weight
    # the patch as ComfyUI computes it: in its LoRA compute dtype (2026: fp16 where the device does fp16,
    # e.g. on the forced GPU path; else and before: float32), then stored in the weight's dtype
    import comfy.model_management as mm
    cd = mm.lora_compute_dtype(w.device) if hasattr(mm, "lora_compute_dtype") else torch.float32
    with torch.no_grad():
        w.copy_((w.to(cd) + (up @ down).to(cd)).to(w.dtype))
    with_lora = run_sampler(lora, cond, seconds=0.5)[0]["samples"]
    expected = run_sampler(manual, cond, seconds=0.5)[0]["samples"]
    plain = run_sampler(base, cond, seconds=0.5)[0]["samples"]
    assert torch.allclose(with_lora, expected, atol=1e-5, rtol=1e-5)
    assert (with_lora - plain).abs().max() > 1e-3


def test_latent_convention_and_streamed_decode(cu, model, vae, cond, progress):
    import comfy.latent_formats
    import comfy.model_management as mm

    pack = cu["pack"]
    t0 = time.perf_counter()
    latent, images, info = run_sampler(model, cond, vae=vae)
    elapsed = time.perf_counter() - t0
    x = latent["samples"]
    # ComfyUI's Wan21 LATENT: raw VAE space [1, 16, T, H/8, W/8], float32, on the intermediate device
    assert x.shape == (1, 16, 6, 4, 4) and x.dtype == torch.float32 and x.device == mm.intermediate_device()
    core = pack.rolling.sampler.RollingSampler(model.model.diffusion_model, pack.rolling.config.RollingConfig(),
                                               height=4, width=4, device="cpu", dtype=env.compute_dtype(model),
                                               seed=3)
    with torch.inference_mode():
        normalised = core.generate(cond[0][0], 2)
    assert torch.equal(x, comfy.latent_formats.Wan21().process_out(normalised.float()))
    # IMAGE [N, H, W, 3] in 0..1; streamed block-by-block decode == VAE.decode of the whole LATENT
    assert images.shape == (21, 32, 32, 3) and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1
    with torch.inference_mode():
        oneshot = vae.decode(x)
    oneshot = oneshot.reshape(-1, *oneshot.shape[-3:])
    diff = (oneshot - images).abs().max().item()
    print(f"\nstreamed vs one-shot decode: max |diff| = {diff:g}; sampler node {elapsed:.2f} s")
    assert diff == 0.0
    # progress: one update per block, each with the newest decoded frame as preview
    assert [(v, t) for v, t, _, _ in progress] == [(1, 2), (2, 2)]
    for _, _, preview, node_id in progress:
        assert preview[0] == "JPEG" and preview[1].size == (32, 32) and node_id == "6"
    assert "21 frames" in info and "2 block(s)" in info and "KV cache" in info


def test_without_vae_latent_only_and_image_output_blocked(cu, model, cond, progress, monkeypatch):
    from comfy_execution.graph_utils import ExecutionBlocker

    caches = _track(monkeypatch, cu["pack"].rolling.cache.RollingKVCache)
    latent, images, info = run_sampler(model, cond)
    gc.collect()
    assert len(caches) == 1 and caches[0]() is None  # the KV cache lives only for the run
    assert latent["samples"].shape == (1, 16, 6, 4, 4)
    assert isinstance(images, ExecutionBlocker) and "needs a VAE" in images.message
    assert len(progress) == 2 and progress[-1][2][1].size == (32, 32)  # latent-to-RGB preview


def test_batch_of_prompts(cu, model, vae):
    cond = [[torch.randn(2, 512, 4096), {"pooled_output": None}]]
    latent, images, _ = run_sampler(model, cond, vae=vae, seconds=0.5, width=16, height=16)
    assert latent["samples"].shape == (2, 16, 3, 2, 2) and images.shape == (18, 16, 16, 3)
    with torch.inference_mode():
        oneshot = vae.decode(latent["samples"])
    assert torch.equal(oneshot.reshape(-1, 16, 16, 3), images)  # video 0's 9 frames, then video 1's


def test_image_output_without_vae_blocks_only_its_users(cu):
    """In a graph: the LATENT is produced; Create Video on the IMAGE output is blocked with our message."""
    api = with_test_nodes(W.api_graph())
    del api["4"], api["6"]["inputs"]["vae"]
    api["6"]["inputs"]["seconds"] = 0.5
    ex, _, srv = env.run_prompt(api)
    errors = [d for e, d in srv.messages if e == "execution_error"]
    assert errors and "needs a VAE" in errors[0]["exception_message"] and errors[0]["node_id"] == "7"
    assert "6" in ex.history_result["outputs"] and "8" not in ex.history_result["outputs"]


def test_wrong_text_encoder_is_a_clear_error(cu, model):
    cond = [[torch.randn(1, 77, 768), {"pooled_output": torch.randn(1, 768)}]]  # CLIP-L
    with pytest.raises(ValueError, match="use the umT5-XXL text encoder with type wan"):
        run_sampler(model, cond)


def test_wrong_vae_is_a_clear_error(cu, model, cond):
    class NotWan:
        first_stage_model = torch.nn.Linear(1, 1)
        latent_channels = 4

    with pytest.raises(ValueError, match="wan_2.1_vae.safetensors"):
        run_sampler(model, cond, vae=NotWan())


def test_memory_check_fails_before_sampling(cu, model, cond, monkeypatch):
    import comfy.model_management as mm

    pack = cu["pack"]
    created = []
    monkeypatch.setattr(pack.rolling.sampler.RollingSampler, "_new_cache",
                        lambda self: created.append(1) or pytest.fail("cache allocated"))
    monkeypatch.setattr(mm, "get_free_memory", lambda *a, **k: 1024)
    with pytest.raises(pack.nodes.memory.InsufficientMemoryError, match="lower the resolution"):
        run_sampler(model, cond)
    assert not created


# ----------------------------------------------------------------------------- interruption

def _track(monkeypatch, cls):
    refs = []
    init = cls.__init__

    def wrapped(self, *a, **k):
        init(self, *a, **k)
        refs.append(weakref.ref(self))

    monkeypatch.setattr(cls, "__init__", wrapped)
    return refs


@pytest.mark.parametrize("with_vae", [False, True])
@pytest.mark.parametrize("when", ["after_first_block", "inside_first_window"])
def test_interrupt_stops_quickly_and_frees_everything(cu, model, vae, cond, progress, monkeypatch, with_vae, when):
    import comfy.model_management as mm
    import comfy.utils

    pack = cu["pack"]
    caches = _track(monkeypatch, pack.rolling.cache.RollingKVCache)
    texts = _track(monkeypatch, pack.rolling.forward.TextContext)
    decoders = _track(monkeypatch, pack.nodes.stream_decode.StreamingVAEDecoder)
    calls = {"forwards": 0, "after_flag": 0}
    orig_forward = pack.rolling.sampler.forward

    def counting_forward(*a, **k):
        if mm.processing_interrupted():
            calls["after_flag"] += 1
        calls["forwards"] += 1
        out = orig_forward(*a, **k)
        if when == "inside_first_window" and calls["forwards"] == 2:
            mm.interrupt_current_processing(True)  # "Cancel" pressed while the 2nd forward runs
        return out

    monkeypatch.setattr(pack.rolling.sampler, "forward", counting_forward)

    def hook(v, t, p, node_id=None, **kw):
        progress.append((v, t, p, node_id))
        if when == "after_first_block" and v == 1:
            mm.interrupt_current_processing(True)  # "Cancel" pressed after the first block

    comfy.utils.set_progress_bar_global_hook(hook)
    t0 = time.perf_counter()
    with pytest.raises(mm.InterruptProcessingException) as exc:
        run_sampler(model, cond, vae=vae if with_vae else None, seconds=3.0)  # 4 blocks
    took = time.perf_counter() - t0
    # stopped before the next block (or, mid-block, before the next DiT forward)
    assert [v for v, *_ in progress] == ([1] if when == "after_first_block" else [])
    assert calls["after_flag"] == 0, "a DiT forward ran after the interrupt flag was set"
    assert not mm.processing_interrupted()  # the flag was consumed by the exception
    gc.collect()
    assert caches and all(r() is None for r in caches), "KV cache still alive after the interruption"
    assert texts and all(r() is None for r in texts)
    if with_vae:
        assert decoders and all(r() is None or r()._feat_map is None for r in decoders)
    assert exc.value is not None  # the exception (and its traceback) is still alive here
    print(f"\ninterrupted {when}: {calls['forwards']} forwards, {took:.2f} s")


# ----------------------------------------------------------------------------- validation

def _api(**sampler_inputs):
    api = W.api_graph()
    api["6"]["inputs"].update(sampler_inputs)
    return api


@pytest.mark.parametrize("change, pattern", [
    ({"width": 850}, "width must be a multiple of 16"),
    ({"seconds": 0.0}, "length must be more than 0"),
    ({"steps": "1000,abc"}, "could not read the step list"),
])
def test_prompt_validation_reports_bad_sampler_values(cu, change, pattern):
    ok, err, _, node_errors = env.validate(_api(**change))
    assert not ok
    details = " ".join(e["details"] for e in node_errors["6"]["errors"])
    assert pattern in details


def test_prompt_validation_reports_bad_cache_values(cu):
    api = W.api_graph()
    api["5"]["inputs"]["capacity_frames"] = 20
    ok, _, _, node_errors = env.validate(api)
    assert not ok and "multiple of frames_per_block" in node_errors["5"]["errors"][0]["details"]


@pytest.mark.parametrize("name, variant", list(W.WORKFLOW_FILES.items()))
def test_shipped_workflows_validate(cu, name, variant):
    api = ui_to_api(W.load_workflow(name), env.node_info)
    assert canonical(api, env.node_info) == canonical(W.api_graph(variant), env.node_info)
    ok, err, outputs, node_errors = env.validate(api)
    assert ok, (err, node_errors)
    assert outputs == [W.output_node(variant)]


# ----------------------------------------------------------------------------- end to end

def _video_file(cu, ui_out):
    entry = ui_out["images"][0]
    return cu["out"] / entry["subfolder"] / entry["filename"]


def test_t2v_workflow_runs_end_to_end(cu):
    import av

    api = with_test_nodes(ui_to_api(W.load_workflow("rolling_forcing_t2v.json"), env.node_info))
    t0 = time.perf_counter()
    ex, valid, srv = env.run_prompt(api)
    took = time.perf_counter() - t0
    events = [e for e, _ in srv.messages]
    assert ex.success and "execution_success" in events, srv.messages[-3:]
    out = ex.history_result["outputs"]
    path = _video_file(cu, out["8"])
    assert path.suffix == ".mp4" and path.stat().st_size > 0
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        assert (s.codec_context.width, s.codec_context.height) == (32, 32)
        assert s.average_rate == 16
    assert len(frames) == 21
    assert "21 frames" in out["6"]["text"][0]
    print(f"\nt2v graph end to end (tiny, CPU): {took:.2f} s -> {path.name}, {len(frames)} frames")


def test_upscale_workflow_runs_end_to_end(cu):
    import av

    api = with_test_nodes(ui_to_api(W.load_workflow("rolling_forcing_upscale.json"), env.node_info))
    ex, valid, srv = env.run_prompt(api)
    assert ex.success, srv.messages[-3:]
    path = _video_file(cu, ex.history_result["outputs"]["8"])
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        assert (s.codec_context.width, s.codec_context.height) == (48, 48)
        assert sum(1 for _ in c.decode(video=0)) == 21


def test_long_stream_workflow_runs_end_to_end(cu):
    """The long-stream graph (tiny, 15 s): the file holds every frame; RAM keeps only the last 5 s."""

    from rolling.video import probe_frame_count
    api = with_test_nodes(ui_to_api(W.load_workflow("rolling_forcing_long_stream.json"), env.node_info))
    api["6"]["inputs"].update(seconds=15.0)  # 21 blocks = 63 latent frames = 249 frames
    ex, valid, srv = env.run_prompt(api)
    assert ex.success, srv.messages[-3:]
    out = ex.history_result["outputs"]
    path = _video_file(cu, out["6"])
    assert path.name.startswith("rolling_forcing_long_") and probe_frame_count(str(path)) == 249
    tail = _video_file(cu, out["8"])
    assert tail.name.startswith("rolling_forcing_long_tail") and probe_frame_count(str(tail)) == 84
    print(f"\nlong stream (tiny, 15 s): {path.name} 249 frames, tail {tail.name} 84 frames")


def test_prompt_story_workflow_runs_end_to_end(cu):
    """The story graph with a stand-in text encoder: three timed prompts, 12 s, a playable video."""
    from rolling.video import probe_frame_count
    api = ui_to_api(W.load_workflow("rolling_forcing_prompt_story.json"), env.node_info)
    api["2"] = {"class_type": "RFTestClip", "inputs": {}}
    api["4"] = {"class_type": "RFTestRandomWanVAE", "inputs": {"seed": 0}}
    api["6"]["inputs"].update(width=TINY_SAMPLER["width"], height=TINY_SAMPLER["height"],
                              seed=TINY_SAMPLER["seed"])
    ex, valid, srv = env.run_prompt(api)
    assert ex.success, srv.messages[-3:]
    out = ex.history_result["outputs"]
    assert probe_frame_count(str(_video_file(cu, out["8"]))) == 201  # 12 s -> 17 blocks -> 201 frames
    info = out["6"]["text"][0]
    assert "0:04.31 (block 6, blend over 2 block(s))" in info and "0:08.06 (block 11" in info


def test_toy_workflow_runs_end_to_end_and_shows_its_caption(cu):
    """The shipped toy graph exactly as a user opens it (real toy weights, no stand-ins, 10 s): a 16 fps
    64x64 MP4 whose frames show the caption's colour on its background."""
    import av

    from rolling.toy import detect
    ex, valid, srv = env.run_prompt(ui_to_api(W.load_workflow("rolling_forcing_toy.json"), env.node_info))
    assert ex.success, srv.messages[-3:]
    out = ex.history_result["outputs"]
    with av.open(str(_video_file(cu, out["8"]))) as c:
        s = c.streams.video[0]
        assert (s.codec_context.width, s.codec_context.height) == (64, 64) and s.average_rate == 16
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 165  # 10 s -> 14 blocks = 42 latent frames = 165 frames
    score = detect.score(np.stack(frames), W.TOY_CAPTION)
    assert score["background"] >= 0.9 and score["found"] >= 0.8 and score["colour"] >= 0.6, score


def test_extend_from_a_latent(cu, model, cond):
    """A LATENT continues: 2 given blocks, then 2 new ones; equal to the core's prefix run."""
    import comfy.latent_formats

    pack = cu["pack"]
    first = run_sampler(model, cond, seconds=1.0)[0]  # 2 blocks = 6 latent frames
    latent, _, info = run_sampler(model, cond, seconds=1.0, extend_from=first)
    assert latent["samples"].shape[2] == 6
    core = pack.rolling.sampler.RollingSampler(model.model.diffusion_model, pack.rolling.config.RollingConfig(),
                                               height=4, width=4, device="cpu", dtype=env.compute_dtype(model),
                                               seed=3)
    fmt = comfy.latent_formats.Wan21()
    with torch.inference_mode():
        ref = core.generate(cond[0][0], 4, prefix=fmt.process_in(first["samples"]))
    assert torch.allclose(latent["samples"], fmt.process_out(ref.float()), atol=1e-5)
    with pytest.raises(ValueError, match="same width/height"):
        run_sampler(model, cond, seconds=1.0, width=64, extend_from=first)


# ----------------------------------------------------------------------------- prompt schedules

def test_prompt_segments_switch_where_asked(cu, model, cond, progress):
    """A two-segment schedule: blocks before the switch's first window equal a single-prompt run."""
    other = env.node_class("RFTestPromptEmbedding")().run(7, 12, 4096)[0]
    seg = env.node_class("RollingForcingPromptSegment")
    first = seg.execute(cond, "0:00", "cut", 2.0, "none", "street")[0]
    both = seg.execute(other, "0:05", "cut", 2.0, "keep_sink", "rain", previous=first)[0]
    kw = dict(seconds=8.0)
    single = run_sampler(model, cond, **kw)[0]["samples"]
    progress.clear()
    out = run_sampler(model, both, **kw)
    sched = out[0]["samples"]
    # 0:05 -> block 7 (starts at 5.06 s); windows 0..6 finish blocks 0..2 untouched
    assert torch.equal(sched[:, :, :9], single[:, :, :9])
    assert not torch.allclose(sched[:, :, 24:], single[:, :, 24:])
    assert "block 7, cut, recache keep_sink) rain" in out[2]
    # previews carry the segment's name: the top-left corner is the label box, unlike the plain run's
    labelled = [p for v, t, p, _ in progress if t == 11]
    assert len(labelled) == 11 and labelled[0][1].getpixel((0, 0)) == (0, 0, 0)


def test_prompt_story_node_encodes_each_line(cu):
    calls = []

    class FakeClip:
        def tokenize(self, text):
            calls.append(text)
            return text

        def encode_from_tokens_scheduled(self, tokens):
            return [[torch.full((1, 5, 4096), float(len(tokens))), {"pooled_output": None}]]

    story = env.node_class("RollingForcingPromptStory")
    pl = story.execute(FakeClip(), "0:00 a street\n# note\n0:20 rain starts", "blend", 1.5, "none")[0]
    assert calls == ["a street", "rain starts"]
    assert [s.start_s for s in pl.segments] == [0.0, 20.0] and pl.segments[1].transition == "blend"
    assert story.validate_inputs(text="0:10 late start") != True  # noqa: E712


# ----------------------------------------------------------------------------- streaming to disk

def test_stream_to_disk_writes_playable_file_with_bounded_outputs(cu, model, vae, cond, tmp_path, monkeypatch):
    import folder_paths

    from rolling.video import probe_frame_count
    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(tmp_path))
    full = run_sampler(model, cond, vae=vae, seconds=3.0)  # 5 blocks = 15 latent frames = 57 frames
    latent, images, info, video, shown = run_sampler(model, cond, vae=vae, seconds=3.0, full=True,
                                                     stream_to_disk=True, filename_prefix="video/rf_test",
                                                     keep_seconds=1.0)
    files = sorted((tmp_path / "video").glob("rf_test_*.mp4"))
    assert len(files) == 1 and probe_frame_count(str(files[0])) == 57
    # bounded outputs: the last 2 blocks (1 s -> 2 blocks) = 6 latent frames = 24 frames
    assert latent["samples"].shape[2] == 6 and images.shape[0] == 24
    assert torch.equal(latent["samples"], full[0]["samples"][:, :, -6:])
    assert torch.equal(images, full[1][-24:])
    assert video.get_components().images.shape[0] == 57
    assert shown.as_dict()["images"][0]["filename"] == files[0].name
    with pytest.raises(ValueError, match="stream_to_disk needs a VAE"):
        run_sampler(model, cond, seconds=1.0, stream_to_disk=True)


def test_cancel_while_streaming_leaves_playable_file(cu, model, vae, cond, tmp_path, monkeypatch):
    import comfy.model_management as mm
    import comfy.utils
    import folder_paths

    from rolling.video import probe_frame_count
    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(tmp_path))
    old = comfy.utils.PROGRESS_BAR_HOOK

    def hook(v, t, p, node_id=None, **kw):
        if v == 3:
            mm.interrupt_current_processing(True)
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            run_sampler(model, cond, vae=vae, seconds=6.0, stream_to_disk=True, filename_prefix="video/rf_cancel")
    finally:
        comfy.utils.set_progress_bar_global_hook(old)
        mm.interrupt_current_processing(False)
    files = sorted((tmp_path / "video").glob("rf_cancel_*.mp4"))
    assert len(files) == 1
    assert probe_frame_count(str(files[0])) >= 9 + 12 + 12  # the 3 blocks finished before Cancel


# ----------------------------------------------------------------------------- other MODEL sources and reloads

def test_core_causal_wan_model_samples_like_wan_model(cu, model, cond):
    """ComfyUI's own causal AR Wan (CausalWanModel, 2026; picked from a checkpoint's metadata) has the same
    module tree: the sampler runs on it, through the stock Load Diffusion Model, with identical results."""
    import json

    import nodes

    try:
        import comfy.ldm.wan.ar_model as ar
    except ImportError:
        pytest.skip("this ComfyUI has no causal AR Wan model (comfy.ldm.wan.ar_model, added in 2026)")
    name = "rolling_forcing_causal_ar.safetensors"
    meta = {"config": json.dumps({"transformer": {"causal_ar": True}})}
    C.write_safetensors_checkpoint(cu["models"] / "diffusion_models" / name, metadata=meta)
    causal = nodes.UNETLoader().load_unet(name, "default")[0]
    assert isinstance(causal.model.diffusion_model, ar.CausalWanModel)
    assert torch.equal(run_sampler(causal, cond)[0]["samples"], run_sampler(model, cond)[0]["samples"])


def test_loader_tells_comfyui_how_to_reload(cu, model):
    """2026 ComfyUI reloads a MODEL through ``cached_patcher_init`` to make non-dynamic or per-GPU copies."""
    if not hasattr(model, "cached_patcher_init"):
        pytest.skip("this ComfyUI has no cached_patcher_init (added in 2026)")
    fn, args = model.cached_patcher_init
    again = fn(*args, disable_dynamic=True)
    ref, got = model.model.diffusion_model.state_dict(), again.model.diffusion_model.state_dict()
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert again.model_options["transformer_options"]["rolling_forcing"]["attention"] == "sdpa"
