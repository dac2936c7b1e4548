"""Write a phantom data set: DICOM studies (frontal + lateral), PNGs and a JSONL manifest.

Each phantom ``i`` depends only on ``(seed, i)``, so a larger ``n`` extends a set without changing
its first phantoms and two seeds give disjoint train / held-out sets. DICOM headers come from
``imaging.synthetic.radiograph_dataset`` (fictitious patient), varied over DX and CR, both
photometric interpretations, PA and AP frontals, with and without rescale and window. The PNG is
the frontal DICOM passed through radtrt's own DICOM pipeline (``load_dicom_image``), so training
on PNGs sees exactly what inference on the DICOM study sees.

Synthetic images for pipeline testing, calibration and demos; not for clinical use.
"""

from __future__ import annotations

import json
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.uid import generate_uid
from rich.console import Console

from radtrt.data.manifest import write_jsonl
from radtrt.data.phantoms import expose, render_frontal, render_lateral
from radtrt.data.reports import findings_text
from radtrt.data.vocabulary import Findings, sample_findings
from radtrt.errors import fail
from radtrt.outputs import new_dir_built_aside
from radtrt.imaging.dicom import load_dicom_image
from radtrt.imaging.pixels import MAX_ASPECT
from radtrt.imaging.synthetic import radiograph_dataset
from radtrt.progress import make_progress

FORMATS = ("dicom", "png")
MAX_SIDE = 4096  # a 4096 x 4096 phantom already takes ~3 GB and ~40 s to render; larger is a typo
BITS_STORED = 12
INDICATIONS = ["Cough.", "Shortness of breath.", "Fever and cough, evaluate for pneumonia.", "Chest pain.",
               "Preoperative evaluation.", "Follow-up.", "Hypoxia.", "Weakness."]
README = """Synthetic chest-radiograph phantoms made by `radtrt data phantoms`.

Geometric shapes drawn to look roughly like chest radiographs, with known findings. For pipeline
testing, calibration and demos only: NOT radiographs of anyone, NOT for clinical use or for
training models meant for real images. The DICOM headers name a fictitious patient.
manifest.jsonl: one line per phantom {image, findings, indication, labels, ...}.
"""


@dataclass(frozen=True)
class PhantomSpec:
    """Everything that decides one phantom (derived from the seed and index)."""

    index: int
    findings: Findings
    report: str
    indication: str | None
    modality: str
    photometric: str
    frontal_view: str
    rescale: tuple[float, float] | None
    window: tuple[float, float] | None


def phantom_spec(seed: int, index: int) -> PhantomSpec:
    rng = random.Random(f"radtrt-phantom-{seed}-{index}")
    findings = sample_findings(rng)
    report = findings_text(findings, rng)
    indication = rng.choice(INDICATIONS) if rng.random() < 0.5 else None
    modality = rng.choice(["DX", "CR"])
    photometric = rng.choice(["MONOCHROME1", "MONOCHROME2"])
    view = "PA" if rng.random() < 0.8 else "AP"
    rescale = (1.0, float(rng.choice([0, -1024]))) if modality == "CR" else None
    top = 2**BITS_STORED - 1
    offset = rescale[1] if rescale else 0.0
    window = (offset + top / 2, float(top + 1)) if rng.random() < 0.5 else None  # covers the range: no clipping
    return PhantomSpec(index, findings, report, indication, modality, photometric, view, rescale, window)


def _stored(values: np.ndarray, photometric: str) -> np.ndarray:
    """Detector values (bright = dense) as stored for the photometric interpretation."""
    return (2**BITS_STORED - 1 - values).astype(np.uint16) if photometric == "MONOCHROME1" else values


