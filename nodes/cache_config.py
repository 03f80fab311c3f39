"""Rolling Forcing Cache Settings: schedule, attention sink, attention span, KV-cache capacity and update
rules, as a RollingConfig (the pack's ROLLING_FORCING_CACHE socket; the sampler sets the steps).

Defaults reproduce the published sampler; the sampler uses the defaults when nothing is connected.
"""
from __future__ import annotations

from ..rolling.config import ROPE_MODES, SCHEDULES, UPDATE_MODES, RollingConfig
from . import comfy_adapter as comfy
from .names import CACHE_TYPE, CATEGORY
from .run_inputs import CACHE_LIMITS, cache_config

io = comfy.io
RollingForcingCache = io.Custom(CACHE_TYPE)


class RollingForcingCacheConfig(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        d = RollingConfig()
        lim = CACHE_LIMITS
        return io.Schema(
            node_id="RollingForcingCacheConfig",
            display_name="Rolling Forcing Cache Settings",
            category=f"{CATEGORY}/sampling",
            description=(
                "Attention-sink and KV-cache settings of the Rolling Forcing sampler (units: latent frames; one "
                "block = 3 latent frames = 12 video frames). The defaults reproduce the published sampler; "
                "invalid combinations are refused with a message saying which values are allowed."),
            inputs=[
                io.Int.Input("sink_blocks", default=d.sink_blocks, min=lim["sink_blocks"][0], max=lim["sink_blocks"][1],
                             tooltip="Blocks at the start of the video kept forever as the attention sink "
                                     "(anchors identity and colours over long videos). 0 disables the sink. "
                                     "Reference: 1."),
                io.Int.Input("span_frames", default=d.span_frames, min=lim["span_frames"][0],
                             max=lim["span_frames"][1],
                             tooltip="Latent frames one attention call may see: sink + recent clean frames + the "
                                     "denoising window. Must be at least window (steps x 3) + sink frames. "
                                     "Reference: 21."),
                io.Int.Input("capacity_frames", default=d.capacity_frames, min=lim["capacity_frames"][0],
                             max=lim["capacity_frames"][1], step=3,
                             tooltip="Latent frames the KV cache holds (sink + most recent clean blocks); a "
                                     "multiple of 3, at least sink + 3. Memory grows linearly with it. "
                                     "Reference: 24."),
                io.Float.Input("context_noise", default=d.context_noise, min=lim["context_noise"][0],
                               max=lim["context_noise"][1], step=1.0,
                               tooltip="Timestep (0-999) given to the pass that writes a finished block into the "
                                       "cache; 0 = clean, as in the reference."),
                io.Combo.Input("update_mode", options=list(UPDATE_MODES), default=d.update_mode,
                               tooltip="fused (default): the pass that writes a finished block into the cache rides "
                                       "in the next window's forward, about half the forwards; bit-equal to the "
                                       "published sampler in bf16 (within 3e-6 in fp32). reference: a separate "
                                       "clean-cache forward after every window, exactly as published."),
                io.Combo.Input("rope_mode", options=list(ROPE_MODES), default=d.rope_mode,
                               tooltip="RoPE positions: reference (absolute frame positions, as published) or "
                                       "relative (positions relative to the attention span)."),
                io.Combo.Input("schedule", options=list(SCHEDULES), default=d.schedule, optional=True,
                               tooltip="rolling: Rolling Forcing's joint window of staggered noise levels (what the "
                                       "checkpoint was trained for). chunk_causal: Self-Forcing / CausVid sampling, "
                                       "one block at a time through all steps (for Self-Forcing checkpoints; set the "
                                       "steps to 1000,750,500,250 and span to 21 with no sink for its defaults)."),
            ],
            outputs=[RollingForcingCache.Output(display_name="cache",
                                                tooltip="Cache settings for the cache input of Rolling Forcing "
                                                        "Sampler.")],
        )

    @classmethod
    def validate_inputs(cls, sink_blocks=None, span_frames=None, capacity_frames=None, context_noise=None,
                        update_mode=None, rope_mode=None, schedule="rolling"):
        values = (sink_blocks, span_frames, capacity_frames, context_noise, update_mode, rope_mode, schedule)
        if any(v is None for v in values):  # a linked value: checked when the node runs
            return True
        return comfy.validation(cache_config, *values)

    @classmethod
    def execute(cls, sink_blocks: int, span_frames: int, capacity_frames: int, context_noise: float,
                update_mode: str, rope_mode: str, schedule: str = "rolling") -> io.NodeOutput:
        return io.NodeOutput(cache_config(sink_blocks, span_frames, capacity_frames, context_noise, update_mode,
                                          rope_mode, schedule))
