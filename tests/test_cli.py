"""The radtrt command end to end on tiny models: contract, twins, SR output, exit codes."""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file
from pydicom.uid import JPEG2000Lossless
from typer.testing import CliRunner

from radtrt import __version__
from radtrt.cli import app
from radtrt.errors import RadtrtError
from radtrt.imaging.synthetic import FAKE_PATIENT_ID, FAKE_PATIENT_NAME, radiograph_dataset, synthetic_chest
from radtrt.model.loading import load_model, save_toolkit

from conftest import TinyRelease

runner = CliRunner()


@pytest.fixture(scope="module")
def merged(tiny_release: TinyRelease, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("merged") / "model"
    return save_toolkit(load_model(tiny_release.release_dir, tiny_release.base_dir), out, dtype=torch.float32)


def _invoke(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def _infer_json(model: Path, *studies: Path, extra: tuple[str, ...] = ()) -> list[dict]:
    code, out, err = _invoke("infer", *studies, "--model", model, "--json", "--max-new-tokens", "12", *extra)
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines()]


def _write(path: Path, ds: pydicom.Dataset) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _assert_refused(code: int, err: str, match: str) -> None:
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("radtrt: error:") and match in lines[-1], err
    assert "Traceback" not in err
    assert FAKE_PATIENT_NAME.split("^")[0] not in err and FAKE_PATIENT_ID not in err


def test_version() -> None:
    code, out, _ = _invoke("--version")
    assert code == 0 and out.strip() == f"radtrt {__version__}"


def test_json_contract(merged: Path, tmp_path: Path) -> None:
    study = _write(tmp_path / "a.dcm", radiograph_dataset(synthetic_chest(seed=1), view_position="AP"))
    (result,) = _infer_json(merged, study)
    # the stable keys, and "truncated": the random tiny model never says EOS within its 12 tokens
    assert set(result) == {"study", "source_file", "view_position", "report", "token_ids", "backend", "precision",
                           "timings_ms", "truncated"} and result["truncated"] is True
    assert result["view_position"] == "AP" and result["backend"] == "torch" and result["precision"] == "fp32"
    assert 0 < len(result["token_ids"]) <= 12 and 2 not in result["token_ids"]
    assert {"preprocess", "vision", "prefill", "decode", "end_to_end"} <= set(result["timings_ms"])


def test_release_layout_and_merged_layout_agree(tiny_release: TinyRelease, merged: Path, tmp_path: Path) -> None:
    study = _write(tmp_path / "a.dcm", radiograph_dataset(synthetic_chest(seed=2)))
    (a,) = _infer_json(merged, study)
    (b,) = _infer_json(tiny_release.release_dir, study, extra=("--base-model", str(tiny_release.base_dir)))
    assert a["token_ids"] == b["token_ids"] and a["report"] == b["report"]


def test_indication_changes_the_prompt(merged: Path, tmp_path: Path) -> None:
    study = _write(tmp_path / "a.dcm", radiograph_dataset(synthetic_chest(seed=3)))
    (plain,) = _infer_json(merged, study)
    (with_ind,) = _infer_json(merged, study, extra=("--indication", "Cough and fever"))
    assert plain["token_ids"] != with_ind["token_ids"]


def test_photometric_and_lossless_twins_give_identical_reports(merged: Path, tmp_path: Path) -> None:
    pixels = synthetic_chest(seed=4)
    mono2 = _write(tmp_path / "m2.dcm", radiograph_dataset(pixels))
    mono1 = _write(tmp_path / "m1.dcm", radiograph_dataset((4095 - pixels).astype(np.uint16), photometric="MONOCHROME1"))
    ds = radiograph_dataset(pixels)
    ds.compress(JPEG2000Lossless)
    j2k = _write(tmp_path / "j2k.dcm", ds)
    results = _infer_json(merged, mono2, mono1, j2k)
    assert len(results) == 3
    assert results[0]["token_ids"] == results[1]["token_ids"] == results[2]["token_ids"]
    other = _infer_json(merged, _write(tmp_path / "o.dcm", radiograph_dataset(synthetic_chest(seed=9))))[0]
    assert other["token_ids"] != results[0]["token_ids"]  # the image does reach the report


def test_study_folder_picks_pa_over_lateral(merged: Path, tmp_path: Path) -> None:
    folder = tmp_path / "study"
    _write(folder / "1_lat.dcm", radiograph_dataset(synthetic_chest(seed=5), view_position="LL", study_uid="1.2.3.9"))
    _write(folder / "2_pa.dcm", radiograph_dataset(synthetic_chest(seed=6), view_position="PA", study_uid="1.2.3.9"))
    (result,) = _infer_json(merged, folder)
    assert result["view_position"] == "PA" and result["source_file"].endswith("2_pa.dcm")


def test_a_folder_of_studies_reports_on_each(merged: Path, tmp_path: Path) -> None:
    """`infer STUDIES_FOLDER` was read as one study and refused, after the model had loaded."""
    root = tmp_path / "studies"
    _write(root / "s1" / "pa.dcm", radiograph_dataset(synthetic_chest(seed=5), view_position="PA", study_uid="1.2.3.1"))
    _write(root / "s1" / "lat.dcm", radiograph_dataset(synthetic_chest(seed=6), view_position="LL", study_uid="1.2.3.1"))
    _write(root / "s2.dcm", radiograph_dataset(synthetic_chest(seed=7), view_position="AP", study_uid="1.2.3.2"))
    code, out, err = _invoke("infer", root, "--model", merged, "--json", "--max-new-tokens", "4")
    assert code == 0, err
    results = [json.loads(line) for line in out.splitlines()]
    assert [r["study"] for r in results] == [str(root / "s1"), str(root / "s2.dcm")]
    assert results[0]["source_file"].endswith("pa.dcm") and results[1]["view_position"] == "AP"
    assert f"{root}: a folder of 2 studies" in err
    _write(root / "s1_extra.dcm", radiograph_dataset(synthetic_chest(seed=8), view_position="PA", study_uid="1.2.3.1"))
    code, out, err = _invoke("infer", root, "--model", tmp_path / "no-model", "--max-new-tokens", "4")
    _assert_refused(code, err, f"{root}: s1 and s1_extra.dcm hold images of one study")  # before the model is looked for
    assert out == ""


def test_malformed_header_values_never_reach_stderr(merged: Path, tmp_path: Path) -> None:
    """pydicom's validation warnings quoted values read from the header ("Invalid value for VR UI: '...'"),
    which Python prints on stderr."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # writing the malformed file warns too
        ds = radiograph_dataset(synthetic_chest(seed=8), view_position="PA")
        ds.StudyInstanceUID = "1.2.SECRET"
        ds.PatientBirthDate = "1931-07-04"
        study = _write(tmp_path / "a.dcm", ds)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, _, err = _invoke("infer", study, "--model", merged, "--max-new-tokens", "2", "--sr-out", tmp_path / "sr")
    assert code == 2 and "a.dcm: its StudyInstanceUID is not a DICOM UID; no SR written" in err, err
    assert not [w for w in caught if "SECRET" in str(w.message) or "1931" in str(w.message)]
    assert "SECRET" not in err and "1931" not in err
    assert not list((tmp_path / "sr").glob("*.dcm"))  # an SR copying it would not be valid DICOM
    with warnings.catch_warnings(record=True) as caught:  # --json deep-copied the Dataset, which re-validates
        warnings.simplefilter("always")
        code, out, err = _invoke("infer", study, "--model", merged, "--max-new-tokens", "2", "--json")
    assert code == 0 and json.loads(out)["report"] is not None
    assert not [w for w in caught if "SECRET" in str(w.message)] and "SECRET" not in err
    ds.StudyInstanceUID = "1.2.3.10"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study = _write(tmp_path / "b.dcm", ds)
    code, _, err = _invoke("infer", study, "--model", merged, "--max-new-tokens", "2", "--sr-out", tmp_path / "sr")
    assert code == 0 and "1931" not in err, err
    (sr,) = (tmp_path / "sr").glob("*.dcm")
    assert pydicom.dcmread(sr).PatientBirthDate == ""  # not valid DICOM, so not carried into the SR


def test_unused_files_and_a_lateral_given_by_itself_are_warned_about(merged: Path, tmp_path: Path) -> None:
    folder = tmp_path / "study"
    _write(folder / "2_pa.dcm", radiograph_dataset(synthetic_chest(seed=6), view_position="PA", study_uid="1.2.3.6"))
    ct = radiograph_dataset(synthetic_chest(seed=7), view_position="PA", study_uid="1.2.3.6")  # one study's CT
    ct.Modality = "CT"
    _write(folder / "3_ct.dcm", ct)
    lateral = _write(tmp_path / "lat.dcm", radiograph_dataset(synthetic_chest(seed=5), view_position="LL"))
    code, out, err = _invoke("infer", folder, lateral, "--model", merged, "--json", "--max-new-tokens", "4")
    assert code == 0, err
    assert [json.loads(line)["view_position"] for line in out.splitlines()] == ["PA", "LL"]  # stdout stays JSON
    warnings = [line for line in err.splitlines() if line.startswith("radtrt: warning:")]
    assert len(warnings) == 2, err
    assert warnings[0].startswith(f"radtrt: warning: {folder}: 1 file(s) not used:") and "CT" in warnings[0]
    assert warnings[1].startswith(f"radtrt: warning: {lateral}: the image is a LL view, not frontal")  # as given
    assert FAKE_PATIENT_NAME.split("^")[0] not in err and FAKE_PATIENT_ID not in err


def test_sr_out_reads_back(merged: Path, tmp_path: Path) -> None:
    study = _write(tmp_path / "a.dcm", radiograph_dataset(synthetic_chest(seed=7)))
    left = tmp_path / "sr" / ".SR_1.2.3.dcm.k1ll3d_9.partial"  # a killed run's half-written SR: patient data
    left.parent.mkdir()
    left.write_bytes(b"half an SR")
    code, out, err = _invoke("infer", study, "--model", merged, "--json", "--max-new-tokens", "12", "--sr-out",
                             tmp_path / "sr")
    assert code == 0 and f"radtrt: removed 1 unfinished SR file that a killed run left in {tmp_path / 'sr'}" in \
        " ".join(err.split()), err
    assert not left.exists()
    (result,) = [json.loads(line) for line in out.splitlines()]
    (sr_file,) = (tmp_path / "sr").glob("*.dcm")
    sr = pydicom.dcmread(sr_file)
    assert sr.Modality == "SR" and sr.VerificationFlag == "UNVERIFIED"
    assert sr.StudyInstanceUID == pydicom.dcmread(study).StudyInstanceUID
    texts = []

    def walk(items) -> None:  # type: ignore[no-untyped-def]
        for item in items:
            if "TextValue" in item:
                texts.append(item.TextValue)
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(sr.ContentSequence)
    assert result["report"] in texts


def test_doctor() -> None:
    from radtrt.model.default_model import default_model_dir

    code, out, _ = _invoke("doctor")
    assert code == 0 and "torch" in out and "TensorRT" in out and "onnxruntime" in out
    # the folder export / calibrate / bench take as --model: the README gave only a path inside the source tree
    assert f"embedded default model (phantoms only): {default_model_dir()}" in out


@pytest.fixture
def damaged_default_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the embedded default model that radtrt's installation points at instead of its own."""
    import radtrt.model.default_model as default_model

    copy = tmp_path / "radtrt" / "assets" / default_model.ASSET_NAME
    shutil.copytree(default_model.default_model_dir(), copy)
    monkeypatch.setattr(default_model, "files", lambda package: tmp_path / package)
    return copy


@pytest.mark.parametrize("damage, match", [
    (lambda d: (d / "config.json").write_text("{not json"), "config.json is not valid JSON"),
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-1000]),
     "weight file is truncated or corrupt"),
])
def test_doctor_and_infer_report_a_damaged_default_model_with_its_remedy(damaged_default_model: Path,
                                                                         tmp_path: Path, damage, match: str) -> None:
    """doctor called a damaged default model fine, and infer failed without the remedy a missing one gets."""
    damage(damaged_default_model)
    remedy = "reinstall radtrt, rebuild it with tools/train_default_model.sh, or pass --model"
    code, out, _ = _invoke("doctor")
    line = next(line for line in out.splitlines() if "embedded default model" in line)
    assert code == 0 and "is damaged" in line and match in line and line.endswith(remedy), out
    study = _write(tmp_path / "a.dcm", radiograph_dataset(synthetic_chest(seed=1), view_position="AP"))
    code, _, err = _invoke("infer", study, "--max-new-tokens", "2")
    _assert_refused(code, err, match)
    assert " ".join(err.split()).endswith(remedy)


