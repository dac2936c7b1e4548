"""Shared fixtures: a tiny LLaVA-Rad in the official release layout, built by the tests themselves."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from radtrt.model.config import LlavaRadConfig, preset
from radtrt.model.llava_rad import LlavaRad
from radtrt.model.release import adapter_config_json, write_base_lm, write_release
from radtrt.model.tiny import random_model, train_tiny_tokenizer
from radtrt.model.tokenizer import LlamaSPTokenizer

LORA_R, LORA_ALPHA = 4, 8


@dataclass
class TinyRelease:
    release_dir: Path
    base_dir: Path
    cfg: LlavaRadConfig
    model: LlavaRad  # the weights before LoRA: vision + projector + base decoder
    tokenizer: LlamaSPTokenizer
    lora: dict[str, torch.Tensor]


def random_lora(cfg: LlavaRadConfig, seed: int = 7) -> dict[str, torch.Tensor]:
    """PEFT-named LoRA weights with a non-zero B so merging visibly changes the decoder."""
    gen = torch.Generator().manual_seed(seed)
    d, inter = cfg.decoder.hidden_size, cfg.decoder.intermediate_size
    kv = cfg.decoder.num_key_value_heads * cfg.decoder.head_dim
    shapes = {"self_attn.q_proj": (d, d), "self_attn.k_proj": (kv, d), "self_attn.v_proj": (kv, d),
              "self_attn.o_proj": (d, d), "mlp.gate_proj": (inter, d), "mlp.up_proj": (inter, d),
              "mlp.down_proj": (d, inter)}
    lora = {}
    for layer in range(cfg.decoder.num_hidden_layers):
        for module, (out_f, in_f) in shapes.items():
            prefix = f"base_model.model.model.layers.{layer}.{module}"
            lora[f"{prefix}.lora_A.weight"] = torch.randn(LORA_R, in_f, generator=gen) * 0.3
            lora[f"{prefix}.lora_B.weight"] = torch.randn(out_f, LORA_R, generator=gen) * 0.3
    return lora


def build_tiny_release(root: Path, seed: int = 0) -> TinyRelease:
    cfg = preset("tiny")
    tokenizer = train_tiny_tokenizer()
    model = random_model(cfg, seed=seed)
    lora = random_lora(cfg)
    base_dir = write_base_lm(root / "base-lm", cfg, model.language_model.state_dict(), tokenizer)
    extra = {"text.transformer.pooler.dense.weight": torch.ones(2, 2), "logit_scale": torch.tensor(4.6)}
    release_dir = write_release(
        root / "llava-rad", cfg, trunk=model.vision_tower.state_dict(), projector=model.mm_projector.state_dict(),
        lora=lora, adapter_config=adapter_config_json(LORA_R, LORA_ALPHA, 0.05, "tiny-base"), base_name="tiny-base",
        extra_open_clip=extra)
    return TinyRelease(release_dir, base_dir, cfg, model, tokenizer, lora)


@pytest.fixture(scope="session")
def tiny_release(tmp_path_factory: pytest.TempPathFactory) -> TinyRelease:
    return build_tiny_release(tmp_path_factory.mktemp("tiny-release"))
