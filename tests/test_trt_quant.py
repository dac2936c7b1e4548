"""INT8 per-channel quantization and SmoothQuant math (radtrt.exporter.quant), on synthetic tensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from radtrt.errors import RadtrtError
from radtrt.exporter.quant import (ActivationStats, dequantize_per_channel, fold_into_norm, quantize_per_channel,
                                   smooth, smoothing_scales)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_int8_weights_dequantize_within_half_a_step(scale_dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 96, generator=g) * torch.logspace(-3, 1, 48)[:, None]  # very different row ranges
    w[5] = 0.0  # an all-zero channel must not divide by zero
    qw = quantize_per_channel(w, scale_dtype=scale_dtype)
    assert qw.q.dtype == torch.int8 and qw.q.shape == w.shape
    assert qw.scale.dtype == scale_dtype and qw.scale.shape == (48,)
    assert int(qw.q.abs().max()) <= 127 and (qw.q[5] == 0).all()
    err = (qw.dequantize() - w).abs()
    assert (err <= 0.5 * qw.scale.float()[:, None] * (1 + 1e-6)).all()
    # symmetric absmax grid: each non-zero row reaches +-127 (up to the storage rounding of its scale)
    assert (qw.q.abs().amax(dim=1)[torch.arange(48) != 5] >= 120).all()
    assert (qw.scale.float() * 127 >= w.abs().amax(dim=1)).all()


def test_quantization_matches_the_plain_formula() -> None:
    w = torch.tensor([[1.0, -0.5, 0.25], [0.0, 2.0, -1.0]])
    qw = quantize_per_channel(w)
    torch.testing.assert_close(qw.scale, torch.tensor([1 / 127, 2 / 127]))
    assert qw.q.tolist() == [[127, -64, 32], [0, 127, -64]]  # round half to even: 63.5 -> 64, 31.75 -> 32
    torch.testing.assert_close(dequantize_per_channel(qw.q, qw.scale), qw.q.float() * qw.scale[:, None])


def test_quantization_refuses_bad_input() -> None:
    with pytest.raises(RadtrtError, match="2-D"):
        quantize_per_channel(torch.ones(3))
    with pytest.raises(RadtrtError, match="inf/NaN"):
        quantize_per_channel(torch.tensor([[float("inf"), 1.0]]))


def test_smoothquant_identity_through_the_folded_rmsnorm() -> None:
    """RMSNorm(x; g / s) @ (W * s).T == RMSNorm(x; g) @ W.T for q, k and v sharing one s."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 7, 32, generator=g, dtype=torch.float64)
    x[..., 3] *= 40.0  # an outlier channel, the case SmoothQuant exists for
    norm = 1 + 0.2 * torch.randn(32, generator=g, dtype=torch.float64)
    ws = [torch.randn(n, 32, generator=g, dtype=torch.float64) for n in (32, 16, 16)]
    act = _rms(x, norm).abs().amax(dim=(0, 1))
    smoothed, s = smooth(ws, act, alpha=0.5)
    assert s.shape == (32,) and (s > 0).all()
    assert smoothed[0].dtype == torch.float32
    new_norm = fold_into_norm(norm, s).double()
    for w, ws_ in zip(ws, smoothed, strict=True):
        torch.testing.assert_close(_rms(x, new_norm) @ ws_.double().T, _rms(x, norm) @ w.T, rtol=1e-5, atol=1e-5)
    # the outlier channel is flattened: smoothed activations have a smaller spread than the originals
    smoothed_act = _rms(x, new_norm).abs().amax(dim=(0, 1))
    assert smoothed_act.max() / smoothed_act.min() < act.max() / act.min()


def test_smoothquant_identity_with_a_runtime_smoother() -> None:
    """o_proj/down_proj: (y / s) @ (W * s).T == y @ W.T."""
    g = torch.Generator().manual_seed(2)
    y = torch.randn(9, 24, generator=g)
    w = torch.randn(12, 24, generator=g)
    (ws,), s = smooth([w], y.abs().amax(dim=0), alpha=0.8)
    torch.testing.assert_close((y / s) @ ws.T, y @ w.T, rtol=1e-5, atol=1e-5)


def test_smoothing_scales_formula_and_sharing() -> None:
    act = torch.tensor([4.0, 1.0, 0.0])
    w1 = torch.tensor([[1.0, 2.0, 0.0]])
    w2 = torch.tensor([[-3.0, 0.5, 0.0]])
    s = smoothing_scales(act, [w1, w2], alpha=0.5)
    # per input channel: act^a / max_rows|W|^(1-a), zeros clamped to 1e-5 (no inf)
    torch.testing.assert_close(s, torch.tensor([2.0 / 3.0**0.5, 1.0 / 2.0**0.5, 1.0]))
    assert torch.isfinite(s).all()
    with pytest.raises(RadtrtError, match="alpha"):
        smoothing_scales(act, [w1], alpha=1.5)
    with pytest.raises(RadtrtError, match="channels"):
        smoothing_scales(act, [torch.ones(2, 4)])


def test_activation_stats_round_trip(tmp_path: Path) -> None:
    stats = ActivationStats({"model.layers.0.self_attn.q_proj": torch.rand(8)},
                            {"model.layers.0.self_attn.q_proj": torch.rand(4)}, description="cxr-calib sha256:abc")
    stats.save(tmp_path / "stats.safetensors")
    back = ActivationStats.load(tmp_path / "stats.safetensors")
    assert back.description == "cxr-calib sha256:abc"
    torch.testing.assert_close(back.input_absmax("model.layers.0.self_attn.q_proj"),
                               stats.inputs["model.layers.0.self_attn.q_proj"])
    torch.testing.assert_close(back.output_absmax("model.layers.0.self_attn.q_proj"),
                               stats.outputs["model.layers.0.self_attn.q_proj"])
    with pytest.raises(RadtrtError, match="no input maxima for 'model.layers.1"):
        back.input_absmax("model.layers.1.self_attn.q_proj")
