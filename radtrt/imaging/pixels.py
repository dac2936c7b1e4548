"""Pure-numpy pixel steps shared by the DICOM and PNG/JPEG readers.

Kept apart from any file format so that each step can be tested on plain arrays and so that the
DICOM and raster paths provably end in the same 8-bit distribution (the one LLaVA-Rad was trained
on: MIMIC-CXR-JPG, i.e. min-max to 8 bit, bright = dense, then histogram equalization).
"""

from __future__ import annotations

import numpy as np

from radtrt.errors import fail

# Pixels one image may declare: the largest chest detectors are about 4300 x 4300 (18.5 M); a few compressed
# bytes (DICOM RLE, PNG) can declare far more, and decoding needs about 25 bytes a pixel on the way to 8 bit.
MAX_PIXELS = 50_000_000
MAX_ASPECT = 4  # long side over short side; chest radiographs are near 1.2:1, long-length stitched ones 3:1


def check_aspect(name: str, cols: int, rows: int) -> None:
    """Refuse a strip: the transform scales the short side to the model's size, so a 1 x 20000 strip would
    become 518 x 10 million. Both readers call it on the header, so a set of images is screened for it before
    any model loads (PNG/JPEG were refused only once decoded: a lazily read training run, mid-run)."""
    if max(rows, cols) > MAX_ASPECT * min(rows, cols):
        fail(f"{name}: a {cols} x {rows} image is not a chest radiograph (sides differ by more than {MAX_ASPECT}:1)")

# ITU-R BT.601 luma weights: the same weights PIL uses for RGB -> "L", so an RGB DICOM and the
# same picture saved as an RGB PNG become the same grey image (up to PIL's integer rounding).
_LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float64)


def rgb_to_grey(rgb: np.ndarray) -> np.ndarray:
    """Collapse an (H, W, 3) colour image to float64 grey with BT.601 luma.

    Colour radiographs only exist as secondary captures (photos or screenshots of a film or
    monitor); the grey content is all the model can use, and luma is what a viewer would show.
    """
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) array, got shape {rgb.shape}")
    return rgb.astype(np.float64) @ _LUMA_WEIGHTS


def min_max_to_uint8(values: np.ndarray, *, invert: bool = False) -> np.ndarray | None:
    """Map the image's own [min, max] linearly onto [0, 255] (round half to even).

    Returns None for an image with no contrast (all values equal, or non-finite), which callers
    turn into a user-facing error: such an image carries nothing to report on.

    `invert` implements MONOCHROME1 (high value = dark): values are mirrored inside [min, max]
    *before* scaling, as ``(min + max) - v``. Done this way the arithmetic stays on exact
    integers for integer input, so a MONOCHROME1 image and its MONOCHROME2 twin give bit-identical
    output, rather than differing by one grey level where a half-way value rounds differently.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0 or not np.all(np.isfinite(v)):
        return None
    lo = float(v.min())
    hi = float(v.max())
    if hi <= lo:
        return None
    if invert:
        v = (lo + hi) - v
    scaled = np.rint((v - lo) * (255.0 / (hi - lo)))
    return np.clip(scaled, 0, 255).astype(np.uint8)


def equalize_histogram(image: np.ndarray) -> np.ndarray:
    """Histogram-equalize an 8-bit grey image exactly as PIL's ``ImageOps.equalize`` does.

    MIMIC-CXR-JPG (the training distribution) was histogram-equalized after conversion to 8 bit.
    We follow PIL's integer algorithm rather than a floating-point CDF (skimage) because it is
    exactly reproducible, needs no extra dependency and can be checked bit-for-bit against PIL
    in the tests:

    * ``h`` = 256-bin histogram; if fewer than two grey levels are used, identity;
    * ``step = (N - count of the highest used level) // 255``; if 0, identity;
    * ``lut[i] = (step // 2 + sum(h[:i])) // step``, clipped to 255.
    """
    if image.dtype != np.uint8 or image.ndim != 2:
        raise ValueError(f"expected an (H, W) uint8 array, got {image.dtype} {image.shape}")
    hist = np.bincount(image.ravel(), minlength=256).astype(np.int64)
    used = hist[hist > 0]
    if used.size <= 1:
        return image.copy()
    step = (int(used.sum()) - int(used[-1])) // 255
    if step == 0:
        return image.copy()
    before = np.concatenate(([0], np.cumsum(hist)[:-1]))
    lut = np.minimum((step // 2 + before) // step, 255).astype(np.uint8)
    return lut[image]