def test_a_default_model_that_does_not_load_names_the_remedy(damaged_default_model: Path, tmp_path: Path) -> None:
    """Damage the header check cannot see (a hand-edited config value) is said with the same remedy."""
    config = damaged_default_model / "config.json"
    meta = json.loads(config.read_text())
    meta["model"]["decoder"]["num_attention_heads"] = 0
    config.write_text(json.dumps(meta))
    study = _write(tmp_path / "a.dcm", radiograph_dataset(synthetic_chest(seed=1), view_position="AP"))
    code, _, err = _invoke("infer", study, "--max-new-tokens", "2")
    _assert_refused(code, err, "the embedded default model of this installation does not load")
    assert "must be positive" in err and " ".join(err.split()).endswith("or pass --model")
    del meta["radtrt_format"]  # refused while its size is read, before the load: it was told to 'run radtrt convert'
    config.write_text(json.dumps(meta))
    code, _, err = _invoke("infer", study, "--max-new-tokens", "2")
    _assert_refused(code, err, "the embedded default model of this installation does not load")
    assert " ".join(err.split()).endswith("or pass --model")


def test_a_default_model_refusal_with_its_own_remedy_keeps_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Too little memory was told to 'reinstall radtrt', the remedy for a damaged copy."""
    import radtrt.model.loading as loading
    from radtrt.model.default_model import load_default_model

    monkeypatch.setattr(loading, "available_bytes", lambda: 1)
    with pytest.raises(RadtrtError, match="available: free memory or use a larger host$") as info:
        load_default_model()
    assert "reinstall" not in str(info.value)


def test_doctor_reports_an_onnxruntime_that_cannot_list_providers(tmp_path: Path) -> None:
    """An install whose get_available_providers raises (or is missing) ended doctor in a traceback."""
    import subprocess
    import sys

    fake = tmp_path / "onnxruntime"
    fake.mkdir()
    (fake / "__init__.py").write_text("__version__ = '0.0-broken'\n"
                                      "def get_available_providers():\n    raise RuntimeError('no libs')\n")
    done = subprocess.run([sys.executable, "-c", "from radtrt.runtime.doctor import report; print(chr(10).join(report()))"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                              [str(tmp_path), *sys.path])}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "onnxruntime 0.0-broken: cannot list its providers (RuntimeError)" in done.stdout
    assert "backends usable here: torch (cpu)" in done.stdout


def test_doctor_reads_tensorrt_llm_version_without_importing_it(tmp_path: Path) -> None:
    """doctor imported TensorRT-LLM, whose import starts MPI and prints a banner onto stdout (a broken MPI aborts)."""
    import subprocess
    import sys

    fake = tmp_path / "tensorrt_llm"
    fake.mkdir()
    (fake / "__init__.py").write_text("print('[TensorRT-LLM] banner')\nimport os\nos._exit(3)\n")
    meta = tmp_path / "tensorrt_llm-0.14.0.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: tensorrt_llm\nVersion: 0.14.0\n")
    done = subprocess.run([sys.executable, "-c", "from radtrt.runtime.doctor import report; print(chr(10).join(report()))"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                              [str(tmp_path), *sys.path])}, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "TensorRT-LLM 0.14.0" in done.stdout.splitlines() and "banner" not in done.stdout


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    good = _write(tmp_path / "good.dcm", radiograph_dataset(synthetic_chest(seed=8)))
    raw = good.read_bytes()
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(raw[: len(raw) - 5000])
    ds = pydicom.dcmread(good)
    ds.Rows = ds.Rows + 3
    rows = _write(tmp_path / "rows.dcm", ds)
    return {
        "missing": (tmp_path / "nope.dcm", "study not found"),
        "empty": (empty, "empty.dcm: an empty file (0 bytes: a copy cut short?)"),  # was "no DICOM preamble"
        "text": (text, ""),
        "truncated": (truncated, ""),
        "rows": (rows, ""),
        "rtplan": (Path(get_testdata_file("rtplan.dcm")), ""),
        "ct": (Path(get_testdata_file("CT_small.dcm")), "CT"),
    }


@pytest.mark.parametrize("case", ["missing", "empty", "text", "truncated", "rows", "rtplan", "ct"])
def test_bad_studies_exit_2_with_one_line(merged: Path, tmp_path: Path, case: str) -> None:
    path, match = _bad_inputs(tmp_path)[case]
    code, out, err = _invoke("infer", path, "--model", merged, "--json")
    _assert_refused(code, err, match)
    if case == "missing":  # refused before the model loads: nothing ran
        assert out == ""
        return
    (record,) = [json.loads(line) for line in out.splitlines()]  # --json: one record per study, failed ones too
    assert record == {"study": str(path), "error": record["error"], "stage": "input"} and match in record["error"]
    assert err.strip().splitlines()[-1] == f"radtrt: error: {record['error']}"  # the same line as its record
    ct_name = str(pydicom.dcmread(get_testdata_file("CT_small.dcm")).PatientName)
    assert ct_name not in err


def test_text_mode_escapes_a_reports_control_characters_and_names_an_empty_one(
        capsys: pytest.CaptureFixture) -> None:
    """A damaged model's ESC went to the terminal as it was; a report ended at its first token printed two blank
    lines and nothing else."""
    from radtrt.cli import _print_results
    from radtrt.runtime.pipeline import StudyResult

    timings = dict.fromkeys(("preprocess", "vision", "prefill", "decode_per_token", "end_to_end"), 1.0)
    made = dict(source_file="f.dcm", view_position="PA", stop_reason="eos", backend="torch", precision="fp32",
                timings_ms=timings)
    _print_results([StudyResult(study="a", report="Clear\x1b[2J lungs.\nNo\x1c effusion.", token_ids=[5, 6], **made),
                    StudyResult(study="b", report="", token_ids=[], **made)], as_json=False)
    out, err = capsys.readouterr()
    assert out.startswith("a [PA]\nClear\\x1b[2J lungs.\nNo\\x1c effusion.\n") and "\x1b" not in out  # only \n breaks
    assert "radtrt: warning: b: the model generated no findings text (it ended the report at its first token)" in err
    assert "warning: a:" not in err


def test_a_study_given_twice_is_refused_before_the_model_loads(merged: Path, tmp_path: Path) -> None:
    """'infer s s/ s/frontal.dcm --sr-out sr' filed three SRs for one study (without --sr-out a repeat only prints
    its report again, which test_one_bad_study_among_several_keeps_the_others relies on)."""
    study = tmp_path / "s"
    frontal = _write(study / "frontal.dcm", radiograph_dataset(synthetic_chest(seed=8)))
    other = _write(tmp_path / "t" / "frontal.dcm", radiograph_dataset(synthetic_chest(seed=9)))
    for args, match in (((study, f"{study}/"), f"{study} is given twice: each study would get two SRs; give it once"),
                        ((study, frontal), f"{frontal} is inside the study {study}: the study is given twice, and "
                                           f"each would get an SR; give it once"),
                        # a folder of studies and one of its studies: named by where each was found
                        ((tmp_path, other.parent), f"{other.parent} (in {tmp_path}) and {other.parent} are the same "
                                                   f"study, given twice"),
                        ((tmp_path, other), f"{other} is inside the study {other.parent} (in {tmp_path}): the study is "
                                            f"given twice")):
        code, out, err = _invoke("infer", *args, "--model", tmp_path / "not-loaded", "--json", "--sr-out",
                                 tmp_path / "sr")
        _assert_refused(code, err, match)
        assert out == ""


def test_an_interrupt_as_an_sr_is_written_lands_after_its_line(merged: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C between an SR's rename and its 'structured report of ...' line left an SR that no line named, though
    the interrupted line promises each SR written has its own."""
    import io
    import signal

    from rich.console import Console

    from radtrt import interrupts
    from radtrt.imaging import sr
    from radtrt.runtime.session import infer_studies

    write = sr.write_sr

    def written_then_interrupted(*args: object, **kwargs: object) -> Path:
        path = write(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)
        return path

    monkeypatch.setattr(sr, "write_sr", written_then_interrupted)
    study = _write(tmp_path / "a.dcm", radiograph_dataset(synthetic_chest(seed=8)))
    log = io.StringIO()
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    interrupts.install()
    try:
        with pytest.raises(KeyboardInterrupt):
            list(infer_studies([study], model=merged, backend="torch", max_new_tokens=4, sr_out=tmp_path / "sr",
                               console=Console(file=log, width=300)))
    finally:
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGTERM, before[1])
    (written,) = (tmp_path / "sr").glob("*.dcm")
    assert f"structured report of {study}: {written}" in log.getvalue()


