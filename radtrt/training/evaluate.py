"""Held-out check for models trained on phantoms: generate reports, compare finding labels.

Reports are generated through ``radtrt infer``'s own pipeline (study reading, preprocessing,
prompt with the row's indication, greedy decoding), then the phrase labeler reads labels from the
generated and the reference findings; micro-F1 between them is the number the default model must
reach (>= 0.8). Studies are read from the row's ``image``, as training reads them: a ``study`` field (a
phantom set's DICOM folder, or an accession number in a user's manifest) is not a path to read.

A row's ``labels``, when given, are the truth the generated reports' labels are scored against, so they must
be names the phrase labeler can give: a CheXpert-style name ("Cardiomegaly"), a typo or an empty list could
never be matched, and scored silently as false negatives or positives (micro-F1 0.000, exit 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from radtrt.data.labeler import F1Report, extract_labels, label_f1
from radtrt.data.manifest import ManifestRow, parse_row, read_jsonl
from radtrt.data.vocabulary import NO_FINDING, label_set_problem, pathology_labels, unknown_labels
from radtrt.errors import fail
from radtrt.imaging.views import UNKNOWN_VIEW, is_frontal
from radtrt.model.loading import LoadedModel
from radtrt.progress import make_progress
from radtrt.runtime.backends import TorchBackend
from radtrt.runtime.pipeline import Pipeline
from radtrt.training.data import non_frontal_warning


@dataclass
class Evaluation:
    f1: F1Report
    reports: list[str]
    references: list[str]

    def to_dict(self) -> dict[str, object]:
        return {**self.f1.to_dict(), "examples": [{"generated": g, "reference": r}
                                                  for g, r in zip(self.reports[:5], self.references[:5])]}


def check_labels(labels: tuple[str, ...], where: str) -> None:
    """Refuse truth labels that no generated report's labels could match (``where``: the row's file and line).

    Unknown names are refused as ``Findings.from_labels`` refuses them. An empty list is refused as training's
    trunk stage refuses it: it is not "normal" (that is ``no_finding``), and scored it made every label read from
    the report a false positive. ``no_finding`` beside a pathology, or devices alone, are sets the labeler never
    gives (devices do not count as pathology: a study with only a tube is ``no_finding`` too)."""
    if not labels:
        fail(f"{where}: 'labels' is an empty list; list the study's findings (\"{NO_FINDING}\" for a normal study), "
             f"or leave 'labels' out to have them read from the findings")
    problem = label_set_problem(labels)
    if problem:
        # the remedy that works for unknown names: no mapping from CheXpert's names exists (Edema has no phantom
        # label), and without 'labels' the truth is read from the row's findings, as for any row without them
        remedy = ("; the phrase labeler that scores the reports gives these names only: fix the names, or, for "
                  "another vocabulary's (CheXpert's, as 'radtrt data synthesize' keeps them), leave 'labels' out of "
                  "such rows (jq -c 'del(.labels)') to score against the labels read from their findings, where a "
                  "finding it does not know counts as absent") if unknown_labels(labels) else ""
        fail(f"{where}: {problem}{remedy}")
    pathology = pathology_labels(labels)
    if not pathology and NO_FINDING not in labels:
        fail(f"{where}: 'labels' lists only devices ({', '.join(labels)}); a study without pathology is also "
             f"\"{NO_FINDING}\" (devices are not findings): add it")


def read_rows(manifest: Path, limit: int | None = None) -> list[ManifestRow]:
    """The first ``limit`` rows (all without it), each checked before any report is generated, not after all the
    others were: its image exists, its labels can be scored. Every row is parsed, as training parses them. Errors
    name the file's line (a blank line counts, as in the other manifest readers), not the row's number."""
    rows: list[ManifestRow] = []
    for lineno, obj in read_jsonl(manifest):
        where = f"{manifest}:{lineno}"
        row = parse_row(obj, where)
        if limit is not None and len(rows) >= limit:
            continue
        if not row.image_path(manifest.parent).exists():  # its path not repeated: it may carry a patient's name
            fail(f"{where}: its image is not found (its 'image', relative to the manifest's folder)")
        if row.labels is not None:
            check_labels(row.labels, where)
        rows.append(row)
    if not rows:
        fail(f"manifest {manifest} has no rows")
    return rows


def evaluate_findings(loaded: LoadedModel, manifest: Path, *, limit: int | None = None, max_new_tokens: int = 160,
                      use_indication: bool = True, console: Console | None = None) -> Evaluation:
    rows = read_rows(manifest, limit)
    loaded.model.eval()
    pipeline = Pipeline(TorchBackend(loaded.model), loaded.tokenizer, loaded.model.cfg, model_name=loaded.name)
    reports = []
    lines = [lineno for lineno, _ in read_jsonl(manifest)]  # read_rows keeps the first rows, in order
    where = [f"{manifest}:{lineno}" for lineno in lines]
    non_frontal: list[tuple[int, str]] = []  # said as training says it: a lateral row's score is not LLaVA-Rad's
    with make_progress(console=console or Console(stderr=True), transient=True) as progress:
        task = progress.add_task("generating reports", total=len(rows))
        for i, row in enumerate(rows):
            # named by its line, as training names it: the image's path may carry a patient's name
            result = pipeline.run(row.image_path(manifest.parent), max_new_tokens=max_new_tokens,
                                  indication=row.indication if use_indication else None,
                                  shown_as=f"{where[i]} (its image)")
            reports.append(result.report)
            if result.view_position != UNKNOWN_VIEW and not is_frontal(result.view_position):
                non_frontal.append((i, result.view_position))
            progress.advance(task)
    if non_frontal:
        (console or Console(stderr=True)).print(non_frontal_warning(where, non_frontal), markup=False,
                                                highlight=False, soft_wrap=True)
    references = [row.findings for row in rows]
    truth = [list(row.labels) if row.labels is not None else extract_labels(row.findings) for row in rows]
    return Evaluation(label_f1([extract_labels(r) for r in reports], truth), reports, references)
