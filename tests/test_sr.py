"""DICOM SR writer: read back with pydicom, references, flags, anonymous PNG case, atomicity."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import ComprehensiveSRStorage

from radtrt import outputs as outputs_module
from radtrt.errors import RadtrtError
from radtrt.imaging import sr as sr_module
from radtrt.imaging.sr import DISCLAIMER, write_sr
from radtrt.imaging.study import SelectedImage, load_study
from radtrt.imaging.synthetic import FAKE_PATIENT_ID, FAKE_PATIENT_NAME, write_radiograph

REPORT = "Heart size is normal. No focal consolidation, effusion or pneumothorax. 5 mm – stable."


def _items(ds: Dataset) -> list[Dataset]:
    """All content items of the SR tree, depth first."""
    found = []
    for item in ds.get("ContentSequence", []):
        found.append(item)
        found.extend(_items(item))
    return found


def _text(items: list[Dataset], meaning: str) -> list[str]:
    return [i.TextValue for i in items
            if i.ValueType == "TEXT" and i.ConceptNameCodeSequence[0].CodeMeaning == meaning]


@pytest.fixture()
def dicom_source(tmp_path: Path) -> SelectedImage:
    return load_study(write_radiograph(tmp_path / "in" / "pa.dcm", view_position="PA"))


def test_sr_reads_back_with_text_flags_and_references(tmp_path: Path,
                                                      dicom_source: SelectedImage) -> None:
    out = write_sr(REPORT, dicom_source, tmp_path / "out", model_name="LLaVA-Rad",
                   model_version="1.0-test")
    assert out.parent == tmp_path / "out" and out.suffix == ".dcm"
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temp file left behind
    sr = pydicom.dcmread(out)
    src = dicom_source.dataset
    assert sr.SOPClassUID == ComprehensiveSRStorage and sr.Modality == "SR"
    assert sr.StudyInstanceUID == src.StudyInstanceUID
    assert sr.SeriesInstanceUID != src.SeriesInstanceUID
    assert sr.VerificationFlag == "UNVERIFIED" and sr.CompletionFlag == "COMPLETE"
    assert sr.PatientName == FAKE_PATIENT_NAME and sr.PatientID == FAKE_PATIENT_ID
    assert sr.Manufacturer == "radtrt" and sr.ManufacturerModelName == "LLaVA-Rad"
    assert "1.0-test" in list(sr.SoftwareVersions)
    assert "research use only" in sr.SeriesDescription.lower()

    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == src.StudyInstanceUID
    series = evidence.ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == src.SeriesInstanceUID
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID

    items = _items(sr)
    assert _text(items, "Finding") == [REPORT]  # non-ASCII survives (UTF-8)
    assert _text(items, "Comment") == [DISCLAIMER]
    assert _text(items, "Algorithm Name") == ["LLaVA-Rad"]
    assert _text(items, "Algorithm Version") == ["1.0-test"]
    images = [i for i in items if i.ValueType == "IMAGE"]
    assert len(images) == 1
    assert images[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert images[0].RelationshipType == "INFERRED FROM"


@pytest.mark.parametrize("name, version", [("llava-rad-merged-finetuned-on-mimic-cxr-and-chexpert-2026-11-29-run3", "v"),
                                           ("llava\\rad", "v"), ("m", "w" * 70)])
def test_a_model_name_longer_than_a_long_string_still_gets_its_sr(tmp_path: Path, dicom_source: SelectedImage,
                                                                 name: str, version: str) -> None:
    """A 68-character model folder name (or a backslash) went whole into the 64-character LO fields: highdicom's
    ValueError stopped every study's SR, said as "its DICOM header cannot be carried into an SR"."""
    sr = pydicom.dcmread(write_sr(REPORT, dicom_source, tmp_path / "out", model_name=name, model_version=version))
    lo = [sr.ManufacturerModelName, *sr.SoftwareVersions]
    lo += [item.DeviceObserverName for item in _items(sr) if "DeviceObserverName" in item]
    assert lo and all(len(value) <= 64 and "\\" not in value for value in lo)
    assert _text(_items(sr), "Algorithm Name") == [name] and _text(_items(sr), "Algorithm Version") == [version]


