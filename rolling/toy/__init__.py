"""A procedural toy video world with a tiny text encoder, VAE and bidirectional teacher, so that
drift, prompt switches and distillation can be measured on CPU (real Wan2.1 weights are not needed).

| module | job |
|---|---|
| ``world.py`` | scenes (shape, colour, motion, background, seed) rendered at any pixel frame, 64x64 at 16 fps |
| ``captions.py`` | the caption grammar, parser and vocabulary |
| ``detect.py`` | detectors on decoded frames (background, colour, position, shape, motion) and ``score`` |
| ``text.py`` | word-embedding text encoder, [1, 16, 32] per caption like umT5's padded output |
| ``vae.py`` | causal video autoencoder with Wan2.1's compression (16 ch, 8x spatial, 4x temporal) |
| ``sampling.py`` | many-step Euler sampling of the bidirectional teacher |
| ``training.py``, ``store.py`` | training loops and evaluations; safetensors save / load |
| ``distill.py`` | the causal few-step student: ODE init from teacher trajectories, then DMD (``rolling.train``) |

Shipped weights (``weights/``, reproduced by ``python scripts/train_toy.py all``)::

    from rolling.toy import TextEncoder, load_student, load_teacher, load_vae
    vae, teacher, text = load_vae(), load_teacher(), TextEncoder()
    student = load_student()   # causal, few-step (ODE init + Rolling Forcing DMD; ``distill.py``)
    steps = rolling.toy.store.student_timesteps()   # its nominal denoising steps, for RollingConfig
"""
from __future__ import annotations

from .captions import VOCABULARY, all_captions, make_caption, parse_caption
from .text import TextEncoder
from .world import BACKGROUNDS, COLOURS, MOTIONS, SHAPES, Scene, sample_scene


def load_vae(path: str | None = None):
    """The shipped toy VAE (:class:`rolling.toy.vae.ToyVAE`, eval, CPU, float32)."""
    from .store import VAE_PATH, load_vae as _load
    return _load(path or VAE_PATH)


def load_teacher(path: str | None = None, **kw):
    """The shipped bidirectional toy teacher (:class:`rolling.model.WanModel`, eval, CPU, float32)."""
    from .store import TEACHER_PATH, load_teacher as _load
    return _load(path or TEACHER_PATH, **kw)


def load_student(path: str | None = None, **kw):
    """The shipped causal few-step toy student (:class:`rolling.model.WanModel`, eval, CPU, float32);
    its denoising steps: :func:`rolling.toy.store.student_timesteps`, sampler config:
    :func:`rolling.toy.store.student_rolling_config`."""
    from .store import STUDENT_PATH, load_student as _load
    return _load(path or STUDENT_PATH, **kw)


__all__ = ["SHAPES", "COLOURS", "MOTIONS", "BACKGROUNDS", "Scene", "sample_scene", "VOCABULARY", "make_caption",
           "parse_caption", "all_captions", "TextEncoder", "load_vae", "load_teacher",
           "load_student"]
