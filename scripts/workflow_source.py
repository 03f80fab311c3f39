"""The source of truth of the shipped workflows (``workflows/*.json``): plain data and small functions.

Each shipped workflow is one *variant* of the text-to-video graph. For every variant this module
holds its API graph (``api_graph``), the text of its "Read me" note (``note_text``) and, for the
loader nodes, the model download list the frontend offers (``model_properties``). The UI files
are made from these with the real ComfyUI frontend by ``scripts/make_workflows.py``; the tests
check that the files in ``workflows/`` still say exactly this (``tests/test_comfy_workflow_source.py``).

Importable without ComfyUI, torch or a browser (standard library only).
"""
from __future__ import annotations

import json
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"

# file name in workflows/ -> variant of the graph
WORKFLOW_FILES = {
    "rolling_forcing_t2v.json": "t2v",
    "rolling_forcing_upscale.json": "upscale",
    "rolling_forcing_prompt_story.json": "story",
    "rolling_forcing_long_stream.json": "long_stream",
    "rolling_forcing_long_upscale.json": "long_upscale",
    "rolling_forcing_toy.json": "toy",
}
VARIANTS = tuple(WORKFLOW_FILES.values())

# the models the workflows load, where ComfyUI keeps them and where the frontend downloads them from
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
# models only some workflows load
UPSCALE_MODEL = {"name": "RealESRGAN_x2.pth", "directory": "upscale_models",
                 "url": "https://huggingface.co/ai-forever/Real-ESRGAN/resolve/main/RealESRGAN_x2.pth"}
# loader node type -> the MODEL_FILES entry it loads
LOADER_MODELS = {"CLIPLoader": "clip", "VAELoader": "vae", "RollingForcingModelLoader": "dit",
                 "UpscaleModelLoader": "upscale"}
ALL_MODEL_FILES = {**MODEL_FILES, "upscale": UPSCALE_MODEL}
# the loader's choice for the built-in toy model (nodes/model_options.py TOY_MODEL; a test checks they agree)
TOY_MODEL = "toy (built-in, no download)"
TOY_CAPTION = "a red circle drifting left on a dark background"

PROMPT = ("A red fox trotting through fresh snow in a sunlit birch forest, its breath visible in the cold air, "
          "cinematic tracking shot, soft golden morning light, shallow depth of field")

STORY = ("0:00 a quiet street at dusk, warm shop lights, a few people walking, cinematic\n"
         "0:04 rain starts, neon reflections on the wet asphalt, umbrellas open\n"
         "0:08 the camera rises slowly above the rooftops, city lights in the rain")

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

NOTE_UPSCALE = (
    "\n\nUpscale: Upscale Image By scales the frames 1.5x (832x480 -> 1248x720, lanczos) before saving; for "
    "sharper results swap it for Load Upscale Model + Upscale Image (using Model).")

NOTE_STORY = ("\n\nPrompt story: one prompt per line, each starting with its time (seconds or m:ss). Each line "
              "is encoded with the text encoder; switches snap to the nearest 0.75 s block boundary, and the "
              "sampler's info output shows where each landed. Transitions: cut, blend (over blend_seconds), and "
              "recache (keep_sink for a new action in the same scene, reanchor for a scene change).")

NOTE_LONG = ("\n\nLong stream: the sampler writes each decoded block to output/video/rolling_forcing_long_*.mp4 "
             "as it is made (fragmented MP4: playable at any moment, also after Cancel or a crash) and keeps only "
             "the last keep_seconds in RAM, so 10 minutes or an hour run with bounded memory. The whole file shows "
             "in the sampler's preview when the run ends; Save Video stores just the tail.")

LONG_STORY = ("0:00 a red fox trotting through fresh snow in a sunlit birch forest, cinematic tracking shot\n"
              "0:40 the fox reaches a frozen lake and walks out onto the ice, wide shot, snow falling")

NOTE_LONG_UPSCALE = (
    "\n\nLong video, upscaled 2x (2 minutes, the prompt changes at 0:40): queue this workflow 12 times (Queue "
    "button's batch count 12, or auto-queue; the sampler's info says how many chunks). Each run makes the next 10 s "
    "chunk, upscales it with the model (1664x960) and appends it to output/video/rolling_forcing_long_upscaled.mp4, "
    "so RAM holds one chunk (~0.8 GB of frames at 832x480, ~3 GB after the 2x upscale) however long the video. The "
    "chunks continue each other exactly (the same video as one long run). A closed or crashed ComfyUI continues at "
    "the first chunk not yet appended. Upscale model: models/upscale_models/RealESRGAN_x2.pth (ai-forever/"
    "Real-ESRGAN); any 2x model works, or Upscale Image By for no download.")

