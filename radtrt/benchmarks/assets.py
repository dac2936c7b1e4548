"""What a benchmark runs on: a model directory, a bundle, and studies.

Either the user names them (``--model``, ``--bundle``, ``--studies``) or the bench builds them, so a
single command reproduces a number on any machine: ``--random-model PRESET`` makes random weights of
that preset, saves the model directory and exports a bundle into a cache folder (reused while the
config and bundle format match), and ``--synthetic N`` writes N synthetic DICOM studies.

``vision_only`` keeps the preset's vision tower and projector at full size (the projector's output
width is the decoder's hidden size) but replaces the decoder by a one-layer stub, so the real-size
vision stage can be built and exported where the 7B decoder would not fit in memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from radtrt.calibration.samples import Entry, source_entries
from radtrt.errors import fail
from radtrt.imaging.study import screen_study
from radtrt.model.config import DecoderConfig, LlavaRadConfig, preset

DEFAULT_WORK_DIR = Path(".radtrt-cache/bench")
MAX_SYNTHETIC = 1000
ASSETS_MARKER = "radtrt-bench-assets.json"
STUB_VOCAB = 512  # the random models share the tiny tokenizer; a stub decoder needs no larger table
UNLOCKABLE = ("two bench runs sharing a --work-dir would delete each other's random-model builds: choose a "
              "--work-dir on a local file system")


@dataclass(frozen=True)
class Assets:
    """Where the model directory and the bundle are; either may be None when not given or built."""

    model_dir: Path | None
    bundle: Path | None
    label: str  # how reports name the model, e.g. "mid (random weights, seed 0)"
    built: bool = False  # built by this process (--random-model, not from the cache): its libraries stay loaded


def vision_only_config(cfg: LlavaRadConfig) -> LlavaRadConfig:
    """Same trunk and projector; a 1-layer decoder stub of the same width (one KV head, tiny MLP)."""
    d = cfg.decoder
    stub = DecoderConfig(vocab_size=STUB_VOCAB, hidden_size=d.hidden_size, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=d.num_attention_heads, num_key_value_heads=1,
                         max_position_embeddings=d.max_position_embeddings)
    return dataclasses.replace(cfg, decoder=stub)


def random_config(preset_name: str, vision_only: bool) -> LlavaRadConfig:
    cfg = preset(preset_name)
    return vision_only_config(cfg) if vision_only else cfg


def check_vs_bundle_fits(preset_name: str, vision_only: bool, vs_bundle: Path) -> None:
    """Before a random model is built: ``--vs-bundle`` must hold the model it builds (the same config). Found
    after the build, the mismatch read "the two bundles hold different models"; with ``--stages vision`` the
    build is the vision-only stub, which a bundle of the full preset (the usual --vs-bundle) is not."""
    from radtrt.exporter.bundle import MODEL_CONFIG
    from radtrt.model.io import read_json

    if not vs_bundle.is_dir():
        fail(f"--vs-bundle {vs_bundle} is not a folder (a bundle from 'radtrt export')")
    theirs = LlavaRadConfig.from_dict(read_json(vs_bundle / MODEL_CONFIG), remedy="export the bundle again",
                                      where=f"{vs_bundle / MODEL_CONFIG}")
    if theirs == random_config(preset_name, vision_only):
        return
    if vision_only and theirs == random_config(preset_name, False):
        fail(f"--stages vision with --random-model {preset_name} builds a vision-only model (a 1-layer decoder stub), "
             f"not the full model of --vs-bundle {vs_bundle}; drop --stages vision (full runs time the vision stage "
             f"too), or give --bundle for the first side")
    fail(f"--vs-bundle {vs_bundle} holds another model than --random-model {preset_name} builds; compare two bundles "
         f"of one model")


def _config_key(cfg: LlavaRadConfig) -> str:
    return hashlib.sha256(cfg.to_json().encode()).hexdigest()


def _cached(folder: Path, cfg: LlavaRadConfig, seed: int) -> bool:
    """True when ``folder`` holds a model and bundle built for this config and seed by this radtrt, with
    today's graphs (``GRAPH_REVISION``: a bundle cached before an exporter change is rebuilt)."""
    from radtrt import __version__
    from radtrt.exporter.bundle import BUNDLE_FORMAT_VERSION, MANIFEST
    from radtrt.exporter.onnx import GRAPH_REVISION

    marker, manifest = folder / ASSETS_MARKER, folder / "bundle" / MANIFEST
    if not (marker.is_file() and manifest.is_file() and (folder / "model" / "config.json").is_file()):
        return False
    meta, bundle_meta = _json_object(marker), _json_object(manifest)  # damaged: rebuilt like a stale one
    return (meta.get("config_sha256") == _config_key(cfg) and meta.get("seed") == seed
            and meta.get("radtrt") == __version__ and bundle_meta.get("format_version") == BUNDLE_FORMAT_VERSION
            and bundle_meta.get("graph_revision") == GRAPH_REVISION and meta.get("files") == _file_stamps(folder))


