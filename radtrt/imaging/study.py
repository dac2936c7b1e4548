"""A study on disk -> the one frontal image the model will report on.

A study is either a single file (DICOM, PNG or JPEG, recognised by content) or a folder searched
recursively (links to folders followed, each folder once). Rules:

* Single file: the user chose it, so it is used whatever its view (the view is still reported, and
  ``study_warnings`` says when it is not frontal).
* Folder: hidden files and folders (name starting with ".") and DICOMDIR index files are
  ignored, as are files that are neither DICOM (preamble + "DICM") nor PNG/JPEG by signature.
  DICOM headers are screened first (no pixel decoding); objects without an image (an SR) are ignored,
  and images refused by the screening (wrong modality, multi-frame, unreadable, empty) are skipped and
  listed in ``SelectedImage.skipped`` with the reason. Among the rest the first PA, else the first AP, is
  chosen, "first" meaning sorted by path so the choice is deterministic. Laterals and other
  views are never chosen. When every usable image has an unknown view (e.g. PNGs), a single such
  image is taken; several are ambiguous and refused. Only the chosen file is decoded, and a
  failure decoding it fails the study (no silent fallback to another image).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from radtrt.errors import RadtrtError, fail
from radtrt.imaging.dicom import (HEADER_DEFER, check_pixel_data_complete, holds_no_image, load_dicom_image, read_dicom,
                                  read_header)
from radtrt.imaging.pixels import check_aspect
from radtrt.imaging.raster import check_raster_header, load_raster, sniff_raster
from radtrt.imaging.views import FRONTAL_VIEWS, UNKNOWN_VIEW, is_frontal, view_of
from radtrt.outputs import broken_link

_DICOM_MAGIC_OFFSET = 128
MIN_SIDE = 64  # below this, a thumbnail or a test pattern, not a radiograph: said, not refused


@dataclass(frozen=True)
class SelectedImage:
    """The image chosen for a study, as 8-bit grey, and where it came from.

    ``dataset`` is the source DICOM header (None for PNG/JPEG), kept for the SR writer; it and
    the pixels are excluded from ``repr`` so that logging this object never shows patient data.
    ``skipped`` lists ``(file name, reason)`` for files of a folder that could not be used.
    """

    pixels_u8: np.ndarray = field(repr=False, compare=False)
    source_file: Path
    view_position: str
    modality: str | None
    dataset: Dataset | None = field(default=None, repr=False, compare=False)
    view_source: str = "none"
    skipped: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class _Candidate:
    path: Path
    kind: str  # "DICOM" or "RASTER"
    view: str
    study_uid: str = ""  # StudyInstanceUID; "" for PNG/JPEG or a DICOM header without one


@dataclass(frozen=True)
class _Refused:
    """A file of a folder that cannot be used, and why. ``image`` is False for a DICOM object that holds no image
    (an SR, radtrt's own among them; a key object): never a study of its own. ``study_uid``: its study, where its
    header could be read (a CT of another study is one more study, not a file of this one)."""

    path: Path
    reason: str
    study_uid: str = ""
    image: bool = True


def _sniff(path: Path) -> str | None:
    """Classify a file by its leading bytes: "DICOM", "RASTER" or None (also for anything not a regular
    file: opening a FIFO or a device would block or read forever). A file that cannot be read is an error,
    not "no image": in a folder it would vanish without a word, and another image be chosen in its place."""
    if not path.is_file():
        return None
    try:
        with path.open("rb") as handle:
            head = handle.read(_DICOM_MAGIC_OFFSET + 4)
    except OSError as exc:
        fail(f"{path.name}: cannot read file ({exc.strerror or type(exc).__name__})")
    if head[_DICOM_MAGIC_OFFSET:] == b"DICM":
        return "DICOM"
    if sniff_raster(head):
        return "RASTER"
    return None


def _load(path: Path, kind: str, *, allow_any_modality: bool,
          skipped: tuple[tuple[str, str], ...] = ()) -> SelectedImage:
    if kind == "RASTER":
        selected = SelectedImage(load_raster(path), path, UNKNOWN_VIEW, None, None, "none", skipped)
    else:
        image = load_dicom_image(path, allow_any_modality=allow_any_modality)
        selected = SelectedImage(image.pixels_u8, path, image.view_position, image.modality,
                                 image.dataset, image.view_source, skipped)
    rows, cols = selected.pixels_u8.shape[:2]
    check_aspect(path.name, cols, rows)  # the decoded image: what the model would be given
    return selected


def _empty(path: Path) -> str:
    return f"{path.name}: an empty file (0 bytes: a copy cut short?)"


def _walk(folder: Path) -> tuple[list[Path], list[_Refused]]:
    """The folder's files, and the subfolders that could not be listed: skipped, but said."""
    files: list[Path] = []
    unreadable: list[_Refused] = []

    def note(error: OSError) -> None:
        path = Path(error.filename or folder)
        unreadable.append(_Refused(path, f"{path.name}: cannot read folder ({error.strerror or type(error).__name__})"))

    seen: set[tuple[int, int]] = set()  # folders by device and inode: a link back up is walked once, not forever

    def first_visit(path: Path) -> bool:
        try:
            st = path.stat()
        except OSError:  # a dangling link: os.walk reports what it cannot list
            return True
        key = (st.st_dev, st.st_ino)
        if key in seen:
            return False
        seen.add(key)
        return True

    first_visit(folder)
    # links to folders are followed, as links to files are: a PACS export's series are often links
    for root, dirs, names in os.walk(folder, onerror=note, followlinks=True):
        # a folder reached both directly and through links is walked under its own name, whatever the listing order
        dirs[:] = [d for d in sorted(dirs, key=lambda d: ((Path(root) / d).is_symlink(), d))
                   if not d.startswith(".") and first_visit(Path(root) / d)]
        for file_name in names:
            if file_name.startswith(".") or file_name.upper() == "DICOMDIR":
                continue
            files.append(Path(root) / file_name)
    return sorted(files), unreadable


def study_files(folder: Path) -> list[Path]:
    """The files reading ``folder`` as a study looks at, sorted (links followed; hidden files and DICOMDIR left
    out): what a digest of a study folder must cover."""
    files, unreadable = _walk(folder)
    if unreadable:
        fail(unreadable[0].reason)
    return [f for f in files if f.is_file()]  # not a dangling link (said when read) or a FIFO (never opened)


def _describe(candidates: list[_Candidate]) -> str:
    counts = Counter(c.view for c in candidates)
    return ", ".join(f"{view} x{n}" for view, n in sorted(counts.items()))


def _summarise_skipped(reasons: list[str], limit: int = 5) -> str:
    shown = "; ".join(reasons[:limit])
    more = f"; and {len(reasons) - limit} more" if len(reasons) > limit else ""
    return shown + more


def _choose(candidates: list[_Candidate], folder_name: str, skipped: list[_Refused]) -> _Candidate:
    """The frontal image; a refusal names the files that were not used, since the frontal may be among them (a
    PA refused for its modality, say, whose remedy would otherwise go unsaid)."""
    unused = f"; not used: {_summarise_skipped([r.reason for r in skipped])}" if skipped else ""
    for view in FRONTAL_VIEWS:
        for candidate in candidates:
            if candidate.view == view:
                return candidate
    if all(c.view == UNKNOWN_VIEW for c in candidates):
        if len(candidates) == 1:
            return candidates[0]
        fail(f"{folder_name}: {len(candidates)} images with unknown view; cannot tell which is "
             f"frontal (name the frontal image's file itself: on the command line, or as a JSONL manifest row's "
             f"'image' for training, calibration and benchmarks){unused}")
    fail(f"{folder_name}: no frontal (PA/AP) image; views found: {_describe(candidates)}{unused}")


def _scan(folder: Path, *, allow_any_modality: bool) -> tuple[list[_Candidate], list[_Refused]]:
    """The folder's usable images (headers only, no pixels decoded) and the files it cannot use."""
    candidates: list[_Candidate] = []
    files, skipped = _walk(folder)
    for path in files:
        if broken_link(path):  # it vanished from the scan without a word (a study's frontal, say)
            skipped.append(_Refused(path, f"{path.name}: {broken_link(path)}"))
            continue
        try:
            kind = _sniff(path)
        except RadtrtError as exc:
            skipped.append(_Refused(path, str(exc)))
            continue
        if kind is None:
            if path.is_file() and path.stat().st_size == 0:  # a transfer cut short: the study's PA, perhaps, or
                # a study's only image: counted as an image, so that its study fails aloud instead of vanishing
                skipped.append(_Refused(path, _empty(path)))
            continue
        if kind == "RASTER":
            try:  # as a DICOM's header is: a strip beside the PNG radiograph made the folder "2 images, unknown view"
                check_raster_header(path)
            except RadtrtError as exc:
                skipped.append(_Refused(path, str(exc)))
                continue
            candidates.append(_Candidate(path, kind, UNKNOWN_VIEW))
            continue
        try:
            header = read_header(path, allow_any_modality=allow_any_modality)
        except RadtrtError as exc:  # recorded, reported to the caller, never silent
            skipped.append(_refused_dicom(path, exc))
            continue
        candidates.append(_Candidate(path, kind, view_of(header)[0], str(header.get("StudyInstanceUID", "") or "")))
    return candidates, skipped


def _refused_dicom(path: Path, error: RadtrtError) -> _Refused:
    try:
        ds = read_dicom(path, defer_size=HEADER_DEFER)
    except RadtrtError:  # no header to read a study from
        return _Refused(path, str(error))
    image = "PixelData" in ds or not holds_no_image(ds)  # a SEG or RT Dose holds pixels, whatever its class is named
    return _Refused(path, str(error), str(ds.get("StudyInstanceUID", "") or ""), image=image)


def _study_count(candidates: list[_Candidate]) -> int:
    return len({c.study_uid for c in candidates} - {""})


def _mixed(folder: Path, candidates: list[_Candidate]) -> str:
    return (f"{folder.name}: holds the images of {_study_count(candidates)} studies (StudyInstanceUID); give each "
            f"study's folder or file")


def split_studies(folder: Path, *, allow_any_modality: bool = False, images_apart: bool = False) -> list[Path]:
    """The studies a folder given as "a study, or a folder of studies" holds: ``[folder]`` when its images are of
    one study (a PACS study's series in subfolders too), else its entries, each a study (a file, or a study's
    folder). One rule for every command that takes studies (``infer``, ``bench --studies``, calibration data).

    ``images_apart``: a folder of several images without study UIDs (PNG/JPEG) is a set of studies, one an entry
    (calibration and benchmark sets), not one study whose frontal cannot be told (``infer``).

    Refused here, before any model loads: images of one study in two entries or of two studies in one entry
    (which go together cannot be told safely), and a non-frontal DICOM found as an entry by itself (only a file
    the user names is read whatever its view). An entry whose every file was refused stays a study: reading it
    says why, instead of the study vanishing from the run."""
    candidates, skipped = _scan(folder, allow_any_modality=allow_any_modality)
    images = [r for r in skipped if r.image and r.path != folder]  # refused images: their studies still count
    uids = ({c.study_uid for c in candidates} | {r.study_uid for r in images}) - {""}
    entries: dict[Path, list[_Candidate]] = {}
    for candidate in candidates:
        entries.setdefault(folder / candidate.path.relative_to(folder).parts[0], []).append(candidate)
    refused_uids: dict[Path, set[str]] = {}
    for refused in images:  # an entry whose files were all refused stays a study: reading it says why
        entry = folder / refused.path.relative_to(folder).parts[0]
        entries.setdefault(entry, [])
        refused_uids.setdefault(entry, set()).add(refused.study_uid)
    rasters = any(c.kind == "RASTER" for c in candidates)
    if len(uids) <= 1 and not (images_apart and rasters and len(entries) > 1):
        return [folder]
    shown = folder.name or str(folder)  # '.' has no name
    of_entry = {entry: ({c.study_uid for c in found} | refused_uids.get(entry, set())) - {""}
                for entry, found in entries.items()}
    owner: dict[str, Path] = {}
    for entry, entry_uids in sorted(of_entry.items()):
        if len(entry_uids) > 1:
            fail(f"{shown}: {entry.name} holds the images of {len(entry_uids)} studies (StudyInstanceUID); "
                 f"give each study's folder or file")
        for uid in entry_uids & set(owner):
            # what made the folder a set of studies: without it these two would be read as the one study they are
            others = [e for e, u in sorted(of_entry.items()) if u - {uid}]
            rasters_at = [c.path for c in candidates if c.kind == "RASTER"]
            causes = others or rasters_at
            why = (f"{others[0].name} holds another study's images" if others else
                   f"{rasters_at[0].name if rasters_at else 'a PNG/JPEG'} (no study UID) makes it a set of studies, "
                   f"one an entry")
            # moving the cause out helps only when it is the one thing that made the folder a set
            move = f"move {causes[0].name} out, or " if len(causes) == 1 else ""
            fail(f"{shown}: {owner[uid].name} and {entry.name} hold images of one study (StudyInstanceUID), and "
                 f"{why}: {move}put each study's images in a folder of its own (one a copy of the other? remove it)")
        owner.update(dict.fromkeys(entry_uids, entry))
    for entry, found in sorted(entries.items()):
        view = found[0].view if len(found) == 1 and found[0].path == entry else UNKNOWN_VIEW
        if view != UNKNOWN_VIEW and not is_frontal(view):
            fail(f"{shown}: {entry.name} is a {view} view, not frontal (PA/AP), among the studies of the folder; "
                 f"LLaVA-Rad reads frontal radiographs: move it out (radtrt infer reads a file named by itself whatever "
                 f"its view)")
    return sorted(entries)


def _pick_from_folder(folder: Path, *, allow_any_modality: bool) -> tuple[_Candidate, list[_Refused]]:
    """The image a folder's study will be read from, and the files not used: headers only, no pixels decoded."""
    candidates, skipped = _scan(folder, allow_any_modality=allow_any_modality)
    unlisted = next((r for r in skipped if r.path == folder), None)
    if unlisted is not None:  # the study folder itself: said so, not as "no usable image in folder: NAME: cannot read
        fail(unlisted.reason)  # folder", whose second NAME (a patient's ID, say) a manifest row's line did not replace
    if _study_count(candidates) > 1:  # two patients' images, say: a report of one would be filed under the other
        fail(_mixed(folder, candidates))
    if not candidates:
        why = f": {_summarise_skipped([r.reason for r in skipped])}" if skipped else " (no DICOM, PNG or JPEG files)"
        fail(f"{folder.name}: no usable image in folder{why}")
    chosen = _choose(candidates, folder.name, skipped)
    if chosen.kind == "DICOM":  # a PNG/JPEG beside the study's DICOM images (a preview) was dropped without a word
        skipped += [_Refused(c.path, f"{c.path.name}: a PNG/JPEG image beside the study's DICOM images")
                    for c in candidates if c.kind == "RASTER"]
    # objects without an image (an SR, radtrt's own --sr-out among them) are ignored once a study is read, not
    # warned about at every run; they still explain a refusal above, where the folder had nothing else
    return chosen, [r for r in skipped if r.image]


def study_warnings(study: Path, image: SelectedImage) -> list[str]:
    """What the user must hear about a study that was read: files of its folder that were not used, a chosen
    image that is not frontal (only a file given by itself can be), and an image far too small to be a chest
    radiograph (a thumbnail, a test pattern): in the last two the report is unreliable."""
    name = str(study)  # as given, as errors name it: two studies' "frontal.dcm" are told apart
    out = []
    if image.skipped:
        reasons = [reason for _, reason in image.skipped]
        out.append(f"{name}: {len(reasons)} file(s) not used: {_summarise_skipped(reasons)}")
    if image.view_position != UNKNOWN_VIEW and not is_frontal(image.view_position):
        out.append(f"{name}: the image is a {image.view_position} view, not frontal (PA/AP); LLaVA-Rad reads "
                   "frontal radiographs, so this report is unreliable")
    rows, cols = image.pixels_u8.shape[:2]
    if min(rows, cols) < MIN_SIDE:
        out.append(f"{name}: the image is only {cols} x {rows} pixels (a chest radiograph has thousands a side); "
                   f"this report is unreliable")
    return out


def study_error(study: Path, error: Exception) -> str:
    """An error line that names the study as given, not only the file inside it that failed (a manifest's
    relative image path, two studies' "frontal.dcm")."""
    message, name = str(error), Path(study).name
    if message.startswith(f"{study}:"):  # named already
        return message
    # the study's own name (a file given by itself, or a folder's own refusal) becomes the path as given; a folder
    # that holds a file of its own name (frontal.dcm/frontal.dcm) leads with that file's name, which is kept
    # os.path.exists: Path.exists raises PermissionError inside a folder that cannot be searched (the study
    # "dir/noaccess" became "dir/noaccess/noaccess" and stopped the whole run)
    if message.startswith(f"{name}:") and not os.path.exists(Path(study) / name):
        return f"{study}{message[len(name):]}"
    return f"{study}: {message}"


def _named(path: Path, error: RadtrtError, shown_as: str | None) -> str:
    """``study_error``'s line, with the study's path as given replaced by ``shown_as`` where there is one."""
    message = study_error(path, error)  # begins with the path as given
    return message if shown_as is None else shown_as + message[len(str(path)):]


def load_study(path: Path, *, allow_any_modality: bool = False, shown_as: str | None = None) -> SelectedImage:
    """Load a study (file or folder) and return its chosen image as equalized 8-bit grey; errors name the
    study as given (every caller's, be it infer, calibration or a benchmark), or as ``shown_as`` (a server's
    temporary file means nothing to its client; a training manifest's row is named by its line, as a path may
    carry a patient's name)."""
    try:
        return _load_study(Path(path), allow_any_modality)
    except RadtrtError as e:
        fail(_named(Path(path), e, shown_as))


def screen_study(path: Path, *, allow_any_modality: bool = False, shown_as: str | None = None) -> None:
    """Refuse, from headers alone (no pixels decoded, a fraction of a second a study), what ``load_study`` would
    refuse that way: a set of studies is checked before a model loads and minutes of work are spent on it,
    instead of failing at its tenth study (a CT, a lateral-only folder, a missing file). Decoding can still fail
    later (damaged pixel data): that is said when the study is read."""
    try:
        file, kind, _ = _study_source(Path(path), allow_any_modality)
        if kind == "DICOM":  # a folder's images were screened as it was scanned; its chosen one is read again for
            # the length of its pixel data
            header = read_header(file, allow_any_modality=allow_any_modality) if file == Path(path) else \
                read_dicom(file, defer_size=HEADER_DEFER)
            check_pixel_data_complete(header, file)
        if kind == "RASTER":  # its signature only so far: a PNG signature before garbage passed
            check_raster_header(file)
    except RadtrtError as e:
        fail(_named(Path(path), e, shown_as))


def _study_source(path: Path, allow_any_modality: bool) -> tuple[Path, str, tuple[tuple[str, str], ...]]:
    """(the file the study will be read from, its kind, the files of its folder not used): headers only."""
    if not path.exists():
        fail(f"{path.name or path}: {broken_link(path) or 'no such file or folder'}")
    if path.is_dir():
        chosen, skipped = _pick_from_folder(path, allow_any_modality=allow_any_modality)
        return chosen.path, chosen.kind, tuple((r.path.name, r.reason) for r in skipped)
    if not path.is_file():
        fail(f"{path.name}: not a regular file or folder (a pipe, socket or device cannot be a study)")
    if path.stat().st_size == 0:  # not "no DICOM preamble", which sent the user looking at its name
        fail(_empty(path))
    return path, _sniff(path) or "DICOM", ()  # unknown content: let the DICOM reader say why it is refused


def _load_study(path: Path, allow_any_modality: bool) -> SelectedImage:
    file, kind, skipped = _study_source(path, allow_any_modality)
    return _load(file, kind, allow_any_modality=allow_any_modality, skipped=skipped)
