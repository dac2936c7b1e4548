"""Read one DICOM radiograph and bring it to the 8-bit distribution LLaVA-Rad was trained on.

LLaVA-Rad learned from MIMIC-CXR-JPG (arXiv 1901.07042), whose JPEGs were made from the DICOMs
by scaling to 8 bit with bright = dense and then equalizing the histogram. A DICOM fed to the
model must go through the same steps, each one a documented, tested function here:

(a) Modality LUT: ``ModalityLUTSequence`` or ``RescaleSlope``/``RescaleIntercept``
    (``pydicom.pixels.apply_modality_lut``), so stored values become the modality's values. A
    linear rescale alone would vanish in (d), but windows and VOI LUTs are expressed in these
    units, and a Modality LUT Sequence may be non-linear.
(b) VOI: the first ``VOILUTSequence`` item, else the first ``WindowCenter``/``WindowWidth`` pair
    (``pydicom.pixels.apply_voi_lut``, LUT preferred over window as the standard says). This is
    the contrast the acquiring site chose for display. Without either, nothing is applied here
    and step (d) scales over the image's own min..max.
(c) MONOCHROME1 (high value = black) is mirrored so that bright = dense for every image. It is
    done after VOI, as in the DICOM display pipeline, and inside step (d)'s range so that a
    MONOCHROME1 file and its MONOCHROME2 twin give bit-identical output.
    ``PresentationLUTShape`` is not read: for CR/DX it must agree with the photometric value.
(d) Linear min..max of the result onto 0..255 (rounding half to even). After (b) the min/max are
    the window's clipping levels when the window saturates, so this is the window's own scaling.
    Pixels declared padding (``PixelPaddingValue``/``PixelPaddingRangeLimit``: outside the detector) take the
    image's darkest value first, so an out-of-range padding value cannot stretch the range.
(e) Histogram equalization with PIL's integer algorithm (``pixels.equalize_histogram``):
    deterministic and checked bit-for-bit against ``PIL.ImageOps.equalize``.

Decisions, each refused with :func:`radtrt.errors.fail` and a one-line message naming only the
file (never patient data):

* Modalities: CR, DX, DR (a common non-standard label for DX) and RG (film/screen radiography)
  are chest-radiograph modalities. Everything else (MG, CT, OT secondary captures, ...) is
  refused unless ``allow_any_modality=True``; OT is refused by default because it can hold any
  picture at all.
* Non-image objects (SR, RT Plan, presentation states: no Pixel Data) are refused naming their
  SOP class; float pixel data too.
* Native (uncompressed) pixel data must be exactly as long as Rows x Columns x SamplesPerPixel x
  BitsAllocated x frames says (one pad byte allowed): a truncated file or edited geometry would
  otherwise decode to a silently wrong picture. Decoded compressed frames must have the
  declared shape.
* Compressed transfer syntaxes are decoded by pydicom's plugins (pylibjpeg-libjpeg: JPEG
  baseline/extended/lossless and JPEG-LS; pylibjpeg-openjpeg: JPEG 2000; RLE built in). A missing
  decoder is reported with the packages pydicom says it needs.
* Multi-frame images (NumberOfFrames > 1) are refused: a chest radiograph is a single frame, and
  picking "the first" of a tomosynthesis or cine series would report on an arbitrary slice.
* Colour (RGB/YBR, i.e. secondary captures of a film or screen) is converted to grey with BT.601
  luma, then steps (d)-(e); modality LUT and VOI do not apply to colour. PALETTE COLOR and other
  photometric interpretations are refused.
"""

from __future__ import annotations

import json
import logging
import re
import struct
import threading
import warnings
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pydicom.config
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_decoder
from pydicom.pixels.utils import get_expected_length
from pydicom.sequence import Sequence
from pydicom.encaps import generate_frames
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, MediaStorageDirectoryStorage, RLELossless

from radtrt.errors import fail
from radtrt.imaging.bombs import check_inflated_size, codestream_size
from radtrt.imaging.pixels import MAX_PIXELS, check_aspect, equalize_histogram, min_max_to_uint8, rgb_to_grey
from radtrt.imaging.views import view_of

