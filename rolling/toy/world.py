"""A procedural video world: one coloured shape moving over a plain background, 64x64 RGB at 16 fps.

Every pixel frame ``t`` (an integer >= 0, unbounded) is rendered directly from the scene's attributes
and seed: positions are analytic functions of ``t`` (drifts wrap around horizontally, the frame is a
horizontal torus), so ``scene.render(t0, n)[k] == scene.render(t0 + k, 1)[0]`` exactly.

Units: ``t`` counts *pixel* frames (``PIXEL_FPS`` = 16 per second); positions are in pixels with
pixel (row i, column j) centred at (x, y) = (j, i), x to the right, y downwards. The scene's position
is the area centroid of its shape. Frames are float32 RGB in [0, 1], shape [n, 64, 64, 3].

The attribute choices live in one place: :data:`SHAPES`, :data:`COLOURS`, :data:`MOTIONS`,
:data:`BACKGROUNDS` (captions: :mod:`rolling.toy.captions`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..config import PIXEL_FPS

SIZE = 64
"""Frame height and width in pixels."""

SHAPES = ("circle", "square", "triangle")
COLOURS = {  # saturated, well separated RGB in [0, 1]
    "red": (0.90, 0.12, 0.12),
    "green": (0.10, 0.75, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.85, 0.10),
}
MOTIONS = ("drifting left", "drifting right", "bouncing", "orbiting")
BACKGROUNDS = {  # grey level at the top and the bottom row (a subtle vertical gradient)
    "dark": (0.10, 0.18),
    "light": (0.90, 0.80),
}

# Jitter ranges drawn from the seed (pixels, pixels per pixel frame, pixel frames).
RADIUS = (6.5, 9.0)          # equal-area radius: every shape has the area of a circle of this radius
DRIFT_SPEED = (0.30, 0.50)   # px / frame (1.2 - 2 px per latent frame)
BOUNCE_PERIOD = (36.0, 52.0)  # frames per bounce
BOUNCE_HEIGHT = (14.0, 20.0)  # px
ORBIT_PERIOD = (64.0, 96.0)  # frames per revolution
ORBIT_RADIUS = (11.0, 15.0)  # px, around the frame centre
MARGIN = 3.0                 # px kept free at the top/bottom edge


def _check(name: str, value: str, allowed) -> str:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}")
    return value


def extents(shape: str, radius: float) -> tuple[float, float]:
    """(up, down): distance in px from the centroid to the top and to the bottom of the shape."""
    if shape == "circle":
        return radius, radius
    if shape == "square":
        h = radius * math.sqrt(math.pi) / 2
        return h, h
    big = radius * math.sqrt(4 * math.pi / (3 * math.sqrt(3)))  # circumradius of the equal-area triangle
    return big, big / 2


def shape_sdf(shape: str, radius: float, x, y) -> np.ndarray:
    """Signed distance (px, negative inside) of every pixel of a 64x64 frame to ``shape`` with the area
    of a circle of ``radius``, centroid at (x[k], y[k]) (arrays of n centres). Returns [n, 64, 64];
    horizontal offsets are taken on the torus (period 64). Squares are axis-aligned, triangles
    equilateral pointing up; outside corners the distance is the max of the edge distances."""
    x, y = np.atleast_1d(np.asarray(x, dtype=np.float64)), np.atleast_1d(np.asarray(y, dtype=np.float64))
    g = np.arange(SIZE, dtype=np.float64)
    dx = np.mod(g[None, None, :] - x[:, None, None] + SIZE / 2, SIZE) - SIZE / 2  # [n, 1, W]
    dy = g[None, :, None] - y[:, None, None]  # [n, H, 1]
    if shape == "circle":
        return np.sqrt(dx * dx + dy * dy) - radius
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) - radius * math.sqrt(math.pi) / 2
    if shape != "triangle":
        raise ValueError(f"unknown shape {shape!r}; allowed: {', '.join(SHAPES)}")
    # equilateral triangle pointing up: intersection of three half planes, inradius = circumradius / 2
    big = extents("triangle", radius)[0]
    d = np.broadcast_to(dy, np.broadcast_shapes(dx.shape, dy.shape))  # bottom edge (normal pointing down)
    for ang in (2 * math.pi / 3, -2 * math.pi / 3):
        d = np.maximum(d, math.sin(ang) * dx + math.cos(ang) * dy)
    return d - big / 2


@dataclass(frozen=True)
class Scene:
    """One video: ``shape`` in SHAPES, ``colour`` in COLOURS, ``motion`` in MOTIONS, ``background`` in
    BACKGROUNDS; ``seed`` (int >= 0) sets size, speed, phase and start position."""

    shape: str
    colour: str
    motion: str
    background: str
    seed: int = 0
    params: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check("shape", self.shape, SHAPES)
        _check("colour", self.colour, tuple(COLOURS))
        _check("motion", self.motion, MOTIONS)
        _check("background", self.background, tuple(BACKGROUNDS))
        if not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        object.__setattr__(self, "params", self._draw_params())

    # ---------------------------------------------------------------- construction helpers
    @classmethod
    def from_caption(cls, text: str, seed: int = 0) -> "Scene":
        from .captions import parse_caption
        return cls(**parse_caption(text), seed=seed)

    def caption(self) -> str:
        from .captions import make_caption
        return make_caption(self.shape, self.colour, self.motion, self.background)

    @property
    def attributes(self) -> dict:
        return {"shape": self.shape, "colour": self.colour, "motion": self.motion, "background": self.background}

    def _draw_params(self) -> dict:
        rng = np.random.default_rng(int(self.seed))
        u = rng.random(8)  # always 8 draws: parameters do not shift between motions
        r = RADIUS[0] + u[0] * (RADIUS[1] - RADIUS[0])
        up, down = extents(self.shape, r)
        p = {"radius": r, "phase": u[1], "bg_offset": (u[2] - 0.5) * 0.04}
        if self.motion.startswith("drifting"):
            sign = -1.0 if self.motion == "drifting left" else 1.0
            p["speed"] = sign * (DRIFT_SPEED[0] + u[3] * (DRIFT_SPEED[1] - DRIFT_SPEED[0]))
            p["x0"] = u[4] * SIZE
            lo, hi = MARGIN + up + 6, SIZE - 1 - MARGIN - down - 6
            p["y0"] = lo + u[5] * (hi - lo)
        elif self.motion == "bouncing":
            p["period"] = BOUNCE_PERIOD[0] + u[3] * (BOUNCE_PERIOD[1] - BOUNCE_PERIOD[0])
            p["x0"] = 16 + u[4] * (SIZE - 32)
            p["floor"] = SIZE - 1 - MARGIN - down
            p["height"] = min(BOUNCE_HEIGHT[0] + u[5] * (BOUNCE_HEIGHT[1] - BOUNCE_HEIGHT[0]),
                              p["floor"] - MARGIN - up)
        else:  # orbiting
            p["period"] = ORBIT_PERIOD[0] + u[3] * (ORBIT_PERIOD[1] - ORBIT_PERIOD[0])
            p["direction"] = 1.0 if u[4] < 0.5 else -1.0
            p["orbit"] = min(ORBIT_RADIUS[0] + u[5] * (ORBIT_RADIUS[1] - ORBIT_RADIUS[0]),
                             (SIZE - 1) / 2 - MARGIN - max(up, down))
        return {k: float(v) for k, v in p.items()}

    # ---------------------------------------------------------------- analytic state
    def position(self, t) -> tuple[np.ndarray, np.ndarray]:
        """Centroid (x, y) in px at pixel frames ``t`` (array-like); x in [0, 64) (wrapped)."""
        t = np.asarray(t, dtype=np.float64)
        p = self.params
        c = (SIZE - 1) / 2
        if self.motion.startswith("drifting"):
            x = np.mod(p["x0"] + p["speed"] * t, SIZE)
            y = np.full_like(t, p["y0"])
        elif self.motion == "bouncing":
            x = np.full_like(t, p["x0"])
            y = p["floor"] - p["height"] * np.abs(np.sin(math.pi * (t / p["period"] + p["phase"])))
        else:
            a = 2 * math.pi * (p["direction"] * t / p["period"] + p["phase"])
            x = np.mod(c + p["orbit"] * np.cos(a), SIZE)
            y = c + p["orbit"] * np.sin(a)
        return x, y

    def background_image(self) -> np.ndarray:
        """[64, 64, 3] float32 background (grey, vertical gradient)."""
        top, bottom = BACKGROUNDS[self.background]
        off = self.params["bg_offset"]
        col = top + off + (bottom - top) * np.arange(SIZE, dtype=np.float64) / (SIZE - 1)
        return np.broadcast_to(col[:, None, None], (SIZE, SIZE, 3)).astype(np.float32)

    def signed_distance(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Signed distance (px, negative inside) of every pixel to the shape centred at (x[k], y[k]).

        Returns [n, 64, 64]; horizontal offsets are taken on the torus (period 64)."""
        return shape_sdf(self.shape, self.params["radius"], x, y)

    def render(self, t0: int = 0, n: int = 1, uint8: bool = False) -> np.ndarray:
        """Pixel frames t0 .. t0 + n - 1 as [n, 64, 64, 3] float32 in [0, 1] (uint8 with ``uint8``)."""
        if int(t0) != t0 or t0 < 0 or int(n) != n or n < 0:
            raise ValueError(f"t0 must be an integer >= 0 and n an integer >= 0, got t0={t0!r}, n={n!r}")
        t = np.arange(int(t0), int(t0) + int(n), dtype=np.float64)
        x, y = self.position(t)
        alpha = np.clip(0.5 - self.signed_distance(x, y), 0.0, 1.0)[..., None]  # 1 px anti-aliasing
        col = np.asarray(COLOURS[self.colour], dtype=np.float64)
        frames = (self.background_image()[None] * (1 - alpha) + col * alpha).astype(np.float32)
        if uint8:
            return np.round(frames * 255).astype(np.uint8)
        return frames

    def seconds(self, frames: int) -> float:
        """Duration of ``frames`` pixel frames in seconds."""
        return frames / PIXEL_FPS


