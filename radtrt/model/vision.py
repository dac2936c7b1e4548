"""The DINOv2 ViT trunk of BiomedCLIP-CXR, written with timm's parameter names.

Parameter names and the forward path mirror ``timm.models.vision_transformer.VisionTransformer``
so open_clip checkpoints (``visual.trunk.*``) load without renaming, while radtrt itself does not
depend on timm or torchvision at run time. ``tests/test_vision.py`` checks it against golden
tensors produced once from timm.

LLaVA-Rad does not use the trunk's final output: it keeps every block's output and selects one
(``mm_vision_select_layer``, -2 = second to last), dropping the class token. The final ``norm``
is kept as a parameter only so checkpoints load strictly; it is never applied.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from radtrt.model.config import VisionConfig


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if x.dtype == torch.float32:
            x = F.scaled_dot_product_attention(q, k, v)
        else:  # fp16/bf16: softmax in fp32, the known overflow trap of fp16 vision towers
            scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)
            x = scores.float().softmax(dim=-1).to(v.dtype) @ v
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class LayerNorm(nn.LayerNorm):
    """LayerNorm evaluated in fp32 whatever the activation dtype (a no-op cast in fp32 models)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = LayerNorm(dim, eps=cfg.eps)
        self.attn = Attention(dim, cfg.num_heads)
        self.ls1 = LayerScale(dim, cfg.init_values) if cfg.init_values is not None else nn.Identity()
        self.norm2 = LayerNorm(dim, eps=cfg.eps)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio))
        self.ls2 = LayerScale(dim, cfg.init_values) if cfg.init_values is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """timm-compatible trunk; ``hidden_states`` returns what LLaVA-Rad's VisionTower returns."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.num_patches + 1, cfg.embed_dim) * 0.02)
        self.norm_pre = nn.Identity()
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = LayerNorm(cfg.embed_dim, eps=cfg.eps)

    def hidden_states(self, pixel_values: torch.Tensor, upto: int | None = None) -> list[torch.Tensor]:
        """Embedding output followed by each block's output (``depth + 1`` tensors).

        ``upto`` stops after that many blocks, so selecting layer -2 does not pay for the last block.
        """
        if pixel_values.shape[-2:] != (self.cfg.img_size, self.cfg.img_size):
            raise ValueError(f"expected {self.cfg.img_size}x{self.cfg.img_size} pixels, got {tuple(pixel_values.shape)}")
        x = self.patch_embed(pixel_values)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm_pre(x)
        states = [x]
        for block in self.blocks[: len(self.blocks) if upto is None else upto]:
            x = block(x)
            states.append(x)
        return states

    def select_features(self, pixel_values: torch.Tensor, select_layer: int, select_feature: str) -> torch.Tensor:
        """LLaVA's ``feature_select``: hidden state ``select_layer``, class token dropped for 'patch'."""
        n_states = len(self.blocks) + 1
        index = select_layer % n_states
        feats = self.hidden_states(pixel_values, upto=index)[index]
        if select_feature == "patch":
            return feats[:, 1:]
        if select_feature == "cls_patch":
            return feats
        raise ValueError(f"unexpected mm_vision_select_feature '{select_feature}'")
