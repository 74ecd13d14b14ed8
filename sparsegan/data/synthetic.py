"""Embedded synthetic retinal OCT generator: the default data source (docs/design.md, section 2).

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
reflectivity into an accumulator image (``np.bincount``), spread over the 4 rows around its
sub-pixel depth (linear interpolation convolved with a [1, 2, 1] blur: soft, anti-aliased edges),
and a cumulative sum down the columns turns the jumps into layers.

Per *patient* (one class, ``scans_per_patient`` scans, like neighbouring B-scans of one volume):
image size (512x496 mostly, 768x496, 512x512, 1536x496, same field of view), retina depth, bowl
curvature, tilt, slow waviness, layer thicknesses and reflectivities, RNFL asymmetry, fovea position
and pit width, choroid brightness and fall-off, brightness, noise level, superficial vessel
positions, vitreous strand, how often registration corners appear, a disease "stage". Per *scan*:
small shifts of depth/tilt, layer undulation, the slice's distance from the foveal centre (pit depth
``exp(-1.5 d^2)``, so many but not all scans show a pit), vessel jitter, floaters, white
registration corners (the wedges a rotated frame leaves, top and/or bottom), choroidal vessel
lumens, speckle, and the lesions.

Image formation: layer image + choroid + vessel walls/floaters -> vessel shadows (darker vertical
stripes below superficial vessels) -> depth fall-off and a smooth column gain -> speckle:
multiplicative (mean-1 exponential intensity averaged over 3 px) and additive log-compressed
(log of the same exponential variate: the grainy, left-skewed vitreous background) -> 3x3 [1, 2, 1]
blur -> white corners -> uint8.

Lesions, each with a ``severity`` in ``severity = (min, max)`` (a uniform draw blended with the
patient's stage) that scales its size and contrast, so that small, faint lesions exist next to
obvious ones:

- DRUSEN: 1-9 dome-shaped RPE elevations ``h = A (1 - (dx/w)^2)^p`` (A up to ~34 px of 496)
  filled with medium-reflective material; the photoreceptor bands ride on the domes, the ONL thins
  over them (only a smoothed remainder lifts the inner retina); sometimes hyper-reflective foci.
- DME: retinal thickening (INL/ONL swell into a dome, the ILM rises, the pit flattens) with a
  cluster of intraretinal hypo-reflective cysts (soft ellipses of various sizes and contrasts between
  INL and ONL), sometimes hard exudates (bright dots in the OPL) or sub-retinal fluid.
- CNV: sub-retinal hyper-reflective material (lumpy, heterogeneous) on the RPE, usually sub-retinal
  fluid (dark lens between photoreceptors and RPE), RPE irregularity and a break (wavy, thickened,
  dimmed RPE), sometimes a pigment-epithelial detachment (RPE dome over dark content) and cysts.

The mask is exact by construction: the noise-free layer image of the lesion's columns is rendered
with and without the lesion (same anatomy), the pixels that change by more than
``MASK_THRESHOLD`` grey levels are filled column-wise between the first and last changed row (a
retina lifted or swollen by the lesion is part of it) and widened by the blur radius. The noise is
drawn once and applied to both renderings, so ``render_scan(..., with_reference=True)`` also returns
the healthy twin of a diseased scan, which differs from it only inside the mask (tested). A lesion
too faint to change any pixel is redrawn stronger, so every disease scan has a non-empty mask.

Realism. What limits a reconstruction-based detector is less the lesions than how much a
*normal* scan varies; the ranges of gain, retina position, background level and registration
corners were set by comparing normal scans with real OCT2017 normals as a 64x64 model sees them
(``scripts/compare_domains.py``; the history and the numbers are in docs/design.md, section 2).
``severity_min``/``severity_max`` (``data.synthetic`` params) set the lesion range.

Speed: ``write_dataset`` renders in pool workers that keep freed memory (no page faults for each
scan's temporaries); ``scripts/bench.py`` measures the rate.
Determinism: every scan has its own generator ``default_rng([seed, 2, index])`` and every patient
``default_rng([seed, 1, patient_index])``, so files are byte-identical for a seed whatever the
number of workers.
"""

from __future__ import annotations

