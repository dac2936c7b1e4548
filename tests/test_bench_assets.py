"""Bench inputs: studies from a folder or synthetic, the vision-only config, refused combinations."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from radtrt.benchmarks.assets import (
    ASSETS_MARKER,
    random_assets,
    resolve_assets,
    study_paths,
    synthetic_studies,
    vision_only_config,
)
from radtrt.errors import RadtrtError
from radtrt.model.config import preset


def test_synthetic_studies_are_written_once_and_reused(tmp_path: Path) -> None:
    paths = study_paths(None, None, tmp_path, default_synthetic=2)
    assert [p.name for p in paths] == ["synthetic_000.dcm", "synthetic_001.dcm"] and all(p.is_file() for p in paths)
    mtime = paths[0].stat().st_mtime_ns
    assert synthetic_studies(1, tmp_path / "studies")[0].stat().st_mtime_ns == mtime
    with pytest.raises(RadtrtError):
        synthetic_studies(0, tmp_path)


@pytest.mark.parametrize("damage", ["replaced", "emptied", "record lost", "record of other pixels"])
def test_a_cached_synthetic_study_that_is_not_what_was_written_is_written_again(tmp_path: Path, damage: str) -> None:
    """Reused by name only, another image under the cached name was measured as "synthetic 0", and a file emptied
    by an interrupted run failed every later run until deleted by hand."""
    import json

    from radtrt.imaging.synthetic import synthetic_chest

    path = synthetic_studies(1, tmp_path)[0]
    record = tmp_path / f".{path.name}.json"
    if damage == "replaced":
        path.write_bytes(b"\x89PNG some other image")
    elif damage == "emptied":
        path.write_bytes(b"")
    elif damage == "record lost":
        record.unlink()
    else:
        record.write_text(json.dumps({**json.loads(record.read_text()), "pixels_sha256": "0" * 64}))
    assert synthetic_studies(1, tmp_path) == [path]
    assert _stored_pixels(path) == synthetic_chest(seed=0).tobytes()
    assert json.loads(record.read_text())["pixels_sha256"] != "0" * 64
    assert sorted(p.name for p in tmp_path.iterdir()) == [record.name, path.name]  # no temporary file left


def _stored_pixels(path: Path) -> bytes:
    import pydicom

    return pydicom.dcmread(path).pixel_array.tobytes()


def test_studies_folder_entries_are_the_studies(tmp_path: Path) -> None:
    from radtrt.imaging.synthetic import write_radiograph

    write_radiograph(tmp_path / "a.dcm", view_position="PA", study_uid="1.2.3.1")
    write_radiograph(tmp_path / "b" / "series1" / "pa.dcm", view_position="PA", study_uid="1.2.3.2")
    (tmp_path / ".hidden").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("not a study")
    (tmp_path / "empty").mkdir()
    assert [p.name for p in study_paths(tmp_path, None, tmp_path, 1)] == ["a.dcm", "b"]
    assert study_paths(tmp_path / "a.dcm", None, tmp_path, 1) == [tmp_path / "a.dcm"]


@pytest.mark.parametrize("studies,synthetic,match", [("empty", None, "is empty"), ("missing", None, "--studies not found"),
                                                     ("empty", 2, "not both")])
def test_bad_study_arguments(tmp_path: Path, studies: str, synthetic: int | None, match: str) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(RadtrtError, match=match):
        study_paths(tmp_path / studies, synthetic, tmp_path, 1)


def test_vision_only_config_keeps_trunk_and_projector_size() -> None:
    real = preset("llava-rad")
    cfg = vision_only_config(real)
    assert cfg.vision == real.vision and cfg.projector_type == real.projector_type
    assert cfg.decoder.hidden_size == real.decoder.hidden_size == 4096  # projector output width unchanged
    assert cfg.decoder.num_hidden_layers == 1 and cfg.num_image_tokens == 1369


def test_resolve_assets_refusals(tmp_path: Path) -> None:
    with pytest.raises(RadtrtError, match="say what to benchmark"):
        resolve_assets(model=None, bundle=None, random_model=None, work_dir=tmp_path, seed=0, vision_only=False)
    with pytest.raises(RadtrtError, match="do not combine"):
        resolve_assets(model=None, bundle=tmp_path, random_model="tiny", work_dir=tmp_path, seed=0, vision_only=False)
    with pytest.raises(RadtrtError, match="unknown model preset"):
        resolve_assets(model=None, bundle=None, random_model="huge", work_dir=tmp_path, seed=0, vision_only=False)
    given = resolve_assets(model=tmp_path / "m", bundle=None, random_model=None, work_dir=tmp_path, seed=0,
                           vision_only=False)
    assert given.model_dir == tmp_path / "m" and given.bundle is None


def test_random_assets_never_deletes_a_folder_it_did_not_make(tmp_path: Path) -> None:
    foreign = tmp_path / "tiny-seed0"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep")
    with pytest.raises(RadtrtError, match="not made by 'radtrt bench'"):
        random_assets("tiny", tmp_path)
    assert (foreign / "precious.txt").is_file() and not (foreign / ASSETS_MARKER).exists()


def test_a_phantom_manifest_lists_its_rows_with_their_labels(tmp_path: Path) -> None:
    from radtrt.benchmarks.assets import study_entries
    from radtrt.data.phantom_set import write_phantom_set

    manifest = write_phantom_set(tmp_path / "set", 2, 3, rows=96, cols=80, formats=("png",))
    for source in (manifest, manifest.parent):  # the .jsonl itself, or the folder holding it
        entries = study_entries(source, None, tmp_path, 1)
        assert [e.study.name for e in entries] == ["phantom-00000.png", "phantom-00001.png"]
        assert all(e.study.is_file() and e.labels for e in entries)


def test_a_cached_bundle_from_older_graphs_is_rebuilt(tmp_path: Path) -> None:
    import json

    from radtrt.exporter.onnx import GRAPH_REVISION

    first = random_assets("tiny", tmp_path)
    manifest = first.bundle / "manifest.json"
    assert json.loads(manifest.read_text())["graph_revision"] == GRAPH_REVISION
    built = manifest.stat().st_mtime_ns
    assert random_assets("tiny", tmp_path).bundle == first.bundle and manifest.stat().st_mtime_ns == built  # reused
    stale = json.loads(manifest.read_text()) | {"graph_revision": GRAPH_REVISION - 1}
    manifest.write_text(json.dumps(stale))
    random_assets("tiny", tmp_path)
    assert json.loads(manifest.read_text())["graph_revision"] == GRAPH_REVISION  # exported again
    manifest.write_text('{"graph_rev')  # damaged (a JSONDecodeError traceback): rebuilt like a stale one
    random_assets("tiny", tmp_path)
    assert json.loads(manifest.read_text())["graph_revision"] == GRAPH_REVISION


@pytest.mark.parametrize("damaged", ["bundle/vision.onnx", "model/model.safetensors"])
def test_a_cached_file_changed_since_the_build_is_rebuilt(tmp_path: Path, damaged: str) -> None:
    """A changed byte failed the bench later with the remedies for a user's own files ('re-export the bundle',
    'pass that model'): this folder is the bench's own, so it is rebuilt. Engines that 'radtrt export --bundle'
    adds later are not a change: the cache and they stay."""
    first = random_assets("tiny", tmp_path)
    engine = first.bundle / "trtllm" / "checkpoint-fp16" / "config.json"
    engine.parent.mkdir(parents=True)
    engine.write_text("{}")
    manifest = first.bundle / "manifest.json"
    built = manifest.stat().st_mtime_ns
    assert random_assets("tiny", tmp_path).bundle == first.bundle and manifest.stat().st_mtime_ns == built
    assert engine.is_file()
    path = first.bundle.parent / damaged
    original = path.read_bytes()
    changed = original[:-1] + bytes([original[-1] ^ 1])
    path.write_bytes(changed)
    random_assets("tiny", tmp_path)
    assert path.read_bytes() != changed and path.stat().st_size == len(original)


def test_a_build_cut_short_is_rebuilt_not_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An interrupted first build left a folder the next run called 'not made by radtrt bench'."""
    from radtrt.benchmarks import assets

    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(assets, "_build", interrupted)
    with pytest.raises(KeyboardInterrupt):
        random_assets("tiny", tmp_path)
    monkeypatch.undo()
    built = random_assets("tiny", tmp_path)
    assert (built.bundle / "manifest.json").is_file()


