"""Training data and schedule: items, normalisation, batch plan, and the cosine schedule vs transformers'."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import get_cosine_schedule_with_warmup

from radtrt.data.manifest import read_manifest
from radtrt.errors import RadtrtError
from radtrt.imaging.preprocess import preprocess
from radtrt.imaging.study import load_study
from radtrt.model.config import CLIP_MEAN, CLIP_STD
from radtrt.model.tiny import train_tiny_tokenizer
from radtrt.training.data import ManifestDataset, Schedule, load_pixels_u8, normalize
from radtrt.training.examples import IGNORE_INDEX
from radtrt.training.schedule import cosine_with_warmup


def _lrs(make, total: int) -> list[float]:  # noqa: ANN001
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = make(opt)
    out = []
    for _ in range(total):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def test_cosine_schedule_equals_transformers() -> None:
    for warmup, total in ((3, 100), (0, 7), (1, 1)):
        ours = _lrs(lambda o: cosine_with_warmup(o, warmup, total), total)
        theirs = _lrs(lambda o: get_cosine_schedule_with_warmup(o, warmup, total), total)
        assert ours == theirs
    assert _lrs(lambda o: cosine_with_warmup(o, 3, 100), 100)[:4] == [0.0, 1e-3 / 3, 2e-3 / 3, 1e-3]


def test_batch_plan_covers_each_epoch_once_and_splits_ranks() -> None:
    one = Schedule(n=10, micro_batch_size=2, grad_accum=2, world_size=1, seed=0)
    assert one.steps_per_epoch == 2 and one.total_steps(1.5, None) == 3 and one.total_steps(1.0, 7) == 7
    epoch0 = [i for step in (0, 1) for mb in one.micro_batches(step, 0) for i in mb]
    assert len(set(epoch0)) == 8  # 2 of 10 dropped (last partial batch)
    assert one.micro_batches(2, 0) != one.micro_batches(0, 0)  # a new permutation each epoch
    assert one.micro_batches(1, 0) == Schedule(10, 2, 2, 1, 0).micro_batches(1, 0)  # pure function of the step
    two = Schedule(n=10, micro_batch_size=2, grad_accum=1, world_size=2, seed=0)
    assert two.micro_batches(0, 0) + two.micro_batches(0, 1) == one.micro_batches(0, 0)



def _manifest(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (90, 70), dtype=np.uint8)).save(tmp_path / "x.png")
    rows = [{"image": "x.png", "findings": f"The heart is enlarged {i}.", "labels": ["cardiomegaly", "central_line"]}
            for i in range(3)]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path / "m.jsonl"


def test_a_manifest_whose_labels_are_all_empty_is_said_to_be_so(tmp_path: Path) -> None:
    """Every row with "labels": [] was said as "the manifest has no 'labels'", sending the user to add what is
    there."""
    from radtrt.training.loop import label_vocabulary

    path = _manifest(tmp_path)
    path.write_text("".join(json.dumps({**json.loads(line), "labels": []}) + "\n"
                            for line in path.read_text().splitlines()))
    dataset = ManifestDataset(read_manifest(path), tmp_path, tokenizer=None, template=None, max_length=8,
                              image_size=None)
    with pytest.raises(RadtrtError, match="every manifest row's 'labels' is an empty list; list each study's "
                                          "findings there"):
        label_vocabulary(dataset)


@pytest.mark.parametrize("where", ["image", "folder"])
def test_a_manifest_image_behind_a_link_loop_is_said_to_be_one(tmp_path: Path, where: str) -> None:
    """A row's image that is a symbolic link loop (or lies in one) was said to be "not found"."""
    path = _manifest(tmp_path)
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    image = "loop" if where == "image" else "loop/x.png"
    path.write_text("".join(json.dumps({**json.loads(line), "image": image}) + "\n"
                            for line in path.read_text().splitlines()))
    culprit = "it" if where == "image" else str(loop)
    with pytest.raises(RadtrtError, match=f"manifest image {image} \\(relative to {tmp_path}\\) cannot be read: "
                                          f"{culprit} is a symbolic link loop$"):
        ManifestDataset(read_manifest(path), tmp_path, tokenizer=None, template=None, max_length=8, image_size=56)