def test_sr_for_png_input_is_a_new_anonymous_study(tmp_path: Path) -> None:
    grey = np.random.default_rng(0).integers(0, 256, (64, 48)).astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "cxr.png")
    source = load_study(tmp_path / "cxr.png")
    out = write_sr(REPORT, source, tmp_path / "out", model_name="m", model_version="v")
    sr = pydicom.dcmread(out)
    assert sr.PatientName.family_name == "ANONYMOUS" and sr.PatientID == ""
    assert pydicom.uid.UID(sr.StudyInstanceUID).is_valid
    assert "CurrentRequestedProcedureEvidenceSequence" not in sr
    assert not [i for i in _items(sr) if i.ValueType == "IMAGE"]
    assert _text(_items(sr), "Finding") == [REPORT]
    assert sr.VerificationFlag == "UNVERIFIED"


def test_each_run_writes_a_new_file(tmp_path: Path, dicom_source: SelectedImage) -> None:
    first = write_sr(REPORT, dicom_source, tmp_path, model_name="m", model_version="v")
    second = write_sr(REPORT, dicom_source, tmp_path, model_name="m", model_version="v")
    assert first != second and first.exists() and second.exists()
    assert {p.stat().st_mode & 0o777 for p in (first, second)} == {0o600}  # patient data: the owner's only
    assert FAKE_PATIENT_ID not in first.name and "Synthetic" not in first.name


