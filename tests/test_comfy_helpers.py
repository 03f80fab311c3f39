"""Shared helpers for the tests that need a real ComfyUI checkout (``tests/test_comfy_*.py``).

No tests live here (pytest collects nothing from this module). It provides:

* ``comfyui()``: puts ``$COMFYUI_PATH`` first on ``sys.path``, sets ``--cpu`` and loads this pack
  the way ComfyUI does (``nodes.load_custom_node``), plus core's video nodes and the test-only
  injection pack (``INJECT_PACK``: a random prompt embedding and a random real Wan2.1 VAE, so no
  text encoder or VAE download is needed);
* tiny Wan2.1 DiT checkpoints in the release ``.pt`` layout (what ComfyUI's Wan detection accepts:
  dim a multiple of 128, freq_dim 256, text_dim 4096);
* the API graphs of the shipped workflows, a UI -> API converter (used when no browser is
  available, and checked against the real frontend when one is), and the model download list;
* ``ComfyServer``: a real ComfyUI server subprocess with this pack in a temporary custom_nodes
  folder (``--extra-model-paths-config``), and the headless-Chromium frontend driver.

``python tests/test_comfy_helpers.py --regenerate-workflows`` rebuilds ``workflows/*.json`` (and their
``.jpg`` template thumbnails) from the API graphs with the real frontend (needs COMFYUI_PATH,
chromium and playwright).
"""
from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
PACK_DIR_NAME = "rolling-forcing"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]

OUR_NODES = ("RollingForcingModelLoader", "RollingForcingCacheConfig", "RollingForcingSampler",
             "RollingForcingPromptStory", "RollingForcingPromptSegment")

# tiny Wan2.1 DiT that ComfyUI's detection accepts (num_heads = dim // 128)
TINY_WAN = dict(dim=256, ffn_dim=512, num_heads=2, num_layers=2, freq_dim=256, text_dim=4096)

MODEL_FILES = {
    "clip": {"name": "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "directory": "text_encoders",
             "url": "https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files/"
                    "text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors"},
    "vae": {"name": "wan_2.1_vae.safetensors", "directory": "vae",
            "url": "https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files/vae/"
                   "wan_2.1_vae.safetensors"},
    "dit": {"name": "rolling_forcing_dmd.pt", "directory": "diffusion_models",
            "url": "https://huggingface.co/TencentARC/RollingForcing/resolve/main/checkpoints/rolling_forcing_dmd.pt"},
}
LOADER_MODELS = {"CLIPLoader": "clip", "VAELoader": "vae", "RollingForcingModelLoader": "dit"}

PROMPT = ("A red fox trotting through fresh snow in a sunlit birch forest, its breath visible in the cold air, "
          "cinematic tracking shot, soft golden morning light, shallow depth of field")

NOTE_UPSCALE = (
    "\n\nUpscale: Upscale Image By scales the frames 1.5x (832x480 -> 1248x720, lanczos) before saving; for "
    "sharper results swap it for Load Upscale Model + Upscale Image (using Model).")

NOTE_TEXT = (
    "Rolling Forcing text-to-video (Wan2.1-T2V-1.3B, 16 fps).\n\n"
    "Models (the loaders offer the downloads when a file is missing):\n"
    "- models/diffusion_models/rolling_forcing_dmd.pt (TencentARC/RollingForcing)\n"
    "- models/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors (Comfy-Org/Wan_2.1_ComfyUI_repackaged)\n"
    "- models/vae/wan_2.1_vae.safetensors (Comfy-Org/Wan_2.1_ComfyUI_repackaged)\n\n"
    "Set the length in seconds on the sampler: it is rounded up to whole blocks of 12 frames and the node's "
    "info output says the exact frame count. Frames are decoded block by block while sampling (the preview "
    "shows the newest frame). Memory stays flat however long the video; the IMAGE batch grows by ~4.6 MB per "
    "832x480 frame, so for very long videos lower the length or the resolution.")


def comfyui_path() -> str | None:
    p = os.environ.get("COMFYUI_PATH")
    if p and os.path.isfile(os.path.join(p, "main.py")) and os.path.isdir(os.path.join(p, "comfy")):
        return os.path.abspath(p)
    return None


