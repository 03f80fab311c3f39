"""ComfyUI in this process: find the checkout, import it, load this pack the way ComfyUI does, and
reach its nodes, prompt validation and executor.

``comfyui()`` puts ``$COMFYUI_PATH`` first on ``sys.path`` (ComfyUI's ``nodes`` module must win over
this repository's ``nodes/`` package), sets ``--cpu`` (unless ``cpu=False``, for a GPU), registers
temporary model folders holding the tiny DiT checkpoint, and loads with ``nodes.load_custom_node``:
this pack, core's video nodes and the test-only injection pack (``inject_pack.py``). It is done once
per process; everything else here calls it.

Also: ComfyUI's dtype choice as on a CUDA GPU and its low-VRAM partial load, forced on a CPU
(``force_gpu_dtype_path``, ``force_lowvram``), for the dtype tests.
"""
from __future__ import annotations

import asyncio
import atexit
import inspect
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from . import inject_pack
from .checkpoints import model_folders

ROOT = Path(__file__).resolve().parents[2]
INJECT_PACK = Path(__file__).resolve().with_name("inject_pack.py")
PACK_DIR_NAME = "rolling-forcing"  # the pack's folder name in custom_nodes/

OUR_NODES = ("RollingForcingModelLoader", "RollingForcingCacheConfig", "RollingForcingSampler",
             "RollingForcingPromptStory", "RollingForcingPromptSegment", "RollingForcingChunkedSampler",
             "RollingForcingAppendVideo", "RollingForcingToyTextEncode", "RollingForcingToyDecode")

NO_COMFYUI = "COMFYUI_PATH not set: these tests need a ComfyUI checkout (see scripts/setup_comfyui.sh)"


def comfyui_path() -> str | None:
    """The ComfyUI checkout in ``$COMFYUI_PATH`` (absolute), or None when unset or not a checkout."""
    p = os.environ.get("COMFYUI_PATH")
    if p and os.path.isfile(os.path.join(p, "main.py")) and os.path.isdir(os.path.join(p, "comfy")):
        return os.path.abspath(p)
    return None


def missing_reason() -> str | None:
    """Why ComfyUI tests cannot run here (None when ``$COMFYUI_PATH`` is a checkout)."""
    if comfyui_path() is not None:
        return None
    if os.environ.get("COMFYUI_PATH"):
        return (f"COMFYUI_PATH={os.environ['COMFYUI_PATH']} is not a ComfyUI checkout (main.py, comfy/ missing); "
                "these tests need a real ComfyUI")
    return NO_COMFYUI


def require_comfyui() -> str:
    """The checkout's path; skips the calling test (with the reason) when there is none."""
    reason = missing_reason()
    if reason:
        import pytest

        pytest.skip(reason)
    return comfyui_path()


def run_coro(coro):
    """Run a coroutine to completion, also when this thread already runs an event loop (playwright)."""
    import concurrent.futures

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


_STATE: dict = {}


def comfyui(cpu: bool = True) -> dict:
    """Import ComfyUI in-process and load this pack as ComfyUI does (once per process). Returns a dict:
    ``nodes`` (ComfyUI's nodes module), ``pack`` (our package module as ComfyUI imported it: its
    ``pack.nodes.*`` and ``pack.rolling.*`` are the modules the nodes run), ``folder_paths``, ``tmp``
    (a temporary folder, removed at exit), ``models`` (its model folders: diffusion_models holds the
    tiny DiT as ``rolling_forcing_dmd.pt``), ``out`` (the output folder) and ``cpu``. Without a
    checkout it skips the running test, or outside a test raises RuntimeError."""
    if _STATE:
        if _STATE["cpu"] != cpu:
            raise RuntimeError(f"ComfyUI is already imported with cpu={_STATE['cpu']} in this process")
        return _STATE
    if os.environ.get("PYTEST_CURRENT_TEST"):  # inside a test: skip it with the reason
        path = require_comfyui()
    else:
        path = comfyui_path()
        if path is None:
            raise RuntimeError(missing_reason())
    while path in sys.path:
        sys.path.remove(path)
    sys.path.insert(0, path)
    mod = sys.modules.get("nodes")
    if mod is not None and not str(getattr(mod, "__file__", "")).startswith(path):
        del sys.modules["nodes"]  # this repository's nodes/ package, imported under ComfyUI's name
    import comfy.cli_args

    comfy.cli_args.args.cpu = cpu
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
        ok_video = True
        for extra in ("nodes_video.py", "nodes_upscale_model.py"):  # the shipped workflows' stock nodes
            ok_video &= await nodes.load_custom_node(os.path.join(path, "comfy_extras", extra),
                                                     module_parent="comfy_extras")
        ok_inject = await nodes.load_custom_node(str(INJECT_PACK), module_parent="custom_nodes")
        return ok, ok_video, ok_inject

    ok, ok_video, ok_inject = run_coro(load())
    if not ok:
        raise RuntimeError("ComfyUI could not load the Rolling Forcing pack (see the log above)")
    if not (ok_video and ok_inject):
        raise RuntimeError(f"ComfyUI could not load comfy_extras/nodes_video.py or nodes_upscale_model.py ({ok_video}) or {INJECT_PACK} "
                           f"({ok_inject}) (see the log above)")
    pack_name = str(ROOT).replace(".", "_x_")  # how load_custom_node names a package folder's module
    _STATE.update(nodes=nodes, pack=sys.modules[pack_name], folder_paths=folder_paths, tmp=tmp, models=tmp / "models",
                  out=out, cpu=cpu)
    return _STATE


