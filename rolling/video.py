"""Streaming H.264 video writer that survives hard crashes.

Frames are piped to an ``ffmpeg`` process (the static binary shipped by
``imageio-ffmpeg``) that writes a *fragmented* MP4: an empty ``moov`` header
first, then one self-contained ``moof``+``mdat`` fragment per keyframe
interval.  Every finished fragment is on disk and playable, so if the whole
process tree is SIGKILLed at any moment the file keeps every fragment that
was completed; only the frames of the current (unfinished) fragment, at most
``keyframe_interval`` frames, plus whatever was still queued, are lost.

Encoder settings favour low latency over compression efficiency:
``-tune zerolatency`` (no B-frames, no lookahead, no frame threading), a fixed
GOP of ``keyframe_interval`` frames (default 12 = one generated block) and
``-flush_packets 1`` so that each fragment is handed to the OS as soon as it
is complete.  If only the Python process dies, ffmpeg sees EOF on its stdin
and finalises the file itself, so nothing that reached the pipe is lost.

Units: sizes in pixels, frame rates in frames per second, sizes on disk in
bytes.  Frames are RGB, ``uint8`` in [0, 255] or float in [0, 1].
"""

from __future__ import annotations

import collections
import errno
import io
import os
import queue
import shutil
import signal
import subprocess
import threading
import time

import numpy as np

__all__ = [
    "StreamingVideoWriter",
    "VideoWriteError",
    "NotEnoughDiskSpaceError",
    "estimate_video_bytes",
    "check_free_space",
    "probe_frame_count",
    "ffmpeg_exe",
]

#: Assumed H.264 size in bits per pixel per frame, used for disk-space checks.
#: CRF 18 with x264 ``veryfast``/``zerolatency`` (no B-frames, keyframe every
#: 12 frames) typically needs 0.1-0.4 bits/pixel on generated video; 1.0 is a
#: deliberately conservative upper bound for natural-looking content (pure
#: noise can need far more).
BITS_PER_PIXEL = 1.0
#: Fixed container overhead (ftyp + empty moov) and per-frame fragment overhead, bytes.
_HEADER_BYTES = 4096
_PER_FRAME_OVERHEAD_BYTES = 64

_STDERR_TAIL_LINES = 40
_POLL_S = 0.05  # how often a blocked producer re-checks for a dead encoder, seconds
_SENTINEL = None


class VideoWriteError(RuntimeError):
    """The encoder died or the file could not be written (e.g. disk full)."""


class NotEnoughDiskSpaceError(OSError):
    """Raised by :func:`check_free_space`; ``errno`` is ``ENOSPC``."""


def ffmpeg_exe() -> str:
    """Path of the ffmpeg binary bundled with (or found by) ``imageio-ffmpeg``."""
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


# --------------------------------------------------------------------------- disk space


def estimate_video_bytes(num_frames: int, width: int, height: int, fps: float = 16) -> int:
    """Conservative size in bytes of ``num_frames`` frames of ``width`` x ``height`` pixels.

    Assumes :data:`BITS_PER_PIXEL` bits per pixel per frame plus container
    overhead.  With constant-quality (CRF) encoding the size grows with the
    number of frames, not with duration, so ``fps`` (frames per second) does
    not change the estimate; it is accepted for API symmetry.
    """
    del fps
    per_frame = width * height * BITS_PER_PIXEL / 8 + _PER_FRAME_OVERHEAD_BYTES
    return int(_HEADER_BYTES + max(0, int(num_frames)) * per_frame)


def _existing_dir(path: str | os.PathLike) -> str:
    """Nearest existing directory at or above ``path`` (the file need not exist)."""
    d = os.path.abspath(os.fspath(path))
    if not os.path.isdir(d):
        d = os.path.dirname(d)
    while d and not os.path.isdir(d):
        parent = os.path.dirname(d)
        if parent == d:
            break
        d = parent
    return d


