"""3-axis rotary position embedding (RoPE) of Wan2.1, for any position (no fixed-size table).

``head_dim / 2`` complex pairs are split over (time, height, width) as ``[c - 2(c//3), c//3, c//3]``
(22/21/21 for head_dim 128). Pairs are adjacent elements ``(x[2i], x[2i+1])``. Angles are computed in
float64 on the host (Python floats), so they are exact at any position; the rotation itself runs in
float32 and the result is cast back to the input dtype.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch


class Rope:
    """RoPE for one head size. Build per-token tables with :meth:`tables`, apply with :func:`apply_rope`."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        c = head_dim // 2
        self.pairs = c
        self.split = (c - 2 * (c // 3), c // 3, c // 3)
        self.omegas = tuple(
            [1.0 / theta ** (2 * j / (2 * n)) for j in range(n)] for n in self.split)
        self._spatial: dict = {}
        self._memo: dict = {}  # small LRU of full tables (relative positions repeat every window)

    def axis_table(self, axis: int, positions: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [len(positions), pairs of this axis] in float32, angles computed in float64."""
        om = self.omegas[axis]
        ang = [p * w for p in positions for w in om]
        cos = torch.tensor([math.cos(a) for a in ang], dtype=torch.float32).view(len(positions), len(om))
        sin = torch.tensor([math.sin(a) for a in ang], dtype=torch.float32).view(len(positions), len(om))
        return cos, sin

    def _spatial_tables(self, hp: int, wp: int, device) -> tuple[torch.Tensor, ...]:
        key = (hp, wp, str(device))
        if key not in self._spatial:
            ch, sh = self.axis_table(1, range(hp))
            cw, sw = self.axis_table(2, range(wp))
            self._spatial[key] = tuple(t.to(device) for t in (ch, sh, cw, sw))
        return self._spatial[key]

    def tables(self, frame_positions: Sequence[float], hp: int, wp: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token cos, sin of shape [F*hp*wp, 1, pairs] (tokens frame-major, then row, then column)."""
        key = (tuple(frame_positions), hp, wp, str(device))
        hit = self._memo.pop(key, None)
        if hit is None:
            hit = self._tables(key[0], hp, wp, device)
            if len(self._memo) >= 16:
                self._memo.pop(next(iter(self._memo)))
        self._memo[key] = hit
        return hit

    def _tables(self, frame_positions, hp, wp, device):
        f = len(frame_positions)
        ct, st = (t.to(device, non_blocking=True) for t in self.axis_table(0, frame_positions))
        ch, sh, cw, sw = self._spatial_tables(hp, wp, device)
        nt, nh, nw = self.split

        def full(t, h, w):
            return torch.cat([
                t.view(f, 1, 1, nt).expand(f, hp, wp, nt),
                h.view(1, hp, 1, nh).expand(f, hp, wp, nh),
                w.view(1, 1, wp, nw).expand(f, hp, wp, nw)], dim=-1).reshape(f * hp * wp, 1, self.pairs)

        return full(ct, ch, cw), full(st, sh, sw)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, L, heads, head_dim] by per-token tables [L, 1, head_dim/2]; returns x's dtype."""
    b, l, h, d = x.shape
    xf = x.float().view(b, l, h, d // 2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.view(b, l, h, d).to(x.dtype)