ACCEPTED_MODALITIES: tuple[str, ...] = ("CR", "DX", "DR", "RG")
_GREY = frozenset({"MONOCHROME1", "MONOCHROME2"})
_COLOUR = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT", "YBR_PARTIAL_420"})
_PIXEL_DATA_TAG = 0x7FE00010
_REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
TEXT_VRS = ("PN", "LO", "SH", "LT", "ST", "UT", "UC")  # the VRs decoded in the header's SpecificCharacterSet
RAW_TEXT = "radtrt_raw_text"  # the attribute of a read header that keeps those values' bytes (see read_dicom)


@dataclass(frozen=True)
class DicomImage:
    """A decoded radiograph plus the header facts the pipeline needs (no patient data).

    ``dataset`` is kept for the SR writer, which copies the patient/study modules into the
    report; it is excluded from ``repr`` so it can never leak into a log line.
    """

    pixels_u8: np.ndarray = field(repr=False, compare=False)
    source_file: Path
    modality: str | None
    view_position: str
    view_source: str
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    dataset: Dataset = field(repr=False, compare=False)


def _one_line(text: str, limit: int = 200) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _parse_all(ds: Dataset) -> None:
    """Convert every raw element now (pydicom parses lazily), leaving Pixel Data untouched.

    Corrupt values then fail here, inside the error conversion of :func:`read_dicom`, instead of
    surfacing later as an unexplained exception from some attribute access.
    """
    for tag in list(ds.keys()):
        if tag == _PIXEL_DATA_TAG:
            continue
        value = ds[tag].value
        if isinstance(value, Sequence):
            for item in value:
                _parse_all(item)


class _Silenced:
    """Who is inside :func:`quiet` now, per setting: the first to enter saves a setting and the last to leave
    restores it. Why counted, under a lock: two threads reading studies at once (a threaded host application)
    each saved the other's changed value and restored it, leaving validation off and the loggers silent."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[str, list[Any]] = {}  # setting -> [holders, saved value]

    def enter(self, names: list[str]) -> None:
        with self._lock:
            for name in ["validation", *names]:
                held = self._held.setdefault(name, [0, None])
                if held[0] == 0:
                    held[1] = self._get(name)
                    self._set(name, pydicom.config.IGNORE if name == "validation" else logging.CRITICAL + 1)
                held[0] += 1

    def leave(self, names: list[str]) -> None:
        with self._lock:
            for name in ["validation", *names]:
                held = self._held[name]
                held[0] -= 1
                if held[0] == 0:
                    self._set(name, held[1])

    @staticmethod
    def _get(name: str) -> Any:
        if name == "validation":
            return pydicom.config.settings.reading_validation_mode
        return logging.getLogger(name).level

    @staticmethod
    def _set(name: str, value: Any) -> None:
        if name == "validation":
            pydicom.config.settings.reading_validation_mode = value
        else:
            logging.getLogger(name).setLevel(value)  # the package's child loggers inherit it


_SILENCED = _Silenced()


@contextmanager
def quiet(modules: str = "pydicom") -> Iterator[None]:
    """No warnings or log records from ``modules`` (package names joined by ``|``), and no validation of the
    values pydicom reads: pydicom's and highdicom's messages quote header values ("Invalid value for VR DA:
    '1980-01-02'", a patient's name in a charset it cannot decode) on stderr, and pydicom also logs each one,
    which reaches any handler the host application set up. What matters is refused in radtrt's own lines,
    without values.

    Scoped, not set once by the CLI: the library's own callers (Triton's preprocessing, a user's script) read
    studies through here too, and a host application's settings stay its own outside. (Python's own warning
    filters are process-wide; ``catch_warnings`` is not thread-safe, which no code here can change.)"""
    names = modules.split("|")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=rf"({modules})\.")
        _SILENCED.enter(names)
        try:
            yield
        finally:
            _SILENCED.leave(names)


def read_dicom(path: Path, *, defer_size: str | None = None) -> Dataset:
    """``dcmread`` with ``force=False``: anything without the DICM preamble is not DICOM.

    ``defer_size`` lets folder scans read headers without loading pixel data.

    The header keeps, as ``ds.radtrt_raw_text`` (tag -> bytes), the undecoded bytes of its top-level text values:
    pydicom decodes them leniently (bytes its character set does not define become a Latin-1 guess or replacement
    characters) and parsing drops the bytes, which the SR writer decodes strictly before it files a document
    under the patient's name (:mod:`radtrt.imaging.sr`).
    """
    name = path.name
    try:
        with quiet():
            check_inflated_size(path, name)  # pydicom inflates a deflated data set whole, before reading a tag
            ds = dcmread(path, force=False, defer_size=defer_size)
            undecoded = {tag: raw.value for tag in ds.keys() if tag != _PIXEL_DATA_TAG
                         and isinstance(raw := ds.get_item(tag, keep_deferred=True), RawDataElement)
                         and isinstance(raw.value, bytes)}  # a deferred value (over defer_size) is None: not kept
            _parse_all(ds)
            setattr(ds, RAW_TEXT, {tag: value for tag, value in undecoded.items() if ds[tag].VR in TEXT_VRS})
            _parse_all(ds.get("file_meta", Dataset()))  # parsed lazily too: a damaged VR there failed much later
    except InvalidDicomError:
        if _holds_json(path):  # 'radtrt infer manifest.jsonl' was told only what the file is not
            fail(f"{name}: a JSON file (a manifest?), not an image: give the DICOM files, image files or study "
                 f"folders themselves (a manifest is for 'radtrt train', 'calibrate' and 'bench --studies')")
        fail(f"{name}: not a DICOM file (no DICOM preamble and 'DICM' prefix), nor a PNG or JPEG image "
             f"(radtrt recognizes files by content, not by name)")
    except (PermissionError, IsADirectoryError, FileNotFoundError) as exc:
        fail(f"{name}: cannot read file ({exc.strerror or type(exc).__name__})")
    except RecursionError:  # pydicom reads nested sequences recursively: a few KB of them ended the whole run
        fail(f"{name}: DICOM header is corrupt (sequences nested too deeply to read)")
    # BytesLengthException: a value whose length does not fit its VR; NotImplementedError: a damaged VR code;
    # zlib.error: a deflated file cut short (pydicom inflates it whole before reading)
    except (EOFError, OSError, struct.error, ValueError, NotImplementedError, KeyError, BytesLengthException,
            zlib.error):
        fail(f"{name}: DICOM header is truncated or corrupt")
    return ds


def _holds_json(path: Path) -> bool:
    """Whether the file holds JSON objects or arrays, one a line (a manifest) or as one document of up to 1 MB
    (pretty-printed), by content, as every study file is recognized."""
    try:
        with path.open("rb") as f:
            head = f.read(1 << 20)
            whole = not f.read(1)
    except OSError:
        return False
    for text in ([head] if whole else []) + [head.split(b"\n", 1)[0]]:
        try:
            if isinstance(json.loads(text), (dict, list)):
                return True
        except ValueError:  # UnicodeDecodeError included
            continue
    return False


def _uid(value: object) -> UID | None:
    """``value`` as a UID when it is one (digits and dots, at most 64 characters), else None: a damaged header
    can put anything there, a patient's name or the whole rest of the header, which a message must not quote.
    Made quietly: pydicom's validation warns with the value."""
    text = str(value)
    if len(text) > 64 or not re.fullmatch(r"[0-9]+(\.[0-9]+)*", text):
        return None
    with quiet():
        return UID(text)


