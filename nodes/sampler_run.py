"""One Rolling Forcing Sampler run inside ComfyUI: its inputs checked and resolved (model, prompt or
schedule, size, length, config, dtype, memory), then the sampling itself (the core's sampler and
block loop, ComfyUI's VAE stream decoder, the MP4 writer), with everything freed on cancel or error.

The node (nodes/sampler.py) only declares inputs and formats outputs; this module does the work.
"""
from __future__ import annotations

import itertools
import logging
import math
import os
import traceback
from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw

from ..rolling.attention import get_attention
from ..rolling.chunks import ChunkedRun, tensor_digest
from ..rolling.forward import WanArch
from ..rolling.outputs import RunOutputs, collect
from ..rolling.preview import latent_to_rgb
from ..rolling.prompts import PromptSchedule, describe
from ..rolling.sampler import RollingSampler
from ..rolling.timing import Timeline
from ..rolling.video import StreamingVideoWriter
from . import comfy_adapter as comfy
from . import memory, model_options, run_inputs
from .model_loader import model_problem
from .prompt_logic import PromptList, build_schedule
from .stream_decode import check_wan21_vae, stream_decoder

log = logging.getLogger("RollingForcing")


@dataclass
class SamplerRun:
    """A checked run: what to sample, on what, where the frames go, and what it will cost."""

    model: object  # ComfyUI MODEL (ModelPatcher)
    prompt: object  # an embedding [B, text_len, dim] (umT5's 512; the toy model's 16) or a PromptSchedule
    cfg: object  # RollingConfig
    length: run_inputs.LengthPlan
    width: int
    height: int
    seed: int
    vae: object | None
    stream_to_disk: bool
    keep_blocks: int
    prefix: torch.Tensor | None  # normalised latents to continue from
    dtype: torch.dtype
    attention: str
    estimate: memory.MemoryEstimate
    summary: str
    chunk_blocks: int | None = None  # made in chunks of this many blocks (see chunks())

    @classmethod
    def prepare(cls, model, positive, width, height, seconds, seed, steps, cache, vae, stream_to_disk, keep_seconds,
                extend_from) -> "SamplerRun":
        cfg = run_inputs.sampler_config(cache, steps)
        lat_h, lat_w = run_inputs.latent_size(width, height)
        length = run_inputs.plan_length(seconds, cfg.frames_per_block)
        problem = model_problem(model)
        if problem:
            raise ValueError(problem)
        dm = comfy.diffusion_model(model)
        arch = WanArch.of(dm)
        tl = Timeline(cfg.frames_per_block)
        # prompts padded or cut to what the DiT was trained to read: zero padding past a toy's 16 tokens draws
        # most of its cross-attention (the toy student's colour accuracy: 0.54 padded to 512, 1.00 at 16)
        text_len = arch.text_len

        def prepare_text(c):
            ctx, note = run_inputs.prepare_text(c, arch.text_dim, text_len)
            if note:
                log.warning("[RollingForcing] %s", note)
            return ctx
        if isinstance(positive, PromptList):
            prompt, _ = build_schedule(positive, length.actual_seconds, prepare_text, tl)
            batch = prompt.segments[0].context.shape[0]
        else:
            prompt = prepare_text(run_inputs.conditioning_tensor(positive))
            batch = prompt.shape[0]
        if vae is not None and arch.text_dim != model_options.WAN_TEXT_DIM:
            raise ValueError(f"this MODEL takes {arch.text_dim}-wide text (the toy model), so its latents are toy-VAE "
                             "latents that a Wan2.1 VAE or TAEHV cannot decode; leave the sampler's vae input empty and "
                             "decode the LATENT with Rolling Forcing Toy Decode")
        decoder_label = check_wan21_vae(vae) if vae is not None else None  # which decoder stream_decoder() picks
        if stream_to_disk and (vae is None or batch != 1):
            raise ValueError("stream_to_disk needs a VAE (Load VAE with wan_2.1_vae.safetensors) and one prompt "
                             f"(batch 1, got {batch}); connect the VAE or turn stream_to_disk off")
        keep_blocks = length.blocks
        if stream_to_disk:
            keep_blocks = min(length.blocks, run_inputs.plan_length(keep_seconds, cfg.frames_per_block).blocks
                              if keep_seconds > 0 else 1)
        prefix = None
        if extend_from is not None:
            raw = run_inputs.extend_latents(extend_from, batch, arch.out_dim, lat_h, lat_w)
            prefix = comfy.wan21_latent_format().process_in(raw.float())
        dtype = model_options.compute_dtype(*comfy.model_dtypes(model), comfy.bf16_supported(model.load_device))
        attention = model_options.attention_from_options(model.model_options)
        kernel = getattr(get_attention(attention, model.load_device), "kernel", attention)
        est = memory.estimate_memory(
            cfg, num_layers=arch.num_layers, dim=arch.dim, ffn_dim=dm.blocks[0].ffn[0].weight.shape[0], latent_h=lat_h,
            latent_w=lat_w, batch=batch, dtype_bytes=dtype.itemsize, weight_bytes=model.model_size(),
            patch=arch.patch_size, text_tokens=text_len, vae=vae is not None,
            vae_dtype_bytes=vae.vae_dtype.itemsize if vae else 2,
            vae_weight_bytes=vae.patcher.model_size() if vae else 0)
        summary = run_inputs.run_summary(length, cfg, width, height, batch, seed, f"{attention} (runs {kernel})", dtype,
                                         est)
        if decoder_label is not None:
            summary += f"\ndecoder: {decoder_label}"
        if isinstance(prompt, PromptSchedule):
            summary += "\nprompt schedule (start snapped to the nearest block):\n" + describe(prompt, tl)
        return cls(model, prompt, cfg, length, width, height, seed, vae, stream_to_disk, keep_blocks, prefix, dtype,
                   attention, est, summary)

    @property
    def frames_kept(self) -> int:
        """Decoded frames the run holds in RAM at most."""
        tl = Timeline(self.cfg.frames_per_block)
        if self.chunk_blocks is not None:  # a chunk, plus the few frames an earlier chunk left to it
            return tl.frames(self.chunk_blocks) + 4 * self.cfg.frames_per_block
        return self.length.frames if not self.stream_to_disk else tl.frames(self.keep_blocks)

    def load(self) -> None:
        """Fail early if the run cannot fit, then load the models (ComfyUI offloads others as needed)."""
        device = self.model.load_device
        memory.check_memory(self.estimate, comfy.total_memory(device), str(device), after_weights=False)
        if self.vae is not None:
            batch = self.prompt.shape[0] if isinstance(self.prompt, torch.Tensor) else 1
            memory.check_host_memory(self.frames_kept, self.width, self.height, batch, comfy.host_free_memory())
        comfy.load_models([self.model] + ([self.vae.patcher] if self.vae is not None else []),
                          memory_required=self.estimate.working)
        memory.check_memory(self.estimate, comfy.free_memory(device, self.model), str(device))

    def open_writer(self, filename_prefix: str) -> tuple[StreamingVideoWriter, str, str]:
        """The MP4 of a streamed run in ComfyUI's output folder: (writer, file name, subfolder)."""
        folder, name, counter, subfolder, _ = comfy.folder_paths.get_save_image_path(
            filename_prefix, comfy.folder_paths.get_output_directory(), self.width, self.height)
        file = f"{name}_{counter:05}_.mp4"
        path = os.path.join(folder, file)
        writer = StreamingVideoWriter(path, self.width, self.height, fps=self.length.fps,
                                      check_space_frames=self.length.frames)
        log.info("[RollingForcing] streaming to %s", path)
        return writer, file, subfolder

    def chunks(self, directory: str, chunk_seconds: float) -> ChunkedRun:
        """This run made in chunks of ``chunk_seconds`` (rounded up to whole blocks), kept in ``directory``;
        the host memory check then counts one chunk's frames."""
        if not (isinstance(chunk_seconds, (int, float)) and 0 < chunk_seconds < float("inf")):
            raise ValueError(f"chunk_seconds must be a positive number of seconds, got {chunk_seconds!r}")
        block_s = Timeline(self.cfg.frames_per_block).block_seconds
        self.chunk_blocks = max(1, math.ceil(chunk_seconds / block_s - 1e-9))
        return ChunkedRun(directory, self.length.blocks, self.chunk_blocks, self.fingerprint())

    def fingerprint(self) -> dict:
        """What makes two runs the same video (a saved chunk state only continues its own run)."""
        dm = comfy.diffusion_model(self.model)
        prompt = [self.prompt] if isinstance(self.prompt, torch.Tensor) else [s.context for s in self.prompt.segments]
        timing = "" if isinstance(self.prompt, torch.Tensor) else describe(self.prompt, Timeline(self.cfg.frames_per_block))
        return {"model": tensor_digest(dm.patch_embedding.weight, dm.head.head.weight), "prompt": tensor_digest(*prompt),
                "prompt_timing": timing, "size": [self.width, self.height], "seed": self.seed, "config": repr(self.cfg),
                "dtype": str(self.dtype), "attention": self.attention, "vae": self.vae is not None}

    def run(self, writer=None, on_progress=None, chunks: ChunkedRun | None = None
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Sample block by block: (raw LATENT [B, 16, F, h, w], frames [B, T, H, W, 3] or None); with a
        writer only the last ``keep_blocks`` blocks are returned. ``on_progress(done, total, image)``.

        With ``chunks``, only the next chunk of that chunked run is made: the run continues from the
        chunk's saved state and, unless it is the last chunk, saves the state after it (the returned
        frames are those the decoder completed in this chunk; the rest come with the next)."""
        cfg, fb = self.cfg, self.cfg.frames_per_block
        dm = comfy.diffusion_model(self.model)
        arch = WanArch.of(dm)
        lat_h, lat_w = self.height // 8, self.width // 8
        skip = 0 if self.prefix is None else -(-self.prefix.shape[2] // fb)
        batch = self.prompt.shape[0] if isinstance(self.prompt, torch.Tensor) else 1
        chunk = chunks.next_chunk() if chunks is not None else None
        if chunks is not None and chunk is None:
            raise RuntimeError(f"the chunked run in {chunks.dir} is complete")
        state = chunks.load_state(chunk.index) if chunk is not None else None
        first, blocks = (skip, self.length.blocks) if chunk is None else (chunk.first, chunk.blocks)
        fmt = comfy.wan21_latent_format()
        sampler = RollingSampler(dm, cfg, height=lat_h, width=lat_w, batch=batch, device=self.model.load_device,
                                 dtype=self.dtype, attention=self.attention, seed=self.seed,
                                 on_call=comfy.check_interrupt, param_cast=comfy.param_cast)
        decoder = stream = out = None
        segment = [None]

        def on_block(blk, frames):
            if blk.segment != segment[0] and isinstance(self.prompt, PromptSchedule):
                segment[0] = blk.segment
                log.info("[RollingForcing] block %d/%d: now generating %r", blk.index - skip + 1,
                         self.length.blocks, blk.segment)
            if on_progress is not None:
                image = preview_image(blk.latents, frames)
                if isinstance(self.prompt, PromptSchedule):
                    label(image, blk.segment)
                on_progress(blk.index - first + 1, blocks, image)
            comfy.check_interrupt()
        try:
            decoder = stream_decoder(self.vae) if self.vae is not None else None  # Wan2.1 VAE or TAEHV
            num_frames = None
            if decoder is not None and chunk is not None:
                if state is not None:
                    decoder.load_state_dict(state["decoder"])
                num_frames = decoder.frames_after((chunk.first + chunk.blocks) * fb, chunk.last) - decoder.frames
            out = RunOutputs(blocks=blocks, frames_per_block=fb, latent_shape=(batch, arch.out_dim, lat_h, lat_w),
                             frame_hw=(self.height, self.width) if self.vae is not None else None, writer=writer,
                             keep_blocks=self.keep_blocks, device=comfy.intermediate_device(), num_frames=num_frames)
            stream = sampler.stream(self.prompt, self.length.blocks + skip, prefix=self.prefix,
                                    resume=None if state is None else state["sampler"])
            # on a GPU the VAE decodes block n on its own stream while the DiT samples block n + 1
            collect(itertools.islice(stream, blocks), out, first_block=first, to_output=fmt.process_out,
                    decoder=decoder, on_block=on_block, overlap=torch.device(self.model.load_device).type == "cuda",
                    flush=chunk is None or chunk.last)
            if chunk is not None and not chunk.last:
                chunks.save_state(chunk.index + 1, {"sampler": sampler.save_state(copy=False),
                                                    "decoder": decoder.state_dict() if decoder is not None else {}})
            return out.result()
        except BaseException as e:
            # drop what the traceback would keep alive until ComfyUI is done with it (KV cache, activations)
            traceback.clear_frames(e.__traceback__)
            if out is not None:
                out.clear()
            raise
        finally:
            if stream is not None:
                stream.close()
            sampler.cache = None
            if decoder is not None:
                decoder.close()
            if writer is not None:
                writer.close()  # also on cancel or error: the file keeps every finished block and stays playable
            sampler = decoder = stream = out = None  # the traceback must not keep the KV cache or text K/V alive
            comfy.soft_empty_cache()


def preview_image(latents: torch.Tensor, frames: torch.Tensor | None) -> Image.Image:
    """The newest decoded frame, or (no VAE, or frames held back) a latent-to-RGB view of the newest latent frame."""
    if frames is not None and frames.shape[1]:
        return Image.fromarray((frames[0, -1].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy())
    return Image.fromarray(latent_to_rgb(latents[:1, :, -1:].float())[0].numpy())


def label(image: Image.Image, text: str) -> None:
    """Write the prompt segment's name into the preview's top-left corner (in place)."""
    draw = ImageDraw.Draw(image)
    box = draw.textbbox((2, 2), text)
    draw.rectangle((0, 0, box[2] + 2, box[3] + 2), fill=(0, 0, 0))
    draw.text((2, 2), text, fill=(255, 255, 255))
