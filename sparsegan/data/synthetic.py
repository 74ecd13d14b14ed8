"""Embedded synthetic retinal OCT generator: the default data source (DESIGN.md section 2).

It writes an OCT2017-shaped tree (``<root>/{train,test}/<CLASS>/<CLASS>-<patient>-<n>.jpeg``) plus a
lesion mask per image (``<root>/masks/{train,test}/<CLASS>/<same name>.png``, 255 = lesion, all zero
for NORMAL), so that ``dvc repro`` runs anywhere without a download and attention maps can be scored
against known lesion pixels.

The retina model
----------------
A B-scan is built column by column from a stack of layer boundaries (depth of each boundary per
A-scan column). From the top: vitreous, RNFL (bright, thicker on the nasal side), GCL+IPL, INL
(dark), OPL (bright), ONL (dark, thicker at the fovea), inner segments, ellipsoid zone (bright), outer
segments, [sub-retinal fluid], [sub-retinal hyper-reflective material], RPE (brightest), [sub-RPE
material], Bruch's membrane, then the choroid (bright under the RPE, dark vessel lumens, vertical
streaks, fading exponentially with depth). Bracketed layers have zero thickness in a healthy eye.
The layer image is rendered without any per-pixel Python: each boundary adds its jump of
reflectivity into an (H+2, W) array with sub-pixel linear weights (``np.bincount``) and a cumulative
sum down the columns turns the jumps into layers (anti-aliased edges for free).

Per *patient* (one class, ``scans_per_patient`` scans, like neighbouring B-scans of one volume):
image size (512x496 mostly, 768x496, 512x512, 1536x496), retina depth, bowl curvature, tilt,
slow waviness, layer thicknesses and reflectivities, fovea position and pit width, choroid
brightness and fall-off, noise level, superficial vessel positions, vitreous strands, a disease
"stage". Per *scan*: small shifts of depth/tilt, the slice's distance from the foveal centre (pit
depth ``exp(-d^2)``, so many but not all scans show a pit), vessel jitter, floaters, white
registration corners (the rotated-frame wedges of the real data), choroid texture, speckle.

Image formation: layer image -> multiplicative vessel shadows (dark vertical stripes below
superficial vessels), smooth column gain, depth fall-off -> speckle (log of an exponential variate,
i.e. log-compressed Rayleigh-like speckle, correlated over ~2 px, amplitude growing with the
signal) -> slight 3x3 blur -> white corners -> uint8.

Lesions (each with a per-lesion ``severity`` drawn uniformly in ``severity`` = (min, max), blended
with the patient's stage, that scales size and contrast, so that small, faint lesions exist):

- DRUSEN: 1-6 dome-shaped RPE elevations ``h = A (1 - (dx/w)^2)^p`` filled with medium-reflective
  material; the photoreceptor bands ride on the dome and the ONL thins over it.
- DME: retinal thickening (INL/ONL swell, ILM rises, pit flattens) with a cluster of intraretinal
  hypo-reflective cysts (soft ellipses of various sizes and contrasts in INL-ONL), sometimes
  hyper-reflective dots (hard exudates) in the OPL.
- CNV: sub-retinal hyper-reflective material (heterogeneous) on the RPE, sub-retinal fluid (dark
  lens between photoreceptors and RPE), RPE irregularity and breaks (wavy, thickened, dimmed RPE),
  sometimes a pigment-epithelial detachment (RPE dome over dark content) and small cysts.

The mask is exact by construction: the noise-free layer image is rendered with and without the
lesion (same anatomy, same random state), the pixels that change by more than ``MASK_THRESHOLD``
grey levels are filled column-wise between the first and last changed row (a lifted retina is part
of the lesion), and widened by the blur radius. Noise fields are drawn once and used for both
renderings, so ``render_scan(..., with_reference=True)`` returns the healthy twin of a diseased
scan that differs only inside the mask (the test checks this).

Speed (measured on this machine's CPU, one process, numpy 2.4, 512x496): about 200 scans/s for
``generate_scan`` and about 130 scans/s per core for ``write_dataset`` including JPEG/PNG encoding
and file writes (see ``tests/test_synthetic.py`` for the determinism checks).
"""

from __future__ import annotations

import io
import os
import shutil
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from PIL import Image

from ..params import CLASSES, DISEASES, SyntheticParams

REF_H, REF_W = 496, 512  # reference frame: depths in px of a 496-row scan, widths of a 512-col scan
SIZES = ((512, 496), (768, 496), (512, 512), (1536, 496))  # (width, height) as in OCT2017
SIZE_P = (0.62, 0.20, 0.10, 0.08)
JPEG_QUALITY = 92
MASK_THRESHOLD = 2.0  # grey levels of the noise-free layer image
SEVERITY = (0.05, 1.0)  # default per-lesion severity range

