"""JSONL manifests: one image-report pair per line, ``{image, findings, indication, labels, ...}``.

``image`` is a study path (DICOM file or folder, PNG, JPEG) relative to the manifest's folder
(or absolute); ``findings`` the report's findings text; ``indication`` optional; ``labels`` an
optional list of finding label names. Other keys are kept as they are (provenance such as
``synthesis`` or ``phantom``). Errors name the file and line, never the content, which may be
clinical text.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from radtrt.errors import fail
from radtrt.model.prompt import IMAGE_TOKEN
from radtrt.outputs import make_dir, replaced_atomically


@dataclass(frozen=True)
class ManifestRow:
    image: str
    findings: str | None  # None only where the reader allows it (calibration, benchmarks: pixels and prompts)
    indication: str | None = None
    labels: tuple[str, ...] | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def image_path(self, root: Path) -> Path:
        path = Path(self.image)
        return path if path.is_absolute() else root / path

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"image": self.image, "findings": self.findings, "indication": self.indication}
        if self.labels is not None:
            d["labels"] = list(self.labels)
        return {**d, **self.extra}


def text_lines(path: Path, where: Callable[[int], str], expected: str, *,
               complete_only: bool = False) -> Iterator[tuple[int, str]]:
    """(line number, text) of each non-blank line of a UTF-8 file; ``complete_only`` skips a last line
    without its newline (a writer killed mid-line).

    Lines are decoded one by one so that a binary or mis-encoded file (an image or archive passed by
    mistake) is refused with its line number (``where(lineno)``) instead of a decoder traceback.
    """
    with path.open("rb") as handle:
        for lineno, raw in enumerate(handle, 1):
            if complete_only and not raw.endswith(b"\n"):
                return
            try:  # a byte-order mark (Windows editors write one) is not part of the first line's JSON
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError:
                fail(f"{where(lineno)}: not UTF-8 text ({expected} is expected)")
            if line.strip():
                yield lineno, line


def read_jsonl(path: Path, *, complete_only: bool = False, what: str = "manifest", row: str = "manifest row",
               where: Callable[[int], str] | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; anything but a JSON object is refused. ``where`` names a
    line in messages (default PATH:N); ``what`` and ``row`` say what the file and a line of it are."""
    if not path.is_file():
        fail(f"{what} {path} is a folder, not a JSONL file" if path.is_dir() else f"{what} not found: {path}")
    at = where or (lambda n: f"{path}:{n}")
    for lineno, line in text_lines(path, at, f"a JSONL {what}", complete_only=complete_only):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            fail(f"{at(lineno)}: not valid JSON ({e.msg})")
        except (RecursionError, ValueError) as e:  # nested too deeply; an integer of more than 4300 digits
            fail(f"{at(lineno)}: not a {row} ({type(e).__name__}: JSON nested too deeply or a number too long)")
        if not isinstance(obj, dict):
            fail(f"{at(lineno)}: each line must be a JSON object")
        yield lineno, obj


def optional_str(obj: dict[str, Any], key: str, where: str) -> str | None:
    """A string field that may be absent (stripped; blank is none); anything but a string is refused in one line,
    here and where synthesized rows are made, so that a number is never turned into "none" silently."""
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        fail(f"{where}: '{key}' must be a string or null")
    return value.strip() or None if isinstance(value, str) else None


def parse_row(obj: dict[str, Any], where: str, *, findings_required: bool = True) -> ManifestRow:
    """One validated row; without ``findings_required`` a row may omit its findings: calibration uses them where
    rows have them, and benchmarks only for --predictions-out, so a manifest of unreported studies serves both."""
    image = obj.get("image")
    if not isinstance(image, str) or not image:
        fail(f"{where}: 'image' (a study path) is missing or not a string")
    findings = obj.get("findings") if findings_required else optional_str(obj, "findings", where)
    if findings_required and (not isinstance(findings, str) or not findings.strip()):
        fail(f"{where}: 'findings' is missing, empty or not a string")
    labels = obj.get("labels")
    if labels is not None and (not isinstance(labels, list) or not all(isinstance(x, str) for x in labels)):
        fail(f"{where}: 'labels' must be a list of label names")
    indication = optional_str(obj, "indication", where)
    for key, text in (("indication", indication), ("findings", findings)):
        if text and IMAGE_TOKEN in text:  # build_query's refusal named no row; in findings it spliced a second image
            fail(f"{where}: its '{key}' contains the image placeholder {IMAGE_TOKEN}; remove it")
    extra = {k: v for k, v in obj.items() if k not in ("image", "findings", "indication", "labels")}
    return ManifestRow(image, findings.strip() if findings else None, indication,
                       tuple(labels) if labels is not None else None, extra)


def read_manifest(path: Path, *, findings_required: bool = True) -> list[ManifestRow]:
    """All rows of a manifest, validated; an empty manifest is refused."""
    rows = [parse_row(obj, f"{path}:{lineno}", findings_required=findings_required)
            for lineno, obj in read_jsonl(path)]
    if not rows:
        fail(f"manifest {path} has no rows")
    return rows


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> Path:
    """Write atomically (temporary file, then rename): a crash never leaves half a manifest."""
    make_dir(path.parent, "manifest folder")
    with replaced_atomically(path) as tmp, tmp.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
