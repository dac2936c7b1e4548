"""Write tests/golden/preprocess_golden.safetensors with real torchvision outputs.

radtrt re-implements the open_clip eval transform without torchvision
(radtrt/imaging/preprocess.py); this one-off records what torchvision itself produces so the test
suite can prove the two agree. It needs torchvision, which radtrt must not depend on, so run it
from a separate environment:

    python -m venv /work/tvvenv
    /work/tvvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 pillow numpy safetensors
    /work/tvvenv/bin/python tools/make_golden_preprocess.py

Stored per case i: ``input_i`` (uint8 H x W grey) and ``output_i`` (open_clip order: resize, crop,
then RGB). The script also runs each case converted to RGB *before* the transform, as LLaVA-Rad's
data loader does (``Image.open(...).convert("RGB")``), and refuses to write unless both orders
give identical tensors; the metadata records that check.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import PIL
import safetensors
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file
from torchvision import transforms
from torchvision.transforms import InterpolationMode

SIZE = 56
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
SHAPES = [(97, 131), (131, 97), (60, 60), (56, 200), (56, 61)]
# (H, W): landscape, portrait, square, short side already 56, crop offset 2.5 (rounds to 2)


def synthetic_image(height: int, width: int, seed: int) -> np.ndarray:
    """A deterministic grey image: diagonal gradient, a dark disc, and uniform noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    image = 40 + 150 * (yy / max(height - 1, 1)) * 0.6 + 150 * (xx / max(width - 1, 1)) * 0.4
    disc = (yy - height * 0.4) ** 2 + (xx - width * 0.55) ** 2 < (min(height, width) * 0.25) ** 2
    image[disc] -= 60
    image += rng.uniform(-25, 25, size=image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def open_clip_eval(size: int) -> transforms.Compose:
    """open_clip's eval transform (resize shortest edge, center crop, RGB, tensor, normalize)."""
    return transforms.Compose([
        transforms.Resize(size, interpolation=InterpolationMode.BICUBIC),
        transforms.CenterCrop(size),
        lambda image: image.convert("RGB"),
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = Path(__file__).resolve().parents[1] / "tests/golden/preprocess_golden.safetensors"
    parser.add_argument("-o", "--output", type=Path, default=default_out)
    args = parser.parse_args()

    transform = open_clip_eval(SIZE)
    tensors: dict[str, torch.Tensor] = {}
    for i, (height, width) in enumerate(SHAPES):
        grey = synthetic_image(height, width, seed=i)
        tensors[f"input_{i}"] = torch.from_numpy(grey)
        output = transform(Image.fromarray(grey)).contiguous()
        rgb_first = transform(Image.fromarray(grey).convert("RGB"))
        if not torch.equal(output, rgb_first):
            raise SystemExit(f"case {i}: grey-then-RGB and RGB-first outputs differ")
        tensors[f"output_{i}"] = output
    metadata = {
        "image_size": str(SIZE),
        "mean": repr(MEAN),
        "std": repr(STD),
        "cases": str(len(SHAPES)),
        "rgb_first_identical": "true",
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pillow": PIL.__version__,
        "safetensors": safetensors.__version__,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(args.output), metadata=metadata)
    print(f"wrote {args.output} ({args.output.stat().st_size} bytes, {len(SHAPES)} cases)")


if __name__ == "__main__":
    main()
