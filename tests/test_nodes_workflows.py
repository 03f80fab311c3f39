"""Static checks of the shipped workflows (UI format, as the frontend saves them); no ComfyUI needed.

The frontend-level checks (loading them in the real frontend, converting to API form, ComfyUI's
prompt validation, running them) are in test_comfy_workflows.py / test_comfy_nodes.py.
"""
from __future__ import annotations

import json

import pytest

from scripts import workflow_source as W


@pytest.fixture(params=list(W.WORKFLOW_FILES), scope="module")
def workflow(request):
    return request.param, W.WORKFLOW_FILES[request.param], W.load_workflow(request.param)


def test_workflows_folder_holds_ui_workflows_and_thumbnails():
    names = {p.name for p in W.WORKFLOWS.iterdir()}
    assert set(W.WORKFLOW_FILES) <= names
    assert all(n.endswith((".json", ".jpg")) for n in names), names  # ComfyUI serves the folder as-is
    for name in W.WORKFLOW_FILES:  # the template browser's thumbnail: a JPEG with the same stem
        assert (W.WORKFLOWS / W.thumbnail_name(name)).read_bytes()[:3] == b"\xff\xd8\xff"


def test_ui_format(workflow):
    name, _, ui = workflow
    for key in ("id", "last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra", "version"):
        assert key in ui, f"{name}: {key} missing"
    assert ui["version"] == 0.4
    ids = [n["id"] for n in ui["nodes"]]
    assert len(ids) == len(set(ids)) and max(ids) <= ui["last_node_id"]
    assert max(ln[0] for ln in ui["links"]) <= ui["last_link_id"]
    json.dumps(ui)  # plain JSON


def test_links_are_consistent(workflow):
    _, _, ui = workflow
    nodes = {n["id"]: n for n in ui["nodes"]}
    for link_id, src, src_slot, dst, dst_slot, typ in ui["links"]:
        out = nodes[src]["outputs"][src_slot]
        inp = nodes[dst]["inputs"][dst_slot]
        assert link_id in out["links"] and inp["link"] == link_id
        # an input that accepts several types (e.g. CONDITIONING,ROLLING_FORCING_PROMPTS) names them all
        assert inp["type"] == typ and (typ == "*" or out["type"] in typ.split(","))


def _by_type(ui, typ):
    found = [n for n in ui["nodes"] if n["type"] == typ]
    assert len(found) == 1, typ
    return found[0]


def _source(ui, node, input_name):
    link = next(i["link"] for i in node["inputs"] if i["name"] == input_name)
    ln = next(ln for ln in ui["links"] if ln[0] == link)
    return next(n for n in ui["nodes"] if n["id"] == ln[1]), ln[2]


def test_graph_shape(workflow):
    name, variant, ui = workflow
    if variant == "long_upscale":
        return check_long_upscale_shape(ui)
    if variant == "toy":
        return check_toy_shape(ui)
    types = sorted(n["type"] for n in ui["nodes"])
    prompt_node = "RollingForcingPromptStory" if variant == "story" else "CLIPTextEncode"
    outs = ["CreateVideo", "SaveVideo"]
    expected = ["CLIPLoader", prompt_node, "Note", "RollingForcingCacheConfig",
                "RollingForcingModelLoader", "RollingForcingSampler", "VAELoader"] + outs
    assert types == sorted(expected + (["ImageScaleBy"] if variant == "upscale" else []))
    sampler = _by_type(ui, "RollingForcingSampler")
    assert _source(ui, sampler, "model")[0]["type"] == "RollingForcingModelLoader"
    assert _source(ui, sampler, "positive")[0]["type"] == prompt_node
    assert _source(ui, sampler, "cache")[0]["type"] == "RollingForcingCacheConfig"
    assert _source(ui, sampler, "vae")[0]["type"] == "VAELoader"
    if variant == "long_stream":
        assert sampler["widgets_values"][-3:] == [True, "video/rolling_forcing_long", 5]
    create = _by_type(ui, "CreateVideo")
    src, slot = _source(ui, create, "images")
    if variant == "upscale":
        assert src["type"] == "ImageScaleBy" and src["widgets_values"] == ["lanczos", 1.5]
        src, slot = _source(ui, src, "image")
    assert src["type"] == "RollingForcingSampler" and slot == 1  # the IMAGE output
    assert create["widgets_values"] == [16]  # Wan2.1 decodes at 16 fps
    assert _source(ui, _by_type(ui, "SaveVideo"), "video")[0]["type"] == "CreateVideo"
    assert _by_type(ui, "CLIPLoader")["widgets_values"][1] == "wan"