def require_comfyui() -> str:
    import pytest

    p = comfyui_path()
    if p is None:
        if os.environ.get("COMFYUI_PATH"):
            pytest.skip(f"COMFYUI_PATH={os.environ['COMFYUI_PATH']} is not a ComfyUI checkout (main.py, comfy/ "
                        "missing); these tests need a real ComfyUI")
        pytest.skip("COMFYUI_PATH not set: these tests need a ComfyUI checkout (see scripts/setup_comfyui.sh)")
    return p


# ----------------------------------------------------------------------------- test-only injection pack

INJECT_PACK = r'''
"""Test-only nodes: a random prompt embedding (instead of umT5-XXL) and a random real Wan2.1 VAE."""
import math

import torch

import comfy.sd


class RFTestPromptEmbedding:
    """CONDITIONING like CLIPTextEncode with the wan text encoder: [1, 512, width], padding zeroed."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 1}), "tokens": ("INT", {"default": 12, "min": 1}),
                             "width": ("INT", {"default": 4096, "min": 1})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "run"
    CATEGORY = "testing"

    def run(self, seed, tokens, width):
        g = torch.Generator().manual_seed(seed)
        c = torch.zeros(1, 512, width)
        c[:, :tokens] = torch.randn(1, tokens, width, generator=g)
        return ([[c, {"pooled_output": None}]],)


def random_wan_vae_state_dict(seed=0):
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


_VAES = {}


class RFTestRandomWanVAE:
    """A real comfy.sd.VAE (Wan2.1 architecture) with seeded random weights."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0})}}

    RETURN_TYPES = ("VAE",)
    FUNCTION = "run"
    CATEGORY = "testing"

    def run(self, seed):
        if seed not in _VAES:
            _VAES[seed] = comfy.sd.VAE(sd=random_wan_vae_state_dict(seed))
        return (_VAES[seed],)


class _FakeWanClip:
    """Stands in for the umT5-XXL CLIP object: each prompt text -> a seeded random [1, 512, 4096] embedding."""

    def tokenize(self, text):
        return text

    def encode_from_tokens_scheduled(self, tokens):
        g = torch.Generator().manual_seed(sum(map(ord, tokens)))
        c = torch.zeros(1, 512, 4096)
        c[:, :12] = torch.randn(1, 12, 4096, generator=g)
        return [[c, {"pooled_output": None}]]


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
                       "RFTestClip": RFTestClip}
'''


def write_inject_pack(directory: Path) -> Path:
    path = Path(directory) / "rf_test_inject.py"
    path.write_text(INJECT_PACK)
    return path


# ----------------------------------------------------------------------------- tiny checkpoints

def tiny_state_dict(seed: int = 0) -> dict:
    if str(ROOT) not in sys.path:  # run as a script; appended so ComfyUI's `nodes` keeps precedence
        sys.path.append(str(ROOT))
    from rolling.config import WanConfig
    from rolling.model import build_model

    return {k: v.clone() for k, v in build_model(WanConfig(**TINY_WAN), seed=seed).state_dict().items()}


def write_release_checkpoint(path: Path, seed: int = 0) -> Path:
    """The release .pt layout: {"generator_ema": {"model." + key: ...}, "generator": {...}}."""
    import torch

    sd = tiny_state_dict(seed)
    torch.save({"generator_ema": {"model." + k: v for k, v in sd.items()},
                "generator": {"model." + k: v * 0.5 for k, v in sd.items()}}, path)
    return path


