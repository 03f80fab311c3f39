"""Chunked runs (issue 13): a video made in chunks, each chunk resumed from the state the last one saved
on disk, equals one long run bit for bit; the run folder survives a kill between chunks and refuses a
state of another run."""
import itertools
import os

import pytest
import torch

from rolling.chunks import ChunkedRun, RunMismatch, tensor_digest
from rolling.config import RollingConfig
from rolling.prompts import PromptSchedule, PromptSegment
from rolling.sampler import RollingSampler

H = W = 4


def _sampler(model, **kw):
    return RollingSampler(model, RollingConfig(), height=H, width=W, dtype=torch.float32, seed=3, **kw)


def _fingerprint(ctx):
    return {"prompt": tensor_digest(ctx), "seed": 3}


def make_chunk(model, prompt, run: ChunkedRun) -> torch.Tensor | None:
    """What the chunked sampler node does per queue run, without ComfyUI: the next chunk's latents."""
    plan = run.next_chunk()
    if plan is None:
        return None
    state = run.load_state(plan.index)
    s = _sampler(model)
    stream = s.stream(prompt, run.total, resume=None if state is None else state["sampler"])
    blocks = list(itertools.islice(stream, plan.blocks))
    assert [b.index for b in blocks] == list(range(plan.first, plan.first + plan.blocks))
    if not plan.last:
        run.save_state(plan.index + 1, {"sampler": s.save_state()})
    stream.close()
    return torch.cat([b.latents for b in blocks], dim=2)


@pytest.mark.parametrize("chunk_blocks", [1, 3, 4])
def test_chunked_latents_equal_one_run_bit_for_bit(tiny_model, tiny_context, tmp_path, chunk_blocks):
    """10 blocks in chunks of 1, 3 (last one short) and 4 blocks, every state through torch.save and
    torch.load(weights_only=True), against one uninterrupted run: equal, not merely close."""
    whole = _sampler(tiny_model).generate(tiny_context, 10)
    run = ChunkedRun(str(tmp_path / "run"), 10, chunk_blocks, _fingerprint(tiny_context))
    parts = []
    while (lat := make_chunk(tiny_model, tiny_context, run)) is not None:
        parts.append(lat)
        index = run.next_chunk().index
        assert len([n for n in os.listdir(run.dir) if n.startswith("state_")]) == (2 if index else 1) - \
            (index == run.count - 1)  # chunk k's state and the next one's until chunk k is taken
        run.taken(index)
        # then only the next chunk's state is kept (one file of the KV cache's size)
        assert sorted(n for n in os.listdir(run.dir) if n.startswith("state_")) == \
            ([f"state_{index + 1:05d}.pt"] if index + 1 < run.count else [])
    assert len(parts) == -(-10 // chunk_blocks) == run.count
    assert torch.equal(torch.cat(parts, dim=2), whole)
    assert run.next_chunk() is None
    run.finish()
    assert not any(n.startswith("state_") for n in os.listdir(run.dir))


def test_prompt_switch_lands_at_its_time_whatever_the_chunk_size(tiny_model, tmp_path):
    """A schedule timed over the whole video (a switch at block 5) gives the same video in chunks of 2
    as in one run: the switch is not moved to a chunk boundary or repeated per chunk."""
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(1, 8, 16, generator=g), torch.randn(1, 8, 16, generator=g)

    def sched():
        return PromptSchedule([PromptSegment(0, a), PromptSegment(5, b)])
    whole = _sampler(tiny_model).generate(sched(), 9)
    only_a = _sampler(tiny_model).generate(a, 9)
    run = ChunkedRun(str(tmp_path / "run"), 9, 2, {"prompt": "a|b"})
    parts = []
    while (lat := make_chunk(tiny_model, sched(), run)) is not None:
        parts.append(lat)
        run.taken(run.next_chunk().index)
    assert torch.equal(torch.cat(parts, dim=2), whole)
    fb = 3
    assert not torch.equal(whole[:, :, 5 * fb:], only_a[:, :, 5 * fb:])  # the switch happened...
    assert torch.equal(whole[:, :, :fb], only_a[:, :, :fb])  # ...and block 0 had left the window before block 5 came


def test_kill_between_made_and_taken_redoes_exactly_the_missing_chunk(tiny_model, tiny_context, tmp_path):
    """A chunk was made and its state saved, but the process died before the consumer took it: the next
    run makes that chunk again (identically), not the one after."""
    run = ChunkedRun(str(tmp_path / "run"), 6, 2, _fingerprint(tiny_context))
    first = make_chunk(tiny_model, tiny_context, run)
    run.taken(0)
    second = make_chunk(tiny_model, tiny_context, run)  # made, state_2 saved, then "killed"
    again = ChunkedRun(str(tmp_path / "run"), 6, 2, _fingerprint(tiny_context))  # a fresh process
    assert again.next_chunk().index == 1
    assert torch.equal(make_chunk(tiny_model, tiny_context, again), second)
    again.taken(1)
    rest = make_chunk(tiny_model, tiny_context, again)
    whole = _sampler(tiny_model).generate(tiny_context, 6)
    assert torch.equal(torch.cat([first, second, rest], dim=2), whole)


def test_state_of_another_run_is_refused_by_name(tiny_model, tiny_context, tmp_path):
    run = ChunkedRun(str(tmp_path / "run"), 6, 2, _fingerprint(tiny_context))
    make_chunk(tiny_model, tiny_context, run)
    run.taken(0)
    other = ChunkedRun(str(tmp_path / "run"), 6, 2, {**_fingerprint(tiny_context), "seed": 4})
    with pytest.raises(RunMismatch, match=r"seed: saved 3, now 4.*another run name"):
        other.next_chunk()
    resized = ChunkedRun(str(tmp_path / "run"), 8, 2, _fingerprint(tiny_context))
    with pytest.raises(RunMismatch, match="total_blocks: saved 6, now 8"):
        resized.load_state(1)


def test_states_load_with_weights_only_and_are_written_atomically(tiny_model, tiny_context, tmp_path, monkeypatch):
    run = ChunkedRun(str(tmp_path / "run"), 6, 2, _fingerprint(tiny_context))
    make_chunk(tiny_model, tiny_context, run)
    path = os.path.join(run.dir, "state_00001.pt")
    torch.load(path, weights_only=True)  # no pickled objects in a state
    good = open(path, "rb").read()

    def dies(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", dies)
    with pytest.raises(OSError, match="disk full"):
        run.save_state(1, {"sampler": {}})
    assert open(path, "rb").read() == good  # the old state is untouched, no temporary file left
    assert sorted(os.listdir(run.dir)) == ["progress.json", "state_00001.pt"]


def test_taken_out_of_order_is_an_error(tmp_path):
    run = ChunkedRun(str(tmp_path / "run"), 4, 2, {})
    with pytest.raises(RuntimeError, match="chunk 1 handed on, but chunk 0 was the next one"):
        run.taken(1)
    with pytest.raises(ValueError, match="at least one block"):
        ChunkedRun(str(tmp_path / "r2"), 4, 0, {})
