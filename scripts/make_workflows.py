#!/usr/bin/env python
"""Regenerate the shipped workflows (workflows/*.json) and their template thumbnails (.jpg) from their
source of truth, scripts/workflow_source.py, with the real ComfyUI frontend.

For each workflow: the source's API graph is loaded into the frontend (``loadApiJson``), laid out
and serialized as a UI workflow with the "Read me" note added; the loaders get their model download
lists (``properties.models``) and the file its stable id; the view saved with it (``extra.ds``) fits
the whole graph. The file is then loaded back into the frontend, which must know every node and
convert it to the source's graph, and a screenshot of it becomes the thumbnail.

Needs a ComfyUI checkout (COMFYUI_PATH; use the oldest supported one, 0.3.64, whose frontend's
files the newer frontends read too), playwright and Chromium (CHROMIUM, default /usr/bin/chromium):

    COMFYUI_PATH=/work/comfyui/0.3.64 PYTHONPATH=/work/comfyui_shims python scripts/make_workflows.py

Afterwards run the tests that check workflows/ against the source and in both frontends:
``python -m pytest -m comfy tests/test_comfy_workflow_source.py tests/test_comfy_workflows.py``
(once per ComfyUI version).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # scripts.* and tests.comfyui.* are imported from the repository root
    sys.path.insert(0, str(ROOT))

from scripts import workflow_source as W  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=W.WORKFLOWS, help="folder to write to (default: workflows/)")
    p.add_argument("--only", action="append", choices=sorted(W.WORKFLOW_FILES), metavar="NAME",
                   help="regenerate only this file (repeatable); default: all")
    p.add_argument("--no-thumbnails", action="store_true", help="write the .json files only")
    a = p.parse_args(argv)

    from tests.comfyui.env import missing_reason
    from tests.comfyui.frontend import browser_available, frontend, frontend_api_to_ui, frontend_load_ui, \
        frontend_thumbnail
    from tests.comfyui.graphs import canonical
    from tests.comfyui.server import ComfyServer

    reason = missing_reason() or browser_available()
    if reason:
        print(f"cannot regenerate the workflows: {reason}", file=sys.stderr)
        return 2
    a.out.mkdir(parents=True, exist_ok=True)
    names = a.only or list(W.WORKFLOW_FILES)
    with tempfile.TemporaryDirectory(prefix="rf_wf_") as tmp, ComfyServer(Path(tmp)) as server, \
            frontend(server) as page:
        info = server.get("/object_info", timeout=120).__getitem__
        for name in names:
            variant = W.WORKFLOW_FILES[name]
            api = W.api_graph(variant)
            ui = W.add_model_properties(frontend_api_to_ui(page, api, W.note_text(variant), W.NOTE_TITLE), variant)
            ui["id"] = W.workflow_id(name)
            back = frontend_load_ui(page, ui)
            if back["missing"]:
                raise SystemExit(f"{name}: the frontend does not know {back['missing']}")
            if canonical(back["api"], info) != canonical(api, info):
                raise SystemExit(f"{name}: the frontend reads the generated file as another graph: {back['api']}")
            thumb = None if a.no_thumbnails else a.out / W.thumbnail_name(name)
            ui.setdefault("extra", {})["ds"] = frontend_thumbnail(page, ui, thumb)
            (a.out / name).write_text(W.dump_workflow(ui))
            print(f"wrote {a.out / name} ({len(ui['nodes'])} nodes)" + (f" and {thumb.name}" if thumb else ""))
            if page.errors:
                print(f"  frontend errors meanwhile: {page.errors}", file=sys.stderr)
                page.errors.clear()
    return 0


if __name__ == "__main__":
    sys.exit(main())
