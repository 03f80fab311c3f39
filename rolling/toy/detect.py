"""Detectors that read a toy scene's attributes back from decoded RGB frames, and a score.

Input frames: numpy (or torch) [n, 64, 64, 3] or one [64, 64, 3], float in [0, 1] or uint8.
Per frame: the background is the per-row median colour (the object covers under half of any row);
the object mask is every pixel farther from it (RGB Euclidean, 0..1 scale) than half the object's
contrast, and at least :data:`MASK_DISTANCE`.

* background: median grey level of the border pixels, below 0.5 = ``dark``;
* colour: majority vote of the mask pixels' nearest colour prototype (:data:`world.COLOURS`);
* position: mask centroid in px (x as a circular mean on the 64-px horizontal torus, y plain);
* shape: the ideal shape (same area and centroid) with the highest IoU with the mask (robust to
  blurred corners; the fill ratio mask area / bounding box, square ~1, circle ~0.785, triangle ~0.5,
  is reported too);
* motion (over a clip, in windows of :data:`WINDOW` pixel frames = 2 s): the centroid track's
  horizontal and vertical ranges and horizontal trend (drift: x moves, y does not; bounce: y only;
  orbit: both).

A frame whose mask area is implausible (no object, or static noise everywhere) detects nothing, which
counts as wrong in :func:`score`. :func:`spatial_correlation` tells structure from i.i.d. pixel
noise; on *decoded* samples use :func:`latent_correlation` on the latents instead (the VAE decoder
smooths any input, decoded N(0, 1) latents have a pixel correlation of ~0.97 too).
"""
from __future__ import annotations

from collections import Counter

import numpy as np

from .world import BACKGROUNDS, COLOURS, MOTIONS, SHAPES, SIZE, Scene, shape_sdf

MASK_DISTANCE = 0.3
AREA_RANGE = (40, 700)        # px; shapes have areas 133..254 px
WINDOW, STRIDE = 32, 8        # motion windows in pixel frames (2 s, every 0.5 s)
MOVE_PX = 3.5                 # a coordinate range above this (px, within a window) counts as moving

_PROTOS = np.asarray(list(COLOURS.values()), dtype=np.float32)  # [4, 3]
_COLOUR_NAMES = tuple(COLOURS)


def as_frames(frames) -> np.ndarray:
    """Any supported input -> float32 [n, H, W, 3] in [0, 1]."""
    if hasattr(frames, "detach"):
        frames = frames.detach().cpu().numpy()
    f = np.asarray(frames)
    if f.dtype == np.uint8:
        f = f.astype(np.float32) / 255.0
    f = f.astype(np.float32, copy=False)
    if f.ndim == 3:
        f = f[None]
    if f.ndim != 4 or f.shape[-1] != 3:
        raise ValueError(f"frames must be [n, H, W, 3] or [H, W, 3] RGB, got shape {list(f.shape)}")
    return f


def object_mask(frames) -> np.ndarray:
    """[n, H, W] bool: pixels farther from their row's median colour than half the object's contrast
    (the 99th percentile distance; at least MASK_DISTANCE), i.e. the half-contrast outline, which a
    symmetric blur leaves in place."""
    f = as_frames(frames)
    bg = np.median(f, axis=2, keepdims=True)  # [n, H, 1, 3]
    dist = np.sqrt(((f - bg) ** 2).sum(-1))  # [n, H, W]
    peak = np.quantile(dist.reshape(len(dist), -1), 0.99, axis=1)
    return dist > np.maximum(MASK_DISTANCE, 0.5 * peak)[:, None, None]


def detect_background(frames) -> list[str]:
    """Per frame ``dark`` or ``light`` from the median grey level of the border pixels."""
    f = as_frames(frames)
    border = np.concatenate([f[:, 0], f[:, -1], f[:, 1:-1, 0], f[:, 1:-1, -1]], axis=1)  # [n, P, 3]
    level = np.median(border.mean(-1), axis=1)
    dark, light = sorted(BACKGROUNDS, key=lambda name: BACKGROUNDS[name][0])
    return [dark if v < 0.5 else light for v in level]