def write_safetensors_checkpoint(path: Path, seed: int = 0) -> Path:
    """Bare Wan2.1 keys in .safetensors: what ComfyUI's stock Load Diffusion Model reads."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tiny_state_dict(seed).items()}, str(path))
    return path


def write_i2v_checkpoint(path: Path) -> Path:
    import torch

    sd = tiny_state_dict(0)
    sd["img_emb.proj.0.weight"] = torch.ones(1280)
    sd["img_emb.proj.0.bias"] = torch.zeros(1280)
    torch.save({"generator_ema": {"model." + k: v for k, v in sd.items()}}, path)
    return path


def write_non_wan_checkpoint(path: Path) -> Path:
    import torch

    torch.save({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
                               "model.diffusion_model.out.2.weight": torch.zeros(4, 4, 3, 3)}}, path)
    return path


def model_folders(base: Path) -> dict[str, Path]:
    """diffusion_models / text_encoders / vae folders with the workflow's files: the DiT is a real
    tiny checkpoint, the text encoder and VAE names are empty placeholders (only listed)."""
    dirs = {}
    for kind in ("dit", "clip", "vae"):
        d = Path(base) / MODEL_FILES[kind]["directory"]
        d.mkdir(parents=True, exist_ok=True)
        dirs[MODEL_FILES[kind]["directory"]] = d
    write_release_checkpoint(dirs["diffusion_models"] / MODEL_FILES["dit"]["name"])
    for kind in ("clip", "vae"):
        (dirs[MODEL_FILES[kind]["directory"]] / MODEL_FILES[kind]["name"]).write_bytes(b"")
    return dirs


# ----------------------------------------------------------------------------- in-process ComfyUI

_STATE: dict = {}


def run_coro(coro):
    """Run a coroutine to completion, also when this thread already runs an event loop (playwright)."""
    import concurrent.futures

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def validate(prompt: dict):
    """ComfyUI's own prompt validation: (ok, error, outputs, node_errors)."""
    comfyui()
    import execution

    return run_coro(execution.validate_prompt("test", prompt, None))


def comfyui():
    """Import ComfyUI in-process (``--cpu``) and load this pack as ComfyUI does. Returns a namespace
    dict: ``nodes`` (ComfyUI's nodes module), ``pack`` (our package module), ``logic``, ``tmp``."""
    if _STATE:
        return _STATE
    path = require_comfyui()
    # ComfyUI's `nodes` module must win over this repository's `nodes/` package
    while path in sys.path:
        sys.path.remove(path)
    sys.path.insert(0, path)
    mod = sys.modules.get("nodes")
    if mod is not None and not str(getattr(mod, "__file__", "")).startswith(path):
        del sys.modules["nodes"]
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401  (after --cpu)
    import folder_paths
    import nodes

    tmp = Path(tempfile.mkdtemp(prefix="rf_comfy_"))
    atexit.register(shutil.rmtree, tmp, True)
    for kind, d in model_folders(tmp / "models").items():
        folder_paths.add_model_folder_path(kind, str(d))
    out = tmp / "output"
    out.mkdir()
    folder_paths.set_output_directory(str(out))
    folder_paths.set_temp_directory(str(tmp / "temp"))

    async def load():
        ok = await nodes.load_custom_node(str(ROOT), module_parent="custom_nodes")
        ok_video = await nodes.load_custom_node(os.path.join(path, "comfy_extras", "nodes_video.py"),
                                                module_parent="comfy_extras")
        inject = write_inject_pack(tmp)
        ok_inject = await nodes.load_custom_node(str(inject), module_parent="custom_nodes")
        return ok, ok_video, ok_inject

    ok, ok_video, ok_inject = run_coro(load())
    if not ok:
        raise RuntimeError("ComfyUI could not load the Rolling Forcing pack (see the log above)")
    assert ok_video and ok_inject
    pack_name = str(ROOT).replace(".", "_x_")
    pack = sys.modules[pack_name]
    _STATE.update(nodes=nodes, pack=pack, logic=sys.modules[pack_name + ".nodes.logic"], tmp=tmp, out=out,
                  comfy_path=path, folder_paths=folder_paths)
    return _STATE


def node_class(name: str):
    return comfyui()["nodes"].NODE_CLASS_MAPPINGS[name]


def prepared_node(name: str, unique_id: str):
    """The node class as ComfyUI's executor prepares it (hidden inputs filled in). ComfyUI 0.3.x takes the
    hidden inputs themselves, 0.33+ a ``V3Data`` dict holding them under ``hidden_inputs``."""
    import inspect

    from comfy_api.latest import io

    cls = node_class(name)
    hidden = {io.Hidden.unique_id: unique_id}
    if "v3_data" in inspect.signature(cls.PREPARE_CLASS_CLONE).parameters:
        hidden = {"hidden_inputs": hidden}
    return cls.PREPARE_CLASS_CLONE(hidden)


