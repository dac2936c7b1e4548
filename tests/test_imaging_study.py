"""Study loading: frontal-view choice in folders, and PNG/JPEG input."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from radtrt.errors import RadtrtError
from radtrt.imaging.pixels import MAX_PIXELS, equalize_histogram, min_max_to_uint8
from radtrt.imaging.raster import check_raster_header
from radtrt.imaging.study import SelectedImage, load_study, screen_study, split_studies, study_warnings
from radtrt.imaging.synthetic import FAKE_PATIENT_NAME, synthetic_chest, write_radiograph


def _sr_file(folder: Path) -> Path:
    source = get_testdata_file("test-SR.dcm", download=False)
    assert source is not None, "pydicom test file test-SR.dcm is not in the installed wheel"  # pydicom>=3 ships it
    return Path(shutil.copy(source, folder / "report.dcm"))


def _dx(folder: Path, name: str, view: str | None, seed: int = 0, **header: object) -> Path:
    """One image of the study this folder holds (one StudyInstanceUID per folder, as an export writes it)."""
    header.setdefault("study_uid", generate_uid(entropy_srcs=[str(folder)]))
    return write_radiograph(folder / name, synthetic_chest(seed=seed), view_position=view,
                            **header)


def _refused(path: Path, match: str) -> str:
    with pytest.raises(RadtrtError, match=match) as info:
        load_study(path)
    message = str(info.value)
    assert "\n" not in message
    for part in FAKE_PATIENT_NAME.split("^"):
        assert part not in message
    return message


def test_folder_picks_pa_over_lateral_and_skips_sr(tmp_path: Path) -> None:
    _dx(tmp_path, "1_lateral.dcm", "LL", seed=1)
    pa = _dx(tmp_path, "2_pa.dcm", "PA", seed=2)
    _sr_file(tmp_path)
    chosen = load_study(tmp_path)
    assert isinstance(chosen, SelectedImage)
    assert chosen.source_file == pa and chosen.view_position == "PA"
    assert chosen.modality == "DX" and chosen.dataset is not None
    assert chosen.pixels_u8.dtype == np.uint8 and chosen.pixels_u8.shape == (256, 200)
    assert chosen.skipped == ()  # an SR beside the images is ignored, not warned about at every run


def test_pa_wins_over_ap_regardless_of_order(tmp_path: Path) -> None:
    _dx(tmp_path, "a_ap.dcm", "AP", seed=1, study_uid="1.2.3.5")
    pa = _dx(tmp_path / "sub", "z_pa.dcm", "PA", seed=2, study_uid="1.2.3.5")  # found recursively
    assert load_study(tmp_path).source_file == pa


def test_ap_is_picked_when_no_pa(tmp_path: Path) -> None:
    _dx(tmp_path, "a.dcm", "LL", seed=1)
    ap = _dx(tmp_path, "b.dcm", "AP", seed=2)
    chosen = load_study(tmp_path)
    assert chosen.source_file == ap and chosen.view_position == "AP"


def test_several_frontals_are_chosen_by_sorted_path(tmp_path: Path) -> None:
    first = _dx(tmp_path, "a.dcm", "PA", seed=1)
    _dx(tmp_path, "b.dcm", "PA", seed=2)
    _dx(tmp_path, "c.dcm", "PA", seed=3)
    assert load_study(tmp_path).source_file == first


def test_a_broken_chosen_image_fails_the_study_without_fallback(tmp_path: Path) -> None:
    pa = _dx(tmp_path, "a_pa.dcm", "PA", seed=1)
    pa.write_bytes(pa.read_bytes()[:-5000])  # header intact, pixel data cut
    _dx(tmp_path, "b_ap.dcm", "AP", seed=2)
    message = _refused(tmp_path, "truncated")
    assert "a_pa.dcm" in message


def test_a_folder_named_as_its_failing_file_still_names_the_file(tmp_path: Path) -> None:
    """A study folder 'frontal.dcm' whose file 'frontal.dcm' failed was told as if the folder were the file: the
    message's leading file name was taken for the study's own and dropped."""
    folder = tmp_path / "frontal.dcm"
    pa = _dx(folder, "frontal.dcm", "PA", seed=1)
    pa.write_bytes(pa.read_bytes()[:-5000])
    assert _refused(folder, "truncated").startswith(f"{folder}: frontal.dcm: pixel data truncated")
    single = _dx(tmp_path / "single", "frontal.dcm", "PA", seed=2)
    single.write_bytes(single.read_bytes()[:-5000])
    assert _refused(single, "truncated").startswith(f"{single}: pixel data truncated")


def test_only_laterals_are_refused_naming_the_views(tmp_path: Path) -> None:
    _dx(tmp_path, "a.dcm", "LL", seed=1)
    _dx(tmp_path, "b.dcm", "RL", seed=2)
    _sr_file(tmp_path)
    message = _refused(tmp_path, "no frontal")
    assert "LL x1" in message and "RL x1" in message


def test_a_refused_frontal_is_named_when_no_frontal_is_left(tmp_path: Path) -> None:
    """A PA refused for its modality left 'no frontal image; views found: LL x1', the PA and its remedy unsaid."""
    _dx(tmp_path, "a_pa.dcm", "PA", seed=1, modality="CT")
    _dx(tmp_path, "b_lat.dcm", "LL", seed=2)
    message = _refused(tmp_path, "no frontal")
    assert "LL x1; not used: a_pa.dcm: " in message and "modality" in message and "--allow-any-modality" in message


def test_linked_series_folders_are_followed_once(tmp_path: Path) -> None:
    """Links to files were followed but links to folders were not: a study whose series are links was 'no usable
    image in folder (no DICOM, PNG or JPEG files)'. A link back up must not walk forever."""
    _dx(tmp_path / "store" / "s1", "pa.dcm", "PA", study_uid="1.2.3.7")
    study = tmp_path / "study"
    study.mkdir()
    (study / "series1").symlink_to(tmp_path / "store" / "s1")
    (study / "up").symlink_to(study)
    (study / "again").symlink_to(tmp_path / "store" / "s1")
    image = load_study(study)
    assert image.view_position == "PA" and image.source_file.name == "pa.dcm"


