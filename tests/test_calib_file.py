"""Calibration: samples and their hash, statistics on multimodal sequences, the versioned file, the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from radtrt.calibration.file import CalibrationFile, content_sha256, load_activation_stats
from radtrt.calibration.run import calibrate, calibrate_phantoms, heldout_samples, resolve_calibration, reuse
from radtrt.calibration.samples import sample_list_hash
from radtrt.calibration.stats import answer_ids
from radtrt.cli import app
from radtrt.errors import RadtrtError
from radtrt.exporter.quant import ActivationStats
from radtrt.model.loading import LoadedModel, load_model, save_toolkit
from radtrt.model.tiny import random_model

from conftest import TinyRelease

runner = CliRunner()


@pytest.fixture(scope="module")
def loaded(tiny_release: TinyRelease) -> LoadedModel:
    return load_model(tiny_release.release_dir, tiny_release.base_dir)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from radtrt.data.phantom_set import write_phantom_set

    return write_phantom_set(tmp_path_factory.mktemp("ph") / "set", 4, 5, rows=96, cols=80, formats=("png",))


@pytest.fixture(scope="module")
def calib(loaded: LoadedModel, phantoms: Path):
    return calibrate(loaded, phantoms, 3)


def test_decoder_stats_cover_every_linear_with_hf_names(loaded: LoadedModel, calib) -> None:
    lm = loaded.model.language_model
    linears = {n: m for n, m in lm.named_modules() if isinstance(m, torch.nn.Linear)}
    stats = calib.file.decoder
    assert set(stats.inputs) == set(linears) == set(stats.outputs)
    assert "model.layers.1.self_attn.k_proj" in stats.inputs and "lm_head" in stats.inputs
    for name, m in linears.items():
        assert stats.inputs[name].shape == (m.in_features,) and stats.outputs[name].shape == (m.out_features,)
        assert bool((stats.inputs[name] > 0).all()) and bool(torch.isfinite(stats.inputs[name]).all())
    vision = calib.file.vision
    assert "vision_tower.blocks.0.attn.qkv" in vision.inputs and "mm_projector.2" in vision.outputs
    assert vision.outputs["vision_tower.patch_embed.proj"].shape == (loaded.model.cfg.vision.embed_dim,)


def test_stats_are_collected_on_prompt_image_and_findings(loaded: LoadedModel, calib) -> None:
    """The decoder saw every sample's prompt with the image spliced in and its findings as the answer."""
    cfg = loaded.model.cfg
    expected = sum(len(answer_ids(loaded.tokenizer, s.ref.indication, s.ref.findings)) - 1 + cfg.num_image_tokens
                   for s in calib.samples)
    prompt_only = sum(len(s.prompt_ids) - 1 + cfg.num_image_tokens for s in calib.samples)
    assert calib.file.meta["method"]["decoder_tokens"] == expected > prompt_only
    assert calib.file.meta["method"]["samples_with_findings"] == 3
    # the statistics are maxima over those tokens: recompute one layer's input maximum directly
    s = calib.samples[0]
    with torch.no_grad():
        img = loaded.model.encode_images(s.pixels[None])[0]
        x = loaded.model.embed_multimodal(answer_ids(loaded.tokenizer, s.ref.indication, s.ref.findings), img)
        first = loaded.model.language_model.model.layers[0].input_layernorm(x[None])
    assert bool((calib.file.decoder.inputs["model.layers.0.self_attn.q_proj"] >= first.abs().amax((0, 1)) - 1e-6).all())


