"""The real ComfyUI frontend (the ``comfyui-frontend-package`` a server serves) in headless Chromium,
driven with playwright: load a UI workflow and convert it to API form, turn an API graph into a UI
workflow, and render a workflow's template thumbnail.

Needs playwright (never run ``playwright install``) and a Chromium binary (``$CHROMIUM``, default
/usr/bin/chromium); ``browser_available()`` says why not when they are missing.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
VIEWPORT = {"width": 1600, "height": 900}  # where thumbnails are rendered (and the saved view is fitted)


def browser_available() -> str | None:
    """None if headless Chromium + playwright are usable, else the reason they are not."""
    try:
        import playwright.sync_api  # noqa: F401
    except Exception as e:
        return f"playwright is not importable ({e.__class__.__name__}: {e}); pip install playwright"
    if not os.path.exists(CHROMIUM):
        return f"no Chromium at {CHROMIUM} (set CHROMIUM=/path/to/chromium)"
    return None


@contextlib.contextmanager
def frontend(server):
    """A headless-Chromium page with the real ComfyUI frontend loaded from ``server`` (a ComfyServer);
    ``page.errors`` collects the page's uncaught errors."""
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
    """Load a UI workflow into the frontend: {"api": its API form (graphToPrompt), "missing": node types
    the frontend does not know (or that have errors), "types": the node types on the canvas}."""
    return page.evaluate("""async (ui) => {
        await window.app.loadGraphData(ui, true, true, 'test.json');
        const missing = window.app.graph._nodes
            .filter(n => !(n.type in LiteGraph.registered_node_types) || n.has_errors)
            .map(n => n.type);
        const p = await window.app.graphToPrompt();
        return {api: p.output, missing: missing, types: window.app.graph._nodes.map(n => n.type)};
    }""", ui)


def frontend_api_to_ui(page, api: dict, note: str | None = None, note_title: str = "Read me") -> dict:
    """API graph -> UI workflow with the real frontend (loadApiJson + graph.serialize), plus a Note node
    below the graph when ``note`` is given."""
    return page.evaluate("""async ([api, note, title]) => {
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
            n.title = title;
            window.app.graph.add(n);
        }
        // as the frontend writes it to a file: JSON (undefined fields dropped)
        return JSON.parse(JSON.stringify(window.app.graph.serialize()));
    }""", [api, note, note_title])


def frontend_thumbnail(page, ui: dict, path: Path | None, size=(800, 450)) -> dict:
    """Show the workflow in the frontend with the whole graph fitted into the view (menus hidden) and,
    when ``path`` is given, save a screenshot there as the template thumbnail (.jpg, ``size``).
    Returns the view it used ({"scale", "offset"}: what a UI workflow stores in ``extra.ds``)."""
    from PIL import Image

    page.set_viewport_size(VIEWPORT)
    page.keyboard.press("Escape")  # the first-run template dialog, if open
    ds = page.evaluate("""async (ui) => {
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
        return {scale: c.ds.scale, offset: [c.ds.offset[0], c.ds.offset[1]]};
    }""", ui)
    if path is not None:
        page.wait_for_timeout(1500)
        path = Path(path)
        tmp = path.with_suffix(".png")
        page.screenshot(path=str(tmp))
        Image.open(tmp).convert("RGB").resize(size, Image.LANCZOS).save(path, quality=85, optimize=True)
        tmp.unlink()
    return ds
