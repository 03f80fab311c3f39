"""Training (rolling.train): window selection, differentiable forwards, gradient routing, losses,
EMA, checkpoints, CLI dry run. Tiny models on CPU; each test takes a few seconds at most."""
import json
import math

import pytest
import torch

from rolling.cache import RollingKVCache
from rolling.config import RollingConfig, WanConfig
from rolling.forward import TextContext, TimeEmbedder, WanArch, forward
from rolling.attention import sdpa_attention
from rolling.model import build_model
from rolling.noise import SeededNoise
from rolling.sampler import RollingSampler
from rolling.schedule import Forward, rolling_windows
from rolling.train import windows as W
from rolling.train.config import TrainConfig, load_config
from rolling.train.dit import WanDiT
from rolling.train.ema import EMA
from rolling.train.losses import dmd_gradient, dmd_loss, generator_loss, sample_timesteps, shifted_timestep
from rolling.train.rollout import Rollout, RolloutChoice, loss_clip

torch.set_num_threads(1)

TINY = dict(dim=32, ffn_dim=64, num_heads=2, num_layers=2, freq_dim=16, text_dim=16)
H, WD = 2, 4  # latent height, width (2 tokens per frame)
RC = TrainConfig().rolling_config()  # reference training geometry: 27-frame cache, 21-frame span


LIGHT = dict(frames_per_block=1, denoising_steps=(1000, 750, 500, 250), loss_frames=6, rollout_frames=(6, 7, 8))


def tiny_cfg(**kw) -> TrainConfig:
    base = dict(generator=TINY, critic=TINY, teacher=TINY, latent_height=H, latent_width=WD, text_tokens=8,
                mixed_precision=False, teacher_dtype="fp32", gradient_checkpointing=True, device="cpu",
                save_every=0, log_every=0, lr=1e-3, lr_critic=1e-3)
    base.update(kw)
    return TrainConfig(**base)


def _trainable(model):
    for p in model.parameters():
        p.requires_grad_(True)
    return model


@pytest.fixture
def ctx():
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 8, 16, generator=g)


# ---------------------------------------------------------------------------------- windows (pure)

