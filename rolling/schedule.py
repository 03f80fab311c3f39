"""Sampling schedules as pure generators of forward plans (no model, no tensors).

A schedule says, for every DiT forward of a run, which blocks it denoises at which step, which of
them enter as fresh noise, which are re-noised to which step after it, which block finishes, and
which clean blocks it writes into the KV cache (and whether that write rides in a denoising forward
or has a forward of its own). The drivers (:class:`rolling.sampler.RollingSampler`, the training
rollouts, the dry-run plan) only execute these plans.

Schedules (``SCHEDULES``):

* ``rolling`` (Rolling Forcing): window w holds blocks max(0, w - T + 1) .. min(n - 1, w), block b
  at step w - b, all denoised in one forward; the first block's x0 is then written clean.
* ``chunk_causal`` (Self-Forcing / CausVid): block by block, one forward per step, then the
  finished block is written clean.

Cache writes (``WRITES``): ``every`` writes after every window as its own forward (the published
samplers: their traces count these forwards), ``needed`` only where a later forward reads the write,
``fused`` like ``needed`` but inside the next denoising forward. A write is read later exactly when
the block it writes is not denoised by the next forward; otherwise the next window overwrites it.

Shapes and units: blocks are ``frames_per_block`` latent frames; steps index the warped timesteps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

from .config import SCHEDULES

WRITES = ("every", "needed", "fused")


@dataclass(frozen=True)
class Forward:
    """One DiT forward of a run.

    Input frames: the ``clean`` blocks (re-encoded at the context-noise timestep and written into the
    KV cache), then the ``blocks`` denoised at ``steps``. After it: ``renoise`` (block, next step)
    pairs are re-noised from this forward's x0, ``finished`` blocks leave done, and the x0 of each
    block in ``keep`` is held as the clean latent of a later write. ``text_from``: every clean block
    uses this block's prompt (after a re-encoding prompt switch); None = each block its own.
    ``window`` is the schedule position (the window, or block * T + step for chunk_causal).
    A ``recache`` forward (``kind="recache"``) re-encodes ``clean`` jointly at a prompt switch, with
    sink mode ``recache`` and ``query_only`` leading blocks that are computed but neither stored nor
    attended to (see :func:`recache_blocks`)."""

    index: int
    kind: str
    window: int = -1
    clean: tuple[int, ...] = ()
    blocks: tuple[int, ...] = ()
    steps: tuple[int, ...] = ()
    renoise: tuple[tuple[int, int], ...] = ()
    finished: tuple[int, ...] = ()
    keep: tuple[int, ...] = ()
    text_from: int | None = None
    recache: str | None = None
    query_only: int = 0

    @property
    def fresh(self) -> tuple[int, ...]:
        """Blocks entering as pure noise (step 0)."""
        return tuple(b for b, j in zip(self.blocks, self.steps) if j == 0)

    @property
    def first(self) -> int:
        """First block of the input (clean or denoised)."""
        return (self.clean or self.blocks)[0]


@dataclass(frozen=True)
class Reanchor:
    """From ``block`` on, the new segment's first block(s) become the attention sink once written (the
    current sink stays in use until then); bookkeeping only, no forward."""

    block: int


def recache_blocks(first_in_flight: int, span_frames: int, frames_per_block: int, sink_blocks: int, mode: str
                   ) -> tuple[tuple[int, ...], int]:
    """What a prompt switch re-encodes, LongLive's rule (``_recache_after_switch``) in blocks: the clean
    blocks in the last ``span_frames`` before the first block still being generated, and how many of
    them are queries only. Once the history is longer than the span, the oldest re-encoded block(s)
    map onto the sink: with ``keep_sink`` / ``reanchor`` the sink keeps its old K/V and those blocks are
    computed but not stored; with ``new_sink`` they become the new sink. An early switch (the history
    fits in the span) re-encodes everything, the sink too, in every mode (as LongLive does)."""
    n = min(-(-span_frames // frames_per_block), first_in_flight)
    blocks = tuple(range(first_in_flight - n, first_in_flight))
    query_only = sink_blocks if blocks and blocks[0] > 0 and mode != "new_sink" else 0
    return blocks, min(query_only, len(blocks))


@dataclass(frozen=True)
class Window:
    """What one schedule position denoises, and the block whose x0 is then due for a clean write."""

    index: int
    blocks: tuple[int, ...]
    steps: tuple[int, ...]
    write: int | None


def rolling_windows(num_steps: int, num_blocks: int | None, first_block: int = 0, start: int | None = None
                    ) -> Iterator[Window]:
    """Rolling Forcing: window w holds blocks max(first_block, w-T+1) .. min(n-1, w), block b at step w-b.

    The closed form holds for any ``num_blocks >= 1`` (the reference needs T or more): each block b is
    denoised at steps 0..T-1 in windows b..b+T-1. ``None`` blocks = an unbounded stream; blocks before
    ``first_block`` were given (a prefix). After each window its first block's x0 is written clean."""
    T = num_steps
    w = first_block if start is None else start
    end = None if num_blocks is None else num_blocks + T - 1
    while end is None or w < end:
        last = w if num_blocks is None else min(num_blocks - 1, w)
        blocks = tuple(range(max(first_block, w - T + 1), last + 1))
        yield Window(w, blocks, tuple(w - b for b in blocks), blocks[0])
        w += 1


