"""workflows/ against its source of truth, scripts/workflow_source.py (no browser needed).

A workflow file is made from the source by ``scripts/make_workflows.py`` with the real frontend; these
tests fail when the two drift apart: a file without a source entry (or the reverse), a graph that no
longer converts to the source's API graph (UI -> API with the installed ComfyUI's node definitions,
titles included), a note text or a loader's download list that differs, or one of this pack's nodes
whose inputs or outputs are no longer those of its definition. The fix is to regenerate:
``python scripts/make_workflows.py`` (see its --help).
"""
from __future__ import annotations

import pytest

from scripts import workflow_source as W
from tests.comfyui import env
from tests.comfyui.graphs import ui_to_api

REGENERATE = "workflows/ differs from scripts/workflow_source.py: run python scripts/make_workflows.py"


def test_every_workflow_file_has_a_source_entry_and_back():
    files = sorted(p.name for p in W.WORKFLOWS.glob("*.json"))
    assert files == sorted(W.WORKFLOW_FILES), REGENERATE
    thumbnails = sorted(p.name for p in W.WORKFLOWS.glob("*.jpg"))
    assert thumbnails == sorted(W.thumbnail_name(n) for n in W.WORKFLOW_FILES), REGENERATE
    assert len(set(W.WORKFLOW_FILES.values())) == len(W.WORKFLOW_FILES)  # one file per variant


def test_the_source_is_consistent():
    for variant in W.VARIANTS:
        api = W.api_graph(variant)
        if variant == "toy":  # the built-in toy model: nothing to download, its own note
            assert api["1"]["inputs"]["model_name"] == W.TOY_MODEL
            assert W.note_text(variant) == W.NOTE_TOY
            assert all(W.model_properties(n["class_type"], variant) is None for n in api.values())
            assert W.api_graph(variant) == api
            continue
        assert api["1"]["inputs"]["model_name"] == W.MODEL_FILES["dit"]["name"]
        assert api["2"]["inputs"]["clip_name"] == W.MODEL_FILES["clip"]["name"]
        assert api["4"]["inputs"]["vae_name"] == W.MODEL_FILES["vae"]["name"]
        for node in api.values():
            for value in node["inputs"].values():
                if isinstance(value, list):  # a link [node id, output slot] to a node of the graph
                    assert value[0] in api, (variant, value)
        assert W.note_text(variant).startswith(W.NOTE_TEXT)
        assert W.api_graph(variant) == api  # a fresh copy each time
    for f in W.MODEL_FILES.values():
        assert f["name"] in W.NOTE_TEXT
        assert f["url"].startswith("https://huggingface.co/") and f["url"].endswith("/" + f["name"])
    with pytest.raises(ValueError, match="variant"):
        W.api_graph("i2v")


@pytest.mark.comfy
@pytest.mark.parametrize("name, variant", list(W.WORKFLOW_FILES.items()))
def test_workflow_file_matches_its_source(cu, name, variant):
    ui = W.load_workflow(name)
    assert ui["id"] == W.workflow_id(name), REGENERATE
    # the graph: exactly the source's API graph (inputs, links and titles), as this ComfyUI reads the file
    assert ui_to_api(ui, env.node_info) == W.api_graph(variant), REGENERATE
    # the note
    notes = [n for n in ui["nodes"] if n["type"] in ("Note", "MarkdownNote")]
    assert len(notes) == 1, REGENERATE
    assert notes[0]["widgets_values"] == [W.note_text(variant)], REGENERATE
    assert notes[0].get("title") == W.NOTE_TITLE
    # the loaders' download lists (and no other node has one)
    for node in ui["nodes"]:
        want = W.model_properties(node["type"], variant)
        assert node.get("properties", {}).get("models") == want, (node["type"], REGENERATE)
    # this pack's nodes have the slots of their current definitions (an input added to a node since the
    # file was made shows up only here: the frontend would add it on load, the API graph is unchanged)
    for node in ui["nodes"]:
        if node["type"] in env.OUR_NODES:
            info = env.node_info(node["type"])
            declared = {*info["input"].get("required", {}), *info["input"].get("optional", {})}
            assert {i["name"] for i in node.get("inputs", [])} == declared, (node["type"], REGENERATE)
            assert [o["name"] for o in node.get("outputs", [])] == list(info["output_name"]), (node["type"], REGENERATE)


@pytest.mark.comfy
def test_the_toy_workflow_names_the_loaders_toy_choice(cu):
    """The source's literal is the loader's choice (the loader lists it first: tests/test_comfy_toy.py)."""
    assert W.TOY_MODEL == cu["pack"].nodes.model_options.TOY_MODEL