def test_the_library_refuses_no_new_tokens_as_the_cli_does(merged: Path, tmp_path: Path) -> None:
    """infer_studies(max_new_tokens=0) gave a record of no tokens, 'truncated', with decode_per_token -0.0."""
    import io

    from rich.console import Console

    from radtrt.runtime.session import infer_studies

    study = _write(tmp_path / "a.dcm", radiograph_dataset(synthetic_chest(seed=8)))
    with pytest.raises(RadtrtError, match="^--max-new-tokens must be at least 1$"):
        list(infer_studies([study], model=merged, backend="torch", max_new_tokens=0, console=Console(file=io.StringIO())))


def test_no_per_token_decode_time_without_a_decode_step(merged: Path, tmp_path: Path) -> None:
    """--max-new-tokens 1 runs no decode step, yet reported the decode loop's overhead as 'ms/token'."""
    study = _write(tmp_path / "a.dcm", radiograph_dataset(synthetic_chest(seed=8)))
    (record,) = _infer_json(merged, study, extra=("--max-new-tokens", "1"))
    assert "decode_per_token" not in record["timings_ms"] and "decode" in record["timings_ms"]
    (record,) = _infer_json(merged, study, extra=("--max-new-tokens", "3"))
    assert record["timings_ms"]["decode_per_token"] > 0
    code, _, err = _invoke("infer", study, "--model", merged, "--max-new-tokens", "1")
    assert code == 0 and ", decode no step, end to end " in err, err