def _sop_class_name(ds: Dataset) -> str:
    value = ds.get("SOPClassUID") or ds.get("file_meta", Dataset()).get("MediaStorageSOPClassUID")
    if not value:
        return "unknown SOP class"
    uid = _uid(value)
    if uid is None:
        return "a SOP class that is not a UID"
    return uid.name if uid.name and uid.name != str(uid) else f"SOP class {uid}"


def holds_no_image(ds: Dataset) -> bool:
    """Whether the object's SOP class is a standard one that is no image storage (an SR, a key object, a plan, a
    waveform, a DICOMDIR: PS3.4's names say "Image" for every image class), as opposed to an image whose pixel
    data is missing (a file cut short reads quietly, without it) or a class nobody can name (a private one)."""
    uid = _uid(ds.get("SOPClassUID") or ds.get("file_meta", Dataset()).get("MediaStorageSOPClassUID") or "")
    return uid is not None and uid.name != str(uid) and "Image" not in uid.name


def check_image_object(ds: Dataset, name: str) -> None:
    """Refuse DICOMDIRs and objects that carry no (integer) pixel data."""
    media_class = ds.get("file_meta", Dataset()).get("MediaStorageSOPClassUID")
    if media_class == MediaStorageDirectoryStorage:
        fail(f"{name}: a DICOMDIR index, not an image")
    if "PixelData" in ds:
        return
    if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        fail(f"{name}: float pixel data ({_sop_class_name(ds)}) is not a radiograph")
    if holds_no_image(ds):
        fail(f"{name}: not an image ({_sop_class_name(ds)}, no pixel data)")
    fail(f"{name}: no pixel data ({_sop_class_name(ds)}): a file cut short or damaged?")