import io
import os
import shutil
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from PIL import Image
from scipy.ndimage import gaussian_filter1d

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
                      u(2.8, 4.2), u(3.5, 5.0), 0.0, 0.0, u(5.0, 8.0), 0.0])
    thick[:IS] *= u(0.85, 1.2)
    values = np.array([u(85, 125), u(68, 95), u(42, 62), u(72, 100), u(35, 55), u(50, 72),
                       u(150, 215), u(85, 125), 20.0, 180.0, u(200, 248), 120.0])
    nv = int(rng.integers(3, 10))
    return Anatomy(
        width=width, height=height,
        bruch_depth=u(150, 330),
        curvature=float(rng.choice([u(-15, 12), u(6, 42), u(30, 90)], p=[0.3, 0.5, 0.2])),
        bowl_center=u(0.3, 0.7),
        tilt=u(-55, 55) if rng.random() < 0.7 else u(-110, 110),
        waves=np.stack([rng.uniform(0, 4, 3), rng.uniform(0.5, 2.5, 3), rng.uniform(0, 6.3, 3)]),
        thick=thick, values=values,
        rnfl_slope=u(-1.0, 1.0),
        fovea_u=u(0.35, 0.65),
        pit_width=u(0.045, 0.085),
        pit_depth=u(0.75, 1.0) if rng.random() < 0.85 else 0.0,
        slice_spread=u(0.5, 1.6),
        vitreous=u(2, 26),
        choroid_top=u(75, 140),
        choroid_decay=u(35, 100),
        choroid_lumen=u(0.15, 0.35),
        deep=u(3, 15),
        gain=u(0.95, 1.5),
        falloff=u(0.0, 0.35),
        noise=u(8, 15),
        noise_rel=u(0.25, 0.45),
        vessels_u=rng.uniform(0.03, 0.97, nv),
        vessels_w=rng.uniform(1.5, 4.0, nv),
        vessels_s=rng.uniform(0.05, 0.45, nv) ** 1.3,
        hyaloid=bool(rng.random() < 0.2),
        corner_p=float(rng.choice([0.0, 0.4, 0.9], p=[0.3, 0.4, 0.3])),
        stage=float(rng.random() ** 0.6),  # skewed towards visible disease, as in OCT2017
    )


# --------------------------------------------------------------------------------------------
# rendering helpers


def _smooth_noise(rng: np.random.Generator, n: int, scale: float) -> np.ndarray:
    """1-D smooth noise of length n, unit-ish amplitude, correlation length ~scale samples."""
    k = max(2, int(np.ceil(n / max(scale, 1.0))) + 2)
    knots = rng.standard_normal(k)
    return np.interp(np.linspace(0, k - 3, n) + 1, np.arange(k), knots)


_PAD = 3  # rows of padding above the image in the accumulation array


def _stack(bounds: np.ndarray, deltas: np.ndarray, height: int) -> np.ndarray:
    """Piecewise-constant columns from boundary depths [K, W] (px) and value jumps [K, W].

    Each jump is spread over the 4 rows around its sub-pixel depth with the weights of a linear
    interpolation convolved with a [1, 2, 1] / 4 blur (soft, anti-aliased layer edges); a
    cumulative sum down each column then turns jumps into layers.
    """
    k, w = bounds.shape
    y = np.clip(bounds, -2.0, height + 1.0)
    i = np.floor(y).astype(np.int64)
    f = y - i
    base = (i + _PAD - 1) * w + np.arange(w)
    idx = np.concatenate([base.ravel(), (base + w).ravel(), (base + 2 * w).ravel(),
                          (base + 3 * w).ravel()])
    wts = np.concatenate([(deltas * (0.25 * (1 - f))).ravel(), (deltas * (0.25 * (2 - f))).ravel(),
                          (deltas * (0.25 * (1 + f))).ravel(), (deltas * (0.25 * f)).ravel()])
    acc = np.bincount(idx, weights=wts, minlength=(height + 2 * _PAD + 2) * w)
    out = acc[: (height + _PAD) * w].reshape(height + _PAD, w).astype(np.float32)
    for r in range(1, height + _PAD):  # row loop: far faster than cumsum along axis 0
        out[r] += out[r - 1]
    return out[_PAD:]


