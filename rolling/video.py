"""Streaming H.264 video writer that survives hard crashes.

Frames are encoded in-process with PyAV (FFmpeg's libavcodec and libavformat) on one writer thread
fed by a bounded queue, into a *fragmented* MP4: an empty ``moov`` header first, then one
self-contained ``moof`` + ``mdat`` fragment per keyframe interval (default 12 frames = one generated
block). The muxer hands each fragment to the OS as soon as it is complete (``flush_packets`` into an
unbuffered file), so the file is playable at any moment and a SIGKILL of the process keeps every
completed fragment: it loses at most the open fragment (up to ``keyframe_interval`` frames) and what
was still queued. Encoding favours latency: x264 ``zerolatency`` (no B-frames, no lookahead), a fixed
GOP of ``keyframe_interval`` frames, BT.709 limited-range yuv420p.

A failure (disk full, a file-size limit, an encoder error) reaches the producer as
:class:`VideoWriteError` from the next ``write``/``flush``/``close``, also while it waits on a full
queue. The file is then finished, or cut back to its last complete fragment, so the frame count the
message gives is exactly what decodes from it (:func:`probe_frame_count`).

The output is created exclusively: an existing file, finished or still being written by another
writer, is never overwritten (ComfyUI's save paths carry a counter; elsewhere pick a new name).

Units: sizes in pixels, frame rates in frames per second, sizes on disk in bytes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import shutil
import threading
import time
from fractions import Fraction

import av
import numpy as np
from av.video.reformatter import ColorRange, Colorspace, VideoReformatter

__all__ = ["StreamingVideoWriter", "VideoWriteError", "NotEnoughDiskSpaceError", "estimate_video_bytes",
           "check_free_space", "probe_frame_count", "concat_videos"]

#: Assumed H.264 size in bits per pixel per frame, used for disk-space checks. CRF 18 with x264
#: ``veryfast``/``zerolatency`` typically needs 0.1-0.4 bits/pixel on generated video; 1.0 is a
#: deliberately conservative bound for natural-looking content (pure noise can need far more).
BITS_PER_PIXEL = 1.0
#: Fixed container overhead (ftyp + empty moov) and per-frame fragment overhead, bytes.
_HEADER_BYTES = 4096
_PER_FRAME_OVERHEAD_BYTES = 64
_MOVFLAGS = "frag_keyframe+empty_moov+default_base_moof"


class VideoWriteError(RuntimeError):
    """The video could not be written (disk full, size limit, encoder error, path taken); the message
    says how many frames the file keeps."""


class NotEnoughDiskSpaceError(OSError):
    """Raised by :func:`check_free_space`; ``errno`` is ``ENOSPC``."""


# --------------------------------------------------------------------------- disk space and probing


def estimate_video_bytes(num_frames: int, width: int, height: int, fps: float = 16) -> int:
    """Conservative size in bytes of ``num_frames`` frames of ``width`` x ``height`` pixels.

    With constant-quality (CRF) encoding the size grows with the number of frames, not with the
    duration, so ``fps`` does not change the estimate; it is accepted for API symmetry."""
    per_frame = width * height * BITS_PER_PIXEL / 8 + _PER_FRAME_OVERHEAD_BYTES
    return int(_HEADER_BYTES + max(0, int(num_frames)) * per_frame)


def check_free_space(path: str | os.PathLike, needed_bytes: int, num_frames: int | None = None) -> int:
    """Raise :class:`NotEnoughDiskSpaceError` unless ``needed_bytes`` are free where ``path`` goes.

    ``path`` is the output file or its directory and need not exist. Returns the free bytes."""
    d = os.path.abspath(os.fspath(path))
    while not os.path.isdir(d) and os.path.dirname(d) != d:  # the nearest existing directory
        d = os.path.dirname(d)
    free = shutil.disk_usage(d).free
    if free < needed_bytes:
        what = f" for {num_frames} frames" if num_frames is not None else ""
        raise NotEnoughDiskSpaceError(
            errno.ENOSPC, f"not enough free disk space at {d}: need ~{needed_bytes / 1e6:.1f} MB{what}, "
            f"have {free / 1e6:.1f} MB; free space or shorten the video")
    return free


def probe_frame_count(path: str | os.PathLike) -> int:
    """Number of frames of the first video stream of ``path`` that decode.

    Works on partial files (a writer killed mid-fragment): decoding stops at a damaged tail, and a file
    too short or damaged to open counts as 0. Raises ``FileNotFoundError`` if ``path`` does not exist."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, "no such video file", path)
    frames = 0
    try:
        with av.open(path) as container:
            for _ in container.decode(video=0):
                frames += 1
    except (av.error.FFmpegError, IndexError):  # unreadable or no video stream; or a truncated tail
        pass
    return frames


