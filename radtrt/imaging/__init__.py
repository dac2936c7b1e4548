"""Study ingest for LLaVA-Rad: DICOM/PNG/JPEG -> frontal 8-bit image -> model tensor, and SR out.

Modules (one concept each):

* ``study``      -- ``load_study(path)``: file or folder -> ``SelectedImage`` (frontal view choice)
* ``dicom``      -- DICOM reading, validation and the MIMIC-CXR-JPG-like 8-bit pipeline
* ``raster``     -- PNG/JPEG reading
* ``views``      -- projection (PA/AP/lateral) from DICOM headers
* ``pixels``     -- numpy steps: min-max to 8 bit, MONOCHROME1, histogram equalization
* ``preprocess`` -- open_clip eval transform without torchvision (``preprocess``,
  ``PreprocessConfig``)
* ``sr``         -- ``write_sr``: the report as a DICOM Comprehensive SR

The names below are imported lazily so that ``import radtrt.imaging`` does not pull in torch or
highdicom for callers that only need part of it. The ``preprocess`` function is deliberately not
re-exported: its name is also a submodule's, and whichever is imported first would win.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SelectedImage": "radtrt.imaging.study",
    "load_study": "radtrt.imaging.study",
    "PreprocessConfig": "radtrt.imaging.preprocess",
    "write_sr": "radtrt.imaging.sr",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