def _corr(p: np.ndarray, q: np.ndarray) -> float:
    den = np.sqrt((p * p).sum() * (q * q).sum())
    return 1.0 if den < 1e-12 else float((p * q).sum() / den)


def _circular_mean(cols: np.ndarray, period: float = SIZE) -> float:
    a = cols * (2 * np.pi / period)
    return float(np.mod(np.arctan2(np.sin(a).mean(), np.cos(a).mean()) * period / (2 * np.pi), period))


def detect(frames) -> list[dict]:
    """Per frame: {"found", "background", "colour", "shape", "x", "y", "area", "fill", "iou"} (None/nan
    entries when no plausible object is found; background is always read)."""
    f = as_frames(frames)
    out = []
    for fk, m, background in zip(f, object_mask(f), detect_background(f)):
        area = int(m.sum())
        d = {"found": False, "background": background, "colour": None, "shape": None,
             "x": float("nan"), "y": float("nan"), "area": area, "fill": float("nan"), "iou": None}
        if AREA_RANGE[0] <= area <= AREA_RANGE[1]:
            ys, xs = np.nonzero(m)
            px = fk[m]  # [area, 3]
            nearest = ((px[:, None, :] - _PROTOS[None]) ** 2).sum(-1).argmin(1)
            colour = _COLOUR_NAMES[np.bincount(nearest, minlength=len(_PROTOS)).argmax()]
            cx = _circular_mean(xs.astype(np.float64))
            cy = float(ys.mean())
            rel = np.mod(xs - cx + SIZE / 2, SIZE) - SIZE / 2  # columns relative to the centroid (torus)
            box = (rel.max() - rel.min() + 1) * (ys.max() - ys.min() + 1)
            ious = shape_ious(m, cx, cy, area)
            d.update(found=True, colour=colour, shape=max(ious, key=ious.get), x=cx, y=cy, fill=float(area / box),
                     iou=ious)
        out.append(d)
    return out


def shape_ious(mask: np.ndarray, cx: float, cy: float, area: int) -> dict:
    """IoU of a [64, 64] mask with each ideal shape of the same area and centroid (axis-aligned)."""
    r = np.sqrt(area / np.pi)
    alphas = {s: np.clip(0.5 - shape_sdf(s, r, cx, cy)[0], 0, 1) for s in SHAPES}
    return {s: float(np.minimum(mask, a).sum() / np.maximum(mask, a).sum()) for s, a in alphas.items()}


