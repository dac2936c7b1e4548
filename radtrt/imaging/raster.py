"""PNG and JPEG input: already-rendered pictures, brought to 8-bit grey.

Rules (documented because they decide what the model sees):

* The file type is recognised by its signature bytes, not its extension.
* EXIF orientation is applied (what any viewer shows).
* 8-bit images (grey, RGB, palette, with or without alpha) become grey with PIL's ``convert("L")``
  (BT.601 luma) and are otherwise used as they are: such files are usually display renderings
  like MIMIC-CXR-JPG itself, which is already equalized, so equalizing again would only move
  them away from the training distribution.
* High-bit-depth images (16-bit PNG, PIL modes ``I;16*``/``I``/``F``) are raw detector-like data
  with no display transform: they get the DICOM path's steps (d)-(e), i.e. min..max to 8 bit
  and histogram equalization. No inversion is possible: PNG has no MONOCHROME1 flag.
* A 16-bit colour PNG (RGB, or grey or RGB with alpha) is refused: PIL keeps only the high byte of
  each sample, which made 12-bit detector data an almost black image (0..15) read without a word.
* The view is unknown for these files (``views.UNKNOWN_VIEW``).
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from radtrt.errors import fail
from radtrt.imaging.pixels import MAX_PIXELS, check_aspect, equalize_histogram, min_max_to_uint8

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"
_HIGH_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})


def sniff_raster(head: bytes) -> str | None:
    """Return "PNG" or "JPEG" when the leading bytes carry that signature, else None."""
    if head.startswith(PNG_SIGNATURE):
        return "PNG"
    if head.startswith(JPEG_SIGNATURE):
        return "JPEG"
    return None


@contextlib.contextmanager
def _read_errors(name: str) -> Iterator[None]:
    """What PIL raises for a file that is not a readable image, said in one line naming the file."""
    try:
        yield
    except UnidentifiedImageError:
        fail(f"{name}: not a readable PNG or JPEG image")
    except Image.DecompressionBombError:
        fail(f"{name}: image is implausibly large for a radiograph (decompression bomb guard)")
    except (PermissionError, IsADirectoryError, FileNotFoundError) as exc:
        fail(f"{name}: cannot read file ({exc.strerror or type(exc).__name__})")
    except (OSError, SyntaxError, ValueError):
        fail(f"{name}: image data is truncated or corrupt")


@contextlib.contextmanager
def _opened(path: Path) -> Iterator[Image.Image]:
    """``Image.open`` (lazy: the header only) without PIL's DecompressionBombWarning, which put two lines of
    Python's warning on stderr before radtrt's own refusal: every image PIL warns about (over about 89 M pixels)
    is over MAX_PIXELS and refused by :func:`_check_header`, and PIL refuses those over twice its limit itself."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as opened:
            yield opened


PNG_COLOUR_TYPES = {2: "RGB", 4: "grey with alpha", 6: "RGB with alpha"}


def _check_header(opened: Image.Image, path: Path) -> None:
    name = path.name
    width, height = opened.size
    if width * height > MAX_PIXELS:
        fail(f"{name}: {width} x {height} pixels is implausibly large for a radiograph (decompression bomb guard)")
    check_aspect(name, width, height)
    if getattr(opened, "n_frames", 1) != 1:  # an animated PNG; multi-frame DICOM is refused too
        fail(f"{name}: {opened.n_frames} frames (an animation); a chest radiograph is one image")
    if opened.format == "PNG":
        with path.open("rb") as f:  # IHDR comes first: bit depth at byte 24, colour type at 25
            header = f.read(26)
        if len(header) == 26 and header[24] == 16 and header[25] in PNG_COLOUR_TYPES:
            fail(f"{name}: a 16-bit {PNG_COLOUR_TYPES[header[25]]} PNG, which radtrt cannot read at full depth; "
                 f"save it as 16-bit greyscale (or 8-bit)")


def check_raster_header(path: Path) -> None:
    """Refuse what ``load_raster`` refuses from the file's header alone (no pixels decoded): a set of images is
    screened before minutes of work are spent on it (a lazily read training run failed at its damaged image
    after checkpoints were written). Damaged pixel data is still found only when the image is read."""
    with _read_errors(path.name), _opened(path) as opened:
        _check_header(opened, path)


def load_raster(path: Path) -> np.ndarray:
    """Read a PNG/JPEG as an (H, W) uint8 grey image following the module rules."""
    name = path.name
    with _read_errors(name), _opened(path) as opened:  # the header only, so the checks come before decoding
        _check_header(opened, path)
        opened.load()
        image = ImageOps.exif_transpose(opened)
    if image.mode in _HIGH_BIT_MODES:
        scaled = min_max_to_uint8(np.asarray(image))
        if scaled is None:
            fail(f"{name}: image has no contrast (all pixel values equal)")
        return equalize_histogram(scaled)
    grey = np.asarray(image.convert("L"), dtype=np.uint8)
    if grey.min() == grey.max():
        fail(f"{name}: image has no contrast (all pixel values equal)")
    return np.ascontiguousarray(grey)