def test_an_export_from_a_calibration_file_checks_its_held_out_studies_first(loaded: LoadedModel, phantoms: Path,
                                                                            tmp_path: Path) -> None:
    """With the folder given, the gate's held-out studies are checked before the model loads; with a calibration file
    made from it, a broken one failed the export only after calibration and quantization (minutes at 7B)."""
    from radtrt.exporter.onnx_int8 import Int8Plan

    data = Path(shutil.copytree(phantoms.parent, tmp_path / "set")) / phantoms.name
    path = calibrate(loaded, data, 3).file.save(tmp_path / "calib.safetensors")
    Int8Plan(calibration_data=str(path), parity_samples=1).check_ready()
    held_out = json.loads(data.read_text().splitlines()[3])["image"]
    (data.parent / held_out).write_bytes(b"not an image")
    with pytest.raises(RadtrtError, match=r"not a DICOM file.* \(a held-out study the INT8 parity gate reads after "
                                          r"the calibration ones\): fix it or take it out of the data, or skip the gate with "
                                          r"--parity-samples 0$"):
        Int8Plan(calibration_data=str(path), parity_samples=1).check_ready()
    with pytest.raises(RadtrtError, match="a held-out study the INT8 parity gate reads"):  # the folder route too
        Int8Plan(calibration_data=str(data), n=3, parity_samples=1).check_ready()
    Int8Plan(calibration_data=str(path), parity_samples=0).check_ready()  # no gate, nothing of it read


def test_a_calibration_file_is_told_by_its_content_not_its_name(loaded: LoadedModel, phantoms: Path,
                                                                tmp_path: Path) -> None:
    """Copied to calib.bin it was "neither a folder nor a JSONL manifest"; a safetensors file of another kind is
    still told what it is not."""
    from radtrt.calibration.run import resolve_calibration
    from radtrt.exporter.onnx_int8 import Int8Plan

    path = calibrate(loaded, phantoms, 3).file.save(tmp_path / "calib.safetensors")
    renamed = tmp_path / "calib.bin"
    shutil.copy(path, renamed)
    Int8Plan(calibration_data=str(renamed), parity_samples=0).check_ready()
    assert resolve_calibration(loaded, str(renamed)).file.hash == CalibrationFile.load(path).hash
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.bin"))
    with pytest.raises(RadtrtError, match="other.bin"):
        resolve_calibration(loaded, str(tmp_path / "other.bin"))


def test_a_held_out_study_read_past_a_repeated_image_is_named_as_held_out(loaded: LoadedModel, tmp_path: Path) -> None:
    """The up-front check reads the k rows after the calibrated ones; the gate skips an image the calibration set
    repeats and reads on, and a broken study there failed the export late, with no word of the gate."""
    from radtrt.data.phantom_set import write_phantom_set

    manifest = write_phantom_set(tmp_path / "set", 5, 5, rows=96, cols=80, formats=("png",))
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    rows[3]["image"] = rows[0]["image"]  # a repeat of a calibrated image: skipped by the gate
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (manifest.parent / rows[4]["image"]).write_bytes(b"not an image")
    calibration = calibrate(loaded, manifest, 3)
    with pytest.raises(RadtrtError, match=r"not a DICOM file.*\(a held-out study the INT8 parity gate reads after the "
                                          r"calibration ones\): fix it or take it out of the data"):
        heldout_samples(loaded, calibration, 1)


def test_file_round_trip_and_activation_stats_compatibility(calib, tmp_path: Path) -> None:
    path = calib.file.save(tmp_path / "calib.safetensors")
    back = CalibrationFile.load(path)
    assert back.meta == calib.file.meta and back.hash == calib.file.hash == sample_list_hash(calib.file.refs)
    for name, t in calib.file.decoder.inputs.items():
        assert torch.equal(back.decoder.inputs[name], t)
    for name, t in calib.file.vision.outputs.items():
        assert torch.equal(back.vision.outputs[name], t)
    meta = back.meta
    assert meta["model"]["config_sha256"] and meta["preprocess"]["image_size"] == 56 and meta["source"]["n"] == 3
    text = json.dumps(meta)  # the data set's clinical text never travels with the file, only its hash
    assert all(s.ref.findings not in text for s in calib.samples) and meta["samples"][0]["text_sha256"]
    stats = load_activation_stats(path)  # what --calibration-stats reads
    assert set(stats.inputs) == set(calib.file.decoder.inputs) and "calibration" in stats.description
    calib.file.decoder.save(tmp_path / "plain.safetensors")  # the older ActivationStats format still loads
    assert set(load_activation_stats(tmp_path / "plain.safetensors").outputs) == set(stats.outputs)
    with pytest.raises(RadtrtError, match="neither radtrt calibration data nor activation statistics"):
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(1)}, tmp_path / "other.safetensors")
        load_activation_stats(tmp_path / "other.safetensors")