def node_info(name: str) -> dict:
    """The /object_info entry of a node (V1 JSON shape: input, input_order, output, ...), in-process."""
    cls = node_class(name)
    if hasattr(cls, "GET_NODE_INFO_V1"):  # V3 nodes
        return cls.GET_NODE_INFO_V1()
    inputs = cls.INPUT_TYPES()  # V1 nodes, as server.PromptServer.node_info presents them
    return {"input": inputs, "input_order": {k: list(v.keys()) for k, v in inputs.items()},
            "output": list(cls.RETURN_TYPES), "name": name,
            "display_name": comfyui()["nodes"].NODE_DISPLAY_NAME_MAPPINGS.get(name, name)}


def random_wan_vae_state_dict(seed: int = 0) -> dict:
    """The seeded random Wan2.1 VAE weights of the injection pack (a real architecture, no download)."""
    cls = node_class("RFTestRandomWanVAE")
    return sys.modules[cls.__module__].random_wan_vae_state_dict(seed)


GPU_FLAVOURS = {  # (bf16 supported, fp16 supported), as ComfyUI's should_use_bf16 / should_use_fp16 answer
    "ampere": (True, True),  # RTX 30xx and newer, A100, H100: ComfyUI picks fp16 first for Wan, bf16 on request
    "turing": (False, True),  # RTX 20xx, T4: no bf16
    "bf16_only": (True, False),  # where fp16 is ruled out: everything that is not fp32 runs in bf16
}


def force_gpu_dtype_path(monkeypatch, flavour: str) -> None:
    """Make ComfyUI choose dtypes as on a CUDA GPU of that flavour (see GPU_FLAVOURS). Affects the
    models and VAEs loaded afterwards."""
    import comfy.model_management as mm

    if flavour not in GPU_FLAVOURS:
        raise ValueError(f"flavour must be one of {', '.join(GPU_FLAVOURS)}, got {flavour!r}")
    bf16, fp16 = GPU_FLAVOURS[flavour]
    monkeypatch.setattr(mm, "should_use_bf16", lambda *a, **k: bf16)
    monkeypatch.setattr(mm, "should_use_fp16", lambda *a, **k: fp16)


def force_lowvram(monkeypatch, fraction: float) -> None:
    """ComfyUI's low-VRAM partial load for diffusion models: only ``fraction`` of the weights resident,
    the other layers cast (and moved) at use by comfy.ops. On a CPU ComfyUI never does this by itself."""
    import comfy.model_management as mm

    orig = mm.LoadedModel.model_load

    def model_load(self, lowvram_model_memory=0, force_patch_weights=False):
        if hasattr(getattr(self.model, "model", None), "diffusion_model"):
            lowvram_model_memory = max(1, int(self.model.model_size() * fraction))
        return orig(self, lowvram_model_memory, force_patch_weights=force_patch_weights)

    monkeypatch.setattr(mm.LoadedModel, "model_load", model_load)


def layers_casting_at_use(module) -> tuple[int, int]:
    """(layers that cast their weights at use, layers that can): ComfyUI's ``comfy_cast_weights`` flag."""
    flags = [m.comfy_cast_weights for m in module.modules() if hasattr(m, "comfy_cast_weights")]
    return sum(bool(f) for f in flags), len(flags)


class StubServer:
    """What execution.PromptExecutor needs from the server; records every message."""

    def __init__(self):
        self.client_id = "tests"
        self.last_node_id = None
        self.sockets_metadata = {}
        self.messages: list = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass


def run_prompt(prompt: dict, outputs: list[str] | None = None):
    """Validate and execute an API prompt in-process with ComfyUI's own executor.
    Returns (executor, validation result, stub server)."""
    valid = validate(prompt)
    import execution

    if not valid[0]:
        raise AssertionError(f"prompt failed validation: {valid[1]} {json.dumps(valid[3], default=str)[:2000]}")
    srv = StubServer()
    import inspect

    kw = {}
    if "cache_args" in inspect.signature(execution.PromptExecutor).parameters:  # ComfyUI 0.33+
        kw["cache_args"] = {"lru": 0, "ram": 0.0, "ram_inactive": 0.0}
    ex = execution.PromptExecutor(srv, cache_type=False, **kw)
    ex.execute(prompt, "test-prompt", {"client_id": srv.client_id}, outputs or valid[2])
    return ex, valid, srv


# ----------------------------------------------------------------------------- workflows

