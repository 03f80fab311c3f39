"""Two-process training on CPU (torchrun, gloo, FSDP2): the ranks agree on every rollout decision
(length, branch, gradient-window offset / exit step) although each rank draws its own, parameters
are sharded, and the gathered checkpoint (EMA included) loads with rolling.loading.load_model.

This file is also the worker: ``python -m torch.distributed.run --nproc_per_node=2 <this file> OUT``.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(dim=32, ffn_dim=64, num_heads=2, num_layers=2, freq_dim=16, text_dim=16)


def _worker(out: str) -> None:
    torch.set_num_threads(1)
    from rolling.train.config import TrainConfig
    from rolling.train.distributed import all_gather_ints
    from rolling.train.trainer import Trainer

    cfg = TrainConfig(generator=TINY, critic=TINY, teacher=TINY, latent_height=2, latent_width=4, text_tokens=8,
                      frames_per_block=1, denoising_steps=(1000, 750, 500, 250), loss_frames=6,
                      rollout_frames=(6, 7, 8), mixed_precision=False, teacher_dtype="fp32",
                      gradient_checkpointing=True, device="cpu", save_every=0, log_every=0, lr=1e-3,
                      lr_critic=1e-3, gen_update_every=1, ema_start_step=1, seed=3)
    tr = Trainer(cfg, log=lambda s: None)
    hist = tr.train(steps=1)
    tr.save(os.path.join(out, "ck1"))
    hist += tr.train(steps=1)
    tr.save(os.path.join(out, "ck2"))
    # resume on the same two ranks: same step, same parameter and AdamW shards
    tr2 = Trainer(cfg.with_(resume=os.path.join(out, "ck2")), log=lambda s: None)
    same = lambda a, b: all(torch.equal(x.to_local(), y.to_local()) for x, y in zip(a, b))
    opt_state = lambda o: [v for st in o.state_dict()["state"].values() for v in st.values()
                           if isinstance(v, torch.Tensor) and v.ndim > 0]
    resumed = (tr2.step == tr.step and same(tr.generator.parameters(), tr2.generator.parameters())
               and same(tr.critic.parameters(), tr2.critic.parameters())
               and same(opt_state(tr.gen_opt), opt_state(tr2.gen_opt)) and len(opt_state(tr.gen_opt)) > 0)
    flat = [v for c in tr.choices for v in c["shared"]]
    rank = tr.info.rank
    rec = {
        "rank": rank, "world": tr.info.world_size, "choices": list(tr.choices), "resumed": resumed,
        "gathered_shared": all_gather_ints(flat),
        "grad_forwards": [h.get("grad_forwards") for h in hist],
        "last_grad_indices": tr.last_rollout.grad_indices,
        "losses": [h.get("generator_loss") for h in hist] + [h["critic_loss"] for h in hist],
        "sharded": all(type(p).__name__ == "DTensor" for p in tr.generator.parameters()),
        "local_numel": sum(p.to_local().numel() for p in tr.generator.parameters()),
        "full_numel": sum(p.numel() for p in tr.generator.parameters()),
        "noise_checksum": float(tr.last_rollout.final.double().sum()),
    }
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(rec, f)
    from rolling.train.distributed import shutdown
    shutdown()


def test_two_ranks_agree_on_rollout_decisions(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(__file__).resolve()), str(tmp_path)]
    p = subprocess.run(cmd, cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2))
    assert r0["world"] == r1["world"] == 2
    # every rollout decision (length, branch, offset / exit step) is identical on both ranks ...
    s0, s1 = [c["shared"] for c in r0["choices"]], [c["shared"] for c in r1["choices"]]
    assert s0 == s1 and len(s0) == 4  # 2 generator + 2 critic rollouts
    assert r0["gathered_shared"][0] == r0["gathered_shared"][1]
    assert [c["phase"] for c in r0["choices"]] == [c["phase"] for c in r1["choices"]]
    # ... although the ranks' own draws differ: the agreement comes from the broadcast (rank 0's draw wins)
    l0, l1 = [c["local"] for c in r0["choices"]], [c["local"] for c in r1["choices"]]
    assert l0 != l1 and l0 == s0
    assert r0["grad_forwards"] == r1["grad_forwards"] and r0["last_grad_indices"] == r1["last_grad_indices"]
    # noise is per rank; losses finite; parameters sharded across the two ranks
    assert r0["noise_checksum"] != r1["noise_checksum"]
    assert all(torch.isfinite(torch.tensor([x for x in r0["losses"] + r1["losses"] if x is not None])))
    assert r0["sharded"] and r1["sharded"] and r0["local_numel"] + r1["local_numel"] == r0["full_numel"]
    # gathered checkpoints: release layout, EMA math across ranks, loadable by the core loader
    from rolling.loading import load_model
    c1 = torch.load(str(tmp_path / "ck1" / "model.pt"), weights_only=True)
    c2 = torch.load(str(tmp_path / "ck2" / "model.pt"), weights_only=True)
    assert c1["step"] == 1 and c2["step"] == 2
    assert r0["resumed"] and r1["resumed"]
    for k, p2 in c2["generator"].items():  # one generator step since ck1 (EMA created then): .99 gen1 + .01 gen2
        assert torch.allclose(c2["generator_ema"][k], 0.99 * c1["generator"][k] + 0.01 * p2, atol=1e-6), k
    m = load_model(str(tmp_path / "ck2" / "model.pt"), dtype="fp32")
    assert torch.equal(m.state_dict()["head.head.bias"], c2["generator_ema"]["model.head.head.bias"])


if __name__ == "__main__":
    _worker(sys.argv[1])
