"""A freshly initialised LLaVA-Rad-architecture model to train from scratch (toolkit layout).

Architectures: the model presets of ``radtrt.model.config`` plus ``phantom``, the embedded
default model's size: a 4-block, 128-wide DINOv2-style trunk at 112 px (patch 14, 64 image
tokens) and a 4-layer, 192-wide LLaMA. Its trunk is described to open_clip as
``vit_small_patch14_dinov2`` with ``radtrt_trunk_overrides``, so the release export works. The
decoder's vocabulary is the tokenizer's size.

Initialisation follows the upstream models: LLaMA linears and embeddings ~ N(0, 0.02) (Hugging
Face's ``initializer_range``), ViT linears truncated normal 0.02 with zero biases, position
embedding and class token N(0, 0.02) / 1e-6 as timm does; LayerScale starts at the config's
``init_values`` (0.1 for the small trunk, which must learn quickly from scratch).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from radtrt.errors import fail
from radtrt.model.config import LlavaRadConfig, preset
from radtrt.model.llava_rad import LlavaRad
from radtrt.model.loading import LoadedModel
from radtrt.model.memory import available_bytes
from radtrt.model.tokenizer import LlamaSPTokenizer

ARCHS = ("phantom", "tiny", "mid", "llava-rad")  # the model presets (a test keeps them so), in the help's order


def arch_config(arch: str, vocab_size: int) -> LlavaRadConfig:
    base = preset(arch)
    return dataclasses.replace(base, decoder=dataclasses.replace(base.decoder, vocab_size=vocab_size))


@torch.no_grad()
def init_weights(model: LlavaRad, seed: int) -> LlavaRad:
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            if any(module is m for m in model.vision_tower.modules()):
                nn.init.trunc_normal_(module.weight, std=0.02, a=-0.04, b=0.04, generator=gen)
            else:
                module.weight.normal_(0.0, 0.02, generator=gen)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, 0.02, generator=gen)
    vt = model.vision_tower
    vt.pos_embed.normal_(0.0, 0.02, generator=gen)
    vt.cls_token.normal_(0.0, 1e-6, generator=gen)
    return model


def fresh_model(arch: str, tokenizer: LlamaSPTokenizer, seed: int = 0, name: str | None = None) -> LoadedModel:
    cfg = arch_config(arch, tokenizer.vocab_size)
    with torch.device("meta"):  # counted without allocating
        numel = sum(p.numel() for p in LlavaRad(cfg).parameters())
    # the fp32 weights and a quarter more; measured for 'train init --arch mid' (245M parameters, 0.98 GB of
    # weights): 1.13 GB of peak RSS over a process that has imported torch (1.35 GB against 0.23 GB), the save
    # included; safetensors writes without a second copy of the weights
    need, have = int(1.25 * 4 * numel), available_bytes()
    if need > have:  # the allocator's RuntimeError, or the OOM killer, otherwise
        fail(f"a fresh '{arch}' model needs about {need / 1e9:.1f} GB of memory to make and save; this host has "
             f"{have / 1e9:.1f} GB available")
    model = init_weights(LlavaRad(cfg), seed)
    return LoadedModel(model, tokenizer, name or f"{arch}-init", {"layout": "radtrt-init", "arch": arch, "seed": seed})
