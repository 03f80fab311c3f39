"""rolling.outputs: a run's outputs block by block, and decoding on a worker thread (overlap)."""
import threading

import pytest
import torch

from rolling.outputs import RunOutputs, collect
from rolling.sampler import FinishedBlock


class ChunkedDecoder:
    """Like the Wan VAE stream decoder: the first latent frame alone, then pairs (an odd one held back);
    frame t of latent frame f is f + t / 10, so every frame says where it came from. [B, T, 2, 2, 3]."""

    def __init__(self, fail_at=None):
        self.held, self.seen, self.fail_at, self.calls = [], 0, fail_at, 0

    def _frames(self, idx):
        out = []
        for f in idx:
            for t in range(1 if f == 0 else 4):
                out.append(torch.full((1, 1, 2, 2, 3), f + t / 10))
        return torch.cat(out, dim=1) if out else torch.empty(1, 0, 2, 2, 3)

    def decode(self, raw):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise RuntimeError("decoder broke")
        idx = self.held + list(range(self.seen, self.seen + raw.shape[2]))
        self.seen += raw.shape[2]
        done = idx[:1] if not self.held and idx[0] == 0 else []
        rest = idx[len(done):]
        n = len(rest) // 2 * 2
        self.held = rest[n:]
        return self._frames(done + rest[:n])

    def flush(self):
        out, self.held = self._frames(self.held), []
        return out


def _blocks(n, fb=3):
    for b in range(n):
        yield FinishedBlock(b, torch.full((1, 16, fb, 1, 1), float(b)), b + 4, 0.0)


class ListWriter:
    def __init__(self):
        self.frames = []

    def write(self, frames):
        self.frames.append(frames.clone())


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("streamed", [False, True])
def test_outputs_are_complete_or_the_exact_tail(overlap, streamed):
    n = 7
    writer = ListWriter() if streamed else None
    out = RunOutputs(blocks=n, frames_per_block=3, latent_shape=(1, 16, 1, 1), frame_hw=(2, 2), writer=writer,
                     keep_blocks=2)
    seen = []
    collect(_blocks(n), out, decoder=ChunkedDecoder(), overlap=overlap, on_block=lambda b, f: seen.append(b.index))
    lat, frames = out.result()
    assert seen == list(range(n))
    values = [round(v, 1) for v in frames[0, :, 0, 0, 0].tolist()]
    all_frames = [float(f) + t / 10 for f in range(3 * n) for t in range(1 if f == 0 else 4)]
    if streamed:  # the file gets every frame; the outputs the last 2 blocks (24 frames, 6 latent frames)
        assert [round(v, 1) for v in torch.cat(writer.frames)[:, 0, 0, 0].tolist()] == [round(v, 1) for v in all_frames]
        assert lat.shape[2] == 6 and values == [round(v, 1) for v in all_frames[-24:]]
    else:
        assert lat.shape[2] == 3 * n and values == [round(v, 1) for v in all_frames]
    assert lat[0, 0, -1, 0, 0] == n - 1


def test_decoder_errors_reach_the_caller_and_the_worker_ends():
    out = RunOutputs(blocks=6, frames_per_block=3, latent_shape=(1, 16, 1, 1), frame_hw=(2, 2))
    with pytest.raises(RuntimeError, match="decoder broke"):
        collect(_blocks(6), out, decoder=ChunkedDecoder(fail_at=3), overlap=True)
    assert not [t for t in threading.enumerate() if t.name == "rolling-decode"]


def test_a_cancel_stops_the_worker():
    out = RunOutputs(blocks=6, frames_per_block=3, latent_shape=(1, 16, 1, 1), frame_hw=(2, 2))

    def cancel(blk, frames):
        if blk.index == 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        collect(_blocks(6), out, decoder=ChunkedDecoder(), overlap=True, on_block=cancel)
    assert not [t for t in threading.enumerate() if t.name == "rolling-decode"]