# Layer stack, top to bottom (value below boundary k is the reflectivity of layer k).
LAYERS = ("RNFL", "GCL_IPL", "INL", "OPL", "ONL", "IS", "EZ", "OS", "SRF", "SHRM", "RPE", "SUB_RPE")
RNFL, GCL, INL, OPL, ONL, IS, EZ, OS, SRF, SHRM, RPE, SUB = range(len(LAYERS))
N_LAYERS = len(LAYERS)


@dataclass
class Anatomy:
    """One synthetic patient's eye (depths in reference px, horizontal positions in [0, 1])."""

    width: int
    height: int
    bruch_depth: float
    curvature: float
    bowl_center: float
    tilt: float
    waves: np.ndarray  # (3, 3): amplitude, frequency, phase
    thick: np.ndarray  # (N_LAYERS,) healthy thickness away from the fovea
    values: np.ndarray  # (N_LAYERS,) display reflectivity
    rnfl_slope: float
    fovea_u: float
    pit_width: float
    pit_depth: float
    slice_spread: float
    vitreous: float
    choroid_top: float
    choroid_decay: float
    choroid_lumen: float
    deep: float
    gain: float
    falloff: float
    noise: float
    noise_rel: float
    vessels_u: np.ndarray
    vessels_w: np.ndarray
    vessels_s: np.ndarray
    hyaloid: bool
    corner_p: float
    stage: float  # disease burden in [0, 1]
    extra: dict = field(default_factory=dict)


class Render(NamedTuple):
    image: np.ndarray  # uint8 [H, W]
    mask: np.ndarray  # bool [H, W]
    reference: np.ndarray | None  # uint8 [H, W]: same scan without the lesion (with_reference only)
    parts: dict  # name -> bool [H, W]: lesion components (with_reference only)


# --------------------------------------------------------------------------------------------
# random anatomy


def draw_size(rng: np.random.Generator) -> tuple[int, int]:
    """(height, width) of a patient's scans, with OCT2017's mix of sizes."""
    w, h = SIZES[rng.choice(len(SIZES), p=SIZE_P)]
    return h, w


def draw_anatomy(rng: np.random.Generator, height: int, width: int) -> Anatomy:
    u = rng.uniform
    thick = np.array([u(8, 15), u(17, 25), u(9, 13), u(5.5, 8.5), u(19, 27), u(4.5, 7),
                      u(2.5, 3.8), u(3.5, 5.0), 0.0, 0.0, u(4.5, 7.0), 0.0])
    thick[:IS] *= u(0.85, 1.2)
    values = np.array([u(85, 125), u(68, 95), u(42, 62), u(72, 100), u(35, 55), u(50, 72),
                       u(150, 215), u(85, 125), 20.0, 180.0, u(200, 248), 120.0])
    nv = int(rng.integers(3, 10))
    return Anatomy(
        width=width, height=height,
        bruch_depth=u(175, 300),
        curvature=float(rng.choice([u(-25, 20), u(10, 70), u(50, 150)], p=[0.3, 0.5, 0.2])),
        bowl_center=u(0.3, 0.7),
        tilt=u(-55, 55) if rng.random() < 0.7 else u(-110, 110),
        waves=np.stack([rng.uniform(0, 4, 3), rng.uniform(0.5, 2.5, 3), rng.uniform(0, 6.3, 3)]),
        thick=thick, values=values,
        rnfl_slope=u(-1.0, 1.0),
        fovea_u=u(0.35, 0.65),
        pit_width=u(0.035, 0.075),
        pit_depth=u(0.75, 1.0) if rng.random() < 0.85 else 0.0,
        slice_spread=u(0.5, 1.6),
        vitreous=u(14, 40),
        choroid_top=u(95, 160),
        choroid_decay=u(28, 75),
        choroid_lumen=u(0.4, 0.85),
        deep=u(5, 16),
        gain=u(0.85, 1.12),
        falloff=u(0.0, 0.35),
        noise=u(6, 19),
        noise_rel=u(0.04, 0.14),
        vessels_u=rng.uniform(0.03, 0.97, nv),
        vessels_w=rng.uniform(1.5, 4.0, nv),
        vessels_s=rng.uniform(0.05, 0.45, nv) ** 1.3,
        hyaloid=bool(rng.random() < 0.2),
        corner_p=float(rng.choice([0.0, 0.5, 0.95], p=[0.55, 0.25, 0.2])),
        stage=u(0.0, 1.0),
    )


# --------------------------------------------------------------------------------------------
# rendering helpers


def _smooth_noise(rng: np.random.Generator, n: int, scale: float) -> np.ndarray:
    """1-D smooth noise of length n, unit-ish amplitude, correlation length ~scale samples."""
    k = max(2, int(np.ceil(n / max(scale, 1.0))) + 2)
    knots = rng.standard_normal(k)
    return np.interp(np.linspace(0, k - 3, n) + 1, np.arange(k), knots)