NOTE_TOY = (
    "Rolling Forcing on the toy world: no download, runs in seconds on a CPU (64x64, 16 fps).\n\n"
    "The toy model is a 1M-parameter Rolling Forcing student trained by this pack on procedural videos of one "
    "shape on a plain background; it ships with the pack (Model Loader: 'toy (built-in, no download)'). It shows "
    "the sampler, prompts and long streams working end to end before you download the 1.3B model; it is not a "
    "general video model.\n\n"
    "Captions follow one grammar: 'a {colour} {shape} {motion} on a {background} background', e.g. 'a blue "
    "square bouncing on a light background' (the Toy Text Encode tooltip lists every word). The sampler runs "
    "without a VAE; Toy Decode turns its LATENT into frames (a Wan2.1 VAE cannot decode toy latents and is "
    "refused). For real video open rolling_forcing_t2v.")

_NOTE_EXTRA = {"t2v": "", "upscale": NOTE_UPSCALE, "story": NOTE_STORY, "long_stream": NOTE_LONG,
               "long_upscale": NOTE_LONG_UPSCALE}
# variants that load no downloadable model: their own note, no download lists
_NO_DOWNLOAD = {"toy": NOTE_TOY}
NOTE_TITLE = "Read me"


def _check(variant: str) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"workflow variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    return variant


def api_graph(variant: str = "t2v") -> dict:
    """The API graph (``/prompt`` format, with ``_meta.title``) of a workflow variant; a fresh copy."""
    if _check(variant) == "toy":
        return _toy_graph()
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
                         "update_mode": "fused", "rope_mode": "reference", "schedule": "rolling"}},
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
        g["3"] = {"class_type": "RollingForcingPromptStory",
                  "_meta": {"title": "Prompt Story (one timed prompt per line)"},
                  "inputs": {"clip": ["2", 0], "text": STORY, "transition": "blend", "blend_seconds": 1.5,
                             "recache": "none", "applies": "entering"}}
        g["6"]["inputs"]["seconds"] = 12.0
        g["8"]["inputs"]["filename_prefix"] = "video/rolling_forcing_story"
    elif variant == "long_stream":
        g["6"]["inputs"].update(seconds=600.0, stream_to_disk=True, filename_prefix="video/rolling_forcing_long",
                                keep_seconds=5.0)
        g["7"]["_meta"]["title"] = "Create Video (the last keep_seconds)"
        g["8"]["_meta"]["title"] = "Save the tail (the whole video is already in output/video)"
        g["8"]["inputs"]["filename_prefix"] = "video/rolling_forcing_long_tail"
    elif variant == "upscale":
        g["9"] = {"class_type": "ImageScaleBy", "_meta": {"title": "Upscale 1.5x (to 1248x720)"},
                  "inputs": {"image": ["6", 1], "upscale_method": "lanczos", "scale_by": 1.5}}
        g["7"]["inputs"]["images"] = ["9", 0]
        g["8"]["inputs"]["filename_prefix"] = "video/rolling_forcing_upscaled"
    elif variant == "long_upscale":
        g["3"] = {"class_type": "RollingForcingPromptStory", "_meta": {"title": "Prompt Story (change at 0:40)"},
                  "inputs": {"clip": ["2", 0], "text": LONG_STORY, "transition": "blend", "blend_seconds": 1.5,
                             "recache": "none", "applies": "entering"}}
        g["6"] = {"class_type": "RollingForcingChunkedSampler",
                  "_meta": {"title": "Rolling Forcing Chunked Sampler (queue once per chunk)"},
                  "inputs": {"model": ["1", 0], "positive": ["3", 0], "vae": ["4", 0], "width": 832, "height": 480,
                             "seconds": 120.0, "chunk_seconds": 10.0, "seed": 42,
                             "run_name": "video/rolling_forcing_long_upscaled", "steps": "1000,800,600,400,200",
                             "cache": ["5", 0], "advance": "after append"}}
        g["7"] = {"class_type": "UpscaleModelLoader", "_meta": {"title": "Load Upscale Model (2x)"},
                  "inputs": {"model_name": UPSCALE_MODEL["name"]}}
        g["8"] = {"class_type": "ImageUpscaleWithModel", "_meta": {"title": "Upscale the chunk 2x"},
                  "inputs": {"upscale_model": ["7", 0], "image": ["6", 0]}}
        g["9"] = {"class_type": "RollingForcingAppendVideo", "_meta": {"title": "Rolling Forcing Append Video"},
                  "inputs": {"images": ["8", 0], "chunk": ["6", 1], "update_every_chunk": True, "fps": 0.0}}
    return g


