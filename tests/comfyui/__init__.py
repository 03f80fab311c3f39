"""Helpers for the tests that need a real ComfyUI checkout (``tests/test_comfy_*.py``), by job:

* ``env``: finds the checkout (``COMFYUI_PATH``), imports ComfyUI in-process (``--cpu`` unless asked
  otherwise) and loads this pack the way ComfyUI does; node classes and their ``/object_info`` entries;
  ComfyUI's prompt validation and executor; forcing the GPU dtype path and low-VRAM loading on a CPU.
* ``checkpoints``: tiny Wan2.1 DiT checkpoints in the release layouts and the model folders.
* ``inject_pack``: the test-only ComfyUI nodes (a random prompt embedding, a random real Wan2.1 VAE,
  a stand-in text encoder), loaded by ComfyUI from its file like a custom node.
* ``graphs``: UI -> API workflow conversion, graph comparison, swapping in the test nodes.
* ``server``: a real ComfyUI server subprocess with this pack.
* ``frontend``: the real ComfyUI frontend in headless Chromium.
* ``fixtures``: the pytest fixtures (registered by ``tests/conftest.py``).

``bench/gpu_smoke.py`` and ``scripts/make_workflows.py`` use them too (with the repository root on
sys.path). No module imports ComfyUI or playwright at import time (only ``inject_pack`` imports torch),
so the tests that need neither still collect and skip with the reason.
"""