def test_any_modality_override(merged: Path) -> None:
    (result,) = _infer_json(merged, Path(get_testdata_file("CT_small.dcm")), extra=("--allow-any-modality",))
    assert result["token_ids"]


def test_one_bad_study_among_several_keeps_the_others(merged: Path, tmp_path: Path) -> None:
    good = _write(tmp_path / "good.dcm", radiograph_dataset(synthetic_chest(seed=10)))
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    for batch in ("1", "3"):
        code, out, err = _invoke("infer", good, empty, good, "--model", merged, "--json",
                                 "--max-new-tokens", "4", "--batch-size", batch)
        assert code == 2 and "1 of 3 studies failed" in err and "Traceback" not in err
        records = [json.loads(line) for line in out.splitlines()]
        assert [r["study"] for r in records] == [str(good), str(empty), str(good)]  # the order given
        assert records[0]["token_ids"] == records[2]["token_ids"] and "error" not in records[0]
        assert records[1]["stage"] == "input" and records[1]["error"].startswith(f"{empty}: ")
        assert f"radtrt: error: {records[1]['error']}" in err.splitlines()


def test_a_study_whose_sr_fails_keeps_its_report_and_gets_an_sr_record(merged: Path, tmp_path: Path) -> None:
    good = _write(tmp_path / "good.dcm", radiograph_dataset(synthetic_chest(seed=10)))
    ds = radiograph_dataset(synthetic_chest(seed=11))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.StudyInstanceUID = "not-a-uid"
        bad = _write(tmp_path / "bad.dcm", ds)
    code, out, err = _invoke("infer", bad, good, "--model", merged, "--json", "--max-new-tokens", "4",
                             "--sr-out", tmp_path / "sr")
    assert code == 2 and "1 of 2 studies failed" in err
    records = [json.loads(line) for line in out.splitlines()]
    assert [(r["study"], "report" in r, r.get("stage")) for r in records] == [
        (str(bad), True, None), (str(bad), False, "sr"), (str(good), True, None)]
    assert len(list((tmp_path / "sr").glob("*.dcm"))) == 1