# the values messages may show: a damaged or hand-edited header can hold a name or an ID in a code attribute,
# and an ID ("PIDX98765") looks like a code, so only the standard's own terms (PS3.3 C.7.3.1.1.1, C.7.6.3.1.2)
# are echoed
KNOWN_MODALITIES = frozenset(
    "AR ASMT AU BDUS BI BMD CD CR CT CTPROTOCOL DD DF DG DM DOC DS DX EC ECG EPS ES FA FID FS GM HC HD IO IOL IVOCT "
    "IVUS KER KO LEN LP LS MA MG MR MS NM OAM OCT OP OPM OPR OPT OPTBSV OPTENF OPV OSS OT PLAN POS PR PT PX REG RESP "
    "RF RG RTDOSE RTIMAGE RTINTENT RTPLAN RTRAD RTRECORD RTSEGANN RTSTRUCT RWV SEG SM SMR SR SRF ST STAIN TEXTUREMAP "
    "TG US VA VF XA XC".split())
KNOWN_PHOTOMETRIC = frozenset({"MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "HSV", "ARGB", "CMYK", "YBR_FULL",
                               "YBR_FULL_422", "YBR_PARTIAL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT", "XYB"})


def _shown_code(value: str, known: frozenset[str]) -> str:
    """A code attribute's value for a message, only when it is one of the standard's terms."""
    return repr(value) if value in known else "(a value that is not a DICOM defined term)"


def check_modality(ds: Dataset, name: str, *, allow_any_modality: bool) -> str | None:
    """Return the modality; refuse non-radiograph modalities unless explicitly allowed."""
    modality = str(ds.get("Modality", "") or "").strip().upper() or None
    if allow_any_modality or modality in ACCEPTED_MODALITIES:
        return modality
    accepted = ", ".join(ACCEPTED_MODALITIES)
    shown = f"modality {_shown_code(modality, KNOWN_MODALITIES)}" if modality else "missing modality"
    fail(
        f"{name}: {shown} is not a chest radiograph (accepted: {accepted}); "
        "only 'radtrt infer --allow-any-modality' reads other modalities"  # true wherever it is read (training too)
    )


def check_single_frame(ds: Dataset, name: str) -> None:
    """Refuse multi-frame objects (see the module docstring for why not 'first frame')."""
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        fail(f"{name}: invalid NumberOfFrames")
    if frames != 1:
        fail(f"{name}: multi-frame image ({frames} frames); a chest radiograph is one frame")


def _uids(ds: Dataset, name: str) -> dict[str, str]:
    found = {key: str(ds.get(key, "") or "") for key in _REQUIRED_UIDS}
    missing = [key for key, value in found.items() if not value]
    if missing:
        fail(f"{name}: missing {', '.join(missing)}")
    return found


HEADER_DEFER = "64 KB"  # header reads leave pixel data unread, beyond this size


def read_header(path: Path, *, allow_any_modality: bool = False) -> Dataset:
    """Header-only screening for folder scans: every refusal that needs no pixel decoding."""
    ds = read_dicom(path, defer_size=HEADER_DEFER)
    check_image_object(ds, path.name)
    check_modality(ds, path.name, allow_any_modality=allow_any_modality)
    check_single_frame(ds, path.name)
    _check_geometry(ds, path.name)
    _uids(ds, path.name)
    return ds


def check_pixel_data_complete(ds: Dataset, path: Path) -> None:
    """Refuse a file that ends before the pixel data its element declares (a copy cut short), from its header
    (``read_header``'s ``ds``): decoding said so, but only when the image was read, which training's DataLoader
    workers do mid-run, after checkpoints were written. An encapsulated element (undefined length) is read through
    at once, and a cut there fails the header read. Not part of ``read_header``: a folder scan would skip such a
    file, and a study whose chosen image is damaged fails, with no fallback to another one (``study``)."""
    raw = ds.get_item(_PIXEL_DATA_TAG, keep_deferred=True)
    if not isinstance(raw, RawDataElement) or raw.length == 0xFFFFFFFF:
        return
    if raw.value is None and ds.get("file_meta", Dataset()).get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        return  # its place is one in the inflated stream, not the file: decoding checks it
    # a deferred value (over read_header's defer_size) is None, its place in the file known; a read one is as long
    # as the file allowed
    available = len(raw.value or b"") if raw.value is not None else max(0, path.stat().st_size - raw.value_tell)
    if available < raw.length:
        fail(f"{path.name}: pixel data truncated ({available} of {raw.length} bytes)")


