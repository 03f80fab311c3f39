"""Tests for rolling.video: round trip, crash safety, true failure reports, exclusivity, back-pressure."""

from __future__ import annotations

import collections
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import av
import numpy as np
import pytest
from av.video.frame import PictureType

from rolling import video
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
    with av.open(str(path)) as c:
        frame = next(c.decode(video=0)).to_ndarray(format="rgb24")
    assert frame.shape == (h, w, 3)
    return frame


def kept_in_message(msg: str) -> int:
    """The frame count a failure message promises the file keeps."""
    if "Nothing usable was written" in msg or "nothing was written" in msg:
        return 0
    return int(re.search(r"keeps the first (\d+) frames", msg).group(1))


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_child(code: str, *args, timeout=60) -> str:
    res = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, timeout=timeout,
                         env=child_env())
    assert res.returncode == 0, res.stderr.decode()
    return res.stdout.decode()


# --------------------------------------------------------------------------- round trip


def test_round_trip(tmp_path):
    path = tmp_path / "out" / "video.mp4"  # parent directory is created
    blocks = [pattern_block(k) for k in range(5)]
    with StreamingVideoWriter(path, W, H, fps=16) as w:
        for b in blocks:
            assert w.write(b) == BLOCK
        w.close()
        w.close()  # idempotent
        assert w.frames_written == w.frames_on_disk == 60
    assert probe_frame_count(path) == 60
    assert np.abs(first_frame(path).astype(int) - blocks[0][0].astype(int)).mean() < 6
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        assert s.average_rate == 16 and s.codec_context.pix_fmt == "yuv420p"
        types = [PictureType(f.pict_type).name for f in c.decode(video=0)]
    assert types == ["I" if i % BLOCK == 0 else "P" for i in range(60)]  # a keyframe every 12, no B-frames


