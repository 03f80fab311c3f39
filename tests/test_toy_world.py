"""The toy world (rolling.toy): scenes, captions, detectors, text encoder, VAE and the shipped weights."""
import numpy as np
import pytest
import torch

from rolling.toy import detect
from rolling.toy.captions import VOCABULARY, all_captions, make_caption, parse_caption
from rolling.toy.text import TOKENS, TEXT_DIM, TextEncoder
from rolling.toy.vae import StreamingDecoder, ToyVAE, count_parameters
from rolling.toy.world import (BACKGROUNDS, COLOURS, MOTIONS, SHAPES, Scene, all_attributes, from_video,
                               sample_scene, to_video)


# ------------------------------------------------------------------------------------------ world
def test_world_is_deterministic_and_frames_render_alone():
    a = Scene("triangle", "yellow", "orbiting", "light", seed=7)
    b = Scene("triangle", "yellow", "orbiting", "light", seed=7)
    clip = a.render(123_456, 20)
    assert clip.shape == (20, 64, 64, 3) and clip.dtype == np.float32
    assert np.array_equal(clip, b.render(123_456, 20))
    for k in (0, 7, 19):
        assert np.array_equal(a.render(123_456 + k, 1)[0], clip[k])
    assert not np.array_equal(clip, Scene("triangle", "yellow", "orbiting", "light", seed=8).render(123_456, 20))
    u8 = a.render(5, 3, uint8=True)
    assert u8.dtype == np.uint8 and np.abs(u8 / 255.0 - a.render(5, 3)).max() <= 0.5 / 255 + 1e-6


def test_motions_follow_their_law():
    t = np.arange(0, 400)
    left = Scene("circle", "red", "drifting left", "dark", seed=1)
    x, y = left.position(t)
    step = np.mod(np.diff(x) + 32, 64) - 32
    assert np.all(step < 0) and np.ptp(y) == 0 and np.all((0 <= x) & (x < 64))  # wraps around
    x, y = Scene("square", "blue", "bouncing", "light", seed=2).position(t)
    assert np.ptp(x) == 0 and np.ptp(y) > 10
    sc = Scene("circle", "green", "orbiting", "dark", seed=3)
    x, y = sc.position(t)
    assert np.allclose(np.hypot(x - 31.5, y - 31.5), sc.params["orbit"])
    # the object never leaves the frame vertically
    for i, attrs in enumerate(all_attributes()):
        s = Scene(**attrs, seed=i)
        f = s.render(1000, 60)
        rows = detect.object_mask(f).any(axis=2)  # [n, H]
        assert not rows[:, 0].any() and not rows[:, -1].any(), s


def test_scene_errors_name_the_allowed_values():
    with pytest.raises(ValueError, match="circle, square, triangle"):
        Scene("hexagon", "red", "bouncing", "dark")
    with pytest.raises(ValueError, match="red, green, blue, yellow"):
        Scene("circle", "pink", "bouncing", "dark")
    with pytest.raises(ValueError, match="t0 must be"):
        Scene("circle", "red", "bouncing", "dark").render(-1, 2)


def test_captions_round_trip():
    caps = all_captions()
    assert len(caps) == len(set(caps)) == len(SHAPES) * len(COLOURS) * len(MOTIONS) * len(BACKGROUNDS) == 96
    for attrs, cap in zip(all_attributes(), caps):
        assert parse_caption(cap) == attrs
        assert Scene.from_caption(cap, seed=3).caption() == cap == make_caption(**attrs)
    assert parse_caption("  A Red  CIRCLE drifting left on a dark background ")["colour"] == "red"
    assert make_caption("circle", "red", "drifting left", "dark") == "a red circle drifting left on a dark background"
    with pytest.raises(ValueError, match="allowed words: a, red"):
        parse_caption("a purple circle bouncing on a dark background")
    with pytest.raises(ValueError, match="grammar"):
        parse_caption("a red circle on a dark background")
    with pytest.raises(ValueError, match="grammar"):
        parse_caption("a circle red bouncing on a dark background")
    rng = np.random.default_rng(0)
    s = sample_scene(rng)
    assert Scene.from_caption(s.caption(), s.seed) == s


# -------------------------------------------------------------------------------------- detectors
def test_detectors_are_exact_on_ground_truth():
    rng = np.random.default_rng(1)
    for _ in range(24):
        s = sample_scene(rng)
        t0 = int(rng.integers(0, 10**6))
        r = detect.score(s.render(t0, 41), s, t0=t0)
        for k in ("found", "background", "colour", "shape", "motion", "position_within_2px"):
            assert r[k] == 1.0, (s, k, r)
        assert r["position_error_px"] < 0.5 and r["spatial_correlation"] > 0.8
    # every shape / colour / motion / background, with the uint8 and torch inputs too
    for i, a in enumerate(all_attributes()[::5]):
        s = Scene(**a, seed=100 + i)
        f = s.render(50, 33, uint8=True)
        r = detect.score(torch.from_numpy(f), s.caption())
        assert r["colour"] == r["shape"] == r["background"] == r["motion"] == 1.0, (a, r)