def concat_videos(parts: list, path: str | os.PathLike) -> int:
    """Join MP4 files of one video size and codec setting (e.g. the chunks of a chunked run, each
    from :class:`StreamingVideoWriter`) into ``path`` without re-encoding: packets are copied with
    their timestamps shifted by the frames before them. Written to a temporary file renamed over
    ``path``, so ``path`` is always a whole video (the previous one until the new one is complete).
    Returns the number of frames; raises ValueError naming the first part that does not match."""
    path = os.path.abspath(os.fspath(path))
    if not parts:
        raise ValueError("no video parts to join")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    frames, first = 0, None
    try:
        with av.open(tmp, "w", format="mp4") as out:
            for part in parts:
                with av.open(os.fspath(part)) as inp:
                    s = inp.streams.video[0]
                    shape = (s.codec_context.name, s.codec_context.width, s.codec_context.height, s.time_base,
                             s.average_rate or s.guessed_rate, bytes(s.codec_context.extradata or b""))
                    if first is None:
                        first, ostream = shape, out.add_stream_from_template(s)
                    elif shape != first:
                        raise ValueError(f"{part} is {shape[1]}x{shape[2]} {shape[0]} at {shape[4]} fps, the first "
                                         f"part {first[1]}x{first[2]} {first[0]} at {first[4]} fps (or other codec "
                                         "settings); every part of one video needs the same size and settings")
                    shift = round(frames / (shape[4] * s.time_base))
                    for pkt in inp.demux(s):
                        if pkt.dts is None:  # the demuxer's end-of-stream marker
                            continue
                        pkt.pts, pkt.dts, pkt.stream = pkt.pts + shift, pkt.dts + shift, ostream
                        out.mux(pkt)
                        frames += 1
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    return frames


# --------------------------------------------------------------------------- frames