def test_float_single_frame_and_torch_input(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "f.mp4"
    frame = pattern_block(0, n=1)[0]
    t_float = torch.from_numpy(pattern_block(2, n=2)).float() / 255
    before = t_float.clone()
    with StreamingVideoWriter(path, W, H) as w:
        w.write(frame.astype(np.float32) / 255.0)  # [H, W, 3] float in [0, 1]
        w.write(np.full((2, H, W, 3), 2.0))  # out of range: clamped to 255
        w.write(torch.from_numpy(pattern_block(1, n=3)))
        w.write(torch.rand(2, H, W, 3, dtype=torch.bfloat16))
        w.write(t_float)
    assert torch.equal(t_float, before)  # converted out of place
    assert probe_frame_count(path) == 10
    assert np.abs(first_frame(path).astype(int) - frame.astype(int)).mean() < 6
    # torch (on its device) and numpy round the same way: round(clamp(x, 0, 1) * 255)
    x = torch.tensor([-1.0, 0.0, 0.2 / 255, 0.6 / 255, 0.5, 1.0, 3.0, float("nan")]).reshape(1, 1, 8, 1).expand(1, 2, 8, 3)
    t8, _ = video._host_frames(x, 8, 2)
    n8, _ = video._host_frames(x.numpy(), 8, 2)
    assert t8[0, 0, :, 0].tolist() == n8[0, 0, :, 0].tolist() == [0, 0, 0, 1, 128, 255, 255, 0]


def test_caller_may_reuse_buffer(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "reuse.mp4"
    buf = np.zeros((BLOCK, H, W, 3), np.uint8)
    tbuf = torch.zeros(BLOCK, H, W, 3, dtype=torch.uint8)
    with StreamingVideoWriter(path, W, H) as w:
        buf[:] = 200
        w.write(buf)
        buf[:] = 0  # must not affect frames already queued
        tbuf[:] = 200
        w.write(tbuf)
        tbuf[:] = 0
    with av.open(str(path)) as c:
        assert min(f.to_ndarray(format="rgb24").mean() for f in c.decode(video=0)) > 150


# --------------------------------------------------------------------------- crash safety

KILL_CHILD = textwrap.dedent(
    """
    import sys, numpy as np
    from rolling.video import StreamingVideoWriter
    w = StreamingVideoWriter(sys.argv[1], 128, 96, fps=16, queue_frames=24)
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
        print("block", k, w.frames_on_disk, flush=True)
    """
)


@pytest.mark.parametrize("whole_group", [True, False], ids=["process-group", "python-only"])
def test_sigkill_leaves_playable_file(tmp_path, whole_group):
    """SIGKILL of the writer (its process group, or just the Python process, which now also encodes)."""
    path = tmp_path / "killed.mp4"
    proc = subprocess.Popen([sys.executable, "-c", KILL_CHILD, str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, start_new_session=True, env=child_env())
    blocks = on_disk = 0
    try:
        for line in proc.stdout:
            blocks, on_disk = map(int, line.split()[1:])
            if blocks >= 6:
                break
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if whole_group else proc.kill()
        proc.wait(timeout=10)
    assert blocks >= 6, "writer child exited early"
    # after flush() the open fragment (the last block) is written only when the next keyframe comes
    assert on_disk == (blocks - 1) * BLOCK
    n = probe_frame_count(path)
    assert n >= on_disk and n % BLOCK == 0, (n, blocks)  # whole fragments only
    first_frame(path, 128, 96)  # opens and decodes


# --------------------------------------------------------------------------- failures


def test_encoder_error_raises_promptly_and_keeps_what_was_muxed(tmp_path, monkeypatch):
    original = StreamingVideoWriter._encode

    def encode(self, frame, ready):
        if self.frames_written == 30:
            raise RuntimeError("encoder crashed")
        original(self, frame, ready)

    monkeypatch.setattr(StreamingVideoWriter, "_encode", encode)
    path = tmp_path / "dead.mp4"
    w = StreamingVideoWriter(path, W, H, queue_frames=4)
    t0 = time.monotonic()
    with pytest.raises(VideoWriteError) as ei:
        for k in range(1000):
            w.write(pattern_block(k))
    assert time.monotonic() - t0 < 5
    msg = str(ei.value)
    assert "RuntimeError: encoder crashed" in msg and str(path) in msg
    assert kept_in_message(msg) == probe_frame_count(path) == 30  # the muxer still finished the file
    assert isinstance(ei.value.__cause__, RuntimeError)
    t0 = time.monotonic()
    w.close()  # error already reported: close just cleans up, promptly
    w.close()
    assert time.monotonic() - t0 < 5
    with pytest.raises(VideoWriteError, match="closed"):
        w.write(pattern_block(0))


class StallingFile:
    """Wraps the writer's raw file: after ``after`` bytes, waits for ``gate``, writes half, then ENOSPC."""

    def __init__(self, raw, after: int, gate: threading.Event):
        self.raw, self.after, self.gate = raw, after, gate

    def write(self, b):
        if self.raw.tell() + len(b) > self.after:
            self.gate.wait(10)
            self.raw.write(bytes(b[: len(b) // 2]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.raw.write(b)

    def fileno(self):
        return self.raw.fileno()

    def close(self):
        self.raw.close()


def test_producer_blocked_on_full_queue_is_woken(tmp_path, monkeypatch):
    """The disk stalls, so the queue fills and write() blocks; then the disk is full: write must raise."""
    gate = threading.Event()
    original = video._File.__init__

    def init(self, path):
        original(self, path)
        self.raw = StallingFile(self.raw, 4000, gate)  # a few fragments fit

    monkeypatch.setattr(video._File, "__init__", init)
    path = tmp_path / "stall.mp4"
    w = StreamingVideoWriter(path, W, H, queue_frames=4)
    result = {}

    def produce():
        try:
            for k in range(100):
                w.write(pattern_block(k))
            result["ok"] = True
        except VideoWriteError as e:
            result["error"] = e

    t = threading.Thread(target=produce, daemon=True)
    t.start()
    deadline = time.monotonic() + 5
    while w.frames_queued < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    assert w.frames_queued == 4 and t.is_alive()  # producer is blocked, memory bounded
    gate.set()
    t.join(5)
    assert not t.is_alive(), "producer hung after the disk filled up"
    msg = str(result["error"])
    assert "No space left on device" in msg and "the disk is full" in msg and str(path) in msg
    t0 = time.monotonic()
    w.close()
    assert time.monotonic() - t0 < 5
    assert kept_in_message(msg) == probe_frame_count(path) == w.frames_on_disk > 0


SIZE_LIMIT_CHILD = textwrap.dedent(
    """
    import json, resource, sys, numpy as np
    from rolling.video import StreamingVideoWriter, VideoWriteError
    out, limits = sys.argv[1], json.loads(sys.argv[2])
    for i, (limit, kf, queue, n) in enumerate(limits):
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))  # Python ignores SIGXFSZ
        rng = np.random.default_rng(i)
        path, msg, w = f"{out}/limit{i}.mp4", None, None
        try:
            w = StreamingVideoWriter(path, 64, 48, keyframe_interval=kf, queue_frames=queue)
            for k in range(n):
                w.write(rng.integers(0, 256, (1 + k % 7, 48, 64, 3), dtype=np.uint8))
            w.close()
        except VideoWriteError as e:
            msg = str(e)
            if w is not None:
                w.close()
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
        print(json.dumps({"path": path, "msg": msg, "written": w and w.frames_written}), flush=True)
    """
)


def check_size_limit_results(out: str, limits) -> list:
    results = [json.loads(line) for line in out.splitlines()]
    assert len(results) == len(limits)
    for r, (limit, *_) in zip(results, limits):
        msg = r["msg"]
        if msg is None:  # everything fitted
            assert probe_frame_count(r["path"]) == r["written"]
        elif "could not start" in msg or "cannot create" in msg:  # not even the header fitted
            assert "nothing was written" in msg and not os.path.exists(r["path"])
        else:
            assert "File too large" in msg and "the file-size limit was reached" in msg, msg
            assert os.path.getsize(r["path"]) <= limit
            assert kept_in_message(msg) == probe_frame_count(r["path"]), msg  # the count is TRUE
    return results


def test_file_size_limit_reports_true_count(tmp_path):
    """A full disk, emulated with RLIMIT_FSIZE (EFBIG): the message gives what really decodes."""
    limits = [(1_000_000, 12, 64, 300)]
    out = run_child(SIZE_LIMIT_CHILD, tmp_path, json.dumps(limits))
    (r,) = check_size_limit_results(out, limits)
    assert kept_in_message(r["msg"]) >= BLOCK and f"The file at {r['path']} keeps the first" in r["msg"]


def test_random_size_limits_every_report_is_true(tmp_path):
    """Fault injection: the size limit strikes at random byte counts (in the header, mid-fragment, in
    the trailer...); every file must decode and every message's count must equal what decodes."""
    rng = np.random.default_rng(1234)
    limits = [(int(rng.integers(0, 60_000)), int(rng.integers(1, 16)), int(rng.integers(1, 9)),
               int(rng.integers(1, 40))) for _ in range(30)]
    out = run_child(SIZE_LIMIT_CHILD, tmp_path, json.dumps(limits))
    results = check_size_limit_results(out, limits)
    kinds = collections.Counter("ok" if r["msg"] is None else "init" if "nothing was written" in r["msg"]
                                else "empty" if kept_in_message(r["msg"]) == 0 else "partial" for r in results)
    assert kinds["partial"] >= 5 and kinds["init"] + kinds["empty"] >= 1, kinds  # the loop reaches each case


SIGKILL_CHILD = textwrap.dedent(
    """
    import json, os, random, signal, sys, time, numpy as np
    from rolling.video import StreamingVideoWriter
    out, runs = sys.argv[1], int(sys.argv[2])
    rng = random.Random(int(sys.argv[3]))
    for i in range(runs):
        path, kf, q = f"{out}/kill{i}.mp4", rng.randint(1, 16), rng.randint(1, 8)
        reports = 0 if i < 4 else rng.randint(1, 25)  # kill after that many writes, then a random delay
        delay = rng.uniform(0, 0.02 if reports else 0.1) if i >= 2 else 0.0  # runs 0, 1: killed at once
        r, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the writer: streams until it is killed, reporting what it has on disk
            try:
                os.close(r)
                g = np.random.default_rng(i)
                w = StreamingVideoWriter(path, 64, 48, keyframe_interval=kf, queue_frames=q)
                while True:
                    w.write(g.integers(0, 256, (int(g.integers(1, 13)), 48, 64, 3), dtype=np.uint8))
                    if g.random() < 0.3:
                        w.flush()
                    os.write(wfd, f"{w.frames_on_disk}\\n".encode())
            finally:
                os._exit(1)
        os.close(wfd)
        seen = b""
        while seen.count(b"\\n") < reports and (chunk := os.read(r, 4096)):  # a random point in the stream
            seen += chunk
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        with os.fdopen(r, "rb") as f:
            on_disk = max([int(x) for x in (seen + f.read()).split()] or [0])
        print(json.dumps({"path": path, "on_disk": on_disk, "kf": kf}), flush=True)
    """
)


def test_random_sigkills_keep_what_was_reported_on_disk(tmp_path):
    """Fault injection: SIGKILL a writing process at random moments (also while creating the file)."""
    out = run_child(SIGKILL_CHILD, tmp_path, 20, 99)
    results = [json.loads(line) for line in out.splitlines()]
    assert len(results) == 20
    for r in results:
        if not os.path.exists(r["path"]):
            assert r["on_disk"] == 0  # killed before the file was created
            continue
        n = probe_frame_count(r["path"])  # never raises: every file opens and decodes
        assert n >= r["on_disk"], r
    assert sum(r["on_disk"] > 0 for r in results) >= 10, results  # most kills strike mid-stream
    assert any(r["on_disk"] == 0 for r in results), results  # and some while the file is being created


def mount_tmpfs(path, size: str) -> None:
    path.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if res.returncode != 0 or not os.path.ismount(path):
        pytest.skip("needs permission to mount a small tmpfs: " + res.stderr.decode().strip())


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.geteuid() != 0 or not shutil.which("mount"),
                    reason="needs root on Linux to mount a small tmpfs")
def test_real_disk_full_reports_true_count_and_failed_open(tmp_path):
    disk = tmp_path / "small"
    mount_tmpfs(disk, "256k")
    try:
        path = disk / "full.mp4"
        rng = np.random.default_rng(0)
        w = StreamingVideoWriter(path, W, H)
        with pytest.raises(VideoWriteError) as ei:
            for k in range(200):
                w.write(rng.integers(0, 256, (BLOCK, H, W, 3), dtype=np.uint8))
            w.close()
        w.close()
        msg = str(ei.value)
        assert "No space left on device" in msg and "the disk is full" in msg
        assert kept_in_message(msg) == probe_frame_count(path) >= BLOCK
        with open(disk / "filler", "wb", buffering=0) as f, pytest.raises(OSError):  # fill the disk up
            while True:
                f.write(b"\0" * 4096)
        with pytest.raises(VideoWriteError, match="nothing was written") as ei:
            StreamingVideoWriter(disk / "second.mp4", W, H)
        assert not (disk / "second.mp4").exists()
        assert probe_frame_count(path) == kept_in_message(msg)  # the first file is untouched
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_two_writers_never_share_a_file(tmp_path):
    path = tmp_path / "shared.mp4"
    first = StreamingVideoWriter(path, W, H)
    first.write(pattern_block(0))
    first.flush()
    with pytest.raises(VideoWriteError) as ei:
        StreamingVideoWriter(path, W, H)
    msg = str(ei.value)
    assert str(path) in msg and "already exists" in msg and "another writer" in msg and "never overwrites" in msg
    out = run_child("import sys; from rolling.video import StreamingVideoWriter as S, VideoWriteError as E\n"
                    "try: S(sys.argv[1], 64, 48)\nexcept E as e: print(e)", path)  # another process
    assert "already exists" in out
    for k in range(1, 4):
        first.write(pattern_block(k))
    first.close()
    assert probe_frame_count(path) == 4 * BLOCK  # the first writer's file is intact
    with pytest.raises(VideoWriteError, match="already exists"):  # a finished file is refused too
        StreamingVideoWriter(path, W, H)
    assert probe_frame_count(path) == 4 * BLOCK


def test_failed_open_says_nothing_was_written(tmp_path):
    (tmp_path / "a_file").write_text("not a directory")
    with pytest.raises(VideoWriteError, match=r"cannot create .*a_file.*nothing was written"):
        StreamingVideoWriter(tmp_path / "a_file" / "v.mp4", W, H)
    with pytest.raises(VideoWriteError, match=r"could not start encoding.*nothing was written and the file was removed"):
        StreamingVideoWriter(tmp_path / "bad.mp4", W, H, preset="no-such-preset")
    assert not (tmp_path / "bad.mp4").exists()


def test_abort_keeps_encoded_frames(tmp_path):
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
    assert probe_frame_count(path) == 36  # the open fragment is finished too
    with pytest.raises(VideoWriteError, match="closed"):
        w.write(pattern_block(0))


# --------------------------------------------------------------------------- back-pressure


def test_bounded_queue_with_slow_encoder(tmp_path, monkeypatch):
    original = StreamingVideoWriter._encode

    def slow_encode(self, frame, ready):
        time.sleep(0.004)
        original(self, frame, ready)

    monkeypatch.setattr(StreamingVideoWriter, "_encode", slow_encode)
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
        torch = pytest.importorskip("torch")
        with pytest.raises(ValueError, match="dtype int32"):
            w.write(torch.zeros(1, H, W, 3, dtype=torch.int32))
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
    (tmp_path / "text.mp4").write_text("not a video")
    assert probe_frame_count(tmp_path / "text.mp4") == 0
    StreamingVideoWriter(tmp_path / "none.mp4", W, H).close()  # a valid MP4 without frames
    assert probe_frame_count(tmp_path / "none.mp4") == 0
    # truncated file: cut a finished video in the middle of its 3rd fragment
    path = tmp_path / "full.mp4"
    with StreamingVideoWriter(path, W, H) as w:
        for k in range(4):
            w.write(pattern_block(k))
    data = path.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) * 5 // 8])
    assert 12 <= probe_frame_count(cut) <= 36
