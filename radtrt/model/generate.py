"""Greedy decoding with a static KV cache: ``prefill`` then ``decode_one_token`` (gpt-fast's shape).

Matches Hugging Face ``generate(do_sample=False, num_beams=1)`` as LLaVA-Rad's evaluation calls it:
left-padded batches, positions counted over real tokens only, stop at EOS, ``max_new_tokens`` 256.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from radtrt.errors import fail
from radtrt.model.decoder import LlamaForCausalLM, causal_mask

MAX_NEW_TOKENS = 256


@dataclass
class Generation:
    """Generated ids per sequence (prompt and EOS excluded) and how long each phase took."""

    token_ids: list[list[int]]
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    # ``[B, steps, V]`` fp32, every step's logits (with ``keep_logits``): step 0 is the prompt's; a row that
    # finished keeps stepping with the others, so rows compare only up to their own end.
    logits: torch.Tensor | None = field(default=None, repr=False)
    # Rows that ran as separate batches one after another (a TensorRT-LLM engine's batch limit, fused attention's
    # equal-length groups, a SmoothQuant bundle's one study at a time): each batch's rows and its own run. The
    # totals above sum them; a study's record takes its own batch's times (the sum over batches, divided by one
    # batch's steps, gave every study a ms per token several times too high).
    parts: list[tuple[list[int], Generation]] = field(default_factory=list, repr=False)

    @classmethod
    def merged(cls, n: int, parts: list[tuple[list[int], Generation]], *, keep_logits: bool = False) -> Generation:
        """Separate batches' runs put back in the caller's order of ``n`` rows; a row's logits are NaN past
        its own batch's last step (batches may step different numbers of times)."""
        tokens: list[list[int]] = [[] for _ in range(n)]
        rows: list[torch.Tensor | None] = [None] * n  # [steps, V] each
        for members, gen in parts:
            for row, i in enumerate(members):
                tokens[i] = gen.token_ids[row]
                if gen.logits is not None:
                    rows[i] = gen.logits[row]
        logits = None
        kept = [r for r in rows if r is not None]
        if keep_logits and kept:
            logits = torch.full((n, max(r.shape[0] for r in kept), kept[0].shape[-1]), float("nan"))
            for i, r in enumerate(rows):
                if r is not None:
                    logits[i, :r.shape[0]] = r
        return cls(tokens, prefill_ms=sum(g.prefill_ms for _, g in parts),
                   decode_ms=sum(g.decode_ms for _, g in parts), logits=logits, parts=parts)

    def batch_of(self, row: int) -> tuple[Generation, int]:
        """The run that generated ``row`` and how many rows it held."""
        for members, gen in self.parts:
            if row in members:
                return gen, len(members)
        return self, len(self.token_ids)

    @property
    def first_logits(self) -> torch.Tensor | None:
        return None if self.logits is None else self.logits[:, 0]

    def decode_steps(self, max_new_tokens: int) -> int:
        """Decode steps the batch ran. A row shorter than ``max_new_tokens`` stopped at EOS, whose own step
        counts too (``len - 1`` made every such report's ms per token one step too high)."""
        return max(max((min(len(t) + 1, max_new_tokens) for t in self.token_ids), default=1) - 1, 0)


