"""``radtrt calibrate`` and the export's ``--calibration-data`` as library calls.

``--calibration-data`` names a data source (folder or manifest), a calibration file written by
``radtrt calibrate``, or the word ``phantom``: a seeded synthetic set made on the fly with
``radtrt.data`` (PNG only, so its bytes and hash are the same every time). Held-out samples for the
parity gate come after the calibration samples in the same source, or from phantoms of another
seed when the source has no more.
"""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from radtrt.calibration.file import CALIBRATION_FORMAT, CalibrationFile, build_meta, read_metadata
from radtrt.calibration.samples import (Sample, SampleSet, count_samples, held_out, load_samples,
                                       screen_held_out, source_entries)
from radtrt.calibration.stats import collect_stats
from radtrt.errors import fail
from radtrt.model.io import is_safetensors
from radtrt.model.loading import LoadedModel
from radtrt.progress import progress_callback

PHANTOM = "phantom"
PHANTOM_CALIBRATION_SEED = 11  # the default model trains on seeds 1 and 2: calibration and held-out differ
PHANTOM_HELDOUT_SEED = 12
DEFAULT_N = 32


@dataclass
class Calibration:
    """A calibration file, and the samples read to make it (none when an existing file was reused)."""

    file: CalibrationFile
    samples: list[Sample]
    path: Path | None = None  # where the file came from, when it was given rather than made


def _preparer(loaded: LoadedModel) -> Callable[[Path, str | None], tuple[Any, torch.Tensor, list[int]]]:
    """Exactly ``radtrt infer``'s preprocessing and prompt (``Pipeline.prepare``)."""
    from radtrt.runtime.backends import TorchBackend
    from radtrt.runtime.pipeline import Pipeline

    pipeline = Pipeline(TorchBackend(loaded.model), loaded.tokenizer, loaded.model.cfg, loaded.name)

    def prepare(study: Path, indication: str | None) -> tuple[Any, torch.Tensor, list[int]]:
        p = pipeline.prepare(study, indication=indication)
        return p.image, p.pixels, p.prompt_ids

    return prepare


@contextmanager
def phantom_source(n: int, seed: int, progress: Any = None) -> Iterator[Path]:
    """A temporary PNG phantom set of ``n`` images (seeded); yields its manifest."""
    from rich.console import Console

    from radtrt.data.phantom_set import write_phantom_set

    with tempfile.TemporaryDirectory(prefix="radtrt-phantoms-") as tmp:
        # inside a running progress display a second live display on its console is an error: write quietly
        console = Console(stderr=True, quiet=progress is not None)
        yield write_phantom_set(Path(tmp) / "phantoms", n, seed, formats=("png",), console=console)


def calibrate(loaded: LoadedModel, data: Path, n: int = DEFAULT_N, *, skip: int = 0, source: dict | None = None,
              progress: Any = None) -> Calibration:
    """Read ``n`` samples from ``data`` and collect the vision and decoder statistics.

    Casts ``loaded.model`` to fp32 in place (not a copy: at 7B a second copy is 28 GB): statistics are taken in
    fp32, as the INT8 export that uses them quantizes the fp32 model."""
    model = loaded.model.float().eval()
    samples = load_samples(data, n, _preparer(loaded), skip=skip,
                           on_sample=progress_callback(progress, f"reading {n} calibration samples", n))
    return _collect(loaded, samples if source is None else SampleSet(samples.root, samples.samples, source),
                    model, progress)


def _collect(loaded: LoadedModel, samples: SampleSet, model: Any, progress: Any) -> Calibration:
    n = len(samples.samples)
    collected = collect_stats(model, loaded.tokenizer, samples.samples,
                              description=f"radtrt calibration, sample-list sha256 {samples.hash[:16]}",
                              on_sample=progress_callback(progress, f"collecting activation statistics on {n} samples", n))
    cfg = model.cfg
    method = {"decoder": "per-channel absmax of linear inputs and outputs (forward hooks, fp32 torch), on v1 "
                         "prompt + image embeddings + findings answer where the data has findings",
              "vision": "per-channel absmax of linear/conv inputs and outputs (forward hooks, fp32 torch)",
              "decoder_tokens": collected.tokens, "samples_with_findings": collected.with_findings}
    preprocess = {"image_size": cfg.vision.img_size, "mean": list(cfg.image_mean), "std": list(cfg.image_std),
                  "pipeline": "radtrt.runtime.pipeline.Pipeline.prepare"}
    meta = build_meta(model=model, model_name=loaded.name, refs=samples.refs, root=samples.root,
                      source=samples.source, method=method, preprocess=preprocess)
    return Calibration(CalibrationFile(meta, collected.decoder, collected.vision), samples.samples)


def calibrate_phantoms(loaded: LoadedModel, n: int, seed: int = PHANTOM_CALIBRATION_SEED,
                       progress: Any = None) -> Calibration:
    with phantom_source(n, seed, progress) as manifest:
        return calibrate(loaded, manifest, n, source={"kind": PHANTOM, "seed": seed, "n": n, "formats": ["png"]},
                         progress=progress)


def is_calibration_file(path: Path) -> bool:
    return is_safetensors(path) and read_metadata(path).get("format") == CALIBRATION_FORMAT