def _stack(bounds: np.ndarray, deltas: np.ndarray, height: int) -> np.ndarray:
    """Piecewise-constant columns from boundary depths [K, W] (px) and value jumps [K, W]."""
    k, w = bounds.shape
    y = np.clip(bounds, 0.0, float(height))
    i = np.floor(y).astype(np.int64)
    f = y - i
    cols = np.arange(w)
    idx = np.concatenate([(i * w + cols).ravel(), ((i + 1) * w + cols).ravel()])
    wts = np.concatenate([(deltas * (1.0 - f)).ravel(), (deltas * f).ravel()])
    acc = np.bincount(idx, weights=wts, minlength=(height + 2) * w)
    out = acc[: height * w].reshape(height, w).astype(np.float32)
    for r in range(1, height):  # row loop: far faster than cumsum along axis 0
        out[r] += out[r - 1]
    return out


def _boundaries(bruch: np.ndarray, thick: np.ndarray) -> np.ndarray:
    """Top boundary of every layer [N_LAYERS, W], stacking thicknesses upward from Bruch."""
    return bruch[None, :] - np.cumsum(thick[::-1], axis=0)[::-1]


def _layer_image(bruch_px, thick_px, vals, vitreous, extra_b, extra_d, height) -> np.ndarray:
    b = _boundaries(bruch_px, thick_px)
    full = np.concatenate([np.broadcast_to(vitreous, (1, vals.shape[1])), vals,
                           np.zeros((1, vals.shape[1]))], axis=0)
    deltas = np.diff(full, axis=0)
    bounds = np.concatenate([np.zeros((1, b.shape[1])), b, bruch_px[None, :]], axis=0)
    deltas = np.concatenate([np.broadcast_to(vitreous, (1, vals.shape[1])), deltas], axis=0)
    if extra_b is not None:
        bounds = np.concatenate([bounds, extra_b], axis=0)
        deltas = np.concatenate([deltas, extra_d], axis=0)
    return _vblur(_stack(bounds, deltas, height))


def _vblur(a: np.ndarray) -> np.ndarray:
    """Vertical [1, 2, 1] / 4 blur (soft layer edges), edges kept."""
    b = a.copy()
    b[1:-1] = (a[:-2] + 2 * a[1:-1] + a[2:]) * 0.25
    return b


def _ellipses(shape, ells, out=None) -> np.ndarray:
    """Soft filled ellipses (x, y, rx, ry, amplitude) -> max-combined field in [0, 1]."""
    h, w = shape
    field_ = np.zeros(shape, np.float32) if out is None else out
    for x, y, rx, ry, a in ells:
        x0, x1 = max(int(x - rx - 2), 0), min(int(x + rx + 3), w)
        y0, y1 = max(int(y - ry - 2), 0), min(int(y + ry + 3), h)
        if x0 >= x1 or y0 >= y1:
            continue
        xx = (np.arange(x0, x1, dtype=np.float32) + 0.5 - x) / rx
        yy = (np.arange(y0, y1, dtype=np.float32) + 0.5 - y) / ry
        r = np.sqrt(xx[None, :] ** 2 + yy[:, None] ** 2)
        prof = np.clip((1.0 - r) * min(rx, ry) + 0.5, 0.0, 1.0) * a
        np.maximum(field_[y0:y1, x0:x1], prof, out=field_[y0:y1, x0:x1])
    return field_


def _blur(a: np.ndarray) -> np.ndarray:
    """Separable [1, 2, 1] / 4 blur, edges kept."""
    b = a.copy()
    b[1:-1] = (a[:-2] + 2 * a[1:-1] + a[2:]) * 0.25
    c = b.copy()
    c[:, 1:-1] = (b[:, :-2] + 2 * b[:, 1:-1] + b[:, 2:]) * 0.25
    return c


def _bump(x: np.ndarray, c: float, w: float, p: float = 1.0) -> np.ndarray:
    return np.clip(1.0 - ((x - c) / w) ** 2, 0.0, None) ** p


def _sev(rng: np.random.Generator, anat: Anatomy, severity: tuple[float, float]) -> float:
    """Per-lesion severity: uniform draw, pulled towards the patient's stage."""
    lo, hi = severity
    t = 0.5 * rng.random() + 0.5 * float(np.clip(anat.stage + rng.uniform(-0.3, 0.3), 0, 1))
    return lo + (hi - lo) * t


# --------------------------------------------------------------------------------------------
# lesions: modify thickness [N_LAYERS, W] (reference px), values [N_LAYERS, W], add overlays