def test_a_second_run_waits_for_the_build_in_progress_and_reuses_it(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Two bench runs on one cold --work-dir: the second took the first's marker for a stale build's and deleted
    its folder mid-build ('bundle directory ... was not written'). Now it waits for the first and reuses its build."""
    import os
    import threading

    from radtrt.benchmarks import assets

    real, builds, said, second_waits = assets._build, [], [], threading.Event()

    class Progress:  # what the second run shows while it waits
        def add_task(self, description: str, **kwargs: object) -> int:
            said.append(description)
            second_waits.set()
            return len(said)

        def update(self, task: int, **kwargs: object) -> None:
            pass

        def remove_task(self, task: int) -> None:
            pass

    def first_build(*args: object) -> None:
        builds.append(threading.current_thread().name)
        if len(builds) == 1:  # the first run is building: the second starts now
            second.start()
            second_waits.wait(timeout=10)
        real(*args)

    results: dict[str, object] = {}
    second = threading.Thread(target=lambda: results.update(second=random_assets("tiny", tmp_path,
                                                                                 progress=Progress())))
    monkeypatch.setattr(assets, "_build", first_build)
    first = random_assets("tiny", tmp_path)
    second.join(timeout=120)
    assert builds == ["MainThread"] and first.built and (first.bundle / "manifest.json").is_file()
    assert results["second"] == dataclasses.replace(first, built=False)
    assert said == [f"waiting for process {os.getpid()}, which is building the random model tiny-seed0 in {tmp_path}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-seed0"]  # the lock file went with its holder


def test_a_bundle_is_labelled_with_its_models_name(tmp_path: Path) -> None:
    """Reports said 'Model: i8', the bundle's folder name."""
    built = random_assets("tiny", tmp_path)
    assets = resolve_assets(model=None, bundle=built.bundle, random_model=None, work_dir=tmp_path, seed=0,
                            vision_only=False)
    assert assets.label == "tiny-seed0-random (bundle bundle)"
