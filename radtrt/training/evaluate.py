"""Held-out check for models trained on phantoms: generate reports, compare finding labels.

Reports are generated through ``radtrt infer``'s own pipeline (study reading, preprocessing,
prompt with the row's indication, greedy decoding), then the phrase labeler reads labels from the
generated and the reference findings; micro-F1 between them is the number the default model must
reach (>= 0.8). Studies are read from the row's ``study`` (DICOM folder) when it has one, else
from ``image``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from radtrt.data.labeler import F1Report, extract_labels, label_f1
from radtrt.data.manifest import ManifestRow, read_manifest
from radtrt.errors import fail
from radtrt.model.loading import LoadedModel
from radtrt.progress import make_progress
from radtrt.runtime.backends import TorchBackend
from radtrt.runtime.pipeline import Pipeline


@dataclass
class Evaluation:
    f1: F1Report
    reports: list[str]
    references: list[str]

    def to_dict(self) -> dict[str, object]:
        return {**self.f1.to_dict(), "examples": [{"generated": g, "reference": r}
                                                  for g, r in zip(self.reports[:5], self.references[:5])]}


def study_path(row: ManifestRow, root: Path) -> Path:
    study = row.extra.get("study")
    return root / study if isinstance(study, str) else row.image_path(root)


def evaluate_findings(loaded: LoadedModel, manifest: Path, *, limit: int | None = None, max_new_tokens: int = 160,
                      use_indication: bool = True, console: Console | None = None) -> Evaluation:
    rows = read_manifest(manifest)[:limit]
    for number, row in enumerate(rows, 1):  # before any report is generated, not after all the others were
        if not study_path(row, manifest.parent).exists():
            fail(f"{manifest}:{number}: study not found: {study_path(row, manifest.parent)}")
    loaded.model.eval()
    pipeline = Pipeline(TorchBackend(loaded.model), loaded.tokenizer, loaded.model.cfg, model_name=loaded.name)
    reports = []
    with make_progress(console=console or Console(stderr=True), transient=True) as progress:
        task = progress.add_task("generating reports", total=len(rows))
        for row in rows:
            result = pipeline.run(study_path(row, manifest.parent), max_new_tokens=max_new_tokens,
                                  indication=row.indication if use_indication else None)
            reports.append(result.report)
            progress.advance(task)
    references = [row.findings for row in rows]
    truth = [list(row.labels) if row.labels is not None else extract_labels(row.findings) for row in rows]
    return Evaluation(label_f1([extract_labels(r) for r in reports], truth), reports, references)