def left_pad(embeds: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack variable-length ``[L_i, H]`` embeddings left-padded; returns (embeds, valid mask)."""
    length = max(e.shape[0] for e in embeds)
    out = embeds[0].new_zeros(len(embeds), length, embeds[0].shape[-1])
    valid = torch.zeros(len(embeds), length, dtype=torch.bool, device=embeds[0].device)
    for i, e in enumerate(embeds):
        out[i, length - e.shape[0]:] = e
        valid[i, length - e.shape[0]:] = True
    return out, valid


def clock(device: torch.device) -> float:
    """``perf_counter`` after the device's queued work: CUDA kernels run asynchronously, so without
    the sync a stage's time would land in whichever later stage first reads a result back."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def check_positions(prompt_length: int, max_new_tokens: int, max_positions: int, *,
                    shorten: tuple[str, int] | None = None, limit: str = "--max-new-tokens") -> None:
    """Refuse a generation longer than the model's positions before its KV cache is allocated (a huge
    --max-new-tokens was an allocation failure), with the same words on every backend. ``shorten``: what the
    caller's prompt can be shortened by and the prompt's length without it (``Pipeline.check_fits``:
    ``--indication``, when one was given); the remedy names it only where leaving it out makes room ("shorten
    --indication" was said to runs that gave none, and for 100000 new tokens no prompt leaves room for), and
    lowering --max-new-tokens only while that leaves room for a report. ``limit``: the new-token limit as the
    caller's user sets it (Triton's request input is ``MAX_NEW_TOKENS``)."""
    if prompt_length + max_new_tokens > max_positions:
        room = max_positions - prompt_length
        what, room_without = (shorten[0], max_positions - shorten[1]) if shorten else (None, 0)
        if room >= 1:
            fix = f"{limit} {room} at most for this prompt"
            fix = f"shorten {what} or give {fix}" if what and room_without >= max_new_tokens else fix
        elif what and room_without >= 1:  # the part that can be shortened is what fills them
            fix = f"the prompt alone fills them: shorten {what}"
            if room_without < max_new_tokens:  # said at once: the shortened run would be refused for it next
                fix += f", and lower {limit} ({room_without} at most even without {what})"
        else:
            fix = "the prompt alone fills them, leaving no room for a report"
        fail(f"the prompt ({prompt_length} positions, with the image) + {max_new_tokens} new tokens exceed the "
             f"model's {max_positions} positions; {fix}")


@torch.no_grad()
def greedy_generate(lm: LlamaForCausalLM, embeds: list[torch.Tensor], *, eos_token_id: int,
                    max_new_tokens: int = MAX_NEW_TOKENS, keep_logits: bool = False) -> Generation:
    """The reference's greedy decoding (argmax, stop at EOS) for a left-padded batch: each row gets the tokens
    it gets alone, which is what every other backend is compared against."""
    if max_new_tokens < 1:
        return Generation([[] for _ in embeds])
    x, valid = left_pad(embeds)
    batch, length = valid.shape
    total = length + max_new_tokens
    check_positions(length, max_new_tokens, lm.cfg.max_position_embeddings)
    key_valid = torch.zeros(batch, total, dtype=torch.bool, device=x.device)
    key_valid[:, :length] = valid
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    cache = lm.new_cache(batch, total, dtype=x.dtype)
    t0 = clock(x.device)
    cache.slots = torch.arange(length, device=x.device)
    logits = lm(x, positions, causal_mask(key_valid, cache.slots), cache, last_only=True)[:, -1]
    kept = [logits.float().cpu()] if keep_logits else None
    next_pos = positions[:, -1] + 1
    t1 = clock(x.device)
    out: list[list[int]] = [[] for _ in range(batch)]
    done = torch.zeros(batch, dtype=torch.bool, device=x.device)
    for step in range(max_new_tokens):
        token = logits.argmax(-1)
        for i in range(batch):
            if not done[i] and token[i].item() != eos_token_id:
                out[i].append(int(token[i]))
        done |= token == eos_token_id
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        slot = length + step
        key_valid[:, slot] = True
        cache.slots = torch.tensor([slot], device=x.device)
        logits = lm(lm.embed(token[:, None]), next_pos[:, None], causal_mask(key_valid, cache.slots), cache)[:, -1]
        if kept is not None:
            kept.append(logits.float().cpu())
        next_pos = next_pos + 1
    t2 = clock(x.device)
    return Generation(out, prefill_ms=(t1 - t0) * 1e3, decode_ms=(t2 - t1) * 1e3,
                      logits=None if kept is None else torch.stack(kept, dim=1))
