"""Chunked runs inside a real ComfyUI (issue 13), in-process on CPU with the tiny DiT and the random
real Wan2.1 VAE: the chunked sampler + Append Video make the same latents and frames as one sampler
run, through ComfyUI's own executor and cache (queued like a user queues, one executor for all runs),
and a saved run refuses other settings."""
from __future__ import annotations

import copy
import inspect
import os

import av
import numpy as np
import pytest
import torch

from tests.comfyui import env
from tests.comfyui.graphs import TINY_SAMPLER

pytestmark = pytest.mark.comfy

SIZE = {"width": 32, "height": 32, "seed": 3}


def chunked(model, cond, vae, run_name, seconds, chunk_seconds, **kw):
    node = env.prepared_node("RollingForcingChunkedSampler", "7")
    with torch.inference_mode():
        return node.execute(model, cond, vae, SIZE["width"], SIZE["height"], seconds, chunk_seconds, SIZE["seed"],
                            run_name, **kw)


def append(images, chunk, **kw):
    return env.node_class("RollingForcingAppendVideo").execute(images, chunk, **kw)


def decoded(path):
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def test_chunks_equal_one_run_latents_and_frames(cu, model, cond, vae):
    """4.25 s (6 blocks, 69 frames) in chunks of 1.5 s (2 blocks, 3 chunks): the chunks' latents and frames, concatenated,
    equal one Rolling Forcing Sampler run's exactly; the MP4 has every frame once."""
    single = env.prepared_node("RollingForcingSampler", "6")
    with torch.inference_mode():
        lat, images, _info, *_ = single.execute(model, cond, SIZE["width"], SIZE["height"], 4.25, SIZE["seed"],
                                                vae=vae).result
    lats, frames, infos = [], [], []
    for k in range(3):
        out = chunked(model, cond, vae, "video/equal", 4.25, 1.5).result
        images_k, ticket, latent_k, info = out
        assert f"chunk {k + 1}/3" in info
        lats.append(latent_k["samples"])
        frames.append(images_k)
        infos.append(append(images_k, ticket).result[1])
    assert torch.equal(torch.cat(lats, dim=2), lat["samples"])
    assert torch.equal(torch.cat(frames), images)
    assert "the video is complete" in infos[-1]
    video = cu["out"] / "video" / "equal.mp4"
    got = decoded(video)
    assert got.shape[0] == images.shape[0] == 1 + 4 * (6 * 3 - 1)
    # H.264 is lossy (and these random frames are noise): compare with the same frames encoded in one
    # file: per frame much closer than to the neighbouring frame, so every chunk is there once, in order
    one = cu["out"] / "video" / "equal_one.mp4"
    with cu["pack"].rolling.video.StreamingVideoWriter(one, 32, 32) as w:
        w.write(images)
    ref = decoded(one).astype(np.float32)
    err = np.abs(got - ref).mean(axis=(1, 2, 3))
    shifted = np.abs(got[1:] - ref[:-1]).mean(axis=(1, 2, 3))
    print("mean abs error vs one-file encode", err.mean(), err.max(), "vs the next frame", shifted.min())
    assert err.max() < 0.5 * shifted.min(), (err.max(), shifted.min())
    # done: the sampler blocks its outputs (nothing more appended), the states and parts are gone
    out = chunked(model, cond, vae, "video/equal", 4.25, 1.5)
    assert "is complete" in out.result[3]
    assert type(out.result[0]).__name__ == "ExecutionBlocker"
    left = sorted(os.listdir(cu["out"] / "video" / "equal.run"))
    assert left == ["parts", "progress.json"] and not os.listdir(cu["out"] / "video" / "equal.run" / "parts")