def all_attributes() -> list[dict]:
    """Every attribute combination (3 x 4 x 4 x 2 = 96), in a fixed order."""
    return [{"shape": s, "colour": c, "motion": m, "background": b}
            for s in SHAPES for c in COLOURS for m in MOTIONS for b in BACKGROUNDS]


def sample_scene(rng: np.random.Generator, combos: list[dict] | None = None) -> Scene:
    """A random scene: uniform attributes (or a uniform pick from ``combos``) and a random seed."""
    if combos is None:
        attrs = {"shape": SHAPES[rng.integers(len(SHAPES))], "colour": tuple(COLOURS)[rng.integers(len(COLOURS))],
                 "motion": MOTIONS[rng.integers(len(MOTIONS))],
                 "background": tuple(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]}
    else:
        attrs = combos[rng.integers(len(combos))]
    return Scene(**attrs, seed=int(rng.integers(2**31)))


def to_video(frames: np.ndarray):
    """[n, 64, 64, 3] float in [0, 1] (or uint8) -> torch [1, 3, n, 64, 64] float32 in [-1, 1]."""
    import torch
    f = np.asarray(frames)
    if f.dtype == np.uint8:
        f = f.astype(np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(f.transpose(3, 0, 1, 2)))[None].float() * 2 - 1


def from_video(video) -> np.ndarray:
    """torch [B, 3, n, H, W] in [-1, 1] -> numpy [B, n, H, W, 3] float32 in [0, 1] (clamped)."""
    v = ((video.detach().float().cpu() + 1) / 2).clamp(0, 1)
    return v.permute(0, 2, 3, 4, 1).numpy()
