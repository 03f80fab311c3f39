import json

import pytest
import torch

from rolling.config import WanConfig
from rolling.loading import CheckpointError, check_keys, config_from_state_dict, convert, extract_state_dict, load_model
from rolling.model import WanModel, build_model

from conftest import FIXTURES, TRACE_DIR


def _release_keys():
    return json.loads((FIXTURES / "rolling_forcing_1.3B_keys.json").read_text())


def test_1_3b_matches_release_keys_and_shapes(trace):
    ref = _release_keys()
    model = build_model("1.3B", device="meta")
    mine = {"model." + k: list(v.shape) for k, v in model.state_dict().items()}
    assert mine == ref["keys"]
    assert sum(v.numel() for v in model.parameters()) == ref["num_parameters"] == 1_418_996_800


def test_release_layout_is_accepted_by_loader(trace):
    """A release-shaped dict (FSDP infix in the EMA copy) extracts to exactly the model's keys."""
    ref = _release_keys()["keys"]
    raw = {"generator_ema": {k.replace("model.", "model._fsdp_wrapped_module.", 1): torch.empty(v, device="meta")
                             for k, v in ref.items()},
           "generator": {k: torch.empty(v, device="meta") for k, v in ref.items()}}
    for weights in ("ema", "regular"):
        sd = extract_state_dict(dict(raw), weights)
        cfg = config_from_state_dict(sd)
        assert cfg == WanConfig.preset("1.3B")
        with torch.device("meta"):
            check_keys(WanModel(cfg), sd)


def test_14b_preset_shapes():
    m = build_model("14B", device="meta")
    assert len(m.blocks) == 40 and m.blocks[0].self_attn.q.weight.shape == (5120, 5120)
    assert m.blocks[0].ffn[0].weight.shape == (13824, 5120)


def test_load_fixture_checkpoint_ema_and_regular(trace):
    cfg = json.loads((TRACE_DIR / "config.json").read_text())
    raw = torch.load(TRACE_DIR / "checkpoint.pt", weights_only=True)
    for weights, key in (("ema", "generator_ema"), ("regular", "generator")):
        m = load_model(str(TRACE_DIR / "checkpoint.pt"), weights=weights, dtype="fp32", num_heads=cfg["num_heads"])
        assert torch.equal(m.blocks[1].ffn[2].weight, raw[key]["model.blocks.1.ffn.2.weight"])
    m = load_model(str(TRACE_DIR / "checkpoint.pt"), dtype="bf16", num_heads=cfg["num_heads"])
    assert m.blocks[0].modulation.dtype == torch.bfloat16


def test_convert_roundtrip(tmp_path, trace):
    out = tmp_path / "clean.safetensors"
    info = convert(str(TRACE_DIR / "checkpoint.pt"), str(out))
    from safetensors.torch import load_file
    sd = load_file(out)
    assert "blocks.0.self_attn.q.weight" in sd and not any(k.startswith("model.") for k in sd)
    assert info["tensors"] == len(sd)
    a = load_model(str(out), dtype="fp32", num_heads=4)
    b = load_model(str(TRACE_DIR / "checkpoint.pt"), dtype="fp32", num_heads=4)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_convert_command(tmp_path, trace):
    import subprocess, sys
    from conftest import ROOT
    out = tmp_path / "x.safetensors"
    r = subprocess.run([sys.executable, "-m", "rolling", "convert", str(TRACE_DIR / "checkpoint.pt"), str(out),
                        "--dtype", "bf16"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    from safetensors.torch import load_file
    assert load_file(out)["head.head.weight"].dtype == torch.bfloat16


def _save(tmp_path, name, obj):
    p = tmp_path / name
    torch.save(obj, p)
    return str(p)


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(str(tmp_path / "nope.pt"))
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    with pytest.raises(CheckpointError, match="accepted: .pt"):
        load_model(str(txt))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="weights-only"):
        load_model(str(garbage))
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="safetensors"):
        load_model(str(bad_st))
    with pytest.raises(CheckpointError, match="not a Wan2.1"):
        load_model(_save(tmp_path, "other.pt", {"state_dict": {"conv.weight": torch.zeros(3)}}))


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_code_is_refused(tmp_path):
    p = _save(tmp_path, "evil.pt", {"generator": {"x": _Evil()}})
    with pytest.raises(CheckpointError, match="weights-only"):
        load_model(p)


def test_i2v_and_mismatches(tmp_path, trace):
    sd = {k[len("model."):]: v for k, v in torch.load(TRACE_DIR / "checkpoint.pt", weights_only=True)["generator"].items()}
    with pytest.raises(CheckpointError, match="image-to-video"):
        load_model(_save(tmp_path, "i2v.pt", {**sd, "img_emb.proj.0.weight": torch.zeros(2)}))
    partial = dict(sd)
    partial.pop("blocks.0.self_attn.q.bias")
    partial["blocks.0.extra"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="1 missing keys: blocks.0.self_attn.q.bias.*unexpected keys: blocks.0.extra"):
        load_model(_save(tmp_path, "partial.pt", partial), num_heads=4)
    wrong = dict(sd)
    wrong["blocks.1.norm3.weight"] = torch.zeros(7)
    with pytest.raises(CheckpointError, match="shape mismatch.*norm3"):
        load_model(_save(tmp_path, "wrong.pt", wrong), num_heads=4)