def _loaded() -> dict:
    return _STATE or comfyui()


def comfyui_version() -> str:
    """The checkout's version (``comfyui_version.__version__``), or "unknown"."""
    _loaded()
    try:
        import comfyui_version

        return comfyui_version.__version__
    except ImportError:
        return "unknown"


# ----------------------------------------------------------------------------- nodes

def node_class(name: str):
    """A node class as registered in ComfyUI (``nodes.NODE_CLASS_MAPPINGS``)."""
    return _loaded()["nodes"].NODE_CLASS_MAPPINGS[name]


def prepared_node(name: str, unique_id: str):
    """The node class as ComfyUI's executor prepares it (hidden inputs filled in). ComfyUI 0.3.x takes the
    hidden inputs themselves, 0.33+ a ``V3Data`` dict holding them under ``hidden_inputs``."""
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
            "display_name": _loaded()["nodes"].NODE_DISPLAY_NAME_MAPPINGS.get(name, name)}


# ----------------------------------------------------------------------------- validation and execution

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


def validate(prompt: dict):
    """ComfyUI's own prompt validation: (ok, error, outputs, node_errors)."""
    _loaded()
    import execution

    return run_coro(execution.validate_prompt("test", prompt, None))


def run_prompt(prompt: dict, outputs: list[str] | None = None):
    """Validate and execute an API prompt in-process with ComfyUI's own executor (no cache).
    Returns (executor, validation result, stub server)."""
    valid = validate(prompt)
    import execution

    if not valid[0]:
        raise AssertionError(f"prompt failed validation: {valid[1]} {json.dumps(valid[3], default=str)[:2000]}")
    srv = StubServer()
    kw = {}
    if "cache_args" in inspect.signature(execution.PromptExecutor).parameters:  # ComfyUI 0.33+
        kw["cache_args"] = {"lru": 0, "ram": 0.0, "ram_inactive": 0.0}
    ex = execution.PromptExecutor(srv, cache_type=False, **kw)
    ex.execute(prompt, "test-prompt", {"client_id": srv.client_id}, outputs or valid[2])
    return ex, valid, srv


# ----------------------------------------------------------------------------- GPU paths, forced on a CPU

GPU_FLAVOURS = inject_pack.GPU_FLAVOURS


def force_gpu_dtype_path(monkeypatch, flavour: str) -> None:
    """Make ComfyUI choose dtypes as on a CUDA GPU of that flavour (see GPU_FLAVOURS), undone after
    the test. Affects the models and VAEs loaded afterwards. (The whole suite: RF_TEST_GPU_DTYPES.)"""
    inject_pack.force_gpu_dtypes(flavour, monkeypatch.setattr)


def compute_dtype(model):
    """The dtype the pack's sampler computes a MODEL in (as SamplerRun picks it): float32 on ComfyUI's CPU
    path, fp16/bf16 on a (forced) GPU path. Tests that compare the node with the core run the core in it."""
    pack = _loaded()["pack"]
    c = pack.nodes.comfy_adapter
    return pack.nodes.model_options.compute_dtype(*c.model_dtypes(model), c.bf16_supported(model.load_device))


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