def check_free_space(path: str | os.PathLike, needed_bytes: int, num_frames: int | None = None) -> int:
    """Raise :class:`NotEnoughDiskSpaceError` unless ``needed_bytes`` are free where ``path`` goes.

    ``path`` is the output file (or its directory); it does not need to exist.
    Returns the free space in bytes.
    """
    d = _existing_dir(path)
    free = shutil.disk_usage(d).free
    if free < needed_bytes:
        what = f" for {num_frames} frames" if num_frames is not None else ""
        raise NotEnoughDiskSpaceError(
            errno.ENOSPC,
            f"not enough free disk space at {d}: need ~{needed_bytes / 1e6:.1f} MB{what}, "
            f"have {free / 1e6:.1f} MB; free space or shorten the video",
        )
    return free


# --------------------------------------------------------------------------- probing


def probe_frame_count(path: str | os.PathLike, timeout: float = 60.0) -> int:
    """Number of frames of the first video stream of ``path`` that ffmpeg can decode.

    Works on partial files (e.g. a fragmented MP4 whose writer was killed):
    decoding errors in a truncated tail are ignored and a file too damaged to
    open at all counts as 0 frames.  Raises ``FileNotFoundError`` if ``path``
    does not exist.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    cmd = [
        ffmpeg_exe(), "-hide_banner", "-nostdin", "-nostats", "-loglevel", "error",
        "-progress", "pipe:1", "-err_detect", "ignore_err",
        "-i", path, "-map", "0:v:0", "-f", "null", "-",
    ]
    res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=timeout)
    frames = 0
    for line in res.stdout.decode(errors="replace").splitlines():
        if line.startswith("frame="):
            try:
                frames = int(line[6:].strip())
            except ValueError:
                pass
    return frames


# --------------------------------------------------------------------------- frames


def _to_uint8_frames(frames, width: int, height: int) -> np.ndarray:
    """Validate ``frames`` and return a fresh C-contiguous uint8 array [N, height, width, 3].

    Float input is taken to be in [0, 1] and converted as
    ``clip(x * 255, 0, 255)`` truncated to uint8 (NaN -> 0), as ComfyUI does
    when saving images.  The result never shares memory with the caller's
    array, so the caller may reuse its buffer as soon as ``write`` returns.
    """
    if hasattr(frames, "detach"):  # torch.Tensor, without importing torch
        t = frames.detach()
        if t.is_floating_point():
            t = t.float()  # bfloat16/half -> float32 (numpy has no bfloat16)
        frames = t.cpu().numpy()
    arr = np.asarray(frames)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[1:] != (height, width, 3):
        raise ValueError(
            f"frames must have shape [N, {height}, {width}, 3] or [{height}, {width}, 3] "
            f"(N frames of height x width pixels, RGB) to match this writer, got {tuple(np.shape(frames))}"
        )
    if arr.dtype == np.uint8:
        return np.array(arr, dtype=np.uint8, order="C", copy=True)
    if np.issubdtype(arr.dtype, np.floating):
        scaled = np.nan_to_num(arr.astype(np.float32) * 255.0, nan=0.0)
        return np.ascontiguousarray(np.clip(scaled, 0, 255).astype(np.uint8))
    raise ValueError(f"frames must be uint8 in [0, 255] or float in [0, 1], got dtype {arr.dtype}")


def _check_size(name: str, value) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0 or value % 2:
        raise ValueError(
            f"{name} must be a positive even number of pixels (H.264 yuv420p needs even "
            f"width and height), got {value!r}; crop or pad the frames to an even size"
        )
    return int(value)


# --------------------------------------------------------------------------- writer


class StreamingVideoWriter:
    """Write RGB frames to a crash-safe fragmented MP4 (H.264, yuv420p) as they are produced.

    ``write`` hands frames to a bounded queue drained by a background thread
    that pipes them to ffmpeg; when the queue holds ``queue_frames`` frames
    ``write`` blocks, so a slow disk or encoder slows the producer down instead
    of growing memory.  If ffmpeg dies or the disk fills up, the next
    ``write``/``flush``/``close`` raises :class:`VideoWriteError`; the file
    keeps the fragments written so far.

    Args:
        path: output ``.mp4`` file; overwritten if it exists, parent directories are created.
        width, height: frame size in pixels; both must be even (no implicit padding:
            a ``ValueError`` tells you what to fix rather than silently changing the size).
        fps: frame rate in frames per second.
        crf: x264 constant rate factor (quality; 0 = lossless, 18 ~ visually lossless, 23 default).
        queue_frames: bound of the frame queue between ``write`` and the encoder thread, frames.
        preset: x264 speed preset.
        check_space_frames: if given, first check that the directory has room for that many
            frames (:func:`estimate_video_bytes` x 1.5) and raise :class:`NotEnoughDiskSpaceError` if not.
        keyframe_interval: frames per GOP and per MP4 fragment (default 12 = one generated block).
            A crash loses at most the current fragment.

    Use as a context manager or call :meth:`close`.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        width: int,
        height: int,
        fps: float = 16,
        crf: int = 18,
        queue_frames: int = 64,
        preset: str = "veryfast",
        check_space_frames: int | None = None,
        keyframe_interval: int = 12,
    ):
        self.path = os.path.abspath(os.fspath(path))
        self.width = _check_size("width", width)
        self.height = _check_size("height", height)
        if not fps or fps <= 0:
            raise ValueError(f"fps must be > 0 frames per second, got {fps!r}")
        if int(queue_frames) < 1:
            raise ValueError(f"queue_frames must be >= 1 frame, got {queue_frames!r}")
        if int(keyframe_interval) < 1:
            raise ValueError(f"keyframe_interval must be >= 1 frame, got {keyframe_interval!r}")
        self.fps = fps
        self.keyframe_interval = int(keyframe_interval)
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        if check_space_frames is not None:
            need = int(1.5 * estimate_video_bytes(check_space_frames, self.width, self.height, fps))
            check_free_space(self.path, need, check_space_frames)

        self._queue: queue.Queue = queue.Queue(maxsize=int(queue_frames))
        self._cond = threading.Condition()
        self._frames_submitted = 0
        self._frames_written = 0
        self._frames_muxed = 0
        self._error: VideoWriteError | None = None
        self._error_reported = False
        self._closed = False
        self._aborting = False
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=_STDERR_TAIL_LINES)

        self._proc = subprocess.Popen(
            self._ffmpeg_cmd(crf, preset),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            bufsize=0,
        )
        self._threads = [
            threading.Thread(target=self._consume, name="video-encoder-feed", daemon=True),
            threading.Thread(target=self._read_progress, name="video-encoder-progress", daemon=True),
            threading.Thread(target=self._read_stderr, name="video-encoder-stderr", daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _ffmpeg_cmd(self, crf: int, preset: str) -> list[str]:
        g = str(self.keyframe_interval)
        return [
            ffmpeg_exe(), "-hide_banner", "-nostats", "-loglevel", "warning", "-y",
            # progress reports (frames muxed) on stdout drive flush()
            "-progress", "pipe:1", "-stats_period", "0.05",
            "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{self.width}x{self.height}",
            "-r", str(self.fps), "-i", "pipe:0", "-an",
            "-vf", "scale=out_color_matrix=bt709:out_range=tv,format=yuv420p",
            "-c:v", "libx264", "-preset", preset, "-tune", "zerolatency", "-crf", str(crf),
            "-g", g, "-keyint_min", g, "-sc_threshold", "0", "-bf", "0",
            "-colorspace", "bt709", "-color_primaries", "bt709", "-color_trc", "bt709",
            "-color_range", "tv",
            "-movflags", "+frag_keyframe+empty_moov+default_base_moof",
            "-flush_packets", "1", "-f", "mp4", self.path,
        ]

    # ------------------------------------------------------------------ properties

    @property
    def frames_written(self) -> int:
        """Frames handed to ffmpeg (written into its stdin pipe)."""
        return self._frames_written

    @property
    def frames_queued(self) -> int:
        """Frames waiting in the queue (never more than ``queue_frames``)."""
        return self._queue.qsize()

    @property
    def frames_muxed(self) -> int:
        """Frames ffmpeg reports as encoded and muxed (all but the last fragment are on disk)."""
        return self._frames_muxed

    @property
    def pid(self) -> int:
        """Process id of the ffmpeg encoder."""
        return self._proc.pid

    @property
    def closed(self) -> bool:
        return self._closed

    # ------------------------------------------------------------------ background threads

    def _write_to_ffmpeg(self, frame: np.ndarray) -> None:
        view = memoryview(frame).cast("B")
        while view:
            n = self._proc.stdin.write(view)
            view = view[n:]

    def _consume(self) -> None:
        try:
            while True:
                frame = self._queue.get()
                if frame is _SENTINEL:
                    return
                if self._aborting:
                    continue
                self._write_to_ffmpeg(frame)
                with self._cond:
                    self._frames_written += 1
                    self._cond.notify_all()
        except BaseException as e:  # noqa: BLE001 - reported to the producer
            if not self._aborting:
                self._fail(e)
            self._drain_queue()

    def _read_progress(self) -> None:
        for raw in io.BufferedReader(self._proc.stdout):
            if raw.startswith(b"frame="):
                try:
                    n = int(raw[6:].strip())
                except ValueError:
                    continue
                with self._cond:
                    self._frames_muxed = max(self._frames_muxed, n)
                    self._cond.notify_all()
        with self._cond:  # EOF: ffmpeg exited; wake flush() waiters
            self._cond.notify_all()

    def _read_stderr(self) -> None:
        for raw in io.BufferedReader(self._proc.stderr):
            self._stderr_tail.append(raw.decode(errors="replace").rstrip())

    def _drain_queue(self) -> None:
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass

    # ------------------------------------------------------------------ errors

    def _describe_failure(self, cause: BaseException | None) -> str:
        rc = self._proc.poll()
        if rc is None:
            try:
                rc = self._proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                rc = None
        if rc is None:
            what = "ffmpeg stopped accepting frames"
        elif rc < 0:
            try:
                sig = signal.Signals(-rc).name
            except ValueError:
                sig = f"signal {-rc}"
            what = f"ffmpeg was killed by {sig}"
            if -rc == getattr(signal, "SIGXFSZ", -1):
                what += " (file size limit exceeded)"
        else:
            what = f"ffmpeg exited with code {rc}"
        if cause is not None and not isinstance(cause, (BrokenPipeError, ValueError)):
            what += f" ({type(cause).__name__}: {cause})"
        if rc is not None:  # ffmpeg is gone: let the stderr reader catch its last words
            self._threads[2].join(1.0)
        tail = "\n".join(list(self._stderr_tail)[-15:])[-2000:]
        hint = ""
        lowered = tail.lower()
        if "no space left" in lowered or isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
            hint = " The disk appears to be full."
        else:
            try:
                if shutil.disk_usage(_existing_dir(self.path)).free < 16 * 2**20:
                    hint = " The disk appears to be (nearly) full."
            except OSError:
                pass
        on_disk = (self._frames_muxed // self.keyframe_interval) * self.keyframe_interval
        return (
            f"video encoding failed after {self._frames_written} frames were handed to the encoder: "
            f"{what}.{hint}\nffmpeg stderr (last lines):\n{tail or '(empty)'}\n"
            f"The file at {self.path} keeps the frames written so far (~{on_disk} frames, "
            f"a fragmented MP4 that stays playable)."
        )

    def _fail(self, cause: BaseException | None) -> None:
        with self._cond:
            if self._error is not None:
                return
        err = VideoWriteError(self._describe_failure(cause))
        if cause is not None:
            err.__cause__ = cause
        with self._cond:
            if self._error is None:
                self._error = err
            self._cond.notify_all()

    def _raise_if_failed(self) -> None:
        if self._error is None and not self._closed and self._proc.poll() is not None:
            self._fail(None)  # ffmpeg exited while we were not writing to it
        if self._error is not None:
            self._error_reported = True
            raise self._error

    # ------------------------------------------------------------------ public API

    def write(self, frames) -> int:
        """Queue frames for encoding; returns the number of frames queued.

        ``frames``: RGB ``uint8`` array ``[N, height, width, 3]`` or ``[height, width, 3]``
        (numpy array or CPU/GPU torch tensor), or float in [0, 1] (converted with
        ``clip(x * 255)`` truncated to uint8).  Blocks while the queue is full.
        Raises ``ValueError`` on a shape/dtype mismatch and :class:`VideoWriteError`
        if the encoder has failed.
        """
        if self._closed:
            raise VideoWriteError(f"writer for {self.path} is already closed")
        arr = _to_uint8_frames(frames, self.width, self.height)
        self._raise_if_failed()
        for frame in arr:
            while True:
                try:
                    self._queue.put(frame, timeout=_POLL_S)
                    break
                except queue.Full:
                    self._raise_if_failed()  # consumer died: do not block forever
            with self._cond:
                self._frames_submitted += 1
        self._raise_if_failed()
        return len(arr)

    def flush(self, timeout: float | None = 30.0) -> int:
        """Wait until every frame passed to :meth:`write` has been encoded and muxed.

        Afterwards every complete fragment is in the file and survives a SIGKILL:
        all frames except the last, still open fragment (the frames since the last
        keyframe, at most ``keyframe_interval``), which is written when the next
        keyframe arrives or on :meth:`close`.  Costs up to ~0.05 s of latency;
        normal streaming does not need it, use it as a durability checkpoint.  Returns the number of muxed frames.
        Raises :class:`VideoWriteError` if the encoder failed and ``TimeoutError``
        after ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            target = self._frames_submitted
            while self._frames_muxed < target:
                if self._error is not None or self._proc.poll() is not None:
                    break
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(
                        f"ffmpeg muxed {self._frames_muxed} of {target} frames within {timeout} s"
                    )
                self._cond.wait(timeout=_POLL_S if remaining is None else min(_POLL_S, remaining))
        if self._frames_muxed < target:
            self._raise_if_failed()
        return self._frames_muxed

    def close(self, timeout: float = 120.0) -> None:
        """Encode everything queued, finalise the file and stop ffmpeg. Idempotent.

        Raises :class:`VideoWriteError` if the encoder failed (unless a previous
        ``write``/``flush`` already raised that error) or did not finish within
        ``timeout`` seconds (then it is killed; the file keeps what was written).
        """
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + timeout
        # Hand the sentinel to the feeder thread (it drains the queue if it died).
        while self._threads[0].is_alive():
            try:
                self._queue.put(_SENTINEL, timeout=_POLL_S)
                break
            except queue.Full:
                if time.monotonic() > deadline:
                    break
        self._threads[0].join(max(0.0, deadline - time.monotonic()))
        if self._threads[0].is_alive():  # ffmpeg stopped reading: give up on it
            self._proc.kill()
            self._threads[0].join(5.0)
            self._fail(TimeoutError(f"ffmpeg did not consume frames within {timeout} s"))
        self._finish(deadline)
        if self._error is None and self._proc.returncode not in (0, None):
            self._fail(None)
        if self._error is not None and not self._error_reported:
            self._error_reported = True
            raise self._error

    def abort(self, timeout: float = 5.0) -> None:
        """Stop quickly: drop queued frames, let ffmpeg finalise what it has, never raise.

        The file stays playable with the frames ffmpeg already received (an
        unfinished last fragment may be lost if ffmpeg has to be killed after
        ``timeout`` seconds).
        """
        if self._closed:
            return
        self._closed = True
        self._aborting = True
        self._drain_queue()
        try:
            self._queue.put_nowait(_SENTINEL)
        except queue.Full:
            pass
        self._threads[0].join(min(1.0, timeout))
        if self._threads[0].is_alive():  # blocked writing to ffmpeg: ask it to finish up
            try:
                self._proc.terminate()  # ffmpeg handles SIGTERM by finalising the output
            except OSError:
                pass
            self._threads[0].join(timeout)
        self._finish(time.monotonic() + timeout)
        self._error_reported = True  # abort never raises

    def _finish(self, deadline: float) -> None:
        """Close ffmpeg's stdin and wait for it (killing it after ``deadline``)."""
        try:
            self._proc.stdin.close()
        except OSError:
            pass
        try:
            self._proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
            self._fail(TimeoutError("ffmpeg did not finish writing the file in time"))
        for t in self._threads[1:]:
            t.join(2.0)

    def __enter__(self) -> "StreamingVideoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # keep what was produced, but do not mask the original exception
            try:
                self.close()
            except VideoWriteError:
                pass

    def __repr__(self) -> str:
        return (
            f"StreamingVideoWriter({self.path!r}, {self.width}x{self.height} @ {self.fps} fps, "
            f"written={self._frames_written}, queued={self.frames_queued}, closed={self._closed})"
        )