@pytest.mark.parametrize("T,fb,L", [(5, 3, 21), (5, 1, 7), (4, 1, 6), (3, 2, 8), (1, 3, 6)])
def test_gradient_windows_disjoint_and_cover_loss_frames(T, fb, L):
    for nb in range(L // fb, L // fb + 12):
        n = nb * fb
        start = n - L
        for k in range(T):
            ow = W.offset_windows(nb, T, k)
            seen = [b for w in ow for b in W.window_blocks(w, nb, T)]
            assert sorted(seen) == list(range(nb)), (nb, k)  # offset windows: disjoint, cover every block
            gw = W.gradient_windows(nb, T, k, fb, L)
            assert set(gw) <= set(ow)
            gblocks = [b for w in gw for b in W.window_blocks(w, nb, T)]
            assert len(gblocks) == len(set(gblocks))  # gradient windows never overlap
            loss_blocks = {b for b in range(nb) if b * fb >= start}
            assert loss_blocks <= set(gblocks)  # ... and cover every loss frame
            for w in gw:  # each one reaches into the loss frames
                assert (W.window_blocks(w, nb, T)[-1] + 1) * fb > start
            for w in set(ow) - set(gw):  # the others lie entirely before the loss frames
                assert (W.window_blocks(w, nb, T)[-1] + 1) * fb <= start
            for b in range(nb):
                w = W.block_window(b, nb, T, k)
                assert w % T == k and b in W.window_blocks(w, nb, T)
        assert W.sf_gradient_blocks(nb, fb, L) == sorted(b for b in range(nb) if b * fb >= start)
        mask = W.loss_frame_mask(n, L, fb)
        assert len(mask) == L and all(mask[fb:]) and (all(mask) if n == L else not any(mask[:fb]))


def test_reference_geometry_examples():
    # 27 frames, offset 2: windows 2 (blocks 0-2), 7 (3-7), 12 (8) -> all three reach the loss frames 6..26
    assert W.gradient_windows(9, 5, 2, 3, 21) == [2, 7, 12]
    # offset 0: window 0 (block 0, frames 0-2) ends before frame 6 -> no gradient
    assert W.gradient_windows(9, 5, 0, 3, 21) == [5, 10]
    assert W.offset_windows(9, 5, 0) == [0, 5, 10]
    assert len(list(rolling_windows(5, 9))) == 13


# ---------------------------------------------------------------------------------- forwards

def test_causal_forward_matches_core(ctx):
    """WanDiT over TrainKVCache = rolling.forward.forward over RollingKVCache (denoise + update plans)."""
    model = build_model(WanConfig(**TINY), seed=0)
    rc = RollingConfig()
    arch = WanArch.of(model)
    mk = lambda cls: cls(rc, num_layers=2, num_heads=2, head_dim=16, batch=1, grid=(1, 2), device="cpu",
                         dtype=torch.float32)
    from rolling.train.cache import TrainKVCache
    core_cache, train_cache = mk(RollingKVCache), mk(TrainKVCache)
    dit = WanDiT(model)
    text = [(0, 0, TextContext(model, ctx, dtype=torch.float32, device="cpu"))]
    time_ = TimeEmbedder(model, dtype=torch.float32, device="cpu")
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for b in range(8):  # block b: update pass, then a denoise pass over the next window
        x = torch.randn(1, 16, 3, H, WD, generator=g)
        blocks = tuple(range(b + 1, b + 1 + min(5, 8 - b)))
        for fwd in (Forward(0, "update", clean=(b,)), Forward(1, "window", blocks=blocks, steps=(1,) * len(blocks))):
            p1, p2 = core_cache.plan(fwd), train_cache.plan(fwd)
            xin = x if fwd.clean else torch.randn(1, 16, p1.num_frames, H, WD, generator=g)
            ts = [0.0] * 3 if fwd.clean else [952.381] * p1.num_frames
            tx = [(0, xin.shape[2], text[0][2])]
            v1 = forward(model, arch, xin, ts, p1, core_cache, tx, time_, sdpa_attention)
            v2 = dit(xin, ts, ctx, plan=p2, cache=train_cache)
            core_cache.commit(p1)
            train_cache.commit(p2)
            worst = max(worst, (v1 - v2).abs().max().item())
    assert worst < 1e-5


def test_bidirectional_forward_is_full_attention(ctx):
    """The teacher/critic forward equals the core's first window (no history: full attention, positions 0..F-1),
    and it is one function of all frames (changing the last frame changes the first frame's output)."""
    model = build_model(WanConfig(**TINY), seed=0)
    cache = RollingKVCache(RollingConfig(), num_layers=2, num_heads=2, head_dim=16, batch=1, grid=(1, 2),
                           device="cpu", dtype=torch.float32)
    x = torch.randn(1, 16, 15, H, WD, generator=torch.Generator().manual_seed(3))
    ts = [float(t) for t in torch.linspace(900, 100, 15)]
    v_core = forward(model, WanArch.of(model), x, ts, cache.plan(Forward(0, "window", blocks=tuple(range(5)),
                                                                        steps=(0,) * 5)), cache,
                     [(0, 15, TextContext(model, ctx, dtype=torch.float32, device="cpu"))],
                     TimeEmbedder(model, dtype=torch.float32, device="cpu"), sdpa_attention)
    dit = WanDiT(model)
    v = dit(x, ts, ctx)
    assert (v - v_core).abs().max().item() < 1e-5
    x2 = x.clone()
    x2[:, :, -1] += 1.0
    assert (dit(x2, ts, ctx)[:, :, 0] - v[:, :, 0]).abs().max() > 1e-4
    # batch with per-sample timesteps = per-sample forwards
    xb = torch.cat([x, x2])
    vb = dit(xb, [ts, ts[::-1]], torch.cat([ctx, ctx]))
    assert (vb[1:] - dit(x2, ts[::-1], ctx)).abs().max() < 1e-5


def test_rolling_rollout_final_equals_sampler(ctx):
    """Without gradient, the Rolling-Forcing rollout (27-frame training cache) reproduces the inference
    sampler (24-frame cache) block for block."""
    model = build_model(WanConfig(**TINY), seed=0)
    ref = RollingSampler(model, RollingConfig(), height=H, width=WD, dtype=torch.float32, device="cpu",
                         seed=3).generate(ctx, 9)
    assert RC.capacity_frames == 27 and RC.span_frames == 21
    ro = Rollout(WanDiT(model), RC, height=H, width=WD, batch=1, device="cpu")
    with torch.no_grad():
        res = ro.run(ctx, RolloutChoice(27, "rolling", 1), SeededNoise(3), loss_frames=21)
    assert (res.final - ref).abs().max().item() < 1e-5
    # outputs come from the offset windows: block b's output is its x0 in window w = b.. with w % 5 == 1
    assert res.video.shape == ref.shape and not (res.video == 0).all(dim=(0, 1, 3, 4)).any()


# ---------------------------------------------------------------------------------- gradient routing

def _has_grad(y, params):
    gs = torch.autograd.grad(y.sum(), params, retain_graph=True, allow_unused=True)
    return any(g is not None and g.abs().sum() > 0 for g in gs)


def _frame_grads(video, params):
    """Per output frame: is d(sum of the frame)/d(params) nonzero?"""
    return [video.requires_grad and _has_grad(video[:, :, f], params) for f in range(video.shape[2])]


class _Spy(torch.nn.Module):
    """Wraps the student: records per forward whether its input / output carry autograd."""

    def __init__(self, dit):
        super().__init__()
        self.dit, self.arch, self.log = dit, dit.arch, []

    def forward(self, x, ts, c, **kw):
        v = self.dit(x, ts, c, **kw)
        self.log.append(("update" if kw["plan"].writes else "denoise", x.requires_grad, v.requires_grad))
        return v


@pytest.mark.parametrize("n,k", [(27, 0), (27, 1), (27, 2), (27, 3), (27, 4), (24, 3), (21, 0)])
def test_rolling_gradient_reaches_exactly_the_loss_frames(ctx, n, k):
    model = _trainable(build_model(WanConfig(**TINY), seed=0))
    dit = WanDiT(model, checkpointing=True)
    spy = _Spy(dit)
    ro = Rollout(spy, RC, height=H, width=WD, batch=1, device="cpu")
    res = ro.run(ctx, RolloutChoice(n, "rolling", k), SeededNoise(5), loss_frames=21)
    nb, T = n // 3, 5
    expected_windows = W.gradient_windows(nb, T, k, 3, 21)
    denoise = [r for r in res.records if r.kind == "denoise"]
    assert [r.index for r in denoise if r.grad] == expected_windows == res.grad_indices
    assert len(denoise) == nb + T - 1
    # per forward: inputs never carry autograd (history is detached); outputs only in gradient windows;
    # clean-cache passes never
    assert all(not xin for _, xin, _ in spy.log)
    assert [vg for kind, _, vg in spy.log if kind == "denoise"] == [r.grad for r in denoise]
    assert not any(vg for kind, _, vg in spy.log if kind == "update")
    # per frame: exactly the last 21 frames carry gradient to the weights
    assert _frame_grads(res.video, [model.head.head.bias]) == [f >= n - 21 for f in range(n)]
    # per window: the loss frames of each gradient window reach the first block's weights through it
    deep = [model.blocks[0].self_attn.q.weight]
    for w in W.offset_windows(nb, T, k):
        frames = [f for b in W.window_blocks(w, nb, T) for f in range(3 * b, 3 * b + 3) if f >= n - 21]
        assert (w in expected_windows) == bool(frames)
        if frames:
            assert _has_grad(res.video[:, :, frames], deep)


@pytest.mark.parametrize("n,k", [(27, 0), (24, 4), (21, 2)])
def test_self_forcing_gradient_only_at_exit_step_on_loss_blocks(ctx, n, k):
    model = _trainable(build_model(WanConfig(**TINY), seed=0))
    spy = _Spy(WanDiT(model))
    ro = Rollout(spy, RC, height=H, width=WD, batch=1, device="cpu")
    res = ro.run(ctx, RolloutChoice(n, "self", k), SeededNoise(6), loss_frames=21)
    nb = n // 3
    den = [r for r in res.records if r.kind == "denoise"]
    assert len(den) == nb * (k + 1) and all(r.steps[0] <= k for r in den)
    assert [(r.index, r.steps[0]) for r in den if r.grad] == [(b, k) for b in range(nb) if 3 * b >= n - 21]
    assert all(not xin for _, xin, _ in spy.log)
    assert _frame_grads(res.video, [model.head.head.bias]) == [f >= n - 21 for f in range(n)]
    assert _has_grad(res.video[:, :, n - 21:], [model.blocks[0].ffn[0].weight])


def test_cache_guard_refuses_to_overwrite_kv_needed_by_backward(ctx):
    """With the 24-frame inference cache a 30-frame Self-Forcing rollout evicts block 1 when block 8 is
    written, but the gradient forwards of blocks 3.. attend to block 1 (a checkpointed recompute would
    silently read block 8 instead). The training cache holds whole rollouts, so this cannot happen there."""
    model = _trainable(build_model(WanConfig(**TINY), seed=0))
    ro = Rollout(WanDiT(model, checkpointing=True), RollingConfig(), height=H, width=WD, batch=1, device="cpu")
    with pytest.raises(RuntimeError, match="overwrite"):
        ro.run(ctx, RolloutChoice(30, "self", 0), SeededNoise(6), loss_frames=21)
    with torch.no_grad():  # without gradient nothing needs the old K/V: eviction is fine
        ro.run(ctx, RolloutChoice(30, "self", 0), SeededNoise(6), loss_frames=21)


def test_checkpointed_gradients_equal_plain_gradients(ctx):
    """Gradient checkpointing (blocks recomputed in backward, reading cache views) changes no gradient."""
    grads = []
    for ck in (False, True):
        model = _trainable(build_model(WanConfig(**TINY), seed=0))
        ro = Rollout(WanDiT(model, checkpointing=ck), RC, height=H, width=WD, batch=1, device="cpu")
        for choice in (RolloutChoice(27, "self", 2), RolloutChoice(24, "rolling", 1)):
            res = ro.run(ctx, choice, SeededNoise(4), loss_frames=21)
            (res.video[:, :, -21:] ** 2).mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-5) for a, b in zip(*grads))
    assert sum(g.abs().sum() for g in grads[0]) > 0