def _file_stamps(folder: Path) -> dict[str, list[int]]:
    """Size and modification time of every file the build wrote (the model's and the bundle's own, not the
    engines 'radtrt export --bundle' adds in subfolders later): a file edited, truncated or replaced since
    makes the cache stale, so it is rebuilt. Checked by hash instead, it failed later with the remedies for a
    user's own files ('re-export the bundle', 'pass that model'), which do not apply here."""
    return {p.relative_to(folder).as_posix(): [p.stat().st_size, p.stat().st_mtime_ns]
            for sub in ("model", "bundle") for p in sorted((folder / sub).iterdir()) if p.is_file()}


def _json_object(path: Path) -> dict[str, Any]:
    """The JSON object in a file of the bench's own cache, or {} when it is damaged."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def random_assets(preset_name: str, work_dir: Path, *, seed: int = 0, vision_only: bool = False,
                  progress: Any = None) -> Assets:
    """Build (or reuse) a random-weight model directory and its fp32 bundle under ``work_dir``."""
    from radtrt import __version__
    from radtrt.outputs import make_dir

    cfg = random_config(preset_name, vision_only)
    name = f"{preset_name}{'-vision' if vision_only else ''}-seed{seed}"
    folder = work_dir / name
    what = "vision tower and projector at full size, 1-layer decoder stub" if vision_only else "random weights"
    label = f"{preset_name} ({what}, seed {seed})"
    if _cached(folder, cfg, seed):
        return Assets(folder / "model", folder / "bundle", label)
    make_dir(work_dir, "--work-dir folder")
    with _building(work_dir, name, progress):
        if _cached(folder, cfg, seed):  # built by the run this one waited for
            return Assets(folder / "model", folder / "bundle", label)
        meta = {"preset": preset_name, "vision_only": vision_only, "seed": seed, "config_sha256": _config_key(cfg),
                "radtrt": __version__}
        _rebuild(cfg, name, seed, folder, meta, progress)
    return Assets(folder / "model", folder / "bundle", label, built=True)


@contextmanager
def _building(work_dir: Path, name: str, progress: Any) -> Iterator[None]:
    """Hold ``WORK_DIR/.NAME.lock`` while the entry is checked and built. Why: two bench runs sharing a cold or
    stale --work-dir deleted each other's build in progress (the second took the first's marker for a stale
    build's), and failed with 'bundle directory ... was not written' or 'another radtrt is building ...'. The
    second run now waits and reuses the first's build; a build whose process died holds no lock, so it is
    rebuilt."""
    from rich.markup import escape

    from radtrt.locks import wait_for_lock

    task = None

    def waiting(holder: str) -> None:
        nonlocal task
        text = escape(f"waiting for {holder}, which is building the random model {name} in {work_dir}")
        if progress is not None:
            task = progress.add_task(text, total=None) if task is None else task
            progress.update(task, description=text)

    with wait_for_lock(work_dir / f".{name}.lock", UNLOCKABLE, waiting):
        if task is not None:
            progress.remove_task(task)
        yield


def _rebuild(cfg: LlavaRadConfig, name: str, seed: int, folder: Path, meta: dict[str, Any], progress: Any) -> None:
    """Build the cache entry afresh (its lock held), removing a stale or cut-short one first."""
    if folder.exists():
        if not (folder / ASSETS_MARKER).is_file() and any(folder.iterdir()):
            fail(f"{folder} exists and was not made by 'radtrt bench'; choose another --work-dir")
        shutil.rmtree(folder)  # stale: built for another config, seed, or radtrt version
    folder.mkdir(parents=True)
    # the marker comes first: a build cut short is then known as the bench's own and rebuilt, not refused
    # (until the bundle's manifest exists, ``_cached`` says no)
    (folder / ASSETS_MARKER).write_text(json.dumps(meta))
    _build(cfg, name, seed, folder, progress)
    (folder / ASSETS_MARKER).write_text(json.dumps(meta | {"files": _file_stamps(folder)}))  # complete


def _build(cfg: LlavaRadConfig, name: str, seed: int, folder: Path, progress: Any) -> None:
    from radtrt.exporter.bundle import export_bundle
    from radtrt.model.loading import LoadedModel, save_toolkit
    from radtrt.model.tiny import random_model, train_tiny_tokenizer

    task = progress.add_task(f"building random model {name}", total=None) if progress else None
    loaded = LoadedModel(random_model(cfg, seed=seed), train_tiny_tokenizer(), f"{name}-random",
                         {"layout": "random", "seed": seed})
    save_toolkit(loaded, folder / "model")
    if progress:
        progress.update(task, description=f"saved random model {name}")  # a folder's name could read as markup
        progress.remove_task(task)
    export_bundle(loaded, folder / "bundle", precision="fp32", progress=progress)


def resolve_assets(*, model: Path | None, bundle: Path | None, random_model: str | None, work_dir: Path,
                   seed: int, vision_only: bool, progress: Any = None) -> Assets:
    """The user's model/bundle, or random ones built for ``--random-model``; never both."""
    if random_model is not None:
        if model is not None or bundle is not None:
            fail("--random-model builds its own model and bundle; do not combine it with --model or --bundle")
        return random_assets(random_model, work_dir, seed=seed, vision_only=vision_only, progress=progress)
    if model is None and bundle is None:
        fail("say what to benchmark: --bundle DIR (and --model DIR for torch), or --random-model tiny|phantom|mid|llava-rad")
    label = (bundle or model).name  # type: ignore[union-attr]
    if bundle is not None:  # the model's name, not only a folder's ("Model: i8")
        from radtrt.exporter.bundle import read_manifest

        label = f"{read_manifest(bundle, verify=False)['model']['name']} (bundle {bundle.name})"
    return Assets(model, bundle, label)