STORY = ("0:00 a quiet street at dusk, warm shop lights, a few people walking, cinematic\n"
         "0:04 rain starts, neon reflections on the wet asphalt, umbrellas open\n"
         "0:08 the camera rises slowly above the rooftops, city lights in the rain")


def t2v_api(upscale: bool | str = False) -> dict:
    """The API graph of workflows/rolling_forcing_t2v.json; ``True``/"upscale" for _upscale.json,
    "story" for _prompt_story.json (timed prompts from a Prompt Story node)."""
    variant = {False: "t2v", True: "upscale"}.get(upscale, upscale)
    g = {
        "1": {"class_type": "RollingForcingModelLoader", "_meta": {"title": "Rolling Forcing Model Loader"},
              "inputs": {"model_name": MODEL_FILES["dit"]["name"], "weights": "ema", "weight_dtype": "default",
                         "attention": "auto"}},
        "2": {"class_type": "CLIPLoader", "_meta": {"title": "Load umT5-XXL (type wan)"},
              "inputs": {"clip_name": MODEL_FILES["clip"]["name"], "type": "wan", "device": "default"}},
        "3": {"class_type": "CLIPTextEncode", "_meta": {"title": "Prompt"},
              "inputs": {"text": PROMPT, "clip": ["2", 0]}},
        "4": {"class_type": "VAELoader", "_meta": {"title": "Load Wan2.1 VAE"},
              "inputs": {"vae_name": MODEL_FILES["vae"]["name"]}},
        "5": {"class_type": "RollingForcingCacheConfig", "_meta": {"title": "Rolling Forcing Cache Settings"},
              "inputs": {"sink_blocks": 1, "span_frames": 21, "capacity_frames": 24, "context_noise": 0.0,
                         "update_mode": "reference", "rope_mode": "reference"}},
        "6": {"class_type": "RollingForcingSampler", "_meta": {"title": "Rolling Forcing Sampler"},
              "inputs": {"model": ["1", 0], "positive": ["3", 0], "width": 832, "height": 480, "seconds": 5.0,
                         "seed": 42, "steps": "1000,800,600,400,200", "cache": ["5", 0], "vae": ["4", 0],
                         "stream_to_disk": False, "filename_prefix": "video/rolling_forcing", "keep_seconds": 5.0}},
        "7": {"class_type": "CreateVideo", "_meta": {"title": "Create Video"},
              "inputs": {"images": ["6", 1], "fps": 16.0}},
        "8": {"class_type": "SaveVideo", "_meta": {"title": "Save Video"},
              "inputs": {"video": ["7", 0], "filename_prefix": "video/rolling_forcing", "format": "auto",
                         "codec": "auto"}},
    }
    if variant == "story":
        g["3"] = {"class_type": "RollingForcingPromptStory", "_meta": {"title": "Prompt Story (one timed prompt per line)"},
                  "inputs": {"clip": ["2", 0], "text": STORY, "transition": "blend", "blend_seconds": 1.5,
                             "recache": "none"}}
        g["6"]["inputs"]["seconds"] = 12.0
        g["8"]["inputs"]["filename_prefix"] = "video/rolling_forcing_story"
    if variant == "long_stream":
        g["6"]["inputs"].update(seconds=600.0, stream_to_disk=True, filename_prefix="video/rolling_forcing_long",
                                keep_seconds=5.0)
        g["7"]["_meta"]["title"] = "Create Video (the last keep_seconds)"
        g["8"]["_meta"]["title"] = "Save the tail (the whole video is already in output/video)"
        g["8"]["inputs"]["filename_prefix"] = "video/rolling_forcing_long_tail"
    if variant == "upscale":
        g["9"] = {"class_type": "ImageScaleBy", "_meta": {"title": "Upscale 1.5x (to 1248x720)"},
                  "inputs": {"image": ["6", 1], "upscale_method": "lanczos", "scale_by": 1.5}}
        g["7"]["inputs"]["images"] = ["9", 0]
        g["8"]["inputs"]["filename_prefix"] = "video/rolling_forcing_upscaled"
    return g


WORKFLOW_FILES = {"rolling_forcing_t2v.json": False, "rolling_forcing_upscale.json": True,
                  "rolling_forcing_prompt_story.json": "story", "rolling_forcing_long_stream.json": "long_stream"}

