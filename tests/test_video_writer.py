"""Tests for rolling.video: round trip, crash safety, failure reporting, back-pressure."""

from __future__ import annotations

import collections
import os
import queue
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from rolling.video import (
    NotEnoughDiskSpaceError,
    StreamingVideoWriter,
    VideoWriteError,
    check_free_space,
    estimate_video_bytes,
    probe_frame_count,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
W, H, BLOCK = 64, 48, 12


def pattern_block(k: int, n: int = BLOCK, w: int = W, h: int = H) -> np.ndarray:
    """Smooth, moving test pattern: uint8 [n, h, w, 3]."""
    y, x = np.mgrid[0:h, 0:w]
    out = np.empty((n, h, w, 3), np.uint8)
    for i in range(n):
        t = k * n + i
        out[i, ..., 0] = (x * 255 // (w - 1) + 3 * t) % 256
        out[i, ..., 1] = y * 255 // (h - 1)
        out[i, ..., 2] = 128
        sx = (2 * t) % (w - 8)
        out[i, 8:16, sx:sx + 8] = 255
    return out


def first_frame(path, w=W, h=H) -> np.ndarray:
    import imageio_ffmpeg

    gen = imageio_ffmpeg.read_frames(str(path))
    meta = next(gen)
    assert tuple(meta["size"]) == (w, h)
    frame = np.frombuffer(next(gen), np.uint8).reshape(h, w, 3)
    gen.close()
    return frame


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def read_lines_async(stream) -> "queue.Queue[str | None]":
    q: queue.Queue = queue.Queue()

    def pump():
        for line in stream:
            q.put(line.decode().strip())
        q.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return q


# --------------------------------------------------------------------------- round trip


def test_round_trip(tmp_path):
    path = tmp_path / "out" / "video.mp4"  # parent directory is created
    blocks = [pattern_block(k) for k in range(5)]
    with StreamingVideoWriter(path, W, H, fps=16) as w:
        for b in blocks:
            assert w.write(b) == BLOCK
        w.close()
        w.close()  # idempotent
        assert w.frames_written == 60
    assert probe_frame_count(path) == 60
    diff = np.abs(first_frame(path).astype(int) - blocks[0][0].astype(int)).mean()
    assert diff < 6, diff


def test_float_single_frame_and_torch_input(tmp_path):
    path = tmp_path / "f.mp4"
    frame = pattern_block(0, n=1)[0]
    with StreamingVideoWriter(path, W, H) as w:
        w.write(frame.astype(np.float32) / 255.0 + 0.5 / 255)  # [H, W, 3] float in [0, 1]
        w.write(np.full((2, H, W, 3), 2.0))  # out of range: clipped to 255
        torch = pytest.importorskip("torch")
        w.write(torch.from_numpy(pattern_block(1, n=3)))
        w.write(torch.rand(2, H, W, 3, dtype=torch.bfloat16))
    assert probe_frame_count(path) == 8
    assert np.abs(first_frame(path).astype(int) - frame.astype(int)).mean() < 6


def test_caller_may_reuse_buffer(tmp_path):
    path = tmp_path / "reuse.mp4"
    buf = np.zeros((BLOCK, H, W, 3), np.uint8)
    with StreamingVideoWriter(path, W, H) as w:
        buf[:] = 200
        w.write(buf)
        buf[:] = 0  # must not affect frames already queued
    assert first_frame(path).mean() > 150


# --------------------------------------------------------------------------- crash safety

KILL_CHILD = textwrap.dedent(
    """
    import sys, numpy as np
    from rolling.video import StreamingVideoWriter
    w = StreamingVideoWriter(sys.argv[1], 128, 96, fps=16, queue_frames=24)
    print("pid", w.pid, flush=True)
    y, x = np.mgrid[0:96, 0:128]
    k = 0
    while True:
        block = np.empty((12, 96, 128, 3), np.uint8)
        for i in range(12):
            t = 12 * k + i
            block[i, ..., 0] = (x * 2 + 5 * t) % 256
            block[i, ..., 1] = (y * 2 + 3 * t) % 256
            block[i, ..., 2] = (t * 7) % 256
        w.write(block)
        w.flush(timeout=20)
        k += 1
        print("block", k, flush=True)
    """
)


def run_until_blocks(path, n_blocks: int):
    """Start the writer child; return (proc, ffmpeg_pid, blocks_seen) after n_blocks blocks."""
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_CHILD, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=child_env(),
    )
    lines = read_lines_async(proc.stdout)
    ffmpeg_pid, blocks = None, 0
    try:
        while blocks < n_blocks:
            line = lines.get(timeout=15)
            assert line is not None, "writer child exited early"
            if line.startswith("pid"):
                ffmpeg_pid = int(line.split()[1])
            elif line.startswith("block"):
                blocks = int(line.split()[1])
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    return proc, ffmpeg_pid, blocks


def test_sigkill_whole_process_tree_leaves_playable_file(tmp_path):
    path = tmp_path / "killed.mp4"
    proc, ffmpeg_pid, blocks = run_until_blocks(path, 6)
    os.killpg(proc.pid, signal.SIGKILL)  # hard crash: Python *and* ffmpeg die at once
    proc.wait(timeout=10)
    # The last block's fragment is only written when the next keyframe arrives: "- 1".
    n = probe_frame_count(path)
    assert n >= (blocks - 1) * BLOCK, (n, blocks)
    assert n % BLOCK == 0  # whole fragments only
    first_frame(path, 128, 96)  # opens and decodes


def _process_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def test_sigkill_python_only_ffmpeg_finalises(tmp_path):
    path = tmp_path / "orphan.mp4"
    proc, ffmpeg_pid, blocks = run_until_blocks(path, 4)
    proc.kill()  # only Python dies: ffmpeg gets EOF on stdin and finishes the file
    proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while not _process_gone(ffmpeg_pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    if not _process_gone(ffmpeg_pid):
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("ffmpeg did not finish after its parent was killed")
    assert probe_frame_count(path) >= blocks * BLOCK  # even the last flushed block


# --------------------------------------------------------------------------- failures


def test_encoder_killed_raises_promptly(tmp_path):
    path = tmp_path / "dead.mp4"
    w = StreamingVideoWriter(path, W, H, queue_frames=4)
    for k in range(3):
        w.write(pattern_block(k))
    w.flush()
    os.kill(w.pid, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(VideoWriteError) as ei:
        for k in range(1000):
            w.write(pattern_block(k))
    assert time.monotonic() - t0 < 5
    msg = str(ei.value)
    assert "SIGKILL" in msg and str(path) in msg and "keeps the frames" in msg
    w.close()  # error already reported: close just cleans up
    w.close()
    assert probe_frame_count(path) >= 24  # complete fragments before the crash


def test_producer_blocked_on_full_queue_is_woken(tmp_path):
    """ffmpeg stalls (SIGSTOP) so the pipe and queue fill up, then dies: write must not hang."""
    path = tmp_path / "stall.mp4"
    w = StreamingVideoWriter(path, 128, 96, queue_frames=4)
    w.write(np.zeros((BLOCK, 96, 128, 3), np.uint8))
    w.flush()
    os.kill(w.pid, signal.SIGSTOP)
    result = {}

    def produce():
        try:
            for k in range(100):
                w.write(np.random.randint(0, 255, (BLOCK, 96, 128, 3), np.uint8))
            result["ok"] = True
        except VideoWriteError as e:
            result["error"] = e

    t = threading.Thread(target=produce, daemon=True)
    t.start()
    deadline = time.monotonic() + 5
    while w.frames_queued < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert w.frames_queued == 4 and t.is_alive()  # producer is blocked, memory bounded
    os.kill(w.pid, signal.SIGKILL)
    t.join(5)
    assert not t.is_alive(), "producer hung after the encoder died"
    assert "error" in result and "SIGKILL" in str(result["error"])
    w.close()


DISK_FULL_CHILD = textwrap.dedent(
    """
    import resource, sys, numpy as np
    from rolling.video import StreamingVideoWriter, VideoWriteError
    limit = int(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # inherited by ffmpeg
    rng = np.random.default_rng(0)
    w = StreamingVideoWriter(sys.argv[1], 128, 96)
    try:
        for k in range(400):
            w.write(rng.integers(0, 256, (12, 96, 128, 3), dtype=np.uint8))
        w.close()
        print("NO ERROR")
    except VideoWriteError as e:
        print(e)
    """
)


def test_file_size_limit_reports_error(tmp_path):
    """Emulate a full disk: RLIMIT_FSIZE makes ffmpeg die (SIGXFSZ) mid-run."""
    path = tmp_path / "full.mp4"
    res = subprocess.run(
        [sys.executable, "-c", DISK_FULL_CHILD, str(path), str(1_000_000)],
        capture_output=True,
        timeout=30,
        env=child_env(),
    )
    out = res.stdout.decode()
    assert res.returncode == 0, res.stderr.decode()
    assert "video encoding failed" in out and "NO ERROR" not in out, out
    assert "SIGXFSZ" in out or "exited with code" in out, out
    assert f"The file at {path} keeps the frames written so far" in out
    assert os.path.getsize(path) <= 1_000_000
    assert probe_frame_count(path) >= BLOCK


def test_abort_keeps_flushed_frames(tmp_path):
    path = tmp_path / "abort.mp4"
    w = StreamingVideoWriter(path, W, H)
    for k in range(3):
        w.write(pattern_block(k))
    w.flush()
    t0 = time.monotonic()
    w.abort()
    w.abort()
    w.close()  # no-op after abort
    assert time.monotonic() - t0 < 3
    assert probe_frame_count(path) >= 36
    with pytest.raises(VideoWriteError, match="closed"):
        w.write(pattern_block(0))


# --------------------------------------------------------------------------- back-pressure


def test_bounded_queue_with_slow_encoder(tmp_path, monkeypatch):
    original = StreamingVideoWriter._write_to_ffmpeg

    def slow_write(self, frame):
        time.sleep(0.004)
        original(self, frame)

    monkeypatch.setattr(StreamingVideoWriter, "_write_to_ffmpeg", slow_write)
    bound = 6
    w = StreamingVideoWriter(tmp_path / "slow.mp4", W, H, queue_frames=bound)
    samples = []
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            samples.append(w.frames_queued)
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.monotonic()
    for k in range(4):
        w.write(pattern_block(k))
    elapsed = time.monotonic() - t0
    stop.set()
    sampler.join()
    w.close()
    assert max(samples) <= bound
    assert max(samples) == bound  # it did fill up, i.e. write() was throttled
    assert elapsed >= (4 * BLOCK - bound - 1) * 0.004 * 0.9
    assert w.frames_written == 4 * BLOCK
    assert probe_frame_count(tmp_path / "slow.mp4") == 4 * BLOCK


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("size,bad", [((65, 48), "width"), ((64, 47), "height"), ((0, 48), "width"), ((64, -2), "height")])
def test_odd_or_bad_size_rejected(tmp_path, size, bad):
    value = size[0] if bad == "width" else size[1]
    with pytest.raises(ValueError, match=f"{bad} must be a positive even number of pixels.*got {value}"):
        StreamingVideoWriter(tmp_path / "x.mp4", *size)
    assert not (tmp_path / "x.mp4").exists()


def test_wrong_frame_shape_and_dtype(tmp_path):
    with StreamingVideoWriter(tmp_path / "s.mp4", W, H) as w:
        with pytest.raises(ValueError, match=r"\[N, 48, 64, 3\].*got \(2, 64, 48, 3\)"):
            w.write(np.zeros((2, W, H, 3), np.uint8))  # width/height swapped
        with pytest.raises(ValueError, match="got \\(48, 64, 4\\)"):
            w.write(np.zeros((H, W, 4), np.uint8))
        with pytest.raises(ValueError, match="dtype int64"):
            w.write(np.zeros((1, H, W, 3), np.int64))
        w.write(pattern_block(0))  # still usable
    assert probe_frame_count(tmp_path / "s.mp4") == BLOCK


def test_not_enough_disk_space(tmp_path, monkeypatch):
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 2_000_000, 2_000_000))
    need = estimate_video_bytes(10_000, 832, 480)
    with pytest.raises(NotEnoughDiskSpaceError) as ei:
        check_free_space(tmp_path / "missing_dir" / "v.mp4", need, 10_000)
    msg = str(ei.value)
    assert isinstance(ei.value, OSError)
    assert f"not enough free disk space at {tmp_path}" in msg
    assert "for 10000 frames" in msg and "have 2.0 MB" in msg and "shorten the video" in msg
    with pytest.raises(NotEnoughDiskSpaceError, match="for 5000 frames"):
        StreamingVideoWriter(tmp_path / "v.mp4", 832, 480, check_space_frames=5000)
    assert not (tmp_path / "v.mp4").exists()
    # a short video fits: 10 frames of 64x48 need a few kB
    StreamingVideoWriter(tmp_path / "ok.mp4", W, H, check_space_frames=10).close()


def test_estimate_is_conservative(tmp_path):
    assert estimate_video_bytes(0, W, H) > 0
    assert estimate_video_bytes(200, 832, 480) > estimate_video_bytes(100, 832, 480)
    path = tmp_path / "est.mp4"
    with StreamingVideoWriter(path, W, H) as w:
        for k in range(5):
            w.write(pattern_block(k))
    assert os.path.getsize(path) < estimate_video_bytes(60, W, H)


def test_probe_frame_count_edge_cases(tmp_path):
    with pytest.raises(FileNotFoundError):
        probe_frame_count(tmp_path / "nope.mp4")
    (tmp_path / "empty.mp4").write_bytes(b"")
    assert probe_frame_count(tmp_path / "empty.mp4") == 0
    # truncated file: cut a finished video in the middle of its 3rd fragment
    path = tmp_path / "full.mp4"
    with StreamingVideoWriter(path, W, H) as w:
        for k in range(4):
            w.write(pattern_block(k))
    data = path.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) * 5 // 8])
    assert 12 <= probe_frame_count(cut) <= 36


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_real_enospc_reports_disk_full():
    w = StreamingVideoWriter("/dev/full", W, H)  # every write fails with ENOSPC
    with pytest.raises(VideoWriteError, match="(?s)disk appears to be full.*No space left on device"):
        for k in range(100):
            w.write(pattern_block(k))
        w.close()
    w.close()