def test_detectors_fail_on_static_noise():
    rng = np.random.default_rng(2)
    noise = rng.random((33, 64, 64, 3)).astype(np.float32)
    r = detect.score(noise, "a red circle bouncing on a dark background")
    assert r["found"] == 0 and r["colour"] == 0 and r["shape"] == 0 and r["motion"] == 0
    assert abs(r["spatial_correlation"]) < 0.05
    # an empty frame (background only) has no object either; a static object has no motion
    bg = Scene("circle", "red", "bouncing", "dark").background_image()
    assert detect.detect(bg)[0]["found"] is False
    still = np.repeat(Scene("circle", "red", "bouncing", "dark", seed=1).render(0, 1), 33, axis=0)
    assert detect.detect_motion(still) == [None] * 1
    # a wrong caption scores zero on the attribute that differs
    s = Scene("square", "blue", "drifting right", "light", seed=4)
    r = detect.score(s.render(0, 33), "a blue square drifting left on a light background")
    assert r["motion"] == 0 and r["shape"] == 1


def test_spatial_correlation_separates_structure_from_noise():
    frame = Scene("circle", "red", "orbiting", "light", seed=5).render(9, 1)[0]
    assert detect.spatial_correlation(frame) > 0.8
    noisy = np.random.default_rng(0).normal(0.5, 0.2, frame.shape).astype(np.float32)
    assert abs(detect.spatial_correlation(noisy)) < 0.05
    assert detect.spatial_correlation(np.zeros((2, 64, 64, 3))).tolist() == [1.0, 1.0]


# ----------------------------------------------------------------------------------- text encoder
def test_text_encoder_shapes_padding_and_errors():
    enc = TextEncoder()
    cap = "a red circle drifting left on a dark background"
    e = enc.encode(cap)
    assert e.shape == (1, TOKENS, TEXT_DIM) and e.dtype == torch.float32
    used = (e[0].abs().sum(-1) > 0).tolist()
    assert used == [True] * 10 + [False] * (TOKENS - 10)  # 9 words + </s>, then zero padding
    assert torch.equal(e, TextEncoder().encode(cap.upper()))  # deterministic, case-insensitive
    assert torch.equal(e[0, 0], e[0, 6])  # "a" twice
    assert not torch.equal(e, enc.encode("a red circle drifting right on a dark background"))
    assert (enc.encode("")[0].abs().sum(-1) > 0).sum() == 1  # the empty prompt is just </s>
    assert enc.encode_batch(all_captions()).shape == (96, TOKENS, TEXT_DIM)
    assert len(VOCABULARY) == 17
    with pytest.raises(ValueError, match="unknown word.*knows: a, red"):
        enc.encode("a red cat bouncing on a dark background")
    with pytest.raises(ValueError, match="at most 15"):
        enc.encode(" ".join(["a"] * 16))
    bank = enc.prompt_bank()
    assert bank.context.shape == (96, TOKENS, TEXT_DIM) and bank.negative.shape == (1, TOKENS, TEXT_DIM)


# -------------------------------------------------------------------------------------------- VAE
def test_vae_shapes_follow_wan_compression():
    torch.manual_seed(0)
    vae = ToyVAE().eval()
    assert count_parameters(vae) < 1_000_000
    for n in (1, 2, 5):
        t = 1 + 4 * (n - 1)
        video = torch.rand(2, 3, t, 64, 64) * 2 - 1
        with torch.no_grad():
            z = vae.encode(video)
            assert z.shape == (2, 16, n, 8, 8)
            out = vae.decode(z)
        assert out.shape == (2, 3, t, 64, 64) and out.abs().max() <= 1
    with pytest.raises(ValueError, match=r"1 \+ 4\(n-1\)"):
        vae.encode(torch.zeros(1, 3, 4, 64, 64))
    # latent frame k depends on pixel frames 4k-3..4k only (causal, per group)
    video = torch.rand(1, 3, 9, 64, 64) * 2 - 1
    changed = video.clone()
    changed[:, :, 5:] = 0
    with torch.no_grad():
        a, b = vae.encode(video), vae.encode(changed)
    assert torch.equal(a[:, :, :2], b[:, :, :2]) and not torch.equal(a[:, :, 2], b[:, :, 2])


@pytest.fixture(scope="module")
def shipped_vae():
    from rolling.toy import load_vae
    return load_vae()