def _host_frames(frames, width: int, height: int):
    """Validate RGB ``frames`` ([N, H, W, 3] or [H, W, 3], numpy or torch, uint8 or float in [0, 1]).

    Returns (uint8 numpy array [N, height, width, 3] that does not share the caller's memory, a CUDA
    event the copy to it waits for or None). Floats become ``round(clamp(x, 0, 1) * 255)`` (NaN -> 0); a
    torch tensor is converted on its own device, then copied to the host once (pinned and
    non-blocking from CUDA: the writer thread, not the producer, waits for the copy)."""
    is_torch = hasattr(frames, "detach")  # a torch.Tensor, without importing torch
    x = frames.detach() if is_torch else np.asarray(frames)
    shape = tuple(x.shape)
    x = x[None] if x.ndim == 3 else x
    if x.ndim != 4 or tuple(x.shape[1:]) != (height, width, 3):
        raise ValueError(
            f"frames must have shape [N, {height}, {width}, 3] or [{height}, {width}, 3] (N frames of "
            f"height x width pixels, RGB) to match this writer, got {shape}")
    floating = x.is_floating_point() if is_torch else np.issubdtype(x.dtype, np.floating)
    dtype = str(x.dtype).removeprefix("torch.")
    if not floating and dtype != "uint8":
        raise ValueError(f"frames must be uint8 in [0, 255] or float in [0, 1], got dtype {dtype}")
    if not is_torch:
        if floating:
            return np.clip(np.nan_to_num(x.astype(np.float32) * 255), 0, 255).round().astype(np.uint8), None
        return np.array(x, dtype=np.uint8, order="C"), None
    import torch

    if floating:
        x = x.to(torch.float32, copy=True).mul_(255).nan_to_num_(0.0).clamp_(0, 255).round_().to(torch.uint8)
    if x.device.type != "cuda":
        x = x.cpu().contiguous()
        return (x.numpy() if floating else x.numpy().copy()), None
    host = torch.empty(x.shape, dtype=torch.uint8, pin_memory=True)
    host.copy_(x, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record(torch.cuda.current_stream(x.device))
    return host.numpy(), ready


def _check_size(name: str, value) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0 or value % 2:
        raise ValueError(
            f"{name} must be a positive even number of pixels (H.264 yuv420p needs even width and "
            f"height), got {value!r}; crop or pad the frames to an even size")
    return int(value)


class _File:
    """The output file, created exclusively and unbuffered: what libavformat flushes is in the OS."""

    def __init__(self, path: str):
        self.raw = open(path, "xb", buffering=0)
        self.bytes = 0  # written completely
        self.failed = False

    def write(self, data) -> None:  # PyAV ignores short writes: write everything or raise
        view = memoryview(data)
        try:
            while view:
                view = view[self.raw.write(view):]
        except BaseException:
            self.failed = True
            raise
        self.bytes += len(data)


# --------------------------------------------------------------------------- writer


class StreamingVideoWriter:
    """Write RGB frames to a crash-safe fragmented MP4 (H.264, yuv420p) as they are produced.

    ``write`` converts the frames and hands them to a bounded queue that a writer thread encodes
    from; when it holds ``queue_frames`` frames ``write`` blocks, so a slow disk or encoder slows the
    producer down instead of growing memory. Failures raise :class:`VideoWriteError` (see the module).

    Args:
        path: output ``.mp4``; parent directories are created. It must not exist: a
            :class:`VideoWriteError` names it if it does (another writer has it, or an earlier video).
        width, height: frame size in pixels; both must be even (no implicit padding).
        fps: frame rate in frames per second.
        crf: x264 constant rate factor (quality; 0 = lossless, 18 ~ visually lossless, 23 default).
        queue_frames: bound of the queue between ``write`` and the writer thread, frames.
        preset: x264 speed preset.
        check_space_frames: if given, first check that the directory has room for that many frames
            (:func:`estimate_video_bytes` x 1.5) and raise :class:`NotEnoughDiskSpaceError` if not.
        keyframe_interval: frames per GOP and per MP4 fragment (default 12 = one generated block).

    Use as a context manager or call :meth:`close`.
    """

    def __init__(self, path: str | os.PathLike, width: int, height: int, fps: float = 16, crf: int = 18,
                 queue_frames: int = 64, preset: str = "veryfast", check_space_frames: int | None = None,
                 keyframe_interval: int = 12):
        self.path = os.path.abspath(os.fspath(path))
        self.width, self.height = _check_size("width", width), _check_size("height", height)
        if not fps or fps <= 0:
            raise ValueError(f"fps must be > 0 frames per second, got {fps!r}")
        for name, v in (("queue_frames", queue_frames), ("keyframe_interval", keyframe_interval)):
            if int(v) < 1:
                raise ValueError(f"{name} must be >= 1 frame, got {v!r}")
        self.fps, self.keyframe_interval = fps, int(keyframe_interval)
        if check_space_frames is not None:
            need = int(1.5 * estimate_video_bytes(check_space_frames, self.width, self.height, fps))
            check_free_space(self.path, need, check_space_frames)
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self._file = _File(self.path)
        except OSError as e:
            if isinstance(e, FileExistsError) and e.filename == self.path:
                raise VideoWriteError(
                    f"{self.path} already exists: another writer may be writing it, or it is an earlier video. "
                    "StreamingVideoWriter never overwrites a file; choose a new name or delete it") from None
            raise VideoWriteError(f"cannot create {self.path}: {e}; nothing was written") from e
        try:
            self._container = av.open(self._file, "w", format="mp4",
                                      container_options={"movflags": _MOVFLAGS, "flush_packets": "1"})
            k = self.keyframe_interval
            self._stream = self._container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001), options={
                "preset": preset, "tune": "zerolatency", "crf": str(crf),
                "x264-params": f"keyint={k}:min-keyint={k}:scenecut=0:bframes=0"})
            cc = self._stream.codec_context
            cc.width, cc.height, cc.pix_fmt, cc.gop_size, cc.max_b_frames = self.width, self.height, "yuv420p", k, 0
            cc.colorspace = cc.color_primaries = cc.color_trc = 1  # BT.709
            cc.color_range = ColorRange.MPEG  # limited range
            self._container.start_encoding()  # the header: from here on the file is a playable (empty) MP4
        except Exception as e:
            self._file.raw.close()
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            raise VideoWriteError(f"could not start encoding {self.path} ({type(e).__name__}: {e}); "
                                  "nothing was written and the file was removed") from e
        self._sws = VideoReformatter()
        self._queue: queue.Queue = queue.Queue(maxsize=int(queue_frames))
        self._cond = threading.Condition()
        self._submitted = self._written = 0
        self._kept = (self._file.bytes, 0)  # (bytes, frames) up to the end of the last complete fragment
        self._error: VideoWriteError | None = None
        self._error_reported = self._closed = self._aborting = self._closing = False
        self._thread = threading.Thread(target=self._run, name="video-writer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ properties

    @property
    def frames_written(self) -> int:
        """Frames encoded and handed to the muxer."""
        return self._written

    @property
    def frames_on_disk(self) -> int:
        """Frames in complete fragments, i.e. in the OS: what a crash at this moment would keep."""
        return self._kept[1]

    @property
    def frames_queued(self) -> int:
        """Frames waiting in the queue (never more than ``queue_frames``)."""
        return self._queue.qsize()

    @property
    def closed(self) -> bool:
        return self._closed

    # ------------------------------------------------------------------ writer thread

    def _run(self) -> None:
        for item in iter(self._queue.get, None):  # after a failure or abort: drain, so write() never hangs
            if self._error is None and not self._aborting:
                try:
                    self._encode(*item)
                except BaseException as e:  # noqa: BLE001 - reported to the producer
                    self._fail(e)
        if self._error is None:  # close() or abort(): write the open fragment and the index
            try:
                self._container.mux(self._stream.encode(None))
                self._closing = True
                self._container.close()
                self._kept = (self._file.bytes, self._written)
            except BaseException as e:  # noqa: BLE001
                self._fail(e)
        self._file.raw.close()

    def _encode(self, frame: np.ndarray, ready) -> None:
        if ready is not None:
            ready.synchronize()  # the copy from the GPU
        yuv = self._sws.reformat(av.VideoFrame.from_ndarray(frame, format="rgb24"), format="yuv420p",
                                 dst_colorspace=Colorspace.ITU709, dst_color_range=ColorRange.MPEG)
        yuv.pts = self._written
        for packet in self._stream.encode(yuv):
            before = packet.pts  # frames before this one
            self._container.mux(packet)
            if packet.is_keyframe:  # the muxer has just written the fragment that ends before it
                self._kept = (self._file.bytes, before)
        with self._cond:
            self._written += 1
            self._cond.notify_all()

    def _fail(self, cause: BaseException) -> None:
        """Finish the file if it still takes writes, else cut it back to its last complete fragment."""
        cut, finished = "", False
        if not (self._file.failed or self._closing):  # e.g. an encoder error: the muxed frames can be saved
            self._closing = True
            with contextlib.suppress(BaseException):
                self._container.close()
                finished = True
        if finished:
            self._kept = (self._file.bytes, self._written)
        else:
            try:
                os.ftruncate(self._file.raw.fileno(), self._kept[0])
            except OSError as e:
                cut = f" (a partial fragment after them could not be cut off: {e})"
        n = self._kept[1]
        hint = {errno.ENOSPC: " (the disk is full)", errno.EFBIG: " (the file-size limit was reached)"}.get(
            getattr(cause, "errno", None), "")
        kept = (f"The file at {self.path} keeps the first {n} frames ({n / self.fps:.2f} s), a playable MP4{cut}."
                if n else f"Nothing usable was written: the file at {self.path} holds no frames{cut}.")
        err = VideoWriteError(f"video encoding failed after {self._written} of the {self._submitted} frames "
                              f"handed to the writer: {type(cause).__name__}: {cause}{hint}. {kept}")
        err.__cause__ = cause
        with self._cond:
            self._error = self._error or err
            self._cond.notify_all()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            self._error_reported = True
            raise self._error

    # ------------------------------------------------------------------ public API

    def write(self, frames) -> int:
        """Queue frames for encoding; returns the number of frames this call queued.

        ``frames``: RGB ``uint8`` ``[N, height, width, 3]`` or ``[height, width, 3]`` (numpy array or
        CPU/GPU torch tensor), or float in [0, 1]. The caller may reuse its buffer when ``write``
        returns. Blocks while the queue is full. Raises ``ValueError`` on a shape/dtype mismatch and
        :class:`VideoWriteError` once writing has failed."""
        if self._closed:
            raise VideoWriteError(f"writer for {self.path} is already closed")
        host, ready = _host_frames(frames, self.width, self.height)
        for frame in host:
            self._raise_if_failed()
            self._queue.put((frame, ready))  # after a failure the writer thread drains the queue
            self._submitted += 1
        self._raise_if_failed()
        return len(host)

    def flush(self, timeout: float | None = 30.0) -> int:
        """Wait until every frame passed to :meth:`write` is encoded and muxed; returns that count.

        Afterwards every complete fragment is in the file and survives a SIGKILL: all frames but the
        open fragment (those since the last keyframe), which is written at the next keyframe or on
        :meth:`close`. Raises :class:`VideoWriteError` if writing failed and ``TimeoutError`` after
        ``timeout`` seconds."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._error is not None or self._written >= self._submitted,
                                       timeout):
                raise TimeoutError(f"the encoder wrote {self._written} of {self._submitted} frames in {timeout} s")
        self._raise_if_failed()
        return self._written

    def close(self, timeout: float = 120.0) -> None:
        """Encode everything queued, finish the file. Idempotent.

        Raises :class:`VideoWriteError` if writing failed (unless ``write``/``flush`` already raised
        that error) or did not finish within ``timeout`` seconds."""
        if not self._closed:
            self._closed = True
            deadline = time.monotonic() + timeout
            with contextlib.suppress(queue.Full):
                self._queue.put(None, timeout=timeout)
            self._thread.join(max(0.0, deadline - time.monotonic()))
            if self._thread.is_alive() and self._error is None:
                self._error = VideoWriteError(f"the encoder did not finish {self.path} within {timeout} s; it "
                                              f"keeps at least {self._kept[1]} frames so far")
        if not self._error_reported:
            self._raise_if_failed()

    def abort(self, timeout: float = 5.0) -> None:
        """Stop quickly: drop queued frames, finish the file with the frames encoded so far, never raise."""
        if not self._closed:
            self._aborting = self._error_reported = True
            with self._queue.mutex:  # drop the queued frames
                self._queue.queue.clear()
                self._queue.not_full.notify_all()
            self.close(timeout)

    def __enter__(self) -> "StreamingVideoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.close()
        except VideoWriteError:
            if exc_type is None:  # otherwise keep what was produced, but do not mask the original exception
                raise

    def __repr__(self) -> str:
        return (f"StreamingVideoWriter({self.path!r}, {self.width}x{self.height} @ {self.fps} fps, "
                f"written={self._written}, queued={self.frames_queued}, closed={self._closed})")
