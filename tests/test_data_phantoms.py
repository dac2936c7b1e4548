"""Phantom images and data sets: findings change the right pixels, files are valid, sets reproducible."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import typer
from typer.testing import CliRunner

from radtrt.data.cli import register
from radtrt.data.manifest import read_manifest
from radtrt.data.phantom_set import phantom_spec, write_phantom_set
from radtrt.data.phantoms import expose, render_frontal
from radtrt.data.vocabulary import CVC, ETT, Findings
from radtrt.errors import RadtrtError
from radtrt.imaging.study import load_study

ROWS, COLS = 144, 128


def _render(findings: Findings, seed: int = 5) -> np.ndarray:
    return render_frontal(findings, 288, 256, np.random.default_rng(seed))


def _box(img: np.ndarray, x0: float, x1: float, y0: float, y1: float) -> float:
    rows, cols = img.shape
    return float(img[int(y0 * rows):int(y1 * rows), int(x0 * cols):int(x1 * cols)].mean())


@pytest.mark.parametrize("findings, box", [
    (Findings(cardiomegaly=True), (0.66, 0.76, 0.58, 0.66)),  # heart border, patient's left = image right
    (Findings(effusion=("left",)), (0.72, 0.82, 0.62, 0.70)),  # image right lung base
    (Findings(effusion=("right",)), (0.18, 0.28, 0.62, 0.70)),  # image left lung base
    (Findings(consolidation="right upper"), (0.26, 0.36, 0.33, 0.43)),
    (Findings(devices=(ETT,)), (0.48, 0.52, 0.05, 0.25)),  # tube in the trachea
])
def test_findings_make_their_region_denser(findings: Findings, box: tuple[float, float, float, float]) -> None:
    assert _box(_render(findings), *box) > _box(_render(Findings()), *box) + 0.03


def test_pneumothorax_makes_lateral_lung_lucent() -> None:
    box = (0.12, 0.18, 0.35, 0.55)  # patient's right chest wall side of the right lung
    assert _box(_render(Findings(pneumothorax="right")), *box) < _box(_render(Findings()), *box) - 0.03
    assert abs(_box(_render(Findings(pneumothorax="right")), 0.82, 0.88, 0.35, 0.55)
               - _box(_render(Findings()), 0.82, 0.88, 0.35, 0.55)) < 1e-9  # the other side is untouched


def test_expose_is_12_bit_and_varies() -> None:
    density = _render(Findings(devices=(CVC,)))
    a, b = expose(density, np.random.default_rng(0)), expose(density, np.random.default_rng(1))
    assert a.dtype == np.uint16 and a.max() <= 4095 and a.max() > 3000
    assert not np.array_equal(a, b)


@pytest.fixture(scope="module")
def phantom_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_phantom_set(tmp_path_factory.mktemp("phantoms") / "set", 10, seed=3, rows=ROWS, cols=COLS)


def test_phantom_set_files_and_manifest(phantom_set: Path) -> None:
    root = phantom_set.parent
    rows = read_manifest(phantom_set)
    assert len(rows) == 10
    assert "not for clinical use" in (root / "README.txt").read_text().lower()
    headers = set()
    for row in rows:
        assert row.labels == tuple(Findings.from_dict(row.extra["phantom"]).labels())
        assert row.extra["synthetic"] is True and row.extra["synthesis"]["mode"] == "template"
        study = root / row.extra["study"]
        frontal, lateral = (pydicom.dcmread(study / n) for n in ("frontal.dcm", "lateral.dcm"))
        assert frontal.BitsStored == 12 and frontal.StudyInstanceUID == lateral.StudyInstanceUID
        assert frontal.ViewPosition in ("PA", "AP") and lateral.ViewPosition == "LL"
        headers.add((frontal.Modality, frontal.PhotometricInterpretation))
        # the folder gives the frontal view, and the PNG is exactly what the DICOM pipeline makes of it
        chosen = load_study(study)
        assert chosen.source_file.name == "frontal.dcm"
        assert np.array_equal(chosen.pixels_u8, load_study(row.image_path(root)).pixels_u8)
    assert {m for m, _ in headers} == {"DX", "CR"} and {p for _, p in headers} == {"MONOCHROME1", "MONOCHROME2"}


def test_phantoms_depend_only_on_seed_and_index(phantom_set: Path, tmp_path: Path) -> None:
    small = write_phantom_set(tmp_path / "small", 3, seed=3, rows=ROWS, cols=COLS, formats=("png",))
    first = read_manifest(phantom_set)[:3]
    for a, b in zip(first, read_manifest(small)):
        assert (a.findings, a.labels, a.indication) == (b.findings, b.labels, b.indication)
        assert (phantom_set.parent / a.image).read_bytes() == (small.parent / b.image).read_bytes()
    assert phantom_spec(4, 0) != phantom_spec(3, 0)
    assert not (small.parent / "dicom").exists()
    with pytest.raises(RadtrtError, match="already holds"):
        write_phantom_set(tmp_path / "small", 3, seed=3)


def test_cli_phantoms(tmp_path: Path) -> None:
    app = typer.Typer()
    app.callback()(lambda: None)
    register(app)
    runner = CliRunner()
    result = runner.invoke(app, ["data", "phantoms", "-o", str(tmp_path / "p"), "--n", "2", "--rows", "96",
                                 "--cols", "96", "--formats", "png"])
    assert result.exit_code == 0, result.stderr
    manifest = Path(result.stdout.strip())
    assert len(manifest.read_text().splitlines()) == 2 and json.loads(manifest.read_text().splitlines()[0])["image"]
    bad = runner.invoke(app, ["data", "phantoms", "-o", str(tmp_path / "q"), "--formats", "jpeg"])
    assert bad.exit_code == 2 and "unknown phantom format" in bad.stderr and "Traceback" not in bad.stderr
    empty = runner.invoke(app, ["data", "phantoms", "-o", str(tmp_path / "q"), "--formats", ","])  # said as "()"
    assert empty.exit_code == 2 and "--formats ',' names no format; give dicom, png or both" in empty.stderr


def test_cli_phantoms_refuses_bad_output_and_sizes(tmp_path: Path) -> None:
    app = typer.Typer()
    app.callback()(lambda: None)
    register(app)
    runner = CliRunner()
    (tmp_path / "f").write_text("x")
    for args, message in ((["-o", str(tmp_path / "f")], "is not a folder"),
                          (["-o", str(tmp_path / "f" / "sub")], "is not a folder"),
                          (["-o", str(tmp_path / "big"), "--rows", "100000", "--cols", "100000"], "at most 4096"),
                          # accepted, then refused by every command that reads it
                          (["-o", str(tmp_path / "big"), "--rows", "64", "--cols", "4096"], "at most 4:1")):
        result = runner.invoke(app, ["data", "phantoms", "--n", "1", *args])
        assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "big").exists()


def test_a_users_readme_is_never_overwritten(tmp_path: Path) -> None:
    from radtrt.errors import RadtrtError

    (tmp_path / "README.txt").write_text("my notes")
    with pytest.raises(RadtrtError, match="is not empty"):
        write_phantom_set(tmp_path, 1, 0, rows=64, cols=64, formats=("png",))
    assert (tmp_path / "README.txt").read_text() == "my notes"
    # nor a user's image (png/phantom-00000.png was overwritten), nor a file in the way of a subfolder
    (tmp_path / "b" / "png").mkdir(parents=True)
    (tmp_path / "b" / "png" / "phantom-00000.png").write_text("mine")
    with pytest.raises(RadtrtError, match="is not empty"):
        write_phantom_set(tmp_path / "b", 1, 0, rows=64, cols=64, formats=("png",))
    assert (tmp_path / "b" / "png" / "phantom-00000.png").read_text() == "mine"
    with pytest.raises(RadtrtError, match="--seed must be at least 0"):  # a ValueError traceback, after README.txt
        write_phantom_set(tmp_path / "c", 1, -1, rows=64, cols=64, formats=("png",))
    assert not (tmp_path / "c").exists()


def test_an_interrupted_set_leaves_nothing_under_its_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from radtrt.data import phantom_set

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(phantom_set, "write_jsonl", disk_full)
    with pytest.raises(RadtrtError, match="cannot write the phantoms .*No space left"):
        write_phantom_set(tmp_path / "p", 2, 0, rows=64, cols=64, formats=("png",))
    assert not (tmp_path / "p").exists() and not (tmp_path / "p.partial").exists()
