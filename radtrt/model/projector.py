"""LLaVA's multimodal projector (``mlp{N}x_gelu`` or ``linear``), keys ``mm_projector.{0,2,...}``."""

from __future__ import annotations

import re

from torch import nn

from radtrt.errors import fail


def build_projector(projector_type: str, in_dim: int, out_dim: int) -> nn.Module:
    """Same module layout as LLaVA's ``build_vision_projector`` so its state-dict keys load as-is."""
    if projector_type == "linear":
        return nn.Linear(in_dim, out_dim)
    match = re.fullmatch(r"mlp(\d+)x_gelu", projector_type)
    if match is None:
        fail(f"unsupported mm_projector_type '{projector_type}' (supported: linear, mlpNx_gelu)")
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(1, int(match.group(1))):
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers)
