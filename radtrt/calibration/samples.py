"""Calibration samples: which studies, their identity (a hash), and their model inputs.

A data source is a JSONL manifest (``{image, findings, indication, ...}``, paths relative to its
folder), a folder holding ``manifest.jsonl`` (a phantom set), or a folder whose entries are studies
(a DICOM file or study folder, a PNG/JPEG). The first ``n`` usable samples are taken in manifest
order (folders: sorted by name); ``skip`` leaves out the first ones, so held-out samples come after
the calibration ones in the same source.

Every sample goes through exactly what ``radtrt infer`` does before the model (``Pipeline.prepare``:
study selection, DICOM pipeline, open_clip transform, prompt tokenization). A sample is identified
by the file the pixels came from (path relative to the data root, and its sha256); the set's hash is
the sha256 over the sorted file sha256s, so it names the images' contents, not their order, their names
or where the folder lives (a bundle's copy of a calibration file drops the paths and still verifies).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from radtrt.errors import RadtrtError, fail
from radtrt.model.io import sha256_file

MANIFEST_NAME = "manifest.jsonl"


@dataclass(frozen=True)
class SampleRef:
    """One calibration sample: its study, the file the pixels came from, and its text (if any).

    ``to_json`` (what a calibration file and a bundle keep) records the text only as a sha256: the
    findings and indication are clinical text of the user's data set and must not travel with a
    bundle; re-using a calibration needs only the pixels.
    """

    study: str | None  # relative to the data root (as the manifest names it); None in a bundle's copy
    file: str | None  # the file the image was read from, relative to the data root; None in a bundle's copy
    sha256: str
    findings: str | None = None
    indication: str | None = None
    labels: tuple[str, ...] | None = None

    @property
    def text_sha256(self) -> str | None:
        if self.findings is None and self.indication is None:
            return None
        return hashlib.sha256(json.dumps([self.indication, self.findings]).encode()).hexdigest()

    def to_json(self) -> dict[str, Any]:
        paths = {"study": self.study, "file": self.file} if self.study is not None else {}
        return paths | {"sha256": self.sha256, "has_findings": self.findings is not None, "text_sha256": self.text_sha256}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "SampleRef":
        return cls(d.get("study"), d.get("file"), d["sha256"])


@dataclass
class Sample:
    """A sample ready for the model: preprocessed pixels ``[3, S, S]`` and its prompt ids."""

    ref: SampleRef
    pixels: torch.Tensor
    prompt_ids: list[int]


@dataclass
class SampleSet:
    root: Path
    samples: list[Sample]
    source: dict[str, Any]  # what the user named: {"kind": "manifest"|"folder"|"phantom", ...}

    @property
    def refs(self) -> list[SampleRef]:
        return [s.ref for s in self.samples]

    @property
    def hash(self) -> str:
        return sample_list_hash(self.refs)



def sample_list_hash(refs: list[SampleRef]) -> str:
    """sha256 over the sorted file sha256s: the paths stay out, so a copy without them verifies too."""
    return hashlib.sha256(json.dumps(sorted(r.sha256 for r in refs)).encode()).hexdigest()


@dataclass(frozen=True)
class Entry:
    """One study of a data source, with what its manifest row says about it (nothing for a folder entry)."""

    study: Path
    findings: str | None = None
    indication: str | None = None
    labels: tuple[str, ...] | None = None


def source_entries(data: Path, what: str = "calibration data") -> tuple[Path, list[Entry], dict[str, Any]]:
    """(data root, candidate studies in order, source description); ``what`` names the source in errors."""
    from radtrt.data.manifest import read_manifest
    from radtrt.imaging.study import screen_study, split_studies
    from radtrt.outputs import broken_link

    if not data.exists():
        fail(f"{what} {data} is {broken_link(data)}" if broken_link(data) else f"{what} not found: {data}")
    manifest = data / MANIFEST_NAME if data.is_dir() else data
    try:
        listed = data.is_dir() and any(not p.name.startswith(".") for p in data.iterdir())
        is_manifest = manifest.is_file() and (data.is_dir() or data.suffix in (".jsonl", ".json"))
    except OSError as e:  # a folder without read permission: a PermissionError traceback
        fail(f"cannot read {what} {data} ({e.strerror or e})")
    if is_manifest:
        root = manifest.parent
        rows = read_manifest(manifest, findings_required=False)  # who needs findings says so (bench parity)
        entries = [Entry(r.image_path(root), r.findings, r.indication, r.labels) for r in rows]
        return root, entries, {"kind": "manifest", "path": str(manifest.resolve())}
    if not data.is_dir():
        fail(f"{what} {data} is neither a folder nor a JSONL manifest (.jsonl)")
    if not listed:
        fail(f"{what} folder {data} is empty")
    studies = split_studies(data, images_apart=True)  # infer's rule: a PACS study's series are one study
    if studies == [data]:  # the folder of one study (frontal + lateral), not a folder of studies
        # said before any count: "has 1 samples; 32 are needed" sent the user looking for 31 more studies
        kind = not_studies(data)
        if kind:
            fail(f"{what} {data} is {kind}, not chest X-ray studies: give a study folder, a folder of studies or "
                 f"a JSONL manifest")
        screen_study(data)  # a folder without a usable image says so
        return data.parent, [Entry(data)], {"kind": "folder", "path": str(data.resolve())}
    return data, [Entry(p) for p in studies], {"kind": "folder", "path": str(data.resolve())}


def not_studies(folder: Path) -> str | None:
    """What a folder given as studies holds instead, from its marker files (None: nothing known): a model
    folder or a bundle was read as one study without images."""
    from radtrt.model.loading import ADAPTER_FILES, RUN_MARKS, is_bundle

    def has(*names: str) -> bool:
        return any((folder / name).is_file() for name in names)

    if is_bundle(folder):  # the rule --model and --base-model use
        return "an ONNX bundle"
    if has(*RUN_MARKS):
        return "a training run folder"
    if has("config.json") and has("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                                  "pytorch_model.bin.index.json", "non_lora_trainables.bin", *ADAPTER_FILES):
        return "a model folder"
    if has(*ADAPTER_FILES):
        return "a LoRA adapter folder"
    return None


def _relative(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())  # outside the root (an absolute manifest path): kept absolute


def count_samples(data: Path) -> int:
    """How many samples ``data`` lists (manifest rows, or folder entries)."""
    return len(source_entries(data)[1])


def _check_count(data: Path, available: int, n: int, skip: int) -> None:
    if n < 1:
        fail(f"the number of calibration samples must be at least 1, got {n}")
    if available - skip < n:
        fail(f"calibration data {data} has {available} samples; {skip + n} are needed "
             + (f"({n} after skipping {skip})" if skip else
                "(export --calibration-n, calibrate --n; a few dozen chest X-rays calibrate well)"))


def check_samples(data: Path, n: int, *, held_out: int = 0) -> None:
    """Before the model loads (minutes at 7B): ``data`` has ``n`` samples, and each one's headers, and those of the
    ``held_out`` after them that an INT8 export's parity gate reads where present, pass what reading checks (a CT
    or a lateral-only study among them failed the export after the load, calibration and quantization)."""
    from radtrt.imaging.study import screen_study

    entries = source_entries(data)[1]
    _check_count(data, len(entries), n, 0)
    for entry in entries[:n]:
        screen_study(entry.study)
    screen_held_out(entries[n:n + held_out])


@contextlib.contextmanager
def held_out() -> Iterator[None]:
    """A study failing inside is the parity gate's held-out study, and is said to be: a file the user never named
    ("phantom-00004.png: not a DICOM file") failed the export with no word of the gate, or of skipping it."""
    try:
        yield
    except RadtrtError as e:
        fail(f"{e} (a held-out study the INT8 parity gate reads after the calibration ones)",
             remedy="fix it or take it out of the data, or skip the gate with --parity-samples 0")


def screen_held_out(entries: list[Entry]) -> None:
    """``screen_study`` for the parity gate's held-out studies (``held_out``)."""
    from radtrt.imaging.study import screen_study

    with held_out():
        for entry in entries:
            screen_study(entry.study)


def load_samples(data: Path, n: int, prepare: Callable[[Path, str | None], tuple[Any, torch.Tensor, list[int]]],
                 *, skip: int = 0, on_sample: Callable[[int], None] | None = None) -> SampleSet:
    """The first ``n`` samples after ``skip``, read with ``prepare`` (the inference preprocessing).

    ``prepare(study, indication)`` returns ``(selected image, pixels, prompt ids)``. A study that
    fails to read fails the calibration: calibrating on a silently different set is worse.
    """
    root, entries, source = source_entries(data)
    _check_count(data, len(entries), n, skip)
    chosen = entries[skip:skip + n]
    samples = []
    for i, entry in enumerate(chosen):
        image, pixels, prompt_ids = prepare(entry.study, entry.indication)
        ref = SampleRef(_relative(entry.study, root), _relative(image.source_file, root),
                        sha256_file(image.source_file), entry.findings, entry.indication, entry.labels)
        samples.append(Sample(ref, pixels, prompt_ids))
        if on_sample:
            on_sample(i + 1)
    return SampleSet(root, samples, {**source, "skip": skip, "n": n})