def _col(x_ref: float, xs_ref: np.ndarray) -> int:
    """Column index of a reference-frame x position."""
    return int(np.clip(x_ref / REF_W * len(xs_ref), 0, len(xs_ref) - 1))


class _Lesion:
    """Overlays of a lesion: x and radii in reference px, y relative to Bruch (reference px)."""

    def __init__(self) -> None:
        self.dark: list = []  # cysts: (x, y, rx, ry, contrast 0-1)
        self.bright: list = []  # exudates: (x, y, rx, ry, amplitude 0-1)
        self.bright_value = 200.0
        self.parts: list[str] = []


def _absorb(thick: np.ndarray, lift: np.ndarray, frac: float) -> None:
    """The ONL (then the IS) thins over a lift, so that small elevations leave the inner retina."""
    take = np.minimum(lift, frac * thick[ONL])
    thick[ONL] -= take


def _drusen(rng, anat, xs_ref, thick, vals, sev_rng, fovea_ref, les: _Lesion) -> None:
    n = 1 + min(int(rng.poisson(0.4 + 2.2 * anat.stage)), 5)
    h = np.zeros_like(xs_ref)
    cen = rng.uniform(0.12, 0.88)
    for _ in range(n):
        s = _sev(rng, anat, sev_rng)
        a = 2.0 + 24.0 * s * rng.uniform(0.7, 1.0)
        wid = (9.0 + 34.0 * s) * rng.uniform(0.7, 1.3)
        c = np.clip(cen + rng.normal(0, 0.18), 0.06, 0.94) * REF_W
        h += a * _bump(xs_ref, c, wid, rng.uniform(0.6, 1.4))
    h = np.minimum(h, 0.8 * (thick[ONL] + thick[IS]) + 4.0)
    thick[SUB] += h
    _absorb(thick, h, 0.75)
    vals[SUB] = anat.values[RPE] * rng.uniform(0.35, 0.7)
    vals[RPE] *= 1.0 + 0.08 * (h > 0.5)
    les.parts.append("drusen")


def _dme(rng, anat, xs_ref, thick, vals, sev_rng, fovea_ref, les: _Lesion) -> None:
    n = 1 + min(int(rng.poisson(0.5 + 4.0 * anat.stage)), 12)
    cx = np.clip(fovea_ref + rng.normal(0, 0.12) * REF_W, 0.1 * REF_W, 0.9 * REF_W)
    spread = rng.uniform(0.03, 0.12) * REF_W
    cysts = []
    swell = np.zeros_like(xs_ref)
    for _ in range(n):
        s = _sev(rng, anat, sev_rng)
        ry = 1.5 + 13.0 * s * rng.uniform(0.6, 1.0)
        rx = ry * rng.uniform(0.8, 2.0)
        x = cx + rng.normal(0, spread)
        contrast = (0.3 + 0.65 * s) * rng.uniform(0.75, 1.0)
        cysts.append((x, rx, ry, contrast, rng.random()))
        swell += 1.5 * ry * _bump(xs_ref, x, rx * rng.uniform(1.5, 3.0), 1.0)
    s_diff = _sev(rng, anat, sev_rng)
    swell += rng.uniform(0, 18) * s_diff * _bump(xs_ref, cx, rng.uniform(40, 110), 1.5)
    thick[INL] += 0.35 * swell
    thick[ONL] += 0.65 * swell
    b = _boundaries(np.zeros_like(xs_ref), thick)  # relative depths of the swollen retina
    for x, rx, ry, contrast, depth in cysts:
        xi = _col(x, xs_ref)
        top, bot = b[INL, xi] + 0.6 * ry, b[IS, xi] - 0.6 * ry
        y = top + depth * max(bot - top, 0.0)
        les.dark.append((x, y, rx, ry, contrast))
    if rng.random() < 0.4:
        for _ in range(int(rng.integers(2, 8))):
            x = cx + rng.normal(0, 1.5 * spread)
            xi = _col(x, xs_ref)
            r = rng.uniform(1.2, 3.0)
            les.bright.append((x, b[OPL, xi] + rng.uniform(0, 1) * thick[OPL, xi], r, r * 0.8,
                               rng.uniform(0.5, 1.0)))
    les.parts.append("cyst")