@pytest.mark.parametrize("n", [21, 27])
def test_dmd_loss_gradient_reaches_unmasked_loss_frames_only(ctx, n):
    """d(DMD loss)/d(output frames): nonzero exactly on the loss frames, minus the first block if N > 21."""
    model = _trainable(build_model(WanConfig(**TINY), seed=0))
    ro = Rollout(WanDiT(model), RC, height=H, width=WD, batch=1, device="cpu")
    res = ro.run(ctx, RolloutChoice(n, "rolling", 3), SeededNoise(2), loss_frames=21)
    video = res.video
    video.retain_grad()
    clip, mask = loss_clip(video, n, 21, 3)
    assert clip.shape[2] == 21 and (mask is None) == (n == 21)
    critic = WanDiT(build_model(WanConfig(**TINY), seed=1))
    teacher = WanDiT(build_model(WanConfig(**TINY), seed=2))
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps(1, g)
    loss, stats = generator_loss(clip, mask, critic=critic, teacher=teacher, cond=ctx, uncond=torch.zeros_like(ctx),
                                 t=t, eps=torch.randn(clip.shape, generator=g), guidance=3.0)
    loss.backward()
    per_frame = video.grad.abs().sum(dim=(0, 1, 3, 4)) > 0
    first = n - 21 + (3 if n > 21 else 0)
    assert per_frame.tolist() == [f >= first for f in range(n)]
    assert math.isfinite(loss.item()) and stats["dmd_gap"] > 0


