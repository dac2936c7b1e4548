"""Export-time check: run the fresh bundle with ONNX Runtime (CPU) against the PyTorch model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from radtrt.model.generate import greedy_generate
from radtrt.model.llava_rad import LlavaRad


def _errors(got: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    got, ref = got.float(), ref.float()
    diff = (got - ref).abs()
    return {"max_abs": float(diff.max()), "max_rel": float((diff / ref.abs().clamp_min(1e-3)).max()),
            "ref_max_abs": float(ref.abs().max())}


@torch.no_grad()
def check_bundle_against_torch(bundle: Path, model: LlavaRad, steps: int = 4) -> dict[str, Any]:
    """Max abs/rel error of the image embeddings and the first-step logits; greedy token agreement."""
    from radtrt.runtime.ort import OrtBackend

    # no pre-packed weight copies: the check runs once, beside the PyTorch model, at the export's peak memory
    ort_backend = OrtBackend(bundle, verify=False, prepack=False)
    dtype = model.dtype
    size = model.cfg.vision.img_size
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 3, size, size, generator=g)
    ref_img = model.encode_images(pixels.to(dtype))
    got_img = ort_backend.encode_images(pixels)
    # 8 text tokens and ``steps`` new ones, fewer where the model's positions end sooner: load_model lets through a
    # model whose shortest prompt and one new token fit, and this check refused it with infer's advice
    # ("shorten --indication or lower --max-new-tokens"), options export does not have
    room = model.cfg.decoder.max_position_embeddings - ref_img.shape[1]
    text = max(1, min(8, room - 2))
    steps = max(1, min(steps, room - text))
    embeds = [torch.cat([ref_img[0], model.language_model.embed(torch.arange(1, 1 + text))])]
    ref = greedy_generate(model.language_model, embeds, eos_token_id=-1, max_new_tokens=steps, keep_logits=True)
    got = ort_backend.generate(embeds, eos_token_id=-1, max_new_tokens=steps, keep_logits=True)
    assert ref.first_logits is not None and got.first_logits is not None
    return {"provider": "CPUExecutionProvider", "reference": f"torch {str(dtype).removeprefix('torch.')} on the CPU",
            "vision": _errors(got_img, ref_img),
            "decoder_first_logits": _errors(got.first_logits, ref.first_logits),
            "greedy_tokens_equal": got.token_ids == ref.token_ids, "greedy_steps": steps}
