import warnings

import pytest
import torch
from torch import nn

from rolling.attention import get_attention, sdpa_attention
from rolling.config import RollingConfig
from rolling.noise import SeededNoise
from rolling.rope import Rope, apply_rope
from rolling.sampler import RollingSampler, sample_video


def _sampler(model, **kw):
    cfg = kw.pop("cfg", RollingConfig())
    return RollingSampler(model, cfg, height=kw.pop("height", 4), width=kw.pop("width", 6), dtype=torch.float32,
                          device="cpu", **kw)


@pytest.mark.parametrize("nb", [1, 2, 3, 4, 5, 7])
def test_any_number_of_blocks(tiny_model, tiny_context, nb):
    calls = []
    s = _sampler(tiny_model, on_call=calls.append)
    blocks = list(s.stream(tiny_context, nb))
    assert [b.index for b in blocks] == list(range(nb))
    assert all(b.latents.shape == (1, 16, 3, 4, 6) and torch.isfinite(b.latents).all() for b in blocks)
    # each block is denoised at steps 0..T-1 exactly once, at the right timestep, fresh noise only at step 0
    t = s.t
    seen = {b: [] for b in range(nb)}
    for c in calls:
        if c.updating_cache:
            assert c.timesteps == (0.0,) * 3
            continue
        first = c.start_frame // 3
        for k in range(c.num_frames // 3):
            ts = c.timesteps[3 * k:3 * k + 3]
            assert len(set(ts)) == 1
            seen[first + k].append(t.index(ts[0]))
    assert all(v == [0, 1, 2, 3, 4] for v in seen.values())


def test_streams_block_as_soon_as_finished(tiny_model, tiny_context):
    calls = []
    s = _sampler(tiny_model, on_call=calls.append)
    it = s.stream(tiny_context, 8)
    first = next(it)
    assert first.index == 0 and first.window == 4
    # only windows 0..4 have run (5 denoising forwards, 4 update passes before the yield)
    assert sum(not c.updating_cache for c in calls) == 5
    second = next(it)
    assert second.index == 1 and second.window == 5


def test_seeded_noise_is_reproducible_per_block(tiny_model, tiny_context):
    a = _sampler(tiny_model, seed=7).generate(tiny_context, 6)
    b = _sampler(tiny_model, seed=7).generate(tiny_context, 6)
    c = _sampler(tiny_model, seed=8).generate(tiny_context, 6)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    n = SeededNoise(3)
    x = n(5, 2, (1, 16, 3, 4, 4), "cpu", torch.float32)
    _ = n(6, 0, (1, 16, 3, 4, 4), "cpu", torch.float32)
    assert torch.equal(x, SeededNoise(3)(5, 2, (1, 16, 3, 4, 4), "cpu", torch.float32))


def test_custom_steps_and_no_sink(tiny_model, tiny_context):
    cfg = RollingConfig(steps=(1000, 600, 300), span_frames=15, update_mode="reference")
    s = _sampler(tiny_model, cfg=cfg)
    out = s.generate(tiny_context, 5)
    assert out.shape[2] == 15 and torch.isfinite(out).all()
    assert s.forwards == 2 * (5 + 3 - 1)
    cfg = RollingConfig(sink_blocks=0)
    assert torch.isfinite(_sampler(tiny_model, cfg=cfg).generate(tiny_context, 9)).all()


def test_fused_matches_reference_and_saves_forwards(tiny_model, tiny_context):
    ref = _sampler(tiny_model, seed=1, cfg=RollingConfig(update_mode="reference"))
    fus = _sampler(tiny_model, seed=1)  # the default
    a, b = ref.generate(tiny_context, 10), fus.generate(tiny_context, 10)
    assert (a - b).abs().max().item() < 1e-4
    assert ref.forwards == 2 * 14 and fus.forwards == 14


def test_batch_and_sample_video(tiny_model, tiny_context):
    out = sample_video(tiny_model, tiny_context, 2, height=2, width=4, batch=2, dtype=torch.float32, device="cpu")
    assert out.shape == (2, 16, 6, 2, 4)
    assert not torch.allclose(out[0], out[1])  # own noise per batch element


@pytest.mark.parametrize("h,w", [(3, 4), (4, 0), (-2, 4), (4, 5)])
def test_bad_sizes(tiny_model, h, w):
    with pytest.raises(ValueError, match="multiple of 2"):
        _sampler(tiny_model, height=h, width=w)


def test_bad_length_and_context(tiny_model, tiny_context):
    s = _sampler(tiny_model)
    with pytest.raises(ValueError, match="positive integer"):
        next(s.stream(tiny_context, 0))
    with pytest.raises(ValueError, match=r"\[batch, tokens, 16\].*umT5"):
        next(s.stream(torch.zeros(1, 512, 4096), 3))


def test_attention_backend_fallback():
    with pytest.warns(RuntimeWarning, match="sageattention"):
        fn = get_attention("sage", "cpu")
    assert fn is sdpa_attention
    with pytest.warns(RuntimeWarning, match="flash"):
        assert get_attention("flash", "cpu") is sdpa_attention
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert get_attention("auto", "cpu") is sdpa_attention
    with pytest.raises(ValueError, match="sdpa"):
        get_attention("magic")


def test_rope_depends_only_on_position_difference():
    rope = Rope(12)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 1, 12, generator=g), torch.randn(1, 4, 1, 12, generator=g)

    def score(pq, pk):
        cq, sq = rope.tables([pq], 2, 2, "cpu")
        ck, sk = rope.tables([pk], 2, 2, "cpu")
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum(-1)

    base = score(5, 2)
    for off in (100, 1023, 10_000, 1_000_000):
        far = score(5 + off, 2 + off)
        assert torch.isfinite(far).all()
        assert (far - base).abs().max() < 1e-4
    assert rope.split == (2, 2, 2) and Rope(128).split == (22, 21, 21)


class _CastLinear(nn.Linear):
    """A ComfyUI-like layer: weights stored in another dtype, cast at use."""

    def forward(self, x):
        return nn.functional.linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype))


def _foreign_copy(model):
    """Same names, different module classes and storage dtype (like ComfyUI's WanModel with fp16 weights)."""
    import copy
    m = copy.deepcopy(model)
    for name, mod in list(m.named_modules()):
        for cname, child in list(mod.named_children()):
            if type(child) is nn.Linear:
                new = _CastLinear(child.in_features, child.out_features)
                new.load_state_dict(child.state_dict())
                setattr(mod, cname, new.half())
            elif child.__class__.__name__ == "WanRMSNorm":
                new = nn.RMSNorm(child.weight.shape[0], eps=child.eps)
                new.weight.data.copy_(child.weight)
                setattr(mod, cname, new)
    for blk in m.blocks:
        blk.modulation.data = blk.modulation.data.half()
    return m


def test_any_module_tree_with_wan_names(tiny_model, tiny_context):
    """The forward works on another module tree (other classes, fp16 storage, modulation not cast ahead)."""
    foreign = _foreign_copy(tiny_model)
    a = _sampler(foreign, seed=2).generate(tiny_context, 6)
    b = _sampler(tiny_model, seed=2).generate(tiny_context, 6)
    assert torch.isfinite(a).all()
    # fp16 weight rounding only: close but not necessarily equal
    assert (a - b).abs().max().item() < 5e-2
