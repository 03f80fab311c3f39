#!/usr/bin/env python
"""The shipped long-video workflow at its shipped length (2 minutes, chunks of 10 s, the prompt change
at 0:40) in a real ComfyUI server on the CPU with tiny weights (the tiny DiT, a random full-size
Wan2.1 VAE, a tiny 2x upscale model) at 32x32: queued once per chunk like a user does. Records the
wall time of every chunk, the server's peak RSS after each, the final video's frames and size.

    COMFYUI_PATH=/path/to/ComfyUI python bench/long_upscale_cpu.py [--out bench/results/long_upscale_cpu.json]

CPU proxy only: no speed at 832x480 on a GPU follows from it (see PERFORMANCE.md).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "long_upscale_cpu.json")
    a = p.parse_args(argv)
    import av

    from scripts import workflow_source as W
    from tests.comfyui.env import missing_reason
    from tests.comfyui.graphs import ui_to_api
    from tests.comfyui.server import ComfyServer

    reason = missing_reason()
    if reason:
        print(reason, file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="rf_long_") as tmp, ComfyServer(Path(tmp)) as s:
        api = ui_to_api(W.load_workflow("rolling_forcing_long_upscale.json"), s.get("/object_info", timeout=120).__getitem__)
        api["2"] = {"class_type": "RFTestClip", "inputs": {}}
        api["4"] = {"class_type": "RFTestRandomWanVAE", "inputs": {"seed": 0}}
        api["6"]["inputs"].update(width=32, height=32)
        runs = []
        while True:
            t0 = time.perf_counter()
            status, body = s.post("/prompt", {"prompt": api, "client_id": "bench"})
            assert status == 200, body
            hist = s.wait_history(body["prompt_id"], timeout=1800)
            assert hist["status"]["status_str"] == "success", s.log_text()[-3000:]
            info = hist["outputs"].get("6", {}).get("text", [""])[0].splitlines()[0]
            runs.append({"info": info, "wall_s": round(time.perf_counter() - t0, 2),
                         "peak_rss_mib": round(s.peak_rss() / 2**20)})
            print(runs[-1], flush=True)
            if "is complete" in info:
                break
        video = s.output / (api["6"]["inputs"]["run_name"] + ".mp4")
        with av.open(str(video)) as c:
            frames = sum(1 for _ in c.decode(video=0))
            size = (c.streams.video[0].width, c.streams.video[0].height)
        video_bytes = video.stat().st_size
    result = {
        "what": "rolling_forcing_long_upscale.json as shipped (120 s, chunk 10 s, change at 0:40) at 32x32, tiny "
                "weights, ComfyUI server on CPU, one queue run per chunk",
        "command": "COMFYUI_PATH=... python bench/long_upscale_cpu.py",
        "machine": f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} CPUs",
        "chunks": len(runs) - 1, "runs": runs, "frames": frames, "video_size": size,
        "video_bytes": video_bytes,
        "note": "chunk wall times vary with the other jobs sharing the 2 CPUs; the random full-size Wan VAE "
                "decode dominates (the tiny DiT is ~1 % of it)",
        "total_wall_s": round(sum(r["wall_s"] for r in runs), 1),
        "peak_rss_first_chunk_mib": runs[0]["peak_rss_mib"], "peak_rss_last_chunk_mib": runs[-2]["peak_rss_mib"],
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
