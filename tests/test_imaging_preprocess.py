"""The torchvision-free open_clip eval transform against real torchvision outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from radtrt.imaging.preprocess import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    PreprocessConfig,
    center_crop_offsets,
    preprocess,
    resized_size,
)

GOLDEN = Path(__file__).parent / "golden" / "preprocess_golden.safetensors"


def _golden() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(GOLDEN), framework="pt") as handle:
        metadata = handle.metadata()
    return load_file(str(GOLDEN)), metadata


def test_matches_torchvision_golden() -> None:
    tensors, metadata = _golden()
    size = int(metadata["image_size"])
    assert metadata["rgb_first_identical"] == "true"
    cases = int(metadata["cases"])
    assert cases >= 3
    for i in range(cases):
        image = tensors[f"input_{i}"].numpy()
        expected = tensors[f"output_{i}"]
        ours = preprocess(image, size)
        assert ours.shape == expected.shape == (3, size, size)
        assert ours.dtype == torch.float32
        diff = (ours - expected).abs().max().item()
        assert diff <= 1 / 255, f"case {i} {image.shape}: max diff {diff}"
        assert diff < 1e-6, f"case {i} {image.shape}: expected exact agreement, got {diff}"


@pytest.mark.parametrize(
    ("hw", "size", "expected"),
    [((97, 131), 56, (56, 75)), ((131, 97), 56, (75, 56)), ((60, 60), 56, (56, 56)),
     ((2500, 3000), 518, (518, 621)), ((3001, 2999), 518, (518, 518))],
)
def test_resized_size_truncates_like_torchvision(hw: tuple[int, int], size: int,
                                                 expected: tuple[int, int]) -> None:
    assert resized_size(*hw, size) == expected


def test_center_crop_rounds_half_to_even() -> None:
    assert center_crop_offsets(75, 56, 56) == (10, 0)  # 9.5 -> 10
    assert center_crop_offsets(56, 61, 56) == (0, 2)  # 2.5 -> 2 (banker's rounding)


def test_default_is_llava_rad_518_with_clip_normalization() -> None:
    image = np.random.default_rng(0).integers(0, 256, (256, 200)).astype(np.uint8)
    out = preprocess(image)
    assert out.shape == (3, 518, 518) and out.dtype == torch.float32
    # channel c was normalized with its own mean/std: undoing it gives equal channels
    undone = [out[c] * OPENAI_CLIP_STD[c] + OPENAI_CLIP_MEAN[c] for c in range(3)]
    assert torch.allclose(undone[0], undone[1], atol=1e-6)
    assert torch.allclose(undone[0], undone[2], atol=1e-6)
    assert float(undone[0].min()) >= 0.0 and float(undone[0].max()) <= 1.0 + 1e-6


def test_grey_and_replicated_rgb_inputs_agree() -> None:
    grey = np.random.default_rng(1).integers(0, 256, (97, 131)).astype(np.uint8)
    rgb = np.asarray(Image.fromarray(grey).convert("RGB"))
    assert torch.equal(preprocess(grey, 56), preprocess(rgb, 56))


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError):
        preprocess(np.zeros((10, 10), np.uint16), 8)
    with pytest.raises(ValueError):
        preprocess(np.zeros((10, 10, 4), np.uint8), 8)
    with pytest.raises(ValueError):
        preprocess(np.zeros((10, 10), np.uint8), 8, interpolation="nearest")


def test_config_round_trips_through_json_and_applies() -> None:
    config = PreprocessConfig(image_size=56)
    restored = PreprocessConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config
    assert PreprocessConfig().to_dict() == {
        "image_size": 518, "mean": list(OPENAI_CLIP_MEAN), "std": list(OPENAI_CLIP_STD),
        "interpolation": "bicubic"}
    tensors, _ = _golden()
    image = tensors["input_0"].numpy()
    assert torch.equal(config(image), preprocess(image, 56))
    with pytest.raises(ValueError):
        PreprocessConfig(interpolation="bilinear")
