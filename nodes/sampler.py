"""Rolling Forcing Sampler: MODEL + prompt -> a LATENT video (ComfyUI's Wan21 convention) and, with a
VAE connected, its frames as IMAGE, decoded block by block while sampling.

Thin: inputs are checked with ``nodes.logic``, sampling is the core's ``RollingSampler.stream``
over ComfyUI's own Wan module tree, decoding is ``nodes.stream_decode``.
"""
from __future__ import annotations

import logging
import os
import traceback
from collections import deque
from fractions import Fraction

import torch
from PIL import Image

from ..rolling.forward import WanArch
from ..rolling.preview import latent_to_rgb
from ..rolling.sampler import RollingSampler
from ..rolling.timing import pixel_frames
from ..rolling.video import StreamingVideoWriter
from . import comfy_adapter as comfy
from . import logic
from .cache_config import RollingForcingCache
from .model_loader import model_problem
from .prompt_logic import PromptList, build_schedule, describe
from .prompt_nodes import RollingForcingPrompts
from .stream_decode import StreamingVAEDecoder, check_wan21_vae

io, ui, ExecutionBlocker, folder_paths = comfy.io, comfy.ui, comfy.ExecutionBlocker, comfy.folder_paths

log = logging.getLogger("RollingForcing")

NO_VAE_MESSAGE = ("Rolling Forcing Sampler: the IMAGE output needs a VAE; connect Load VAE "
                  "(wan_2.1_vae.safetensors) to the sampler's vae input, or decode the LATENT with VAE Decode")


class RollingForcingSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RollingForcingSampler",
            display_name="Rolling Forcing Sampler",
            category=f"{logic.CATEGORY}/sampling",
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
                                                              "tokens like the reference. No negative prompt is used "
                                                              "(distilled model)."),
                    types=[io.Conditioning, RollingForcingPrompts]),
                io.Int.Input("width", default=logic.DEFAULT_WIDTH, min=logic.SIZE_MULTIPLE, max=logic.MAX_SIZE,
                             step=logic.SIZE_MULTIPLE,
                             tooltip="Video width in pixels, a multiple of 16. The model was trained at 832x480."),
                io.Int.Input("height", default=logic.DEFAULT_HEIGHT, min=logic.SIZE_MULTIPLE, max=logic.MAX_SIZE,
                             step=logic.SIZE_MULTIPLE,
                             tooltip="Video height in pixels, a multiple of 16. The model was trained at 832x480."),
                io.Float.Input("seconds", default=logic.DEFAULT_SECONDS, min=0.0625, max=logic.MAX_SECONDS, step=0.25,
                               tooltip="Length at 16 fps, rounded up to whole blocks of 12 frames (the node's text "
                                       "output and log say the exact frame count). 5 s = 81 frames."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Noise seed; every block's noise is derived from it, so runs are reproducible "
                                     "on the same device."),
                io.String.Input("steps", default=logic.DEFAULT_STEPS_TEXT, optional=True,
                                tooltip="Denoising steps, comma separated, strictly decreasing, in 1..1000 "
                                        "(reference: 1000,800,600,400,200). Their number is the window length in "
                                        "blocks. Blank = reference."),
                RollingForcingCache.Input("cache", optional=True,
                                          tooltip="Cache settings from Rolling Forcing Cache Settings; reference "
                                                  "settings when not connected."),
                io.Vae.Input("vae", optional=True,
                             tooltip="Optional Wan2.1 VAE (wan_2.1_vae.safetensors): each finished block is decoded "
                                     "right away, shown as the preview and returned as IMAGE."),
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
        try:
            for name, v in (("width", width), ("height", height)):
                if v is not None:
                    logic.check_dimension(name, v)
            if seconds is not None:
                logic.plan_length(seconds)
            if steps is not None:
                logic.sampler_config(None, steps)
        except ValueError as e:
            return str(e)
        return True

    @classmethod
    def execute(cls, model, positive, width: int, height: int, seconds: float, seed: int,
                steps: str = logic.DEFAULT_STEPS_TEXT, cache: logic.CacheSettings | None = None,
                vae=None, stream_to_disk: bool = False, filename_prefix: str = "video/rolling_forcing",
                keep_seconds: float = 5.0, extend_from=None) -> io.NodeOutput:
        # ---- inputs
        cfg = logic.sampler_config(cache, steps)
        lat_h, lat_w = logic.latent_size(width, height)
        plan = logic.plan_length(seconds, cfg.frames_per_block)
        problem = model_problem(model)
        if problem:
            raise ValueError(problem)
        dm = model.model.diffusion_model
        arch = WanArch.of(dm)
        schedule = None
        if isinstance(positive, PromptList):
            schedule, _ = build_schedule(positive, plan.actual_seconds,
                                         lambda c: logic.prepare_text(c, arch.text_dim)[0])
            ctx = schedule.segments[0].context
            for line in describe(schedule).splitlines():
                log.info("[RollingForcing] prompt %s", line)
        else:
            ctx, note = logic.prepare_text(logic.conditioning_tensor(positive), arch.text_dim)
            if note:
                log.warning("[RollingForcing] %s", note)
        if vae is not None:
            check_wan21_vae(vae)
        batch = ctx.shape[0]
        if stream_to_disk and (vae is None or batch != 1):
            raise ValueError("stream_to_disk needs a VAE (Load VAE with wan_2.1_vae.safetensors) and one prompt "
                             f"(batch 1, got {batch}); connect the VAE or turn stream_to_disk off")
        device = model.load_device
        dtype = logic.compute_dtype(*comfy.model_dtypes(model), comfy.bf16_supported(device))
        attention = logic.attention_from_options(model.model_options)

        # ---- memory: estimate, log, fail early
        ffn_dim = dm.blocks[0].ffn[0].weight.shape[0]
        est = logic.estimate_memory(
            cfg, num_layers=arch.num_layers, dim=arch.dim, ffn_dim=ffn_dim, latent_h=lat_h, latent_w=lat_w,
            batch=batch, dtype_bytes=dtype.itemsize, weight_bytes=model.model_size(), patch=arch.patch_size,
            vae=vae is not None, vae_dtype_bytes=vae.vae_dtype.itemsize if vae is not None else 2,
            vae_weight_bytes=vae.patcher.model_size() if vae is not None else 0)
        summary = logic.run_summary(plan, cfg, width, height, batch, seed, attention, dtype, est)
        if schedule is not None:
            summary += "\nprompt schedule (start snapped to the nearest block):\n" + describe(schedule)
        for line in summary.splitlines():
            log.info("[RollingForcing] %s", line)
        logic.check_memory(est, comfy.total_memory(device), str(device), after_weights=False)
        keep_blocks = max(1, logic.plan_length(keep_seconds, cfg.frames_per_block).blocks) if keep_seconds > 0 else 1
        keep_blocks = min(keep_blocks, plan.blocks) if stream_to_disk else plan.blocks
        if vae is not None:
            logic.check_host_memory(pixel_frames(keep_blocks * cfg.frames_per_block) if stream_to_disk
                                    else plan.frames, width, height, batch, comfy.host_free_memory())
        comfy.load_models([model] + ([vae.patcher] if vae is not None else []), memory_required=est.working)
        logic.check_memory(est, comfy.free_memory(device, model), str(device))

        # ---- sample, block by block
        out_dev = comfy.intermediate_device()
        fmt = comfy.wan21_latent_format()
        fb = cfg.frames_per_block
        latent = images = writer = video_path = None
        keep_frames = pixel_frames(plan.latent_frames) - pixel_frames((plan.blocks - keep_blocks) * fb)
        kept_latents, kept_frames = deque(maxlen=keep_blocks), deque()
        if not stream_to_disk:
            latent = torch.empty((batch, arch.out_dim, plan.latent_frames, lat_h, lat_w), dtype=torch.float32,
                                 device=out_dev)
            if vae is not None:
                images = torch.empty((batch, plan.frames, height, width, 3), dtype=torch.float32, device=out_dev)
        else:
            folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(
                filename_prefix, folder_paths.get_output_directory(), width, height)
            video_file = f"{name}_{counter:05}_.mp4"
            video_path = os.path.join(folder, video_file)
            writer = StreamingVideoWriter(video_path, width, height, fps=plan.fps, check_space_frames=plan.frames)
            log.info("[RollingForcing] streaming to %s", video_path)
        prefix, skip = None, 0
        if extend_from is not None:
            prefix = logic.extend_latents(extend_from, batch, arch.out_dim, lat_h, lat_w)
            prefix = fmt.process_in(prefix.float())
            skip = -(-prefix.shape[2] // fb)  # blocks the given frames fill
            log.info("[RollingForcing] extending %d given latent frame(s) (%d block(s))", prefix.shape[2], skip)
        pbar = comfy.progress_bar(plan.blocks, node_id=cls.hidden.unique_id if cls.hidden else None)
        sampler = decoder = stream = None
        written = 0
        try:
            sampler = RollingSampler(dm, cfg, height=lat_h, width=lat_w, batch=batch, device=device, dtype=dtype,
                                     attention=attention, seed=seed, on_call=comfy.check_interrupt,
                                     param_cast=comfy.param_cast)
            decoder = StreamingVAEDecoder(vae) if vae is not None else None
            stream = sampler.stream(schedule if schedule is not None else ctx, plan.blocks + skip, prefix=prefix)
            segment = None
            for blk in stream:
                if schedule is not None and blk.segment != segment:
                    segment = blk.segment
                    log.info("[RollingForcing] block %d/%d: now generating %r", blk.index - skip + 1, plan.blocks,
                             segment)
                raw = fmt.process_out(blk.latents.float())
                f0 = (blk.index - skip) * fb
                if latent is not None:
                    latent[:, :, f0:f0 + fb] = raw.to(out_dev)
                else:
                    kept_latents.append(raw.to(out_dev))
                frames = decoder.decode(raw) if decoder is not None else None  # [B, t, H, W, 3], t may be 0
                if frames is not None and frames.shape[1]:
                    written = _emit(frames, writer, images, written, kept_frames, keep_frames)
                    preview = _to_pil(frames[0, -1])
                else:
                    preview = Image.fromarray(latent_to_rgb(blk.latents[:1, :, -1:].float())[0].numpy())
                if schedule is not None:
                    _label(preview, blk.segment)
                pbar.update_absolute(blk.index - skip + 1, plan.blocks, ("JPEG", preview, comfy.preview_size()))
                comfy.check_interrupt()
            if decoder is not None:  # latent frames held back for the VAE's chunking
                written = _emit(decoder.flush(), writer, images, written, kept_frames, keep_frames)
        except BaseException as e:
            # an interruption or error: drop what the traceback would otherwise keep alive until ComfyUI
            # is done with the exception (the finished frames' locals: KV cache, activations; and ours)
            traceback.clear_frames(e.__traceback__)
            latent = images = ctx = None  # noqa: F841
            kept_latents.clear()
            kept_frames.clear()
            raise
        finally:
            if stream is not None:
                stream.close()
            if sampler is not None:
                sampler.cache = None
            if decoder is not None:
                decoder.close()
            if writer is not None:
                writer.close()  # also on cancel or error: the file keeps every finished block and stays playable
            sampler = decoder = stream = None
            comfy.soft_empty_cache()

        info = summary + f"\nfinished {plan.blocks} block(s) -> {plan.frames} frames"
        log.info("[RollingForcing] finished %d block(s) -> %d frames", plan.blocks, plan.frames)
        if writer is not None:
            latent = torch.cat(list(kept_latents), dim=2)
            images = torch.cat(list(kept_frames), dim=1)[:, -keep_frames:]
            info += f"\nstreamed to {video_path}; IMAGE/LATENT keep the last {images.shape[1]} frames"
        n = images.shape[1] if images is not None else 0
        out_images = images.reshape(batch * n, height, width, 3) if images is not None \
            else ExecutionBlocker(NO_VAE_MESSAGE)
        if writer is not None:
            video = comfy.InputImpl.VideoFromFile(video_path)
            shown = ui.PreviewVideo([ui.SavedResult(video_file, subfolder, io.FolderType.output)])
        elif images is not None:
            video = comfy.InputImpl.VideoFromComponents(comfy.Types.VideoComponents(images=out_images[:n],
                                                                                    frame_rate=Fraction(plan.fps)))
            shown = ui.PreviewText(info)
        else:
            video, shown = ExecutionBlocker(NO_VAE_MESSAGE), ui.PreviewText(info)
        return io.NodeOutput({"samples": latent}, out_images, info, video, ui=shown)


def _emit(frames, writer, images, written: int, kept: deque, keep: int) -> int:
    """Hand decoded frames [B, t, H, W, 3] on: to the MP4 writer (keeping the last ``keep`` frames) or
    into the IMAGE buffer. Returns the frames written so far."""
    if not frames.shape[1]:
        return written
    if writer is not None:
        writer.write(frames[0])
        kept.append(frames)
        while sum(f.shape[1] for f in kept) - kept[0].shape[1] >= keep:
            kept.popleft()
    else:
        images[:, written:written + frames.shape[1]] = frames
    return written + frames.shape[1]


def _label(image: Image.Image, text: str) -> None:
    """Write the prompt segment's name into the preview's top-left corner (in place)."""
    from PIL import ImageDraw

    draw = ImageDraw.Draw(image)
    box = draw.textbbox((2, 2), text)
    draw.rectangle((0, 0, box[2] + 2, box[3] + 2), fill=(0, 0, 0))
    draw.text((2, 2), text, fill=(255, 255, 255))


def _to_pil(frame: torch.Tensor) -> Image.Image:
    return Image.fromarray((frame.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy())
