"""The TAEHV fast decoder (issue 14), in-process on CPU with the tiny DiT and a random real TAEHV
(ComfyUI's ``comfy.taesd.taehv.TAEHV`` in a ``comfy.sd.VAE``, as Load VAE builds it from
lighttaew2_1.safetensors): streamed block by block it gives exactly the frames of one ``VAE.decode``
of the whole latent video; the sampler picks it by what the VAE holds, runs end to end with it and
says so; a chunked run with it equals one run; TAEHVs of other models are refused by name. Where
ComfyUI has no TAEHV (0.3.x) those tests skip with the reason, and the error a user would get there
(naming the version and the missing piece) is tested."""
from __future__ import annotations

import sys
import types

import pytest
import torch

from tests.comfyui import env
from tests.comfyui.graphs import TINY_SAMPLER

pytestmark = pytest.mark.comfy

LATENT = (1, 16, 9, 4, 4)  # 9 latent frames of 32x32 -> 33 frames


@pytest.fixture(scope="module")
def adapter(cu):
    return cu["pack"].nodes.comfy_adapter


@pytest.fixture(scope="module")
def decoding(cu):
    return cu["pack"].nodes.stream_decode


@pytest.fixture(scope="module")
def taehv(cu, adapter):
    """A random Wan2.1 TAEHV (16 latent channels, float32: what ComfyUI reads as lighttaew2_1)."""
    problem = adapter.taehv_problem()
    if problem is not None:
        pytest.skip(f"TAEHV tests need ComfyUI's comfy.taesd.taehv: {problem}")
    return env.node_class("RFTestRandomTAEHV")().run(0, 16)[0]


def latents(seed=5, shape=LATENT):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def stream(decoder, z, splits):
    outs, i = [], 0
    for n in splits:
        outs.append(decoder.decode(z[:, :, i:i + n]))
        i += n
        assert decoder.frames == decoder.frames_after(i, final=False)  # nothing held back
    outs.append(decoder.flush())
    return torch.cat(outs, dim=1)


# ----------------------------------------------------------------------------- the decoder


@pytest.mark.parametrize("splits", [[3, 3, 3], [1, 4, 2, 2], [9]])
def test_streamed_equals_one_shot_decode(cu, decoding, taehv, splits):
    """Bit-equal to one VAE.decode of all 9 latent frames, however the frames come in; 1 + 4 (N - 1) frames."""
    z = latents()
    with torch.inference_mode():
        ref = taehv.decode(z)  # ComfyUI's own one-shot TAEHV decode [1, 33, 32, 32, 3]
        with decoding.StreamingTAEHVDecoder(taehv, clamp=False) as dec:
            got = stream(dec, z, splits)
        with decoding.StreamingTAEHVDecoder(taehv) as dec:
            clamped = stream(dec, z, splits)
    assert got.shape == ref.shape == (1, 1 + 4 * (9 - 1), 32, 32, 3)
    print("max |streamed - one-shot|", (got - ref).abs().max().item())
    assert torch.equal(got, ref)
    assert torch.equal(clamped, ref.clamp(0, 1))
    assert got.dtype == ref.dtype and got.device == ref.device
    # the temporal memory matters: later frames depend on earlier latent frames (else the test could not fail)
    with torch.inference_mode():
        alone = taehv.decode(z[:, :, 3:])
    assert not torch.equal(alone, ref[:, 1 + 4 * 2:])


def test_state_dict_continues_exactly_through_a_file(cu, decoding, taehv, tmp_path):
    """Decode 4 latent frames, save the state (torch.save / weights_only load), continue in a new decoder."""
    z = latents(7)
    with torch.inference_mode():
        ref = taehv.decode(z)
        first = decoding.StreamingTAEHVDecoder(taehv, clamp=False)
        a = first.decode(z[:, :, :4])
        torch.save(first.state_dict(), tmp_path / "dec.pt")
        first.close()
        second = decoding.StreamingTAEHVDecoder(taehv, clamp=False)
        second.load_state_dict(torch.load(tmp_path / "dec.pt", weights_only=True))
        b = second.decode(z[:, :, 4:])
        fresh = decoding.StreamingTAEHVDecoder(taehv, clamp=False).decode(z[:, :, 4:])
    assert torch.equal(torch.cat([a, b], 1), ref)
    assert second.frames == ref.shape[1] and second.latent_frames == 9
    assert not torch.equal(fresh, b)  # without the state it is another video


