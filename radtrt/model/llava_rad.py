"""LLaVA-Rad as one module: trunk -> selected hidden state -> projector -> LLaMA over spliced embeddings."""

from __future__ import annotations

import torch
from torch import nn

from radtrt.errors import fail
from radtrt.model.config import LlavaRadConfig
from radtrt.model.decoder import LlamaForCausalLM
from radtrt.model.projector import build_projector
from radtrt.model.prompt import IMAGE_TOKEN_INDEX
from radtrt.model.vision import VisionTransformer


class LlavaRad(nn.Module):
    def __init__(self, cfg: LlavaRadConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision_tower = VisionTransformer(cfg.vision)
        self.mm_projector = build_projector(cfg.projector_type, cfg.vision.embed_dim, cfg.decoder.hidden_size)
        self.language_model = LlamaForCausalLM(cfg.decoder)

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.lm_head.weight.dtype

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Trunk features LLaVA-Rad selects (before the projector), ``[B, N, embed_dim]``."""
        vt_dtype = self.vision_tower.patch_embed.proj.weight.dtype
        return self.vision_tower.select_features(pixel_values.to(vt_dtype), self.cfg.mm_vision_select_layer,
                                                 self.cfg.mm_vision_select_feature)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected image embeddings ``[B, N, hidden]``; the trunk never gets gradients (frozen)."""
        with torch.no_grad():
            feats = self.image_features(pixel_values)
        return self.mm_projector(feats.to(self.mm_projector_dtype))

    @property
    def mm_projector_dtype(self) -> torch.dtype:
        return next(self.mm_projector.parameters()).dtype

    def embed_multimodal(self, input_ids: list[int], image_embeds: torch.Tensor) -> torch.Tensor:
        """Token embeddings with the image embeddings in place of the single ``<image>`` index."""
        if input_ids.count(IMAGE_TOKEN_INDEX) != 1:
            fail(f"the prompt must contain exactly one <image> placeholder, found {input_ids.count(IMAGE_TOKEN_INDEX)}")
        pos = input_ids.index(IMAGE_TOKEN_INDEX)
        device = image_embeds.device
        before = torch.tensor(input_ids[:pos], dtype=torch.long, device=device)
        after = torch.tensor(input_ids[pos + 1:], dtype=torch.long, device=device)
        embed = self.language_model.embed
        return torch.cat([embed(before), image_embeds.to(self.dtype), embed(after)], dim=0)
