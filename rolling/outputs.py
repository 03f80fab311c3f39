"""A run's outputs, filled block by block while sampling: the latent video and its decoded frames,
either all of them (preallocated) or, when the frames stream to a video file, only the last
``keep_blocks`` blocks (bounded memory however long the run).

:func:`collect` is the loop a host (the ComfyUI sampler node, the demo) runs over
:meth:`rolling.sampler.RollingSampler.stream`: per finished block, convert its latents, store them,
decode them (a streaming decoder may hold frames back until the next block, :meth:`flush` at the end),
store or write the frames, and tell the host (progress, preview, cancellation).

Shapes: latents [B, C, frames_per_block, h, w] per block; frames [B, T, H, W, 3] float in 0..1.
"""
from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections import deque
from typing import Callable, Iterator

import torch

from .timing import pixel_frames


class RunOutputs:
    """Latents and frames of a run of ``blocks`` blocks.

    With ``writer`` (anything with ``write(frames [T, H, W, 3])``), frames go to it and the outputs keep
    the last ``keep_blocks`` blocks; otherwise everything is kept in buffers preallocated on ``device``
    (frames only when ``frame_hw`` is given; ``num_frames`` of them, by default those of ``blocks``
    whole blocks from the start of a video, but a chunk of a longer video gets the frames its decoder
    completes)."""

    def __init__(self, *, blocks: int, frames_per_block: int, latent_shape: tuple[int, int, int, int],
                 frame_hw: tuple[int, int] | None = None, writer=None, keep_blocks: int | None = None, device="cpu",
                 num_frames: int | None = None):
        b, c, h, w = latent_shape
        self.fb, self.blocks, self.writer, self.device = frames_per_block, blocks, writer, torch.device(device)
        self.keep_blocks = blocks if writer is None else max(1, min(keep_blocks or blocks, blocks))
        self.keep_frames = pixel_frames(blocks * self.fb) - pixel_frames((blocks - self.keep_blocks) * self.fb)
        self.latents = deque(maxlen=self.keep_blocks) if writer is not None else \
            torch.empty((b, c, blocks * self.fb, h, w), dtype=torch.float32, device=self.device)
        self.frames: deque | torch.Tensor | None = None
        if frame_hw is not None:
            self.frames = deque() if writer is not None else \
                torch.empty((b, pixel_frames(blocks * self.fb) if num_frames is None else num_frames, *frame_hw, 3),
                            dtype=torch.float32, device=self.device)
        self.frames_done = 0

    def add_latents(self, block: int, raw: torch.Tensor) -> None:
        """Block ``block`` (0 = the first block of this run) of the latent video."""
        raw = raw.to(self.device)
        if isinstance(self.latents, deque):
            self.latents.append(raw)
        else:
            self.latents[:, :, block * self.fb:(block + 1) * self.fb] = raw

    def add_frames(self, frames: torch.Tensor) -> None:
        """The next decoded frames [B, t, H, W, 3] (t may be 0)."""
        if self.frames is None or not frames.shape[1]:
            return
        if self.writer is not None:
            self.writer.write(frames[0])
            self.frames.append(frames)
            while sum(f.shape[1] for f in self.frames) - self.frames[0].shape[1] >= self.keep_frames:
                self.frames.popleft()
        else:
            self.frames[:, self.frames_done:self.frames_done + frames.shape[1]] = frames
        self.frames_done += frames.shape[1]

    def result(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(latents [B, C, F, h, w], frames [B, T, H, W, 3] or None): everything, or the kept tail."""
        if self.writer is None:
            return self.latents, self.frames
        lat = torch.cat(list(self.latents), dim=2)
        frames = None if self.frames is None else torch.cat(list(self.frames), dim=1)[:, -self.keep_frames:]
        return lat, frames

    def clear(self) -> None:
        """Drop everything (after a cancel or an error, so nothing stays referenced)."""
        self.latents = self.frames = None


class BackgroundDecoder:
    """Runs a streaming decoder (and the frames' hand-off to ``out``) on a worker thread, so decoding
    block n overlaps sampling block n + 1; on CUDA the worker uses its own stream and waits for the
    sampler's work on each block first. At most ``depth`` blocks wait; an error in the worker is raised
    in the caller at the next ``decode``/``flush``. ``decode`` returns the frames decoded so far that
    the caller has not seen yet (for previews), possibly none. ``stats``: seconds spent decoding."""

    def __init__(self, decoder, out: RunOutputs, depth: int = 2):
        self.decoder, self.out = decoder, out
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._done: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self.decode_s = 0.0
        self._stream = None
        self._thread = threading.Thread(target=self._work, name="rolling-decode", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        for raw, event in iter(self._q.get, None):  # raw None: flush the decoder
            try:
                if self._error is not None:
                    continue
                if event is not None:
                    if self._stream is None:
                        self._stream = torch.cuda.Stream(raw.device)
                    self._stream.wait_event(event)
                t0 = time.perf_counter()
                with torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext():
                    frames = self.decoder.decode(raw) if raw is not None else self.decoder.flush()
                    self.out.add_frames(frames)
                if self._stream is not None:
                    self._stream.synchronize()
                self.decode_s += time.perf_counter() - t0
                self._done.put(frames)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                self._error = e

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _put(self, raw) -> None:
        event = None
        if raw is not None and raw.is_cuda:
            event = torch.cuda.Event()
            event.record()
        while True:
            self._raise()
            with contextlib.suppress(queue.Full):
                return self._q.put((raw, event), timeout=0.05)

    def decode(self, raw: torch.Tensor):
        self._put(raw)
        latest = None
        while not self._done.empty():
            latest = self._done.get_nowait()
        return latest

    def flush(self) -> None:
        """Decode what is left (the held-back frames too) and wait for the worker."""
        self._put(None)
        self.drain()

    def drain(self) -> None:
        """Wait until every block handed over is decoded (held-back frames stay in the decoder)."""
        self.close()
        self._raise()

    def close(self) -> None:
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join()


def collect(blocks: Iterator, out: RunOutputs, *, first_block: int = 0,
            to_output: Callable[[torch.Tensor], torch.Tensor] = lambda x: x, decoder=None,
            on_block: Callable | None = None, overlap: bool = False, flush: bool = True) -> RunOutputs:
    """Run a stream of finished blocks into ``out``. ``to_output`` converts a block's latents (e.g. to a
    host's latent convention); ``decoder`` has ``decode(latents) -> frames`` and ``flush() -> frames``;
    ``on_block(block, frames or None)`` is called after each block (progress, preview; raise to stop).
    With ``overlap`` the decoder runs on a worker thread (:class:`BackgroundDecoder`): the frames given
    to ``on_block`` are then the newest decoded so far (often the previous block's), or None.
    ``flush=False`` leaves the frames the decoder holds back in it (a chunk of a longer video: the
    next chunk's first block completes them)."""
    worker = BackgroundDecoder(decoder, out) if decoder is not None and overlap else None
    try:
        for blk in blocks:
            raw = to_output(blk.latents.float())
            out.add_latents(blk.index - first_block, raw)
            frames = None
            if worker is not None:
                frames = worker.decode(raw)
            elif decoder is not None:
                frames = decoder.decode(raw)
                out.add_frames(frames)
            if on_block is not None:
                on_block(blk, frames)
        if worker is not None:
            worker.flush() if flush else worker.drain()
            out.decode_s = worker.decode_s
        elif decoder is not None and flush:  # latent frames the decoder held back for its chunking
            out.add_frames(decoder.flush())
    finally:
        if worker is not None:
            worker.close()
    return out
