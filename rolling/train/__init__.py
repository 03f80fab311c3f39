"""Rolling Forcing training: DMD distillation of the causal Wan2.1 student on self-generated rollouts
(ALGORITHM.md sections 3, 4 and 8).

Run ``python -m rolling train CONFIG`` (one device) or ``torchrun --nproc_per_node=8 -m rolling train
CONFIG`` (FSDP2); ``--dry-run`` prints the per-rank memory and FLOP plan without allocating models.

Modules (one job each): :mod:`.config` (TrainConfig, JSON/TOML), :mod:`.windows` (which forwards
carry gradient; pure), :mod:`.cache` (autograd-safe KV-cache reads / detached writes), :mod:`.dit`
(differentiable causal and bidirectional Wan forwards), :mod:`.rollout` (Rolling-Forcing and
Self-Forcing rollouts), :mod:`.losses` (timestep law, CFG, DMD and critic losses), :mod:`.ema`,
:mod:`.distributed` (process group, broadcasts, FSDP2), :mod:`.models` (building / loading the three
networks), :mod:`.data` (prompt embeddings), :mod:`.checkpoint` (release-layout checkpoints),
:mod:`.trainer` (the loop), :mod:`.plan` (dry run).

Fixes of the reference's training issues (ALGORITHM.md section 10 item 16), and deviations:

1. **Gradient-window offset shared by all ranks.** The reference draws the Rolling-Forcing
   ``exit_flag`` per rank (only the Self-Forcing exit step and the rollout length are synced), so
   ranks can run different numbers of gradient windows. Here every random decision of a rollout
   (length, branch, offset/exit step) is drawn and then replaced by rank 0's draw
   (:meth:`Trainer.choose`, ``dist.broadcast``).
2. **No zero chunks in the output.** The reference writes only gradient windows into ``output``;
   blocks whose offset window ends before the loss frames stay zero and feed the VAE decode /
   re-encode of the first loss frame. Here every block's output is the x0 of its offset window
   (w % T == k) -- computed without gradient when that window is outside the loss -- so the output
   follows one rule everywhere and never contains zeros.
3. **One schedule.** The reference converts the scores' flow predictions to x0 with a shift-8 table
   while the generator uses shift 5. Here all conversions use the shift-5 flow law of the generator.
4. **No sigma quantisation.** The reference embeds the continuous DMD timestep t but noises and
   converts with the sigma of the nearest table entry. Here sigma = t / 1000 exactly, consistent
   with the embedded t (the rollout's warped timesteps are table entries, so nothing changes there).
5. **Self-Forcing cache input.** The reference noises the cache input with ``add_noise(x0, eps,
   t=0)``, i.e. sigma = 0.00498, while embedding t = 0. Default here: the clean x0 at t = 0, as in
   the Rolling-Forcing branch and at inference (``sf_cache_noise = true`` restores the reference).
6. **Gradient checkpointing and the cache.** The reference recomputes cache writes inside checkpointed
   blocks and re-reads the live cache during recomputation (correct only because its 27-frame
   training cache never evicts). Here gradient forwards write nothing, cache writes happen outside
   checkpointed regions from detached tensors, and the cached keys a gradient forward reads are
   handed to its blocks as views; the 27-frame training cache makes every slot written once per
   rollout, and the cache *raises* if a write would overwrite a slot a gradient forward has read
   (instead of silently corrupting the recomputed gradient). Reads are those of inference (the
   attention span, not the capacity, limits them; checked against the sampler).
7. **Needless forwards skipped**: clean-cache passes whose writes are never read (ramp-up windows
   0..T-2, last window, last Self-Forcing block) -- no value changes.
8. ``total_batch_size`` (unused in the reference) does not exist; the batch is ``batch_size`` per
   rank times the number of ranks. The ``flex_attention`` paths (ODE / teacher forcing) are not
   needed by this trainer.

Deviation: for rollouts longer than the loss window the reference decodes the frames before the last
20 with the VAE and re-encodes the last pixel frame as the first loss frame. The core has no VAE, so
this is a hook (``Trainer(reencode=...)``); the default keeps the latent frame as is. As in the
reference the first block of the loss window gets no DMD gradient in that case.
"""
from __future__ import annotations

from .config import TrainConfig, load_config

__all__ = ["TrainConfig", "load_config", "main"]


def main(config_path: str | None = None, *, dry_run: bool = False, gpus: int | None = None) -> int:
    """Entry point of ``python -m rolling train [CONFIG] [--dry-run]``. Without CONFIG the dry run uses
    the reference defaults (:class:`TrainConfig`, as ``configs/train_1.3B.json``); training needs a
    config. The final weights are always saved (``save_every = 0`` saves only them)."""
    if config_path is None:
        if not dry_run:
            raise ValueError("train needs a CONFIG file (.json or .toml of TrainConfig fields), e.g. "
                             "configs/train_1.3B.json (the reference run); --dry-run alone uses the defaults")
        cfg = TrainConfig()
    else:
        cfg = load_config(config_path)
    if dry_run:
        from .plan import dry_run as _dry
        if config_path is None:
            print("no CONFIG given: the reference defaults (as configs/train_1.3B.json)")
        _dry(cfg, gpus)
        return 0
    from .trainer import Trainer
    trainer = Trainer(cfg)
    trainer.train()
    trainer.save_final()  # final weights, unless just saved (also with save_every = 0)
    if trainer.info.distributed:
        from .distributed import shutdown
        shutdown()
    return 0