NOTE_STORY = ("\n\nPrompt story: one prompt per line, each starting with its time (seconds or m:ss). Each line "
              "is encoded with the text encoder; switches snap to the nearest 0.75 s block boundary, and the "
              "sampler's info output shows where each landed. Transitions: cut, blend (over blend_seconds), and "
              "recache (keep_sink for a new action in the same scene, reanchor for a scene change).")

NOTE_LONG = ("\n\nLong stream: the sampler writes each decoded block to output/video/rolling_forcing_long_*.mp4 "
             "as it is made (fragmented MP4: playable at any moment, also after Cancel or a crash) and keeps only "
             "the last keep_seconds in RAM, so 10 minutes or an hour run with bounded memory. The whole file shows "
             "in the sampler's preview when the run ends; Save Video stores just the tail.")

VIRTUAL_NODES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO",
                "COMFY_DYNAMICCOMBO_V3"}  # a combo whose choice adds inputs (SaveVideo's codec, 2026)


def ui_to_api(ui: dict, info_of) -> dict:
    """Convert a UI workflow (LiteGraph JSON) to the API format, as the frontend's graphToPrompt does
    for plain graphs: widget values are read positionally in input order (plus the control value after
    an input with control_after_generate), links become [node id, slot]. ``info_of(type)`` returns the
    node's /object_info entry."""
    links = {ln[0]: ln for ln in ui.get("links", [])}
    api = {}
    for node in ui["nodes"]:
        if node["type"] in VIRTUAL_NODES or node.get("mode", 0) in (2, 4):
            continue
        info = info_of(node["type"])
        spec = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        order = info.get("input_order", {})
        names = list(order.get("required", [])) + list(order.get("optional", []))
        values = list(node.get("widgets_values") or [])
        inputs, i = {}, 0
        for name in names:
            typ, opts = spec[name][0], (spec[name][1] if len(spec[name]) > 1 else {})
            is_widget = (isinstance(typ, list) or typ in WIDGET_TYPES) and not opts.get("forceInput")
            if is_widget:
                if i < len(values):
                    inputs[name] = values[i]
                i += 1
                if opts.get("control_after_generate"):
                    i += 1
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                ln = links[inp["link"]]
                inputs[inp["name"]] = [str(ln[1]), ln[2]]
        title = node.get("title")
        api[str(node["id"])] = {"inputs": inputs, "class_type": node["type"],
                                "_meta": {"title": title or info.get("display_name") or node["type"]}}
    return api


def strip_meta(api: dict) -> dict:
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}


def canonical(api: dict, info_of) -> dict:
    """``strip_meta`` minus optional inputs that hold their declared default: a newer ComfyUI's node may
    have gained an optional widget (CreateVideo's bit_depth in 2026) that its frontend fills in with the
    default, which is the same graph."""
    out = strip_meta(api)
    for node in out.values():
        optional = info_of(node["class_type"])["input"].get("optional", {})
        node["inputs"] = {n: v for n, v in node["inputs"].items()
                          if not (n in optional and len(optional[n]) > 1 and isinstance(optional[n][1], dict)
                                  and "default" in optional[n][1] and v == optional[n][1]["default"])}
    return out


def add_model_properties(ui: dict) -> dict:
    """Give each loader node ``properties.models`` (name, url, directory) so the frontend offers downloads."""
    for node in ui["nodes"]:
        kind = LOADER_MODELS.get(node["type"])
        if kind:
            f = MODEL_FILES[kind]
            node.setdefault("properties", {})["models"] = [{"name": f["name"], "url": f["url"],
                                                            "directory": f["directory"]}]
    return ui


def load_workflow(name: str) -> dict:
    return json.loads((WORKFLOWS / name).read_text())


# ----------------------------------------------------------------------------- server + browser

