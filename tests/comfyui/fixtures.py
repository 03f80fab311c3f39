"""pytest fixtures of the ComfyUI tests (registered in ``tests/conftest.py`` with ``pytest_plugins``).

Each one skips its test with the reason when ComfyUI (``$COMFYUI_PATH``), or for ``page`` a browser,
is not there.

* ``cu``: the in-process ComfyUI with this pack (``env.comfyui()``), CPU.
* ``model``: the tiny DiT through Rolling Forcing Model Loader (ema weights, sdpa), per module.
* ``vae``: the random real Wan2.1 VAE (injection node, seed 0), per module.
* ``cond``: a random umT5-like CONDITIONING [1, 512, 4096] (seed 1, 12 tokens).
* ``progress``: records ComfyUI ProgressBar updates as (value, total, preview, node_id).
* ``server``: a ComfyUI server subprocess (``server.ComfyServer``), per module; ``object_info`` its
  /object_info; ``page``: the real frontend from it in headless Chromium, per module.
"""
from __future__ import annotations

import pytest

from scripts.workflow_source import MODEL_FILES

from . import env


@pytest.fixture(scope="module")
def cu():
    env.require_comfyui()
    return env.comfyui()


@pytest.fixture(scope="module")
def model(cu):
    return env.node_class("RollingForcingModelLoader").execute(MODEL_FILES["dit"]["name"], "ema", "default",
                                                               "sdpa")[0]


@pytest.fixture(scope="module")
def vae(cu):
    return env.node_class("RFTestRandomWanVAE")().run(0)[0]


@pytest.fixture
def cond(cu):
    return env.node_class("RFTestPromptEmbedding")().run(1, 12, 4096)[0]


@pytest.fixture
def progress(cu):
    """Record ProgressBar updates (value, total, preview, node_id) through ComfyUI's global hook."""
    import comfy.utils

    events = []
    old = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda v, t, p, node_id=None, **kw: events.append((v, t, p, node_id)))
    yield events
    comfy.utils.set_progress_bar_global_hook(old)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from .server import ComfyServer

    env.require_comfyui()
    with ComfyServer(tmp_path_factory.mktemp("comfy_server")) as s:
        yield s


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info", timeout=120)


@pytest.fixture(scope="module")
def page(request):
    from .frontend import browser_available, frontend

    env.require_comfyui()
    reason = browser_available()
    if reason:
        pytest.skip(f"real-frontend checks skipped: {reason}")
    with frontend(request.getfixturevalue("server")) as p:
        yield p
