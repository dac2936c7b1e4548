"""Where ``radtrt bench`` may write its reports, and the command line that reproduces a run.

A report is three files (``-o report.md`` and its ``.json`` and ``.png`` beside it): an existing file is replaced
only when it is an earlier report of this command, proven by its own content, so a user's file is never lost to a
benchmark. The rules live here, beside the library, rather than in the CLI's option handling.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from radtrt.errors import fail, shell_join
from radtrt.outputs import resolved

def reproduce_command(sub: str, options: list[tuple[str, Any]]) -> str:
    """The command line that reproduces a run, every option spelled out (defaults may change)."""
    parts = ["radtrt", "bench", sub]
    for flag, value in options:
        if value is None or value is False:
            continue
        parts += [flag] if value is True else [flag, str(value)]
    return shell_join(parts)


REPORT_KINDS = ("latency", "parity")


def report_files(out: Path) -> tuple[Path, Path, Path]:
    """-o names the Markdown report; its JSON and PNG chart go beside it under the same stem."""
    return out, out.with_suffix(".json"), out.with_suffix(".png")


def is_bench_report(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and data.get("kind") in REPORT_KINDS and "command" in data


def check_report_path(out: Path | None) -> None:
    """Refuse an unusable -o before the (long) benchmark runs, not when its report is written.

    Three files are written, so the two beside -o are checked too: they are replaced only when they are an
    earlier report of this command (its JSON says so); anything else there is the user's and is kept.
    """
    if out is None:
        return
    from radtrt.outputs import check_file_target

    if not out.name or out.is_dir():  # "." or "/" has no name to put .json/.png beside (a ValueError)
        fail(f"-o {out} is a folder; name the Markdown report to write (say {out / 'report.md'})")
    if out.suffix.lower() in (".json", ".png"):
        fail(f"-o {out} names the Markdown report (say report.md); its .json and .png are written beside it")
    files = report_files(out)
    for path in files[1:]:  # "give the file to write": the user gave -o OUT.md, and these names are radtrt's
        if path.is_dir():
            fail(f"{path}, where the {path.suffix[1:].upper()} of -o {out} goes, is a folder: move it away or choose "
                 f"another -o")
    for path in files:
        check_file_target(path, "report")
    theirs = [p for p in files if p.exists() and not is_ours(p)]
    if theirs:
        fail(f"{theirs[0]} already exists and is not part of an earlier radtrt bench report; choose another -o")


def is_ours(path: Path) -> bool:
    """Whether an existing report file is one radtrt bench wrote (each kind checked by its own content)."""
    if path.suffix == ".json":
        return is_bench_report(path)
    if path.suffix == ".png":
        from PIL import Image, UnidentifiedImageError

        from radtrt.benchmarks.chart import CHART_SOFTWARE

        try:
            with Image.open(path) as image:
                return getattr(image, "text", {}).get("Software") == CHART_SOFTWARE
        except (OSError, UnidentifiedImageError):
            return False
    try:
        with path.open(encoding="utf-8") as handle:
            return handle.readline().startswith("# radtrt bench ")
    except (OSError, UnicodeDecodeError):
        return False


def within(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies under it, once links and '..' are resolved (two spellings of one
    place must not pass as two places)."""
    path, folder = resolved(path), resolved(folder)
    return path == folder or folder in path.parents


def check_predictions_apart(predictions_out: Path | None, out: Path | None) -> None:
    """--predictions-out is a folder and -o writes three files: one inside (or above) the other was only found
    when the second was written, after the whole run and with the first already there."""
    if predictions_out is None or out is None:
        return
    for path in report_files(out):
        if within(path, predictions_out) or within(predictions_out, path):
            fail(f"--predictions-out {predictions_out} and the report file {path} (-o {out}) are in each other's "
                 f"way; give the predictions a folder of their own")


def check_outside_studies(studies: Path | None, outputs: list[tuple[str, Path | None]]) -> None:
    """Nothing is written into a --studies folder: its entries are the studies, so a report left there was read
    as a study by the printed reproduce command, and --work-dir exported a random model among them. Nor into
    the folder of a manifest row's image: the chart (a PNG) joined the images there, and a later run over that
    folder (bench, calibrate) took it for a chest X-ray without a word."""
    if studies is None:
        return
    folders = [(studies, f"the --studies folder {studies}")] if studies.is_dir() else []
    # os.path.isfile: Path.is_file raises PermissionError in a folder that cannot be searched; reading the studies
    # then says so, naming the folder (not a manifest.jsonl that is not there)
    if studies.is_file() and studies.suffix in (".jsonl", ".json") or os.path.isfile(studies / "manifest.jsonl"):
        from radtrt.calibration.samples import source_entries

        listed = {e.study if e.study.is_dir() else e.study.parent for e in source_entries(studies, "--studies")[1]}
        folders += [(folder, f"{folder}, a folder of the images the --studies manifest lists")
                    for folder in sorted(listed)]
    named_by = {resolved(folder): named for folder, named in reversed(folders)}  # the first naming wins
    for flag, path in outputs:  # each path's ancestors looked up: a MIMIC-sized manifest lists 10^5 folders
        place = resolved(path) if path is not None else None
        for ancestor in (place, *place.parents) if place is not None else ():
            if ancestor in named_by:
                fail(f"{flag} {path} is inside {named_by[ancestor]}; write outputs elsewhere")


def without_non_finite(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with every inf / NaN float as null, and where each was in ``non_finite`` (``"summary.x"``,
    ``"studies[0].y: inf"``): Python's json wrote them as the bare words Infinity and NaN, which is not JSON (browsers,
    jq, Go and Rust refuse the whole report), exactly when an fp16 overflow is what the report has to show."""
    found: list[str] = []

    def walk(value: Any, where: str) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            found.append(f"{where}: {value}")
            return None
        if isinstance(value, dict):
            return {k: walk(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [walk(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return value

    clean = walk(data, "")
    return clean | {"non_finite": found} if found else clean
