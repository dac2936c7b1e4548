"""Compute backends: each turns pixels into image embeddings and prompt embeddings into tokens.

Everything around them (study reading, preprocessing, prompt, decoding of text) is shared, so a
backend differs from the PyTorch reference only in the three compute stages.
"""

from __future__ import annotations

import functools
from typing import Any, Protocol

import torch

from radtrt.errors import fail
from radtrt.model.generate import Generation, check_positions, clock, greedy_generate
from radtrt.model.llava_rad import LlavaRad

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PRECISION_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


class Backend(Protocol):
    name: str
    precision: str

    @property
    def weights_id(self) -> str:
        """The weights' fingerprint at float16 resolution (``bundle_fingerprint``): one id for a model and every
        bundle exported from it, so an SR says which weights wrote it whatever the backend."""

    def check_length(self, prompt_length: int, max_new_tokens: int, *,
                     shorten: tuple[str, int] | None = None) -> None:
        """Refuse a prompt (image tokens included) plus ``max_new_tokens`` this backend cannot run, in the words
        its ``generate`` would use, before any study is read; ``shorten``: what the prompt can be shortened by, and
        its length without it, for the remedy (``check_positions``)."""

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor: ...

    def embed_prompt(self, input_ids: list[int], image_embeds: torch.Tensor) -> Any:
        """Spliced ``[L, H]`` embeddings, or a backend-specific prompt (TensorRT-LLM's prompt table)."""

    def generate(self, embeds: list[Any], *, max_new_tokens: int, eos_token_id: int,
                 keep_logits: bool = False) -> Generation: ...


class TorchBackend:
    """The reference: the radtrt PyTorch model, eager."""

    name = "torch"

    def __init__(self, model: LlavaRad, device: str = "cpu") -> None:
        self.model = model
        self.device = device
        self.precision = PRECISION_NAMES.get(model.dtype, str(model.dtype))
        # float16/bfloat16 sums come out of other kernels at other batch shapes, and a study's report changed with
        # --batch-size (image embeddings 0.03 apart, a different report from the first token): each runs alone,
        # as a SmoothQuant bundle's studies do. float32 gets the same tokens batched (tests).
        self.per_study = model.dtype != torch.float32

    @functools.cached_property
    def weights_id(self) -> str:
        from radtrt.exporter.bundle import bundle_fingerprint

        return bundle_fingerprint(self.model)

    def check_length(self, prompt_length: int, max_new_tokens: int, *,
                     shorten: tuple[str, int] | None = None) -> None:
        check_positions(prompt_length, max_new_tokens, self.model.language_model.cfg.max_position_embeddings,
                        shorten=shorten)

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pixel_values = pixel_values.to(self.device)
        embeds = (torch.cat([self.model.encode_images(p[None]) for p in pixel_values]) if self.per_study else
                  self.model.encode_images(pixel_values))
        clock(embeds.device)  # the pipeline times this stage: wait for the device
        return embeds

    @torch.no_grad()
    def embed_prompt(self, input_ids: list[int], image_embeds: torch.Tensor) -> torch.Tensor:
        return self.model.embed_multimodal(input_ids, image_embeds)

    def generate(self, embeds: list[torch.Tensor], *, max_new_tokens: int, eos_token_id: int,
                 keep_logits: bool = False) -> Generation:
        def run(rows: list[torch.Tensor]) -> Generation:
            return greedy_generate(self.model.language_model, rows, eos_token_id=eos_token_id,
                                   max_new_tokens=max_new_tokens, keep_logits=keep_logits)

        if self.per_study and len(embeds) > 1:
            return Generation.merged(len(embeds), [([i], run([e])) for i, e in enumerate(embeds)],
                                     keep_logits=keep_logits)
        return run(embeds)


def resolve_device(device: str) -> str:
    if device not in ("cpu", "cuda"):
        fail(f"unknown device '{device}' (cpu or cuda)")
    if device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda was asked for, but PyTorch sees no CUDA GPU here (see 'radtrt doctor')")
    return device


def choose_backend(requested: str, *, bundle: bool, model: bool, ort_providers: list[str],
                   trt_ready: bool = False, cpu: bool = False, gpu_here: bool = True,
                   trt_unusable: str | None = None) -> tuple[str, str]:
    """(backend, why): TensorRT > ONNX Runtime (CUDA, then CPU) > torch, among what the inputs allow.

    ``trt_ready``: the bundle holds a vision engine and a TensorRT-LLM engine built for this GPU.
    ``cpu``: ``--device cpu`` was given, which TensorRT cannot honour. ``gpu_here``: an NVIDIA GPU was found
    (without one, "no engines for this host" read as if building some would help). ``trt_unusable``: why the
    engines the bundle holds for this GPU cannot run it here (said in place of "holds no engines", which was false).
    """
    if requested in ("tensorrt", "onnxruntime"):
        if not bundle:
            fail(f"--backend {requested} needs --bundle (what 'radtrt export' wrote)")
        if requested == "tensorrt" and cpu:
            fail("--device cpu: the tensorrt backend runs on the GPU; drop --device cpu, or pass --backend "
                 "onnxruntime to run the bundle on the CPU")
        return requested, "asked for"
    if requested == "torch":
        if bundle and not model:  # else the embedded default model would run in place of the bundle's
            fail("--backend torch runs PyTorch weights (--model DIR), not a bundle: drop --backend torch to run "
                 "the bundle, or pass --model DIR in place of --bundle")
        return "torch", "asked for"
    if requested != "auto":
        fail(f"unknown backend '{requested}' (auto, torch, onnxruntime, tensorrt)")
    if bundle:
        if cpu:
            return "onnxruntime", "--device cpu"
        if trt_ready:
            return "tensorrt", "the bundle has TensorRT and TensorRT-LLM engines built for this GPU"
        gpu = "CUDAExecutionProvider" in ort_providers
        if not gpu_here and not gpu:
            return "onnxruntime", "no CUDA GPU visible here, so ONNX Runtime on the CPU"
        return "onnxruntime", ((f"{trt_unusable}; " if trt_unusable else "the bundle holds no TensorRT vision engine "
                                "and TensorRT-LLM engine pair for this host; ")
                               + ("ONNX Runtime has CUDA" if gpu else "ONNX Runtime on the CPU"))
    if model:
        return "torch", "no --bundle given, so the PyTorch reference runs the model"
    return "torch", "default model on the PyTorch reference"