def _cnv(rng, anat, xs_ref, thick, vals, sev_rng, fovea_ref, les: _Lesion) -> None:
    s = _sev(rng, anat, sev_rng)
    cx = np.clip(fovea_ref + rng.normal(0, 0.1) * REF_W, 0.12 * REF_W, 0.88 * REF_W)
    w_ref = len(xs_ref)
    wid = (14.0 + 70.0 * s) * rng.uniform(0.7, 1.3)
    lump = 1.0 + 0.35 * _smooth_noise(rng, w_ref, 12 * w_ref / REF_W)
    m = (3.0 + 30.0 * s) * rng.uniform(0.5, 1.0) * _bump(xs_ref, cx, wid, rng.uniform(0.6, 1.3))
    m = np.clip(m * lump, 0, None)
    thick[SHRM] += m
    vals[SHRM] = rng.uniform(140, 225) * (0.65 + 0.35 * s) * (
        1.0 + 0.2 * _smooth_noise(rng, w_ref, 6 * w_ref / REF_W))
    lift = m.copy()
    parts = ["shrm"]
    if rng.random() < 0.7:  # sub-retinal fluid
        s2 = _sev(rng, anat, sev_rng)
        f = (2.0 + 26.0 * s2) * rng.uniform(0.6, 1.0) * _bump(
            xs_ref, cx + rng.normal(0, 0.6) * wid, (20.0 + 80.0 * s2) * rng.uniform(0.7, 1.3), 0.8)
        thick[SRF] += f
        vals[SRF] = anat.vitreous * rng.uniform(0.7, 1.3)
        lift += f
        parts.append("srf")
    if rng.random() < 0.35:  # pigment epithelial detachment
        s3 = _sev(rng, anat, sev_rng)
        ped = (3.0 + 30.0 * s3) * _bump(xs_ref, cx + rng.normal(0, 0.5) * wid,
                                        (20.0 + 60.0 * s3) * rng.uniform(0.7, 1.3), 0.7)
        thick[SUB] += ped
        vals[SUB] = rng.uniform(25, 75)
        lift += ped
        parts.append("ped")
    # RPE irregularity and break over the lesion
    span = _bump(xs_ref, cx, wid * 1.3, 0.5)
    wob = np.abs(_smooth_noise(rng, w_ref, 4 * w_ref / REF_W)) * (1.0 + 3.0 * s)
    thick[RPE] += wob * span
    brk = _bump(xs_ref, cx + rng.normal(0, 0.5) * wid, (4.0 + 12.0 * s) * rng.uniform(0.7, 1.3), 0.5)
    vals[RPE] *= 1.0 - rng.uniform(0.3, 0.75) * (0.4 + 0.6 * s) * brk
    lift += wob * span
    _absorb(thick, lift, 0.5)
    if rng.random() < 0.25:  # a few intraretinal cysts
        b = _boundaries(np.zeros_like(xs_ref), thick)
        for _ in range(int(rng.integers(1, 4))):
            ry = 1.5 + 7.0 * s * rng.uniform(0.5, 1.0)
            x = cx + rng.normal(0, wid * 0.6)
            xi = _col(x, xs_ref)
            y = b[INL, xi] + rng.uniform(0.3, 0.8) * (b[IS, xi] - b[INL, xi])
            les.dark.append((x, y, ry * rng.uniform(0.8, 1.6), ry, rng.uniform(0.4, 0.9)))
        parts.append("cyst")
    les.parts.extend(parts)


# --------------------------------------------------------------------------------------------
# one scan


