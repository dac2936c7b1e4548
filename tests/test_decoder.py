"""The lean decoder against transformers' LlamaForCausalLM on the same weights."""

from __future__ import annotations

import pytest
import torch
import transformers

from radtrt.model.config import DecoderConfig, tiny_decoder
from radtrt.model.decoder import LlamaForCausalLM, causal_mask
from radtrt.model.generate import Generation, greedy_generate


def _pair(cfg: DecoderConfig, seed: int = 0) -> tuple[LlamaForCausalLM, transformers.LlamaForCausalLM]:
    torch.manual_seed(seed)
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg.to_hf().items() if k != "torch_dtype"})
    hf_cfg._attn_implementation = "eager"
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # non-trivial norms so a dropped weight would show
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    ours = LlamaForCausalLM(cfg).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return ours, hf


@pytest.mark.parametrize("cfg", [tiny_decoder(), DecoderConfig(vocab_size=300, hidden_size=48, intermediate_size=96,
                                                                num_hidden_layers=3, num_attention_heads=6,
                                                                num_key_value_heads=6, rope_theta=5000.0)])
def test_logits_match_transformers(cfg: DecoderConfig) -> None:
    ours, hf = _pair(cfg)
    embeds = torch.randn(2, 11, cfg.hidden_size)
    with torch.no_grad():
        ref = hf(inputs_embeds=embeds).logits
        slots = torch.arange(11)
        pos = slots[None].expand(2, -1)
        got = ours(embeds, pos, causal_mask(torch.ones(2, 11, dtype=torch.bool), slots))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_greedy_tokens_match_transformers_generate() -> None:
    cfg = tiny_decoder()
    ours, hf = _pair(cfg, seed=1)
    torch.manual_seed(2)
    embeds = torch.randn(1, 9, cfg.hidden_size)
    with torch.no_grad():
        ref = hf.generate(inputs_embeds=embeds, attention_mask=torch.ones(1, 9, dtype=torch.long), do_sample=False,
                          num_beams=1, max_new_tokens=24, eos_token_id=cfg.eos_token_id, pad_token_id=0)
    ref_ids = [t for t in ref[0].tolist() if t != cfg.eos_token_id]
    got = greedy_generate(ours, [embeds[0]], eos_token_id=cfg.eos_token_id, max_new_tokens=24)
    assert got.token_ids[0] == ref_ids[: len(got.token_ids[0])] and len(got.token_ids[0]) == len(ref_ids)


def test_left_padded_batch_equals_single_runs() -> None:
    cfg = tiny_decoder()
    ours, _ = _pair(cfg, seed=3)
    torch.manual_seed(4)
    a, b = torch.randn(7, cfg.hidden_size), torch.randn(12, cfg.hidden_size)
    batched = greedy_generate(ours, [a, b], eos_token_id=cfg.eos_token_id, max_new_tokens=16)
    single = [greedy_generate(ours, [e], eos_token_id=cfg.eos_token_id, max_new_tokens=16).token_ids[0] for e in (a, b)]
    assert batched.token_ids == single
    assert len(single[0]) > 0


def test_generation_stops_at_eos_and_excludes_it() -> None:
    cfg = tiny_decoder()
    ours, _ = _pair(cfg, seed=5)
    embeds = torch.randn(6, cfg.hidden_size)
    free = greedy_generate(ours, [embeds], eos_token_id=-1, max_new_tokens=12).token_ids[0]
    assert len(free) == 12
    stop = free[4]
    got = greedy_generate(ours, [embeds], eos_token_id=stop, max_new_tokens=12).token_ids[0]
    assert got == free[: free.index(stop)]


def test_generation_records_no_autograd_graph() -> None:
    """A misplaced ``no_grad`` decorator once made every generation build a graph (slower, more memory)."""
    cfg = tiny_decoder()
    ours, _ = _pair(cfg, seed=6)
    assert torch.is_grad_enabled()
    got = greedy_generate(ours, [torch.randn(5, cfg.hidden_size)], eos_token_id=-1, max_new_tokens=3, keep_logits=True)
    assert got.logits is not None and not got.logits.requires_grad


def test_decode_steps_count_the_step_that_produced_eos() -> None:
    """Reports ending at EOS were timed over one step fewer than ran, so their ms per token read high."""
    assert Generation([[5, 6, 7]]).decode_steps(10) == 3  # prefill gave 5; steps gave 6, 7 and the EOS
    assert Generation([[5] * 10]).decode_steps(10) == 9  # cut off at the limit: no EOS step
    assert Generation([[5, 6], [5] * 9]).decode_steps(10) == 9  # the batch ran as long as its longest row
    assert Generation([[]]).decode_steps(10) == 0  # EOS first, from the prefill
    assert Generation([[]]).decode_steps(0) == 0  # no token asked for: no step (it was -1)