def means_phantoms(data: str, *, calibration_files: bool = False) -> bool:
    """Whether ``--data`` / ``--calibration-data`` asks for synthetic phantoms. The keyword is also a folder name
    ``radtrt data phantoms -o phantom`` may well have made: were it taken as the keyword there, the user's own
    folder would be ignored without a word, so that case is refused. A file of that name cannot be given as
    ``./phantom`` instead: a manifest is told apart by its suffix, which it lacks, so the remedy is a rename to what
    the option takes (``calibration_files``: ``--calibration-data`` also takes a ``radtrt calibrate`` file)."""
    if data != PHANTOM:
        return False
    if Path(data).is_dir():
        fail(f"'{data}' names the synthetic phantoms, and ./{data} exists here: give ./{data} to calibrate on that "
             f"folder, or run from another folder for synthetic phantoms")
    if Path(data).exists():
        kinds = f"{data}.jsonl if it is a JSONL manifest"
        if calibration_files:
            kinds += f", {data}.safetensors if it is a 'radtrt calibrate' file"
        fail(f"'{data}' names the synthetic phantoms, and a file ./{data} exists here: to calibrate on it, rename "
             f"it to {kinds}; or run from another folder for synthetic phantoms")
    return True


def resolve_calibration(loaded: LoadedModel, data: str | None, n: int = DEFAULT_N, *,
                        progress: Any = None) -> Calibration:
    """What ``--calibration-data`` names, as statistics plus the samples' pixels; refuses when missing."""
    if data is None:
        fail("INT8 export needs calibration data: pass --calibration-data DIR|MANIFEST|CALIB_FILE "
             "(chest X-ray studies, or a 'radtrt calibrate' file), or '--calibration-data phantom' for synthetic "
             "phantoms")
    if means_phantoms(data, calibration_files=True):
        return calibrate_phantoms(loaded, n, progress=progress)
    path = Path(data)
    if is_safetensors(path):  # one that is not a calibration file is told so
        return reuse(loaded, path)
    return calibrate(loaded, path, n, progress=progress)


def reuse(loaded: LoadedModel, path: Path) -> Calibration:
    """A calibration file, checked against the model. Its statistics are all an export needs (the vision
    Q/DQ scales, SmoothQuant factors, KV-cache scales), so the images it was made from need not be present."""
    file = CalibrationFile.load(path)
    file.check_model(loaded.model.float().eval(), path)
    return Calibration(file, [], path)


def heldout_samples(loaded: LoadedModel, calibration: Calibration, k: int, *,
                    progress: Any = None) -> tuple[list[Sample], str]:
    """``k`` samples not used for calibration, and a line saying where they came from."""
    source = calibration.file.meta["source"]
    calibrated = {ref.sha256 for ref in calibration.file.refs}
    note = ""
    kind = source.get("kind")
    # The line goes into the bundle's manifest, so it names the kind of source, never its path (folders name patients).
    data, used = _heldout_source(calibration.file)
    if kind in ("manifest", "folder") and data is None:
        note = f"; this calibration file does not name its {kind} (a bundle's copy)"
    elif data is not None and not data.exists():
        # a reused calibration file needs no images (``reuse``): the gate then runs on phantoms, and says why
        note = f"; the calibration {kind} is not on this machine"
    elif data is not None:
        with held_out():  # past the rows checked up front, where the calibration set repeats an image
            found = _unseen(data, k, used, calibrated, _preparer(loaded))
        if len(found) == k:
            return found, f"{k} held-out samples of the calibration {kind} (after the {used} calibration ones)"
        images = f"{len(found)} image{'' if len(found) == 1 else 's'}"
        note = f"; the calibration {kind} holds {images} besides the {used} it was calibrated on, fewer than {k}"
    # phantoms of another seed than the calibration's are other images (each depends on seed and index)
    seed = PHANTOM_HELDOUT_SEED + (source.get("kind") == PHANTOM and source.get("seed") == PHANTOM_HELDOUT_SEED)
    with phantom_source(k, seed, progress) as manifest:
        found = [s for s in load_samples(manifest, k, _preparer(loaded)).samples if s.ref.sha256 not in calibrated]
        if len(found) < k:
            fail(f"the held-out phantoms (seed {seed}) repeat images of the calibration set; calibrate with "
                 f"another --seed")
        return found, f"{k} held-out synthetic phantoms (seed {seed}){note}"


def _heldout_source(file: CalibrationFile) -> tuple[Path | None, int]:
    """(the folder or manifest a calibration file was made from, where it names one; how many of its samples the
    calibration read): the parity gate's held-out studies are the ones after those."""
    source = file.meta["source"]
    if source.get("kind") not in ("manifest", "folder") or "path" not in source:
        return None, 0
    return Path(source["path"]), int(source.get("skip", 0)) + int(source.get("n", file.n))


def check_heldout(file: CalibrationFile, k: int) -> None:
    """Before the model loads (minutes at 7B), for an export given a calibration file: the ``k`` studies after the
    calibrated ones in its folder or manifest, which the parity gate reads where present, pass what reading checks,
    as ``check_samples`` checks them for an export given the folder itself (a lateral-only study there failed the
    export after calibration and quantization)."""
    data, used = _heldout_source(file)
    try:  # a folder this user cannot enter: a PermissionError traceback
        there = data is not None and data.exists()
    except OSError as e:
        fail(f"the calibration data {data} the parity gate reads its held-out studies from cannot be read "
             f"({e.strerror or e}): give it read access, or skip the gate with --parity-samples 0")
    if k and there:
        assert data is not None
        screen_held_out(source_entries(data)[1][used:used + k])


def _unseen(data: Path, k: int, skip: int, calibrated: set[str], prepare: Any) -> list[Sample]:
    """Up to ``k`` samples after the first ``skip`` whose images are neither calibration images nor each
    other's: a manifest may list an image twice, and a folder may have changed since the calibration."""
    total = count_samples(data)
    found: list[Sample] = []
    seen = set(calibrated)
    while len(found) < k and skip < total:
        batch = load_samples(data, min(k - len(found), total - skip), prepare, skip=skip).samples
        skip += len(batch)
        for sample in batch:
            if sample.ref.sha256 not in seen:
                seen.add(sample.ref.sha256)
                found.append(sample)
    return found