def render_scan(rng: np.random.Generator, cls: str, height: int, width: int,
                anatomy: Anatomy | None = None, *, severity: tuple[float, float] = SEVERITY,
                with_reference: bool = False) -> Render:
    """Render one B-scan of class ``cls``.

    ``anatomy`` is the patient's eye (drawn from ``rng`` when None). With ``with_reference`` it
    also returns the same scan rendered without the lesion (identical anatomy and noise) and the
    lesion's component masks (``parts``), for tests and figures. The random draws do not depend
    on ``with_reference``, so the image is the same either way.
    """
    if cls not in CLASSES:
        raise ValueError(f"unknown class {cls!r}: allowed {', '.join(CLASSES)}")
    if anatomy is None:
        anatomy = draw_anatomy(rng, height, width)
    a = anatomy
    H, W = height, width
    sy, sx = H / REF_H, W / REF_W
    u = (np.arange(W) + 0.5) / W
    xs_ref = u * REF_W

    # ---- per-scan geometry (reference px)
    d = rng.uniform(-1.0, 1.0) * a.slice_spread
    pit_k = a.pit_depth * np.exp(-1.5 * d * d)
    fovea_u = a.fovea_u + rng.normal(0, 0.01)
    bruch = (a.bruch_depth + rng.normal(0, 5) - a.curvature * (2 * (u - a.bowl_center)) ** 2
             + (a.tilt + rng.normal(0, 4)) * (u - 0.5) * 2)
    amp, fr, ph = a.waves
    bruch = bruch + (amp[:, None] * np.sin(2 * np.pi * fr[:, None] * u[None, :] + ph[:, None])).sum(0)
    # fit the retina and some choroid into the frame
    lo_lim, hi_lim = 0.12 * REF_H, REF_H - 70.0
    shift = 0.0
    total = a.thick.sum()
    if bruch.min() - total < lo_lim - 60:  # allow the edges of a strong bowl to leave the frame
        shift = (lo_lim - 60) - (bruch.min() - total)
    if np.median(bruch) - total + shift < lo_lim:
        shift = lo_lim - (np.median(bruch) - total)
    bruch = bruch + shift
    if bruch.max() > hi_lim:
        bruch = bruch - min(bruch.max() - hi_lim, max(bruch.min() - total - lo_lim, 0.0))

    pit = np.exp(-(((u - fovea_u) / a.pit_width) ** 2)) * pit_k
    rim = np.exp(-(((u - fovea_u) / (2.3 * a.pit_width)) ** 2)) * pit_k
    thick = np.repeat(a.thick[:, None], W, axis=1)
    thick[RNFL] *= np.clip(1.0 + a.rnfl_slope * (u - fovea_u) * 1.6, 0.25, 2.0) * (1 - pit)
    thick[GCL] *= (1 + 0.22 * rim) * (1 - 0.97 * pit)
    thick[INL] *= (1 + 0.1 * rim) * (1 - 0.9 * pit)
    thick[OPL] *= 1 - 0.7 * pit
    thick[ONL] *= 1 + 0.35 * pit
    thick[IS] *= 1 + 0.2 * pit
    vals = np.repeat(a.values[:, None], W, axis=1)
    vals[RPE] *= 1.0 + 0.06 * _smooth_noise(rng, W, 40 * sx)

    # ---- lesion (drawn before the noise so that the random stream is the same either way)
    les = _Lesion()
    thick_l, vals_l = thick.copy(), vals.copy()
    if cls != "NORMAL":
        draw = {"DRUSEN": _drusen, "DME": _dme, "CNV": _cnv}[cls]
        draw(rng, a, xs_ref, thick_l, vals_l, severity, fovea_u * REF_W, les)

    # ---- vessels, vitreous strands, floaters (anatomy, identical with and without lesion)
    vu = np.clip(a.vessels_u + rng.normal(0, 0.01, len(a.vessels_u)), 0, 1)
    shadow = np.zeros(W, np.float32)
    for vx, vw, vs in zip(vu * W, a.vessels_w * sx, a.vessels_s):
        shadow += vs * np.exp(-(((np.arange(W) + 0.5 - vx) / vw) ** 2))
    shadow = np.minimum(shadow, 0.75) * (1 - pit)
    extra_b, extra_d = [], []
    if a.hyaloid and rng.random() < 0.85:
        x0, x1 = sorted(rng.uniform(-0.3, 1.3, 2))
        on = ((u > x0) & (u < x1)).astype(float)
        gap = rng.uniform(15, 90) + 25 * _smooth_noise(rng, W, 150 * sx)
        top = bruch - thick.sum(0) - np.abs(gap)
        amp_h = rng.uniform(25, 70) * on
        extra_b += [top * sy, (top + rng.uniform(1.2, 2.2)) * sy]
        extra_d += [amp_h, -amp_h]
    bruch_px = bruch * sy
    eb = np.array(extra_b) if extra_b else None
    ed = np.array(extra_d) if extra_d else None
    floaters = []
    n_fl = int(rng.poisson(0.6))
    ilm_px = bruch_px - thick.sum(0) * sy
    for _ in range(n_fl):
        x = rng.uniform(0, W)
        ymax = ilm_px[int(x)] - 8 * sy
        if ymax > 6:
            floaters.append((x, rng.uniform(2, ymax), rng.uniform(2, 7) * sx, rng.uniform(1, 3) * sy,
                             rng.uniform(0.3, 1.0)))

    # ---- noise fields and texture (same for both renderings)
    zz = rng.random((H, W), dtype=np.float32)
    zz += 1e-6
    np.log(zz, out=zz)
    np.negative(zz, out=zz)
    zz += 1e-6
    np.log(zz, out=zz)
    zz += 0.5772
    zn = zz.copy()
    zn[:, 1:] += zz[:, :-1]
    zn *= 1.0 / (1.2825 * np.sqrt(2.0))
    small = rng.random((max(int(H / (14 * sy)), 2) + 2, max(int(W / (20 * sx)), 2) + 2),
                       dtype=np.float32)
    tex = np.asarray(Image.fromarray(small, mode="F").resize((W, H), Image.BICUBIC))
    streak = 1.0 + 0.1 * _smooth_noise(rng, W, 5 * sx).astype(np.float32)
    colgain = (1.0 + 0.12 * _smooth_noise(rng, W, 120 * sx)).astype(np.float32)
    corners = _corners(rng, a, H, W)

    # ---- noise-free images
    def overlay(items):
        return [(x * sx, (bruch[_col(x, xs_ref)] + y) * sy, rx * sx, ry * sy, c)
                for x, y, rx, ry, c in items]

    def clean(th, vl, lesion=None):
        img = _layer_image(bruch_px, th * sy, vl, a.vitreous, eb, ed, H)
        dark = None
        if lesion is not None and lesion.dark:
            dark = _ellipses((H, W), overlay(lesion.dark))
            img = img * (1.0 - dark) + (a.vitreous * 0.8) * dark
        if lesion is not None and lesion.bright:
            f = _ellipses((H, W), overlay(lesion.bright))
            img = img + (lesion.bright_value - img) * f
        return img, dark

    norm, _ = clean(thick, vals)
    if cls == "NORMAL":
        lesioned, dark = norm, None
        mask = np.zeros((H, W), bool)
    else:
        lesioned, dark = clean(thick_l, vals_l, les)
        mask = _span_mask(np.abs(lesioned - norm) > MASK_THRESHOLD)
        mask &= ~corners

    # ---- image formation
    yy = np.arange(H, dtype=np.float32)[:, None]
    r0 = int(max(np.floor(bruch_px.min()), 0))
    dy = yy[r0:] - bruch_px[None, :].astype(np.float32)
    below = dy > 0
    e = np.exp(-np.maximum(dy, 0) / (a.choroid_decay * sy))
    lum = np.clip((tex[r0:] - 0.45) * 3.0, 0, 1) * a.choroid_lumen
    lum *= np.clip((dy - 4 * sy) / (12 * sy), 0, 1)
    chor = below * streak[None, :] * (a.deep + (a.choroid_top - a.deep) * e * (1 - lum))
    vy = bruch_px - thick[RNFL:].sum(0) * sy  # just below the RNFL: vessel depth
    fac = (1.0 - shadow[None, :] * (yy > vy[None, :])) * colgain[None, :] * a.gain
    fac *= (1.0 - a.falloff * (yy / H) ** 1.5)
    vess = [(vx, vyy, vw * 0.9, vw * sy / sx * 0.7, 0.5) for vx, vyy, vw in
            zip(vu * W, vy[np.clip((vu * W).astype(int), 0, W - 1)] - 2 * sy, a.vessels_w * sx)]
    blobs = _ellipses((H, W), vess + floaters)

    def form(clean_img):
        img = clean_img.copy()
        img[r0:] += chor
        img += blobs * 70.0
        img *= fac
        img += (a.noise + a.noise_rel * img) * zn
        img = _blur(img)
        img[corners] = 255.0
        return np.clip(img + 0.5, 0, 255).astype(np.uint8)

    image = form(lesioned)
    reference, parts = None, {}
    if with_reference:
        reference = image if cls == "NORMAL" else form(norm)
        parts = _parts(cls, les, bruch_px, thick_l * sy, dark, H)
    return Render(image, mask, reference, parts)


