"""Per-channel INT8 weights and SmoothQuant, as pure functions: torch tensors in, tensors out.

Shared by the TensorRT-LLM checkpoint writer and the ONNX INT8 export, so both quantize the same
way. Conventions (the HF ``nn.Linear`` layout): a weight is ``[out_features, in_features]``; an
output channel is a row.

* ``quantize_per_channel``: symmetric, one scale per output channel, ``scale = absmax / 127``, values
  rounded half-to-even into ``[-127, 127]`` (TensorRT-LLM's SmoothQuant ``generate_int8`` grid; its
  weight-only op uses ``absmax / 128`` clipped to 127, which maps +absmax one step short). The scale
  is rounded (up) to its storage dtype *before* quantizing, so dequantizing with the stored scale is
  exact to half a step, whatever that dtype.
* SmoothQuant (Xiao et al. 2023; TensorRT-LLM ``smooth_gemm`` / ``smooth_gemm_fc1_gate``): per input
  channel ``s = act_absmax**alpha / w_absmax**(1 - alpha)``, weights ``W * s`` and activations
  ``X / s``, so ``(X / s) @ (W * s).T == X @ W.T``. Layers sharing an input (q/k/v; gate/up) share one
  ``s`` computed over all their rows; ``s`` is folded into the preceding RMSNorm weight when there is
  one, else it is kept as a runtime ``smoother``. Unlike TensorRT-LLM, zero weight/activation maxima
  are clamped before dividing (its ``clamp`` result is discarded, giving inf for all-zero channels).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from radtrt.errors import fail

INT8_MAX = 127
# 7-bit weights in the ONNX Runtime (CPU) INT8 graphs, vision and decoder. On x86 without VNNI (AVX2, AVX-512
# without VNNI) ONNX Runtime's integer GEMMs multiply u8 x s8 with VPMADDUBSW, which saturates the sum of each
# pair of products in int16 (255 * 127 * 2 > 32767); s8 x s8 Q/DQ graphs are shifted onto the same kernels.
# Measured on this project's AVX2 CPU against exact integer arithmetic on the same quantized values:
# DynamicQuantizeLinear + MatMulInteger (1 x 1024 @ 1024 x 1024) off by 0.13-0.23 with 8-bit weights, 0 with
# 7-bit, whose own rounding error is 0.035 against 8-bit's 0.025 (outputs up to ~2.4); a vision-style Q/DQ
# MatMul (4 x 768 @ 768 x 768) off by 0.16-0.21, 0 with 7-bit (rounding error 0.043 against 0.026). On the
# tiny model's decoder it cut the first-step logit error from 7.7% to 0.8% of the logit range. VNNI hosts,
# ARM and TensorRT do not saturate and lose one bit of weight grid; the TensorRT-LLM checkpoint keeps 8 bits.
ORT_REDUCE_RANGE = True
SMOOTH_EPS = 1e-5  # TensorRT-LLM's lower bound for smoothing factors


@dataclass(frozen=True)
class QuantizedWeight:
    """``q`` int8 ``[out, in]`` and ``scale`` ``[out]`` with ``weight ~= q * scale[:, None]``."""

    q: torch.Tensor
    scale: torch.Tensor

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_per_channel(self.q, self.scale, dtype)


def quantize_per_channel(weight: torch.Tensor, *, scale_dtype: torch.dtype = torch.float32) -> QuantizedWeight:
    """Symmetric per-output-channel INT8; ``scale_dtype`` is the dtype the scale will be stored in."""
    if weight.dim() != 2:
        fail(f"per-channel quantization expects a 2-D weight, got shape {tuple(weight.shape)}")
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    if not torch.isfinite(amax).all():
        fail("cannot quantize a weight holding inf/NaN values")
    finfo = torch.finfo(scale_dtype)
    # Never zero (an all-zero channel), and never below absmax / 127 once stored, so that no value
    # needs clipping and every one is within half a step of the stored scale.
    scale = _round_up_to(torch.clamp_min(amax / INT8_MAX, finfo.tiny * finfo.eps), scale_dtype)
    q = torch.round(w / scale.float()[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return QuantizedWeight(q, scale)


def _round_up_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` (positive, fp32) in ``dtype``, rounded up where the cast rounded down (next float up = bits + 1)."""
    stored = x.to(dtype)
    low = stored.float() < x
    if low.any():
        int_type = {2: torch.int16, 4: torch.int32}[torch.finfo(dtype).bits // 8]
        bits = stored.view(int_type)
        stored = torch.where(low, bits + 1, bits).view(dtype)
    return stored


def dequantize_per_channel(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale.float()[:, None]).to(dtype)


# --- calibration statistics ------------------------------------------------------------------------

@dataclass(frozen=True)
class ActivationStats:
    """Per-channel absolute maxima of each linear layer over a calibration set.

    ``inputs``: HF module name (``model.layers.0.self_attn.q_proj``) -> ``[in_features]`` absmax of
    the layer's input (what SmoothQuant needs). ``outputs``: the same names -> ``[out_features]``
    absmax of the output, needed only to derive INT8 KV-cache scales from q/k/v (TensorRT-LLM's
    recipe). ``description`` identifies the calibration set (recorded into checkpoints).
    """

    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    description: str = ""

    @property
    def identity(self) -> str:
        """``description`` and a digest of the statistics themselves: two calibrations of the same images with
        other report texts share a description (its sample hash names the images) but not their maxima."""
        h = hashlib.sha256()
        for side, table in (("in", self.inputs), ("out", self.outputs)):
            for name in sorted(table):
                h.update(f"{side}:{name}".encode())
                h.update(table[name].float().contiguous().numpy().tobytes())
        return f"{self.description}; statistics sha256 {h.hexdigest()[:16]}"

    def input_absmax(self, module: str) -> torch.Tensor:
        if module not in self.inputs:
            fail(f"calibration statistics have no input maxima for '{module}' "
                 f"({len(self.inputs)} layers present); re-run the calibration")
        return self.inputs[module].float()

    def output_absmax(self, module: str) -> torch.Tensor:
        if module not in self.outputs:
            fail(f"calibration statistics have no output maxima for '{module}' (needed for INT8 KV-cache "
                 f"scales); re-run the calibration with output statistics or pass kv_scales")
        return self.outputs[module].float()

    def save(self, path: Path) -> None:
        from radtrt.model.io import save_tensors

        tensors = {f"input:{k}": v.float().contiguous() for k, v in self.inputs.items()}
        tensors |= {f"output:{k}": v.float().contiguous() for k, v in self.outputs.items()}
        save_tensors(tensors, path, metadata={"format": "radtrt-activation-stats", "description": self.description})

    @classmethod
    def load(cls, path: Path) -> "ActivationStats":
        from safetensors import safe_open

        from radtrt.model.io import load_tensors

        tensors = load_tensors(path)
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != "radtrt-activation-stats":
            fail(f"{path} is not a radtrt activation-statistics file")
        inputs = {k.removeprefix("input:"): v for k, v in tensors.items() if k.startswith("input:")}
        outputs = {k.removeprefix("output:"): v for k, v in tensors.items() if k.startswith("output:")}
        return cls(inputs, outputs, meta.get("description", ""))


# --- SmoothQuant -----------------------------------------------------------------------------------

DEFAULT_ALPHA = 0.5  # SmoothQuant's migration strength, the paper's default (every export path)


def smoothing_scales(act_absmax: torch.Tensor, weights: Sequence[torch.Tensor], alpha: float = DEFAULT_ALPHA) -> torch.Tensor:
    """Per-input-channel factors ``s`` shared by ``weights`` (all ``[out_i, in]``, same input)."""
    if not 0.0 <= alpha <= 1.0:
        fail(f"SmoothQuant alpha must be within [0, 1], got {alpha}")
    width = act_absmax.numel()
    for w in weights:
        if w.dim() != 2 or w.shape[1] != width:
            fail(f"activation maxima cover {width} channels but a weight has shape {tuple(w.shape)}")
    w_absmax = torch.stack([w.detach().double().abs().amax(dim=0) for w in weights]).amax(dim=0)
    act = act_absmax.detach().to(w_absmax.device, torch.float64)
    s = act.clamp_min(SMOOTH_EPS).pow(alpha) / w_absmax.clamp_min(SMOOTH_EPS).pow(1.0 - alpha)
    return s.clamp_min(SMOOTH_EPS).float()


def smooth(weights: Sequence[torch.Tensor], act_absmax: torch.Tensor,
           alpha: float = DEFAULT_ALPHA) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Smoothed fp32 weights ``W * s`` and ``s``; the caller divides the activations by ``s``
    (by folding it into the previous norm, ``fold_into_norm``, or as a runtime smoother)."""
    s = smoothing_scales(act_absmax, weights, alpha)
    return [w.detach().float() * s[None, :] for w in weights], s


def fold_into_norm(norm_weight: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """RMSNorm weight that also divides its output by ``s`` (RMSNorm's output is ``weight * x_hat``)."""
    return norm_weight.detach().float() / s