def classify_track(x: np.ndarray, y: np.ndarray) -> str | None:
    """Motion of one centroid track (px per pixel frame, x wrapped at 64): one of MOTIONS or None
    (too short, a missing detection, or no movement)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 2 or not (np.isfinite(x).all() and np.isfinite(y).all()):
        return None
    steps = np.mod(np.diff(x) + SIZE / 2, SIZE) - SIZE / 2
    ux = np.concatenate([[0.0], np.cumsum(steps)])  # unwrapped x
    xr, yr = np.ptp(ux), np.ptp(y)
    if xr > MOVE_PX and yr > MOVE_PX:
        return "orbiting"
    if yr > MOVE_PX:
        return "bouncing"
    if xr > MOVE_PX:
        slope = np.polyfit(np.arange(len(ux)), ux, 1)[0]
        return "drifting right" if slope > 0 else "drifting left"
    return None


def detect_motion(frames_or_detections, window: int = WINDOW, stride: int = STRIDE) -> list[str | None]:
    """Motion label per window of ``window`` pixel frames, windows every ``stride`` frames.

    Returns an empty list for clips shorter than ``window``."""
    dets = frames_or_detections if isinstance(frames_or_detections, list) else detect(frames_or_detections)
    x, y = np.array([d["x"] for d in dets]), np.array([d["y"] for d in dets])
    return [classify_track(x[s:s + window], y[s:s + window]) for s in range(0, len(dets) - window + 1, stride)]


def spatial_correlation(frames) -> np.ndarray | float:
    """Mean correlation of horizontally and vertically neighbouring pixel values per frame (channels
    pooled): ~1 for smooth structured frames, ~0 for i.i.d. noise. One frame in -> a float."""
    single = hasattr(frames, "ndim") and frames.ndim == 3
    f = as_frames(frames).astype(np.float64)
    f = f - f.mean(axis=(1, 2), keepdims=True)
    out = [(_corr(a[:, :-1], a[:, 1:]) + _corr(a[:-1], a[1:])) / 2 for a in f]
    return out[0] if single else np.asarray(out)


def latent_correlation(latents) -> dict:
    """Structure in (normalised) latents [B, C, F, h, w], channels centred per (sample, frame):
    ``spatial`` = mean correlation of neighbouring latent pixels, ``temporal`` = of consecutive latent
    frames. VAE latents of toy clips: both high; i.i.d. Gaussian latents: ~0. Unlike
    :func:`spatial_correlation` of *decoded* frames (the decoder smooths any input), this separates
    a sample from static noise before decoding. Returns floats (means over the batch)."""
    z = np.asarray(latents.detach().double() if hasattr(latents, "detach") else latents, dtype=np.float64)
    zc = z - z.mean(axis=(3, 4), keepdims=True)
    spatial = (_corr(zc[..., :, :-1], zc[..., :, 1:]) + _corr(zc[..., :-1, :], zc[..., 1:, :])) / 2
    zt = z - z.mean(axis=2, keepdims=True)
    temporal = _corr(zt[:, :, :-1], zt[:, :, 1:]) if z.shape[2] > 1 else float("nan")
    return {"spatial": spatial, "temporal": temporal}


def _target(target) -> tuple[dict, Scene | None]:
    if isinstance(target, Scene):
        return target.attributes, target
    if isinstance(target, str):
        from .captions import parse_caption
        return parse_caption(target), None
    if isinstance(target, dict):
        return {k: target[k] for k in ("shape", "colour", "motion", "background")}, None
    raise ValueError(f"target must be a Scene, a caption or an attribute dict, got {type(target).__name__}")


def score(frames, target, *, t0: int = 0, window: int = WINDOW, stride: int = STRIDE) -> dict:
    """Score frames against a Scene (pixel frames t0.., positions checked too), a caption or attributes.

    Returns fractions in [0, 1]: ``found``, ``background``, ``colour``, ``shape`` (over frames),
    ``motion`` (over motion windows; nan if the clip is shorter than ``window``), mean
    ``spatial_correlation``; with a Scene also ``position_error_px`` (mean centroid distance over
    found frames, on the torus) and ``position_within_2px`` (over all frames). ``frames`` = n."""
    attrs, scene = _target(target)
    f = as_frames(frames)
    dets = detect(f)
    n = len(dets)
    res = {"frames": n, "found": sum(d["found"] for d in dets) / n}
    for key in ("background", "colour", "shape"):
        res[key] = sum(d[key] == attrs[key] for d in dets) / n
    motions = detect_motion(dets, window, stride)
    res["motion"] = sum(m == attrs["motion"] for m in motions) / len(motions) if motions else float("nan")
    res["motion_windows"] = len(motions)
    res["spatial_correlation"] = float(np.mean(spatial_correlation(f)))
    if scene is not None:
        gx, gy = scene.position(np.arange(t0, t0 + n))
        dx = np.mod(np.array([d["x"] for d in dets]) - gx + SIZE / 2, SIZE) - SIZE / 2
        err = np.hypot(dx, np.array([d["y"] for d in dets]) - gy)
        found = np.isfinite(err)
        res["position_error_px"] = float(err[found].mean()) if found.any() else float("nan")
        res["position_within_2px"] = float((np.nan_to_num(err, nan=1e9) < 2).mean())
    return res


def majority(labels) -> str | None:
    """Most common non-None label (None if there is none)."""
    c = Counter(x for x in labels if x is not None)
    return c.most_common(1)[0][0] if c else None


__all__ = ["as_frames", "object_mask", "detect_background", "detect", "classify_track", "detect_motion",
           "spatial_correlation", "latent_correlation", "shape_ious", "score", "majority", "SHAPES", "MOTIONS"]
