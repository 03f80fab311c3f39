"""Rolling Forcing sampler core: plain torch + einops + safetensors, no ComfyUI import.

Main entry points: :class:`rolling.sampler.RollingSampler` (streaming iterator over finished blocks),
:func:`rolling.sampler.sample_video`, :func:`rolling.loading.load_model`, :func:`rolling.model.build_model`.
"""
__version__ = "0.1.0"
