"""The open_clip eval transform LLaVA-Rad used, without torchvision.

open_clip's eval transform for BiomedCLIP-CXR is, on a PIL image::

    Resize(518, BICUBIC) -> CenterCrop(518) -> convert("RGB") -> ToTensor() -> Normalize(mean, std)

torchvision is not a runtime dependency of radtrt (it pins torch and is large), so each step is
re-implemented here with the exact arithmetic torchvision uses on PIL images, and checked
against real torchvision outputs committed in ``tests/golden/preprocess_golden.safetensors``
(made by ``tools/make_golden_preprocess.py``):

* Resize(int): the short side becomes ``size`` and the long side ``int(size * long / short)``
  (truncation, as ``torchvision.transforms.functional._compute_resized_output_size``), resampled
  by PIL's own ``Image.resize(..., BICUBIC)`` (antialiased; torchvision hands PIL images to PIL).
* CenterCrop: offsets ``int(round((h - size) / 2.0))`` with Python's round (half to even).
* RGB: grey replicated to 3 channels (PIL ``convert("RGB")``); doing it after the crop, as
  open_clip does, gives the same pixels as converting first, because PIL resamples each channel
  independently with the same 8-bit rounding.
* ToTensor: uint8 HWC -> float32 CHW divided by 255; Normalize: ``(x - mean) / std`` in float32.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

OPENAI_CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
LLAVA_RAD_IMAGE_SIZE = 518
_INTERPOLATIONS = {"bicubic": Image.Resampling.BICUBIC}


@dataclass(frozen=True)
class PreprocessConfig:
    """The constants of the transform (a model's: ``LlavaRadConfig.preprocessing``)."""

    image_size: int = LLAVA_RAD_IMAGE_SIZE
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        if self.image_size < 1:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("mean and std need 3 values each, std > 0")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"unsupported interpolation {self.interpolation!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for a bundle manifest."""
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessConfig:
        """Inverse of :meth:`to_dict` (tuples restored so configs compare equal)."""
        return cls(
            image_size=int(data["image_size"]),
            mean=tuple(float(v) for v in data["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in data["std"]),  # type: ignore[arg-type]
            interpolation=str(data.get("interpolation", "bicubic")),
        )

    def __call__(self, pixels_u8: np.ndarray) -> torch.Tensor:
        """Apply the transform with these constants."""
        return preprocess(pixels_u8, self.image_size, self.mean, self.std, self.interpolation)


def resized_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(new_h, new_w) exactly as torchvision's Resize(size: int) computes it."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def center_crop_offsets(height: int, width: int, size: int) -> tuple[int, int]:
    """(top, left) of torchvision's CenterCrop on an image at least ``size`` on each side."""
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


def preprocess(
    pixels_u8: np.ndarray,
    image_size: int = LLAVA_RAD_IMAGE_SIZE,
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN,
    std: tuple[float, float, float] = OPENAI_CLIP_STD,
    interpolation: str = "bicubic",
) -> torch.Tensor:
    """(H, W) or (H, W, 3) uint8 -> normalized float32 tensor [3, image_size, image_size]."""
    if pixels_u8.dtype != np.uint8 or pixels_u8.ndim not in (2, 3):
        raise ValueError(f"expected uint8 (H, W) or (H, W, 3), got {pixels_u8.dtype} "
                         f"{pixels_u8.shape}")
    if pixels_u8.ndim == 3 and pixels_u8.shape[2] != 3:
        raise ValueError(f"expected 3 channels, got shape {pixels_u8.shape}")
    if interpolation not in _INTERPOLATIONS:
        raise ValueError(f"unsupported interpolation {interpolation!r}")
    image = Image.fromarray(np.ascontiguousarray(pixels_u8))
    height, width = pixels_u8.shape[:2]
    new_h, new_w = resized_size(height, width, image_size)
    if (new_h, new_w) != (height, width):
        image = image.resize((new_w, new_h), _INTERPOLATIONS[interpolation])
    top, left = center_crop_offsets(new_h, new_w, image_size)
    image = image.crop((left, top, left + image_size, top + image_size)).convert("RGB")
    chw = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()
    tensor = chw.to(dtype=torch.float32).div(255)
    mean_t = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return tensor.sub_(mean_t).div_(std_t)