def _boundaries(bruch: np.ndarray, thick: np.ndarray) -> np.ndarray:
    """Top boundary of every layer [N_LAYERS, W], stacking thicknesses upward from Bruch."""
    return bruch[None, :] - np.cumsum(thick[::-1], axis=0)[::-1]


def _layer_image(bruch_px, thick_px, vals, vitreous, extra_b, extra_d, height) -> np.ndarray:
    """Noise-free layer image (no choroid) of the columns given."""
    w = vals.shape[1]
    b = _boundaries(bruch_px, thick_px)
    full = np.concatenate([np.full((1, w), vitreous), vals, np.zeros((1, w))], axis=0)
    bounds = [np.full((1, w), -2.0), b, bruch_px[None, :]]
    deltas = [np.full((1, w), vitreous), np.diff(full, axis=0)]
    if extra_b is not None:
        bounds.append(extra_b)
        deltas.append(extra_d)
    return _stack(np.concatenate(bounds), np.concatenate(deltas), height)


def _ellipse_boxes(shape, ells, x_off: int = 0):
    """Yield (slice_y, slice_x, profile) of soft filled ellipses (x, y, rx, ry, amplitude[, edge])
    where ``edge`` is the width of the soft rim in pixels (default 1)."""
    h, w = shape
    for x, y, rx, ry, amp, *edge in ells:
        x = x - x_off
        x0, x1 = max(int(x - rx - 2), 0), min(int(x + rx + 3), w)
        y0, y1 = max(int(y - ry - 2), 0), min(int(y + ry + 3), h)
        if x0 >= x1 or y0 >= y1:
            continue
        xx = (np.arange(x0, x1, dtype=np.float32) + 0.5 - x) / rx
        yy = (np.arange(y0, y1, dtype=np.float32) + 0.5 - y) / ry
        r = np.sqrt(xx[None, :] ** 2 + yy[:, None] ** 2)
        prof = np.clip((1.0 - r) * (min(rx, ry) / (edge[0] if edge else 1.0)) + 0.5, 0.0, 1.0) * amp
        yield slice(y0, y1), slice(x0, x1), prof


def _ellipses(shape, ells, x_off: int = 0) -> np.ndarray:
    """Max-combined field in [0, 1] of soft ellipses."""
    out = np.zeros(shape, np.float32)
    for sy_, sx_, prof in _ellipse_boxes(shape, ells, x_off):
        np.maximum(out[sy_, sx_], prof, out=out[sy_, sx_])
    return out


def _blur(a: np.ndarray) -> np.ndarray:
    """Separable [1, 2, 1] / 4 blur, edges kept."""
    b = a.copy()
    b[1:-1] += a[1:-1]
    b[1:-1] += a[:-2]
    b[1:-1] += a[2:]
    b[1:-1] *= 0.25
    c = b.copy()
    c[:, 1:-1] += b[:, 1:-1]
    c[:, 1:-1] += b[:, :-2]
    c[:, 1:-1] += b[:, 2:]
    c[:, 1:-1] *= 0.25
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


def _absorb(thick: np.ndarray, lift: np.ndarray, frac: float, xs_ref: np.ndarray) -> None:
    """The ONL takes up a lift from below: it thins over small or bumpy elevations, so that the
    inner retina only follows a smoothed, reduced version of the lift (as over real drusen/CNV)."""
    sigma = 14.0 * len(xs_ref) / REF_W
    inner = np.clip(gaussian_filter1d(lift, sigma, mode="nearest") - frac * thick[ONL], 0.0, None)
    take = np.minimum(lift - inner, 0.85 * thick[ONL])
    thick[ONL] -= take