def synthetic_studies(count: int, folder: Path) -> list[Path]:
    """``count`` synthetic frontal DX studies (seeds 0..count-1), written once and reused while they are what
    was written: a file replaced, emptied by an interrupted run, or of an older generator was reused by name,
    measured as "synthetic" (or failed every run until deleted by hand)."""
    from radtrt.outputs import make_dir

    if count < 1:
        fail("--synthetic needs at least 1 study")
    if count > MAX_SYNTHETIC:  # each is a ~200 KB DICOM written before anything runs: a million filled the disk
        fail(f"--synthetic is at most {MAX_SYNTHETIC} studies (a benchmark's percentiles settle within a few dozen); "
             f"for more, generate a set with 'radtrt data phantoms' and pass it as --studies")
    make_dir(folder, "synthetic studies folder")
    paths = []
    for i in range(count):
        path = folder / f"synthetic_{i:03d}.dcm"
        _synthetic_study(path, seed=i)
        paths.append(path)
    return paths


def _synthetic_study(path: Path, seed: int) -> None:
    """Write (atomically) the study of ``seed`` unless ``path`` holds it. Its DICOM header has fresh UIDs and
    today's date, so the bytes are not reproducible: a hidden record beside it keeps the file's sha256 and that
    of the pixels the generator makes for the seed, both checked before reuse."""
    from radtrt.imaging.synthetic import synthetic_chest, write_radiograph
    from radtrt.model.io import sha256_file
    from radtrt.outputs import replaced_atomically, write_text

    pixels = synthetic_chest(seed=seed)
    pixels_sha256 = hashlib.sha256(pixels.tobytes()).hexdigest()
    record = path.with_name(f".{path.name}.json")
    if path.is_file() and record.is_file():
        try:
            meta = _json_object(record)
            same = meta.get("pixels_sha256") == pixels_sha256 and meta.get("sha256") == sha256_file(path)
        except OSError:  # unreadable: written again below
            same = False
        if same:
            return
    try:
        with replaced_atomically(path) as tmp:
            write_radiograph(tmp, pixels, modality="DX", view_position="PA")
    except OSError as e:
        fail(f"cannot write synthetic study {path}: {e.strerror}")
    write_text(record, json.dumps({"seed": seed, "sha256": sha256_file(path), "pixels_sha256": pixels_sha256}),
               "synthetic study record")


def study_entries(studies: Path | None, synthetic: int | None, work_dir: Path, default_synthetic: int) -> list[Entry]:
    """Studies from ``--studies`` or synthetic ones. ``--studies`` is a study (DICOM file or folder, image),
    a folder whose entries are studies, or a JSONL manifest / a folder holding ``manifest.jsonl`` (a
    phantom set), whose rows also give each study's true finding labels."""
    if studies is not None and synthetic is not None:
        fail("give either --studies or --synthetic, not both")
    if studies is None:
        count = synthetic if synthetic is not None else default_synthetic
        return [Entry(p) for p in synthetic_studies(count, work_dir / "studies")]
    entries = ([Entry(studies)] if studies.is_file() and studies.suffix not in (".jsonl", ".json") else
               source_entries(studies, "--studies")[1])  # says a missing, empty or unreadable one
    for entry in entries:  # before a model is built or loaded: a CT among them failed the run after that
        screen_study(entry.study)
    return entries


def study_paths(studies: Path | None, synthetic: int | None, work_dir: Path, default_synthetic: int) -> list[Path]:
    return [e.study for e in study_entries(studies, synthetic, work_dir, default_synthetic)]