def test_hidden_files_and_dicomdir_are_ignored(tmp_path: Path) -> None:
    _dx(tmp_path, "lat.dcm", "LL", seed=1)
    _dx(tmp_path, ".hidden_pa.dcm", "PA", seed=2)
    _dx(tmp_path / ".cache", "pa.dcm", "PA", seed=3)
    _dx(tmp_path, "DICOMDIR", "PA", seed=4)
    (tmp_path / "notes.txt").write_text("not an image")
    _refused(tmp_path, "no frontal")


def test_folder_without_usable_images_gives_reasons(tmp_path: Path) -> None:
    _sr_file(tmp_path)
    _dx(tmp_path, "mammo.dcm", "PA", modality="MG")
    message = _refused(tmp_path, "no usable image")
    assert "not an image" in message and "modality 'MG'" in message
    # the override makes the MG image usable
    assert load_study(tmp_path, allow_any_modality=True).modality == "MG"


def test_empty_folder_and_missing_path_are_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    _refused(tmp_path / "empty", "no usable image")
    _refused(tmp_path / "nowhere", "no such file")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_fifo_is_never_opened(tmp_path: Path) -> None:
    """Opening a FIFO blocks until a writer comes: a study (or a file in a study folder) hung forever."""
    os.mkfifo(tmp_path / "pipe.dcm")
    _refused(tmp_path / "pipe.dcm", "not a regular file or folder")
    pa = _dx(tmp_path, "z_pa.dcm", "PA")
    assert load_study(tmp_path).source_file == pa


def test_single_lateral_file_is_used_and_its_view_reported(tmp_path: Path) -> None:
    chosen = load_study(_dx(tmp_path, "lat.dcm", "LL"))
    assert chosen.view_position == "LL"


def test_selected_image_repr_has_no_patient_data(tmp_path: Path) -> None:
    text = repr(load_study(_dx(tmp_path, "pa.dcm", "PA")))
    assert "Synthetic" not in text and "PHANTOM" not in text


# ---- PNG / JPEG ---------------------------------------------------------------------------

def _grey8(seed: int = 0) -> np.ndarray:
    return (synthetic_chest(seed=seed) >> 4).astype(np.uint8)


def test_png_8bit_is_used_as_is(tmp_path: Path) -> None:
    grey = _grey8()
    Image.fromarray(grey).save(tmp_path / "cxr.png")
    chosen = load_study(tmp_path / "cxr.png")
    np.testing.assert_array_equal(chosen.pixels_u8, grey)
    assert (chosen.view_position, chosen.modality, chosen.dataset) == ("UNKNOWN", None, None)


@pytest.mark.parametrize("shape", [(1, 20000), (20000, 1), (100, 401)])
def test_a_strip_is_not_a_radiograph(tmp_path: Path, shape: tuple[int, int]) -> None:
    """A 20 KB 1 x 20000 PNG became a 518 x 10-million-pixel image in the transform (6 GB, 25 s)."""
    strip = (np.random.default_rng(0).random(shape) * 255).astype(np.uint8)
    Image.fromarray(strip).save(tmp_path / "strip.png")
    _refused(tmp_path / "strip.png", f"a {shape[1]} x {shape[0]} image is not a chest radiograph")
    long_length = (np.random.default_rng(1).random((400, 100)) * 255).astype(np.uint8)  # 4:1 is still read
    Image.fromarray(long_length).save(tmp_path / "ok.png")
    assert load_study(tmp_path / "ok.png").pixels_u8.shape == (400, 100)