@pytest.mark.parametrize("args, match", [
    (["--model", "{tmp}/no-such-model"], "model directory not found"),
    (["--backend", "onnxruntime", "--model", "{merged}"], "onnxruntime"),
    (["--backend", "cuda-magic", "--model", "{merged}"], "unknown backend"),
    (["--device", "cuda", "--model", "{merged}"], "CUDA"),
    # the torch backend allocated its KV cache for them first: a 300 GB allocation failure, or past the positions
    (["--model", "{merged}", "--max-new-tokens", "100000000"], "exceed the model's 512 positions"),
    # no --indication given: "shorten --indication" was said all the same
    (["--model", "{merged}", "--max-new-tokens", "100000000"], "positions; --max-new-tokens 336 at most for this prompt"),
    # the prompt alone past the positions: a lower --max-new-tokens was suggested, which cannot help
    (["--model", "{merged}", "--indication", "x " * 600], "the prompt alone fills them: shorten --indication"),
    # the indication fills them and the bare prompt leaves less room than asked: no remedy at all was given
    (["--model", "{merged}", "--indication", "x " * 600, "--max-new-tokens", "400"],
     "positions; the prompt alone fills them: shorten --indication, and lower --max-new-tokens (336 at most even "
     "without --indication)"),
    (["--model", "{merged}", "--indication", "x " * 50, "--max-new-tokens", "300"],
     "shorten --indication or give --max-new-tokens "),
    # no prompt leaves room for these: shortening --indication was offered all the same
    (["--model", "{merged}", "--indication", "x", "--max-new-tokens", "100000000"],
     "new tokens exceed the model's 512 positions; --max-new-tokens "),
])
def test_bad_options_exit_2(merged: Path, tmp_path: Path, args: list[str], match: str,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the refusals of a CPU host, on a GPU host too
    study = _write(tmp_path / "a.dcm", radiograph_dataset(synthetic_chest()))
    args = [a.format(tmp=tmp_path, merged=merged) for a in args]
    code, _, err = _invoke("infer", study, *args)
    _assert_refused(code, err, match)


def test_release_without_base_model_exits_2(tiny_release: TinyRelease, tmp_path: Path) -> None:
    study = _write(tmp_path / "a.dcm", radiograph_dataset(synthetic_chest()))
    code, _, err = _invoke("infer", study, "--model", tiny_release.release_dir)
    _assert_refused(code, err, "--base-model")
    code, _, err = _invoke("infer", study, "--base-model", tiny_release.base_dir)  # was ignored: the default ran
    _assert_refused(code, err, "pass --model too")
    # with --bundle, "pass --model too" led to the next refusal ("--model is not used ... drop --model"): the bundle
    # holds the decoder, so --base-model is what to drop
    code, _, err = _invoke("infer", study, "--bundle", tmp_path, "--base-model", tiny_release.base_dir)
    _assert_refused(code, err, "--base-model is not used with --bundle")
    assert "--model too" not in err


def test_convert_cli(tiny_release: TinyRelease, tmp_path: Path) -> None:
    out = tmp_path / "converted"
    code, stdout, err = _invoke("convert", "--model", tiny_release.release_dir, "--base-model",
                                tiny_release.base_dir, "-o", out, "--dtype", "float32")
    assert code == 0, err
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.model").is_file()
    code, _, err = _invoke("convert", "--model", tiny_release.release_dir, "--base-model", tiny_release.base_dir,
                           "-o", out)
    _assert_refused(code, err, "not empty")


def test_convert_refuses_a_model_whose_positions_hold_no_prompt(tiny_release: TinyRelease, merged: Path,
                                                               tmp_path: Path) -> None:
    """max_position_embeddings 10 in config.json: convert wrote the model with exit 0, and every infer failed."""
    import shutil

    release = tmp_path / "release"
    shutil.copytree(tiny_release.release_dir, release)
    hf = json.loads((release / "config.json").read_text())
    (release / "config.json").write_text(json.dumps({**hf, "max_position_embeddings": 10}))
    code, _, err = _invoke("convert", "--model", release, "--base-model", tiny_release.base_dir, "-o",
                           tmp_path / "out")
    _assert_refused(code, err, f"{release} cannot generate a report: its decoder has 10 positions "
                               f"(max_position_embeddings), and its shortest prompt takes")
    assert f"its base model {tiny_release.base_dir} has 512" in err and not (tmp_path / "out").exists()
    model = tmp_path / "model"
    shutil.copytree(merged, model)
    meta = json.loads((model / "config.json").read_text())
    meta["model"]["decoder"]["max_position_embeddings"] = 10
    (model / "config.json").write_text(json.dumps(meta))
    code, _, err = _invoke("convert", "--model", model, "--to", "llava-rad", "-o", tmp_path / "rel")
    _assert_refused(code, err, "cannot generate a report: its decoder has 10 positions")
    assert not (tmp_path / "rel").exists()


def test_a_model_whose_positions_hold_no_prompt_is_refused_before_export_and_infer(merged: Path,
                                                                                  tmp_path: Path) -> None:
    """export wrote both graphs (minutes at 7B) before its ONNX Runtime check refused the model with advice
    (--indication, --max-new-tokens) export has no option for; infer gave the same advice without an indication."""
    model = tmp_path / "model"
    shutil.copytree(merged, model)
    meta = json.loads((model / "config.json").read_text())
    meta["model"]["decoder"]["max_position_embeddings"] = 10
    (model / "config.json").write_text(json.dumps(meta))
    expected = f"{model} cannot generate a report: its decoder has 10 positions (max_position_embeddings)"
    code, _, err = _invoke("export", "--model", model, "-o", tmp_path / "bundle")
    _assert_refused(code, err, expected)
    assert "exporting" not in err and not (tmp_path / "bundle").exists()
    study = _write(tmp_path / "a.dcm", radiograph_dataset(synthetic_chest(seed=1), view_position="AP"))
    code, _, err = _invoke("infer", study, "--model", model, "--max-new-tokens", "2")
    _assert_refused(code, err, expected)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_convert_loads_in_the_stored_dtype_with_identical_bytes(tiny_release: TinyRelease, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch, dtype: str) -> None:
    """convert loads straight into the dtype it stores (a float32 copy of Vicuna-7B is 27 GB), and the file
    it writes is what loading in float32 and casting at the save gives, bit for bit (float16 base, as released)."""
    from safetensors.torch import load_file

    import radtrt.model.loading as loading
    from radtrt.model.release import write_base_lm

    base16 = write_base_lm(tmp_path / "base16", tiny_release.cfg,
                           {k: v.half() for k, v in tiny_release.model.language_model.state_dict().items()},
                           tiny_release.tokenizer)
    seen: list[torch.dtype] = []
    real = loading.load_model
    monkeypatch.setattr(loading, "load_model", lambda *a, **kw: seen.append(kw.get("dtype")) or real(*a, **kw))
    out = tmp_path / "converted"
    code, _, err = _invoke("convert", "--model", tiny_release.release_dir, "--base-model", base16, "-o", out,
                           "--dtype", dtype)
    assert code == 0, err
    assert seen == [getattr(torch, dtype)]
    reference = save_toolkit(real(tiny_release.release_dir, base16, dtype=torch.float32), tmp_path / "via-fp32",
                             dtype=getattr(torch, dtype))
    got, want = load_file(out / "model.safetensors"), load_file(reference / "model.safetensors")
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key


def test_usage_error_exits_2() -> None:
    code, _, _ = _invoke("infer")
    assert code == 2


def test_console_script_exit_codes(tmp_path: Path) -> None:
    """The installed entry point, not just the typer app: exit 2, one line, no traceback."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "radtrt.cli", "infer", str(tmp_path / "none.dcm"), "--model",
                           str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [f"radtrt: error: study not found: {tmp_path / 'none.dcm'}"]


def test_help_into_a_closed_pipe_is_one_line(tmp_path: Path) -> None:
    """`radtrt infer --help | head -1`: rich ended the broken pipe with a silent exit 1, the code of an internal
    error; the same exit and line as results written into a closed pipe."""
    import os
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written
    proc = subprocess.run([sys.executable, "-m", "radtrt.cli", "infer", "--help"], stdout=write, stderr=subprocess.PIPE,
                          text=True, timeout=120)
    os.close(write)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == ["radtrt: error: cannot write to standard output (Broken pipe); "
                                                "stopped there"]


def test_without_model_the_embedded_default_model_runs(tmp_path: Path) -> None:
    study = _write(tmp_path / "a.dcm", radiograph_dataset(synthetic_chest(seed=12)))
    code, out, err = _invoke("infer", study, "--json", "--max-new-tokens", "8")
    assert code == 0, err
    assert "embedded default model" in err and json.loads(out)["token_ids"]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_stdout_that_cannot_be_written_is_one_line(tmp_path: Path) -> None:
    """A full disk was a traceback (exit 1); a closed pipe, click's silent exit 1. Every command prints its
    results through one function, an option callback (--version) included."""
    import subprocess
    import sys

    study = _write(tmp_path / "a.dcm", radiograph_dataset(synthetic_chest(seed=12)))
    for args in (["infer", str(study), "--json", "--max-new-tokens", "2"], ["--version"], ["--help"],
                 ["infer", "--help"], ["data", "phantoms", "-o", str(tmp_path / "ph"), "--n", "1"]):
        with open("/dev/full", "w") as full:
            proc = subprocess.run([sys.executable, "-m", "radtrt.cli", *args], stdout=full, stderr=subprocess.PIPE,
                                  text=True, timeout=300)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, (args, proc.stderr)
        assert proc.stderr.strip().splitlines()[-1] == ("radtrt: error: cannot write to standard output (No space "
                                                        "left on device); stopped there")
    closed = subprocess.run(["bash", "-c", f"'{sys.executable}' -m radtrt.cli --version >&-"], capture_output=True,
                            text=True, timeout=300)  # exit 0 and nothing printed, without a word
    assert closed.returncode == 2 and closed.stderr.strip() == ("radtrt: error: standard output is closed; the "
                                                                "results cannot be printed")


def test_a_report_cut_off_at_max_new_tokens_says_so(tmp_path: Path) -> None:
    """A one-token report was 'COMPLETE' in its SR, and its record did not say it had hit the limit; printed
    plainly it was half a sentence without a word. Each SR's file (named by a new UID) is said with its study."""
    study = _write(tmp_path / "a.dcm", radiograph_dataset(synthetic_chest(seed=12)))
    for limit, reason, flag in (("1", "max_new_tokens", "PARTIAL"), ("256", "eos", "COMPLETE")):
        sr_out = tmp_path / f"sr-{limit}"
        code, out, err = _invoke("infer", study, "--json", "--max-new-tokens", limit, "--sr-out", sr_out)
        assert code == 0, err
        record = json.loads(out)
        assert record.get("truncated", False) == (reason == "max_new_tokens")
        assert (len(record["token_ids"]) == 1) == (limit == "1")
        (sr,) = sr_out.glob("*.dcm")
        assert pydicom.dcmread(sr).CompletionFlag == flag
        assert f"structured report of {study}: {sr}" in err
        code, out, err = _invoke("infer", study, "--max-new-tokens", limit)
        cut = f"radtrt: warning: {study}: the report was cut off at --max-new-tokens (1 tokens)"
        assert code == 0 and (cut in err) == (limit == "1") and "cut off" not in out


def test_a_prompt_too_long_is_refused_before_any_study_is_read(merged: Path, tmp_path: Path) -> None:
    """It was refused at the first batch: a bad study before it already had its --json record, the rest none."""
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"not dicom")
    good = _write(tmp_path / "a.dcm", radiograph_dataset(synthetic_chest(seed=3)))
    code, out, err = _invoke("infer", garbage, good, "--model", merged, "--json", "--indication", "x " * 600)
    assert code == 2 and out == "" and "garbage.dcm" not in err
    assert err.strip().splitlines()[-1].endswith("the prompt alone fills them: shorten --indication")


