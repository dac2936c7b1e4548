"""Synthetic chest-radiograph DICOMs for tests, demos and smoke runs (no real patient data).

No real radiograph may ship with the project, yet every layer (imaging, CLI, end-to-end runs)
needs DICOM studies with a known view, modality, photometric interpretation, rescale and transfer
syntax. This builds them: a 12-bit "chest" (bright body with a gradient, two darker lung fields,
noise) wrapped in a DX or CR header with a fictitious patient.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)

FAKE_PATIENT_NAME = "Synthetic^Patient^Phantom"
FAKE_PATIENT_ID = "PHANTOM-0001"
_SOP_CLASSES = {"DX": DigitalXRayImageStorageForPresentation, "CR": ComputedRadiographyImageStorage}


def synthetic_chest(rows: int = 256, cols: int = 200, *, seed: int = 0,
                    bits_stored: int = 12) -> np.ndarray:
    """A (rows, cols) uint16 chest-like image in MONOCHROME2 sense (high value = dense).

    Body: a vertical+horizontal gradient; lungs: two darker ellipses; plus Gaussian noise. Values
    span most of ``[0, 2**bits_stored - 1]``.
    """
    rng = np.random.default_rng(seed)
    top = 2**bits_stored - 1
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float64)
    body = 0.55 + 0.25 * (yy / (rows - 1)) - 0.15 * np.abs(xx / (cols - 1) - 0.5)
    for centre_x in (0.3, 0.7):
        lung = ((xx / cols - centre_x) / 0.16) ** 2 + ((yy / rows - 0.45) / 0.3) ** 2 < 1.0
        body[lung] -= 0.35
    body[:, : max(cols // 20, 1)] = 0.02  # collimated border: air
    image = body * top + rng.normal(0.0, 0.01 * top, size=body.shape)
    return np.clip(np.rint(image), 0, top).astype(np.uint16)


def radiograph_dataset(
    pixels: np.ndarray,
    *,
    modality: str = "DX",
    view_position: str | None = "PA",
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    rescale: tuple[float, float] | None = None,
    window: tuple[float, float] | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
) -> FileDataset:
    """Wrap stored pixel values in a minimal, valid DX/CR (or other modality) image header.

    ``rescale`` is (slope, intercept); ``window`` is (center, width). Other modalities get the
    DX SOP class, which is enough to exercise modality checks.
    """
    sop_class = _SOP_CLASSES.get(modality, DigitalXRayImageStorageForPresentation)
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, Dataset(), file_meta=meta, preamble=b"\0" * 128)
    today = datetime.date.today().strftime("%Y%m%d")
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientName = FAKE_PATIENT_NAME
    ds.PatientID = FAKE_PATIENT_ID
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = today
    ds.StudyTime = "120000"
    ds.StudyID = "1"
    ds.AccessionNumber = "ACC-PHANTOM"
    ds.ReferringPhysicianName = ""
    ds.Modality = modality
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.BodyPartExamined = "CHEST"
    if view_position is not None:
        ds.ViewPosition = view_position
    ds.set_pixel_data(pixels, photometric_interpretation=photometric, bits_stored=bits_stored)
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
        ds.RescaleType = "US"
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    return ds


def write_radiograph(path: Path, pixels: np.ndarray | None = None, **header: object) -> Path:
    """Write a synthetic radiograph (default: :func:`synthetic_chest`) as a DICOM file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = radiograph_dataset(synthetic_chest() if pixels is None else pixels, **header)  # type: ignore[arg-type]
    ds.save_as(path, enforce_file_format=True)
    return path