def test_cached_pixels_normalise_exactly_like_preprocess(tmp_path: Path) -> None:
    image = tmp_path / "x.png"
    _manifest(tmp_path)
    u8 = load_pixels_u8(image, 56)
    assert u8.dtype == torch.uint8 and u8.shape == (56, 56)
    expected = preprocess(load_study(image).pixels_u8, 56, CLIP_MEAN, CLIP_STD)
    assert torch.equal(normalize(u8[None], CLIP_MEAN, CLIP_STD)[0], expected)


def test_text_items_can_be_conditioned_on_labels(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path)
    tok = train_tiny_tokenizer()
    ds = ManifestDataset(read_manifest(manifest), tmp_path, tokenizer=tok, template="text", max_length=2048,
                         image_size=None, condition_on_labels=True)
    item = ds[1]
    prefix = tok.encode("cardiomegaly, central line\n")
    report = tok.encode("The heart is enlarged 1.", add_bos=False) + [tok.eos_token_id]
    assert item["input_ids"] == prefix + report and item["labels"] == [IGNORE_INDEX] * len(prefix) + report
    plain = ManifestDataset(read_manifest(manifest), tmp_path, tokenizer=tok, template="text", max_length=2048,
                            image_size=None)[1]
    assert plain["input_ids"] == tok.encode("The heart is enlarged 1.") + [tok.eos_token_id]
    with pytest.raises(RadtrtError, match="only for text-only"):
        ManifestDataset(read_manifest(manifest), tmp_path, tokenizer=tok, template="v1", max_length=2048,
                        image_size=None, condition_on_labels=True)
    vision = ManifestDataset(read_manifest(manifest), tmp_path, tokenizer=None, template=None, max_length=2048,
                             image_size=56, label_names=["no_finding", "cardiomegaly", "central_line"])
    assert vision[0]["targets"].tolist() == [0.0, 1.0, 1.0] and vision[0]["pixels"].shape == (56, 56)
    assert "input_ids" not in vision[0]


@pytest.mark.parametrize("line", ["[" * 100000 + "]" * 100000, '{"image": 1' + "0" * 5000 + "}"])
def test_json_that_python_cannot_parse_is_one_line(tmp_path: Path, line: str) -> None:
    """RecursionError / ValueError (over 4300 digits) escaped as tracebacks: only JSONDecodeError was caught."""
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(json.dumps({"image": "a.png", "findings": "Clear."}) + "\n" + line + "\n")
    with pytest.raises(RadtrtError, match="manifest.jsonl:2: not a manifest row"):
        read_manifest(manifest)


def test_lazily_read_rows_naming_study_folders_have_a_digest(tmp_path: Path) -> None:
    """A row may name a study folder; without preloading the digest opened it as a file: 'Is a directory'."""
    from radtrt.imaging.synthetic import synthetic_chest, write_radiograph

    for i in range(2):
        write_radiograph(tmp_path / f"s{i}" / "pa.dcm", synthetic_chest(seed=i), view_position="PA")
    rows = [{"image": f"s{i}", "findings": f"Finding {i}."} for i in range(2)]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def digest() -> str | None:
        return ManifestDataset(read_manifest(tmp_path / "m.jsonl"), tmp_path, tokenizer=None, template=None,
                               max_length=2048, image_size=56, preload=False).images_digest()

    first = digest()
    assert first is not None and digest() == first
    write_radiograph(tmp_path / "s1" / "pa.dcm", synthetic_chest(seed=7), view_position="PA")  # changed in place
    assert digest() != first
    (tmp_path / "s0" / ".DS_Store").write_bytes(b"x")  # what reading the study ignores, the digest ignores
    second = digest()
    assert second == ManifestDataset(read_manifest(tmp_path / "m.jsonl"), tmp_path, tokenizer=None, template=None,
                                     max_length=2048, image_size=56, preload=False).images_digest()
    (tmp_path / "s0" / ".DS_Store").write_bytes(b"y")
    assert digest() == second
    import pydicom

    # a series of s0's own study (one of another study is refused, before the run, as a folder of two studies)
    study_uid = pydicom.dcmread(tmp_path / "s0" / "pa.dcm", stop_before_pixels=True).StudyInstanceUID
    write_radiograph(tmp_path / "store" / "ser" / "pa.dcm", synthetic_chest(seed=3), view_position="PA",
                     study_uid=study_uid)
    (tmp_path / "s0" / "ser").symlink_to(tmp_path / "store" / "ser")  # a linked series is read, so hashed
    linked = digest()
    assert linked != second
    write_radiograph(tmp_path / "store" / "ser" / "pa.dcm", synthetic_chest(seed=4), view_position="PA",
                     study_uid=study_uid)
    changed = digest()
    assert changed != linked
    # a run folder inside a study folder: its log and checkpoint, written after the run's digest, were "image data
    # that has changed", and resume refused the run it had just told the user to resume
    run = tmp_path / "s1" / "run"

    def run_digest() -> str | None:
        return ManifestDataset(read_manifest(tmp_path / "m.jsonl"), tmp_path, tokenizer=None, template=None,
                               max_length=2048, image_size=56, preload=False).images_digest(run)

    assert run_digest() == changed
    (run / "checkpoint").mkdir(parents=True)
    (run / "checkpoint" / "state.pt").write_bytes(b"state")
    (run / "log.jsonl").write_text("{}\n")
    assert run_digest() == changed and digest() != changed


