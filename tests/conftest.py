import os
from pathlib import Path

import pytest
import torch

# the ComfyUI fixtures (cu, model, vae, cond, progress, server, object_info, page): tests/comfyui/fixtures.py
pytest_plugins = ["tests.comfyui.fixtures"]

torch.set_num_threads(1)  # tiny models: one thread is fastest and avoids oversubscription
os.environ.setdefault("OMP_NUM_THREADS", "1")  # for subprocesses

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("ROLLING_FIXTURES", ROOT.parent / "shared" / "fixtures"))
TRACE_DIR = FIXTURES / "reference-tiny"


@pytest.fixture(scope="session")
def trace():
    if not TRACE_DIR.is_dir():
        pytest.fail(f"the tests need the project's shared fixtures (reference-tiny/ golden trace, "
                    f"rolling_forcing_1.3B_keys.json), looked for in {FIXTURES}: put the shared/ folder beside "
                    f"this checkout ({ROOT.parent / 'shared' / 'fixtures'}) or set ROLLING_FIXTURES=/path/to/"
                    f"shared/fixtures (see README, 'Run the tests')", pytrace=False)
    from rolling.trace import load_trace
    return load_trace(str(TRACE_DIR))


@pytest.fixture
def tiny_model():
    from rolling.config import WanConfig
    from rolling.model import build_model
    return build_model(WanConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, freq_dim=16, text_dim=16), seed=0)


@pytest.fixture
def tiny_context():
    g = torch.Generator().manual_seed(1)
    ctx = torch.zeros(1, 512, 16)
    ctx[:, :5] = torch.randn(1, 5, 16, generator=g)
    return ctx