def test_a_folder_of_two_studies_is_refused(tmp_path: Path) -> None:
    """Two patients' images in one folder: the report of the first PA by path was filed without a word."""
    _dx(tmp_path / "mixed", "a.dcm", "PA", seed=1, study_uid=generate_uid())
    _dx(tmp_path / "mixed", "b.dcm", "PA", seed=2, study_uid=generate_uid())
    _refused(tmp_path / "mixed", "mixed: holds the images of 2 studies")


def test_a_folder_of_studies_splits_into_its_entries(tmp_path: Path) -> None:
    """One study per entry (a file, or a study's folder with its series below): each entry is a study."""
    root = tmp_path / "studies"
    _dx(root / "s1" / "series1", "pa.dcm", "PA", study_uid="1.2.3.1")
    _dx(root / "s1" / "series2", "lat.dcm", "LATERAL", study_uid="1.2.3.1")
    _dx(root, "s2.dcm", "PA", seed=2, study_uid="1.2.3.2")
    (root / "notes.txt").write_text("not an image")
    assert split_studies(root) == [root / "s1", root / "s2.dcm"]
    assert split_studies(root / "s1") == [root / "s1"]  # one study, its series in subfolders
    (root / "s2.dcm").unlink()
    assert split_studies(root) == [root]  # what is left is one study
    png = tmp_path / "pngs"
    png.mkdir()
    Image.fromarray(_grey8()).save(png / "a.png")
    Image.fromarray(_grey8()).save(png / "b.png")
    assert split_studies(png) == [png]  # no study UIDs: read as one folder, which says why it is ambiguous


@pytest.mark.parametrize("layout, match", [
    ("flat pairs", "a_lat.dcm and a_pa.dcm hold images of one study"),
    ("one entry two studies", "c holds the images of 2 studies"),
    ("a lateral alone", "d_lat.dcm is a LL view, not frontal \\(PA/AP\\), among the studies of the folder")])
def test_studies_that_cannot_be_told_apart_are_refused(tmp_path: Path, layout: str, match: str) -> None:
    root = tmp_path / "mixed"
    _dx(root, "a_pa.dcm", "PA", study_uid="1.2.3.1")
    _dx(root, "b_pa.dcm", "PA", seed=2, study_uid="1.2.3.2")
    if layout == "flat pairs":  # study 1's lateral beside its frontal: two entries of one study
        _dx(root, "a_lat.dcm", "LATERAL", study_uid="1.2.3.1")
    elif layout == "one entry two studies":
        _dx(root / "c", "x.dcm", "PA", study_uid="1.2.3.3")
        _dx(root / "c", "y.dcm", "PA", study_uid="1.2.3.4")
    else:  # a file given by itself is read whatever its view; one found among studies is not (folder rules)
        _dx(root, "d_lat.dcm", "LL", study_uid="1.2.3.5")
    with pytest.raises(RadtrtError, match=f"mixed: {match}"):
        split_studies(root)


