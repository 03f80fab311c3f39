"""Rolling Forcing Sampler: MODEL + prompt -> a LATENT video (ComfyUI's Wan21 convention) and, with a
VAE connected, its frames as IMAGE, decoded block by block while sampling.

Thin: the inputs are declared here; checking them and sampling is :class:`nodes.sampler_run.SamplerRun`
(the core's sampler and block loop over ComfyUI's own Wan module tree and VAE).
"""
from __future__ import annotations

import logging
from fractions import Fraction

from . import comfy_adapter as comfy
from . import run_inputs
from .cache_config import RollingForcingCache
from .names import CATEGORY
from .prompt_nodes import RollingForcingPrompts
from .sampler_run import SamplerRun

log = logging.getLogger("RollingForcing")
io, ui, ExecutionBlocker = comfy.io, comfy.ui, comfy.ExecutionBlocker

NO_VAE_MESSAGE = ("Rolling Forcing Sampler: the IMAGE output needs a VAE; connect Load VAE "
                  "(wan_2.1_vae.safetensors) to the sampler's vae input, or decode the LATENT with VAE Decode")


class RollingForcingSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RollingForcingSampler",
            display_name="Rolling Forcing Sampler",
            category=f"{CATEGORY}/sampling",
            description=(
                "Streams a text-to-video clip of any length with Rolling Forcing on a Wan2.1-T2V-1.3B model: a "
                "rolling window of 5 blocks is denoised jointly, with an attention sink and a fixed-size KV "
                "cache, so memory stays flat however long the video. The length is rounded up to whole blocks "
                "(3 latent frames = 12 frames at 16 fps). Outputs a LATENT for VAE Decode; with a VAE connected "
                "each block is also decoded as soon as it is finished (identical to decoding at the end)."),
            inputs=[
                io.Model.Input("model", tooltip="Wan2.1 T2V DiT from Rolling Forcing Model Loader (or Load Diffusion "
                                                "Model with a converted .safetensors)."),
                io.MultiType.Input(
                    io.Conditioning.Input("positive", tooltip="The prompt: CLIPTextEncode with a CLIPLoader of type wan "
                                                              "(umT5-XXL), or a timed schedule from Rolling Forcing "
                                                              "Prompt Story / Prompt Segment. Padded or cut to 512 "
                                                              "tokens like the reference (the toy model: its 16). No "
                                                              "negative prompt is used (distilled model)."),
                    types=[io.Conditioning, RollingForcingPrompts]),
                io.Int.Input("width", default=run_inputs.DEFAULT_WIDTH, min=run_inputs.SIZE_MULTIPLE, max=run_inputs.MAX_SIZE,
                             step=run_inputs.SIZE_MULTIPLE,
                             tooltip="Video width in pixels, a multiple of 16. The model was trained at 832x480."),
                io.Int.Input("height", default=run_inputs.DEFAULT_HEIGHT, min=run_inputs.SIZE_MULTIPLE, max=run_inputs.MAX_SIZE,
                             step=run_inputs.SIZE_MULTIPLE,
                             tooltip="Video height in pixels, a multiple of 16. The model was trained at 832x480."),
                io.Float.Input("seconds", default=run_inputs.DEFAULT_SECONDS, min=0.0625, max=run_inputs.MAX_SECONDS, step=0.25,
                               tooltip="Length at 16 fps, rounded up to whole blocks of 12 frames (the node's text "
                                       "output and log say the exact frame count). 5 s = 81 frames."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Noise seed; every block's noise is derived from it, so runs are reproducible "
                                     "on the same device."),
                io.String.Input("steps", default=run_inputs.DEFAULT_STEPS_TEXT, optional=True,
                                tooltip="Denoising steps, comma separated, strictly decreasing, in 1..1000 "
                                        "(reference: 1000,800,600,400,200). Their number is the window length in "
                                        "blocks. Blank = reference."),
                RollingForcingCache.Input("cache", optional=True,
                                          tooltip="Cache settings from Rolling Forcing Cache Settings; reference "
                                                  "settings when not connected."),
                io.Vae.Input("vae", optional=True,
                             tooltip="Optional Wan2.1 VAE (wan_2.1_vae.safetensors): each finished block is decoded "
                                     "right away, shown as the preview and returned as IMAGE. Load VAE with "
                                     "lighttaew2_1.safetensors (TAEHV, ComfyUI 0.33+) decodes many times faster "
                                     "at preview quality."),
                io.Boolean.Input("stream_to_disk", default=False, optional=True,
                                 tooltip="For long videos (needs the VAE): write each decoded block to an MP4 in the "
                                         "output folder as it is made (H.264, 16 fps, fragmented: playable even if "
                                         "the run is cancelled or crashes). RAM stays bounded: IMAGE and LATENT then "
                                         "hold only the last `keep_seconds`."),
                io.String.Input("filename_prefix", default="video/rolling_forcing", optional=True,
                                tooltip="Where stream_to_disk writes, relative to the output folder."),
                io.Float.Input("keep_seconds", default=5.0, min=0.0, max=600.0, step=0.25, optional=True,
                               tooltip="With stream_to_disk: how much of the end of the video the IMAGE and LATENT "
                                       "outputs keep (0 = only the last block)."),
                io.Latent.Input("extend_from", optional=True,
                                tooltip="Continue a video: Wan2.1 latent frames (e.g. a previous run's LATENT, an "
                                        "encoded clip, or one encoded image) are written into the cache first and "
                                        "`seconds` of new video follow them. The outputs hold the new part only."),
            ],
            outputs=[
                io.Latent.Output(display_name="latent",
                                 tooltip="The video latent [1, 16, frames, H/8, W/8] in ComfyUI's Wan2.1 format "
                                         "(works with VAE Decode, Save Latent, ...)."),
                io.Image.Output(display_name="images",
                                tooltip="Decoded frames [N, H, W, 3] at 16 fps (only when a VAE is connected), "
                                        "e.g. for Create Video."),
                io.String.Output(display_name="info",
                                 tooltip="What the run did: frames, blocks, settings and memory estimate."),
                io.Video.Output(display_name="video",
                                tooltip="The video at 16 fps: the streamed MP4 file with stream_to_disk, otherwise "
                                        "the decoded frames (needs the VAE)."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, width=None, height=None, seconds=None, steps=None):
        def check():
            for name, v in (("width", width), ("height", height)):
                if v is not None:
                    run_inputs.check_dimension(name, v)
            if seconds is not None:
                run_inputs.plan_length(seconds)
            if steps is not None:
                run_inputs.sampler_config(None, steps)
        return comfy.validation(check)

    @classmethod
    def execute(cls, model, positive, width: int, height: int, seconds: float, seed: int,
                steps: str = run_inputs.DEFAULT_STEPS_TEXT, cache=None, vae=None, stream_to_disk: bool = False,
                filename_prefix: str = "video/rolling_forcing", keep_seconds: float = 5.0,
                extend_from=None) -> io.NodeOutput:
        run = SamplerRun.prepare(model, positive, width, height, seconds, seed, steps, cache, vae, stream_to_disk,
                                 keep_seconds, extend_from)
        for line in run.summary.splitlines():
            log.info("[RollingForcing] %s", line)
        run.load()
        writer, file, subfolder = run.open_writer(filename_prefix) if stream_to_disk else (None, None, None)
        progress = comfy.block_progress(run.length.blocks, cls.hidden.unique_id if cls.hidden else None)
        latent, frames = run.run(writer, progress)
        info = run.summary + f"\nfinished {run.length.blocks} block(s) -> {run.length.frames} frames"
        log.info("[RollingForcing] finished %d block(s) -> %d frames", run.length.blocks, run.length.frames)
        images = ExecutionBlocker(NO_VAE_MESSAGE) if frames is None else frames.reshape(-1, height, width, 3)
        if writer is not None:
            info += f"\nstreamed to {writer.path}; IMAGE/LATENT keep the last {frames.shape[1]} frames"
            video = comfy.InputImpl.VideoFromFile(str(writer.path))
            shown = ui.PreviewVideo([ui.SavedResult(file, subfolder, io.FolderType.output)])
        elif frames is not None:
            video = comfy.InputImpl.VideoFromComponents(comfy.Types.VideoComponents(
                images=images[:frames.shape[1]], frame_rate=Fraction(run.length.fps)))
            shown = ui.PreviewText(info)
        else:
            video, shown = ExecutionBlocker(NO_VAE_MESSAGE), ui.PreviewText(info)
        return io.NodeOutput({"samples": latent}, images, info, video, ui=shown)
