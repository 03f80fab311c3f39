"""The pack in a real ComfyUI server (subprocess, CPU, loopback) and the real frontend (headless
Chromium): node registration, the shipped workflows (served as templates, loaded by the frontend
with no missing node types, converted to API form), an end-to-end run of the t2v graph over HTTP
with progress and previews on the websocket, and an interruption via POST /interrupt.

Needs COMFYUI_PATH (skipped otherwise); the frontend checks also need chromium + playwright and the
websocket checks websocket-client (each skipped with the reason when missing). The text encoder and
VAE are replaced by the test injection nodes (random prompt embedding, random real Wan2.1 VAE).
"""
from __future__ import annotations

import json
import time
import uuid

import pytest

from scripts import workflow_source as W
from tests.comfyui import env
from tests.comfyui.frontend import frontend_api_to_ui, frontend_load_ui
from tests.comfyui.graphs import canonical, ui_to_api, with_test_nodes

pytestmark = pytest.mark.comfy


def websocket_client():
    try:
        import websocket
    except ImportError as e:
        pytest.skip(f"websocket-client not installed ({e}); pip install websocket-client")
    return websocket


# ----------------------------------------------------------------------------- registration

def test_server_loads_the_pack_without_errors(server, object_info):
    for name in env.OUR_NODES:
        assert name in object_info, f"{name} missing from /object_info"
        node = object_info[name]
        assert node["category"].startswith("RollingForcing/") and node["description"]
        assert node["python_module"].startswith("custom_nodes.")
    log = server.log_text()
    assert env.PACK_DIR_NAME in log  # listed in the import-times table
    bad = [ln for ln in log.splitlines()
           if env.PACK_DIR_NAME in ln and ("IMPORT FAILED" in ln or "Cannot import" in ln)]
    assert not bad, bad
    assert "Traceback" not in log.split("Import times for custom nodes")[-1].split("Starting server")[0]


def test_workflows_are_served_as_templates(server):
    templates = server.get("/workflow_templates")
    assert {n[:-5] for n in W.WORKFLOW_FILES} <= set(templates.get(env.PACK_DIR_NAME, []))
    for name in W.WORKFLOW_FILES:
        served = server.get(f"/api/workflow_templates/{env.PACK_DIR_NAME}/{name}")
        assert served == W.load_workflow(name)
        thumb = server.get_bytes(f"/api/workflow_templates/{env.PACK_DIR_NAME}/{W.thumbnail_name(name)}")
        assert thumb == (W.WORKFLOWS / W.thumbnail_name(name)).read_bytes()


@pytest.mark.parametrize("name, variant", list(W.WORKFLOW_FILES.items()))
def test_workflow_converts_to_the_expected_api_graph(object_info, name, variant):
    api = ui_to_api(W.load_workflow(name), object_info.__getitem__)
    info = object_info.__getitem__
    assert canonical(api, info) == canonical(W.api_graph(variant), info)


# ----------------------------------------------------------------------------- real frontend

@pytest.mark.parametrize("name, variant", list(W.WORKFLOW_FILES.items()))
def test_frontend_loads_workflow_without_missing_nodes(server, object_info, page, name, variant):
    ui = page.evaluate("async (url) => await (await fetch(url)).json()",
                       f"/api/workflow_templates/{env.PACK_DIR_NAME}/{name}")
    res = frontend_load_ui(page, ui)
    assert res["missing"] == [], f"node types the frontend does not know: {res['missing']}"
    assert sorted(res["types"]) == sorted(n["type"] for n in ui["nodes"])
    # the frontend's own UI -> API conversion equals ours and the intended graph
    info = object_info.__getitem__
    assert canonical(res["api"], info) == canonical(ui_to_api(ui, info), info)
    assert canonical(res["api"], info) == canonical(W.api_graph(variant), info)
    # and it passes ComfyUI's own prompt validation (in-process ComfyUI with the same pack and files)
    ok, err, outputs, node_errors = env.validate(res["api"])
    assert ok and outputs == [W.output_node(variant)], (err, node_errors)