def test_sample_hash_names_the_images_not_their_place_or_order(loaded: LoadedModel, phantoms: Path, calib,
                                                              tmp_path: Path) -> None:
    moved = tmp_path / "moved"
    shutil.copytree(phantoms.parent, moved)
    again = calibrate(loaded, moved / "manifest.jsonl", 3)
    assert again.file.hash == calib.file.hash
    assert sample_list_hash(list(reversed(calib.file.refs))) == calib.file.hash
    assert calibrate(loaded, phantoms, 2).file.hash != calib.file.hash
    png = moved / calib.file.refs[0].file
    png.write_bytes(png.read_bytes() + b"\0")  # any change to a listed image changes the set
    assert calibrate(loaded, moved, 3).file.hash != calib.file.hash


def test_phantom_calibration_is_reproducible(loaded: LoadedModel) -> None:
    a, b = calibrate_phantoms(loaded, 2, seed=3), calibrate_phantoms(loaded, 2, seed=3)
    assert a.file.hash == b.file.hash and a.file.meta["source"] == {"kind": "phantom", "seed": 3, "n": 2,
                                                                     "formats": ["png"]}
    assert calibrate_phantoms(loaded, 2, seed=4).file.hash != a.file.hash
    assert torch.equal(a.file.decoder.inputs["lm_head"], b.file.decoder.inputs["lm_head"])


def test_reuse_needs_only_the_file_and_the_same_model(loaded: LoadedModel, phantoms: Path, tmp_path: Path) -> None:
    """A calibration file carries everything an export needs: its images may be gone."""
    data = tmp_path / "data"
    shutil.copytree(phantoms.parent, data)
    made = calibrate(loaded, data, 2)
    path = made.file.save(tmp_path / "c.safetensors")
    shutil.rmtree(data)
    reused = reuse(loaded, path)
    assert reused.path == path and reused.samples == [] and reused.file.hash == made.file.hash
    for name, t in made.file.vision.inputs.items():
        assert torch.equal(reused.file.vision.inputs[name], t)
    other = LoadedModel(random_model(loaded.model.cfg, seed=9), loaded.tokenizer, "other")
    with pytest.raises(RadtrtError, match="other weights"):
        reuse(other, path)
    # the export's parity gate then draws its held-out samples from phantoms, and says why
    samples, where = heldout_samples(loaded, reused, 1)
    assert len(samples) == 1 and "phantoms" in where and "the calibration manifest is not on this machine" in where
    assert str(data) not in where  # the line goes into the bundle's manifest


def test_a_bundles_copy_names_no_folder_or_file_and_still_verifies(loaded: LoadedModel, phantoms: Path,
                                                                  tmp_path: Path) -> None:
    data = tmp_path / "MRN_12345678"  # what hospital folders are often named after
    shutil.copytree(phantoms.parent, data)
    made = calibrate(loaded, data, 2)
    assert made.file.refs[0].file and str(data) in json.dumps(made.file.meta)  # the user's own file keeps them
    path = made.file.without_paths().save(tmp_path / "copy.safetensors")
    assert b"MRN_12345678" not in path.read_bytes() and made.file.refs[0].file.encode() not in path.read_bytes()
    assert "MRN_12345678" not in json.dumps(made.file.summary())  # what the bundle's manifest records
    copy = reuse(loaded, path)  # the hash still verifies: it never covered the paths
    assert copy.file.hash == made.file.hash and {r.sha256 for r in copy.file.refs} == {r.sha256 for r in made.file.refs}
    samples, where = heldout_samples(loaded, copy, 1)  # no source to draw from: phantoms, and it says why
    assert "phantoms" in where and "does not name its manifest" in where
    from safetensors import safe_open
    from safetensors.torch import save_file

    older = made.file.save(tmp_path / "older.safetensors")
    with safe_open(str(older), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, older, metadata={**metadata, "format_version": "1"})  # its hash covered the paths
    with pytest.raises(RadtrtError, match="format version 1; this radtrt reads version 2: re-run 'radtrt calibrate'"):
        CalibrationFile.load(older)