def _drusen(rng, anat, xs_ref, thick, vals, sev_rng, fovea_ref, les: _Lesion) -> None:
    n = 1 + min(int(rng.poisson(1.0 + 4.0 * anat.stage)), 8)
    h = np.zeros_like(xs_ref)
    cen = rng.uniform(0.12, 0.88)
    for _ in range(n):
        s = _sev(rng, anat, sev_rng)
        a = 2.0 + 32.0 * s * rng.uniform(0.7, 1.0)
        wid = (9.0 + 45.0 * s) * rng.uniform(0.7, 1.3)
        c = np.clip(cen + rng.normal(0, 0.18), 0.06, 0.94) * REF_W
        h += a * _bump(xs_ref, c, wid, rng.uniform(0.6, 1.4))
    h = np.minimum(h, 0.8 * (thick[ONL] + thick[IS]) + 4.0)
    thick[SUB] += h
    _absorb(thick, h, 0.75, xs_ref)
    vals[SUB] = anat.values[RPE] * rng.uniform(0.35, 0.7)
    vals[RPE] *= 1.0 + 0.08 * (h > 0.5)
    if rng.random() < 0.3:  # hyper-reflective foci in the ONL over large drusen
        b = _boundaries(np.zeros_like(xs_ref), thick)
        for _ in range(int(rng.integers(1, 5))):
            xi = int(np.argmax(h + rng.uniform(0, 1, len(h)) * h.max()))
            r = rng.uniform(1.5, 3.5)
            les.bright.append((xs_ref[xi], b[ONL, xi] + rng.uniform(0.2, 0.8) * thick[ONL, xi], r,
                               r * 0.8, rng.uniform(0.5, 0.9)))
    les.parts.append("drusen")


