"""Faults a new user meets before anything runs (issue 15): the tests without the shared fixtures."""
import os
import re
import subprocess
import sys

from conftest import ROOT


def test_missing_shared_fixtures_say_what_to_do(tmp_path):
    """Without ../shared the tests that need the fixtures fail with a message saying that they need them,
    where they were looked for, and how to provide them (beside the checkout, or ROLLING_FIXTURES)."""
    missing = tmp_path / "no-fixtures"
    env = {**os.environ, "ROLLING_FIXTURES": str(missing)}
    env.pop("COMFYUI_PATH", None)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "tests/test_model_and_loading.py::test_load_fixture_checkpoint_ema_and_regular",
                        "tests/test_model_and_loading.py::test_1_3b_matches_release_keys_and_shapes"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out[-3000:]
    assert "2 errors" in out or "2 failed" in out, out[-3000:]
    assert out.count("the tests need the project's shared fixtures") >= 2, out[-3000:]
    assert str(missing) in out and "ROLLING_FIXTURES=/path/to/shared/fixtures" in out
    assert "beside this checkout" in out and str(ROOT.parent / "shared" / "fixtures") in out
    assert "FileNotFoundError" not in out and "Traceback" not in out


def test_readme_test_section_names_the_fixtures():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("Run the tests:"):text.index("## What is here")]
    assert re.search(r"shared fixtures", section) and "../shared/fixtures" in section and "ROLLING_FIXTURES" in section