def test_an_entry_whose_files_were_all_refused_stays_a_study(tmp_path: Path) -> None:
    """It vanished from the run with exit 0: a CT, a damaged file, a link to a study folder."""
    root = tmp_path / "studies"
    _dx(root / "s1", "pa.dcm", "PA", study_uid="1.2.3.1")
    _dx(root / "s2", "pa.dcm", "PA", study_uid="1.2.3.2", modality="CT")
    (root / "s3").mkdir()
    (root / "s3" / "pa.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"junk")
    _dx(tmp_path / "elsewhere" / "s4", "pa.dcm", "PA", study_uid="1.2.3.4")
    (root / "s4").symlink_to(tmp_path / "elsewhere" / "s4")
    Image.fromarray(_grey8()).save(root / "s5.png")  # a PNG entry among DICOM studies: a study of its own
    (root / "notes.txt").write_text("not an image, not a study")
    assert split_studies(root) == [root / n for n in ("s1", "s2", "s3", "s4", "s5.png")]
    assert split_studies(root / "s2") == [root / "s2"]
    _refused(root / "s2", "no usable image in folder: pa.dcm: .*modality")


def test_screening_refuses_from_headers_what_reading_would(tmp_path: Path) -> None:
    """``screen_study`` runs before a model loads: it refuses, by the same words, what ``load_study`` refuses from
    headers, and leaves pixel damage (which only decoding finds) to the read; a file cut short is told by its
    length, a study folder's chosen image too (with no fallback to another image)."""
    ct = _dx(tmp_path / "ct", "pa.dcm", "PA", modality="CT")
    _dx(tmp_path / "lat", "a.dcm", "LL")
    for study, match in ((ct, "modality"), (ct.parent, "no usable image in folder: pa.dcm: .*modality"),
                         (tmp_path / "lat", "no frontal"), (tmp_path / "gone", "gone: no such file or folder"),
                         (_sr_file(tmp_path), "not an image")):
        with pytest.raises(RadtrtError, match=match) as screened:
            screen_study(study)
        assert str(screened.value) == _refused(study, match)
    wide = tmp_path / "wide.png"  # its aspect was checked only once decoded: a training run, mid-run
    Image.fromarray(np.zeros((10, 100), np.uint8)).save(wide)
    with pytest.raises(RadtrtError, match=r"wide.png: a 100 x 10 image is not a chest radiograph") as screened:
        screen_study(wide)
    assert str(screened.value) == _refused(wide, "not a chest radiograph")
    cut = _dx(tmp_path / "cut", "pa.dcm", "PA")
    cut.write_bytes(cut.read_bytes()[:-5000])  # header intact, pixel data cut
    _dx(tmp_path / "cut", "z_ap.dcm", "AP")
    for study in (cut, cut.parent):
        with pytest.raises(RadtrtError, match=r"pa.dcm: pixel data truncated \(97400 of 102400 bytes\)") as screened:
            screen_study(study)
        assert str(screened.value) == _refused(study, "truncated")
    damaged = _dx(tmp_path / "damaged", "pa.dcm", "PA")
    data = bytearray(damaged.read_bytes())
    data[-5000:] = b"\xff" * 5000  # as long as declared: what only decoding could tell (here nothing does)
    damaged.write_bytes(bytes(data))
    screen_study(damaged)


def test_an_empty_file_is_said_not_dropped(tmp_path: Path) -> None:
    """A PA whose transfer was cut to 0 bytes vanished without a word, and the AP beside it was reported on."""
    (tmp_path / "1_pa.dcm").write_bytes(b"")
    ap = _dx(tmp_path, "2_ap.dcm", "AP")
    chosen = load_study(tmp_path)
    assert chosen.source_file == ap and chosen.skipped == (("1_pa.dcm", "1_pa.dcm: an empty file (0 bytes: a copy cut "
                                                                          "short?)"),)
    assert "1 file(s) not used: 1_pa.dcm: an empty file" in study_warnings(tmp_path, chosen)[0]
    (tmp_path / "2_ap.dcm").unlink()
    _refused(tmp_path, "no usable image in folder: 1_pa.dcm: an empty file")
    # a study whose only image is empty stays a study of a folder of studies, and fails with its reason
    root = tmp_path / "studies"
    _dx(root / "s1", "pa.dcm", "PA", study_uid="1.2.3.1")
    _dx(root / "s2", "pa.dcm", "PA", study_uid="1.2.3.2")
    (root / "s3").mkdir()
    (root / "s3" / "pa.dcm").write_bytes(b"")
    assert split_studies(root) == [root / "s1", root / "s2", root / "s3"]
    _refused(root / "s3", "no usable image in folder: pa.dcm: an empty file")


def test_a_dangling_link_is_said_not_dropped(tmp_path: Path) -> None:
    """A dangling link vanished from the scan: a study of a folder of studies was dropped with exit 0, and a
    study whose frontal link dangled said 'no frontal image' without naming it."""
    root = tmp_path / "studies"
    _dx(root / "s1", "pa.dcm", "PA", study_uid="1.2.3.1")
    _dx(root / "s2", "pa.dcm", "PA", study_uid="1.2.3.2")
    (root / "s3").symlink_to(tmp_path / "gone")
    assert split_studies(root) == [root / "s1", root / "s2", root / "s3"]
    _refused(root / "s3", "s3: a symbolic link to a missing target")
    _dx(root / "s1", "lat.dcm", "LL", study_uid="1.2.3.1")
    (root / "s1" / "pa.dcm").unlink()
    (root / "s1" / "pa.dcm").symlink_to(tmp_path / "gone.dcm")
    _refused(root / "s1", "no frontal .*not used: pa.dcm: a symbolic link to a missing target")


def test_what_makes_a_folder_a_set_of_studies(tmp_path: Path) -> None:
    """Only readable UIDs were counted: PNGs beside one DICOM study were dropped from a calibration set (exit 0),
    and a CT of another study beside one study was 'not used' while beside two it failed; an SR (radtrt's own
    --sr-out among them) became a failing 'study'."""
    mixed = tmp_path / "mixset"
    mixed.mkdir()
    for i in range(2):
        Image.fromarray(_grey8(i)).save(mixed / f"{i}.png")
    _dx(mixed / "acc0" / "ser1", "im1", "PA", study_uid="1.2.3.1")
    _dx(mixed / "acc0" / "ser2", "im1", "LL", study_uid="1.2.3.1")
    assert split_studies(mixed, images_apart=True) == [mixed / "0.png", mixed / "1.png", mixed / "acc0"]
    assert split_studies(mixed) == [mixed]  # infer: one study, its PA chosen over the PNGs
    two = tmp_path / "two"
    _dx(two, "s0.dcm", "PA", study_uid="1.2.3.1")
    _dx(two, "ct.dcm", "PA", study_uid="1.2.3.2", modality="CT")
    assert split_studies(two) == [two / "ct.dcm", two / "s0.dcm"]  # the CT fails as the study it is
    flat = tmp_path / "flat"
    _dx(flat, "a.dcm", "PA", study_uid="1.2.3.1")
    _dx(flat, "b.dcm", "PA", study_uid="1.2.3.2")
    (flat / "sr").mkdir()
    _sr_file(flat / "sr")
    _sr_file(flat)
    assert split_studies(flat) == [flat / "a.dcm", flat / "b.dcm"]


def test_a_radiograph_cut_short_is_a_failing_study_not_an_sr(tmp_path: Path) -> None:
    """A DX file cut in its header reads quietly without PixelData: it was taken for a non-image object (an SR)
    and vanished from a folder of studies with exit 0."""
    root = tmp_path / "set"
    _dx(root / "s1", "pa.dcm", "PA", study_uid="1.2.3.1")
    _dx(root / "s2", "pa.dcm", "PA", study_uid="1.2.3.2")
    whole = _dx(tmp_path / "tmp", "pa.dcm", "PA", study_uid="1.2.3.3").read_bytes()
    (root / "s3").mkdir()
    (root / "s3" / "pa.dcm").write_bytes(whole[:whole.find(b"\xe0\x7f\x10\x00")])  # up to the Pixel Data tag
    assert split_studies(root) == [root / "s1", root / "s2", root / "s3"]
    _refused(root / "s3", "no pixel data \\(Digital X-Ray Image Storage - For Presentation\\): a file cut short")
    seg = get_testdata_file("liver_1frame.dcm", download=False)  # a SEG holds pixels; its class name says no 'Image'
    assert seg is not None
    shutil.copy(seg, root / "seg.dcm")
    assert split_studies(root)[-1] == root / "seg.dcm"


def test_what_made_a_folder_a_set_is_named_when_a_study_is_split(tmp_path: Path) -> None:
    """'lat.dcm and pa.dcm hold images of one study': what the user meant; the file that made the folder a set of
    studies went unnamed."""
    ct = tmp_path / "ctother"
    _dx(ct, "pa.dcm", "PA", study_uid="1.2.3.1")
    _dx(ct, "lat.dcm", "LL", study_uid="1.2.3.1")
    _dx(ct, "loc.dcm", "PA", study_uid="1.2.3.9", modality="CT")
    with pytest.raises(RadtrtError, match="lat.dcm and pa.dcm hold images of one study .*, and loc.dcm holds another "
                                          "study's images: move loc.dcm out"):
        split_studies(ct)
    why = tmp_path / "why"  # the entry of another study also holds this one's: it is still what makes the set
    _dx(why, "a_pa.dcm", "PA", study_uid="1.2.3.1")
    _dx(why, "b_pa.dcm", "PA", study_uid="1.2.3.1")
    _dx(why / "z", "pa.dcm", "PA", study_uid="1.2.3.1")
    _dx(why / "z", "pa2.dcm", "PA", study_uid="1.2.3.2")
    with pytest.raises(RadtrtError, match="z holds the images of 2 studies|and z holds another study's images"):
        split_studies(why)
    _dx(why, "c_pa.dcm", "PA", study_uid="1.2.3.3")  # two other studies: moving one out would not help
    with pytest.raises(RadtrtError, match="another study's images: put each study's images in a folder of its own"):
        split_studies(why)
    preview = tmp_path / "mix"
    _dx(preview, "pa.dcm", "PA", study_uid="1.2.3.1")
    _dx(preview, "lat.dcm", "LL", study_uid="1.2.3.1")
    Image.fromarray(_grey8()).save(preview / "preview.png")
    with pytest.raises(RadtrtError, match="and preview.png \\(no study UID\\) makes it a set of studies, one an "
                                          "entry: move preview.png out"):
        split_studies(preview, images_apart=True)
    image = load_study(preview)  # infer: one study; the preview is said, not dropped
    assert image.source_file.name == "pa.dcm" and [n for n, _ in image.skipped] == ["preview.png"]


def test_study_files_leave_out_what_reading_never_opens(tmp_path: Path) -> None:
    """Training's digest opened a dangling link (an error) and a FIFO (a hang) that reading the study skips."""
    import os

    from radtrt.imaging.study import study_files

    _dx(tmp_path, "pa.dcm", "PA")
    (tmp_path / "gone.dcm").symlink_to(tmp_path / "nowhere")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / ".DS_Store").write_bytes(b"x")
    assert study_files(tmp_path) == [tmp_path / "pa.dcm"]