def _dme(rng, anat, xs_ref, thick, vals, sev_rng, fovea_ref, les: _Lesion) -> None:
    n = 1 + min(int(rng.poisson(2.0 + 7.0 * anat.stage)), 18)
    cx = np.clip(fovea_ref + rng.normal(0, 0.12) * REF_W, 0.1 * REF_W, 0.9 * REF_W)
    spread = rng.uniform(0.03, 0.12) * REF_W
    cysts = []
    swell = np.zeros_like(xs_ref)
    for _ in range(n):
        s = _sev(rng, anat, sev_rng)
        ry = 2.0 + 30.0 * s ** 1.2 * rng.uniform(0.6, 1.0)
        rx = ry * rng.uniform(0.8, 2.0)
        x = cx + rng.normal(0, spread)
        contrast = (0.4 + 0.58 * s) * rng.uniform(0.8, 1.0)
        cysts.append((x, rx, ry, contrast, rng.random()))
        swell += 2.0 * ry * _bump(xs_ref, x, max(rx * rng.uniform(2.5, 4.0), 30.0), 1.5)
    s_diff = _sev(rng, anat, sev_rng)
    swell += rng.uniform(3, 25) * s_diff * _bump(xs_ref, cx, rng.uniform(50, 120), 1.5)
    swell = gaussian_filter1d(swell, 16.0 * len(xs_ref) / REF_W, mode="nearest")
    swell = np.minimum(swell, rng.uniform(40, 70))  # a dome, not a spike
    thick[INL] += 0.35 * swell
    thick[ONL] += 0.65 * swell
    if rng.random() < 0.25:  # sub-retinal fluid, common in DME too
        s_srf = _sev(rng, anat, sev_rng)
        thick[SRF] += (3.0 + 22.0 * s_srf) * _bump(xs_ref, cx + rng.normal(0, spread),
                                                   (25.0 + 60.0 * s_srf) * rng.uniform(0.7, 1.3), 0.8)
        vals[SRF] = anat.vitreous * rng.uniform(0.7, 1.3)
        les.parts.append("srf")
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
    n = len(xs_ref)  # columns
    wid = (14.0 + 70.0 * s) * rng.uniform(0.7, 1.3)
    lump = 1.0 + 0.25 * _smooth_noise(rng, n, 24 * n / REF_W)
    m = (4.0 + 32.0 * s) * rng.uniform(0.55, 1.0) * _bump(xs_ref, cx, wid, rng.uniform(0.6, 1.3))
    m = np.clip(m * lump, 0, None)
    thick[SHRM] += m
    vals[SHRM] = rng.uniform(140, 225) * (0.65 + 0.35 * s) * (
        1.0 + 0.2 * _smooth_noise(rng, n, 6 * n / REF_W))
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
    wob = np.abs(_smooth_noise(rng, n, 6 * n / REF_W)) * (1.0 + 3.0 * s)
    thick[RPE] += wob * span
    brk = _bump(xs_ref, cx + rng.normal(0, 0.5) * wid, (4.0 + 12.0 * s) * rng.uniform(0.7, 1.3), 0.5)
    vals[RPE] *= 1.0 - rng.uniform(0.3, 0.75) * (0.4 + 0.6 * s) * brk
    lift += wob * span
    _absorb(thick, lift, 0.5, xs_ref)
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
    for k in range(RNFL, RPE + 1):
        thick[k] *= 1.0 + 0.07 * _smooth_noise(rng, W, 60 * sx)
    thick[RNFL] *= np.clip(1.0 + a.rnfl_slope * (u - fovea_u) * 1.6, 0.25, 2.0) * (1 - pit)
    thick[GCL] *= (1 + 0.22 * rim) * (1 - 0.97 * pit)
    thick[INL] *= (1 + 0.1 * rim) * (1 - 0.9 * pit)
    thick[OPL] *= 1 - 0.7 * pit
    thick[ONL] *= 1 + 0.35 * pit
    thick[IS] *= 1 + 0.2 * pit
    vals = np.repeat(a.values[:, None], W, axis=1)
    vals[RPE] *= 1.0 + 0.06 * _smooth_noise(rng, W, 40 * sx)

    bruch_px = bruch * sy

    # ---- vitreous strand (posterior hyaloid): a thin faint band above the retina
    eb = ed = None
    if a.hyaloid and rng.random() < 0.85:
        x0, x1 = sorted(rng.uniform(-0.3, 1.3, 2))
        on = ((u > x0) & (u < x1)).astype(float)
        gap = np.abs(rng.uniform(15, 90) + 25 * _smooth_noise(rng, W, 150 * sx))
        top = bruch - thick.sum(0) - gap
        amp_h = rng.uniform(25, 70) * on
        eb = np.stack([top * sy, (top + rng.uniform(1.2, 2.2)) * sy])
        ed = np.stack([amp_h, -amp_h])

    # ---- healthy noise-free layer image
    norm = _layer_image(bruch_px, thick * sy, vals, a.vitreous, eb, ed, H)

    # ---- lesion: its columns re-rendered with the lesion; the mask is where they changed
    les, thick_l, dark = _Lesion(), thick, None
    lesioned, mask = norm, np.zeros((H, W), bool)
    if cls != "NORMAL":
        draw = {"DRUSEN": _drusen, "DME": _dme, "CNV": _cnv}[cls]
        lo, hi = severity
        for attempt in range(4):  # a lesion too faint to change any pixel is drawn again, stronger
            les, thick_l, vals_l = _Lesion(), thick.copy(), vals.copy()
            draw(rng, a, xs_ref, thick_l, vals_l, (lo + (hi - lo) * attempt / 3, hi),
                 fovea_u * REF_W, les)
            sub, c0, dark_s = _render_lesion(les, thick, vals, thick_l, vals_l, bruch, bruch_px,
                                              xs_ref, a.vitreous, eb, ed, H, W, sx, sy)
            if sub is not None:
                m = _span_mask(np.abs(sub - norm[:, c0:c0 + sub.shape[1]]) > MASK_THRESHOLD)
                if m.any():
                    break
        if sub is not None:
            c1 = c0 + sub.shape[1]
            mask[:, c0:c1] = m
            lesioned = norm.copy()
            lesioned[:, c0:c1] = sub
            if dark_s is not None:
                dark = np.zeros((H, W), np.float32)
                dark[:, c0:c1] = dark_s

    # ---- vessels and floaters (anatomy: identical with and without the lesion)
    vu = np.clip(a.vessels_u + rng.normal(0, 0.01, len(a.vessels_u)), 0, 1)
    shadow = np.zeros(W, np.float32)
    for vx, vw, vs in zip(vu * W, a.vessels_w * sx, a.vessels_s):
        shadow += vs * np.exp(-(((np.arange(W) + 0.5 - vx) / vw) ** 2))
    shadow = np.minimum(shadow, 0.75) * (1 - pit)
    vy = bruch_px - thick[RNFL:].sum(0) * sy  # just below the RNFL: vessel depth
    blobs = [(vx, vyy, vw * 0.9, vw * sy / sx * 0.7, 35.0) for vx, vyy, vw in
             zip(vu * W, vy[np.clip((vu * W).astype(int), 0, W - 1)] - 2 * sy, a.vessels_w * sx)]
    ilm_px = bruch_px - thick.sum(0) * sy
    for _ in range(int(rng.poisson(0.6))):
        x = rng.uniform(0, W)
        ymax = ilm_px[int(x)] - 8 * sy
        if ymax > 6:
            blobs.append((x, rng.uniform(2, ymax), rng.uniform(2, 7) * sx, rng.uniform(1, 3) * sy,
                          70.0 * rng.uniform(0.3, 1.0)))

    # ---- noise fields and textures (drawn once, shared by both renderings)
    # flat arrays: neighbours along rows (a row's end touching the next row's start is harmless)
    # The grain has a physical size (the optical resolution): drawn on the reference 512-column
    # grid and stretched to the scan's width, so a 1536-column scan of the same field of view has
    # the same speckle after resizing as a 512-column one.
    Wn = max(1, int(round(W / sx)))
    ee = rng.random(H * Wn + 2, dtype=np.float32)  # speckle: exponential intensity ...
    ee += 1e-6
    np.log(ee, out=ee)
    np.negative(ee, out=ee)
    zz = ee + 1e-6  # ... and its log (log-compressed): the additive background noise
    np.log(zz, out=zz)
    zn = zz[1:-1] + zz[:-2]  # 2 px grain, zero mean, unit variance
    zn += 2 * 0.5772
    zn *= 1.0 / (1.2825 * np.sqrt(2.0))
    sp = ee[:-2] + ee[1:-1]  # multiplicative speckle on tissue: 3 px grain, mean 1
    sp += ee[2:]
    sp *= a.noise_rel / 3.0
    sp += 1.0 - a.noise_rel
    if Wn == W:
        zn, sp = zn.reshape(H, W), sp.reshape(H, W)
    else:
        cols = np.minimum((np.arange(W) / sx).astype(np.intp), Wn - 1)
        zn, sp = zn.reshape(H, Wn)[:, cols], sp.reshape(H, Wn)[:, cols]
    lumens = []  # choroidal vessel lumens: dark ellipses under Bruch's membrane
    for _ in range(int(W / (16 * sx))):
        x = rng.uniform(0, W)
        ry = rng.uniform(5, 14) * sy
        lumens.append((x, bruch_px[int(x)] + ry + rng.uniform(4, 50) * sy, rng.uniform(7, 20) * sx,
                       ry, rng.uniform(0.4, 1.0) * a.choroid_lumen, 0.4 * ry + 1))
    streak = 1.0 + 0.15 * _smooth_noise(rng, W, 5 * sx).astype(np.float32)
    colgain = (1.0 + 0.12 * _smooth_noise(rng, W, 120 * sx)).astype(np.float32)
    corners = _corners(rng, a, H, W)
    has_corners = bool(corners.any())
    if has_corners:
        mask &= ~corners

    # ---- choroid: bright under Bruch's membrane, dark vessel lumens, fading with depth
    yy = np.arange(H, dtype=np.float32)[:, None]
    r0 = int(min(max(np.floor(bruch_px.min()), 0), H))
    dy = yy[r0:] - bruch_px[None, :].astype(np.float32)
    chor = np.maximum(dy, 0)
    chor *= -1.0 / (a.choroid_decay * sy)
    np.exp(chor, out=chor)
    lum = np.ones_like(chor)
    for sl_y, sl_x, prof in _ellipse_boxes(lum.shape, [(x, y - r0, *rest) for x, y, *rest in lumens]):
        np.minimum(lum[sl_y, sl_x], 1.0 - prof, out=lum[sl_y, sl_x])
    chor *= lum
    chor *= a.choroid_top - a.deep
    chor += a.deep
    chor *= dy > 0
    chor *= streak[None, :]

    # ---- image formation: vessel shadows, gains, speckle, blur, corners
    shade_cols = np.nonzero(shadow > 0.004)[0]
    shade = 1.0 - shadow[shade_cols][None, :] * (yy > vy[shade_cols][None, :])
    rowgain = (1.0 - a.falloff * (yy / H) ** 1.5).astype(np.float32)
    colg = (colgain * a.gain).astype(np.float32)[None, :]

    def form(clean_img: np.ndarray) -> np.ndarray:
        img = clean_img.copy()
        img[r0:] += chor
        for sl_y, sl_x, prof in _ellipse_boxes((H, W), blobs):
            img[sl_y, sl_x] += prof
        img[:, shade_cols] *= shade
        img *= rowgain
        img *= colg
        img *= sp
        img += a.noise * zn
        img = _blur(img)
        if has_corners:
            img[corners] = 255.0
        np.clip(img, 0, 255, out=img)
        img += 0.5
        return img.astype(np.uint8)

    image = form(lesioned)
    reference, parts = None, {}
    if with_reference:
        reference = image if cls == "NORMAL" else form(norm)
        parts = _parts(cls, les, bruch_px, thick * sy, thick_l * sy, dark, H)
    return Render(image, mask, reference, parts)


