"""A real ComfyUI server in a subprocess (``main.py --cpu``, loopback only) with this pack and the
test-only injection pack in a temporary custom_nodes folder, temporary model folders (the tiny DiT
and placeholder text encoder / VAE files) and temporary input/output/user folders."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from .checkpoints import model_folders
from .env import INJECT_PACK, PACK_DIR_NAME, ROOT, comfyui_path, missing_reason


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """``with ComfyServer(workdir) as s:`` starts the server (this pack symlinked as
    ``custom_nodes/rolling-forcing``) and waits until it serves our nodes; ``s.get`` / ``s.post`` /
    ``s.wait_history`` talk to it; ``s.log_text()`` is its log. Needs ``$COMFYUI_PATH``."""

    def __init__(self, workdir: Path, startup_timeout: float = 300.0, output: Path | None = None):
        self.dir = Path(workdir)
        self.output = Path(output) if output is not None else self.dir / "output"  # shared by servers: a restart
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.timeout = startup_timeout
        self.proc = None
        self.log = None
        self.log_path = self.dir / "server.log"

    def __enter__(self) -> "ComfyServer":
        path = comfyui_path()
        if path is None:
            raise RuntimeError(missing_reason())
        custom = self.dir / "custom_nodes"
        custom.mkdir(parents=True, exist_ok=True)
        os.symlink(ROOT, custom / PACK_DIR_NAME)
        shutil.copy(INJECT_PACK, custom / "rf_test_inject.py")
        models = self.dir / "models"
        model_folders(models)
        cfg = self.dir / "extra_model_paths.yaml"
        cfg.write_text(f"rf_tests:\n  base_path: {models}\n  diffusion_models: diffusion_models\n"
                       f"  text_encoders: text_encoders\n  vae: vae\n  upscale_models: upscale_models\n  custom_nodes: {custom}\n")
        for d in ("temp", "input", "user"):
            (self.dir / d).mkdir(exist_ok=True)
        self.output.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "2")
        cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch", "--disable-api-nodes", "--extra-model-paths-config", str(cfg),
               "--output-directory", str(self.output), "--temp-directory", str(self.dir / "temp"),
               "--input-directory", str(self.dir / "input"), "--user-directory", str(self.dir / "user"),
               "--database-url", "sqlite:///:memory:"]
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=path, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + self.timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self.__exit__(None, None, None)
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log_text()[-4000:]}")
            try:
                self.get("/object_info/RollingForcingSampler", timeout=5)
                return self
            except Exception:
                time.sleep(0.5)
        self.__exit__(None, None, None)
        raise RuntimeError(f"ComfyUI did not start within {self.timeout:.0f} s:\n{self.log_text()[-4000:]}")

    def __exit__(self, *exc):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.log is not None:
            self.log.close()
            self.log = None

    def kill(self) -> None:
        """SIGKILL the server (a crash: no cleanup runs)."""
        self.proc.kill()
        self.proc.wait()

    def peak_rss(self) -> int:
        """The server process's peak resident memory so far (VmHWM), bytes (Linux)."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmHWM in /proc/<pid>/status")

    def reset_peak_rss(self) -> None:
        """Start the peak (VmHWM) over from the current RSS (Linux >= 4.0: ``clear_refs`` 5)."""
        with open(f"/proc/{self.proc.pid}/clear_refs", "w") as f:
            f.write("5")

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def get(self, route: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + route, timeout=timeout) as r:
            return json.loads(r.read())

    def get_bytes(self, route: str, timeout: float = 30) -> bytes:
        with urllib.request.urlopen(self.url + route, timeout=timeout) as r:
            return r.read()

    def post(self, route: str, body: dict, timeout: float = 30):
        """(HTTP status, decoded JSON body or None), also for error statuses."""
        req = urllib.request.Request(self.url + route, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                data = r.read()
                return r.status, (json.loads(data) if data else None)
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def wait_history(self, prompt_id: str, timeout: float = 600) -> dict:
        """The /history entry of a queued prompt once it finished (success or error)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            h = self.get(f"/history/{prompt_id}")
            if prompt_id in h and h[prompt_id].get("status", {}).get("completed") is not None:
                st = h[prompt_id]["status"]
                if st.get("status_str") in ("success", "error") or st.get("completed"):
                    return h[prompt_id]
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s:\n{self.log_text()[-3000:]}")
