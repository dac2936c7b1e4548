"""Activation statistics from forward hooks on the PyTorch model, over calibration samples.

Vision: every ``nn.Linear``/``nn.Conv2d`` of the trunk and the projector gets per-channel input and
output absolute maxima over all patches of all samples (the per-tensor range is their max). The
input maxima are the vision Q/DQ graph's activation ranges (``radtrt.exporter.int8_vision``).

Decoder: the statistics SmoothQuant and INT8 KV-cache scales need, in ``ActivationStats`` form
(``radtrt.exporter.quant``): per-input-channel absmax of every linear layer's input and per-output-
channel absmax of its output, keyed by the Hugging Face module name (``model.layers.0.self_attn.
q_proj``, ``lm_head``). They are collected on the sequences the decoder really sees: the v1 prompt
with the image embeddings spliced in, followed by the manifest's findings as the assistant answer
(``... ASSISTANT: {findings}</s>``, as stage-2 training feeds it) when the sample has findings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from radtrt.calibration.samples import Sample
from radtrt.errors import fail
from radtrt.exporter.quant import ActivationStats
from radtrt.model.decoder import causal_mask
from radtrt.model.llava_rad import LlavaRad
from radtrt.model.prompt import STOP_STR, build_prompt, build_query, tokenizer_image_token
from radtrt.model.tokenizer import LlamaSPTokenizer


@dataclass
class AbsMax:
    """Running per-channel absolute maxima (channels on the last dimension) of module inputs/outputs."""

    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)

    @staticmethod
    def _update(table: dict[str, torch.Tensor], name: str, x: torch.Tensor, channel_dim: int) -> None:
        x = x.detach().float()
        x = x.movedim(channel_dim, -1).reshape(-1, x.shape[channel_dim])
        amax = x.abs().amax(dim=0)
        table[name] = torch.maximum(table[name], amax) if name in table else amax

    def hook(self, name: str, channel_dim: int = -1) -> Callable[..., None]:
        def fn(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            self._update(self.inputs, name, args[0], channel_dim)
            self._update(self.outputs, name, output, channel_dim)
        return fn


class _Hooks:
    """Forward hooks on the given modules for the duration of a ``with`` block."""

    def __init__(self, modules: dict[str, nn.Module], stats: AbsMax) -> None:
        self.modules, self.stats, self.handles = modules, stats, []

    def __enter__(self) -> AbsMax:
        for name, module in self.modules.items():
            channel_dim = 1 if isinstance(module, nn.Conv2d) else -1
            self.handles.append(module.register_forward_hook(self.stats.hook(name, channel_dim)))
        return self.stats

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()


def _linears(root: nn.Module, prefix: str = "") -> dict[str, nn.Module]:
    return {prefix + name: m for name, m in root.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def observed_modules(model: LlavaRad) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
    """The modules statistics are collected on, by the names the calibration file stores: (vision tower and
    projector, decoder)."""
    vision = {**_linears(model.vision_tower, "vision_tower."), **_linears(model.mm_projector, "mm_projector.")}
    decoder = {n: m for n, m in _linears(model.language_model).items() if isinstance(m, nn.Linear)}
    return vision, decoder


def channels(module: nn.Module, side: str) -> int:
    """How many per-channel values a module's ``side`` ('input' / 'output') statistics hold."""
    if isinstance(module, nn.Conv2d):
        return module.in_channels if side == "input" else module.out_channels
    return module.in_features if side == "input" else module.out_features


def answer_ids(tokenizer: LlamaSPTokenizer, indication: str | None, findings: str | None,
               template: str = "v1") -> list[int]:
    """Prompt ids, with ``findings</s>`` as the assistant's answer when given (the training conversation)."""
    prompt = build_prompt(build_query(indication), template)
    if findings:
        prompt = f"{prompt} {findings}{STOP_STR}"
    return tokenizer_image_token(prompt, tokenizer.encode, tokenizer.bos_token_id)


@dataclass
class CollectedStats:
    vision: AbsMax
    decoder: ActivationStats
    tokens: int  # decoder positions the statistics cover
    with_findings: int  # samples whose sequence included the findings


@torch.no_grad()
def collect_stats(model: LlavaRad, tokenizer: LlamaSPTokenizer, samples: list[Sample], *,
                  description: str = "", on_sample: Callable[[int], None] | None = None) -> CollectedStats:
    """Run every sample through the fp32 model (vision, then the decoder over the multimodal sequence)."""
    model = model.eval()
    vision_modules, decoder_modules = observed_modules(model)
    vision, decoder = AbsMax(), AbsMax()
    tokens = with_findings = 0
    for i, sample in enumerate(samples):
        with _Hooks(vision_modules, vision):
            image_embeds = model.encode_images(sample.pixels[None].to(model.dtype))[0]
        ids = answer_ids(tokenizer, sample.ref.indication, sample.ref.findings, model.cfg.conv_template)
        embeds = model.embed_multimodal(ids, image_embeds)[None]
        length = embeds.shape[1]
        limit = model.cfg.decoder.max_position_embeddings
        if length > limit:  # positions the model never sees at inference would skew the statistics
            fail(f"calibration sample {i + 1} of {len(samples)}: the prompt with its image and findings takes "
                 f"{length} positions, beyond the model's {limit}; shorten its indication or findings, or leave it out")
        positions = torch.arange(length)[None]
        mask = causal_mask(torch.ones(1, length, dtype=torch.bool), torch.arange(length))
        with _Hooks(decoder_modules, decoder):
            model.language_model(embeds, positions, mask)
        tokens += length
        with_findings += bool(sample.ref.findings)
        if on_sample:
            on_sample(i + 1)
    stats = ActivationStats(decoder.inputs, decoder.outputs, description)
    return CollectedStats(vision, stats, tokens, with_findings)