@pytest.mark.parametrize("chunks", [(3, 3, 3, 3, 3, 3, 3), (1, 2, 4, 14)])
def test_streamed_decode_is_bit_equal(shipped_vae, chunks):
    z = torch.randn(1, 16, sum(chunks), 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = shipped_vae.decode(z)
        sd = StreamingDecoder(shipped_vae)
        parts, k = [], 0
        for c in chunks:
            parts.append(sd.decode(z[:, :, k:k + c]))
            k += c
            assert sd.pixel_frames == sum(p.shape[2] for p in parts) == 1 + 4 * (k - 1)
    assert torch.equal(torch.cat(parts, dim=2), full)


def test_shipped_vae_reconstruction_keeps_detector_accuracy(shipped_vae):
    from rolling.toy.training import clip
    rng = np.random.default_rng(11)
    for i, attrs in enumerate([all_attributes()[j] for j in (3, 30, 57, 90)]):
        s = Scene(**attrs, seed=2 * i + 1)  # odd seed: never trained on
        t0 = int(rng.integers(0, 10**5))
        video = clip(s, t0, 11)  # 41 pixel frames
        with torch.no_grad():
            z = shipped_vae.encode(video[None])
            rec = from_video(shipped_vae.decode(z))[0]
        assert z.shape == (1, 16, 11, 8, 8)
        gt = from_video(video[None])[0]
        psnr = 10 * np.log10(1 / np.mean((gt - rec) ** 2))
        r = detect.score(rec, s, t0=t0)
        assert psnr > 24, (s, psnr)
        for k in ("background", "colour", "shape", "motion"):
            assert r[k] >= 0.9, (s, k, r)
        assert r["position_error_px"] < 2, (s, r)
    assert to_video(gt).shape == (1, 3, 41, 64, 64)


def test_shipped_latents_are_normalised(shipped_vae):
    from rolling.toy.training import clip
    rng = np.random.default_rng(5)
    vids = torch.stack([clip(sample_scene(rng), int(rng.integers(10**5)), 21) for _ in range(8)])
    with torch.no_grad():
        z = shipped_vae.encode(vids)  # [8, 16, 21, 8, 8]
    per_channel = z.transpose(0, 1).flatten(1)
    assert per_channel.mean(1).abs().max() < 0.35
    assert ((per_channel.std(1) > 0.7) & (per_channel.std(1) < 1.4)).all()


# ---------------------------------------------------------------------------------------- teacher
def test_shipped_teacher_loads_and_samples_structure(shipped_vae):
    from rolling.loading import load_model
    from rolling.toy import load_teacher
    from rolling.toy.sampling import sample
    from rolling.toy.store import TEACHER_PATH, teacher_config

    teacher = load_teacher()
    cfg = teacher_config()
    assert cfg.text_dim == TEXT_DIM and cfg.text_len == TOKENS
    assert "blocks.0.self_attn.q.weight" in teacher.state_dict()
    again = load_model(TEACHER_PATH, dtype="fp32", num_heads=cfg.num_heads)  # the core's loader reads it too
    assert all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), again.state_dict().values()))

    enc = TextEncoder()
    cap = "a red square bouncing on a light background"
    z = sample(teacher, enc.encode(cap), enc.encode(""), frames=21, steps=16, guidance=2.0, seed=0)
    with torch.no_grad():
        frames = from_video(shipped_vae.decode(z))[0]
    assert frames.shape == (81, 64, 64, 3)
    lc, lc_noise = detect.latent_correlation(z), detect.latent_correlation(torch.randn_like(z))
    assert lc["spatial"] > 0.2 and lc["temporal"] > 0.3, lc  # structure in space and time
    assert abs(lc_noise["spatial"]) < 0.1 and abs(lc_noise["temporal"]) < 0.1, lc_noise  # static noise: none
    r = detect.score(frames, cap)
    assert r["found"] > 0.9 and r["background"] > 0.9 and r["colour"] > 0.9, r


def test_training_is_reproducible_from_the_seed():
    from rolling.toy.training import TeacherTrainConfig, VAETrainConfig, train_teacher, train_vae
    cfg = VAETrainConfig(steps=2, clips=2, stats_clips=4, log_every=1, seed=3)
    (a, _), (b, _) = train_vae(cfg, log=lambda *_: None), train_vae(cfg, log=lambda *_: None)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    tcfg = TeacherTrainConfig(steps=2, batch=2, dataset_clips=2, latent_frames=2, ema_start=1, eval_every=0, seed=3)
    (m1, r1), (m2, _) = (train_teacher(tcfg, a, log=lambda *_: None) for _ in range(2))
    assert all(torch.equal(x, y) for x, y in zip(m1.state_dict().values(), m2.state_dict().values()))
    assert r1["curve"][-1]["step"] == 2