# ----------------------------------------------------------------------------- issue 15: bad files, bad weights

TINY_CFG = WanConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, freq_dim=16, text_dim=16)


def _tiny_sd():
    sd = build_model(TINY_CFG, seed=0).state_dict()
    return {k: v.clone() for k, v in sd.items()}


def test_empty_files_are_refused_by_name(tmp_path):
    for name in ("empty.pt", "empty.pth", "empty.safetensors"):
        p = tmp_path / name
        p.write_bytes(b"")
        with pytest.raises(CheckpointError, match=r"is empty \(0 bytes\): the download or copy did not finish"):
            load_model(str(p))
        with pytest.raises(CheckpointError, match="is empty"):
            convert(str(p), str(tmp_path / "out.safetensors"))
    truncated = tmp_path / "cut.pt"
    torch.save(_tiny_sd(), truncated)
    truncated.write_bytes(truncated.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="could not be loaded .* download it again"):
        load_model(str(truncated))


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.uint8, torch.int64])
def test_non_float_weights_are_refused_and_not_converted(tmp_path, dtype):
    from safetensors.torch import save_file
    src = tmp_path / "q.safetensors"
    save_file({k: v.to(dtype).contiguous() for k, v in _tiny_sd().items()}, str(src))
    name = str(dtype).replace("torch.", "")
    with pytest.raises(CheckpointError, match=rf"tensor \S+ is {name}, but Wan2.1 weights are floating point"):
        load_model(str(src), num_heads=2)
    out = tmp_path / "out.safetensors"
    with pytest.raises(CheckpointError, match="floating point"):
        convert(str(src), str(out))
    assert not out.exists()
    # one stray int tensor among float weights is named
    sd = _tiny_sd()
    sd["blocks.1.ffn.2.weight"] = sd["blocks.1.ffn.2.weight"].to(dtype)
    with pytest.raises(CheckpointError, match=rf"tensor blocks.1.ffn.2.weight is {name}"):
        load_model(_save(tmp_path, "mixed.pt", sd), dtype="fp32", num_heads=2)


def test_convert_command_refuses_int8(tmp_path):
    import subprocess, sys
    from safetensors.torch import save_file
    from conftest import ROOT
    src, out = tmp_path / "q.safetensors", tmp_path / "out.safetensors"
    save_file({k: v.to(torch.int8).contiguous() for k, v in _tiny_sd().items()}, str(src))
    r = subprocess.run([sys.executable, "-m", "rolling", "convert", str(src), str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "error: tensor" in r.stderr and "int8" in r.stderr, r.stderr
    assert not out.exists()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused_naming_the_first_bad_tensor(tmp_path, bad):
    sd = _tiny_sd()
    sd["blocks.0.self_attn.o.weight"][3, 4] = bad
    sd["blocks.1.ffn.0.bias"][:] = bad
    p = _save(tmp_path, "bad.pt", sd)
    kind = "NaN" if bad != bad else "infinite"
    for dtype in ("fp32", "bf16"):
        with pytest.raises(CheckpointError, match=rf"tensor blocks.0.self_attn.o.weight \(\w+\) holds 1 {kind} values"
                                                  rf" of 1,024: the checkpoint is corrupt"):
            load_model(p, dtype=dtype, num_heads=2)
    with pytest.raises(CheckpointError, match="blocks.0.self_attn.o.weight"):
        convert(p, str(tmp_path / "out.safetensors"))
    all_nan = {k: torch.full_like(v, float("nan")) for k, v in _tiny_sd().items()}
    with pytest.raises(CheckpointError, match=f"tensor {next(iter(all_nan))} .* NaN"):
        load_model(_save(tmp_path, "nan.pt", all_nan), num_heads=2)


def test_cast_overflow_is_named(tmp_path):
    sd = _tiny_sd()
    sd["head.head.weight"][0, 0] = 1e6  # finite in fp32, inf in fp16
    p = _save(tmp_path, "big.pt", sd)
    with pytest.raises(CheckpointError, match=r"head.head.weight has 1 infinite values .* after casting float32 -> "
                                              r"float16: .* load it as bf16 or fp32"):
        load_model(p, dtype="fp16", num_heads=2)
    assert torch.isfinite(load_model(p, dtype="bf16", num_heads=2).head.head.weight).all()


def test_finiteness_check_is_chunked_and_copy_free(monkeypatch):
    """One pass in bounded chunks over views: the check never allocates a copy of a large tensor."""
    import rolling.loading as L
    monkeypatch.setattr(L, "_CHUNK", 1000)
    big = torch.randn(10, 1000)
    pieces = list(L._chunks(big))
    assert len(pieces) == 10 and all(c.numel() == 1000 and c.data_ptr() == big[i].data_ptr()
                                      for i, c in enumerate(pieces))
    big[7, 999] = float("nan")
    assert not L._all_finite(big) and L._all_finite(big[:7]) and L._count_nonfinite(big) == (1, 0)
    fp8 = torch.zeros(3000).to(torch.float8_e5m2)
    fp8[2500] = float("inf")
    assert not L._all_finite(fp8) and L._all_finite(torch.zeros(10).to(torch.float8_e4m3fn))
    sd = {"a": torch.ones(5), "b": torch.ones(3, dtype=torch.float64)}
    out = L.prepare_weights(sd, torch.bfloat16)
    assert out is sd and all(v.dtype == torch.bfloat16 for v in sd.values())