def _toy_graph() -> dict:
    """Loader (toy) -> Toy Text Encode -> Sampler (64x64, no VAE) -> Toy Decode -> Create Video -> Save Video."""
    return {
        "1": {"class_type": "RollingForcingModelLoader", "_meta": {"title": "Rolling Forcing Model Loader (toy)"},
              "inputs": {"model_name": TOY_MODEL, "weights": "ema", "weight_dtype": "default", "attention": "auto"}},
        "2": {"class_type": "RollingForcingToyTextEncode", "_meta": {"title": "Toy caption"},
              "inputs": {"caption": TOY_CAPTION}},
        "6": {"class_type": "RollingForcingSampler", "_meta": {"title": "Rolling Forcing Sampler"},
              "inputs": {"model": ["1", 0], "positive": ["2", 0], "width": 64, "height": 64, "seconds": 10.0,
                         "seed": 42, "steps": "1000,800,600,400,200", "stream_to_disk": False,
                         "filename_prefix": "video/rolling_forcing_toy", "keep_seconds": 10.0}},
        "4": {"class_type": "RollingForcingToyDecode", "_meta": {"title": "Toy Decode"},
              "inputs": {"latent": ["6", 0]}},
        "7": {"class_type": "CreateVideo", "_meta": {"title": "Create Video"},
              "inputs": {"images": ["4", 0], "fps": 16.0}},
        "8": {"class_type": "SaveVideo", "_meta": {"title": "Save Video"},
              "inputs": {"video": ["7", 0], "filename_prefix": "video/rolling_forcing_toy", "format": "auto",
                         "codec": "auto"}},
    }


def output_node(variant: str = "t2v") -> str:
    """The id of the workflow's output node (Save Video; Append Video in the chunked workflow)."""
    return "9" if _check(variant) == "long_upscale" else "8"


def note_text(variant: str = "t2v") -> str:
    """The text of the workflow's "Read me" Note node."""
    if _check(variant) in _NO_DOWNLOAD:
        return _NO_DOWNLOAD[variant]
    return NOTE_TEXT + _NOTE_EXTRA[variant]


def model_properties(node_type: str, variant: str = "t2v") -> list[dict] | None:
    """``properties.models`` of a loader node (what the frontend offers to download); None for other nodes
    and in a variant that downloads nothing (the toy)."""
    kind = LOADER_MODELS.get(node_type)
    if kind is None or _check(variant) in _NO_DOWNLOAD:
        return None
    f = ALL_MODEL_FILES[kind]
    return [{"name": f["name"], "url": f["url"], "directory": f["directory"]}]


def add_model_properties(ui: dict, variant: str = "t2v") -> dict:
    """Give each loader node of a UI workflow its ``properties.models`` (mutates and returns ``ui``)."""
    for node in ui["nodes"]:
        models = model_properties(node["type"], variant)
        if models is not None:
            node.setdefault("properties", {})["models"] = models
    return ui


def workflow_id(name: str) -> str:
    """The stable id of a shipped workflow (the UI JSON's ``id``)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"rolling-forcing/workflows/{name}"))


def thumbnail_name(name: str) -> str:
    """The template browser's thumbnail of a workflow file: a JPEG with the same stem."""
    return Path(name).stem + ".jpg"


def load_workflow(name: str, folder: Path = WORKFLOWS) -> dict:
    """A workflow file (UI format) as a dict."""
    return json.loads((Path(folder) / name).read_text())


def dump_workflow(ui: dict) -> str:
    """A UI workflow as the files in workflows/ are written (2-space JSON, final newline)."""
    return json.dumps(ui, indent=2) + "\n"

