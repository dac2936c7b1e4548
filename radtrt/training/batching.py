"""From examples to decoder inputs: splice image embeddings, right-pad, mask, shifted loss.

Mirrors LLaVA's ``prepare_inputs_labels_for_multimodal``: the single image index is replaced by
the projected image embeddings, whose target positions are ``IGNORE_INDEX``; sequences are
right-padded with ignored targets and hidden keys. Positions count real tokens (``cumsum - 1``),
which equals ``arange`` for right padding, as Hugging Face's LLaMA uses. The loss is Hugging
Face's causal-LM loss: logits at ``t`` predict the target at ``t + 1``, mean over the targets of
the micro-batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from radtrt.model.decoder import LlamaForCausalLM, causal_mask
from radtrt.model.llava_rad import LlavaRad
from radtrt.model.prompt import IMAGE_TOKEN_INDEX
from radtrt.training.examples import IGNORE_INDEX


def right_pad(embeds: list[torch.Tensor], labels: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(embeds [B, T, H], labels [B, T], valid [B, T]) right-padded to the longest sequence."""
    length = max(e.shape[0] for e in embeds)
    out = embeds[0].new_zeros(len(embeds), length, embeds[0].shape[-1])
    target = torch.full((len(embeds), length), IGNORE_INDEX, dtype=torch.long, device=out.device)
    valid = torch.zeros(len(embeds), length, dtype=torch.bool, device=out.device)
    for i, (e, lab) in enumerate(zip(embeds, labels)):
        out[i, : e.shape[0]] = e
        target[i, : len(lab)] = torch.tensor(lab, dtype=torch.long, device=out.device)
        valid[i, : e.shape[0]] = True
    return out, target, valid


def splice_labels(input_ids: list[int], labels: list[int], n_image: int) -> list[int]:
    """Targets with the image index's one position widened to ``n_image`` ignored positions."""
    pos = input_ids.index(IMAGE_TOKEN_INDEX)
    return labels[:pos] + [IGNORE_INDEX] * n_image + labels[pos + 1:]


def multimodal_inputs(model: LlavaRad, input_ids: list[list[int]], labels: list[list[int]],
                      image_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Spliced, right-padded (embeds, targets, valid) for a batch with one image per example."""
    embeds = [model.embed_multimodal(ids, img) for ids, img in zip(input_ids, image_embeds)]
    targets = [splice_labels(ids, lab, image_embeds.shape[1]) for ids, lab in zip(input_ids, labels)]
    return right_pad(embeds, targets)


def text_inputs(lm: LlamaForCausalLM, input_ids: list[list[int]],
                labels: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    device = lm.lm_head.weight.device
    embeds = [lm.embed(torch.tensor(ids, dtype=torch.long, device=device)) for ids in input_ids]
    return right_pad(embeds, labels)


def causal_lm_loss(lm: LlamaForCausalLM, embeds: torch.Tensor, targets: torch.Tensor,
                   valid: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the targets; 0 (with a graph) when there are none."""
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    mask = causal_mask(valid, torch.arange(valid.shape[1], device=valid.device))
    logits = lm(embeds, positions, mask)
    shift_logits, shift_targets = logits[:, :-1].float(), targets[:, 1:]
    if not bool((shift_targets != IGNORE_INDEX).any()):
        return shift_logits.sum() * 0.0  # every target ignored (e.g. tokenization mismatch): no update
    return F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_targets.reshape(-1),
                           ignore_index=IGNORE_INDEX)