def test_a_folder_reached_through_links_keeps_its_own_name(tmp_path: Path) -> None:
    root = tmp_path / "set"
    _dx(root / "study", "pa.dcm", "PA", study_uid="1.2.3.1")
    _dx(root / "other", "pa.dcm", "PA", study_uid="1.2.3.2")
    for name in "abc":
        (root / name).symlink_to(root / "study")
    assert split_studies(root) == [root / "other", root / "study"]


def test_a_folder_of_images_without_study_uids(tmp_path: Path) -> None:
    """A set of PNGs: one study whose frontal cannot be told for infer, one study an image for calibration and
    benchmark sets."""
    for i in range(3):
        Image.fromarray(_grey8(i)).save(tmp_path / f"{i}.png")
    assert split_studies(tmp_path) == [tmp_path]
    assert split_studies(tmp_path, images_apart=True) == [tmp_path / f"{i}.png" for i in range(3)]


def test_an_animated_or_enormous_png_is_refused(tmp_path: Path) -> None:
    frames = [Image.fromarray(_grey8()), Image.fromarray(255 - _grey8())]
    frames[0].save(tmp_path / "anim.png", save_all=True, append_images=frames[1:])
    _refused(tmp_path / "anim.png", "2 frames \\(an animation\\)")  # its first frame was read
    Image.new("1", (7200, 7200)).save(tmp_path / "huge.png")  # a few kB on disk
    _refused(tmp_path / "huge.png", "7200 x 7200 pixels is implausibly large")