def test_factory_picks_the_decoder_by_what_the_vae_holds(cu, decoding, taehv, vae):
    assert decoding.check_wan21_vae(taehv) == "TAEHV (fast, preview quality)"
    assert decoding.check_wan21_vae(vae) == "Wan2.1 VAE"
    with decoding.stream_decoder(taehv) as d:
        assert isinstance(d, decoding.StreamingTAEHVDecoder) and d.label == "TAEHV (fast, preview quality)"
    with decoding.stream_decoder(vae) as d:
        assert isinstance(d, decoding.StreamingVAEDecoder) and d.label == "Wan2.1 VAE"
    # a decoder state of one kind is refused by the other (a chunked run keeps its decoder)
    with decoding.stream_decoder(taehv) as t, decoding.stream_decoder(vae) as w:
        with pytest.raises(ValueError, match="another decoder"):
            w.load_state_dict(t.state_dict())
        with pytest.raises(ValueError, match="another decoder"):
            t.load_state_dict(w.state_dict())


@pytest.mark.parametrize("channels, dtype, name", [
    (48, torch.float32, "Wan2.2"),
    (32, torch.float32, "HunyuanVideo 1.5"),
    (16, torch.float16, "taehv for HunyuanVideo"),
])
def test_taehvs_of_other_models_are_refused_by_name(cu, decoding, taehv, channels, dtype, name):
    import comfy.sd

    from tests.comfyui.inject_pack import random_taehv_state_dict

    other = comfy.sd.VAE(sd=random_taehv_state_dict(0, channels, dtype))
    assert type(other.first_stage_model).__name__ == "TAEHV"
    for call in (decoding.check_wan21_vae, decoding.stream_decoder, decoding.StreamingTAEHVDecoder):
        with pytest.raises(ValueError, match=name) as e:
            call(other)
        assert "lighttaew2_1" in str(e.value) and "wan_2.1_vae.safetensors" in str(e.value)


def test_a_vae_that_is_neither_names_both_files(cu, decoding):
    class NotWan:
        first_stage_model = torch.nn.Linear(1, 1)
        latent_channels = 4

    with pytest.raises(ValueError, match=r"not the Wan2\.1 VAE .*wan_2\.1_vae\.safetensors.*lighttaew2_1"):
        decoding.stream_decoder(NotWan())


# ----------------------------------------------------------------------------- in the sampler


def _sampler(model, cond, vae, seconds=TINY_SAMPLER["seconds"]):
    node = env.prepared_node("RollingForcingSampler", "6")
    with torch.inference_mode():
        return node.execute(model, cond, TINY_SAMPLER["width"], TINY_SAMPLER["height"], seconds,
                            TINY_SAMPLER["seed"], vae=vae).result


def test_sampler_runs_end_to_end_with_taehv(cu, model, cond, taehv):
    """1 s = 2 blocks = 6 latent frames -> 21 frames, each exactly the one-shot TAEHV decode of the LATENT."""
    latent, images, info, _video = _sampler(model, cond, taehv)
    n = latent["samples"].shape[2]
    assert n == 6 and images.shape == (1 + 4 * (n - 1), 32, 32, 3)
    assert "decoder: TAEHV (fast, preview quality)" in info
    with torch.inference_mode():
        ref = taehv.decode(latent["samples"]).clamp(0, 1)
    assert torch.equal(images, ref.reshape(-1, 32, 32, 3))


def test_summary_names_the_wan_vae_decoder(cu, model, cond, vae):
    nodes = cu["pack"].nodes
    run = nodes.sampler_run.SamplerRun.prepare(model, cond, 32, 32, 1.0, 3, nodes.run_inputs.DEFAULT_STEPS_TEXT, None,
                                               vae, False, 5.0, None)
    assert "decoder: Wan2.1 VAE" in run.summary