def test_interrupted_write_leaves_nothing(tmp_path: Path, dicom_source: SelectedImage,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(outputs_module.os, "fsync", crash)  # after the bytes were written
    with pytest.raises(RadtrtError, match=f"cannot write an SR into folder {tmp_path / 'out'}: disk full"):  # one line, not a traceback
        write_sr(REPORT, dicom_source, tmp_path / "out", model_name="m", model_version="v")
    assert list((tmp_path / "out").iterdir()) == []


def test_a_killed_writers_half_sr_is_removed_and_a_live_ones_kept(tmp_path: Path) -> None:
    """A run killed while writing an SR (kill -9, a power cut) left a hidden '.SR_<uid>.dcm.XXXXXXXX.partial' holding
    the patient's data for good: nothing removed it, as its name never comes back. A live writer holds a lock on
    its file, so only a dead one's goes."""
    import os
    import signal
    import subprocess
    import sys

    from radtrt.imaging.sr import remove_unfinished_srs

    writer = ("import sys, time; from pathlib import Path; from radtrt.outputs import replaced_atomically\n"
              "with replaced_atomically(Path(sys.argv[1]), 0o600, held=True) as tmp:\n"
              "    tmp.write_text('patient data'); print(tmp.name, flush=True); time.sleep(60)\n")
    procs = [subprocess.Popen([sys.executable, "-c", writer, str(tmp_path / f"SR_1.2.{i}.dcm")],
                              stdout=subprocess.PIPE, text=True) for i in (1, 2)]
    try:
        names = [p.stdout.readline().strip() for p in procs if p.stdout is not None]
        assert all(re.fullmatch(r"\.SR_1\.2\.\d\.dcm\.[a-z0-9_]{8}\.partial", n) for n in names), names
        (tmp_path / ".notes.txt.abcd1234.partial").write_text("the user's")  # not an SR's: never touched
        assert remove_unfinished_srs(tmp_path) == 0  # both being written
        os.kill(procs[0].pid, signal.SIGKILL)
        procs[0].wait()
        assert remove_unfinished_srs(tmp_path) == 1
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".notes.txt.abcd1234.partial", names[1]])
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_an_sr_being_written_survives_another_runs_sweep(tmp_path: Path, dicom_source: SelectedImage,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Another infer into the same --sr-out, starting while this one writes, must not take its SR for a leftover."""
    from radtrt.imaging.sr import remove_unfinished_srs

    swept: list[int] = []
    real_settle = outputs_module._settle

    def sweep_then_settle(tmp: Path, mode: int | None) -> None:  # the written file, before its rename
        swept.append(remove_unfinished_srs(tmp.parent))
        real_settle(tmp, mode)

    monkeypatch.setattr(outputs_module, "_settle", sweep_then_settle)
    written = write_sr(REPORT, dicom_source, tmp_path, model_name="m", model_version="v")
    assert swept == [0] and pydicom.dcmread(written).Modality == "SR"


def test_a_sop_class_highdicom_does_not_know_is_one_line(tmp_path: Path) -> None:
    """A vendor's private SOP class: highdicom's KeyError was a traceback that lost every later study."""
    source = write_radiograph(tmp_path / "in" / "pa.dcm", view_position="PA")
    ds = pydicom.dcmread(source)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.3.46.670589.2.99.1"
    ds.save_as(source, enforce_file_format=True)
    with pytest.raises(RadtrtError, match="cannot be carried into an SR \\(its SOP class is one highdicom cannot reference"):
        write_sr(REPORT, load_study(source), tmp_path / "out", model_name="m", model_version="1")


def test_header_warnings_never_quote_the_patient(tmp_path: Path) -> None:
    """highdicom warned about a one-component name by quoting it on stderr ("DOE JOHN" is unlikely ...)."""
    source = write_radiograph(tmp_path / "in" / "pa.dcm", view_position="PA")
    ds = pydicom.dcmread(source)
    ds.PatientName, ds.ReferringPhysicianName = "DOE JOHN", "SMITH ANNA"
    ds.save_as(source, enforce_file_format=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        written = write_sr(REPORT, load_study(source), tmp_path / "out", model_name="m", model_version="1")
    assert not [w for w in caught if "DOE" in str(w.message) or "SMITH" in str(w.message)]
    assert pydicom.dcmread(written).PatientName == "DOE JOHN"  # still the same patient's document


def test_empty_report_is_refused(tmp_path: Path, dicom_source: SelectedImage) -> None:
    with pytest.raises(RadtrtError, match="^the model generated no findings text for it; no DICOM SR written \\(an empty report is not filed\\)$"):
        write_sr("  \n", dicom_source, tmp_path, model_name="m", model_version="v")
    assert list(tmp_path.glob("*.dcm")) == []


@pytest.mark.parametrize("keyword, value", [("PatientBirthDate", "1980-01-02"), ("StudyDate", "2020/01/02"),
                                            ("StudyTime", "12:30:00"), ("PatientSex", "Male")])
def test_non_conformant_patient_and_study_values_are_left_empty(tmp_path: Path, keyword: str, value: str) -> None:
    """highdicom refused these with a ValueError quoting the value (a birth date in a traceback); Type 2
    allows them empty, and everything else is still copied."""
    source = write_radiograph(tmp_path / "in" / "pa.dcm", view_position="PA")
    ds = pydicom.dcmread(source)
    setattr(ds, keyword, value)
    ds.save_as(source, enforce_file_format=True)
    sr = pydicom.dcmread(write_sr(REPORT, load_study(source), tmp_path / "out", model_name="m", model_version="1"))
    assert getattr(sr, keyword) == "" and sr.PatientID == FAKE_PATIENT_ID
    assert sr.StudyInstanceUID == ds.StudyInstanceUID


def test_a_header_highdicom_refuses_is_one_line_without_its_values(tmp_path: Path, dicom_source: SelectedImage,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise ValueError(f"Unable to convert '{FAKE_PATIENT_NAME}'")

    monkeypatch.setattr(sr_module.hd.sr, "ComprehensiveSR", refuse)
    with pytest.raises(RadtrtError, match="pa.dcm: its DICOM header cannot be carried into an SR") as info:
        write_sr(REPORT, dicom_source, tmp_path / "out", model_name="m", model_version="1")
    assert FAKE_PATIENT_NAME not in str(info.value) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("keyword, value", [("StudyInstanceUID", "1.2.3.abc.4"), ("SOPInstanceUID", "abc")])
def test_a_source_uid_that_is_not_one_gives_no_sr(tmp_path: Path, keyword: str, value: str) -> None:
    """It was copied into the SR, which was then not valid DICOM."""
    source = write_radiograph(tmp_path / "in" / "pa.dcm", view_position="PA")
    ds = pydicom.dcmread(source)
    setattr(ds, keyword, value)
    ds.save_as(source, enforce_file_format=True)
    with pytest.raises(RadtrtError, match=f"pa.dcm: its {keyword} is not a DICOM UID; no SR written"):
        write_sr(REPORT, load_study(source), tmp_path / "out", model_name="m", model_version="1")
    assert not (tmp_path / "out").exists()


def test_a_patient_name_its_character_set_cannot_decode_gives_no_sr(tmp_path: Path) -> None:
    """pydicom decoded it with a replacement character (its warning silenced), and the SR was filed under a
    patient name that differs from the source's."""
    source = write_radiograph(tmp_path / "in" / "pa.dcm", view_position="PA")
    ds = pydicom.dcmread(source)
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "SECRETX^NAME"
    ds.save_as(source, enforce_file_format=True)
    raw = source.read_bytes()
    source.write_bytes(raw.replace(b"SECRETX^NAME", b"SECRET\xff^NAME"))  # not UTF-8
    with pytest.raises(RadtrtError, match=r"^pa.dcm: its PatientName cannot be decoded in its character set "
                                          r"\(ISO_IR 192\); no SR written \(its report stands") as info:
        write_sr(REPORT, load_study(source), tmp_path / "out", model_name="m", model_version="1")
    assert "SECRET" not in str(info.value) and not (tmp_path / "out").exists()
    ds = pydicom.dcmread(source)
    ds.SpecificCharacterSet = ["ISO_IR 192", "DOE^JOHN"]  # a hand-made header: only defined terms are shown
    ds.save_as(source, enforce_file_format=True)
    with pytest.raises(RadtrtError, match=r"character set \(ISO_IR 192\\\[not a DICOM defined "
                                          r"term\]\)") as info:
        write_sr(REPORT, load_study(source), tmp_path / "out", model_name="m", model_version="1")
    assert "DOE" not in str(info.value)


def _source_named(tmp_path: Path, charset: str | list[str] | None, name: bytes,
                  keyword: str = "PatientName") -> Path:
    """A radiograph whose ``keyword`` holds exactly ``name``'s bytes under the declared character set."""
    source = write_radiograph(tmp_path / "in" / "pa.dcm", view_position="PA")
    ds = pydicom.dcmread(source)
    if charset is not None:
        ds.SpecificCharacterSet = charset
    placeholder = "Q" * len(name)  # same length: the element's length field stays right
    setattr(ds, keyword, placeholder)
    ds.save_as(source, enforce_file_format=True)
    raw = source.read_bytes()
    assert raw.count(placeholder.encode()) == 1
    source.write_bytes(raw.replace(placeholder.encode(), name))
    return source


_JIS_NAME = b"Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B"


@pytest.mark.parametrize("charset, name, shown", [
    (None, "Müller^Jürgen".encode(), "ISO_IR 6, none given"),  # UTF-8 bytes, ASCII declared: was 'MÃ¼ller'
    ("ISO_IR 6", "Müller^Hans".encode("latin-1"), "ISO_IR 6"),
    ("ISO_IR 999", "Müller^Hans".encode("latin-1"), "[not a DICOM defined term]"),  # Latin-1 guess
    (["", "ISO 2022 IR 87"], b"\x1b$B\xff\xfe\x1b(B^X", "\\ISO 2022 IR 87"),  # not JIS X 0208: taken as Latin-1
    (["", "ISO 2022 IR 87"], "Müller^Hans".encode("latin-1"), "\\ISO 2022 IR 87"),  # 8 bits in the ASCII part
    # GB2312 (the standard's own example): pydicom left its escape sequence in the name, with exit 0
    (["", "ISO 2022 IR 58"], b"Wang^XiaoDong=\x1b$)A\xcd\xf5^\xd0\xa1\xb6\xab=", "\\ISO 2022 IR 58"),
])
def test_a_name_its_character_set_does_not_define_gives_no_sr(tmp_path: Path, charset: str | list[str] | None,
                                                               name: bytes, shown: str) -> None:
    """pydicom decoded these without a replacement character (a Latin-1 guess), so the SR, in UTF-8, was written
    under another patient name ('MÃ¼ller') and the study passed."""
    source = _source_named(tmp_path, charset, name)
    with pytest.raises(RadtrtError, match=rf"^pa.dcm: its PatientName cannot be decoded in its character set "
                                          rf"\({re.escape(shown)}\); no SR written \(its report stands") as info:
        write_sr(REPORT, load_study(source), tmp_path / "out", model_name="m", model_version="1")
    assert "ller" not in str(info.value) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("charset, name, expected", [
    ("ISO_IR 100", "Müller^Hans".encode("latin-1"), "Müller^Hans"),
    ("ISO_IR 192", "Müller^Jürgen".encode(), "Müller^Jürgen"),
    ("ISO 2022 IR 87", _JIS_NAME, "Yamada^Tarou=山田^太郎"),
    (["", "ISO 2022 IR 87"], _JIS_NAME, "Yamada^Tarou=山田^太郎"),
    ("ISO_IR 999", b"Mueller^Hans", "Mueller^Hans"),  # ASCII reads the same whatever the term
    (None, b"Mueller^Hans", "Mueller^Hans"),
    # misspellings pydicom itself corrects, seen in real headers: they were refused as undefined terms
    ("ISO IR 100", "Müller^Hans".encode("latin-1"), "Müller^Hans"),
    ("ISO-IR 100", "Müller^Hans".encode("latin-1"), "Müller^Hans"),
    (["", "ISO-2022-IR-87"], _JIS_NAME, "Yamada^Tarou=山田^太郎"),
])
def test_a_name_its_character_set_defines_is_carried_into_the_sr(tmp_path: Path, charset: str | list[str] | None,
                                                                 name: bytes, expected: str) -> None:
    source = _source_named(tmp_path, charset, name)
    sr = pydicom.dcmread(write_sr(REPORT, load_study(source), tmp_path / "out", model_name="m", model_version="1"))
    assert str(sr.PatientName) == expected and sr.SpecificCharacterSet == "ISO_IR 192"


def test_undecodable_bytes_in_a_value_the_sr_does_not_copy_are_no_refusal(tmp_path: Path) -> None:
    """The SR's Manufacturer is radtrt's own: the source's (not UTF-8 under ISO_IR 192 here) is not carried."""
    source = _source_named(tmp_path, "ISO_IR 192", b"Vendor\xff", keyword="Manufacturer")
    sr = pydicom.dcmread(write_sr(REPORT, load_study(source), tmp_path / "out", model_name="m", model_version="1"))
    assert sr.Manufacturer == "radtrt"


def test_copied_sequences_are_held_to_the_character_set_too(tmp_path: Path) -> None:
    """Undeclared UTF-8 bytes in OtherPatientIDsSequence were decoded as a Latin-1 guess ('MÃ¼ller-42') and filed with
    the study, where the same bytes in PatientName refused the SR."""
    source = write_radiograph(tmp_path / "in" / "pa.dcm", view_position="PA")
    ds = pydicom.dcmread(source)
    ds.SpecificCharacterSet = "ISO_IR 192"
    other = Dataset()
    other.PatientID = "M\u00fcller-42"
    other.TypeOfPatientID = "TEXT"
    ds.OtherPatientIDsSequence = [other]
    ds.save_as(source, enforce_file_format=True)
    declared = pydicom.dcmread(write_sr(REPORT, load_study(source), tmp_path / "ok", model_name="m", model_version="1"))
    assert [item.PatientID for item in declared.OtherPatientIDsSequence] == ["M\u00fcller-42"]
    ds = pydicom.dcmread(source)
    del ds.SpecificCharacterSet  # the same UTF-8 bytes, now in the default repertoire (ASCII)
    ds.save_as(source, enforce_file_format=True)
    with pytest.raises(RadtrtError, match=r"^pa.dcm: its OtherPatientIDsSequence \(PatientID\) cannot be decoded in "
                                          r"its character set \(ISO_IR 6, none given\); no SR written"):
        write_sr(REPORT, load_study(source), tmp_path / "out", model_name="m", model_version="1")
    assert not (tmp_path / "out").exists()