def _check_geometry(ds: Dataset, name: str) -> tuple[int, int, int]:
    """Validate the Image Pixel module; return (rows, columns, samples per pixel)."""
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        samples, bits = int(ds.SamplesPerPixel), int(ds.BitsAllocated)
        stored = int(ds.BitsStored)
        int(ds.PixelRepresentation)
        photometric = supported_photometric(ds, name)
    except (AttributeError, TypeError, ValueError):
        fail(f"{name}: incomplete image pixel description (Rows/Columns/SamplesPerPixel/BitsStored/...)")
    if rows < 1 or cols < 1 or samples not in (1, 3) or bits not in (1, 8, 16, 32):
        fail(f"{name}: invalid image geometry (Rows/Columns/SamplesPerPixel/BitsAllocated)")
    # said here, before the decoder: its error was only "cannot decode pixel data", and a greyscale header with
    # 3 samples per pixel was called a truncated file (3x the bytes expected), a colour one with 1 undecodable
    if not 1 <= stored <= bits:
        fail(f"{name}: BitsStored {stored} does not fit BitsAllocated {bits}")
    if samples != (1 if photometric in _GREY else 3):
        fail(f"{name}: {photometric} image with {samples} sample{'s' if samples > 1 else ''} per pixel (the header "
             f"contradicts itself)")
    if rows * cols > MAX_PIXELS:  # a few compressed bytes can declare gigabytes of pixels
        fail(f"{name}: {cols} x {rows} pixels is implausibly large for a radiograph (decompression bomb guard)")
    check_aspect(name, cols, rows)
    return rows, cols, samples


def rle_decoded_lengths(frame: bytes) -> list[int]:
    """How many bytes each segment of an RLE frame (PS3.5 G) decodes to, counted from its PackBits headers
    without decoding."""
    if len(frame) < 64:
        return []
    header = struct.unpack("<16L", frame[:64])
    count = header[0]
    if not 1 <= count <= 15:
        return []
    bounds = [*header[1:count + 1], len(frame)]
    lengths = []
    for start, end in zip(bounds, bounds[1:]):
        i, n = start, 0
        while i < min(end, len(frame)):
            h = frame[i]
            if h < 128:  # a literal run of h + 1 bytes
                n, i = n + h + 1, i + h + 2
            elif h > 128:  # one byte repeated 257 - h times
                n, i = n + 257 - h, i + 2
            else:  # 128: no operation
                i += 1
        lengths.append(n)
    return lengths


def _check_rle_segments(ds: Dataset, name: str, plane: int) -> None:
    """Refuse an RLE frame whose segments hold more than Rows x Columns bytes (one pad byte aside): pydicom
    only warns, and decodes the top of the image (more rows than declared) or a scramble of it (other columns)."""
    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    except (StopIteration, ValueError, struct.error):
        return  # the decoder refuses what has no frame
    if any(n > plane + 1 for n in rle_decoded_lengths(frame)):
        fail(f"{name}: RLE pixel data holds more pixels than Rows x Columns ({ds.Rows} x {ds.Columns}) declare")


def _check_codestream(ds: Dataset, name: str, ts: UID, rows: int, cols: int) -> None:
    """Refuse a compressed frame whose codestream declares another size than the header: the decoder allocates
    what the codestream declares, gigabytes for a few bytes, before its shape was found to disagree."""
    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    except (StopIteration, ValueError, struct.error):
        return  # the decoder refuses what has no frame
    size = codestream_size(frame, ts)
    if size is not None and size != (cols, rows):
        fail(f"{name}: its compressed image is {size[0]} x {size[1]} pixels, the header says {cols} x {rows} "
             f"(decompression bomb guard)")