# ---------------------------------------------------------------------------------- losses

def test_timestep_law():
    t = torch.arange(0, 1000, dtype=torch.float32)
    s = shifted_timestep(t, 5.0)
    u = t / 1000
    assert torch.allclose(s, (1000 * 5 * u / (1 + 4 * u)).clamp(20, 980))
    assert s.min() == 20 and s.max() == 980 and (s[1:] >= s[:-1]).all()
    draws = sample_timesteps(4000, torch.Generator().manual_seed(0))
    assert draws.min() >= 20 and draws.max() <= 980
    assert 0.6 < (draws > 500).float().mean() < 0.9  # the shift puts most mass at high noise (exact 0.80)


def test_dmd_gradient_and_loss_values():
    x = torch.randn(2, 4, 3, 2, 2, dtype=torch.float64)
    real, fake = torch.randn_like(x), torch.randn_like(x)
    g = dmd_gradient(x, fake, real)
    norm = (x - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    assert torch.allclose(g.double(), ((fake - real) / norm), atol=1e-5)
    xr = x.clone().requires_grad_(True)
    loss = dmd_loss(xr, g)
    assert torch.allclose(loss, 0.5 * (g.double() ** 2).mean())
    loss.backward()  # d/dx 0.5 mean((x - sg(x - g))^2) = g / numel
    assert torch.allclose(xr.grad, g.double() / x.numel())
    mask = torch.tensor([False, True, True])
    assert torch.allclose(dmd_loss(x, g, mask), 0.5 * (g.double()[:, :, 1:] ** 2).mean())
    assert torch.isfinite(dmd_gradient(real, fake, real)).all()  # zero normaliser -> nan_to_num


# ---------------------------------------------------------------------------------- trainer

def test_one_full_iteration_finite_and_updates(tmp_path):
    cfg = tiny_cfg(output_dir=str(tmp_path))
    tr = __import__("rolling.train.trainer", fromlist=["Trainer"]).Trainer(cfg)
    before = {n: {k: v.clone() for k, v in m.state_dict().items()}
              for n, m in (("g", tr.generator), ("c", tr.critic), ("t", tr.teacher))}
    st = tr.train_step()  # step 0: generator + critic
    for key in ("generator_loss", "critic_loss", "generator_grad_norm", "critic_grad_norm", "dmd_gap"):
        assert math.isfinite(st[key]), key
    assert st["frames"] in (21, 24, 27) and st["branch"] in ("rolling", "self") and st["grad_forwards"] > 0
    changed = lambda n, m: any(not torch.equal(before[n][k], v) for k, v in m.state_dict().items())
    assert changed("g", tr.generator) and changed("c", tr.critic) and not changed("t", tr.teacher)
    st = tr.train_step()  # step 1: critic only
    assert "generator_loss" not in st and math.isfinite(st["critic_loss"])
    assert [c["phase"] for c in tr.choices] == ["generator", "critic", "critic"]
    assert all(c["local"] == c["shared"] for c in tr.choices)  # single process: rank 0 = me


def test_ema_math():
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 2).double()
    ema = EMA(m, 0.99, dtype=torch.float64)
    shadow = {n: p.detach().clone() for n, p in m.named_parameters()}
    for _ in range(5):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p))
        ema.update(m)
        for n, p in m.named_parameters():
            shadow[n] = 0.99 * shadow[n] + (1 - 0.99) * p.detach()
    for n in shadow:
        assert torch.allclose(ema.shadow[n], shadow[n], rtol=0, atol=1e-14)
    with pytest.raises(ValueError):
        EMA(m, 1.0)


