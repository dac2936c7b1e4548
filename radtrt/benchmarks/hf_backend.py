"""A comparison-only backend: the decoder as transformers' ``LlamaForCausalLM`` driven by ``generate``.

People judge a runtime against what they would otherwise use, which for a LLaMA decoder is Hugging
Face ``generate`` (eager attention, fp32). This wraps it behind the ``Backend`` interface, sharing
the radtrt model's weight tensors (no second copy), so ``radtrt bench latency --vs-backend
transformers`` reproduces that baseline. Vision and the prompt splice are the radtrt reference's.

Time to first token is taken when ``generate`` first calls the logits processors (right after the
prefill forward), so it includes ``generate``'s own setup, as a user of it would pay.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

import torch

from radtrt.model.generate import Generation, left_pad
from radtrt.model.llava_rad import LlavaRad
from radtrt.runtime.backends import TorchBackend


class _StepClock:
    """A logits processor that only records when each step's logits arrive (and, when asked, the logits)."""

    def __init__(self, keep: bool) -> None:
        self.times: list[float] = []
        self.kept: list[torch.Tensor] | None = [] if keep else None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.kept is not None:
            self.kept.append(scores.float().clone())
        self.times.append(time.perf_counter())
        return scores


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """``generate`` warns about flags it ignores on every call; those lines would bury the progress."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def hf_llama(model: LlavaRad, attn_implementation: str = "eager") -> torch.nn.Module:
    """transformers' LLaMA over the same parameter tensors as ``model.language_model``."""
    import transformers

    cfg = model.cfg.decoder
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg.to_hf().items() if k != "torch_dtype"},
                                      attn_implementation=attn_implementation)
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(hf_cfg)
    state = model.language_model.state_dict()
    hf.load_state_dict(state, strict=True, assign=True)  # same names as transformers: shares the tensors
    device = model.language_model.lm_head.weight.device
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config=hf_cfg).to(device)  # non-persistent: rebuilt
    return hf.eval()


class TransformersBackend(TorchBackend):
    """The reference's vision and prompt splice; the decoder through ``generate``."""

    name = "transformers"

    def __init__(self, model: LlavaRad, device: str = "cpu") -> None:
        super().__init__(model, device)
        self.hf = hf_llama(model)

    @torch.no_grad()
    def generate(self, embeds: list[torch.Tensor], *, max_new_tokens: int, eos_token_id: int,
                 keep_logits: bool = False) -> Generation:
        if max_new_tokens < 1:
            return Generation([[] for _ in embeds])
        x, valid = left_pad(embeds)
        clock = _StepClock(keep_logits)
        with _quiet_transformers():
            t0 = time.perf_counter()
            out = self.hf.generate(inputs_embeds=x, attention_mask=valid.long(), do_sample=False, num_beams=1,
                                   max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                                   pad_token_id=eos_token_id, logits_processor=[clock])
            t_end = time.perf_counter()
        ids = []
        for row in out.tolist():  # with inputs_embeds only, generate returns just the new tokens
            ids.append(row[: row.index(eos_token_id)] if eos_token_id in row else row)
        t_first = clock.times[0] if clock.times else t_end
        return Generation(ids, prefill_ms=(t_first - t0) * 1e3, decode_ms=(t_end - t_first) * 1e3,
                          logits=None if clock.kept is None else torch.stack(clock.kept, dim=1))
