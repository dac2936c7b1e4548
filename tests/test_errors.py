"""The user-facing error: its line, and the problem and remedy a caller with a better remedy can take apart."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from radtrt.errors import RadtrtError, fail


def test_a_remedy_given_apart_ends_the_line_and_can_be_left_out() -> None:
    with pytest.raises(RadtrtError) as info:
        fail("bundle b is damaged (x)", remedy="re-export the bundle")
    assert str(info.value) == "bundle b is damaged (x): re-export the bundle"
    assert (info.value.problem, info.value.remedy) == ("bundle b is damaged (x)", "re-export the bundle")
    with pytest.raises(RadtrtError) as plain:
        fail("no such study")
    assert str(plain.value) == plain.value.problem == "no such study" and plain.value.remedy is None
    # DataLoader workers send errors back pickled: the line survives
    assert str(pickle.loads(pickle.dumps(info.value))) == str(info.value)


def test_json_records_carry_undecodable_file_names_as_valid_unicode(capsys: pytest.CaptureFixture[str]) -> None:
    """A file named with a byte that is not UTF-8 reached --json as a lone surrogate, which strict parsers reject."""
    import json
    import os

    from radtrt.cli import _print_results
    from radtrt.errors import valid_unicode
    from radtrt.runtime.pipeline import StudyFailure

    name = os.fsdecode(b"/data/bad\xff.dcm")
    assert valid_unicode(name) == "/data/bad\\xff.dcm"
    assert valid_unicode("cough \ud800") == "cough \\ud800" and valid_unicode("épanchement") == "épanchement"
    _print_results([StudyFailure(study=name, error=f"{name}: not a DICOM file")], as_json=True)
    line = capsys.readouterr().out.strip()
    record = json.loads(line)
    assert record["study"] == "/data/bad\\xff.dcm" and record["error"].startswith("/data/bad\\xff.dcm: ")
    line.encode("utf-8")  # no surrogate escape in the line, and none in what it parses to
    json.dumps(record, ensure_ascii=False).encode("utf-8")


def test_stderr_lines_write_undecodable_file_names_as_the_json_records_do(capsys: pytest.CaptureFixture[str]) -> None:
    """stderr said ``bad\\udcfe.dcm`` (Python's escape of the lone surrogate) where the --json record said
    ``bad\\xfe.dcm``: the error line, warnings and progress lines (``plain``) now say what the record says."""
    import os

    from radtrt.cli_support import print_error
    from radtrt.errors import printable
    from radtrt.progress import plain

    name = os.fsdecode(b"bad\xfe.dcm")
    assert printable(f"{name}: not a DICOM file\n") == "bad\\xfe.dcm: not a DICOM file\\n"
    assert plain(f"structured report of {name}").plain == "structured report of bad\\xfe.dcm"
    print_error(f"{name}: not a DICOM file")
    assert capsys.readouterr().err == "radtrt: error: bad\\xfe.dcm: not a DICOM file\n"


def test_printed_commands_paste_whatever_the_file_names(tmp_path: Path) -> None:
    """A run folder named with a byte that is not UTF-8 was printed as 'radtrt train resume '/runs/nu\\udcffrun'',
    and as '...nu\\xffrun' once made printable: pasted, either named a folder that does not exist."""
    import os
    import subprocess

    from radtrt.errors import printable, shell_quote

    names = [os.fsdecode(b"nu\xffrun"), "a b", "it's", "line\nbreak", "caf\u00e9", "$HOME", "tab\there"]
    for name in names:
        (tmp_path / name).mkdir()
        pasted = printable(f"radtrt train resume {shell_quote(str(tmp_path / name))}")  # as stderr shows it
        assert "\n" not in pasted
        listed = subprocess.run(["bash", "-c", f"printf '%s' {pasted.split(' ', 3)[3]}"], capture_output=True,
                                check=True).stdout
        assert listed == os.fsencode(str(tmp_path / name)), (name, pasted)
