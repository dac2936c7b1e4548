"""Radiograph-like phantom images with controllable findings (synthetic; not for clinical use).

A phantom is a density map (0 = air, 1 = metal; bright = dense, i.e. MONOCHROME2 sense) built
from simple shapes: body outline, two lung fields with vascular texture, mediastinum and spine,
heart, hemidiaphragms, ribs and clavicles. Findings are drawn into it:

* cardiomegaly: a wider heart (cardiothoracic ratio about 0.6 instead of 0.45);
* pleural effusion: fluid filling the costophrenic angle with a meniscus rising laterally;
* pneumothorax: a lucent rim without lung markings between the chest wall and a pleural line;
* consolidation: a fuzzy dense patch in an upper or lower zone of one lung;
* nodule: a small sharp round density;
* devices: an endotracheal tube in the trachea and a right internal jugular central line.

Then exposure varies (gain, offset, gamma), quantum noise is added and the result is quantised
to ``bits_stored`` bits. Sizes are fractions of the image so any resolution works; findings are
sized to stay visible at the small model's 112-pixel input. Frontal views are drawn as PA (the
patient's right on the image's left); laterals are a simpler side projection with the same
findings where a lateral shows them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from radtrt.data.vocabulary import CVC, ETT, Findings

AIR, SOFT, LUNG, BONE, FLUID, METAL = 0.04, 0.55, 0.2, 0.78, 0.62, 0.97


@dataclass(frozen=True)
class Geometry:
    """Per-patient anatomy jitter (fractions of the image)."""

    cx: float  # body centre
    lung_top: float
    lung_bottom: float
    lung_half_width: float
    lung_gap: float  # half distance between the lung centres
    heart_y: float
    tilt: float  # small rotation of everything, radians

    @classmethod
    def sample(cls, rng: np.random.Generator) -> "Geometry":
        return cls(cx=0.5 + rng.normal(0, 0.015), lung_top=0.15 + rng.normal(0, 0.015),
                   lung_bottom=0.74 + rng.normal(0, 0.02), lung_half_width=0.145 + rng.normal(0, 0.008),
                   lung_gap=0.185 + rng.normal(0, 0.008), heart_y=0.62 + rng.normal(0, 0.015),
                   tilt=rng.normal(0, 0.02))


def _grid(rows: int, cols: int, geo: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """Normalised (x, y) coordinates, rotated by the patient's tilt about the centre."""
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float64)
    x, y = xx / (cols - 1) - 0.5, yy / (rows - 1) - 0.5
    c, s = np.cos(geo.tilt), np.sin(geo.tilt)
    return c * x - s * y + 0.5, s * x + c * y + 0.5


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale: int) -> np.ndarray:
    """Low-frequency noise in about [-1, 1]: random values on a coarse grid, bilinearly upsampled."""
    rows, cols = shape
    coarse = rng.normal(0, 1, size=(rows // scale + 2, cols // scale + 2))
    yi, xi = np.arange(rows) / scale, np.arange(cols) / scale
    y0, x0 = yi.astype(int), xi.astype(int)
    fy, fx = (yi - y0)[:, None], (xi - x0)[None, :]
    c00, c01 = coarse[y0][:, x0], coarse[y0][:, x0 + 1]
    c10, c11 = coarse[y0 + 1][:, x0], coarse[y0 + 1][:, x0 + 1]
    return (c00 * (1 - fy) * (1 - fx) + c01 * (1 - fy) * fx + c10 * fy * (1 - fx) + c11 * fy * fx) / 1.5


def _soft(inside: np.ndarray, edge: float) -> np.ndarray:
    """Signed-distance-like field -> [0, 1] membership with a soft edge of width ``edge``."""
    return np.clip(0.5 + inside / edge, 0.0, 1.0)


def _line(x: np.ndarray, y: np.ndarray, points: np.ndarray, width: float) -> np.ndarray:
    """Membership of a polyline of (x, y) points with the given width."""
    dist = np.full(x.shape, np.inf)
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
        dx, dy = x1 - x0, y1 - y0
        t = np.clip(((x - x0) * dx + (y - y0) * dy) / (dx * dx + dy * dy), 0, 1)
        dist = np.minimum(dist, np.hypot(x - (x0 + t * dx), y - (y0 + t * dy)))
    return _soft(width / 2 - dist, width / 3)


def _lung_field(x: np.ndarray, y: np.ndarray, geo: Geometry, side: str) -> tuple[np.ndarray, np.ndarray, float]:
    """(signed inside measure, normalised lateral coordinate, centre x) of one lung on a PA image.

    The field narrows towards a rounded apex and ends below in the hemidiaphragm's dome, which is
    highest mid-lung so that the costophrenic angle laterally is deep and sharp.
    """
    centre = geo.cx + (-geo.lung_gap if side == "right" else geo.lung_gap)
    height = geo.lung_bottom - geo.lung_top
    v = (y - geo.lung_top) / height  # 0 at the apex, 1 at the dome
    half_width = geo.lung_half_width * (0.45 + 0.55 * np.sqrt(np.clip(v, 0, 1)))
    u = (x - centre) / half_width  # -1..1 across the lung
    lateral = -u if side == "right" else u  # +1 at the chest wall
    dome = 1.0 - 0.14 * (1 - np.clip(lateral, -1, 1) ** 2)
    inside = np.minimum.reduce([(1 - np.abs(u)) * half_width, v * height - 0.04 * u**2, (dome - v) * height])
    return inside, lateral, centre


def render_frontal(findings: Findings, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """A PA chest phantom as a float density map in [0, 1]."""
    geo = Geometry.sample(rng)
    x, y = _grid(rows, cols, geo)
    img = np.full((rows, cols), AIR)
    body = 1 - ((x - geo.cx) / 0.44) ** 2 - ((y - 0.62) / 0.75) ** 4
    shoulders = np.clip((0.08 - y) / 0.08, 0, 1) * 0.5
    img += (SOFT - AIR) * _soft(body - shoulders, 0.05)
    img += 0.06 * (y - 0.5)  # thicker tissue lower down
    lungs = {}
    texture = _smooth_noise(rng, (rows, cols), max(rows // 40, 2))
    for side in ("right", "left"):
        inside, lateral, centre = _lung_field(x, y, geo, side)
        lungs[side] = (inside, lateral, centre)
        member = _soft(inside, 0.012)
        hilum = np.exp(-(((x - (centre + (0.07 if side == "right" else -0.07))) / 0.06) ** 2
                         + ((y - 0.45) / 0.1) ** 2))
        img -= member * ((SOFT - LUNG) - 0.035 * texture - 0.08 * hilum)
    # mediastinum, spine, heart, abdomen below the domes
    img = np.maximum(img, (SOFT + 0.05) * _soft(0.06 - np.abs(x - geo.cx), 0.015) * (y > 0.03))
    img += 0.05 * _soft(0.025 - np.abs(x - geo.cx), 0.006) * (0.5 + 0.5 * np.cos(y * 90))  # spine through it
    carina = geo.lung_top + 0.17
    trachea = _soft(0.016 - np.abs(x - geo.cx), 0.006) * _soft(carina - y, 0.01)
    img -= 0.12 * trachea  # the air column the tube lies in
    heart_half_width = 0.24 if findings.cardiomegaly else 0.155
    heart_half_width *= 1 + rng.normal(0, 0.04)
    heart = 1 - ((x - (geo.cx + 0.035)) / heart_half_width) ** 2 - ((y - geo.heart_y) / 0.115) ** 2
    img = np.maximum(img, (SOFT + 0.09) * _soft(heart, 0.08))
    _ribs(img, x, y, geo)
    for side, (inside, lateral, centre) in lungs.items():
        if side in findings.effusion:
            _effusion(img, y, inside, lateral, geo, rng)
        if findings.pneumothorax == side:
            _pneumothorax(img, inside, lateral, rng)
    for region, draw in ((findings.consolidation, _consolidation), (findings.nodule, _nodule)):
        if region:
            side, _, zone = region.partition(" ")
            _, _, centre = lungs[side]
            zone = zone or ("upper" if rng.random() < 0.5 else "lower")
            zy = geo.lung_top + (geo.lung_bottom - geo.lung_top) * (0.32 if zone == "upper" else 0.64)
            lateral_shift = 0.035 if side == "left" else -0.035  # away from the mediastinum and heart
            draw(img, x, y, centre + lateral_shift + rng.normal(0, 0.02), zy + rng.normal(0, 0.03), rng)
    if ETT in findings.devices:
        tip = carina - rng.uniform(0.04, 0.08)
        pts = np.array([[geo.cx, -0.05], [geo.cx + rng.normal(0, 0.005), tip]])
        img = np.maximum(img, METAL * _line(x, y, pts, 0.016))
    if CVC in findings.devices:
        pts = np.array([[geo.cx - 0.24, -0.02], [geo.cx - 0.15, 0.1], [geo.cx - 0.075, 0.22],
                        [geo.cx - 0.04, geo.lung_top + rng.uniform(0.2, 0.27)]])
        img = np.maximum(img, METAL * _line(x, y, pts, 0.012))
    return np.clip(img, 0, 1)


def _ribs(img: np.ndarray, x: np.ndarray, y: np.ndarray, geo: Geometry) -> None:
    for side in (-1, 1):
        lateral = (x - geo.cx) * side  # >0 on this side
        on_side = _soft(lateral - 0.03, 0.01) * _soft(0.4 - lateral, 0.02)
        for k in range(9):
            y0 = geo.lung_top - 0.03 + k * 0.068
            curve = y0 + 0.55 * (lateral - 0.18) ** 2 - 0.04
            img += 0.06 * on_side * _soft(0.009 - np.abs(y - curve), 0.006)
        clavicle = 0.12 + 0.3 * (lateral - 0.15) ** 2
        img += 0.1 * on_side * _soft(0.012 - np.abs(y - clavicle), 0.006) * (lateral < 0.3)


def _effusion(img: np.ndarray, y: np.ndarray, inside: np.ndarray, lateral: np.ndarray, geo: Geometry,
              rng: np.random.Generator) -> None:
    height = geo.lung_bottom - geo.lung_top
    level = geo.lung_bottom - height * rng.uniform(0.22, 0.38)
    meniscus = level - 0.07 * np.clip(lateral + 0.2, 0, None) ** 2  # rises towards the chest wall
    fluid = _soft(y - meniscus, 0.02) * _soft(inside + 0.015, 0.01)
    img[:] = img * (1 - fluid) + FLUID * fluid


def _pneumothorax(img: np.ndarray, inside: np.ndarray, lateral: np.ndarray, rng: np.random.Generator) -> None:
    depth = rng.uniform(0.28, 0.4)  # fraction of the lung width that collapsed away from the wall
    rim = _soft(inside, 0.01) * _soft(lateral - (1 - 2 * depth), 0.02)
    img[:] = img * (1 - rim) + (LUNG - 0.12) * rim  # lucent, no markings
    line = _soft(0.012 - np.abs(lateral - (1 - 2 * depth)), 0.01) * _soft(inside, 0.01)
    img[:] = np.maximum(img, (LUNG + 0.2) * line)


def _consolidation(img: np.ndarray, x: np.ndarray, y: np.ndarray, cx: float, cy: float,
                   rng: np.random.Generator) -> None:
    r = rng.uniform(0.07, 0.095)
    patch = np.exp(-(((x - cx) / r) ** 2 + ((y - cy) / (r * 1.2)) ** 2) ** 1.5)
    patch *= 0.75 + 0.25 * _smooth_noise(rng, img.shape, max(img.shape[0] // 30, 2))
    img[:] = img + 0.45 * np.clip(patch, 0, 1)


def _nodule(img: np.ndarray, x: np.ndarray, y: np.ndarray, cx: float, cy: float, rng: np.random.Generator) -> None:
    r = rng.uniform(0.032, 0.045)
    img[:] = np.maximum(img, (SOFT + 0.2) * _soft(r - np.hypot(x - cx, y - cy), 0.006))


def render_lateral(findings: Findings, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """A simpler lateral phantom: anterior on the image's left, spine posterior."""
    geo = Geometry.sample(rng)
    x, y = _grid(rows, cols, geo)
    img = np.full((rows, cols), AIR)
    body = 1 - ((x - 0.5) / 0.42) ** 2 - ((y - 0.6) / 0.72) ** 4
    img += (SOFT - AIR) * _soft(body, 0.05)
    lung = 1 - ((x - 0.52) / 0.3) ** 2 - ((y - 0.45) / 0.3) ** 2
    img -= (SOFT - LUNG) * _soft(lung, 0.05) * (0.85 + 0.1 * _smooth_noise(rng, (rows, cols), max(rows // 40, 2)))
    heart_r = 0.2 if findings.cardiomegaly else 0.14
    heart = 1 - ((x - 0.33) / heart_r) ** 2 - ((y - 0.6) / 0.14) ** 2
    img = np.maximum(img, (SOFT + 0.12) * _soft(heart, 0.08))
    img = np.maximum(img, BONE * 0.85 * _soft(0.05 - np.abs(x - 0.78), 0.01) * (0.6 + 0.1 * np.cos(y * 70)))
    if findings.effusion:
        fluid = _soft(y - (0.7 - 0.06 * (x - 0.5)), 0.02) * _soft(lung, 0.05)
        img = img * (1 - fluid) + FLUID * fluid
    for region in (findings.consolidation, findings.nodule):
        if region:
            cy = 0.35 if region.endswith("upper") else 0.6
            r = 0.07 if region == findings.consolidation else 0.025
            img = np.maximum(img, (SOFT + 0.1) * _soft(r - np.hypot(x - 0.55, y - cy), 0.02))
    if findings.devices:
        img = np.maximum(img, METAL * _line(x, y, np.array([[0.45, -0.05], [0.47, 0.3]]), 0.014))
    return np.clip(img, 0, 1)


def expose(density: np.ndarray, rng: np.random.Generator, bits_stored: int = 12) -> np.ndarray:
    """Detector values: random gain/offset/gamma (exposure), quantum noise, ``bits_stored`` quantisation."""
    top = 2**bits_stored - 1
    gamma = rng.uniform(0.8, 1.25)
    gain, offset = rng.uniform(0.75, 0.95), rng.uniform(0.0, 0.08)
    signal = offset + gain * density**gamma
    signal = signal + rng.normal(0, rng.uniform(0.006, 0.018), size=signal.shape)
    return np.clip(np.rint(signal * top), 0, top).astype(np.uint16)