def test_png_16bit_is_scaled_and_equalized(tmp_path: Path) -> None:
    raw = synthetic_chest()
    Image.fromarray(raw).save(tmp_path / "cxr16.png")
    assert Image.open(tmp_path / "cxr16.png").mode.startswith("I")
    chosen = load_study(tmp_path / "cxr16.png")
    assert chosen.pixels_u8.dtype == np.uint8
    np.testing.assert_array_equal(chosen.pixels_u8, equalize_histogram(min_max_to_uint8(raw)))


def _png16(path: Path, samples: np.ndarray, colour_type: int) -> Path:
    """A 16-bit PNG written by hand (PIL writes none in colour): ``samples`` (H, W, channels) uint16."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    height, width = samples.shape[:2]
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in samples)  # filter 0 on each row
    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))
    return path


def test_a_16bit_colour_png_is_refused_not_read_at_its_high_byte(tmp_path: Path) -> None:
    """PIL opens a 16-bit RGB (or grey+alpha) PNG as 8-bit, keeping each sample's high byte: 12-bit detector data
    became a 0..15 image, calibrated on and reported from without a word."""
    raw = synthetic_chest().astype(np.uint16)  # 12-bit values
    grey = _png16(tmp_path / "grey16.png", raw[..., None], 0)
    assert load_study(grey).pixels_u8.max() == 255  # the greyscale one is read at full depth
    rgb = _png16(tmp_path / "rgb48.png", np.stack([raw] * 3, axis=-1), 2)
    assert Image.open(rgb).mode == "RGB"  # PIL's reading, which lost the low byte
    _refused(rgb, "rgb48.png: a 16-bit RGB PNG, which radtrt cannot read at full depth; save it as 16-bit greyscale")
    alpha = _png16(tmp_path / "la32.png", np.stack([raw, np.full_like(raw, 65535)], axis=-1), 4)
    _refused(alpha, "a 16-bit grey with alpha PNG")


def test_rgb_png_and_jpeg_become_grey(tmp_path: Path) -> None:
    rgb = np.stack([_grey8(), _grey8(1), _grey8(2)], axis=-1)
    Image.fromarray(rgb).save(tmp_path / "colour.png")
    expected = np.asarray(Image.fromarray(rgb).convert("L"))
    np.testing.assert_array_equal(load_study(tmp_path / "colour.png").pixels_u8, expected)
    Image.fromarray(_grey8()).save(tmp_path / "cxr.jpg", quality=95)
    jpeg = load_study(tmp_path / "cxr.jpg")
    assert jpeg.pixels_u8.shape == (256, 200)
    assert np.abs(jpeg.pixels_u8.astype(int) - _grey8().astype(int)).mean() < 3


def test_file_type_is_decided_by_content_not_extension(tmp_path: Path) -> None:
    Image.fromarray(_grey8()).save(tmp_path / "image.dcm", format="PNG")
    assert load_study(tmp_path / "image.dcm").dataset is None


def _nested_sequences(source: Path, target: Path, depth: int) -> Path:
    """``source`` with ``depth`` sequences nested one in another before its PatientName (explicit VR little endian,
    undefined lengths): a few KB."""
    import struct

    raw = source.read_bytes()
    at = raw.find(b"\x10\x00\x10\x00PN")
    opening = struct.pack("<HH", 0x0009, 0x1001) + b"SQ\0\0\xff\xff\xff\xff" + struct.pack("<HHI", 0xFFFE, 0xE000,
                                                                                         0xFFFFFFFF)
    closing = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    target.write_bytes(raw[:at] + opening * depth + closing * depth + raw[at:])
    return target


def test_sequences_nested_too_deeply_are_a_corrupt_header_not_a_crash(tmp_path: Path) -> None:
    """300 nested sequences (5 KB) ended the whole run with a RecursionError traceback, a folder of studies with it."""
    frontal = write_radiograph(tmp_path / "study" / "pa.dcm", view_position="PA")
    assert load_study(_nested_sequences(frontal, tmp_path / "ten.dcm", 10)).source_file.name == "ten.dcm"
    deep = _nested_sequences(frontal, tmp_path / "study" / "zz.dcm", 300)
    with pytest.raises(RadtrtError, match="zz.dcm: DICOM header is corrupt \\(sequences nested too deeply to read\\)"):
        load_study(deep)
    image = load_study(tmp_path / "study")  # a stray one in a study folder: skipped aloud, the study still read
    assert image.source_file.name == "pa.dcm" and [name for name, _ in image.skipped] == ["zz.dcm"]


def test_truncated_png_is_refused(tmp_path: Path) -> None:
    Image.fromarray(_grey8()).save(tmp_path / "cxr.png")
    data = (tmp_path / "cxr.png").read_bytes()
    (tmp_path / "cxr.png").write_bytes(data[: len(data) // 2])
    _refused(tmp_path / "cxr.png", "truncated or corrupt")


def test_folder_with_one_png_uses_it_but_two_are_ambiguous(tmp_path: Path) -> None:
    Image.fromarray(_grey8()).save(tmp_path / "a.png")
    assert load_study(tmp_path).source_file == tmp_path / "a.png"
    Image.fromarray(_grey8(1)).save(tmp_path / "b.png")
    _refused(tmp_path, "unknown view")


def test_one_study_folder_is_told_from_a_folder_of_studies(tmp_path: Path) -> None:
    """bench --studies STUDY_FOLDER measured the lateral as a study of its own."""
    from radtrt.benchmarks.assets import study_entries

    one = tmp_path / "one"
    one.mkdir()
    _dx(one, "frontal.dcm", "PA", seed=1, study_uid="1.2.3.4")
    _dx(one, "lateral.dcm", "LL", seed=2, study_uid="1.2.3.4")
    many = tmp_path / "many"
    many.mkdir()
    _dx(many, "a.dcm", "PA", seed=1, study_uid="1.2.3.6")
    _dx(many, "b.dcm", "PA", seed=2, study_uid="1.2.3.7")
    assert [e.study for e in study_entries(one, None, tmp_path, 1)] == [one]
    assert [e.study.name for e in study_entries(many, None, tmp_path, 1)] == ["a.dcm", "b.dcm"]
    (one / "notes.txt").write_text("x")  # a notes file was a study of its own (and failed the run)
    _dx(one / "sub", "more.dcm", "AP", seed=3, study_uid="1.2.3.4")  # series in subfolders: still one study
    assert [e.study for e in study_entries(one, None, tmp_path, 1)] == [one]


def test_unreadable_files_and_folders_are_skipped_aloud(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unreadable PA vanished from the folder as "not an image", and the AP was reported on without a word."""
    study = tmp_path / "study"
    write_radiograph(study / "a_pa.dcm", view_position="PA", study_uid="1.2.3.4")
    write_radiograph(study / "b_ap.dcm", view_position="AP", study_uid="1.2.3.4")
    write_radiograph(study / "sub" / "c_pa.dcm", view_position="PA", study_uid="1.2.3.4")
    real_open, real_scandir = Path.open, os.scandir

    def refusing_open(self: Path, *args: object, **kwargs: object):  # noqa: ANN202
        if self.name == "a_pa.dcm":
            raise PermissionError(13, "Permission denied")
        return real_open(self, *args, **kwargs)

    def refusing_scandir(path: object = "."):  # noqa: ANN202
        if Path(os.fspath(path)).name == "sub":
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(Path, "open", refusing_open)
    monkeypatch.setattr(os, "scandir", refusing_scandir)
    image = load_study(study)
    assert image.source_file.name == "b_ap.dcm"
    assert sorted(reason for _, reason in image.skipped) == ["a_pa.dcm: cannot read file (Permission denied)",
                                                             "sub: cannot read folder (Permission denied)"]
    assert any("2 file(s) not used" in w for w in study_warnings(study, image))
    with pytest.raises(RadtrtError, match="a_pa.dcm: cannot read file \\(Permission denied\\)"):
        load_study(study / "a_pa.dcm")