def test_too_few_samples_and_missing_data_are_refused(loaded: LoadedModel, phantoms: Path, tmp_path: Path) -> None:
    with pytest.raises(RadtrtError, match=r"4 samples; 5 are needed \(export --calibration-n, calibrate --n"):
        calibrate(loaded, phantoms, 5)
    with pytest.raises(RadtrtError, match="calibration data not found"):
        calibrate(loaded, tmp_path / "nowhere", 2)


def test_a_missing_manifest_image_is_named_where_it_was_looked_for(loaded: LoadedModel, phantoms: Path,
                                                                   tmp_path: Path) -> None:
    """Only 'phantom-00000.png: no such file or folder': nothing said it was looked for beside the manifest."""
    (tmp_path / "elsewhere").mkdir()
    manifest = tmp_path / "elsewhere" / "manifest.jsonl"
    shutil.copy(phantoms, manifest)  # its relative image paths now point into elsewhere/
    first = json.loads(manifest.read_text().splitlines()[0])["image"]
    with pytest.raises(RadtrtError, match=f"^{tmp_path / 'elsewhere' / first}: no such file or folder"):
        calibrate(loaded, manifest, 2)


def test_a_manifest_without_findings_calibrates_on_prompts_and_images(loaded: LoadedModel, phantoms: Path,
                                                                        tmp_path: Path) -> None:
    """Calibration reads images and indications; rows without 'findings' (unreported studies) were refused.
    Training still needs them."""
    from radtrt.data.manifest import read_manifest

    bare = phantoms.with_name("bare.jsonl")
    bare.write_text("".join(json.dumps({"image": json.loads(line)["image"], "findings": None}) + "\n"
                            for line in phantoms.read_text().splitlines()))
    made = calibrate(loaded, bare, 2)
    assert made.file.n == 2 and made.file.meta["method"]["samples_with_findings"] == 0
    with pytest.raises(RadtrtError, match="'findings' is missing, empty or not a string"):
        read_manifest(bare)
    bare.write_text(json.dumps({"image": "x.png", "findings": 3}) + "\n")
    with pytest.raises(RadtrtError, match="'findings' must be a string or null"):
        calibrate(loaded, bare, 1)


