"""Workflow graphs: UI (LiteGraph JSON, as the frontend saves) -> API (``/prompt``) conversion without a
browser, comparison of API graphs across ComfyUI versions, and swapping the text encoder and VAE
loaders of a shipped graph for the test-only nodes (``inject_pack.py``).

``info_of(type)`` arguments return a node's ``/object_info`` entry: ``env.node_info`` in-process, or
``object_info.__getitem__`` for a server's.
"""
from __future__ import annotations

import copy

VIRTUAL_NODES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}  # frontend-only, not in the API graph
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO",
                "COMFY_DYNAMICCOMBO_V3"}  # a combo whose choice adds inputs (SaveVideo's codec, 2026)
BYPASSED_MODES = (2, 4)  # LiteGraph node modes: never, bypass

# the tiny run the tests make of a shipped graph: 2 blocks = 6 latent frames = 21 frames
TINY_SAMPLER = {"width": 32, "height": 32, "seconds": 1.0, "seed": 3}


def ui_to_api(ui: dict, info_of) -> dict:
    """Convert a UI workflow to the API format, as the frontend's graphToPrompt does for plain graphs:
    widget values are read positionally in input order (plus the control value after an input with
    control_after_generate), links become [node id, slot], the title goes to ``_meta.title``."""
    links = {ln[0]: ln for ln in ui.get("links", [])}
    api = {}
    for node in ui["nodes"]:
        if node["type"] in VIRTUAL_NODES or node.get("mode", 0) in BYPASSED_MODES:
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


def canonical(api: dict, info_of) -> dict:
    """An API graph for comparison: without ``_meta``, and without optional inputs that hold their
    declared default (a newer ComfyUI's node may have gained an optional widget, like CreateVideo's
    bit_depth in 2026, that its frontend fills in with the default: the same graph)."""
    out = {k: {"class_type": v["class_type"], "inputs": dict(v["inputs"])} for k, v in api.items()}
    for node in out.values():
        optional = info_of(node["class_type"])["input"].get("optional", {})
        node["inputs"] = {n: v for n, v in node["inputs"].items()
                          if not (n in optional and len(optional[n]) > 1 and isinstance(optional[n][1], dict)
                                  and "default" in optional[n][1] and v == optional[n][1]["default"])}
    return out


def with_test_nodes(api: dict, **sampler) -> dict:
    """A copy of a shipped API graph with the text encoder (nodes 2, 3) and VAE loader (4) replaced by
    the test nodes (random prompt embedding, random real Wan2.1 VAE) and a tiny video
    (``TINY_SAMPLER``, updated with ``sampler``) on the sampler (6)."""
    api = copy.deepcopy(api)
    del api["2"]
    api["3"] = {"class_type": "RFTestPromptEmbedding", "inputs": {"seed": 1, "tokens": 12, "width": 4096}}
    api["4"] = {"class_type": "RFTestRandomWanVAE", "inputs": {"seed": 0}}
    api["6"]["inputs"].update({**TINY_SAMPLER, **sampler})
    return api
