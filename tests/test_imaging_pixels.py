"""Pixel steps (equalization, min-max, MONOCHROME1 mirror) and the DICOM view rules."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageOps
from pydicom.dataset import Dataset

from radtrt.imaging.pixels import equalize_histogram, min_max_to_uint8, rgb_to_grey
from radtrt.imaging.views import UNKNOWN_VIEW, is_frontal, view_of


def _images(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        rng.integers(0, 256, (37, 53)).astype(np.uint8),  # uniform
        np.minimum(rng.exponential(6.0, (40, 40)), 255).astype(np.uint8),  # dark, skewed
        np.where(rng.random((30, 70)) < 0.97, 250, rng.integers(0, 256, (30, 70))).astype(
            np.uint8),  # one dominant bright level (the top bin PIL leaves out of `step`)
        (rng.integers(0, 3, (25, 25)) * 90).astype(np.uint8),  # three levels
        rng.integers(100, 102, (9, 11)).astype(np.uint8),  # two adjacent levels: step == 0
        np.full((5, 5), 7, np.uint8),  # constant: identity
    ]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equalize_matches_pil_bit_for_bit(seed: int) -> None:
    for image in _images(seed):
        expected = np.asarray(ImageOps.equalize(Image.fromarray(image)))
        np.testing.assert_array_equal(equalize_histogram(image), expected)


def test_equalize_spreads_a_narrow_histogram() -> None:
    image = np.random.default_rng(3).integers(100, 140, (64, 64)).astype(np.uint8)
    out = equalize_histogram(image)
    assert out.min() < 10 and out.max() > 245


def test_min_max_and_mirror_are_exact() -> None:
    rng = np.random.default_rng(4)
    values = rng.integers(0, 4096, (50, 60)).astype(np.float64)
    straight = min_max_to_uint8(values)
    assert straight is not None and straight.min() == 0 and straight.max() == 255
    # MONOCHROME1 twin: stored = max - value; mirroring must restore it exactly
    twin = min_max_to_uint8(4095.0 - values, invert=True)
    np.testing.assert_array_equal(twin, straight)
    assert min_max_to_uint8(np.full((3, 3), 5.0)) is None
    assert min_max_to_uint8(np.array([[0.0, np.nan]])) is None


def test_rgb_to_grey_uses_bt601_weights() -> None:
    rgb = np.zeros((1, 3, 3), np.uint8)
    rgb[0, 0, 0], rgb[0, 1, 1], rgb[0, 2, 2] = 255, 255, 255
    np.testing.assert_allclose(rgb_to_grey(rgb)[0], [0.299 * 255, 0.587 * 255, 0.114 * 255])


def _header(**attrs: object) -> Dataset:
    ds = Dataset()
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def _coded_view(meaning: str, value: str = "X", scheme: str = "SCT") -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return _header(ViewCodeSequence=[item])


@pytest.mark.parametrize(
    ("ds", "expected"),
    [
        (_header(ViewPosition="PA "), ("PA", "ViewPosition")),
        (_header(ViewPosition="LL", SeriesDescription="CHEST PA"), ("LL", "ViewPosition")),
        (_coded_view("postero-anterior"), ("PA", "ViewCodeSequence")),
        (_coded_view("antero-posterior"), ("AP", "ViewCodeSequence")),
        (_coded_view("left lateral"), ("LL", "ViewCodeSequence")),
        (_coded_view("Lateral"), ("LATERAL", "ViewCodeSequence")),
        (_coded_view("cranio-caudal"), (UNKNOWN_VIEW, "none")),
        # by the coded concept (CID 4010), whatever the meaning says: a meaning-less or wrongly labelled item was
        # read by its text alone, and a folder of two such images was "2 images with unknown view"
        (_coded_view("", "272479007"), ("PA", "ViewCodeSequence")),
        (_coded_view("postero-anterior", "399348003"), ("AP", "ViewCodeSequence")),
        (_coded_view("PA", "R-10236", "SRT"), ("LL", "ViewCodeSequence")),
        (_coded_view("", "399198007"), ("RL", "ViewCodeSequence")),
        (_coded_view("", "r-102cd", "srt"), ("LATERAL", "ViewCodeSequence")),
        (_coded_view("", "272479007", "99LOCAL"), (UNKNOWN_VIEW, "none")),  # another scheme's 272479007
        (_header(ViewPosition="", SeriesDescription="CHEST PA"), ("PA", "SeriesDescription")),
        (_header(SeriesDescription="Thorax LAT"), ("LATERAL", "SeriesDescription")),
        (_header(SeriesDescription="CHEST PA AND LAT", ProtocolName="AP portable"),
         ("AP", "ProtocolName")),
        (_header(SeriesDescription="PA/LAT"), (UNKNOWN_VIEW, "none")),
        (_header(SeriesDescription="CAPACITY"), (UNKNOWN_VIEW, "none")),  # no substring match
        (_header(), (UNKNOWN_VIEW, "none")),
        # a name in ViewPosition is never echoed (it went to stdout and warnings); the next rules decide
        (_header(ViewPosition="DOE^JANE"), (UNKNOWN_VIEW, "none")),
        (_header(ViewPosition="JANE DOE", SeriesDescription="CHEST PA"), ("PA", "SeriesDescription")),
        # the posture added to a frontal projection: "no frontal image; views found: AP SUPINE x1" refused a study
        (_header(ViewPosition="ap  supine"), ("AP", "ViewPosition")),
        (_header(ViewPosition="PA ERECT"), ("PA", "ViewPosition")),
        (_header(ViewPosition="LORDOTIC"), ("LORDOTIC", "ViewPosition")),  # an angled view: not what it learnt
    ],
)
def test_view_rules(ds: Dataset, expected: tuple[str, str]) -> None:
    assert view_of(ds) == expected


def test_only_pa_and_ap_are_frontal() -> None:
    assert is_frontal("PA") and is_frontal("AP")
    assert not any(is_frontal(v) for v in ("LL", "RL", "LATERAL", "LLD", UNKNOWN_VIEW))
