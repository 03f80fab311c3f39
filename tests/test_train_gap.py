"""A short DMD run measurably narrows the gap between the student's and the teacher's samples.

Measure: the Frechet distance between Gaussian fits (mean and 16x16 covariance over latent channels)
of the per-token latents of student samples and of teacher samples, for 8 held-out prompts and
fixed held-out noise (a latent-space analogue of FID/FVD). DMD minimises a divergence between the
two *distributions* (not a per-noise distance), so a distribution distance is the right yardstick;
it needs no critic (the critic is trained along and is part of what is tested) and is deterministic.
Student samples: the inference rolling sampler of the student (final x0 of every block). Teacher
samples: 20-step Euler integration of the teacher's flow with the same CFG (3.0) and negative prompt.

Setup: teacher = a random tiny Wan; student = another random tiny Wan; critic = a copy of the teacher
(DMD's usual fake-score init); 1-frame blocks, 4 steps, loss window 6, rollouts {6, 7, 8}; larger
learning rates (2e-3 / 4e-3) and a generator update every iteration so that 40 iterations suffice.
"""
import copy

import torch

from rolling.config import WanConfig
from rolling.model import build_model
from rolling.train.config import TrainConfig
from rolling.train.data import PromptBank
from rolling.train.losses import teacher_x0
from rolling.train.rollout import GeneratorNoise, Rollout, RolloutChoice
from rolling.toy.distill import frechet  # the one Frechet distance of latent sets
from rolling.train.trainer import Trainer

torch.set_num_threads(1)
TINY = dict(dim=32, ffn_dim=64, num_heads=2, num_layers=2, freq_dim=16, text_dim=16)


@torch.no_grad()
def teacher_samples(tr: Trainer, ctx, frames: int, steps: int = 20) -> torch.Tensor:
    x = torch.randn(ctx.shape[0], 16, frames, 2, 4, generator=torch.Generator().manual_seed(7))
    s = torch.linspace(1, 0, steps + 1)
    sig = 5 * s / (1 + 4 * s)  # the shift-5 flow schedule
    for i in range(steps):
        t = torch.full((ctx.shape[0],), float(sig[i] * 1000))
        x0 = teacher_x0(tr.teacher, x, t, ctx, tr.prompts.negative, tr.cfg.guidance_scale)
        eps = (x - (1 - sig[i]) * x0) / sig[i]
        x = (1 - sig[i + 1]) * x0 + sig[i + 1] * eps
    return x


@torch.no_grad()
def student_samples(tr: Trainer, ctx, frames: int) -> torch.Tensor:
    ro = Rollout(tr.generator, tr.rcfg, height=2, width=4, batch=ctx.shape[0], device="cpu")
    res = ro.run(ctx, RolloutChoice(frames, "rolling", 0), GeneratorNoise(torch.Generator().manual_seed(50)),
                 loss_frames=frames, grad=False)
    return res.final


def test_short_dmd_run_narrows_student_teacher_gap():
    cfg = TrainConfig(generator=TINY, critic=TINY, teacher=TINY, latent_height=2, latent_width=4, text_tokens=8,
                      frames_per_block=1, denoising_steps=(1000, 750, 500, 250), loss_frames=6,
                      rollout_frames=(6, 7, 8), mixed_precision=False, teacher_dtype="fp32",
                      gradient_checkpointing=False, device="cpu", save_every=0, log_every=0, batch_size=2,
                      lr=2e-3, lr_critic=4e-3, gen_update_every=1, guidance_scale=3.0, seed=1)
    teacher = build_model(WanConfig(**TINY), seed=101)
    student = build_model(WanConfig(**TINY), seed=201)
    teacher_before = copy.deepcopy(teacher.state_dict())
    bank = PromptBank.random(64, 8, 16, seed=1)
    held_out = bank.context[56:]  # never seen in training
    tr = Trainer(cfg, prompts=PromptBank(bank.context[:56], bank.negative),
                 modules={"generator": student, "teacher": teacher, "critic": copy.deepcopy(teacher)})
    ref = teacher_samples(tr, held_out, 6)
    gaps = [frechet(student_samples(tr, held_out, 6), ref)]
    for i in range(40):
        st = tr.train_step()
        assert torch.isfinite(torch.tensor(st["critic_loss"])) and torch.isfinite(torch.tensor(st["generator_loss"]))
        if i % 20 == 19:
            gaps.append(frechet(student_samples(tr, held_out, 6), ref))
    print(f"latent Frechet distance student vs teacher: {[round(g, 3) for g in gaps]} "
          f"({100 * (1 - gaps[-1] / gaps[0]):.0f}% narrower)")
    assert gaps[-1] < 0.8 * gaps[0]
    # the teacher never moves
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())
