"""One ``nn.Module`` per stage whose ``forward(batch)`` returns the loss (what DDP wraps).

Each stage decides what trains: ``build_objective`` freezes everything else, so the optimizer,
DDP and the checkpoint all see one list of trainable parameters.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, ContextManager

import torch
import torch.nn.functional as F
from torch import nn

from radtrt.model.llava_rad import LlavaRad
from radtrt.training.batching import causal_lm_loss, multimodal_inputs, text_inputs
from radtrt.training.config import TrainConfig
from radtrt.training.data import normalize

if TYPE_CHECKING:
    from peft import PeftModel


class VisionClassifier(nn.Module):
    """Trunk pretraining: multi-label finding classification on LLaVA-Rad's selected hidden state.

    A linear head reads the flattened patch grid of that state, so side and region stay visible
    to it. (A per-token head pooled over the image, which would make each token name its finding,
    did not train in this setting: it stayed at the label priors.) Blocks after the selected layer
    (and the final norm) never influence LLaVA-Rad and stay frozen at their initial weights.
    """

    def __init__(self, llava: LlavaRad, label_names: list[str]) -> None:
        super().__init__()
        self.llava = llava
        self.label_names = list(label_names)
        cfg = llava.cfg
        self.head = nn.Linear(cfg.num_image_tokens * cfg.vision.embed_dim, len(label_names))
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def logits(self, pixels_u8: torch.Tensor) -> torch.Tensor:
        cfg = self.llava.cfg
        pixels = normalize(pixels_u8.to(self.head.weight.device), cfg.image_mean, cfg.image_std)
        feats = self.llava.vision_tower.select_features(pixels, cfg.mm_vision_select_layer,
                                                        cfg.mm_vision_select_feature)
        return self.head(feats.flatten(1))

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        logits = self.logits(batch["pixels"]).float()
        return F.binary_cross_entropy_with_logits(logits, batch["targets"].to(logits.device))


class TextLM(nn.Module):
    """Decoder pretraining on report text (the stand-in for the base LLM)."""

    def __init__(self, llava: LlavaRad) -> None:
        super().__init__()
        self.llava = llava

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        lm = self.llava.language_model
        return causal_lm_loss(lm, *text_inputs(lm, batch["input_ids"], batch["labels"]))


class MultimodalLM(nn.Module):
    """LLaVA-Rad's training forward: frozen trunk -> projector -> spliced prompt -> decoder loss.

    ``feature_cache`` holds the trunk's selected features per dataset index; the trunk is frozen
    in stages 1 and 2, so computing them once per run changes nothing but the time taken.
    """

    def __init__(self, llava: LlavaRad) -> None:
        super().__init__()
        self.llava = llava
        self.feature_cache: torch.Tensor | None = None

    def features(self, batch: dict[str, Any]) -> torch.Tensor:
        if self.feature_cache is not None:
            return self.feature_cache[batch["index"]]
        cfg = self.llava.cfg
        device = next(self.llava.vision_tower.parameters()).device
        with torch.no_grad():
            return self.llava.image_features(normalize(batch["pixels"].to(device), cfg.image_mean, cfg.image_std))

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        feats = self.features(batch)
        image_embeds = self.llava.mm_projector(feats.to(self.llava.mm_projector_dtype))
        return causal_lm_loss(self.llava.language_model,
                              *multimodal_inputs(self.llava, batch["input_ids"], batch["labels"], image_embeds))

    @torch.no_grad()
    def build_feature_cache(self, images_u8: torch.Tensor, autocast: ContextManager[Any] | None = None,
                            batch_size: int = 64) -> None:
        """``autocast``: the one the training steps run under. The features must be computed as a step would
        compute them (bf16 ones under bf16 autocast): fp32 ones, computed outside it, made the losses of a bf16
        run differ with and without the cache."""
        cfg = self.llava.cfg
        device = next(self.llava.vision_tower.parameters()).device
        was_training = self.llava.vision_tower.training
        self.llava.vision_tower.eval()
        with autocast if autocast is not None else contextlib.nullcontext():
            chunks = [self.llava.image_features(normalize(images_u8[i:i + batch_size].to(device), cfg.image_mean,
                                                          cfg.image_std))
                      for i in range(0, images_u8.shape[0], batch_size)]
        self.llava.vision_tower.train(was_training)
        self.feature_cache = torch.cat(chunks)


def build_objective(cfg: TrainConfig, llava: LlavaRad,
                    label_names: list[str] | None = None) -> tuple[nn.Module, "PeftModel | None"]:
    """The stage's loss module with only its trainable parameters requiring grad (+ the PEFT wrapper)."""
    llava.requires_grad_(False)
    peft_lm = None
    objective: nn.Module
    if cfg.stage == "vision":
        assert label_names is not None
        objective = VisionClassifier(llava, label_names)
        trunk = llava.vision_tower
        trunk.requires_grad_(True)
        for unused in [*trunk.blocks[used_trunk_blocks(llava):], trunk.norm]:
            unused.requires_grad_(False)
    elif cfg.stage == "lm":
        objective = TextLM(llava)
        llava.language_model.requires_grad_(True)
    else:
        objective = MultimodalLM(llava)
        if cfg.stage == "stage2":
            from radtrt.training.lora import apply_lora  # peft (and transformers) only where LoRA is used

            peft_lm = apply_lora(llava.language_model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
        llava.mm_projector.requires_grad_(True)
    return objective, peft_lm


def used_trunk_blocks(llava: LlavaRad) -> int:
    """How many trunk blocks the selected hidden state depends on."""
    return llava.cfg.mm_vision_select_layer % (llava.cfg.vision.depth + 1)


def trainable_parameters(objective: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in objective.named_parameters() if p.requires_grad]
