"""DICOM reading: refusals (with PHI-free messages), the 8-bit pipeline and transfer syntaxes."""

from __future__ import annotations

import re
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.pixels import get_encoder
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from radtrt.errors import RadtrtError
from radtrt.imaging import dicom as dicom_module
from radtrt.imaging.dicom import load_dicom_image
from radtrt.imaging.pixels import equalize_histogram, min_max_to_uint8
from radtrt.imaging.synthetic import (
    FAKE_PATIENT_ID,
    FAKE_PATIENT_NAME,
    radiograph_dataset,
    synthetic_chest,
    write_radiograph,
)


def _bundled(name: str) -> Path:
    """A pydicom test file that ships with the wheel (never one that needs a download)."""
    path = get_testdata_file(name, download=False)
    assert path is not None, f"pydicom test file {name} is not in the installed wheel"  # pydicom>=3 ships it
    return Path(path)


def _phi_parts(path: Path) -> list[str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    name = str(ds.get("PatientName", "") or "")
    parts = [p for p in name.replace("^", " ").split() if len(p) > 2]
    pid = str(ds.get("PatientID", "") or "")
    return parts + ([pid] if len(pid) > 2 else [])


def _refused(path: Path, match: str, **kwargs: object) -> str:
    """Assert loading fails with RadtrtError matching `match` and without patient data."""
    with pytest.raises(RadtrtError, match=match) as info:
        load_dicom_image(path, **kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message
    assert path.name in message
    if path.exists() and path.stat().st_size > 0:
        try:
            parts = _phi_parts(path)
        except Exception:  # unreadable header: nothing to leak
            parts = []
        for part in parts + FAKE_PATIENT_NAME.split("^") + [FAKE_PATIENT_ID]:
            assert part not in message
    return message


# ---- bundled files -----------------------------------------------------------------------

def test_ct_is_refused_unless_any_modality_allowed() -> None:
    ct = _bundled("CT_small.dcm")
    assert "CompressedSamples" in " ".join(_phi_parts(ct))  # the PHI check below is live
    _refused(ct, r"modality 'CT' is not a chest radiograph")
    image = load_dicom_image(ct, allow_any_modality=True)
    assert image.pixels_u8.shape == (128, 128) and image.pixels_u8.dtype == np.uint8
    assert image.modality == "CT" and image.view_position == "UNKNOWN"
    assert "CompressedSamples" not in repr(image)


@pytest.mark.parametrize(("name", "kind"), [("rtplan.dcm", "RT Plan Storage"),
                                             ("test-SR.dcm", "SR Storage")])
def test_non_image_objects_are_refused_naming_their_kind(name: str, kind: str) -> None:
    message = _refused(_bundled(name), "not an image", allow_any_modality=True)
    assert kind in message


@pytest.mark.filterwarnings("ignore:Expected explicit VR")
def test_rgb_secondary_capture_needs_override_then_becomes_grey() -> None:
    sc = _bundled("SC_rgb_jpeg.dcm")  # modality OT, JPEG baseline, RGB
    _refused(sc, r"modality 'OT'")
    image = load_dicom_image(sc, allow_any_modality=True)
    assert image.pixels_u8.shape == (256, 256) and image.pixels_u8.dtype == np.uint8


def test_multi_frame_is_refused() -> None:
    _refused(_bundled("SC_rgb_rle_2frame.dcm"), "multi-frame", allow_any_modality=True)


def test_truncated_bundled_pixel_data_is_refused(tmp_path: Path) -> None:
    ds = pydicom.dcmread(_bundled("CT_small.dcm"))
    ds.PixelData = ds.PixelData[:-1000]
    ds.save_as(tmp_path / "ct_cut.dcm")
    _refused(tmp_path / "ct_cut.dcm", "truncated", allow_any_modality=True)


def test_damaged_headers_are_one_line(tmp_path: Path) -> None:
    """Each was a traceback, and one such extra file in a study folder ended the whole run."""
    source = write_radiograph(tmp_path / "pa.dcm", view_position="PA")
    ds = pydicom.dcmread(source)
    del ds.BitsStored
    ds.save_as(tmp_path / "no_bits_stored.dcm")
    _refused(tmp_path / "no_bits_stored.dcm", "incomplete image pixel description")  # AttributeError
    raw = bytearray(source.read_bytes())
    at = raw.find(b"\x28\x00\x10\x00US\x02\x00")  # Rows, US, 2 bytes -> 3: not a whole US value
    raw[at + 6:at + 8] = b"\x03\x00"
    raw[at + 8:at + 8] = b"\x00"
    (tmp_path / "odd_length.dcm").write_bytes(bytes(raw))
    _refused(tmp_path / "odd_length.dcm", "DICOM header is truncated or corrupt")  # BytesLengthException
    raw = bytearray(source.read_bytes())
    at = raw.find(b"\x02\x00\x02\x00UI")  # the file meta's Media Storage SOP Class UID: a VR code no one knows
    raw[at + 4:at + 6] = b"\x55\xca"
    (tmp_path / "bad_meta_vr.dcm").write_bytes(bytes(raw))
    _refused(tmp_path / "bad_meta_vr.dcm", "DICOM header is truncated or corrupt")  # NotImplementedError


def test_decoder_errors_do_not_quote_header_values(tmp_path: Path) -> None:
    """pydicom's message quoted the Photometric Interpretation: a name typed into the wrong field reached stderr."""
    source = write_radiograph(tmp_path / "pa.dcm", view_position="PA")
    ds = pydicom.dcmread(source)
    ds.PhotometricInterpretation = FAKE_PATIENT_NAME
    ds.save_as(tmp_path / "named.dcm", enforce_file_format=True)
    with pytest.raises(RadtrtError) as info:
        load_dicom_image(tmp_path / "named.dcm")
    assert FAKE_PATIENT_NAME.split("^")[0] not in str(info.value)


def test_a_declared_size_beyond_any_detector_is_refused_before_decoding(tmp_path: Path) -> None:
    """A 1 MB RLE file declaring 8000 x 8000 took 2 GB and 10 s to decode; there was no guard for DICOM."""
    source = write_radiograph(tmp_path / "pa.dcm", view_position="PA")
    ds = pydicom.dcmread(source)
    ds.Rows, ds.Columns = 8000, 8000
    ds.save_as(tmp_path / "big.dcm")
    _refused(tmp_path / "big.dcm", "8000 x 8000 pixels is implausibly large for a radiograph")


def test_empty_pixel_data_is_refused(tmp_path: Path) -> None:
    """An empty Pixel Data element read as None: a TypeError traceback, and the studies after it never ran."""
    source = write_radiograph(tmp_path / "pa.dcm", view_position="PA")
    ds = pydicom.dcmread(source)
    ds.PixelData = b""
    ds.save_as(tmp_path / "empty.dcm")
    _refused(tmp_path / "empty.dcm", "its Pixel Data element is empty")


@pytest.mark.parametrize("content", [b"", b"just some text\n" * 20, b"\x00" * 300])
def test_non_dicom_files_are_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "input.dcm"
    path.write_bytes(content)
    _refused(path, "not a DICOM file")


def test_junk_named_png_is_refused_as_neither_format(tmp_path: Path) -> None:
    path = tmp_path / "image.png"
    path.write_bytes(b"just some text\n" * 20)
    _refused(path, "nor a PNG or JPEG image")


@pytest.mark.parametrize("content", [b'{"image": "png/a.png", "findings": "x"}\n{"image": "png/b.png"}\n', b"[1, 2]\n",
                                     b'{\n  "studies": [\n    "a.dcm"\n  ]\n}\n'])  # pretty-printed: one document
def test_a_manifest_given_as_a_study_is_named_as_one(tmp_path: Path, content: bytes) -> None:
    """'radtrt infer manifest.jsonl' was told only 'not a DICOM file, nor a PNG or JPEG image'."""
    path = tmp_path / "manifest.jsonl"
    path.write_bytes(content)
    _refused(path, re.escape("manifest.jsonl: a JSON file (a manifest?), not an image: give the DICOM files, image "
                             "files or study folders themselves"))


def test_missing_file_is_refused(tmp_path: Path) -> None:
    _refused(tmp_path / "absent.dcm", "cannot read file")


# ---- generated radiographs: refusals ---------------------------------------------------------

def test_truncated_file_is_refused(tmp_path: Path) -> None:
    path = write_radiograph(tmp_path / "dx.dcm")
    data = path.read_bytes()
    path.write_bytes(data[:-4000])  # cut inside Pixel Data
    _refused(path, "truncated")


@pytest.mark.parametrize("size", [(256, 200), (128, 100)])  # pixel data over and under the header read's 64 KB
def test_a_truncated_file_is_refused_from_its_header(tmp_path: Path, size: tuple[int, int]) -> None:
    """Header screening passed a file cut inside its pixel data; only decoding refused it, which training's
    DataLoader workers do mid-run, after checkpoints were written. A folder's chosen image is screened too."""
    from radtrt.imaging.study import screen_study

    path = write_radiograph(tmp_path / "study" / "dx.dcm", synthetic_chest(*size), view_position="PA")
    screen_study(path)
    screen_study(path.parent)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    for study in (path, path.parent):
        with pytest.raises(RadtrtError, match=r"dx.dcm: pixel data truncated \(\d+ of \d+ bytes\)"):
            screen_study(study)


def test_a_deflated_file_is_screened_and_one_cut_short_is_one_line(tmp_path: Path) -> None:
    """A deflated file's pixel data lies in the inflated stream, not at its file offset (a whole one is not
    'truncated'); one cut short was zlib.error's traceback."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    from radtrt.imaging.study import screen_study

    ds = radiograph_dataset(synthetic_chest())
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(tmp_path / "dx.dcm", enforce_file_format=True)
    screen_study(tmp_path / "dx.dcm")
    assert load_dicom_image(tmp_path / "dx.dcm").pixels_u8.shape == (256, 200)
    (tmp_path / "cut.dcm").write_bytes((tmp_path / "dx.dcm").read_bytes()[:-10])
    _refused(tmp_path / "cut.dcm", "DICOM header is truncated or corrupt")


@pytest.mark.parametrize(("delta", "match"), [(10, "truncated"), (-10, "disagrees")])
def test_rows_disagreeing_with_pixel_length_are_refused(tmp_path: Path, delta: int,
                                                        match: str) -> None:
    ds = radiograph_dataset(synthetic_chest())
    ds.Rows = ds.Rows + delta
    ds.save_as(tmp_path / "dx.dcm", enforce_file_format=True)
    _refused(tmp_path / "dx.dcm", match)


def test_bits_allocated_disagreeing_is_refused(tmp_path: Path) -> None:
    ds = radiograph_dataset(synthetic_chest())
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.save_as(tmp_path / "dx.dcm", enforce_file_format=True)
    _refused(tmp_path / "dx.dcm", "disagrees")


@pytest.mark.parametrize(("attrs", "match"), [
    ({"PhotometricInterpretation": "SECRETX"}, r"photometric interpretation \(a value that is not a DICOM defined "
                                               r"term\) is not supported"),
    ({"BitsStored": 20, "HighBit": 19}, "BitsStored 20 does not fit BitsAllocated 16"),
    ({"SamplesPerPixel": 3}, "MONOCHROME2 image with 3 samples per pixel"),
    # colour with one sample: "cannot decode pixel data (..., ValueError)" for YBR, RGB's said after decoding
    ({"PhotometricInterpretation": "RGB"}, r"RGB image with 1 sample per pixel \(the header contradicts itself\)"),
    ({"PhotometricInterpretation": "YBR_FULL"}, r"YBR_FULL image with 1 sample per pixel \(the header contradicts"),
])
def test_header_contradictions_are_named_before_decoding(tmp_path: Path, attrs: dict, match: str) -> None:
    """These were 'cannot decode pixel data' (the decoder ran first) or, for 3 samples of a greyscale image,
    'pixel data truncated' of a complete file."""
    ds = radiograph_dataset(synthetic_chest())
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    ds.save_as(tmp_path / "dx.dcm", enforce_file_format=True)
    assert "SECRETX" not in _refused(tmp_path / "dx.dcm", match)


@pytest.mark.parametrize(("modality", "match"), [("MG", "modality 'MG'"),
                                                 (None, "missing modality"),
                                                 ("DOE^JOHN", r"modality \(a value that is not a DICOM defined term\)"),
                                                 # an ID looks like a code string, and was shown
                                                 ("PIDX98765", r"modality \(a value that is not a DICOM defined term\)")])
def test_wrong_or_missing_modality_is_refused(tmp_path: Path, modality: str | None,
                                              match: str) -> None:
    ds = radiograph_dataset(synthetic_chest(), modality=modality or "DX")
    if modality is None:
        del ds.Modality
    ds.save_as(tmp_path / "img.dcm", enforce_file_format=True)
    shown = _refused(tmp_path / "img.dcm", match)
    assert "DOE" not in shown and "PIDX" not in shown  # a name or ID typed into the wrong field stays unshown
    assert load_dicom_image(tmp_path / "img.dcm", allow_any_modality=True).pixels_u8.size


def test_generated_multi_frame_is_refused(tmp_path: Path) -> None:
    frames = np.stack([synthetic_chest(seed=0), synthetic_chest(seed=1)])
    ds = radiograph_dataset(frames)
    ds.save_as(tmp_path / "mf.dcm", enforce_file_format=True)
    _refused(tmp_path / "mf.dcm", r"multi-frame image \(2 frames\)")


def test_unknown_transfer_syntax_is_refused(tmp_path: Path) -> None:
    path = write_radiograph(tmp_path / "dx.dcm")
    data = path.read_bytes()
    assert data.count(b"1.2.840.10008.1.2.1\x00") == 1
    path.write_bytes(data.replace(b"1.2.840.10008.1.2.1\x00", b"1.2.840.99999.1.2.1\x00"))
    _refused(path, "unknown transfer syntax")


def test_missing_decoder_is_reported_with_its_dependencies(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    ds = radiograph_dataset(synthetic_chest())
    ds.compress(JPEG2000Lossless)
    ds.save_as(tmp_path / "j2k.dcm", enforce_file_format=True)
    missing = SimpleNamespace(is_available=False,
                              missing_dependencies=["pylibjpeg - requires pylibjpeg-openjpeg"])
    monkeypatch.setattr(dicom_module, "get_decoder", lambda uid: missing)
    message = _refused(tmp_path / "j2k.dcm", "no decoder installed for JPEG 2000")
    assert "pylibjpeg-openjpeg" in message


def test_constant_image_is_refused(tmp_path: Path) -> None:
    write_radiograph(tmp_path / "flat.dcm", np.full((64, 64), 1000, np.uint16))
    _refused(tmp_path / "flat.dcm", "no contrast")
    ds = radiograph_dataset(synthetic_chest())
    ds.RescaleSlope, ds.RescaleIntercept = 0, 0
    ds.save_as(tmp_path / "slope0.dcm", enforce_file_format=True)  # said 'all pixel values equal': they differ
    _refused(tmp_path / "slope0.dcm", "RescaleSlope maps every pixel to one value, though the stored pixels differ")


# ---- generated radiographs: the pixel pipeline ------------------------------------------------

def _u8(path: Path) -> np.ndarray:
    return load_dicom_image(path).pixels_u8


def test_pipeline_is_min_max_then_equalize_and_bright_is_dense(tmp_path: Path) -> None:
    raw = synthetic_chest()
    out = _u8(write_radiograph(tmp_path / "dx.dcm", raw))
    assert out.shape == raw.shape and out.dtype == np.uint8 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, equalize_histogram(min_max_to_uint8(raw)))
    lung, body = out[110, 60], out[230, 100]  # left lung field vs lower mediastinum
    assert int(body) - int(lung) > 60


def test_monochrome1_twin_gives_identical_output(tmp_path: Path) -> None:
    raw = synthetic_chest()
    mono2 = _u8(write_radiograph(tmp_path / "m2.dcm", raw))
    twin = (4095 - raw).astype(np.uint16)
    mono1 = _u8(write_radiograph(tmp_path / "m1.dcm", twin, photometric="MONOCHROME1"))
    np.testing.assert_array_equal(mono1, mono2)
    # and without the MONOCHROME1 flag the same stored values would come out inverted
    assert not np.array_equal(_u8(write_radiograph(tmp_path / "m2b.dcm", twin)), mono2)


def test_rescale_slope_and_intercept_are_applied_before_the_window(tmp_path: Path) -> None:
    # A linear rescale alone is invisible after min-max; it matters because the window is given
    # in rescaled (modality) units, so the window only lands right if the rescale comes first.
    raw = (synthetic_chest() // 2 * 2 + 10).astype(np.uint16)  # even values >= 10
    window = (2600.0, 1200.0)
    plain = _u8(write_radiograph(tmp_path / "plain.dcm", raw, window=window))
    stored = ((raw.astype(np.int64) - 10) // 2).astype(np.uint16)
    rescaled = _u8(write_radiograph(tmp_path / "slope2.dcm", stored, rescale=(2.0, 10.0),
                                    window=window))
    np.testing.assert_array_equal(rescaled, plain)


def test_window_center_width_is_applied(tmp_path: Path) -> None:
    raw = synthetic_chest()
    center, width = 2600.0, 1200.0
    windowed = _u8(write_radiograph(tmp_path / "win.dcm", raw, window=(center, width)))
    plain = _u8(write_radiograph(tmp_path / "plain.dcm", raw))
    assert not np.array_equal(windowed, plain)
    below = raw <= center - 0.5 - (width - 1) / 2  # DICOM LINEAR window: clipped to black
    above = raw > center - 0.5 + (width - 1) / 2
    assert below.any() and above.any()
    assert np.all(windowed[below] == windowed.min())
    assert np.all(windowed[above] == windowed.max())


def test_voi_lut_sequence_is_applied(tmp_path: Path) -> None:
    raw = synthetic_chest()
    lut = np.sqrt(np.arange(4096) / 4095.0) * 65535  # a non-linear display curve
    ds = radiograph_dataset(raw)
    item = Dataset()
    item.add_new("LUTDescriptor", "US", [4096, 0, 16])
    item.add_new("LUTData", "US", [int(v) for v in lut])
    ds.VOILUTSequence = [item]
    ds.save_as(tmp_path / "voi.dcm", enforce_file_format=True)
    expected = equalize_histogram(min_max_to_uint8(lut.astype(np.uint16)[raw]))
    np.testing.assert_array_equal(_u8(tmp_path / "voi.dcm"), expected)
    assert not np.array_equal(expected, _u8(write_radiograph(tmp_path / "plain.dcm", raw)))


@pytest.mark.parametrize("sequence, descriptor, data", [
    ("VOILUTSequence", [4096, 0, 16], [0, 1]),  # data shorter than declared: struct.error traceback
    ("ModalityLUTSequence", [4, 0, 16], [0, 1]),
    ("ModalityLUTSequence", None, None),  # an item without its descriptor: AttributeError traceback
])
def test_damaged_lut_sequences_are_refused(tmp_path: Path, sequence: str, descriptor: list[int] | None,
                                           data: list[int] | None) -> None:
    ds = radiograph_dataset(synthetic_chest())
    item = Dataset()
    if descriptor is not None:
        item.add_new("LUTDescriptor", "US", descriptor)
        item.add_new("LUTData", "US", data)
    if sequence == "ModalityLUTSequence":
        item.add_new("ModalityLUTType", "LO", "US")
    setattr(ds, sequence, [item])
    ds.save_as(tmp_path / "lut.dcm", enforce_file_format=True)
    with pytest.raises(RadtrtError, match="lut.dcm: invalid modality/VOI LUT or window") as refused:
        load_dicom_image(tmp_path / "lut.dcm")
    # the exception's bare name ("(error)", "(IndexError)") said nothing of what is wrong
    assert str(refused.value).endswith("(its LUT data is shorter than its descriptor says)" if descriptor else
                                       "(a LUT item lacks its descriptor or data)")


@pytest.mark.parametrize("syntax", [JPEG2000Lossless, RLELossless, JPEGLSLossless])
def test_lossless_compressed_decodes_like_uncompressed(tmp_path: Path, syntax: str) -> None:
    raw = synthetic_chest()
    plain = _u8(write_radiograph(tmp_path / "plain.dcm", raw))
    if not get_encoder(syntax).is_available:  # e.g. JPEG-LS needs pyjpegls: say so, don't pass
        pytest.skip(f"no encoder installed for {syntax.name}")
    ds = radiograph_dataset(raw)
    ds.compress(syntax)
    ds.save_as(tmp_path / "compressed.dcm", enforce_file_format=True)
    assert pydicom.dcmread(tmp_path / "compressed.dcm").file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(_u8(tmp_path / "compressed.dcm"), plain)


def test_bundled_jpeg2000_and_rle_files_decode(tmp_path: Path) -> None:
    for name in ("MR_small_jp2klossless.dcm", "MR_small_RLE.dcm"):
        image = load_dicom_image(_bundled(name), allow_any_modality=True)
        reference = load_dicom_image(_bundled("MR_small.dcm"), allow_any_modality=True)
        np.testing.assert_array_equal(image.pixels_u8, reference.pixels_u8)


def test_metadata_is_exposed_without_phi(tmp_path: Path) -> None:
    path = shutil.copy(write_radiograph(tmp_path / "a.dcm", view_position="AP", modality="CR"),
                       tmp_path / "b.dcm")
    image = load_dicom_image(Path(path))
    ds = pydicom.dcmread(path)
    assert (image.modality, image.view_position, image.view_source) == ("CR", "AP", "ViewPosition")
    assert image.sop_instance_uid == ds.SOPInstanceUID
    assert image.study_instance_uid == ds.StudyInstanceUID
    assert image.series_instance_uid == ds.SeriesInstanceUID
    assert image.sop_class_uid == ds.SOPClassUID
    assert image.dataset.PatientName == FAKE_PATIENT_NAME  # kept for the SR writer...
    assert "Synthetic" not in repr(image) and FAKE_PATIENT_ID not in repr(image)  # ...not shown


def test_colour_header_over_one_sample_per_pixel_is_refused(tmp_path: Path) -> None:
    """It reached the RGB conversion and ended in a ValueError traceback."""
    path = tmp_path / "img.dcm"
    write_radiograph(path, synthetic_chest(64, 64, seed=0), modality="DX", view_position="PA")
    ds = pydicom.dcmread(path)
    ds.PhotometricInterpretation = "RGB"
    ds.save_as(path)
    _refused(path, "RGB image with 1 sample")


def test_an_rle_frame_with_a_padding_byte_decodes_as_stored(tmp_path: Path) -> None:
    """pydicom warns about the extra byte and decodes the declared frame exactly; refusing every file its decoder
    warned about (tried for RLE frames of more rows than declared) refused this valid one too."""
    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(write_radiograph(tmp_path / "pa.dcm", synthetic_chest(287, 255), view_position="PA"))
    arr = ds.pixel_array.astype(np.uint16)  # an odd number of pixels: each segment is padded
    segments = [((arr >> 8) & 0xFF).astype(np.uint8).tobytes() + b"\0", (arr & 0xFF).astype(np.uint8).tobytes() + b"\0"]
    encoded = []
    for data in segments:  # PackBits literal runs of at most 128 bytes
        runs = b"".join(bytes([len(data[i:i + 128]) - 1]) + data[i:i + 128] for i in range(0, len(data), 128))
        encoded.append(runs + b"\0" * (len(runs) % 2))
    header = np.zeros(16, dtype="<u4")
    header[0], header[1], header[2] = 2, 64, 64 + len(encoded[0])
    ds.PixelData = encapsulate([header.tobytes() + b"".join(encoded)])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.save_as(tmp_path / "rle.dcm", enforce_file_format=True)
    assert load_dicom_image(tmp_path / "rle.dcm").pixels_u8.shape == (287, 255)


def test_an_empty_number_of_frames_is_one_frame(tmp_path: Path) -> None:
    """Written by some exports; read as one frame (check_single_frame), not refused over pydicom's warning."""
    ds = pydicom.dcmread(write_radiograph(tmp_path / "pa.dcm", view_position="PA"))
    ds.NumberOfFrames = ""
    ds.save_as(tmp_path / "frames.dcm", enforce_file_format=True)
    assert load_dicom_image(tmp_path / "frames.dcm").pixels_u8.shape == (int(ds.Rows), int(ds.Columns))


def test_a_zero_number_of_frames_or_a_huge_slope_print_nothing_raw(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    """pydicom's and numpy's own warnings (two lines each, a site-packages path) reached stderr."""
    ds = pydicom.dcmread(write_radiograph(tmp_path / "pa.dcm", view_position="PA"))
    ds.NumberOfFrames = 0
    ds.save_as(tmp_path / "zero.dcm", enforce_file_format=True)
    ds.NumberOfFrames, ds.RescaleSlope, ds.RescaleIntercept = 1, 1e308, 0
    ds.save_as(tmp_path / "slope.dcm", enforce_file_format=True)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning now fails the read
        assert load_dicom_image(tmp_path / "zero.dcm").pixels_u8.size
        _refused(tmp_path / "slope.dcm", "values beyond floating point")


def test_header_charset_warnings_stay_off_stderr(tmp_path: Path) -> None:
    """pydicom warned over several stderr lines about a name it could not decode or a charset it does not
    know, while reading a study that is otherwise fine."""
    import warnings

    from radtrt.imaging.dicom import read_dicom

    for charset, name in (("ISO_IR 192", b"Dyspn\xe9e^X"), ("ISO_IR 999", b"DOE^J")):
        ds = radiograph_dataset(synthetic_chest(seed=3))
        ds.SpecificCharacterSet = charset
        ds.add_new(0x00100010, "PN", name)
        path = tmp_path / f"{charset.replace(' ', '_')}.dcm"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds.save_as(path, enforce_file_format=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            read_dicom(path)
        assert not [w for w in caught if "pydicom" in w.filename], [str(w.message) for w in caught]


def test_reading_never_logs_header_values_and_leaves_pydicom_settings_alone(tmp_path: Path) -> None:
    """Only the CLI turned pydicom's value validation off, for the whole process: a library caller (Triton's
    preprocessing, a script with logging set up) got "Invalid value for VR UI: '1.2.SECRET'" in its logs."""
    import logging
    import warnings

    import pydicom.config

    from radtrt.imaging.study import load_study

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # writing the malformed file warns too
        ds = radiograph_dataset(synthetic_chest(seed=8), view_position="PA")
        ds.PatientBirthDate = "19310704X"
        ds.StudyInstanceUID = "1.2.SECRET"  # pydicom validates UIs as it reads them
        path = tmp_path / "a.dcm"
        ds.save_as(path, enforce_file_format=True)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    root = logging.getLogger()
    root.addHandler(handler)
    before = pydicom.config.settings.reading_validation_mode
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            load_study(path)
    finally:
        root.removeHandler(handler)
    shown = [r.getMessage() for r in records] + [str(w.message) for w in caught]
    assert not [m for m in shown if "19310704" in m or "SECRET" in m], shown
    assert pydicom.config.settings.reading_validation_mode == before


@pytest.mark.parametrize("edit", [{"Rows": 128}, {"Columns": 100}])
def test_rle_data_larger_than_its_header_is_refused(tmp_path: Path, edit: dict[str, int]) -> None:
    """pydicom only warns ("non-conformant padding") and decodes the image's top half (fewer Rows declared) or a
    scramble of it (fewer Columns): a report was written on it with exit code 0."""
    ds = radiograph_dataset(synthetic_chest())
    ds.compress(RLELossless)
    ds.save_as(tmp_path / "intact.dcm", enforce_file_format=False)
    assert load_dicom_image(tmp_path / "intact.dcm").pixels_u8.shape == (int(ds.Rows), int(ds.Columns))
    for keyword, value in edit.items():
        setattr(ds, keyword, value)
    ds.save_as(tmp_path / "edited.dcm", enforce_file_format=False)
    _refused(tmp_path / "edited.dcm", "RLE pixel data holds more pixels than Rows x Columns")


def test_pixel_padding_takes_the_darkest_value_not_the_range(tmp_path: Path) -> None:
    """A 65535 padding border around a 12-bit image stretched the min..max scaling: the body kept 10 grey levels."""
    pixels = synthetic_chest()
    pixels[:30], pixels[:, :30] = 65535, 65535
    levels = {}
    for padding in (None, 65535):
        ds = radiograph_dataset(pixels.copy(), bits_stored=16)
        if padding is not None:
            ds.PixelPaddingValue = padding
        ds.save_as(tmp_path / "pad.dcm", enforce_file_format=True)
        u8 = load_dicom_image(tmp_path / "pad.dcm").pixels_u8
        levels[padding] = len(np.unique(u8[30:, 30:]))
        if padding is not None:
            assert u8[:30].max() == 0  # outside the detector: black, as in the display pipeline
    assert levels[None] < 20 and levels[65535] > 100
    ds = radiograph_dataset(synthetic_chest(), bits_stored=12)
    ds.save_as(tmp_path / "plain.dcm", enforce_file_format=True)
    ds.PixelPaddingValue = 4095 + 1  # declared, but no pixel has it: nothing changes
    ds.save_as(tmp_path / "declared.dcm", enforce_file_format=True)
    assert np.array_equal(load_dicom_image(tmp_path / "plain.dcm").pixels_u8,
                          load_dicom_image(tmp_path / "declared.dcm").pixels_u8)


def test_a_window_outside_the_data_is_named_as_the_cause(tmp_path: Path) -> None:
    """'image has no contrast (all pixel values equal)' was said of an image with contrast whose window lay
    outside its values."""
    ds = radiograph_dataset(synthetic_chest())
    ds.WindowCenter, ds.WindowWidth = 100000, 10
    ds.save_as(tmp_path / "w.dcm", enforce_file_format=True)
    _refused(tmp_path / "w.dcm", "its VOI LUT or window leaves no contrast")
    flat = radiograph_dataset(np.full((64, 64), 7, dtype=np.uint16))
    flat.save_as(tmp_path / "flat.dcm", enforce_file_format=True)
    _refused(tmp_path / "flat.dcm", r"image has no contrast \(all pixel values equal\)")


def test_quiet_from_two_threads_restores_what_was_there() -> None:
    """Each thread saved the other's changed settings and restored them: validation stayed off and pydicom's
    logger silent after both had left."""
    import logging
    import threading

    import pydicom.config

    from radtrt.imaging.dicom import quiet

    validation, level = pydicom.config.settings.reading_validation_mode, logging.getLogger("pydicom").level
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    inside: list[int] = []

    def first() -> None:
        with quiet():
            first_in.set()
            second_in.wait(5)
        first_out.set()

    def second() -> None:
        first_in.wait(5)
        with quiet("pydicom|highdicom"):
            second_in.set()
            first_out.wait(5)
            inside.append(pydicom.config.settings.reading_validation_mode)  # the first has left, this one has not
    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert inside == [pydicom.config.IGNORE]
    assert pydicom.config.settings.reading_validation_mode == validation
    assert logging.getLogger("pydicom").level == level and logging.getLogger("highdicom").level == logging.NOTSET


@pytest.mark.parametrize("damage", ["meta SOP class length", "transfer syntax", "SOP class"])
def test_a_value_that_is_not_a_uid_is_never_quoted(tmp_path: Path, damage: str,
                                                   capfd: pytest.CaptureFixture) -> None:
    """A UID's length damaged swallowed the header (the patient's name with it) into one value, quoted whole in
    the error line; a name where a UID belongs was quoted too, and pydicom warned with it on stderr."""
    ds = radiograph_dataset(synthetic_chest())
    path = tmp_path / "d.dcm"
    if damage == "meta SOP class length":
        ds.save_as(path, enforce_file_format=True)
        raw = bytearray(path.read_bytes())
        at = raw.find(b"\x02\x00\x02\x00UI")
        raw[at + 6:at + 8] = (0xFFF0).to_bytes(2, "little")
        path.write_bytes(bytes(raw))
        match = "no pixel data \\(a SOP class that is not a UID\\): a file cut short or damaged"
    elif damage == "transfer syntax":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds.file_meta.TransferSyntaxUID = FAKE_PATIENT_NAME
        ds.save_as(path, enforce_file_format=False)
        match = "its transfer syntax is not a UID"
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds.SOPClassUID = FAKE_PATIENT_NAME
        del ds.PixelData
        ds.save_as(path, enforce_file_format=False)
        match = "a SOP class that is not a UID"
    capfd.readouterr()
    _refused(path, match)
    out, err = capfd.readouterr()
    assert FAKE_PATIENT_NAME.split("^")[0] not in out + err


def test_a_damaged_offset_table_is_one_line(tmp_path: Path) -> None:
    """pydicom's struct.error from a Basic Offset Table that claims 16 MB: a traceback, exit 1, the rest of the
    studies lost."""
    import struct

    ds = radiograph_dataset(synthetic_chest())
    ds.compress(RLELossless)
    ds.save_as(tmp_path / "rle.dcm", enforce_file_format=True)
    raw = (tmp_path / "rle.dcm").read_bytes()
    at = raw.find(b"\xfe\xff\x00\xe0", raw.rfind(b"\xe0\x7f\x10\x00"))
    (tmp_path / "bot.dcm").write_bytes(raw[:at + 4] + struct.pack("<L", 0x00FFFFF0) + raw[at + 8:])
    _refused(tmp_path / "bot.dcm", "cannot decode pixel data")


@pytest.mark.parametrize("spelled", ["monochrome2", " Monochrome2", "monochrome1"])
def test_a_photometric_interpretation_in_lower_case_is_read_as_its_defined_term(tmp_path: Path, spelled: str) -> None:
    """It was accepted (upper-cased) by radtrt's checks, then pydicom's decoder, which knows only the upper-case
    term, failed: "cannot decode pixel data (..., ValueError)"."""
    ds = radiograph_dataset(synthetic_chest())
    ds.PhotometricInterpretation = spelled.strip().upper()
    ds.save_as(tmp_path / "upper.dcm", enforce_file_format=True)
    ds.PhotometricInterpretation = spelled
    ds.save_as(tmp_path / "spelled.dcm", enforce_file_format=True)
    np.testing.assert_array_equal(load_dicom_image(tmp_path / "spelled.dcm").pixels_u8,
                                  load_dicom_image(tmp_path / "upper.dcm").pixels_u8)


def _patched(data: bytes, marker: bytes, at: int, value: bytes) -> bytes:
    """``data`` with ``value`` written ``at`` bytes after the one occurrence of ``marker``."""
    assert data.count(marker) == 1, marker
    start = data.index(marker) + at
    return data[:start] + value + data[start + len(value):]


def test_a_codestream_larger_than_its_header_is_refused_before_decoding(tmp_path: Path) -> None:
    """The decoders allocate what the codestream declares: a 1.3 KB JPEG 2000 frame declaring 60000 x 60000 peaked
    at 4 GB before its shape was found to disagree with the header's Rows x Columns."""
    ds = radiograph_dataset(synthetic_chest())
    ds.compress(JPEG2000Lossless)
    ds.save_as(tmp_path / "j2k.dcm", enforce_file_format=True)
    assert load_dicom_image(tmp_path / "j2k.dcm").pixels_u8.shape[:2] == (ds.Rows, ds.Columns)  # as it was: decoded
    big = (60000).to_bytes(4, "big") * 2  # Xsiz, Ysiz of SIZ, after SOC
    (tmp_path / "bomb.dcm").write_bytes(_patched((tmp_path / "j2k.dcm").read_bytes(), b"\xff\x4f\xff\x51", 8, big))
    _refused(tmp_path / "bomb.dcm", f"its compressed image is 60000 x 60000 pixels, the header says {ds.Columns} x "
                                    f"{ds.Rows} \\(decompression bomb guard\\)")
    jpeg = _bundled("SC_rgb_jpeg_dcmtk.dcm")  # a baseline JPEG: SOF0's lines and samples per line
    source = pydicom.dcmread(jpeg)
    assert load_dicom_image(jpeg, allow_any_modality=True).pixels_u8.shape[:2] == (source.Rows, source.Columns)
    (tmp_path / "jpeg.dcm").write_bytes(_patched(jpeg.read_bytes(), b"\xff\xc0", 5, (50000).to_bytes(2, "big") * 2))
    _refused(tmp_path / "jpeg.dcm", "its compressed image is 50000 x 50000 pixels", allow_any_modality=True)


def test_a_deflated_data_set_that_inflates_beyond_any_radiograph_is_refused(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """pydicom inflates a deflated data set whole before reading a tag: 2 MB on disk took 4.6 GB of memory (2 GiB
    inflated), and an OOM kill on a small box, with any folder of studies it was a stray file in."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    from radtrt.imaging import bombs

    ds = radiograph_dataset(synthetic_chest())
    ds.private_block(0x0009, "RADTRT TEST", create=True).add_new(0x10, "OB", bytes(4 << 20))  # zeros: deflate well
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    path = tmp_path / "deflated.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert path.stat().st_size < 1 << 20
    assert load_dicom_image(path).pixels_u8.shape[:2] == (ds.Rows, ds.Columns)  # under the limit: read as before
    monkeypatch.setattr(bombs, "MAX_INFLATED", 2 << 20)  # the real one is 364 MB: not written in a test
    _refused(path, "its deflated data set inflates to more than 2 MB, more than any radiograph holds")


def test_codestream_sizes_are_read_past_fill_bytes_and_markers_without_a_length() -> None:
    """A legal JPEG with fill bytes (0xFF 0xFF) or a standalone marker before its frame header must not be misread:
    a wrong size here refuses a valid image as a bomb."""
    from pydicom.uid import JPEGBaseline8Bit, JPEGLSLossless

    from radtrt.imaging.bombs import codestream_size

    sof0 = b"\xff\xc0\x00\x0b\x08" + (256).to_bytes(2, "big") + (512).to_bytes(2, "big") + b"\x01\x01\x11\x00"
    app0 = b"\xff\xe0\x00\x06abcd"
    assert codestream_size(b"\xff\xd8" + app0 + sof0, JPEGBaseline8Bit) == (512, 256)
    assert codestream_size(b"\xff\xd8" + app0 + b"\xff\xff\xff" + sof0, JPEGBaseline8Bit) == (512, 256)
    assert codestream_size(b"\xff\xd8\xff\xd0" + sof0, JPEGBaseline8Bit) == (512, 256)
    sof55 = b"\xff\xf7" + sof0[2:]  # JPEG-LS: laid out as SOF0
    assert codestream_size(b"\xff\xd8" + sof55, JPEGLSLossless) == (512, 256)
    no_lines = sof0[:5] + b"\x00\x00" + sof0[7:]  # lines given later by a DNL marker: not judged here
    assert codestream_size(b"\xff\xd8" + no_lines, JPEGBaseline8Bit) is None
    assert codestream_size(b"\xff\xd8" + app0[:3], JPEGBaseline8Bit) is None  # cut short: the decoder's to say
    assert codestream_size(b"\xff\xd8\xff\xda\x00\x02", JPEGBaseline8Bit) is None
