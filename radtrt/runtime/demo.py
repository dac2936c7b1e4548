"""First-run demo material: a tiny random-weight model and a synthetic frontal radiograph.

Until the embedded default model exists this shows the pipeline end to end on any machine; the
report is meaningless by construction and the CLI says so.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from radtrt.model.loading import LoadedModel, save_toolkit
from radtrt.model.tiny import random_model, train_tiny_tokenizer

DIGITAL_XRAY_SOP = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation


def synthetic_chest(rows: int = 320, cols: int = 280, seed: int = 0) -> np.ndarray:
    """A 12-bit chest-like image: bright body, two darker lung fields, a heart shadow, noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
    img = 2600.0 - 800.0 * ((x - cols / 2) / (cols / 2)) ** 2
    for cx in (0.32, 0.68):
        lung = ((x - cx * cols) / (0.17 * cols)) ** 2 + ((y - 0.45 * rows) / (0.3 * rows)) ** 2 < 1
        img[lung] -= 1400.0
    heart = ((x - 0.55 * cols) / (0.13 * cols)) ** 2 + ((y - 0.6 * rows) / (0.14 * rows)) ** 2 < 1
    img[heart] += 900.0
    img += rng.normal(0, 40, img.shape)
    return np.clip(img, 0, 4095).astype(np.uint16)


def write_synthetic_dicom(path: Path, pixels: np.ndarray, *, view: str = "PA", modality: str = "DX") -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DIGITAL_XRAY_SOP
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = DIGITAL_XRAY_SOP, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID = "SYNTHETIC^PHANTOM", "SYNTHETIC"
    ds.Modality, ds.ViewPosition, ds.BodyPartExamined = modality, view, "CHEST"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def make_demo(out: Path, seed: int = 0) -> tuple[Path, Path]:
    """(model dir, study file), reusing what an earlier demo run left in ``out``."""
    model_dir = out / "tiny-random-model"
    if not (model_dir / "config.json").is_file():
        tokenizer = train_tiny_tokenizer()
        save_toolkit(LoadedModel(random_model(seed=seed), tokenizer, "tiny-random-demo",
                                 {"layout": "random", "seed": seed}), model_dir)
    study = out / "synthetic-study" / "frontal_pa.dcm"
    if not study.is_file():
        write_synthetic_dicom(study, synthetic_chest(seed=seed))
    return model_dir, study