def test_calibrate_command(tiny_release: TinyRelease, phantoms: Path, tmp_path: Path,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    from radtrt import interrupts

    model_dir = save_toolkit(load_model(tiny_release.release_dir, tiny_release.base_dir), tmp_path / "m")
    monkeypatch.setattr(interrupts, "_complete", [])
    out = tmp_path / "calib.safetensors"
    result = runner.invoke(app, ["calibrate", "--model", str(model_dir), "--data", str(phantoms.parent), "--n", "2",
                                 "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    # an interrupt after the save names the file complete (it said nothing, and the rerun refused the file)
    assert interrupts._complete == [("calibration file", str(out))]
    assert result.stdout.strip() == str(out) and "sample-list sha256" in result.stderr
    assert CalibrationFile.load(out).n == 2
    again = runner.invoke(app, ["calibrate", "--model", str(model_dir), "--data", str(phantoms.parent), "-o", str(out)])
    assert again.exit_code == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr
    with pytest.raises(RadtrtError, match="is not a calibration file of 'radtrt calibrate'"):
        ActivationStats({"x": torch.ones(2)}).save(tmp_path / "s.safetensors")
        CalibrationFile.load(tmp_path / "s.safetensors")
    meta = json.loads(json.dumps(CalibrationFile.load(out).meta))
    assert meta["samples"][0]["file"].startswith("png/") and len(meta["samples"][0]["sha256"]) == 64
    assert "distinct" not in result.stderr
    # rows naming one image, as written and as './': said, not counted silently as three samples
    row = json.loads(phantoms.read_text().splitlines()[0])
    image = phantoms.parent / row["image"]
    repeated = tmp_path / "repeated.jsonl"  # beside the shared phantoms, it would be a second manifest in their folder
    repeated.write_text("".join(json.dumps({**row, "image": name}) + "\n"
                                for name in (str(image), str(image), f"{phantoms.parent}/./{row['image']}")))
    result = runner.invoke(app, ["calibrate", "--model", str(model_dir), "--data", str(repeated), "--n", "3",
                                 "-o", str(tmp_path / "repeated.safetensors")])
    assert result.exit_code == 0, result.stderr
    assert "radtrt: warning: the 3 samples hold 1 distinct image; a repeated image counts once per row" in \
        " ".join(result.stderr.split())


def _edited(calib, tmp_path: Path, name: str, meta_edit=None, tensor_edit=None, keep_digest: bool = False) -> Path:
    """A copy of the calibration file with its metadata or tensors damaged; without ``keep_digest``, with its
    digest recomputed (a deliberate forgery), so that the checks behind it are reached."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = calib.file.save(tmp_path / "source.safetensors")
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    if meta_edit is not None:
        metadata["meta"] = json.dumps(meta_edit(json.loads(metadata["meta"])))
    if tensor_edit is not None:
        tensor_edit(tensors)
    if not keep_digest:
        metadata["content_sha256"] = content_sha256(metadata["meta"], tensors)
    out = tmp_path / f"{name}.safetensors"
    save_file(tensors, out, metadata=metadata)
    return out


@pytest.mark.parametrize("damage", ["list", "empty", "model null", "model empty", "no source", "samples null",
                                    "samples of ints", "hash null", "source skip text", "source path number",
                                    "source skip negative", "no samples"])
def test_damaged_metadata_is_one_clear_error(calib, tmp_path: Path, damage: str) -> None:
    edits = {"list": lambda m: [], "empty": lambda m: {}, "model null": lambda m: {**m, "model": None},
             "model empty": lambda m: {**m, "model": {}}, "no source": lambda m: {k: v for k, v in m.items() if k != "source"},
             "samples null": lambda m: {**m, "samples": None}, "samples of ints": lambda m: {**m, "samples": [1, 2]},
             "hash null": lambda m: {**m, "sample_list_sha256": None},
             # the parity gate's int()/Path() of these failed after the whole export
             "source skip text": lambda m: {**m, "source": {"kind": "folder", "path": "/data", "skip": "1", "n": 1}},
             "source path number": lambda m: {**m, "source": {"kind": "manifest", "path": 5, "skip": 0, "n": 1}},
             # accepted before: "after the -3 calibration ones", and a file calibrated on nothing
             "source skip negative": lambda m: {**m, "source": {"kind": "folder", "path": "/d", "skip": -3, "n": 1}},
             "no samples": lambda m: {**m, "samples": []}}
    with pytest.raises(RadtrtError, match="damaged file"):
        CalibrationFile.load(_edited(calib, tmp_path, damage, meta_edit=edits[damage]))


def test_damaged_statistics_are_refused(calib, loaded: LoadedModel, tmp_path: Path) -> None:
    key = "decoder.input:model.layers.0.self_attn.q_proj"
    for value in (float("nan"), float("inf"), -1.0):
        path = _edited(calib, tmp_path, "bad", tensor_edit=lambda t: t[key].fill_(value))
        with pytest.raises(RadtrtError, match="NaN, infinite or negative"):
            CalibrationFile.load(path)
    path = _edited(calib, tmp_path, "int", tensor_edit=lambda t: t.update({key: t[key].long()}))  # truncated ranges
    with pytest.raises(RadtrtError, match="are not a float vector"):
        CalibrationFile.load(path)
    # shapes and module names are checked against the model the file is used with
    path = _edited(calib, tmp_path, "shape", tensor_edit=lambda t: t.update({"vision.input:vision_tower.patch_embed.proj": torch.ones(7)}))
    with pytest.raises(RadtrtError, match="have shape \\(7,\\), the module has 3 channels"):
        CalibrationFile.load(path).check_model(loaded.model)
    path = _edited(calib, tmp_path, "extra", tensor_edit=lambda t: t.update({"decoder.output:model.layers.9.mlp": torch.ones(4)}))
    with pytest.raises(RadtrtError, match="'model.layers.9.mlp', which this model does not have"):
        CalibrationFile.load(path).check_model(loaded.model)
    CalibrationFile.load(calib.file.save(tmp_path / "intact.safetensors")).check_model(loaded.model)


def test_edited_statistics_or_metadata_fail_the_content_digest(calib, loaded: LoadedModel, tmp_path: Path) -> None:
    """Zeroed or scaled maxima exported with exit code 0 into a badly wrong INT8 graph (image error 4.7 and 18
    against 1.75); an edited preprocessing constant was accepted too."""
    key = "vision.input:vision_tower.patch_embed.proj"
    for name, edit in (("zero", lambda t: t[key].zero_()), ("x1000", lambda t: t[key].mul_(1000))):
        with pytest.raises(RadtrtError, match="do not match its recorded sha256"):
            CalibrationFile.load(_edited(calib, tmp_path, name, tensor_edit=edit, keep_digest=True))
    with pytest.raises(RadtrtError, match="do not match its recorded sha256"):
        CalibrationFile.load(_edited(calib, tmp_path, "meta", keep_digest=True,
                                     meta_edit=lambda m: {**m, "preprocess": {**m["preprocess"], "image_size": 999}}))
    without = _edited(calib, tmp_path, "without", keep_digest=True)
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(without), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    del metadata["content_sha256"]  # deleting the digest was enough to pass an edited file
    save_file(tensors, without, metadata=metadata)
    with pytest.raises(RadtrtError, match="records no digest of its statistics .*export the bundle again, or pass "
                                          "--calibration-stats FILE"):
        CalibrationFile.load(without)
    intact = CalibrationFile.load(calib.file.save(tmp_path / "intact.safetensors"))
    copy = CalibrationFile.load(intact.without_paths().save(tmp_path / "copy.safetensors"))  # a bundle's copy
    assert copy.hash == intact.hash


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, a folder nobody can write in")
def test_calibration_file_in_a_folder_that_refuses_files_is_refused_first(tiny_release: TinyRelease) -> None:
    result = runner.invoke(app, ["calibrate", "--model", str(tiny_release.release_dir), "--base-model",
                                 str(tiny_release.base_dir), "--data", "phantom", "--n", "1",
                                 "-o", "/proc/radtrt-calibration.safetensors"])
    assert result.exit_code == 2 and "cannot write calibration file" in result.stderr, result.stderr
    assert "loading model" not in result.stderr  # refused before the model was loaded


def test_a_calibration_file_saved_by_another_run_meanwhile_is_kept(tiny_release: TinyRelease, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Two calibrate runs to one -o both passed the check at their start and both exited 0: the file silently held
    the other's statistics. The later run now refuses and leaves the earlier one's file (and no temporary file)."""
    import radtrt.calibration.run as run

    out, real = tmp_path / "cal.safetensors", run.calibrate_phantoms

    def other_run_saves_meanwhile(*args, **kwargs):
        out.write_bytes(b"the other run's file")
        return real(*args, **kwargs)

    monkeypatch.setattr(run, "calibrate_phantoms", other_run_saves_meanwhile)
    result = runner.invoke(app, ["calibrate", "--model", str(tiny_release.release_dir), "--base-model",
                                 str(tiny_release.base_dir), "--data", "phantom", "--n", "1", "-o", str(out)])
    assert result.exit_code == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"calibration file {out} was written by another run meanwhile" in result.stderr
    assert out.read_bytes() == b"the other run's file" and [p.name for p in tmp_path.iterdir()] == [out.name]


def test_statistics_missing_a_module_are_refused_when_checked(calib, loaded: LoadedModel, tmp_path: Path) -> None:
    """They failed halfway through an export, when the quantizer looked the module up."""
    for key in ("decoder.input:model.layers.0.self_attn.q_proj", "vision.input:vision_tower.patch_embed.proj"):
        path = _edited(calib, tmp_path, key.split(":")[0], tensor_edit=lambda t: t.pop(key))
        with pytest.raises(RadtrtError, match=f"no {key.split('.')[0]} statistics for '{key.split(':')[1]}'"):
            CalibrationFile.load(path).check_model(loaded.model)


def test_held_out_samples_are_never_calibration_images(loaded: LoadedModel, phantoms: Path, tmp_path: Path) -> None:
    """The gate ran on the calibration images themselves after 'calibrate --seed 12' (the held-out seed), and
    with a manifest listing an image twice."""
    from radtrt.calibration.run import PHANTOM_HELDOUT_SEED

    on_heldout_seed = calibrate_phantoms(loaded, 2, seed=PHANTOM_HELDOUT_SEED)
    samples, where = heldout_samples(loaded, on_heldout_seed, 2)
    assert {s.ref.sha256 for s in samples}.isdisjoint(r.sha256 for r in on_heldout_seed.file.refs)
    assert f"seed {PHANTOM_HELDOUT_SEED + 1}" in where

    rows = [json.loads(line) for line in phantoms.read_text().splitlines()]
    twice = tmp_path / "twice.jsonl"  # rows A, B, A, B, C: only C is new after calibrating on A, B
    twice.write_text("".join(json.dumps({**r, "image": str(phantoms.parent / r["image"])}) + "\n"
                             for r in rows[:2] + rows[:3]))
    made = calibrate(loaded, twice, 2)
    samples, where = heldout_samples(loaded, made, 1)
    assert [s.ref.study for s in samples] != [] and samples[0].ref.sha256 not in {r.sha256 for r in made.file.refs}
    assert "held-out samples of" in where
    samples, where = heldout_samples(loaded, made, 2)  # only one new image: phantoms, and it says why
    assert "phantoms" in where and "holds 1 image besides the 2 it was calibrated on, fewer than 2" in where


@pytest.mark.parametrize("args, match", [
    (["--data", "NOWHERE", "--n", "1"], "calibration data not found"),
    (["--data", "PHANTOMS", "--n", "9"], "has 4 samples; 9 are needed"),
    (["--data", "PHANTOMS", "--n", "1", "--seed", "99"], "--seed chooses the phantoms"),
    (["--data", "", "--n", "1"], "--data is empty"),  # Path("") is ".": it calibrated on the current folder
    (["--data", "WITH_CT", "--n", "2"], "ct.dcm: modality"),  # read after the model loaded, sample by sample
    # each said "has 1 samples; 32 are needed" (read as one study), and with 1 sample "no usable image in folder"
    (["--data", "MODEL"], "MODEL is a model folder, not chest X-ray studies"),
    (["--data", "BUNDLE"], "BUNDLE is an ONNX bundle, not chest X-ray studies"),
    (["--data", "NOTES"], "no usable image in folder"),
])
def test_calibration_data_is_checked_before_the_model_loads(phantoms: Path,
                                                            tmp_path: Path, args: list[str], match: str) -> None:
    from radtrt.imaging.synthetic import synthetic_chest, write_radiograph

    with_ct = tmp_path / "with-ct"
    with_ct.mkdir()
    shutil.copy(phantoms.parent / json.loads(phantoms.read_text().splitlines()[0])["image"], with_ct / "a.png")
    write_radiograph(with_ct / "ct.dcm", synthetic_chest(seed=3), view_position="PA", modality="CT")
    for folder, files in (("MODEL", ("config.json", "model.safetensors", "tokenizer.model")),
                          ("BUNDLE", ("manifest.json", "decoder.onnx", "vision.onnx")), ("NOTES", ("notes.txt",))):
        (tmp_path / folder).mkdir()
        for name in files:
            (tmp_path / folder / name).write_text("{}")
    args = [{"NOWHERE": str(tmp_path / "nowhere"), "PHANTOMS": str(phantoms), "WITH_CT": str(with_ct),
             "MODEL": str(tmp_path / "MODEL"), "BUNDLE": str(tmp_path / "BUNDLE"),
             "NOTES": str(tmp_path / "NOTES")}.get(a, a) for a in args]
    result = runner.invoke(app, ["calibrate", "--model", str(tmp_path / "no-model"), *args,
                                 "-o", str(tmp_path / "c.safetensors")])  # the model would be refused once read
    assert result.exit_code == 2 and match in result.stderr, result.stderr


def test_a_sample_beyond_the_models_positions_is_refused(loaded: LoadedModel, phantoms: Path, tmp_path: Path) -> None:
    """Its statistics came from positions the model never sees at inference."""
    row = json.loads(phantoms.read_text().splitlines()[0])
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({**row, "image": str(phantoms.parent / row["image"]), "indication": "Cough. " * 600})
                    + "\n")
    with pytest.raises(RadtrtError, match=r"calibration sample 1 of 1: .* positions, beyond the model's"):
        calibrate(loaded, long, 1)


def test_phantom_keyword_beside_a_folder_of_that_name_is_refused(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """'radtrt data phantoms -o phantom' then 'radtrt calibrate --data phantom' generated new phantoms and ignored
    the user's folder without a word."""
    from radtrt.calibration.run import means_phantoms
    from radtrt.exporter.onnx_int8 import Int8Plan

    monkeypatch.chdir(tmp_path)
    assert means_phantoms("phantom") and not means_phantoms("./phantom") and not means_phantoms("studies")
    (tmp_path / "phantom").mkdir()
    for check in (lambda: means_phantoms("phantom"), lambda: Int8Plan(calibration_data="phantom").check_ready()):
        with pytest.raises(RadtrtError, match=r"'phantom' names the synthetic phantoms, and ./phantom exists here: "
                                              r"give ./phantom to calibrate on that folder"):
            check()
    assert not means_phantoms("./phantom")
    (tmp_path / "phantom").rmdir()
    (tmp_path / "phantom").write_text("")  # a file of that name was called a folder
    with pytest.raises(RadtrtError, match=r"a file ./phantom exists here: to calibrate on it, rename it to "
                                          r"phantom.jsonl if it is a JSONL manifest; or run from another folder"):
        means_phantoms("phantom")


def test_phantom_keyword_beside_a_file_of_that_name_gives_a_remedy_that_works(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The refusal said "give ./phantom to calibrate on that file", and ./phantom was then refused as "neither a
    folder nor a JSONL manifest": a file is told apart by its suffix, so the remedy is to rename it."""
    from radtrt.calibration.run import means_phantoms
    from radtrt.calibration.samples import check_samples
    from radtrt.exporter.onnx_int8 import Int8Plan

    monkeypatch.chdir(tmp_path)
    (tmp_path / "phantom").write_text("")
    with pytest.raises(RadtrtError) as refused:
        means_phantoms("phantom")
    assert "give ./phantom" not in str(refused.value) and ".safetensors" not in str(refused.value)  # calibrate
    with pytest.raises(RadtrtError) as refused:
        Int8Plan(calibration_data="phantom").check_ready()
    assert "rename it to phantom.jsonl if it is a JSONL manifest, phantom.safetensors if it is a 'radtrt " \
           "calibrate' file; or run from another folder" in str(refused.value)
    with pytest.raises(RadtrtError, match="neither a folder nor a JSONL manifest"):  # why ./phantom was no remedy
        check_samples(Path("./phantom"), 1)
    (tmp_path / "phantom").rename(tmp_path / "phantom.jsonl")  # the remedy given: read as a manifest now
    with pytest.raises(RadtrtError) as read:
        check_samples(Path("phantom.jsonl"), 1)
    assert "neither a folder nor" not in str(read.value)


def test_files_written_as_format_version_3_still_load(calib, tmp_path: Path) -> None:
    """For one hour the writer stamped "3" on files of the same content: they were refused ('reads version 2')."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = calib.file.save(tmp_path / "v3.safetensors")
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, path, metadata={**metadata, "format_version": "3"})
    assert CalibrationFile.load(path).hash == calib.file.hash


def test_a_safetensors_file_that_is_no_calibration_is_told_so(loaded: LoadedModel, tmp_path: Path) -> None:
    """A model's weights given as --calibration-data were 'neither a folder nor a JSONL manifest', though the
    option takes calibration files."""
    from radtrt.model.io import save_tensors

    weights = tmp_path / "model.safetensors"
    save_tensors({"w": torch.ones(2)}, weights)
    with pytest.raises(RadtrtError, match="is not a calibration file of 'radtrt calibrate' \\(format None\\)"):
        resolve_calibration(loaded, str(weights))