def check_long_upscale_shape(ui):
    """Chunked sampler (2 min, chunks of 10 s, a prompt change at 0:40) -> 2x upscale model -> Append Video."""
    types = sorted(n["type"] for n in ui["nodes"])
    assert types == sorted(["CLIPLoader", "RollingForcingPromptStory", "Note", "RollingForcingCacheConfig",
                            "RollingForcingModelLoader", "RollingForcingChunkedSampler", "VAELoader",
                            "UpscaleModelLoader", "ImageUpscaleWithModel", "RollingForcingAppendVideo"])
    sampler = _by_type(ui, "RollingForcingChunkedSampler")
    assert _source(ui, sampler, "positive")[0]["type"] == "RollingForcingPromptStory"
    assert "\n0:40 " in _by_type(ui, "RollingForcingPromptStory")["widgets_values"][0]
    up = _by_type(ui, "ImageUpscaleWithModel")
    assert _source(ui, up, "image") == (sampler, 0)
    assert _source(ui, up, "upscale_model")[0]["type"] == "UpscaleModelLoader"
    append = _by_type(ui, "RollingForcingAppendVideo")
    assert _source(ui, append, "images") == (up, 0) and _source(ui, append, "chunk") == (sampler, 1)
    api = W.api_graph("long_upscale")["6"]["inputs"]
    assert (api["seconds"], api["chunk_seconds"]) == (120.0, 10.0)
    assert "queue this workflow 12 times" in W.note_text("long_upscale")


def check_toy_shape(ui):
    """Loader (toy) -> Toy Text Encode -> Sampler (64x64, no VAE, no cache node) -> Toy Decode -> Create/Save Video;
    nothing to download."""
    types = sorted(n["type"] for n in ui["nodes"])
    assert types == sorted(["Note", "RollingForcingModelLoader", "RollingForcingToyTextEncode",
                            "RollingForcingSampler", "RollingForcingToyDecode", "CreateVideo", "SaveVideo"])
    sampler = _by_type(ui, "RollingForcingSampler")
    assert _source(ui, sampler, "positive")[0]["type"] == "RollingForcingToyTextEncode"
    assert all(i["link"] is None for i in sampler["inputs"] if i["name"] in ("vae", "cache"))
    decode = _by_type(ui, "RollingForcingToyDecode")
    assert _source(ui, decode, "latent") == (sampler, 0)  # the LATENT output
    assert _source(ui, _by_type(ui, "CreateVideo"), "images") == (decode, 0)
    assert _by_type(ui, "RollingForcingModelLoader")["widgets_values"][0] == W.TOY_MODEL
    assert all("models" not in n.get("properties", {}) for n in ui["nodes"])
    assert "no download" in W.note_text("toy") and "Toy Decode" in W.note_text("toy")


def test_widget_values_match_the_api_graph(workflow):
    _, variant, ui = workflow
    api = W.api_graph(variant)
    loader = api["1"]["inputs"]
    assert _by_type(ui, "RollingForcingModelLoader")["widgets_values"] == [
        loader["model_name"], loader["weights"], loader["weight_dtype"], loader["attention"]]
    if variant == "toy":
        assert _by_type(ui, "RollingForcingToyTextEncode")["widgets_values"] == [api["2"]["inputs"]["caption"]]
        wv = _by_type(ui, "RollingForcingSampler")["widgets_values"]
        assert wv[:4] == [64, 64, 10.0, 42] and wv[5] == api["6"]["inputs"]["steps"]
        return
    cache = api["5"]["inputs"]
    assert _by_type(ui, "RollingForcingCacheConfig")["widgets_values"] == [
        cache["sink_blocks"], cache["span_frames"], cache["capacity_frames"], cache["context_noise"],
        cache["update_mode"], cache["rope_mode"], cache["schedule"]]
    s = api["6"]["inputs"]
    if variant == "long_upscale":
        wv = _by_type(ui, "RollingForcingChunkedSampler")["widgets_values"]
        # no control_after_generate widget: a seed that changed after each queue would end the run
        assert wv == [s["width"], s["height"], s["seconds"], s["chunk_seconds"], s["seed"], s["run_name"],
                      s["steps"], s["advance"]]
        return
    wv = _by_type(ui, "RollingForcingSampler")["widgets_values"]
    assert wv[:4] == [s["width"], s["height"], s["seconds"], s["seed"]] and wv[5] == s["steps"]
    assert wv[4] in ("fixed", "randomize", "increment", "decrement")  # the seed's control widget


def test_loaders_list_their_model_downloads(workflow):
    _, variant, ui = workflow
    if variant == "toy":  # nothing to download: checked in check_toy_shape
        return
    present = {n["type"] for n in ui["nodes"]}
    assert {"CLIPLoader", "VAELoader", "RollingForcingModelLoader"} <= present
    for typ, kind in W.LOADER_MODELS.items():
        if typ not in present:
            continue
        node = _by_type(ui, typ)
        f = W.ALL_MODEL_FILES[kind]
        assert node["properties"]["models"] == [{"name": f["name"], "url": f["url"], "directory": f["directory"]}]
        assert node["widgets_values"][0] == f["name"]
        assert f["url"].startswith("https://huggingface.co/") and f["url"].endswith("/" + f["name"])


def test_note_explains_the_models(workflow):
    _, variant, ui = workflow
    note = _by_type(ui, "Note")["widgets_values"][0]
    if variant == "toy":  # nothing to download: the note says so and names the built-in choice
        assert "no download" in note and W.TOY_MODEL in note
        return
    for f in W.MODEL_FILES.values():
        assert f["name"] in note