def test_an_empty_or_mistyped_precision_or_dtype_is_refused_as_such(merged: Path, tmp_path: Path) -> None:
    """An empty value (a script's unset $DTYPE) was the default without a word (a float16 model, then refused as
    'calibrated on other weights'), and a mistyped INT8 beside --calibration-data was told it "applies to
    --precision int8 only (this export is INT8)"."""
    calib = tmp_path / "calib.safetensors"
    for args, message in (
            (("export", "--model", merged, "--precision", ""), "unknown --precision '' (fp32, fp16, int8)"),
            (("export", "--model", merged, "--precision", "INT8", "--calibration-data", calib),
             "unknown --precision 'INT8' (fp32, fp16, int8)"),
            (("convert", "--model", merged, "--dtype", ""), "unknown dtype ''"),
            (("infer", _write(tmp_path / "a.dcm", radiograph_dataset(synthetic_chest(seed=8))), "--model", merged,
              "--dtype", ""), "unknown dtype ''")):
        code, out, err = _invoke(*args, *(("-o", tmp_path / "out") if args[0] != "infer" else ()))
        assert code == 2 and message in err and "Traceback" not in err, (args, err)
        assert not (tmp_path / "out").exists()


def test_convert_to_release_layout_reloads_with_identical_tokens(merged: Path, tmp_path: Path) -> None:
    out = tmp_path / "release"
    for dtype in ("bfloat16", "float16"):  # float16, said explicitly, was taken for the default and ignored
        code, _, err = _invoke("convert", "--model", merged, "--to", "llava-rad", "--dtype", dtype, "-o", out)
        assert code == 2 and "--dtype applies to --to radtrt" in err and not out.exists()  # was ignored
    code, stdout, err = _invoke("convert", "--model", merged, "--to", "llava-rad", "-o", out)
    assert code == 0, err
    study = _write(tmp_path / "a.dcm", radiograph_dataset(synthetic_chest(seed=13)))
    (a,) = _infer_json(merged, study)
    (b,) = _infer_json(out / "llava-rad", study, extra=("--base-model", str(out / "base-lm")))
    assert a["token_ids"] == b["token_ids"]
    # the model's name survives the round trip (it came back as "llava-rad", the release layout's)
    assert load_model(out / "llava-rad", out / "base-lm").name == load_model(merged).name
    config = out / "llava-rad" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "radtrt_model_name": "a\nb"}))
    with pytest.raises(RadtrtError, match=re.escape("radtrt_model_name 'a\\nb' is not a printable model name")):
        load_model(out / "llava-rad", out / "base-lm")


