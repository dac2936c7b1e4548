"""``radtrt train eval``'s reading of its manifest: every row is checked before a model runs (no model needed here)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from radtrt.errors import RadtrtError
from radtrt.training import evaluate


class ReachedTheModel(Exception):
    """Raised where generation would start: every row was accepted."""


class _Model:
    def eval(self) -> None:
        raise ReachedTheModel


MODEL = SimpleNamespace(model=_Model())  # in place of a LoadedModel: the rows are checked before it is touched


def _manifest(tmp_path: Path, *rows: dict[str, object]) -> Path:
    """Rows after a blank line (so file lines and row numbers differ), each image an existing empty file."""
    (tmp_path / "png").mkdir(exist_ok=True)
    for name in ("a", "b"):
        (tmp_path / "png" / f"{name}.png").touch()
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("\n" + "".join(json.dumps(r) + "\n" for r in rows))
    return manifest


GOOD = {"image": "png/a.png", "findings": "The heart is enlarged.", "labels": ["cardiomegaly"]}


@pytest.mark.parametrize("labels, said", [
    (["Cardiomegaly"], "unknown phantom label(s) ['Cardiomegaly']; known: no_finding, cardiomegaly"),  # CheXpert's
    (["cardiomegally"], "unknown phantom label(s) ['cardiomegally']"),
    ([], "'labels' is an empty list; list the study's findings (\"no_finding\" for a normal study)"),
    (["no_finding", "cardiomegaly"], "labels say both no_finding and cardiomegaly"),
    (["endotracheal_tube"], "'labels' lists only devices (endotracheal_tube)"),
])
def test_labels_the_labeler_cannot_give_are_refused_with_their_line(tmp_path: Path, labels: list[str],
                                                                     said: str) -> None:
    """Scored, they gave micro-F1 0.000 and exit 0: every generated label a false positive."""
    manifest = _manifest(tmp_path, GOOD, {**GOOD, "image": "png/b.png", "labels": labels})
    with pytest.raises(RadtrtError) as e:
        evaluate.evaluate_findings(MODEL, manifest)  # type: ignore[arg-type]
    assert str(e.value).startswith(f"{manifest}:3: {said}"), str(e.value)


def test_chexpert_labels_are_told_the_remedy_that_works(tmp_path: Path) -> None:
    """A 'data synthesize' manifest keeps CheXpert's names in 'labels' ({"Edema": 1} rows): the refusal listed the
    phantom names and stopped there. Without 'labels' the same rows are read from their findings, as it now says."""
    row = {**GOOD, "image": "png/b.png", "findings": "There is pulmonary edema.", "labels": ["Edema"]}
    with pytest.raises(RadtrtError) as e:
        evaluate.evaluate_findings(MODEL, _manifest(tmp_path, GOOD, row))  # type: ignore[arg-type]
    assert "unknown phantom label(s) ['Edema']" in str(e.value) and "leave 'labels' out of such rows" in str(e.value)
    assert "counts as absent" in str(e.value)
    without = {key: value for key, value in row.items() if key != "labels"}
    with pytest.raises(ReachedTheModel):  # the remedy: the rows are accepted
        evaluate.evaluate_findings(MODEL, _manifest(tmp_path, GOOD, without))  # type: ignore[arg-type]
    from radtrt.data.labeler import extract_labels

    assert extract_labels(without["findings"]) == ["no_finding"]  # what "counts as absent" means for such a row


def test_the_image_is_read_not_the_study_field(tmp_path: Path) -> None:
    """Training reads 'image'; eval read 'study' as a path ("study not found: ph/ACC-0")."""
    with pytest.raises(ReachedTheModel):
        evaluate.evaluate_findings(MODEL, _manifest(tmp_path, {**GOOD, "study": "ACC-0"}))  # type: ignore[arg-type]
    manifest = _manifest(tmp_path, GOOD, {**GOOD, "image": "png/gone.png", "study": "png"})
    # the row's 'image' named, not its path (which may carry a patient's name)
    with pytest.raises(RadtrtError, match=f"^{manifest}:3: its image is not found \\(its 'image', relative") as e:
        evaluate.evaluate_findings(MODEL, manifest)  # type: ignore[arg-type]
    assert "gone.png" not in str(e.value)


def test_messages_count_file_lines_and_limit_checks_only_the_rows_scored(tmp_path: Path) -> None:
    """':2' named the second row, on the file's third line (a blank line first)."""
    manifest = _manifest(tmp_path, GOOD, {**GOOD, "image": "png/gone.png"})
    with pytest.raises(RadtrtError, match=r"manifest.jsonl:3: its image is not found"):
        evaluate.evaluate_findings(MODEL, manifest)  # type: ignore[arg-type]
    manifest = _manifest(tmp_path, GOOD, {**GOOD, "labels": ["Edema"]})
    with pytest.raises(ReachedTheModel):
        evaluate.evaluate_findings(MODEL, manifest, limit=1)  # type: ignore[arg-type]
    with pytest.raises(RadtrtError, match=r"manifest.jsonl:3: unknown"):
        evaluate.evaluate_findings(MODEL, manifest, limit=2)  # type: ignore[arg-type]
    with pytest.raises(ReachedTheModel):  # devices beside no_finding, as the labeler gives them
        manifest = _manifest(tmp_path, {**GOOD, "labels": ["no_finding", "central_line"]})
        evaluate.evaluate_findings(MODEL, manifest)  # type: ignore[arg-type]