def _span_mask(changed: np.ndarray) -> np.ndarray:
    """Fill each column between its first and last changed row; widen by the blur radius."""
    h, w = changed.shape
    anyc = changed.any(axis=0)
    first = np.argmax(changed, axis=0) - 1
    last = h - np.argmax(changed[::-1], axis=0)
    yy = np.arange(h)[:, None]
    m = (yy >= first[None, :]) & (yy <= last[None, :]) & anyc[None, :]
    out = m.copy()
    out[:, 1:] |= m[:, :-1]
    out[:, :-1] |= m[:, 1:]
    return out


def _parts(cls: str, les: _Lesion, bruch_px, thick_px, dark, H: int) -> dict:
    """Component masks of the lesion (pixels of each lesion tissue), for tests and figures."""
    b = _boundaries(bruch_px, thick_px)
    yy = np.arange(H)[:, None]

    def band(top, bot, min_px=1.0):
        return (yy >= top[None, :] + 0.5) & (yy < bot[None, :] - 0.5) & ((bot - top) >= min_px)[None, :]

    out = {}
    if cls == "DRUSEN":
        out["drusen"] = band(b[SUB], bruch_px)
    if cls == "CNV":
        out["shrm"] = band(b[SHRM], b[RPE])
        if "srf" in les.parts:
            out["srf"] = band(b[SRF], b[SHRM])
    if dark is not None:
        out["cyst"] = dark > 0.1
    return out


def _corners(rng: np.random.Generator, a: Anatomy, H: int, W: int) -> np.ndarray:
    """White wedges left by the registration's rotation of the frame (top and/or bottom)."""
    m = np.zeros((H, W), bool)
    if rng.random() >= a.corner_p:
        return m
    x = np.arange(W)[None, :]
    y = np.arange(H)[:, None]
    if rng.random() < 0.8:
        slope = rng.uniform(0.01, 0.09) * (1 if rng.random() < 0.5 else -1)
        off = rng.uniform(-0.01, 0.04) * H
        line = off + np.abs(slope) * (x if slope > 0 else W - x)
        m |= y < line
    if rng.random() < 0.4:
        slope = rng.uniform(0.01, 0.06)
        off = rng.uniform(-0.02, 0.04) * H
        bow = rng.uniform(0, 0.05) * H if rng.random() < 0.3 else 0.0
        line = off + slope * (x if rng.random() < 0.5 else W - x) + bow * (1 - (2 * x / W - 1) ** 2)
        m |= y >= H - line
    return m


