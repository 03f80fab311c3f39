"""Long videos in chunks, through any IMAGE -> IMAGE chain (upscalers, colour, VFX) in bounded RAM.

* ``RollingForcingChunkedSampler``: each queue run makes the next chunk of one long video (the run's
  full state is saved after every chunk, so the next run continues exactly where this one stopped;
  latents bit-equal to one long run) and outputs only that chunk's frames.
* ``RollingForcingAppendVideo``: appends each processed chunk to one MP4 that grows chunk by chunk
  (each chunk is encoded once into ``<run>.run/parts``; the video file is re-joined from the parts
  without re-encoding, always whole and playable).

Queue the workflow as many times as the run has chunks (batch count, or auto-queue: once the video is
complete the sampler blocks its outputs and nothing more is written). A killed ComfyUI resumes at the
first chunk that was not appended yet. The loop itself is in :mod:`nodes.sampler_run` and
:mod:`rolling.chunks`.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from ..rolling.chunks import ChunkPlan, ChunkedRun
from ..rolling.timing import Timeline
from ..rolling.video import StreamingVideoWriter, concat_videos
from . import comfy_adapter as comfy
from . import run_inputs
from .cache_config import RollingForcingCache
from .model_options import check_choice
from .names import CATEGORY
from .prompt_nodes import RollingForcingPrompts
from .sampler_run import SamplerRun

log = logging.getLogger("RollingForcing")
io, ui, ExecutionBlocker = comfy.io, comfy.ui, comfy.ExecutionBlocker
RollingForcingChunk = io.Custom("ROLLING_FORCING_CHUNK")
ADVANCE = ("after append", "after sampling")


@dataclass(frozen=True)
class ChunkTicket:
    """One chunk on its way from the sampler to the video: which chunk of which run, and where it goes."""

    run: ChunkedRun
    plan: ChunkPlan
    video: str  # the growing MP4
    fps: float
    frames: int  # frames the sampler output for this chunk
    advance_on_append: bool


def run_paths(run_name: str) -> tuple[str, str]:
    """(state folder, video file) of a run in ComfyUI's output folder."""
    base = os.path.join(comfy.folder_paths.get_output_directory(), run_inputs.check_run_name(run_name))
    return base + ".run", base + ".mp4"


class RollingForcingChunkedSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RollingForcingChunkedSampler",
            display_name="Rolling Forcing Chunked Sampler",
            category=f"{CATEGORY}/sampling",
            description=(
                "Makes a long video one chunk per queue run, so the nodes after it (upscalers, VFX) only ever "
                "hold one chunk of frames. Each run continues exactly where the last stopped (the same video as "
                "one long run) and outputs that chunk's frames; Rolling Forcing Append Video joins them into one "
                "MP4. Queue the workflow once per chunk (batch count, or auto-queue); the info output says how "
                "many. A killed ComfyUI resumes at the first chunk not appended yet."),
            inputs=[
                io.Model.Input("model", tooltip="Wan2.1 T2V DiT from Rolling Forcing Model Loader."),
                io.MultiType.Input(
                    io.Conditioning.Input("positive", tooltip="The prompt, or a timed schedule (Prompt Story / "
                                                              "Segment) timed over the whole video."),
                    types=[io.Conditioning, RollingForcingPrompts]),
                io.Vae.Input("vae", tooltip="The Wan2.1 VAE (wan_2.1_vae.safetensors): each chunk is decoded to IMAGE. "
                             "lighttaew2_1.safetensors (TAEHV, ComfyUI 0.33+) is faster at preview quality; "
                             "keep the same VAE for all chunks of a video."),
                io.Int.Input("width", default=run_inputs.DEFAULT_WIDTH, min=run_inputs.SIZE_MULTIPLE,
                             max=run_inputs.MAX_SIZE, step=run_inputs.SIZE_MULTIPLE, tooltip="Width, a multiple of 16."),
                io.Int.Input("height", default=run_inputs.DEFAULT_HEIGHT, min=run_inputs.SIZE_MULTIPLE,
                             max=run_inputs.MAX_SIZE, step=run_inputs.SIZE_MULTIPLE, tooltip="Height, a multiple of 16."),
                io.Float.Input("seconds", default=120.0, min=0.0625, max=run_inputs.MAX_SECONDS, step=0.25,
                               tooltip="Length of the whole video at 16 fps (rounded up to whole 0.75 s blocks)."),
                io.Float.Input("chunk_seconds", default=10.0, min=0.75, max=600.0, step=0.75,
                               tooltip="Length of one chunk (rounded up to whole blocks). RAM for the frames of one "
                                       "chunk at 832x480: ~77 MB per second before upscaling, x4 after a 2x upscale."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                             tooltip="Noise seed of the whole video; it stays fixed from run to run (a new seed "
                                     "mid-run is refused: use another run_name)."),
                io.String.Input("run_name", default="video/rolling_forcing_long",
                                tooltip="Names the video (<output>/<run_name>.mp4) and its state folder "
                                        "(<run_name>.run, several GB at 832x480 while the run goes on). Another name "
                                        "starts another video; changing a setting mid-run is refused."),
                io.String.Input("steps", default=run_inputs.DEFAULT_STEPS_TEXT, optional=True,
                                tooltip="Denoising steps (reference: 1000,800,600,400,200)."),
                RollingForcingCache.Input("cache", optional=True, tooltip="Cache settings (reference when not connected)."),
                io.Combo.Input("advance", options=list(ADVANCE), default=ADVANCE[0], optional=True,
                               tooltip="after append: the next run makes the next chunk only once Append Video has "
                                       "it (restart-safe). after sampling: every run moves on (no Append Video)."),
            ],
            outputs=[
                io.Image.Output(display_name="images", tooltip="This chunk's frames [N, H, W, 3] at 16 fps."),
                RollingForcingChunk.Output(display_name="chunk", tooltip="Connect to Rolling Forcing Append Video."),
                io.Latent.Output(display_name="latent", tooltip="This chunk's latent frames (Wan2.1 format)."),
                io.String.Output(display_name="info", tooltip="Which chunk this was, of how many, and the settings."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, run_name=None, seconds=None, chunk_seconds=None):
        def check():
            if run_name is not None:
                run_inputs.check_run_name(run_name)
            for v in (seconds, chunk_seconds):
                if v is not None:
                    run_inputs.plan_length(v)
        return comfy.validation(check)

    @classmethod
    def fingerprint_inputs(cls, run_name="", **_):
        """What changes whenever a chunked run moves on (ComfyUI re-runs the sampler then, and only then)."""
        try:
            folder = run_paths(run_name)[0]
            with open(os.path.join(folder, "progress.json"), "rb") as f:
                return f"{folder}:{f.read().decode(errors='replace')}"
        except (OSError, ValueError) as e:
            return f"{run_name}:{type(e).__name__}"

    @classmethod
    def execute(cls, model, positive, vae, width: int, height: int, seconds: float, chunk_seconds: float, seed: int,
                run_name: str, steps: str = run_inputs.DEFAULT_STEPS_TEXT, cache=None,
                advance: str = ADVANCE[0]) -> io.NodeOutput:
        check_choice("advance", advance, ADVANCE)
        folder, video = run_paths(run_name)
        run = SamplerRun.prepare(model, positive, width, height, seconds, seed, steps, cache, vae, False, 0.0, None)
        chunks = run.chunks(folder, chunk_seconds)
        plan = chunks.next_chunk()
        if plan is None:
            info = f"{video} is complete ({chunks.count} chunks); use another run_name for a new video"
            log.info("[RollingForcing] %s", info)
            return io.NodeOutput(ExecutionBlocker(None), ExecutionBlocker(None), ExecutionBlocker(None), info,
                                 ui=ui.PreviewText(info))
        if plan.index == 0 and chunks.progress()["made"] == 0 and os.path.exists(video):
            raise FileExistsError(f"{video} already exists and is not part of this run; choose another run_name or "
                                  "move the file away")
        tl = Timeline(run.cfg.frames_per_block)
        where = (f"chunk {plan.index + 1}/{plan.count}: {tl.clock(tl.block_start(plan.first))} to "
                 f"{tl.clock(tl.seconds(plan.first + plan.blocks))} of {tl.clock(tl.seconds(plan.total))}")
        log.info("[RollingForcing] %s -> %s", where, video)
        run.load()
        progress = comfy.block_progress(plan.blocks, cls.hidden.unique_id if cls.hidden else None)
        latent, frames = run.run(on_progress=progress, chunks=chunks)
        if advance == "after sampling":
            chunks.taken(plan.index)
        images = frames.reshape(-1, height, width, 3)
        info = f"{where} ({images.shape[0]} frames)\n{run.summary}"
        ticket = ChunkTicket(chunks, plan, video, run.length.fps, images.shape[0], advance == ADVANCE[0])
        return io.NodeOutput(images, ticket, {"samples": latent}, info, ui=ui.PreviewText(where))


class RollingForcingAppendVideo(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RollingForcingAppendVideo",
            display_name="Rolling Forcing Append Video",
            category=f"{CATEGORY}/video",
            description=("Appends one chunk of a chunked run (after any IMAGE processing, e.g. an upscaler) to the "
                         "run's MP4 (<output>/<run_name>.mp4, H.264). The file is whole and playable after every "
                         "chunk; its parts and the run's states are deleted when the last chunk is in."),
            inputs=[
                io.Image.Input("images", tooltip="The chunk's frames, processed or not (every chunk the same size)."),
                RollingForcingChunk.Input("chunk", tooltip="From Rolling Forcing Chunked Sampler's chunk output."),
                io.Boolean.Input("update_every_chunk", default=True, optional=True,
                                 tooltip="Re-join the MP4 after every chunk (a copy of the video so far, no "
                                         "re-encoding) so it can be watched while the run goes on; off: only after "
                                         "the last chunk (for hour-long runs with short chunks)."),
                io.Float.Input("fps", default=0.0, min=0.0, max=240.0, step=1.0, optional=True,
                               tooltip="Frame rate of the images; 0 = the sampler's (16). Set it after frame "
                                       "interpolation."),
            ],
            outputs=[
                io.Video.Output(display_name="video", tooltip="The video so far (the whole video after the last chunk)."),
                io.String.Output(display_name="info", tooltip="What was appended and where the video is."),
            ],
            is_output_node=True,
            not_idempotent=True,
        )

    @classmethod
    def execute(cls, images, chunk: ChunkTicket, update_every_chunk: bool = True, fps: float = 0.0) -> io.NodeOutput:
        if not isinstance(chunk, ChunkTicket):
            raise ValueError("chunk must come from Rolling Forcing Chunked Sampler's chunk output")
        if images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] == 0:
            raise ValueError(f"images must be frames [N, H, W, 3], got {list(images.shape)}")
        run, plan = chunk.run, chunk.plan
        taken = run.progress()["taken"]
        if chunk.advance_on_append and taken != plan.index:
            raise RuntimeError(f"chunk {plan.index + 1} of {chunk.video} was appended already (the run is at chunk "
                               f"{taken + 1}); queue the workflow again to make the next chunk")
        part = run.part(plan.index)
        tmp = part + ".tmp.mp4"
        if os.path.exists(tmp):
            os.remove(tmp)  # a chunk cut off by a crash
        with StreamingVideoWriter(tmp, images.shape[2], images.shape[1], fps=fps or chunk.fps) as writer:
            writer.write(images)
        os.replace(tmp, part)
        parts = [run.part(i) for i in range(plan.index + 1)]
        missing = [p for p in parts if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"{missing[0]} is missing, so {chunk.video} cannot be whole; start the run over "
                                    "(another run_name)")
        frames = concat_videos(parts, chunk.video) if update_every_chunk or plan.last else None
        if chunk.advance_on_append:
            run.taken(plan.index)
        if plan.last:
            run.finish()
        info = (f"chunk {plan.index + 1}/{plan.count} appended ({images.shape[0]} frames "
                f"{images.shape[2]}x{images.shape[1]})" + (f"; {chunk.video} has {frames} frames" if frames else "")
                + ("; the video is complete" if plan.last else ""))
        log.info("[RollingForcing] %s", info)
        if frames is None:
            return io.NodeOutput(ExecutionBlocker(None), info, ui=ui.PreviewText(info))
        sub = os.path.relpath(os.path.dirname(chunk.video), comfy.folder_paths.get_output_directory())
        shown = ui.PreviewVideo([ui.SavedResult(os.path.basename(chunk.video), "" if sub == "." else sub,
                                                io.FolderType.output)])
        return io.NodeOutput(comfy.InputImpl.VideoFromFile(chunk.video), info, ui=shown)
