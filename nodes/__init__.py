"""The Rolling Forcing ComfyUI nodes (V3 schema, ``comfy_api.latest``).

* ``RollingForcingModelLoader`` (model_loader.py): checkpoint -> MODEL (ComfyUI's own Wan model).
* ``RollingForcingCacheConfig`` (cache_config.py): sink / span / capacity / update rules ->
  ROLLING_FORCING_CACHE.
* ``RollingForcingSampler`` (sampler.py): MODEL + CONDITIONING or prompt schedule (+ cache, VAE) ->
  LATENT, IMAGE, info.
* ``RollingForcingPromptStory`` / ``RollingForcingPromptSegment`` (prompt_nodes.py): timed prompts ->
  ROLLING_FORCING_PROMPTS.
* ``RollingForcingChunkedSampler`` / ``RollingForcingAppendVideo`` (chunk_nodes.py): a long video one
  chunk per queue run, through any IMAGE chain, appended to one MP4.
* ``RollingForcingToyTextEncode`` / ``RollingForcingToyDecode`` (toy_nodes.py): the toy world's caption ->
  CONDITIONING and LATENT -> IMAGE, for the loader's built-in toy model.

ComfyUI-free modules, tested without ComfyUI: ``run_inputs.py`` (sizes, lengths, step list and cache
settings -> RollingConfig, conditioning), ``model_options.py`` (what the loader offers and records),
``memory.py`` (the memory estimate and checks), ``prompt_logic.py`` (timed prompts between nodes).
``sampler_run.py`` runs one sampler job; ``stream_decode.py`` is the block-by-block decoder (Wan2.1 VAE or TAEHV);
``comfy_adapter.py`` is the only door to ComfyUI's internals. Outside ComfyUI (no ``comfy_api``
importable, e.g. in CI) this package imports without defining the extension.
"""
from __future__ import annotations

import importlib.util

if importlib.util.find_spec("comfy_api") is not None:
    from .comfy_adapter import ComfyExtension, io
    from .cache_config import RollingForcingCacheConfig
    from .chunk_nodes import RollingForcingAppendVideo, RollingForcingChunkedSampler
    from .model_loader import RollingForcingModelLoader
    from .prompt_nodes import RollingForcingPromptSegment, RollingForcingPromptStory
    from .sampler import RollingForcingSampler
    from .toy_nodes import RollingForcingToyDecode, RollingForcingToyTextEncode

    NODES = [RollingForcingModelLoader, RollingForcingCacheConfig, RollingForcingSampler,
             RollingForcingPromptStory, RollingForcingPromptSegment, RollingForcingChunkedSampler,
             RollingForcingAppendVideo, RollingForcingToyTextEncode, RollingForcingToyDecode]

    class RollingForcingExtension(ComfyExtension):
        """Lists the pack's nodes for ComfyUI (returned by the pack's ``comfy_entrypoint``)."""

        async def get_node_list(self) -> list[type[io.ComfyNode]]:
            return list(NODES)

    __all__ = ["RollingForcingExtension", "NODES"]