def test_a_damaged_name_or_source_in_a_model_config_is_one_line(merged: Path, tmp_path: Path) -> None:
    """A list as the name loaded, printed its report, then failed in the SR writer with exit 1."""
    study = _write(tmp_path / "a.dcm", radiograph_dataset(synthetic_chest(seed=13)))
    for field, value, match in (("name", ["not", "a", "name"], "'name' ['not', 'a', 'name'] is not a printable model"),
                                ("name", "a\x1b[2Jb", "is not a printable model name"),
                                ("source", "x", "'source' is str, not an object")):
        model = tmp_path / f"m-{field}"
        shutil.copytree(merged, model, dirs_exist_ok=True)
        config = model / "config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), field: value}))
        code, out, err = _invoke("infer", study, "--model", model, "--sr-out", tmp_path / "sr", "--max-new-tokens", "2")
        _assert_refused(code, err, match)
        assert out == ""


def test_a_model_given_as_a_bundle_or_a_file_as_a_model_says_so(merged: Path, tmp_path: Path) -> None:
    study = _write(tmp_path / "a.dcm", radiograph_dataset(synthetic_chest(seed=13)))
    code, _, err = _invoke("infer", study, "--bundle", merged)
    _assert_refused(code, err, "is not a radtrt bundle (no manifest.json): it is a model folder, which --model takes")
    code, _, err = _invoke("export", "--model", study, "-o", tmp_path / "b")
    _assert_refused(code, err, f"{study} is a file, not a model directory")  # it said 'not found'


def test_a_study_that_is_a_broken_link_says_so(tmp_path: Path) -> None:
    (tmp_path / "loop.dcm").symlink_to(tmp_path / "loop.dcm")
    code, _, err = _invoke("infer", tmp_path / "loop.dcm")
    _assert_refused(code, err, "loop.dcm is a symbolic link loop")  # was 'not found'


def test_a_config_with_fewer_layers_than_the_weights_is_refused(merged: Path, tmp_path: Path) -> None:
    """The model ran on the first layers only, with exit 0."""
    from radtrt.model.loading import load_model

    for section, key in (("decoder", "num_hidden_layers"), ("vision", "depth")):
        model = tmp_path / f"m-{key}"
        shutil.copytree(merged, model)
        meta = json.loads((model / "config.json").read_text())
        meta["model"][section][key] -= 1
        (model / "config.json").write_text(json.dumps(meta))
        with pytest.raises(RadtrtError, match="belongs to no layer of the model config.json describes"):
            load_model(model)


def test_torch_backend_with_only_a_bundle_is_refused(tmp_path: Path) -> None:
    # without the refusal the embedded default model ran silently in place of the bundle's model
    study = _write(tmp_path / "a.dcm", radiograph_dataset(synthetic_chest()))
    (tmp_path / "bundle").mkdir()
    code, _, err = _invoke("infer", study, "--bundle", tmp_path / "bundle", "--backend", "torch")
    _assert_refused(code, err, "--backend torch")


def test_output_paths_in_the_way_are_refused_before_the_model_loads(merged: Path, tmp_path: Path) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("user data")
    study = _write(tmp_path / "a.dcm", radiograph_dataset(synthetic_chest()))
    code, _, err = _invoke("convert", "--model", merged, "-o", a_file)
    _assert_refused(code, err, "is not a folder")
    code, _, err = _invoke("convert", "--model", merged, "-o", a_file / "sub")
    _assert_refused(code, err, "is not a folder")
    code, _, err = _invoke("calibrate", "--model", merged, "--data", "phantom", "--n", "1",
                           "-o", a_file / "c.safetensors")
    _assert_refused(code, err, "is not a folder")
    code, _, err = _invoke("calibrate", "--model", merged, "--data", "phantom", "--n", "1",
                           "-o", tmp_path / ".safetensors")  # was "must end in .safetensors, got .safetensors"
    _assert_refused(code, err, "must be named NAME.safetensors, got .safetensors")
    code, out, err = _invoke("infer", study, "--model", merged, "--sr-out", a_file, "--max-new-tokens", "2")
    _assert_refused(code, err, "--sr-out")
    assert out == "" and a_file.read_text() == "user data"
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")  # passed the check, failed after generating
    code, out, err = _invoke("infer", study, "--model", merged, "--sr-out", tmp_path / "dangling", "--max-new-tokens",
                             "2")
    _assert_refused(code, err, "symbolic link to a missing target")
    assert out == ""


def test_export_checks_its_inputs_before_loading_the_model(tmp_path: Path) -> None:
    """Each of these used to be found only after the model had loaded (minutes at 7B), or never."""
    missing_model = tmp_path / "no-model"  # loading it would fail with "model directory not found"
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("user data")
    for args, match in (
            (["--precision", "int8", "--calibration-data", str(tmp_path / "nowhere"), "-o", str(tmp_path / "b")],
             "calibration data not found"),
            (["--precision", "int8", "--calibration-data", "", "-o", str(tmp_path / "b")],  # calibrated on cwd
             "--calibration-data is empty"),
            (["--precision", "fp32", "-o", str(tmp_path / "full")], "is not empty"),
            (["--precision", "fp16", "--int8-decoder", "smoothquant", "-o", str(tmp_path / "b")],
             "--int8-decoder applies to --precision int8 only"),  # was ignored, exit 0
            (["--precision", "int8", "--calibration-data", "phantom", "--parity-samples", "1000000000",
              "-o", str(tmp_path / "b")], "at most 10000")):  # generated phantoms without end
        code, _, err = _invoke("export", "--model", missing_model, *args)
        _assert_refused(code, err, match)
    assert not (tmp_path / "b").exists() and (tmp_path / "full" / "x").read_text() == "user data"


def test_a_failed_release_export_leaves_no_folder(merged: Path, tmp_path: Path) -> None:
    """convert --to llava-rad wrote base-lm/ and half of llava-rad/ before failing on the trunk's name."""
    model = tmp_path / "model"
    shutil.copytree(merged, model)
    meta = json.loads((model / "config.json").read_text())
    meta["model"]["vision"]["timm_model_name"] = "bogus_model"
    (model / "config.json").write_text(json.dumps(meta))
    code, _, err = _invoke("convert", "--model", model, "--to", "llava-rad", "-o", tmp_path / "rel")
    _assert_refused(code, err, "bogus_model")
    assert not (tmp_path / "rel").exists() and not (tmp_path / "rel.partial").exists()