def test_trainer_ema_schedule(tmp_path):
    """EMA created when the step counter reaches ema_start_step (copy), updated after each generator step."""
    from rolling.train.trainer import Trainer
    tr = Trainer(tiny_cfg(ema_start_step=2, gen_update_every=1, output_dir=str(tmp_path), **LIGHT))
    tr.train_step()
    assert tr.ema is None
    tr.train_step()  # step counter -> 2: EMA = copy of the generator
    assert tr.ema is not None
    p1 = {n: p.detach().clone() for n, p in tr.generator.named_parameters()}
    assert all(torch.equal(tr.ema.shadow[n], p1[n]) for n in p1)
    tr.train_step()  # generator step at step 2, then EMA update
    for n, p in tr.generator.named_parameters():
        assert torch.allclose(tr.ema.shadow[n], 0.99 * p1[n] + 0.01 * p.detach(), atol=1e-7)
        assert not torch.equal(p.detach(), p1[n])


def test_checkpoint_round_trip_and_resume(tmp_path):
    from rolling.loading import load_model
    from rolling.train.trainer import Trainer
    cfg = tiny_cfg(ema_start_step=1, gen_update_every=1, output_dir=str(tmp_path), **LIGHT)
    tr = Trainer(cfg)
    tr.train_step()
    tr.train_step()
    d = tr.save(str(tmp_path / "ck"))
    raw = torch.load(str(tmp_path / "ck" / "model.pt"), weights_only=True)
    assert {"generator", "critic", "generator_ema", "step"} <= set(raw) and raw["step"] == 2
    assert all(k.startswith("model.") for part in ("generator", "critic", "generator_ema") for k in raw[part])
    m_ema = load_model(d + "/model.pt", dtype="fp32")  # default: generator_ema
    m_reg = load_model(d + "/model.pt", dtype="fp32", weights="regular")
    for n, p in tr.generator.named_parameters():
        key = n[len("model."):]
        assert torch.equal(m_ema.state_dict()[key], tr.ema.shadow[n])
        assert torch.equal(m_reg.state_dict()[key], p.detach())
    assert not all(torch.equal(m_ema.state_dict()[k], m_reg.state_dict()[k]) for k in m_reg.state_dict())
    tr2 = Trainer(cfg.with_(resume=d))
    assert tr2.step == 2 and tr2.ema is not None
    for (n, p), (_, q) in zip(tr.generator.named_parameters(), tr2.generator.named_parameters()):
        assert torch.equal(p, q)
    s1, s2 = tr.gen_opt.state_dict()["state"], tr2.gen_opt.state_dict()["state"]
    assert all(torch.equal(s1[i]["exp_avg_sq"], s2[i]["exp_avg_sq"]) for i in s1)


def test_config_files(tmp_path):
    d = {"lr": 1e-5, "rollout_frames": [21, 24], "generator": "tiny", "denoising_steps": [1000, 500]}
    (tmp_path / "a.json").write_text(json.dumps(d))
    (tmp_path / "b.toml").write_text('lr = 1e-5\nrollout_frames = [21, 24]\ngenerator = "tiny"\n'
                                     'denoising_steps = [1000, 500]\n')
    for f in ("a.json", "b.toml"):
        c = load_config(str(tmp_path / f))
        assert c.lr == 1e-5 and c.rollout_frames == (21, 24) and c.denoising_steps == (1000, 500)
        assert c.lr_critic == 4e-7 and c.betas == (0.0, 0.999) and c.gen_update_every == 5
    (tmp_path / "c.json").write_text(json.dumps({"learning_rate": 1}))
    with pytest.raises(ValueError, match="unknown"):
        load_config(str(tmp_path / "c.json"))
    with pytest.raises(ValueError):
        TrainConfig(rollout_frames=(20,))
    ref = TrainConfig()
    assert (ref.lr, ref.lr_critic, ref.weight_decay, ref.grad_clip, ref.ema_decay, ref.ema_start_step,
            ref.guidance_scale, ref.rollout_frames, ref.loss_frames, ref.timestep_shift) == \
        (1.5e-6, 4e-7, 0.01, 10.0, 0.99, 200, 3.0, (21, 24, 27), 21, 5.0)


