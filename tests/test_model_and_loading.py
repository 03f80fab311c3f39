import json

import pytest
import torch

from rolling.config import WanConfig
from rolling.loading import CheckpointError, check_keys, config_from_state_dict, convert, extract_state_dict, load_model
from rolling.model import WanModel, build_model

from conftest import FIXTURES, TRACE_DIR


def _release_keys():
    return json.loads((FIXTURES / "rolling_forcing_1.3B_keys.json").read_text())


def test_1_3b_matches_release_keys_and_shapes():
    ref = _release_keys()
    model = build_model("1.3B", device="meta")
    mine = {"model." + k: list(v.shape) for k, v in model.state_dict().items()}
    assert mine == ref["keys"]
    assert sum(v.numel() for v in model.parameters()) == ref["num_parameters"] == 1_418_996_800


def test_release_layout_is_accepted_by_loader():
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


def test_load_fixture_checkpoint_ema_and_regular():
    cfg = json.loads((TRACE_DIR / "config.json").read_text())
    raw = torch.load(TRACE_DIR / "checkpoint.pt", weights_only=True)
    for weights, key in (("ema", "generator_ema"), ("regular", "generator")):
        m = load_model(str(TRACE_DIR / "checkpoint.pt"), weights=weights, dtype="fp32", num_heads=cfg["num_heads"])
        assert torch.equal(m.blocks[1].ffn[2].weight, raw[key]["model.blocks.1.ffn.2.weight"])
    m = load_model(str(TRACE_DIR / "checkpoint.pt"), dtype="bf16", num_heads=cfg["num_heads"])
    assert m.blocks[0].modulation.dtype == torch.bfloat16


def test_convert_roundtrip(tmp_path):
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


def test_convert_command(tmp_path):
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


def test_i2v_and_mismatches(tmp_path):
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
