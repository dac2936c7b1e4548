"""Which model a derived file (calibration statistics, a bundle) was made from.

Files made from one model and used with another fail in quiet ways: scales that fit other weights, a
TensorRT-LLM checkpoint beside graphs of a different fine-tune. These two digests let every reader refuse that.
"""

from __future__ import annotations

import hashlib
from typing import Mapping

import torch

from radtrt.model.llava_rad import LlavaRad


def config_sha256(model: LlavaRad) -> str:
    return hashlib.sha256(model.cfg.to_json().encode()).hexdigest()


@torch.no_grad()
def weights_fingerprint(model: LlavaRad, per_tensor: int = 4096, dtype: torch.dtype = torch.float32) -> str:
    """sha256 over every parameter's name, shape and up to ``per_tensor`` strided values (as ``dtype``).

    Hashing all weights of a 7B model would take minutes; a strided sample of every tensor still
    tells a different fine-tune or checkpoint apart, which is what a stale derived file would be.
    ``dtype=torch.float16`` gives one digest for a model and its float16 cast (an fp16 export casts the
    loaded model in place, and a later step of the same export must still recognise it).
    """
    return tensors_fingerprint(model.state_dict(), per_tensor, dtype)


@torch.no_grad()
def tensors_fingerprint(tensors: Mapping[str, torch.Tensor], per_tensor: int = 4096,
                        dtype: torch.dtype = torch.float32) -> str:
    """:func:`weights_fingerprint` of a state dict (a base decoder's weights, as written and as read back)."""
    h = hashlib.sha256()
    for name, p in sorted(tensors.items()):
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // per_tensor)
        h.update(f"{name}:{tuple(p.shape)}".encode())
        h.update(flat[::step][:per_tensor].to(dtype).cpu().numpy().tobytes())
    return h.hexdigest()
