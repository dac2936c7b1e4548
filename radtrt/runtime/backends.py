"""Compute backends: each turns pixels into image embeddings and prompt embeddings into tokens.

Everything around them (study reading, preprocessing, prompt, decoding of text) is shared, so a
backend differs from the PyTorch reference only in the three compute stages.
"""

from __future__ import annotations

from typing import Protocol

import torch

from radtrt.errors import fail
from radtrt.model.generate import Generation, greedy_generate
from radtrt.model.llava_rad import LlavaRad

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Backend(Protocol):
    name: str
    precision: str

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor: ...

    def embed_prompt(self, input_ids: list[int], image_embeds: torch.Tensor) -> torch.Tensor: ...

    def generate(self, embeds: list[torch.Tensor], *, max_new_tokens: int, eos_token_id: int) -> Generation: ...


class TorchBackend:
    """The reference: the radtrt PyTorch model, eager."""

    name = "torch"

    def __init__(self, model: LlavaRad, device: str = "cpu") -> None:
        self.model = model
        self.device = device
        self.precision = {v: k for k, v in DTYPES.items()}.get(model.dtype, str(model.dtype))

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_images(pixel_values.to(self.device))

    @torch.no_grad()
    def embed_prompt(self, input_ids: list[int], image_embeds: torch.Tensor) -> torch.Tensor:
        return self.model.embed_multimodal(input_ids, image_embeds)

    def generate(self, embeds: list[torch.Tensor], *, max_new_tokens: int, eos_token_id: int) -> Generation:
        return greedy_generate(self.model.language_model, embeds, eos_token_id=eos_token_id,
                               max_new_tokens=max_new_tokens)


def resolve_device(device: str) -> str:
    if device not in ("cpu", "cuda"):
        fail(f"unknown device '{device}' (cpu or cuda)")
    if device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda was asked for, but PyTorch sees no CUDA GPU here (see 'radtrt doctor')")
    return device


def choose_backend(requested: str, *, bundle: bool) -> tuple[str, str]:
    """(backend, why). Only the PyTorch reference exists in this version; others say so clearly."""
    if requested in ("auto", "torch"):
        why = "asked for" if requested == "torch" else "the only backend in this radtrt version"
        if requested == "auto" and bundle:
            fail("--bundle needs the ONNX Runtime or TensorRT backend, which this radtrt version does not have yet")
        return "torch", why
    if requested in ("onnxruntime", "tensorrt"):
        fail(f"backend '{requested}' is not available in this radtrt version yet; use --backend torch")
    fail(f"unknown backend '{requested}' (auto, torch, onnxruntime, tensorrt)")