def decode_pixels(ds: Dataset, name: str) -> np.ndarray:
    """Decode the single frame as stored (no LUTs); colour comes back as RGB."""
    rows, cols, samples = _check_geometry(ds, name)
    if ds.PhotometricInterpretation != (photometric := supported_photometric(ds, name)):
        ds.PhotometricInterpretation = photometric  # 'monochrome2': pydicom's decoders know the value upper-case only
    if "NumberOfFrames" in ds and ds.NumberOfFrames in (None, "", 0):  # empty or 0 in some exports: one frame
        del ds.NumberOfFrames  # (see check_single_frame), not a decoder warning that refuses the file
    ts_value = ds.get("file_meta", Dataset()).get("TransferSyntaxUID")
    if not ts_value:
        fail(f"{name}: no transfer syntax in the DICOM file meta information")
    ts = _uid(ts_value)
    if ts is None:
        fail(f"{name}: its transfer syntax is not a UID (a damaged file meta header); no decoder available")
    if not ts.is_transfer_syntax:
        fail(f"{name}: unknown transfer syntax {ts}; no decoder available")
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        fail(f"{name}: no decoder available for transfer syntax {ts.name}")
    if not decoder.is_available:
        needs = "; ".join(decoder.missing_dependencies) or "a decoding plugin"
        fail(f"{name}: no decoder installed for {ts.name} (needs: {_one_line(needs)})")
    try:
        data = ds.PixelData
    except (NotImplementedError, ValueError, KeyError, BytesLengthException):  # a damaged VR code on the element
        fail(f"{name}: its Pixel Data element is damaged")
    if not data:  # an empty element reads as None or b"": no frame to decode
        fail(f"{name}: its Pixel Data element is empty")
    if not ts.is_compressed:
        expected = get_expected_length(ds, "bytes")
        actual = len(ds.PixelData)
        if actual < expected:
            fail(f"{name}: pixel data truncated ({actual} of {expected} bytes)")
        if actual > expected + 1:
            fail(f"{name}: pixel data length ({actual} bytes) disagrees with "
                 f"Rows/Columns/SamplesPerPixel/BitsAllocated ({expected} bytes)")
    if ts == RLELossless:
        _check_rle_segments(ds, name, rows * cols)
    elif ts.is_compressed:
        _check_codestream(ds, name, ts, rows, cols)
    try:
        # pydicom warns, with values, about what it adjusts while decoding (a padding byte in an RLE segment, a
        # JPEG's colour space): valid images do that, so the warnings are neither shown nor a refusal
        with quiet("pydicom|pylibjpeg"):
            warnings.simplefilter("ignore")  # the decoders' own warnings too, restored when ``quiet`` ends
            arr = ds.pixel_array
    # the decoders' messages quote header values (a name where a code should be): only the kind of error is shown
    except (ValueError, RuntimeError, NotImplementedError, EOFError, OSError, AttributeError, TypeError,
            KeyError, struct.error) as exc:  # struct.error: a damaged Basic Offset Table
        fail(f"{name}: cannot decode pixel data ({ts.name}, {type(exc).__name__})")
    expected_shape = (rows, cols) if samples == 1 else (rows, cols, 3)
    if arr.shape != expected_shape:
        fail(f"{name}: decoded pixel data shape {arr.shape} disagrees with the header "
             f"{expected_shape}")
    return arr


def _integral(values: np.ndarray) -> np.ndarray:
    """VOI LUTs index by integer value; give them integers when the values are integral."""
    if np.issubdtype(values.dtype, np.floating) and np.all(values == np.round(values)):
        return values.astype(np.int64)
    return values


def padding_mask(ds: Dataset, arr: np.ndarray) -> np.ndarray | None:
    """Pixels outside the detector (``PixelPaddingValue``, up to ``PixelPaddingRangeLimit`` when given), in stored
    values; None when the header declares none or they cover the whole image."""
    value, limit = ds.get("PixelPaddingValue"), ds.get("PixelPaddingRangeLimit")
    if not isinstance(value, int) or isinstance(value, bool):
        return None
    lo, hi = (value, value) if not isinstance(limit, int) or isinstance(limit, bool) else sorted((value, limit))
    mask = (arr >= lo) & (arr <= hi)
    return mask if mask.any() and not mask.all() else None


def _padding_as_background(values: np.ndarray, mask: np.ndarray | None, *, dark_is_high: bool) -> np.ndarray:
    """Padding takes the darkest value of the image itself: an out-of-range padding value (65535 around a 12-bit
    image, say) stretched step (d)'s range and left the body a handful of grey levels."""
    if mask is None:
        return values
    body = values[~mask]
    out = np.array(values, dtype=np.float64 if not np.issubdtype(values.dtype, np.integer) else values.dtype)
    out[mask] = body.max() if dark_is_high else body.min()
    return out


