import subprocess
import sys

from rolling.video import probe_frame_count

from conftest import ROOT


def test_demo_command_writes_playable_mp4(tmp_path):
    out = tmp_path / "demo.mp4"
    r = subprocess.run([sys.executable, "-m", "rolling", "demo", "--seconds", "2", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "blocks/s" in r.stdout
    # 2 s -> 3 blocks = 9 latent frames = 33 pixel frames
    assert probe_frame_count(str(out)) == 33
