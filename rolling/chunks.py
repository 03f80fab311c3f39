"""Chunked runs: one long video made in chunks, one chunk per call (e.g. one ComfyUI queue run), each
continuing exactly where the last stopped, so an IMAGE->IMAGE chain (upscalers, VFX) only ever holds
one chunk of frames however long the video.

A run lives in a directory: ``state_<k>.pt``, the full state at the start of chunk k (the sampler's run
state with its KV cache, and the stream decoder's cache: resuming from it is bit-exact), and
``progress.json`` (which chunks were made, and which the consumer has taken, e.g. appended to the
video file), and ``parts/`` (a consumer's per-chunk files, e.g. each chunk's MP4). The next chunk is the first one not taken yet, so a run killed at any point (after a
state was saved but before its chunk reached the file, say) redoes exactly the missing chunk.
States are written atomically (temp file + rename) and read with ``torch.load(weights_only=True)``;
a state made with another model, size, prompt, schedule or settings is refused with a named error.
A state is dropped once its chunk was taken, so between chunks the folder holds one state (two
while a chunk is being handed on).

Units: chunk lengths in blocks; ``fingerprint`` is a dict of plain values describing the run.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import torch

STATE_NAME = "state_{:05d}.pt"
PROGRESS = "progress.json"


class RunMismatch(ValueError):
    """A saved run was made with other settings than the ones asked for now."""


def tensor_digest(*tensors: torch.Tensor) -> str:
    """A short content hash of tensors (prompt embeddings, a few weights) for a run's fingerprint."""
    h = hashlib.blake2b(digest_size=12)
    for t in tensors:
        t = t.detach().to("cpu", torch.float32).contiguous()
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class ChunkPlan:
    """Chunk ``index`` of ``count``: blocks ``first .. first + blocks - 1`` of a ``total``-block video."""

    index: int
    count: int
    first: int
    blocks: int
    total: int

    @property
    def last(self) -> bool:
        return self.index == self.count - 1


class ChunkedRun:
    """The directory of one chunked run (see the module docstring)."""

    def __init__(self, directory: str, total_blocks: int, chunk_blocks: int, fingerprint: dict):
        if chunk_blocks < 1 or total_blocks < 1:
            raise ValueError(f"chunks and videos need at least one block (got {chunk_blocks}, {total_blocks})")
        self.dir, self.total, self.per = directory, total_blocks, chunk_blocks
        self.fingerprint = {**fingerprint, "total_blocks": total_blocks, "chunk_blocks": chunk_blocks}
        os.makedirs(directory, exist_ok=True)

    @property
    def count(self) -> int:
        return -(-self.total // self.per)

    def plan(self, index: int) -> ChunkPlan:
        first = index * self.per
        return ChunkPlan(index, self.count, first, min(self.per, self.total - first), self.total)

    # ------------------------------------------------------------------ progress
    def progress(self) -> dict:
        path = os.path.join(self.dir, PROGRESS)
        if not os.path.isfile(path):
            return {"fingerprint": self.fingerprint, "made": 0, "taken": 0}
        with open(path, encoding="utf-8") as f:
            p = json.load(f)
        self._check(p.get("fingerprint", {}), path)
        return p

    def _write_progress(self, **changes) -> dict:
        p = {**self.progress(), **changes}
        atomic_write(os.path.join(self.dir, PROGRESS), lambda f: f.write(json.dumps(p, indent=1).encode()))
        return p

    def next_chunk(self) -> ChunkPlan | None:
        """The first chunk not taken yet (None: the video is complete)."""
        taken = self.progress()["taken"]
        return None if taken >= self.count else self.plan(taken)

    def taken(self, index: int) -> None:
        """The consumer has chunk ``index`` (e.g. it is in the video file): it is not made again."""
        p = self.progress()
        if index != p["taken"]:
            raise RuntimeError(f"chunk {index} handed on, but chunk {p['taken']} was the next one")
        self._write_progress(taken=index + 1)
        self._drop_states(below=index + 1)  # chunk index is safe: its state is never needed again

    def part(self, index: int, suffix: str = ".mp4") -> str:
        """Where a consumer keeps chunk ``index``'s file (``parts/part_<index>.mp4``)."""
        os.makedirs(os.path.join(self.dir, "parts"), exist_ok=True)
        return os.path.join(self.dir, "parts", f"part_{index:05d}{suffix}")

    def finish(self) -> None:
        """After the last chunk was taken: drop the states and parts (keep progress.json, which says done)."""
        if self.next_chunk() is not None:
            raise RuntimeError(f"the run in {self.dir} is not complete")
        for sub in ("", "parts"):
            d = os.path.join(self.dir, sub)
            for name in os.listdir(d) if os.path.isdir(d) else []:
                if name.startswith(("state_", "part_")):
                    os.remove(os.path.join(d, name))

    # ------------------------------------------------------------------ states
    def load_state(self, index: int) -> dict | None:
        """The state at the start of chunk ``index`` (None for chunk 0)."""
        if index == 0:
            return None
        path = os.path.join(self.dir, STATE_NAME.format(index))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing: chunk {index} cannot continue the run; start it over")
        # memory-mapped: the KV cache goes from the file to the device without a whole copy in RAM
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        self._check(state.get("fingerprint", {}), path)
        return state

    def save_state(self, index: int, state: dict) -> None:
        """Save the state at the start of chunk ``index``; keep it and the one before, drop older ones."""
        atomic_write(os.path.join(self.dir, STATE_NAME.format(index)),
                      lambda f: torch.save({**state, "fingerprint": self.fingerprint}, f))
        self._write_progress(made=max(index, self.progress()["made"]))
        self._drop_states(below=index - 1)

    def _drop_states(self, below: int) -> None:
        for name in os.listdir(self.dir):
            if name.startswith("state_") and name.endswith(".pt") and int(name[6:11]) < below:
                os.remove(os.path.join(self.dir, name))

    def _check(self, saved: dict, where: str) -> None:
        diff = sorted(k for k in set(saved) | set(self.fingerprint) if saved.get(k) != self.fingerprint.get(k))
        if diff:
            details = "; ".join(f"{k}: saved {saved.get(k)!r}, now {self.fingerprint.get(k)!r}" for k in diff)
            raise RunMismatch(f"{where} belongs to a run made with other settings ({details}); use another run name "
                              "or start this run over")


def atomic_write(path: str, write) -> None:
    """``write(file)`` into a temporary file, synced, then renamed over ``path`` (never half a file)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