def generate_scan(rng: np.random.Generator, cls: str, height: int, width: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """One B-scan: (image uint8 [height, width], lesion mask bool [height, width]; all False for
    NORMAL). A fresh patient anatomy is drawn from ``rng``."""
    r = render_scan(rng, cls, height, width)
    return r.image, r.mask


# --------------------------------------------------------------------------------------------
# the dataset


@dataclass(frozen=True)
class _Job:
    index: int
    split: str
    cls: str
    patient_index: int
    patient: int
    number: int


def _plan(p: SyntheticParams) -> list[_Job]:
    groups = [("train", "NORMAL", p.train_normal)]
    groups += [("train", c, p.train_per_disease) for c in DISEASES]
    groups += [("test", c, p.test_per_class) for c in CLASSES]
    n_pat = [-(-n // p.scans_per_patient) for _, _, n in groups]
    id_rng = np.random.default_rng([p.seed, 7])
    ids = id_rng.choice(9_900_000, size=sum(n_pat), replace=False) + 100_000
    jobs, pi, index = [], 0, 0
    for (split, cls, n), npat in zip(groups, n_pat):
        for k in range(npat):
            start = int(np.random.default_rng([p.seed, 3, pi]).integers(1, 60))
            for j in range(min(p.scans_per_patient, n - k * p.scans_per_patient)):
                jobs.append(_Job(index, split, cls, pi, int(ids[pi]), start + j))
                index += 1
            pi += 1
    return jobs


def _severity(p: SyntheticParams) -> tuple[float, float]:
    return (getattr(p, "severity_min", SEVERITY[0]), getattr(p, "severity_max", SEVERITY[1]))


def _work(args: tuple[Path, SyntheticParams, _Job]) -> dict:
    root, p, job = args
    prng = np.random.default_rng([p.seed, 1, job.patient_index])
    h, w = draw_size(prng)
    anat = draw_anatomy(prng, h, w)
    r = render_scan(np.random.default_rng([p.seed, 2, job.index]), job.cls, h, w, anat,
                    severity=_severity(p))
    name = f"{job.cls}-{job.patient}-{job.number}"
    img_rel = Path(job.split) / job.cls / f"{name}.jpeg"
    mask_rel = Path("masks") / job.split / job.cls / f"{name}.png"
    buf = io.BytesIO()
    Image.fromarray(r.image, mode="L").save(buf, "JPEG", quality=JPEG_QUALITY)
    (root / img_rel).write_bytes(buf.getvalue())
    buf = io.BytesIO()
    Image.fromarray(r.mask.astype(np.uint8) * 255, mode="L").save(buf, "PNG", compress_level=1)
    (root / mask_rel).write_bytes(buf.getvalue())
    return {"path": (Path(root.name) / img_rel).as_posix(), "class": job.cls,
            "patient": str(job.patient), "official_split": job.split,
            "mask": (Path(root.name) / mask_rel).as_posix()}


def write_dataset(root: Path, p: SyntheticParams) -> pd.DataFrame:
    """Write the synthetic OCT2017-shaped tree under ``root`` and return its manifest.

    Images: ``root/{train,test}/<CLASS>/<CLASS>-<patient>-<n>.jpeg``; masks:
    ``root/masks/{train,test}/<CLASS>/<same>.png`` (uint8, 255 = lesion). Manifest columns
    ``path, class, patient, official_split, mask``, paths relative to ``root.parent`` (where the
    caller writes ``manifest.csv``). Same ``p.seed`` -> byte-identical files, whatever ``p.workers``.
    Existing ``train``, ``test`` and ``masks`` folders under ``root`` are replaced.
    """
    root = Path(root)
    for sub in ("train", "test", "masks"):
        if (root / sub).exists():
            shutil.rmtree(root / sub)
    for split in ("train", "test"):
        for cls in CLASSES:
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            (root / "masks" / split / cls).mkdir(parents=True, exist_ok=True)
    jobs = _plan(p)
    workers = p.workers or os.cpu_count() or 1
    args = [(root, p, j) for j in jobs]
    if workers == 1 or len(jobs) < 32:
        rows = [_work(x) for x in args]
    else:
        with get_context("fork" if os.name == "posix" else "spawn").Pool(workers) as pool:
            rows = list(pool.imap(_work, args, chunksize=16))
    return pd.DataFrame(rows, columns=["path", "class", "patient", "official_split", "mask"])