@pytest.mark.parametrize("folder", [False, True])
def test_an_image_unreadable_while_hashed_is_named_by_its_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                folder: bool) -> None:
    """The digest's read failure named the image's path, which may carry a patient's name (a study folder named
    after one): the row's line is what other errors name."""
    from radtrt.imaging.synthetic import synthetic_chest, write_radiograph

    image = "Doe^Jane/pa.dcm" if not folder else "Doe^Jane"
    write_radiograph(tmp_path / "Doe^Jane" / "pa.dcm", synthetic_chest(seed=0), view_position="PA")
    (tmp_path / "m.jsonl").write_text(json.dumps({"image": image, "findings": "Clear."}) + "\n")
    dataset = ManifestDataset(read_manifest(tmp_path / "m.jsonl"), tmp_path, tokenizer=None, template=None,
                              max_length=2048, image_size=56, preload=False, where=["m.jsonl:1"])
    real_open = Path.open

    def denied(self: Path, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if self.name == "pa.dcm":
            raise PermissionError(13, "Permission denied")
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", denied)
    with pytest.raises(RadtrtError) as e:
        dataset.images_digest()
    assert "m.jsonl:1" in str(e.value) and "Doe" not in str(e.value) and "Permission denied" in str(e.value)


def test_a_truncated_image_is_refused_before_a_lazily_read_run(tmp_path: Path) -> None:
    """Read by DataLoader workers, a DICOM cut inside its pixel data failed the run mid-way, after checkpoints were
    written (and a run whose data changes cannot be resumed): its length is told from the header up front."""
    from radtrt.imaging.synthetic import synthetic_chest, write_radiograph

    path = write_radiograph(tmp_path / "pa.dcm", synthetic_chest(seed=0), view_position="PA")
    path.write_bytes(path.read_bytes()[:-100])
    (tmp_path / "m.jsonl").write_text(json.dumps({"image": "pa.dcm", "findings": "Clear."}) + "\n")
    with pytest.raises(RadtrtError, match=r"m.jsonl:1 \(its image\): pixel data truncated \(102300 of 102400"):
        ManifestDataset(read_manifest(tmp_path / "m.jsonl"), tmp_path, tokenizer=None, template=None,
                        max_length=2048, image_size=56, preload=False, where=["m.jsonl:1"])


@pytest.mark.parametrize("key", ["indication", "findings"])
def test_the_image_placeholder_in_a_row_is_refused_naming_the_row(tmp_path: Path, key: str) -> None:
    """In an indication, the prompt's refusal named no row (a training run, a calibration set or a bench parity
    manifest of thousands); in findings, tokenizing spliced a second image into the training example."""
    manifest = tmp_path / "manifest.jsonl"
    rows = [{"image": "a.png", "findings": "Clear."}, {"image": "b.png", "findings": "Clear.", key: "see <image> here"}]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(RadtrtError, match=rf"manifest.jsonl:2: its '{key}' contains the image placeholder <image>"):
        read_manifest(manifest)