def _render_lesion(les, thick, vals, thick_l, vals_l, bruch, bruch_px, xs_ref, vitreous, eb, ed,
                   H, W, sx, sy):
    """Noise-free layer image of the columns a lesion touches: (image, first column, cyst field)."""
    def overlay(items):
        return [(x * sx, (bruch[_col(x, xs_ref)] + y) * sy, rx * sx, ry * sy, c)
                for x, y, rx, ry, c in items]

    dark_e, bright_e = overlay(les.dark), overlay(les.bright)
    changed = (np.abs(thick_l - thick) > 1e-4).any(0)
    changed |= ((np.abs(vals_l - vals) > 1e-4) & (thick_l > 0)).any(0)
    cols = np.nonzero(changed)[0]
    lo = [int(cols.min())] if len(cols) else []
    hi = [int(cols.max()) + 1] if len(cols) else []
    for x, _, rx, _, _ in dark_e + bright_e:
        lo.append(int(x - rx - 2))
        hi.append(int(x + rx + 3))
    if not lo:
        return None, 0, None
    c0, c1 = max(min(lo) - 3, 0), min(max(hi) + 3, W)
    if c0 >= c1:
        return None, 0, None
    sub = _layer_image(bruch_px[c0:c1], thick_l[:, c0:c1] * sy, vals_l[:, c0:c1], vitreous,
                       None if eb is None else eb[:, c0:c1], None if ed is None else ed[:, c0:c1], H)
    dark_s = None
    if dark_e:
        dark_s = _ellipses(sub.shape, dark_e, c0)
        sub *= 1.0 - dark_s
        sub += (vitreous * 0.8) * dark_s
    for sl_y, sl_x, prof in _ellipse_boxes(sub.shape, bright_e, c0):
        sub[sl_y, sl_x] += (les.bright_value - sub[sl_y, sl_x]) * prof
    return sub, c0, dark_s


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


