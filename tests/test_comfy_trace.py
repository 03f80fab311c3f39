"""The shared golden trace of the published sampler replayed through ComfyUI's own ``WanModel``.

ComfyUI's Wan detection assumes 128-wide heads, so the model is built directly with the trace's
config (dim 48, 4 heads of 12) from ComfyUI's classes and ``comfy.ops`` layers, and the trace's
weights are loaded into it. Every DiT call must match within 1e-4 in float32, like the core's own
model: the core's forward runs over ComfyUI's modules (its layers, norms and FFN) unchanged.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

pytestmark = pytest.mark.comfy
TOL = 1e-4


@pytest.fixture(scope="module")
def comfy_trace(trace, cu):
    import comfy.ldm.wan.model
    import comfy.ops

    c = trace.config
    wm = comfy.ldm.wan.model.WanModel(
        model_type="t2v", patch_size=c.patch_size, text_len=c.text_len, in_dim=c.in_dim, dim=c.dim, ffn_dim=c.ffn_dim,
        freq_dim=c.freq_dim, text_dim=c.text_dim, out_dim=c.out_dim, num_heads=c.num_heads, num_layers=c.num_layers,
        qk_norm=c.qk_norm, cross_attn_norm=c.cross_attn_norm, eps=c.eps, device="cpu", dtype=torch.float32,
        operations=comfy.ops.disable_weight_init)
    missing, unexpected = wm.load_state_dict(trace.model.state_dict(), strict=False)
    assert not unexpected and not [k for k in missing if "rope" not in k], (missing, unexpected)
    return dataclasses.replace(trace, model=wm.eval().requires_grad_(False))


@pytest.mark.parametrize("rope", ["reference", "relative"])
def test_golden_trace_through_comfyuis_wan_model(comfy_trace, rope):
    from rolling.trace import replay_calls

    assert type(comfy_trace.model).__module__ == "comfy.ldm.wan.model"
    res = replay_calls(comfy_trace, rope_mode=rope)
    print(f"\nComfyUI WanModel replay ({rope} RoPE): worst |v| error {res['v']:.2e}, |x0| {res['x0']:.2e} "
          f"over {res['calls']} calls")
    assert res["calls"] == 32 and res["v"] < TOL and res["x0"] < TOL