def test_cli_dry_run_real_sizes(tmp_path, capsys):
    from rolling.cli import main
    (tmp_path / "run.json").write_text("{}")
    assert main(["train", str(tmp_path / "run.json"), "--dry-run", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "1,418,996,800" in out and "14,288,491,584" in out  # 1.3B student / critic, 14B teacher
    assert "8 GPUs" in out and "GiB" in out and "TFLOP" in out


def test_models_load_release_and_sharded_checkpoints(tmp_path):
    """generator_ckpt: a release .pt ({"generator": {"model.*"}}); teacher_ckpt: a directory of safetensors
    shards (HF layout); the critic defaults to the teacher's weights when the shapes match."""
    from safetensors.torch import save_file
    from rolling.train.trainer import Trainer
    g = build_model(WanConfig(**TINY), seed=11)
    t = build_model(WanConfig(**TINY), seed=12)
    torch.save({"generator": {"model." + k: v for k, v in g.state_dict().items()}}, str(tmp_path / "ode_init.pt"))
    sd = t.state_dict()
    keys = sorted(sd)
    (tmp_path / "teacher").mkdir()
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        save_file({k: sd[k].contiguous() for k in part}, str(tmp_path / "teacher" / f"model-0000{i + 1}-of-00002.safetensors"))
    tr = Trainer(tiny_cfg(generator_ckpt=str(tmp_path / "ode_init.pt"), teacher_ckpt=str(tmp_path / "teacher"),
                          output_dir=str(tmp_path)))
    for dit, ref in ((tr.generator, g), (tr.teacher, t), (tr.critic, t)):
        assert all(torch.equal(dit.model.state_dict()[k], v) for k, v in ref.state_dict().items())
    assert all(p.requires_grad for p in tr.generator.parameters()) and all(p.requires_grad for p in tr.critic.parameters())
    assert not any(p.requires_grad for p in tr.teacher.parameters())


def test_prompt_bank_files(tmp_path):
    from safetensors.torch import save_file
    from rolling.train.data import PromptBank
    ctx, neg = torch.randn(5, 8, 16), torch.randn(8, 16)
    save_file({"context": ctx, "negative": neg}, str(tmp_path / "p.safetensors"))
    torch.save({"context": ctx, "negative": neg}, str(tmp_path / "p.pt"))
    for f in ("p.safetensors", "p.pt"):
        bank = PromptBank.from_file(str(tmp_path / f))
        assert torch.equal(bank.context, ctx) and bank.negative.shape == (1, 8, 16)
        batch = bank.sample(3, torch.Generator().manual_seed(0), "cpu")
        assert batch.shape == (3, 8, 16) and all(any(torch.equal(r, c) for c in ctx) for r in batch)
    torch.save({"context": ctx}, str(tmp_path / "bad.pt"))
    with pytest.raises(ValueError, match="negative"):
        PromptBank.from_file(str(tmp_path / "bad.pt"))


# ---------------------------------------------------------------------------------- issue 15: mutations, resume

class _ContextTeacher:
    """A fake score: v = (mean of its context row) * x + (mean of the timesteps) / 1000, per sample."""

    def __init__(self):
        self.calls = 0

    def __call__(self, x, timesteps, ctx):
        self.calls += 1
        a = ctx.float().mean(dim=(1, 2)).view(-1, 1, 1, 1, 1)
        tt = torch.tensor([sum(r) / len(r) for r in timesteps]).view(-1, 1, 1, 1, 1)
        return a * x + tt / 1000


@pytest.mark.parametrize("uncond_tokens", [8, 5])  # same token count: one batched forward; else two forwards
def test_teacher_cfg_formula(uncond_tokens):
    """teacher_x0 = cond + g * (cond - uncond) in x0 space (the reference's CFG), pinned to its values."""
    from rolling.train.losses import flow_to_x0, teacher_x0
    g = torch.Generator().manual_seed(0)
    xt = torch.randn(2, 4, 3, 2, 2, generator=g)
    t = torch.tensor([300.0, 800.0])
    cond = torch.randn(2, 8, 16, generator=g) + 1.0
    uncond = torch.randn(1, uncond_tokens, 16, generator=g) - 1.0
    teacher = _ContextTeacher()
    fake = lambda c: flow_to_x0(xt, teacher(xt, [[float(v)] * 3 for v in t], c), t)  # noqa: E731
    x0c, x0u = fake(cond), fake(uncond.expand(2, -1, -1))
    for guidance in (0.0, 1.0, 3.0):
        out = teacher_x0(teacher, xt, t, cond, uncond, guidance)
        assert torch.allclose(out, x0c + guidance * (x0c - x0u), atol=1e-6)
        # not the other conventions: uncond + g (cond - uncond), cond + g (uncond - cond)
        if guidance == 3.0:
            assert (out - (x0u + guidance * (x0c - x0u))).abs().max() > 0.1
            assert (out - (x0c + guidance * (x0u - x0c))).abs().max() > 0.1
    assert torch.allclose(teacher_x0(teacher, xt, t, cond, uncond, 0.0), x0c, atol=1e-6)


def test_generator_loss_uses_the_cfg_teacher():
    """The DMD gradient the generator loss applies is built from teacher_x0 with the configured guidance."""
    from rolling.train.losses import dmd_gradient, flow_to_x0, noise_to, teacher_x0
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 3, 2, 2, generator=g).requires_grad_(True)
    cond, uncond = torch.randn(1, 8, 16, generator=g) + 1, torch.randn(1, 8, 16, generator=g) - 1
    t, eps = torch.tensor([500.0]), torch.randn(1, 4, 3, 2, 2, generator=g)
    critic = lambda xt, ts, c: 0.3 * xt  # noqa: E731
    teacher = _ContextTeacher()
    loss, _ = generator_loss(x, None, critic=critic, teacher=teacher, cond=cond, uncond=uncond, t=t, eps=eps,
                             guidance=3.0)
    loss.backward()
    xt = noise_to(x.detach(), eps, t)
    grad = dmd_gradient(x.detach(), flow_to_x0(xt, critic(xt, None, cond), t),
                        teacher_x0(teacher, xt, t, cond, uncond, 3.0))
    assert torch.allclose(x.grad.double(), grad.double() / x.numel(), atol=1e-9)


@pytest.mark.parametrize("n,k", [(21, 4), (24, 2), (21, 1)])
def test_self_forcing_renoise_level_is_the_next_steps_sigma(ctx, n, k):
    """Through the real Rollout: a recording student (v = 0.5 x) and recorded noise give back, from each
    block's consecutive inputs, the sigma it was re-noised with: block b goes from step j to step j+1 with
    x_{j+1} = (1 - s) x0_j + s eps, s = sigma of step j+1 = t_{j+1} / 1000 (the timestep it is embedded at)."""
    from rolling.flow import FlowSchedule
    from rolling.train.rollout import GeneratorNoise
    seen, draws = [], {}

    def student(x, timesteps, context, *, plan, cache):
        seen.append((x.detach().clone(), list(timesteps)))
        return 0.5 * x

    class Recorded(GeneratorNoise):
        def __call__(self, block, step, shape, device, dtype):
            eps = super().__call__(block, step, shape, device, dtype)
            draws[(block, step)] = eps
            return eps

    arch = WanArch(dim=2, num_heads=1, num_layers=1, freq_dim=2, text_dim=16, in_dim=16, out_dim=16,
                   patch_size=(1, 1, 1))
    ro = Rollout(student, RC, height=H, width=WD, batch=1, device="cpu", arch=arch)
    with torch.no_grad():
        res = ro.run(ctx, RolloutChoice(n, "self", k), Recorded(torch.Generator().manual_seed(7)), loss_frames=21)
    warped = FlowSchedule(RC.shift).warp(RC.steps)
    denoise = [(x, ts) for x, ts in seen if any(ts)]  # clean-cache passes run at t = 0
    nb = n // 3
    assert len(denoise) == nb * (k + 1)
    for b in range(nb):
        xs = denoise[b * (k + 1):(b + 1) * (k + 1)]
        assert torch.equal(xs[0][0], draws[(b, 0)])  # step 0: the block's fresh noise
        for j, (x, ts) in enumerate(xs):
            assert ts == [pytest.approx(warped[j])] * 3  # step j is embedded at the j-th warped timestep
        for j in range(k):
            (x, ts), (x1, ts1) = xs[j], xs[j + 1]
            x0 = x - ts[0] / 1000 * 0.5 * x  # this step's x0 under v = 0.5 x
            eps = draws[(b, j + 1)]
            d = eps - x0
            s = float(((x1 - x0) * d).sum() / (d * d).sum())  # least squares: x1 = x0 + s (eps - x0)
            assert (x1 - (x0 + s * d)).abs().max() < 1e-5  # exactly one re-noise of this x0 with this eps
            assert s == pytest.approx(ts1[0] / 1000, abs=1e-5) and s == pytest.approx(warped[j + 1] / 1000, abs=1e-5)
    # the exit step's x0 is the output
    last = denoise[-1][0]
    assert torch.allclose(res.video[:, :, -3:], last - warped[k] / 1000 * 0.5 * last, atol=1e-6)


def test_prompt_bank_samples_by_epoch_without_replacement():
    from rolling.train.data import PromptBank
    bank = PromptBank.random(5, 2, 4, seed=0)
    ids = lambda bk, batch: [next(i for i in range(len(bk.context)) if torch.equal(r, bk.context[i]))  # noqa: E731
                             for r in batch]
    which = lambda batch: ids(bank, batch)  # noqa: E731
    g = torch.Generator().manual_seed(3)
    seq = [i for _ in range(10) for i in which(bank.sample(2, g, "cpu"))]  # 20 draws = 4 epochs
    epochs = [seq[i:i + 5] for i in range(0, 20, 5)]
    assert all(sorted(e) == [0, 1, 2, 3, 4] for e in epochs)  # every prompt once per epoch
    assert len({tuple(e) for e in epochs}) > 1 and bank.epoch == 4  # reshuffled each epoch
    # deterministic from the generator, and resumable from state_dict mid-epoch
    again = PromptBank.random(5, 2, 4, seed=0)
    g2 = torch.Generator().manual_seed(3)
    assert [i for _ in range(10) for i in which(again.sample(2, g2, "cpu"))] == seq
    a, b = PromptBank.random(5, 2, 4, seed=0), PromptBank.random(5, 2, 4, seed=0)
    ga, gb = torch.Generator().manual_seed(9), torch.Generator()
    a.sample(3, ga, "cpu")
    b.load_state_dict(a.state_dict())
    gb.set_state(ga.get_state())
    for _ in range(6):
        assert torch.equal(a.sample(2, ga, "cpu"), b.sample(2, gb, "cpu"))
    # ranks take disjoint slices of one shared stream: within an epoch no two ranks see the same prompt
    banks = [PromptBank.random(6, 2, 4, seed=0) for _ in range(3)]
    gens = [torch.Generator().manual_seed(5) for _ in range(3)]
    got = [ids(bk, bk.sample(2, gg, "cpu", rank=r, world_size=3)) for r, (bk, gg) in enumerate(zip(banks, gens))]
    assert sorted(i for part in got for i in part) == list(range(6))
    with pytest.raises(ValueError, match="same prompt file"):
        PromptBank.random(4, 2, 4).load_state_dict(a.state_dict())


def _history(hist):
    return [{k: v for k, v in h.items() if k != "time_s"} for h in hist]


def test_resume_is_a_bit_exact_continuation(tmp_path):
    """4 steps straight = 2 steps, save, a new Trainer resuming, 2 steps: same losses, choices, weights,
    EMA and optimizer state, bit for bit (every random stream is saved and restored)."""
    from rolling.train.trainer import Trainer
    cfg = tiny_cfg(ema_start_step=1, gen_update_every=2, output_dir=str(tmp_path), **LIGHT)
    straight = Trainer(cfg)
    h_straight = straight.train(4)
    first = Trainer(cfg)
    h_first = first.train(2)
    d = first.save(str(tmp_path / "ck"))
    resumed = Trainer(cfg.with_(resume=d))
    assert resumed.step == 2
    h_resumed = resumed.train(2)
    assert _history(h_first + h_resumed) == _history(h_straight)
    assert {h["branch"] for h in h_straight if "branch" in h} and any("generator_loss" in h for h in h_resumed)
    for name in ("generator", "critic"):
        pairs = zip(getattr(straight, name).named_parameters(), getattr(resumed, name).named_parameters())
        for (n, p), (_, q) in pairs:
            assert torch.equal(p, q), (name, n)
    assert all(torch.equal(straight.ema.shadow[n], resumed.ema.shadow[n]) for n in straight.ema.shadow)
    for o1, o2 in ((straight.gen_opt, resumed.gen_opt), (straight.critic_opt, resumed.critic_opt)):
        s1, s2 = o1.state_dict()["state"], o2.state_dict()["state"]
        assert all(torch.equal(s1[i][k], s2[i][k]) for i in s1 for k in ("exp_avg", "exp_avg_sq"))
    assert torch.equal(straight.noise_rng.get_state(), resumed.noise_rng.get_state())
    assert straight.prompts.state_dict()["pos"] == resumed.prompts.state_dict()["pos"]


def _write_cfg(tmp_path, **kw):
    d = dict(generator=TINY, critic=TINY, teacher=TINY, latent_height=H, latent_width=WD, text_tokens=8,
             mixed_precision=False, teacher_dtype="fp32", device="cpu", log_every=0, output_dir=str(tmp_path / "run"),
             **LIGHT)
    d.update(kw)
    d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(d))
    return str(path)