def test_demo_runs_the_default_bundle_without_spinning_threads(tmp_path: Path) -> None:
    """demo calls infer directly: a parameter it left out took typer's Option object, which is truthy, so ONNX
    Runtime's threads busy-waited (--ort-spin) in everybody's first run."""
    code, out, err = _invoke("demo", "-o", tmp_path / "demo", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["backend"] == "onnxruntime" and result["view_position"] in ("PA", "AP") and result["report"]
    assert "spinning" not in err and len(list((tmp_path / "demo" / "sr").glob("*.dcm"))) == 1
    manifest = tmp_path / "demo" / "phantom-study" / "manifest.jsonl"
    row = json.loads(manifest.read_text())
    for text, match in (("", "has no rows"), (json.dumps({k: v for k, v in row.items() if k != "study"}) + "\n",
                                               "holds no DICOM phantom study")):
        manifest.write_text(text)  # an IndexError, a KeyError
        code, _, err = _invoke("demo", "-o", tmp_path / "demo")
        _assert_refused(code, err, match)
    bundle_manifest = tmp_path / "demo" / "default-model-fp32" / "manifest.json"
    original = bundle_manifest.read_text()
    from radtrt.exporter.onnx import GRAPH_REVISION

    recorded = json.loads(original)
    # after a radtrt upgrade; a check the backend makes; a bundle that opens but is not what the demo exports
    # (older graphs, another model's weights: they ran without a word)
    for edit, why in (({"format_version": 0}, "format version 0"), ({"precision": "fp16"}, "says precision fp16"),
                      ({"graph_revision": GRAPH_REVISION - 1}, f"graphs are revision {GRAPH_REVISION - 1}"),
                      ({"model": {**recorded["model"], "weights_fingerprint_fp16": "0" * 64}}, "other weights")):
        bundle_manifest.write_text(json.dumps({**recorded, **edit}))
        code, _, err = _invoke("demo", "-o", tmp_path / "demo")  # 'radtrt export' was the remedy given
        _assert_refused(code, err, "delete it and 'radtrt demo' exports it again")
        assert why in err and "re-export" not in err  # the underlying refusal's own remedy came first
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "sr").write_text("x")
    code, _, err = _invoke("demo", "-o", tmp_path / "other")  # refused after a 20 s export
    _assert_refused(code, err, "demo SR folder (in -o)")
    assert not (tmp_path / "other" / "default-model-fp32").exists()


def test_a_full_disk_no_output_step_expected_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """A write error leaving a command (a full disk, a quota) was an OSError traceback; a bug's OSError still is."""
    import errno

    import typer

    from radtrt.cli_support import user_errors

    @user_errors
    def full() -> None:
        raise OSError(errno.ENOSPC, "No space left on device", "/out/report.md")

    with pytest.raises(typer.Exit) as exit_info:
        full()
    assert exit_info.value.exit_code == 2
    assert capsys.readouterr().err.strip() == ("radtrt: error: a write failed (No space left on device): "
                                               "/out/report.md; stopped there")

    @user_errors
    def unreadable() -> None:  # a bundle file copied from another user, mode 0600: was a PermissionError traceback
        raise PermissionError(errno.EACCES, "Permission denied", "b2/vision.onnx")

    with pytest.raises(typer.Exit) as exit_info:
        unreadable()
    assert exit_info.value.exit_code == 2
    assert capsys.readouterr().err.strip().startswith("radtrt: error: cannot use b2/vision.onnx (Permission denied): "
                                                      "this user may not read it")

    @user_errors
    def missing() -> None:
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "x")

    with pytest.raises(FileNotFoundError):
        missing()


def test_a_name_too_long_for_the_file_system_is_one_line(tmp_path: Path) -> None:
    """pathlib's exists() raises ENAMETOOLONG: an OSError traceback from wherever the path was first touched."""
    long = tmp_path / ("a" * 300)
    for args in (["infer", str(long)], ["calibrate", "--model", str(tmp_path), "--data", str(long), "-o",
                                        str(tmp_path / "c.safetensors")]):
        code, _, err = _invoke(*args)
        assert code == 2 and "name is too long for the file system" in err and "Traceback" not in err


def test_names_holding_markup_or_control_characters_are_printed_as_they_are(merged: Path, tmp_path: Path) -> None:
    """rich read '[/red]' in an output folder or a model's name as markup (a MarkupError traceback), and a newline
    in a name printed a fake 'radtrt: error:' line."""
    odd = tmp_path / "m[/red]"
    shutil.copytree(merged, odd)
    meta = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**meta, "name": "x[/red] [bold]"}))
    study = _write(tmp_path / "a.dcm", radiograph_dataset(synthetic_chest(seed=12)))
    code, _, err = _invoke("infer", study, "--model", odd, "--max-new-tokens", "2")
    assert code == 0, err
    assert "model x[/red] [bold]" in err
    (odd / "config.json").write_text(json.dumps({**meta, "name": "x\nradtrt: error: fake\x1b[31m"}))
    code, _, err = _invoke("infer", study, "--model", odd, "--max-new-tokens", "2")  # refused, said escaped
    _assert_refused(code, err, "'name' 'x\\nradtrt: error: fake\\x1b[31m' is not a printable model name")
    assert "\x1b" not in err and not any(line.startswith("radtrt: error: fake") for line in err.splitlines())
    code, out, err = _invoke("convert", "--model", merged, "-o", tmp_path / "out[/red]")
    assert code == 0 and out.strip() == str(tmp_path / "out[/red]"), err
    code, out, err = _invoke("export", "--model", merged, "-o", tmp_path / "b[/red]")
    assert code == 0 and str(tmp_path / "b[/red]") in out, err
    code, _, err = _invoke("train", "init", "--tokenizer", merged, "--arch", "tiny", "-o", tmp_path / "init",
                           "--name", "a\nb")
    assert code == 2 and "--name 'a\\nb' is not a printable model name" in err
    assert not (tmp_path / "init").exists()


def test_an_interrupt_while_the_cli_is_imported_exits_130_without_a_traceback() -> None:
    """Ctrl-C in the first second of any command (radtrt.cli imports torch and every command group) printed a
    30-line KeyboardInterrupt traceback. The import raises it here on purpose: no timing involved."""
    import subprocess
    import sys
    import tomllib

    script = (
        "import sys\n"
        "class Interrupting:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'radtrt.cli':\n"
        "            raise KeyboardInterrupt  # where a Ctrl-C during torch's import lands\n"
        "sys.meta_path.insert(0, Interrupting())\n"
        "from radtrt.entry import main\n"
        "main()\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.count("radtrt: interrupted") == 1 and proc.stdout == "", proc.stderr  # said, and once
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["radtrt"] == "radtrt.entry:main"
