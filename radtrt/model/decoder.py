"""A lean LLaMA decoder (gpt-fast style) that loads Hugging Face ``LlamaForCausalLM`` weights as-is.

Why not transformers' model directly: the runtime and the ONNX exporter need a forward that takes
input embeddings, explicit positions, an explicit boolean mask and a static KV cache, with no hidden
state in generation utilities. Parameter names match transformers (``model.layers.N.self_attn.q_proj``
...) so PEFT LoRA targets and HF checkpoints apply unchanged; ``tests/test_decoder.py`` proves equal
logits and greedy tokens against transformers' implementation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from radtrt.model.config import DecoderConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class Rotary(nn.Module):
    """LLaMA rotary embedding with transformers' half-split convention."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.inv_freq  # [B, T, hd/2]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
    return x * cos + _rotate_half(x) * sin


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention with grouped K/V heads repeated to the query heads."""
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class StaticCache:
    """Preallocated per-layer key/value buffers indexed by absolute slot (gpt-fast's layout).

    ``slots`` are the buffer positions the current tokens are written to; attention then runs over
    the whole buffer, with the mask hiding unwritten and padding slots.
    """

    def __init__(self, cfg: DecoderConfig, batch: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.slots = torch.arange(0, device=device)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor) -> torch.Tensor:
        self.k[layer][:, :, self.slots] = k
        self.v[layer][:, :, self.slots] = v
        return sdpa(q, self.k[layer], self.v[layer], mask)


class SplitCache:
    """Past keys/values in caller-owned buffers that are read, never copied: the ONNX decoder's form.

    Attention over ``[past | new]`` is computed as two score blocks joined only for the softmax, so
    the (large) past is not concatenated with the (small) new keys at every step. The new keys and
    values are collected in ``new`` for the caller to write into its buffers. ``mask`` covers
    ``S + T`` keys. Grouped K/V heads are broadcast, not repeated.
    """

    def __init__(self, past: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.past = past
        self.new: list[tuple[torch.Tensor, torch.Tensor]] = []

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor) -> torch.Tensor:
        self.new.append((k, v))
        past_k, past_v = self.past[layer]
        b, h, t, d = q.shape
        groups = k.shape[1]
        qg = q.reshape(b, groups, h // groups, t, d) * d**-0.5
        scores = torch.cat([qg @ past_k[:, :, None].transpose(-1, -2), qg @ k[:, :, None].transpose(-1, -2)], dim=-1)
        scores = scores.masked_fill(~mask[:, :, None], torch.finfo(scores.dtype).min)
        probs = scores.float().softmax(dim=-1).to(q.dtype)  # fp32 softmax: no fp16 overflow
        s = past_k.shape[2]
        y = probs[..., :s] @ past_v[:, :, None] + probs[..., s:] @ v[:, :, None]
        return y.reshape(b, h, t, d)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                cache: StaticCache | SplitCache | None, layer: int) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = sdpa(q, k, v, mask) if cache is None else cache.attend(layer, q, k, v, mask)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig, index: int) -> None:
        super().__init__()
        self.index = index
        self.self_attn = LlamaAttention(cfg)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                cache: StaticCache | SplitCache | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, self.index)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = Rotary(cfg.head_dim, cfg.rope_theta)


class LlamaForCausalLM(nn.Module):
    """Decoder over input embeddings.

    ``mask`` is a boolean ``[B, 1, T, S]`` (True = may attend) over the keys in play: the current
    tokens without a cache, every buffer slot with a ``StaticCache``, past + current tokens with a
    ``SplitCache``.
    """

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> StaticCache:
        weight = self.lm_head.weight
        return StaticCache(self.cfg, batch, max_len, dtype or weight.dtype, weight.device)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(self, inputs_embeds: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                cache: StaticCache | SplitCache | None = None, last_only: bool = False) -> torch.Tensor:
        cos, sin = self.model.rotary_emb(positions, inputs_embeds.dtype)
        x = inputs_embeds
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, cache)
        x = self.model.norm(x[:, -1:] if last_only else x)
        return self.lm_head(x)


def causal_mask(key_valid: torch.Tensor, query_slots: torch.Tensor) -> torch.Tensor:
    """Boolean ``[B, 1, T, S]`` mask: causal over slots, padding keys hidden.

    Each query may always see its own slot, so a padding query never has an empty row (which
    would make softmax NaN); padding outputs are discarded anyway.
    """
    key_slots = torch.arange(key_valid.shape[1], device=key_valid.device)
    causal = key_slots[None, :] <= query_slots[:, None]  # [T, S]
    own = key_slots[None, :] == query_slots[:, None]
    return ((causal[None] & key_valid[:, None, :]) | own[None])[:, None]
