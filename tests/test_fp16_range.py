"""fp16 activation range on the trained toy student (issue 10): every DiT module output stays far inside
float16's range, and a float16 run of the core sampler stays finite and close to float32."""
import torch

from bench.fp16_range import FP16_MAX, activation_peaks, measure


def test_fp16_range_and_error_on_the_toy_student():
    res = measure(blocks=2)
    kinds = res["peaks_by_module"]
    assert any("ffn" in k for k in kinds) and any("self_attn" in k for k in kinds)  # the hooks see the blocks
    assert 0 < res["peak_abs_activation"] < FP16_MAX / 100, res["peak_abs_activation"]
    assert res["fp16_all_finite"] and res["fp16_latent_error_max_over_std"] < 0.1


def test_the_probe_sees_an_overflowing_layer():
    lin = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with torch.no_grad():
        lin[0].weight.fill_(1e5)
    peaks = activation_peaks(lin, lambda: lin(torch.ones(1, 4)))
    assert peaks["Linear:0"] > FP16_MAX