def chunk_windows(num_steps: int, num_blocks: int | None, first_block: int = 0, start: int | None = None
                  ) -> Iterator[Window]:
    """Self-Forcing / CausVid: block b at steps 0..T-1, one forward each; written clean when finished."""
    T = num_steps
    p = first_block * T if start is None else start
    while num_blocks is None or p < num_blocks * T:
        b, j = divmod(p, T)
        yield Window(p, (b,), (j,), b if j == T - 1 else None)
        p += 1


WINDOWS: dict[str, Callable[..., Iterator[Window]]] = {"rolling": rolling_windows, "chunk_causal": chunk_windows}


def forwards(schedule: str, num_steps: int, num_blocks: int | None, *, writes: str = "every",
             first_block: int = 0, switches: dict | None = None, span_frames: int = 21, frames_per_block: int = 3,
             sink_blocks: int = 1) -> Iterator[Forward | Reanchor]:
    """Every forward of a run, in order: prefix writes (blocks before ``first_block``), then the
    schedule's windows with their cache writes placed per ``writes``. ``switches`` maps a block to the
    recache mode of the prompt segment starting there: before the window in which that block enters,
    a write due is flushed as its own forward, then one ``recache`` forward re-encodes the recent clean
    history (:func:`recache_blocks`; the geometry arguments are the run's config), and from then on
    the clean writes of blocks still in flight use the new prompt (``text_from``)."""
    if schedule not in WINDOWS:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if writes not in WRITES:
        raise ValueError(f"cache writes must be one of {', '.join(WRITES)}, got {writes!r}")
    switches = {b: m for b, m in (switches or {}).items() if m != "none"}
    n, text_from = 0, None
    for b in range(first_block):
        yield Forward(n, "prefix", clean=(b,))
        n += 1
    T = num_steps
    pending: int | None = None  # block whose clean write is due (x0 kept by the previous window)
    wins = WINDOWS[schedule](T, num_blocks, first_block)
    win = next(wins, None)
    while win is not None:
        nxt = next(wins, None)
        entering = [b for b, j in zip(win.blocks, win.steps) if j == 0 and b in switches]
        if pending is not None and (writes != "fused" or entering):
            yield Forward(n, "update", clean=(pending,), text_from=_text(text_from, pending))
            n, pending = n + 1, None
        for b in entering:
            blocks, qo = recache_blocks(win.blocks[0] if schedule == "rolling" else b, span_frames, frames_per_block,
                                        sink_blocks, switches[b])
            if blocks:
                yield Forward(n, "recache", clean=blocks, text_from=b, recache=switches[b], query_only=qo)
                n += 1
            if switches[b] == "reanchor":
                yield Reanchor(b)
            text_from = b
        due = win.write
        if due is not None and writes != "every" and (nxt is None or due in nxt.blocks):
            due = None  # overwritten by the next window before anything reads it
        clean = (pending,) if pending is not None else ()
        yield Forward(n, "fused" if clean else "window", win.index, clean, win.blocks, win.steps,
                      tuple((b, j + 1) for b, j in zip(win.blocks, win.steps) if j < T - 1),
                      tuple(b for b, j in zip(win.blocks, win.steps) if j == T - 1),
                      (due,) if due is not None else (), _text(text_from, pending) if clean else None)
        n, pending = n + 1, due
        if pending is not None and (writes != "fused" or nxt is None):
            yield Forward(n, "update", win.index, clean=(pending,), text_from=_text(text_from, pending))
            n, pending = n + 1, None
        win = nxt


def _text(switch: int | None, block: int) -> int | None:
    """The prompt a clean write of ``block`` uses: the last re-encoding switch's, if the block precedes it."""
    return switch if switch is not None and block < switch else None