def test_control_characters_in_names_never_split_the_one_line(tmp_path: Path) -> None:
    """'weird/a<newline>radtrt: done, all studies OK.dcm' printed a second line that posed as radtrt's, and an
    escape sequence in a name reached the terminal. The JSON record keeps the name as it is (JSON escapes it),
    so its error still starts with its study."""
    import json

    from typer.testing import CliRunner

    from radtrt.cli import app

    bad = tmp_path / "a\nradtrt: done\x1b[2J.dcm"
    bad.write_bytes(b"not an image")
    good = write_radiograph(tmp_path / "good.dcm")
    result = CliRunner().invoke(app, ["infer", str(bad), str(good), "--json", "--max-new-tokens", "1"])
    assert result.exit_code == 2
    errors = [line for line in result.stderr.splitlines() if "not a DICOM file" in line]
    assert len(errors) == 1 and "\x1b" not in result.stderr
    assert errors[0].startswith(f"radtrt: error: {tmp_path}/a\\nradtrt: done\\x1b[2J.dcm: not a DICOM file")
    record = json.loads(result.stdout.splitlines()[0])
    assert record["study"] == str(bad) and record["error"].startswith(f"{bad}: not a DICOM file")


def test_a_thumbnail_is_read_but_said_to_be_one(tmp_path: Path) -> None:
    """A 2 x 2 DICOM or a 16 x 16 test image got a confident report (and an SR) without a word."""
    tiny = write_radiograph(tmp_path / "tiny.dcm", synthetic_chest(rows=8, cols=6))
    image = load_study(tiny)
    assert study_warnings(tiny, image) == [f"{tiny}: the image is only 6 x 8 pixels (a chest radiograph has "
                                           "thousands a side); this report is unreliable"]
    normal = write_radiograph(tmp_path / "normal.dcm")
    assert study_warnings(normal, load_study(normal)) == []