def supported_photometric(ds: Dataset, name: str) -> str:
    """The image's photometric interpretation, refused here unless greyscale or a colour radtrt converts; read as
    the defined term it spells whatever its case and spaces (``decode_pixels`` gives the decoder that term)."""
    photometric = str(ds.PhotometricInterpretation).strip().upper()
    if photometric not in _GREY | _COLOUR:
        fail(f"{name}: photometric interpretation {_shown_code(photometric, KNOWN_PHOTOMETRIC)} is not supported")
    return photometric


def to_uint8(ds: Dataset, arr: np.ndarray, name: str) -> np.ndarray:
    """Steps (a)-(e) of the module docstring: stored values -> equalized 8-bit, bright = dense."""
    photometric = supported_photometric(ds, name)
    if photometric in _GREY:
        if arr.ndim != 2:
            fail(f"{name}: {photometric} image with {arr.ndim} dimensions")
        try:
            # quiet: pydicom warns about a VOI LUT on non-integral values; errstate: a huge RescaleSlope gives inf,
            # then "no contrast" below
            with quiet(), np.errstate(over="ignore", invalid="ignore"):
                values = apply_modality_lut(arr, ds)
                if ds.get("VOILUTSequence"):
                    values = _integral(values)
                values = apply_voi_lut(values, ds, index=0)
        # pydicom reads LUT data as declared by its descriptor: short data is a struct.error, an item
        # without its descriptor an AttributeError
        except (ValueError, NotImplementedError, IndexError, TypeError, KeyError, AttributeError, struct.error) as exc:
            # the exception's bare name said little ("(error)" for struct.error): what it means for a LUT
            why = ("its LUT data is shorter than its descriptor says" if isinstance(exc, (struct.error, IndexError))
                   else "a LUT item lacks its descriptor or data" if isinstance(exc, (AttributeError, KeyError))
                   else type(exc).__name__)
            fail(f"{name}: invalid modality/VOI LUT or window ({why})")
        if not np.isfinite(values).all():
            fail(f"{name}: the rescale/VOI transform gives values beyond floating point (implausible RescaleSlope, "
                 f"RescaleIntercept or window)")
        values = _padding_as_background(values, padding_mask(ds, arr), dark_is_high=photometric == "MONOCHROME1")
        scaled = min_max_to_uint8(values, invert=photometric == "MONOCHROME1")
    elif photometric in _COLOUR:
        if arr.ndim != 3:  # the header says colour but one sample per pixel
            fail(f"{name}: {photometric} image with {int(ds.get('SamplesPerPixel') or 1)} sample(s) per pixel")
        scaled = min_max_to_uint8(rgb_to_grey(arr))
    if scaled is None:
        if photometric in _GREY and arr.min() != arr.max():  # the header flattened pixels that differ
            if ds.get("VOILUTSequence") or "WindowCenter" in ds:
                fail(f"{name}: its VOI LUT or window leaves no contrast (every pixel maps to one value, though the "
                     f"stored pixels differ): the header's display settings do not fit its pixel data")
            fail(f"{name}: its modality LUT or RescaleSlope maps every pixel to one value, though the stored pixels "
                 f"differ (a RescaleSlope of 0?)")
        fail(f"{name}: image has no contrast (all pixel values equal)")
    return equalize_histogram(scaled)


def load_dicom_image(path: Path, *, allow_any_modality: bool = False) -> DicomImage:
    """Read, validate, decode and convert one DICOM radiograph (see module docstring)."""
    name = path.name
    ds = read_dicom(path)
    check_image_object(ds, name)
    modality = check_modality(ds, name, allow_any_modality=allow_any_modality)
    check_single_frame(ds, name)
    uids = _uids(ds, name)
    pixels = to_uint8(ds, decode_pixels(ds, name), name)
    view, rule = view_of(ds)
    return DicomImage(
        pixels_u8=np.ascontiguousarray(pixels),
        source_file=path,
        modality=modality,
        view_position=view,
        view_source=rule,
        sop_class_uid=uids["SOPClassUID"],
        sop_instance_uid=uids["SOPInstanceUID"],
        study_instance_uid=uids["StudyInstanceUID"],
        series_instance_uid=uids["SeriesInstanceUID"],
        dataset=ds,
    )