def browser_available() -> str | None:
    """None if headless Chromium + playwright are usable, else the reason they are not."""
    try:
        import playwright.sync_api  # noqa: F401
    except Exception as e:
        return f"playwright is not importable ({e.__class__.__name__}: {e}); pip install playwright"
    if not os.path.exists(CHROMIUM):
        return f"no Chromium at {CHROMIUM} (set CHROMIUM=/path/to/chromium)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """A ComfyUI server subprocess (loopback only) with this pack (symlinked as ``rolling-forcing``)
    and the test injection pack in a temporary custom_nodes folder, and temporary model folders."""

    def __init__(self, workdir: Path, startup_timeout: float = 300.0):
        self.dir = Path(workdir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.timeout = startup_timeout
        self.proc = None
        self.log_path = self.dir / "server.log"

    def __enter__(self) -> "ComfyServer":
        path = require_comfyui()
        custom = self.dir / "custom_nodes"
        custom.mkdir(parents=True, exist_ok=True)
        os.symlink(ROOT, custom / PACK_DIR_NAME)
        write_inject_pack(custom)
        models = self.dir / "models"
        model_folders(models)
        cfg = self.dir / "extra_model_paths.yaml"
        cfg.write_text(f"rf_tests:\n  base_path: {models}\n  diffusion_models: diffusion_models\n"
                       f"  text_encoders: text_encoders\n  vae: vae\n  custom_nodes: {custom}\n")
        for d in ("output", "temp", "input", "user"):
            (self.dir / d).mkdir(exist_ok=True)
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "2")
        cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch", "--disable-api-nodes", "--extra-model-paths-config", str(cfg),
               "--output-directory", str(self.dir / "output"), "--temp-directory", str(self.dir / "temp"),
               "--input-directory", str(self.dir / "input"), "--user-directory", str(self.dir / "user"),
               "--database-url", "sqlite:///:memory:"]
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=path, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + self.timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log_text()[-4000:]}")
            try:
                self.get("/object_info/RollingForcingSampler", timeout=5)
                return self
            except Exception:
                time.sleep(0.5)
        self.__exit__(None, None, None)
        raise RuntimeError(f"ComfyUI did not start within {self.timeout:.0f} s:\n{self.log_text()[-4000:]}")

    def __exit__(self, *exc):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "log", None):
            self.log.close()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def get(self, route: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + route, timeout=timeout) as r:
            return json.loads(r.read())

    def get_bytes(self, route: str, timeout: float = 30) -> bytes:
        with urllib.request.urlopen(self.url + route, timeout=timeout) as r:
            return r.read()

    def post(self, route: str, body: dict, timeout: float = 30):
        req = urllib.request.Request(self.url + route, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                data = r.read()
                return r.status, (json.loads(data) if data else None)
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def wait_history(self, prompt_id: str, timeout: float = 600) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            h = self.get(f"/history/{prompt_id}")
            if prompt_id in h and h[prompt_id].get("status", {}).get("completed") is not None:
                st = h[prompt_id]["status"]
                if st.get("status_str") in ("success", "error") or st.get("completed"):
                    return h[prompt_id]
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s:\n{self.log_text()[-3000:]}")


@contextlib.contextmanager
def frontend(server: ComfyServer):
    """A headless-Chromium page with the real ComfyUI frontend loaded from ``server``."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url + "/", wait_until="domcontentloaded")
            # a fresh user directory opens an empty workflow: wait for the node definitions instead
            page.wait_for_function("() => window.app?.graph && window.LiteGraph?.registered_node_types?."
                                   "RollingForcingSampler !== undefined", timeout=180_000)
            page.errors = errors  # type: ignore[attr-defined]
            yield page
        finally:
            browser.close()


def frontend_load_ui(page, ui: dict) -> dict:
    """Load a UI workflow into the frontend; return its API form and the node types it does not know."""
    return page.evaluate("""async (ui) => {
        await window.app.loadGraphData(ui, true, true, 'test.json');
        const missing = window.app.graph._nodes
            .filter(n => !(n.type in LiteGraph.registered_node_types) || n.has_errors)
            .map(n => n.type);
        const p = await window.app.graphToPrompt();
        return {api: p.output, missing: missing, types: window.app.graph._nodes.map(n => n.type)};
    }""", ui)