def test_chunked_run_with_taehv_equals_one_run(cu, model, cond, taehv, vae):
    """2.75 s (4 blocks, 45 frames) in chunks of 1.5 s (2 blocks): the chunks' frames equal one sampler run's exactly (the
    TAEHV memory goes through the saved chunk state); continuing the run with the Wan2.1 VAE is refused."""
    lat, images, _info, _video = _sampler(model, cond, taehv, seconds=2.75)

    def chunk(v):
        node = env.prepared_node("RollingForcingChunkedSampler", "7")
        with torch.inference_mode():
            return node.execute(model, cond, v, 32, 32, 2.75, 1.5, TINY_SAMPLER["seed"], "video/taehv").result

    frames, lats = [], []
    first = chunk(taehv)
    env.node_class("RollingForcingAppendVideo").execute(first[0], first[1])
    with pytest.raises(ValueError, match="another decoder"):
        chunk(vae)
    second = chunk(taehv)
    env.node_class("RollingForcingAppendVideo").execute(second[0], second[1])
    for k, out in enumerate((first, second)):
        assert f"chunk {k + 1}/2" in out[3]
        frames.append(out[0])
        lats.append(out[2]["samples"])
        assert "decoder: TAEHV" in out[3]
    assert torch.equal(torch.cat(lats, dim=2), lat["samples"])
    assert torch.equal(torch.cat(frames), images) and images.shape[0] == 1 + 4 * (4 * 3 - 1)


# ----------------------------------------------------------------------------- ComfyUI without TAEHV


def test_without_taehv_the_error_names_the_version_and_the_missing_piece(cu, adapter, decoding, monkeypatch):
    """Runs everywhere: on ComfyUI without TAEHV (0.3.x) as it is, elsewhere with the module hidden."""
    if adapter.taehv_problem() is None:
        monkeypatch.setitem(sys.modules, "comfy.taesd.taehv", None)  # import now fails as if it were absent
    version = env.comfyui_version()
    problem = adapter.taehv_problem()
    assert isinstance(problem, adapter.ComfyUIIncompatible)
    assert f"ComfyUI {version} has no module comfy.taesd.taehv" in str(problem)
    with pytest.raises(adapter.ComfyUIIncompatible, match=f"ComfyUI {version} has no module comfy.taesd.taehv"):
        decoding.StreamingTAEHVDecoder(types.SimpleNamespace(first_stage_model=torch.nn.Module()))
    assert not adapter.is_taehv(torch.nn.Module())
    # what Load VAE gives for a TAEHV file there: a VAE without a model
    with pytest.raises(ValueError, match=rf"TAEHV file \(lighttaew2_1\).*ComfyUI {version} has no module "
                                         r"comfy\.taesd\.taehv.*wan_2\.1_vae\.safetensors"):
        decoding.stream_decoder(types.SimpleNamespace(first_stage_model=None, latent_channels=16))


def test_load_vae_lists_and_loads_lighttaew2_1_from_vae_approx(cu, decoding, taehv, tmp_path):
    """The user's path: lighttaew2_1.safetensors in models/vae_approx shows in ComfyUI's own Load VAE and loads
    into a VAE the stream decoder takes as TAEHV (same frames as the test VAE built from the same weights)."""
    import comfy.utils  # noqa: F401
    import folder_paths
    import nodes as comfy_nodes
    import safetensors.torch

    from tests.comfyui.inject_pack import random_taehv_state_dict

    folder = tmp_path / "vae_approx"
    folder.mkdir()
    safetensors.torch.save_file(random_taehv_state_dict(0, 16), str(folder / "lighttaew2_1.safetensors"))
    folder_paths.add_model_folder_path("vae_approx", str(folder))
    try:
        loader = comfy_nodes.VAELoader
        assert "lighttaew2_1.safetensors" in loader.vae_list(loader)
        loaded = loader().load_vae("lighttaew2_1.safetensors")[0]
    finally:
        folder_paths.folder_names_and_paths["vae_approx"][0].remove(str(folder))
        folder_paths.filename_list_cache.pop("vae_approx", None)
    assert decoding.check_wan21_vae(loaded) == "TAEHV (fast, preview quality)"
    z = latents(11, (1, 16, 4, 4, 4))
    with torch.inference_mode():
        with decoding.stream_decoder(loaded) as d:
            got = stream(d, z, [2, 2])
        ref = taehv.decode(z).clamp(0, 1)
    assert torch.equal(got, ref)