@pytest.mark.parametrize("save_every, steps, saved", [(0, 1, [1]), (2, 3, [2, 3]), (1, 2, [1, 2])])
def test_final_weights_are_always_saved(tmp_path, save_every, steps, saved):
    from rolling.loading import load_model
    from rolling.train import main
    assert main(_write_cfg(tmp_path, save_every=save_every, max_steps=steps)) == 0
    dirs = sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith("checkpoint_model_"))
    assert dirs == [f"checkpoint_model_{s:06d}" for s in saved]
    raw = torch.load(tmp_path / "run" / dirs[-1] / "model.pt", weights_only=True)
    assert raw["step"] == steps
    load_model(str(tmp_path / "run" / dirs[-1] / "model.pt"), dtype="fp32", weights="regular", num_heads=2)


def test_shipped_config_and_dry_run_without_one(capsys):
    """configs/train_1.3B.json is the reference run (the defaults plus the reference's files), and
    `train --dry-run` without a config prints the same plan."""
    from conftest import ROOT
    from rolling.cli import main
    cfg = load_config(str(ROOT / "configs" / "train_1.3B.json"))
    assert cfg == TrainConfig(generator_ckpt="checkpoints/ode_init.pt", critic_ckpt="wan_models/Wan2.1-T2V-1.3B",
                              teacher_ckpt="wan_models/Wan2.1-T2V-14B",
                              prompts="prompts/vidprom_filtered_extended_umt5.safetensors")
    assert main(["train", "--dry-run", "--gpus", "8"]) == 0
    no_cfg = capsys.readouterr().out
    assert "reference defaults" in no_cfg and "1,418,996,800" in no_cfg and "14,288,491,584" in no_cfg
    assert main(["train", str(ROOT / "configs" / "train_1.3B.json"), "--dry-run", "--gpus", "8"]) == 0
    with_cfg = capsys.readouterr().out
    assert no_cfg.split("\n", 1)[1] == with_cfg
    assert main(["train"]) == 2
    assert "train needs a CONFIG file" in capsys.readouterr().err
    assert main(["train", str(ROOT / "configs" / "train_1.3B.json")]) == 2  # the reference's files are not here
    assert "generator_ckpt = 'checkpoints/ode_init.pt': no such file" in capsys.readouterr().err