def frontend_api_to_ui(page, api: dict, note: str | None = None) -> dict:
    """API graph -> UI workflow with the real frontend (loadApiJson + graph.serialize), plus a Note node."""
    return page.evaluate("""async ([api, note]) => {
        window.app.graph.clear();
        await window.app.loadApiJson(api, 'workflow.json');
        if (note) {
            const nodes = window.app.graph._nodes;
            const x = Math.min(...nodes.map(n => n.pos[0]));
            const y = Math.max(...nodes.map(n => n.pos[1] + n.size[1]));
            const n = LiteGraph.createNode('Note');
            n.pos = [x, y + 60];
            n.size = [560, 260];
            n.widgets[0].value = note;
            n.title = 'Read me';
            window.app.graph.add(n);
        }
        // as the frontend writes it to a file: JSON (undefined fields dropped)
        return JSON.parse(JSON.stringify(window.app.graph.serialize()));
    }""", [api, note])


def frontend_thumbnail(page, ui: dict, path: Path, size=(800, 450)) -> None:
    """Screenshot of the workflow's graph in the frontend, saved as the template thumbnail (.jpg)."""
    from PIL import Image

    page.set_viewport_size({"width": 1600, "height": 900})
    page.keyboard.press("Escape")  # the first-run template dialog, if open
    page.evaluate("""async (ui) => {
        const ext = window.app.extensionManager;
        for (const [k, v] of [['Comfy.Minimap.Visible', false], ['Comfy.Graph.CanvasInfo', false],
                              ['Comfy.Graph.CanvasMenu', false], ['Comfy.Workflow.WorkflowTabsPosition', 'Sidebar']]) {
            try { await ext.setting.set(k, v); } catch (e) {}
        }
        if (!ext.focusMode) ext.toggleFocusMode();  // hide menus, tabs and side bars
        await window.app.loadGraphData(ui, true, true, 'thumbnail.json');
        const c = window.app.canvas, nodes = window.app.graph._nodes;
        const x0 = Math.min(...nodes.map(n => n.pos[0])), y0 = Math.min(...nodes.map(n => n.pos[1] - 30));
        const x1 = Math.max(...nodes.map(n => n.pos[0] + n.size[0]));
        const y1 = Math.max(...nodes.map(n => n.pos[1] + n.size[1]));
        const w = window.innerWidth, h = window.innerHeight;
        const pad = 30, scale = Math.min((w - 2 * pad) / (x1 - x0), (h - 2 * pad) / (y1 - y0));
        c.ds.scale = scale;
        c.ds.offset = [pad / scale - x0 + ((w - 2 * pad) / scale - (x1 - x0)) / 2,
                       pad / scale - y0 + ((h - 2 * pad) / scale - (y1 - y0)) / 2];
        c.setDirty(true, true);
    }""", ui)
    page.wait_for_timeout(1500)
    tmp = path.with_suffix(".png")
    page.screenshot(path=str(tmp))
    Image.open(tmp).convert("RGB").resize(size, Image.LANCZOS).save(path, quality=85, optimize=True)
    tmp.unlink()


def regenerate_workflows() -> None:
    """Rebuild workflows/*.json from the API graphs with the real frontend (API -> UI), add the
    loaders' model download list, check the round trip, and render the template thumbnails."""
    reason = browser_available()
    if reason:
        raise SystemExit(f"cannot regenerate the workflows: {reason}")
    WORKFLOWS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="rf_wf_") as tmp, ComfyServer(Path(tmp)) as server, \
            frontend(server) as page:
        for name, upscale in WORKFLOW_FILES.items():
            note = NOTE_TEXT + (NOTE_UPSCALE if upscale is True else "") + (NOTE_STORY if upscale == "story" else "") \
                + (NOTE_LONG if upscale == "long_stream" else "")
            ui = add_model_properties(frontend_api_to_ui(page, t2v_api(upscale), note))
            ui["id"] = str(uuid.uuid5(uuid.NAMESPACE_URL, f"rolling-forcing/workflows/{name}"))
            (WORKFLOWS / name).write_text(json.dumps(ui, indent=2) + "\n")
            back = frontend_load_ui(page, ui)
            assert not back["missing"], back["missing"]
            assert canonical(back["api"], node_info) == canonical(t2v_api(upscale), node_info), (name, back["api"])
            frontend_thumbnail(page, ui, WORKFLOWS / (name[:-5] + ".jpg"))
            print(f"wrote {WORKFLOWS / name} ({len(ui['nodes'])} nodes) and its thumbnail")


if __name__ == "__main__":
    if "--regenerate-workflows" in sys.argv:
        regenerate_workflows()
    else:
        print(__doc__)