def test_frontend_api_to_ui_roundtrip(page, object_info):
    ui = frontend_api_to_ui(page, W.api_graph())
    back = frontend_load_ui(page, ui)
    info = object_info.__getitem__
    assert back["missing"] == [] and canonical(back["api"], info) == canonical(W.api_graph(), info)


# ----------------------------------------------------------------------------- running over HTTP

def _listen(server, client_id):
    ws = websocket_client().WebSocket()
    ws.connect(f"ws://127.0.0.1:{server.port}/ws?clientId={client_id}", timeout=600)
    return ws


def _queue(server, api, client_id):
    status, body = server.post("/prompt", {"prompt": api, "client_id": client_id})
    assert status == 200 and not body.get("node_errors"), body
    return body["prompt_id"]


def test_server_runs_the_t2v_graph_with_progress_and_previews(server, object_info):
    import av

    cid = uuid.uuid4().hex
    ws = _listen(server, cid)
    api = with_test_nodes(ui_to_api(W.load_workflow("rolling_forcing_t2v.json"), object_info.__getitem__))
    t0 = time.perf_counter()
    pid = _queue(server, api, cid)
    progress, previews, done = [], 0, False
    try:
        while not done:
            msg = ws.recv()
            if isinstance(msg, bytes):
                previews += 1
                continue
            m = json.loads(msg)
            d = m.get("data", {})
            if m["type"] == "progress" and d.get("node") == "6":
                progress.append((d["value"], d["max"]))
            elif m["type"] == "execution_error":
                pytest.fail(f"execution error: {d.get('exception_message')}\n{server.log_text()[-3000:]}")
            elif m["type"] == "executing" and d.get("node") is None and d.get("prompt_id") == pid:
                done = True
    finally:
        ws.close()
    took = time.perf_counter() - t0
    hist = server.wait_history(pid)
    assert hist["status"]["status_str"] == "success"
    assert progress == [(1, 2), (2, 2)]
    assert previews >= 2  # the newest decoded frame of each block
    entry = hist["outputs"]["8"]["images"][0]
    path = server.dir / "output" / entry["subfolder"] / entry["filename"]
    with av.open(str(path)) as c:
        assert sum(1 for _ in c.decode(video=0)) == 21
        assert c.streams.video[0].average_rate == 16
    assert "21 frames" in hist["outputs"]["6"]["text"][0]
    print(f"\nserver t2v run: {took:.2f} s, {previews} previews, {path.name}")


def test_server_interrupt_stops_the_sampler_quickly(server, object_info):
    cid = uuid.uuid4().hex
    ws = _listen(server, cid)
    api = with_test_nodes(W.api_graph(), seconds=12.0, seed=11)  # 17 blocks: would take much longer than the test
    api["6"]["inputs"]["width"] = 64
    pid = _queue(server, api, cid)
    interrupted_at = seen = None
    try:
        while True:
            msg = ws.recv()
            if isinstance(msg, bytes):
                continue
            m = json.loads(msg)
            d = m.get("data", {})
            if m["type"] == "progress" and d.get("node") == "6" and interrupted_at is None:
                seen = d["value"], d["max"]
                server.post("/interrupt", {})
                interrupted_at = time.perf_counter()
            elif m["type"] in ("execution_interrupted", "execution_success", "execution_error") \
                    and d.get("prompt_id") == pid:
                break
    finally:
        ws.close()
    latency = time.perf_counter() - interrupted_at
    assert m["type"] == "execution_interrupted" and m["data"]["node_id"] == "6", m
    assert seen[0] < seen[1]
    hist = server.wait_history(pid)
    assert hist["status"]["status_str"] == "error"
    assert latency < 30, f"took {latency:.1f} s to stop"
    print(f"\nserver interrupt after block {seen[0]}/{seen[1]}: stopped {latency:.2f} s after POST /interrupt")