def test_changed_settings_mid_run_are_refused_with_the_fix(cu, model, cond, vae):
    out = chunked(model, cond, vae, "video/refuse", 3.0, 1.5).result
    append(out[0], out[1])
    with pytest.raises(ValueError, match=r"seed: saved 3, now 4.*another run name"):
        node = env.prepared_node("RollingForcingChunkedSampler", "7")
        node.execute(model, cond, vae, 32, 32, 3.0, 1.5, 4, "video/refuse")
    with pytest.raises(ValueError, match="size: saved"):
        node.execute(model, cond, vae, 48, 32, 3.0, 1.5, 3, "video/refuse")


def test_appending_a_chunk_twice_is_refused(cu, model, cond, vae):
    images, ticket, *_ = chunked(model, cond, vae, "video/twice", 3.0, 1.5).result
    append(images, ticket)
    with pytest.raises(RuntimeError, match="appended already"):
        append(images, ticket)


def test_a_file_that_is_not_part_of_the_run_is_not_overwritten(cu, model, cond, vae):
    path = cu["out"] / "video" / "mine.mp4"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"someone's video")
    with pytest.raises(FileExistsError, match="not part of this run; choose another run_name"):
        chunked(model, cond, vae, "video/mine", 3.0, 1.5)
    assert path.read_bytes() == b"someone's video"


@pytest.mark.parametrize("name", ["../escape", "/abs/path", "a/../../b", "", "c:evil"])
def test_run_name_outside_the_output_folder_is_refused(cu, name):
    msg = env.node_class("RollingForcingChunkedSampler").validate_inputs(run_name=name)
    assert isinstance(msg, str) and "run_name" in msg


def _graph(seconds, chunk_seconds, run_name, scale=2.0):
    from scripts.workflow_source import MODEL_FILES

    return {
        "1": {"class_type": "RollingForcingModelLoader",
              "inputs": {"model_name": MODEL_FILES["dit"]["name"], "weights": "ema", "weight_dtype": "default",
                         "attention": "sdpa"}},
        "3": {"class_type": "RFTestPromptEmbedding", "inputs": {"seed": 1, "tokens": 12, "width": 4096}},
        "4": {"class_type": "RFTestRandomWanVAE", "inputs": {"seed": 0}},
        "7": {"class_type": "RollingForcingChunkedSampler",
              "inputs": {"model": ["1", 0], "positive": ["3", 0], "vae": ["4", 0], **SIZE, "seconds": seconds,
                         "chunk_seconds": chunk_seconds, "run_name": run_name}},
        "8": {"class_type": "ImageScaleBy", "inputs": {"image": ["7", 0], "upscale_method": "nearest-exact",
                                                      "scale_by": scale}},
        "9": {"class_type": "RollingForcingAppendVideo", "inputs": {"images": ["8", 0], "chunk": ["7", 1]}},
    }


def test_queued_runs_through_comfyuis_cache_make_the_whole_video(cu):
    """The graph queued 4 times on one executor (ComfyUI's default cache): runs 1-3 each make the next
    chunk (the sampler is not served from the cache), run 4 finds the video complete and writes nothing;
    the upscaled video has every frame of the 3 chunks."""
    import execution

    graph = _graph(4.25, 1.5, "video/queued")
    ok, err, outputs, node_errors = env.validate(graph)
    assert ok, (err, node_errors)
    srv = env.StubServer()
    kw = {"cache_args": {"lru": 0, "ram": 0.0, "ram_inactive": 0.0}} if "cache_args" in \
        inspect.signature(execution.PromptExecutor).parameters else {}
    ex = execution.PromptExecutor(srv, **kw)
    video = cu["out"] / "video" / "queued.mp4"
    sizes = []
    for i in range(4):
        # a fresh prompt per queue, as the server makes from the JSON it gets
        ex.execute(copy.deepcopy(graph), f"p{i}", {"client_id": srv.client_id}, outputs)
        assert ex.success, srv.messages[-3:]
        sizes.append(decoded(video).shape[0] if video.exists() else 0)
    assert 0 < sizes[0] < sizes[1] < sizes[2] == sizes[3] == 1 + 4 * (6 * 3 - 1), sizes
    assert decoded(video).shape[1:] == (64, 64, 3)  # upscaled 2x
