"""Targets are masked as LLaVA-Rad's train.py masks them, and the loss is Hugging Face's causal-LM loss."""

from __future__ import annotations

import pytest
import torch
import transformers

from radtrt.model.config import preset
from radtrt.model.prompt import IMAGE_TOKEN_INDEX, SYSTEM_V1, build_prompt, build_query, tokenizer_image_token
from radtrt.model.tiny import random_model, train_tiny_tokenizer
from radtrt.model.tokenizer import LlamaSPTokenizer
from radtrt.training.batching import causal_lm_loss, multimodal_inputs, splice_labels
from radtrt.training.examples import IGNORE_INDEX, build_example, v1_conversation

FINDINGS = "The heart is enlarged. There is a small left pleural effusion. No pneumothorax."


@pytest.fixture(scope="module")
def tok() -> LlamaSPTokenizer:
    return train_tiny_tokenizer()


def _targets(labels: list[int]) -> list[int]:
    return [t for t in labels if t != IGNORE_INDEX]


@pytest.mark.parametrize("indication", [None, "Cough and fever.\nRule out pneumonia."])
def test_v1_targets_are_the_answer_and_the_stop_token(tok: LlamaSPTokenizer, indication: str | None) -> None:
    ex = build_example(tok, "v1", FINDINGS, indication, 2048)
    assert not ex.mismatch and len(ex.labels) == len(ex.input_ids)
    answer = _targets(ex.labels)
    assert answer[-1] == tok.eos_token_id and tok.decode(answer) == FINDINGS
    first = ex.labels.index(answer[0])
    assert all(label == IGNORE_INDEX for label in ex.labels[:first])  # BOS, system, user turn, "ASSISTANT:"
    assert ex.labels[first:] == ex.input_ids[first:]  # contiguous: the answer tokens and </s>
    assert tok.decode([i for i in ex.input_ids[:first] if i >= 0]).endswith("ASSISTANT:")
    assert ex.input_ids.count(IMAGE_TOKEN_INDEX) == 1
    conversation = v1_conversation(indication, FINDINGS)
    query = build_query(indication)
    assert conversation == f"{SYSTEM_V1} USER: <image>\n{query} ASSISTANT: {FINDINGS}</s>"
    assert indication is None or "fever. Rule out" in query  # the released loaders' newline -> space
    # what infer / train eval / calibration prompt with is the prefix the model was trained under: newlines
    # were spaces in training only, so a hard-wrapped indication met a prompt the model never saw
    assert ex.input_ids[:first] == tokenizer_image_token(build_prompt(query, "v1"), tok.encode, tok.bos_token_id)


def test_v1_tokenization_mismatch_ignores_everything(tok: LlamaSPTokenizer) -> None:
    ex = build_example(tok, "v1", "Heart normal.</s>Lungs clear.", None, 2048)  # a stray stop string splits rounds
    assert ex.mismatch and _targets(ex.labels) == []


def test_plain_targets_are_findings_and_newline(tok: LlamaSPTokenizer) -> None:
    ex = build_example(tok, "plain", FINDINGS, "ignored indication", 2048)
    assert ex.input_ids[:2] == [tok.bos_token_id, IMAGE_TOKEN_INDEX]
    assert ex.labels[:2] == [IGNORE_INDEX, IGNORE_INDEX] and ex.labels[2:] == ex.input_ids[2:]
    assert tok.decode(_targets(ex.labels)) == FINDINGS + "\n" and tok.eos_token_id not in ex.labels


def test_text_and_truncation(tok: LlamaSPTokenizer) -> None:
    ex = build_example(tok, "text", FINDINGS, None, 2048)
    assert ex.input_ids == tok.encode(FINDINGS) + [tok.eos_token_id] and ex.labels == ex.input_ids
    short = build_example(tok, "v1", FINDINGS, None, 10)
    assert len(short.input_ids) == len(short.labels) == 10


def test_image_positions_are_ignored() -> None:
    assert splice_labels([1, 5, IMAGE_TOKEN_INDEX, 7], [-100, -100, -100, 7], 3) == [-100] * 5 + [7]


def test_loss_equals_hugging_face_llama_with_labels(tok: LlamaSPTokenizer) -> None:
    """Same spliced, right-padded batch through transformers' LlamaForCausalLM(labels=...)."""
    cfg = preset("tiny")
    model = random_model(cfg, seed=1).eval()
    exs = [build_example(tok, "v1", FINDINGS, None, 2048), build_example(tok, "v1", "No acute findings.", "Cough.", 2048)]
    image_embeds = torch.randn(2, cfg.num_image_tokens, cfg.decoder.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        embeds, targets, valid = multimodal_inputs(model, [e.input_ids for e in exs], [e.labels for e in exs],
                                                   image_embeds)
        ours = causal_lm_loss(model.language_model, embeds, targets, valid)
    assert embeds.shape[1] == max(len(e.input_ids) for e in exs) - 1 + cfg.num_image_tokens
    assert int((targets != IGNORE_INDEX).sum()) == sum(e.n_targets for e in exs)
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg.decoder.to_hf().items() if k != "torch_dtype"})
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.load_state_dict(model.language_model.state_dict(), strict=False)
    with torch.no_grad():
        theirs = hf(inputs_embeds=embeds, attention_mask=valid.long(), labels=targets).loss
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert ours.item() > 1.0  # a random model is far from the targets


def test_loss_with_no_targets_is_zero_with_a_graph() -> None:
    model = random_model(preset("tiny"))
    embeds = torch.randn(1, 5, 64, requires_grad=True)
    loss = causal_lm_loss(model.language_model, embeds, torch.full((1, 5), IGNORE_INDEX), torch.ones(1, 5, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and embeds.grad is not None and not embeds.grad.any()