def _parts(cls: str, les: _Lesion, bruch_px, thick_px, thick_l_px, dark, H: int) -> dict:
    """Component masks of the lesion (pixels of each lesion tissue), for tests and figures."""
    b, bl = _boundaries(bruch_px, thick_px), _boundaries(bruch_px, thick_l_px)
    yy = np.arange(H)[:, None]

    def band(top, bot, min_px=1.0):
        return ((yy >= top[None, :] + 0.5) & (yy < bot[None, :] - 0.5)
                & ((bot - top) >= min_px)[None, :])

    out = {}
    if cls == "DRUSEN":
        out["drusen"] = band(bl[RPE], bruch_px)  # the dome: lifted RPE and the material under it
        out["elevation"] = band(bl[RPE], b[RPE], 2.0)  # where the RPE now is and was not
    if cls == "CNV":
        out["shrm"] = band(bl[SHRM], bl[RPE])
        if "srf" in les.parts:
            out["srf"] = band(bl[SRF], bl[SHRM])
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
        slope = rng.uniform(0.005, 0.13) * (1 if rng.random() < 0.5 else -1)
        off = rng.uniform(-0.01, 0.07) * H
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
    return (p.severity_min, p.severity_max)


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


def _worker_init() -> None:
    """Pool workers keep freed memory (glibc): the per-scan temporaries of a few MB would
    otherwise be mmap'ed and page-faulted anew for every scan."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc: fine, just slower
        pass


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
    if workers == 1 or len(jobs) < 2:
        rows = [_work(x) for x in args]
    else:
        ctx = get_context("fork" if os.name == "posix" else "spawn")
        with ctx.Pool(workers, initializer=_worker_init) as pool:
            rows = list(pool.imap(_work, args, chunksize=16))
    return pd.DataFrame(rows, columns=["path", "class", "patient", "official_split", "mask"])