def test_a_strip_beside_a_png_radiograph_is_skipped_not_a_second_candidate(tmp_path: Path) -> None:
    """Raster files joined a folder's candidates unscreened: a strip beside the radiograph made the folder
    '2 images with unknown view', where a DICOM strip is skipped with its reason."""
    folder = tmp_path / "study"
    folder.mkdir()
    Image.fromarray(_grey8()).save(folder / "good.png")
    Image.fromarray(np.tile(np.arange(257, dtype=np.uint8), (64, 1))).save(folder / "strip.png")
    selected = load_study(folder)
    assert selected.source_file.name == "good.png"
    assert [(name, "not a chest radiograph" in why) for name, why in selected.skipped] == [("strip.png", True)]


@pytest.mark.parametrize("size", [(10000, 9500), (13000, 13000)])  # between PIL's warning and error limits
def test_an_image_pil_warns_about_gives_radtrt_refusal_alone(tmp_path: Path, size: tuple[int, int]) -> None:
    """PIL's DecompressionBombWarning printed two lines on stderr (its file:line and ``warnings.warn(``) before
    radtrt's own one, in a folder's pre-scan too."""
    assert MAX_PIXELS < Image.MAX_IMAGE_PIXELS  # what makes radtrt's refusal cover every image PIL warns about
    Image.new("1", size).save(tmp_path / "big.png")  # a few kB on disk
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RadtrtError, match=f"big.png: {size[0]} x {size[1]} pixels is implausibly large"):
            check_raster_header(tmp_path / "big.png")
        _refused(tmp_path / "big.png", f"{size[0]} x {size[1]} pixels is implausibly large")
    assert [str(w.message) for w in caught] == []


def test_a_study_folder_that_cannot_be_searched_is_said_as_itself(tmp_path: Path) -> None:
    """Given with a parent part ('dir/noaccess'), an unsearchable study folder became 'dir/noaccess/noaccess' (Path.exists
    raised inside it) and stopped the whole run; a manifest row's folder, named by its line, still showed its own name
    (a patient's ID, say); and bench named a manifest.jsonl that is not there. Run with real permissions: as root,
    under setpriv without the capabilities that override them."""
    import subprocess
    import sys

    prefix: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: folder permissions cannot be enforced")
        caps = "-dac_override,-dac_read_search"
        prefix = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"]
    write_radiograph(tmp_path / "studies" / "noaccess" / "x.dcm")
    write_radiograph(tmp_path / "pat" / "ID-SECRET-123" / "x.dcm")
    script = """
from pathlib import Path
from radtrt.errors import RadtrtError
from radtrt.imaging.study import load_study
from radtrt.benchmarks.report_files import check_outside_studies
for study, shown in ((Path("studies/noaccess"), None), (Path("pat/ID-SECRET-123"), "m.jsonl:1 (its image)")):
    try:
        load_study(study, shown_as=shown)
    except RadtrtError as e:
        print(e)
check_outside_studies(Path("studies/noaccess"), [("-o", Path("r.md"))])
print("outside")
"""
    locked = [tmp_path / "studies" / "noaccess", tmp_path / "pat" / "ID-SECRET-123"]
    for folder in locked:
        folder.chmod(0)
    try:
        done = subprocess.run([*prefix, sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                              timeout=120)
    finally:
        for folder in locked:
            folder.chmod(0o755)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["studies/noaccess: cannot read folder (Permission denied)",
                                        "m.jsonl:1 (its image): cannot read folder (Permission denied)", "outside"]