def write_phantom(out: Path, spec: PhantomSpec, *, seed: int, rows: int, cols: int,
                  formats: tuple[str, ...]) -> dict[str, object]:
    """Write one phantom's files and return its manifest row."""
    name = f"phantom-{spec.index:05d}"
    rng = np.random.default_rng([seed, spec.index])
    # the frontal takes the first random draws, so its pixels do not depend on whether a lateral is drawn
    frontal = expose(render_frontal(spec.findings, rows, cols, rng), rng, BITS_STORED)
    header = dict(modality=spec.modality, photometric=spec.photometric, bits_stored=BITS_STORED,
                  rescale=spec.rescale, window=spec.window, study_uid=generate_uid())
    frontal_ds = radiograph_dataset(_stored(frontal, spec.photometric), view_position=spec.frontal_view,
                                    **header)  # type: ignore[arg-type]
    row: dict[str, object] = {"id": name, "findings": spec.report, "indication": spec.indication,
                              "labels": spec.findings.labels(), "phantom": spec.findings.to_dict(),
                              "view": spec.frontal_view, "modality": spec.modality, "photometric": spec.photometric,
                              "synthetic": True, "synthesis": {"mode": "template", "generator": "radtrt.data.reports"}}
    with tempfile.TemporaryDirectory() as tmp:
        study_dir = out / "dicom" / name if "dicom" in formats else Path(tmp)
        study_dir.mkdir(parents=True, exist_ok=True)
        frontal_ds.save_as(study_dir / "frontal.dcm", enforce_file_format=True)
        if "png" in formats:
            png = out / "png" / f"{name}.png"
            png.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(load_dicom_image(study_dir / "frontal.dcm").pixels_u8).save(png)
            row["image"] = f"png/{name}.png"
    if "dicom" in formats:
        lateral = expose(render_lateral(spec.findings, rows, cols, rng), rng, BITS_STORED)
        lateral_ds = radiograph_dataset(_stored(lateral, spec.photometric), view_position="LL",
                                        **header)  # type: ignore[arg-type]
        lateral_ds.InstanceNumber = 2
        lateral_ds.save_as(out / "dicom" / name / "lateral.dcm", enforce_file_format=True)
        row["study"] = f"dicom/{name}"
        row.setdefault("image", f"dicom/{name}")
    return {"image": row.pop("image"), **row}


def write_phantom_set(out: Path, n: int, seed: int, *, rows: int = 288, cols: int = 256,
                      formats: tuple[str, ...] = FORMATS, console: Console | None = None) -> Path:
    """Write ``n`` phantoms into ``out`` and return the manifest path (``out/manifest.jsonl``)."""
    if n < 1:
        fail(f"--n must be at least 1, got {n}")
    if min(rows, cols) < 64:
        fail(f"phantoms need at least 64 x 64 pixels, got {rows} x {cols}")
    if max(rows, cols) > MAX_SIDE:
        fail(f"phantoms are at most {MAX_SIDE} x {MAX_SIDE} pixels, got {rows} x {cols}")
    if max(rows, cols) > MAX_ASPECT * min(rows, cols):  # infer, calibrate and training refuse such an image
        fail(f"phantom sides may differ by at most {MAX_ASPECT}:1 (as a radiograph's), got {rows} x {cols}")
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        fail(f"unknown phantom format(s) {unknown or formats}; choose from {', '.join(FORMATS)}")
    if seed < 0:
        fail(f"--seed must be at least 0, got {seed}")
    if (out / "manifest.jsonl").exists():
        fail(f"{out} already holds a phantom set (manifest.jsonl); choose another -o")
    # a new or empty folder, filled aside: a full disk or an interrupt never leaves half a set under the name,
    # and no file of the user's is ever overwritten
    with new_dir_built_aside(out, "phantom folder") as work:
        try:
            _fill(work, n, seed, rows, cols, formats, console)
        except OSError as e:  # a full disk: one line (the folder built aside is removed)
            # pydicom re-raises a write error without its errno, its text a whole traceback: the cause's is kept
            cause: BaseException = e
            while cause.__cause__ is not None and not getattr(cause, "errno", None):  # a nested tag wraps twice
                cause = cause.__cause__
            why = getattr(cause, "strerror", None) or (str(cause).splitlines() or [type(cause).__name__])[0]
            fail(f"cannot write the phantoms into {out}: {why}")
    return out / "manifest.jsonl"


def _fill(work: Path, n: int, seed: int, rows: int, cols: int, formats: tuple[str, ...],
          console: Console | None) -> None:
    (work / "README.txt").write_text(README)
    rows_out = []
    with make_progress(console=console or Console(stderr=True), transient=True) as progress:
        task = progress.add_task("writing phantoms", total=n)
        for i in range(n):
            rows_out.append(write_phantom(work, phantom_spec(seed, i), seed=seed, rows=rows, cols=cols, formats=formats))
            progress.advance(task)
    (work / "phantoms.json").write_text(json.dumps({"n": n, "seed": seed, "rows": rows, "cols": cols,
                                                    "formats": list(formats), "synthetic": True}, indent=2))
    write_jsonl(work / "manifest.jsonl", rows_out)
