"""LoRA on the decoder with PEFT, and its weights in the names the released adapter files use.

LLaVA-Rad's stage 2 wraps the LLaMA model with ``get_peft_model`` before the vision modules
exist, so ``find_all_linear_names`` finds exactly the decoder's linear layers minus ``lm_head``
(q, k, v, o, gate, up, down). Here PEFT wraps radtrt's decoder, whose parameter names match
Hugging Face's, so ``get_peft_model_state_dict`` yields the released adapter's key names
(``base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight``) unchanged.

Merging uses ``radtrt.model.checkpoints.merge_lora``, the function the release loader merges
with, so a merged model and its release export give bit-identical weights.
"""

from __future__ import annotations

from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from torch import nn

from radtrt.errors import fail
from radtrt.model import checkpoints as ck
from radtrt.model.decoder import LlamaForCausalLM
from radtrt.model.release import adapter_config_json


def find_all_linear_names(model: nn.Module) -> list[str]:
    """The released ``find_all_linear_names``: last name component of every Linear, minus lm_head."""
    names = {name.split(".")[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    names.discard("lm_head")
    return sorted(names)


def apply_lora(lm: LlamaForCausalLM, r: int, alpha: int, dropout: float) -> PeftModel:
    """Inject LoRA layers into ``lm`` in place; only the LoRA weights stay trainable in it.

    A rank above a layer's smaller side adds parameters without adding rank, and a huge one only
    surfaces as an allocation failure, so it is refused here, before the run folder is written.
    """
    targets = find_all_linear_names(lm)
    max_rank = min(min(m.in_features, m.out_features) for name, m in lm.named_modules()
                   if isinstance(m, nn.Linear) and name.split(".")[-1] in targets)
    if r > max_rank:
        fail(f"lora_r {r} is above the rank of this decoder's smallest linear layer ({max_rank})")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                        bias="none")
    return get_peft_model(lm, config)


def adapter_state(peft_lm: PeftModel) -> dict[str, torch.Tensor]:
    """LoRA A/B weights with PEFT's saved names (what ``adapter_model.bin`` holds)."""
    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(peft_lm).items()}


def adapter_config(peft_lm: PeftModel, base_name: str) -> dict[str, Any]:
    cfg = peft_lm.peft_config["default"]
    return adapter_config_json(int(cfg.r), int(cfg.lora_alpha), float(cfg.lora_dropout), base_name,
                               tuple(sorted(cfg.target_modules)))


def base_decoder_state(lm: nn.Module) -> dict[str, torch.Tensor]:
    """The decoder's own weights (Hugging Face names) underneath injected LoRA layers."""
    out = {}
    for key, value in lm.state_dict().items():
        if "lora_" in key:
            continue
        out[key.replace(".base_layer.", ".")] = value.detach().cpu().clone()
    return out


def merged_decoder_state(peft_lm: PeftModel, base_name: str = "base") -> dict[str, torch.Tensor]:
    """Base weights with the LoRA update merged, exactly as the release loader merges it."""
    base = base_decoder_state(peft_lm.get_base_model())
    return ck.merge_lora(base, adapter_state(peft_lm), adapter_config(peft_lm, base_name))
