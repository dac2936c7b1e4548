"""Decode bandwidth floor: the arithmetic, and which bytes count as read per token."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from radtrt.benchmarks.bandwidth import (
    Bandwidth,
    bundle_decoder_weight_bytes,
    decode_floor,
    kv_bytes_per_step,
    measure_gemv_bandwidth,
    torch_decoder_weight_bytes,
)
from radtrt.errors import RadtrtError
from radtrt.model.config import DecoderConfig, preset
from radtrt.model.decoder import LlamaForCausalLM


def _bw(gb: float) -> Bandwidth:
    return Bandwidth(gb_per_s=gb, matrix_bytes=1 << 29, best_ms=1.0, median_ms=1.0, repeats=1, threads=2)


def test_floor_is_bandwidth_over_weight_bytes() -> None:
    f = decode_floor(750_000_000, _bw(27.0), achieved_tokens_per_s=32.4)
    assert f.floor_tokens_per_s == pytest.approx(36.0)
    assert f.achieved_fraction == pytest.approx(0.9)
    assert f.floor_with_kv_tokens_per_s is None and f.achieved_fraction_with_kv is None


def test_floor_with_kv_cache_counts_the_cache_reads() -> None:
    kv = kv_bytes_per_step(num_layers=12, num_kv_heads=16, head_dim=64, context=1000, dtype_bytes=4)
    assert kv == 2 * 12 * 16 * 64 * 1000 * 4
    f = decode_floor(1_000_000_000, _bw(20.0), achieved_tokens_per_s=None, kv_bytes=kv)
    assert f.floor_with_kv_tokens_per_s == pytest.approx(20e9 / (1e9 + kv))
    assert f.achieved_fraction is None


def test_zero_weight_bytes_is_refused() -> None:
    with pytest.raises(RadtrtError):
        decode_floor(0, _bw(1.0), 1.0)


def test_torch_weight_bytes_are_layers_norm_and_lm_head_not_embedding() -> None:
    cfg = preset("mid").decoder
    with torch.device("meta"):
        lm = LlamaForCausalLM(cfg)
    d, i, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    per_layer = 4 * d * d + 3 * d * i + 2 * d  # q, k, v, o (16 KV heads = MHA), MLP, two norms
    expected = 4 * (layers * per_layer + d + cfg.vocab_size * d)
    assert torch_decoder_weight_bytes(lm) == expected
    assert expected == pytest.approx(748e6, rel=0.01)  # the mid preset: ~0.75 GB read per token in fp32


def test_tied_lm_head_is_still_counted() -> None:
    cfg = DecoderConfig(vocab_size=100, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    lm = LlamaForCausalLM(cfg)
    assert torch_decoder_weight_bytes(lm) >= 4 * 100 * 8


def test_bundle_weight_bytes_are_the_torch_decoders(tmp_path: Path) -> None:
    """Both sides of one model get one floor: the graph file's own bytes (graph, rotary tables) and the data
    file's alignment are not weights read per token."""
    from radtrt.exporter.onnx import export_decoder
    from radtrt.model.config import tiny_decoder

    lm = LlamaForCausalLM(tiny_decoder()).eval()
    export_decoder(lm, tmp_path / "decoder.onnx")
    # within 1%: a tiny graph keeps its norm weights inline (a mid-size one stores them outside too)
    assert bundle_decoder_weight_bytes(tmp_path / "decoder.onnx") == pytest.approx(torch_decoder_weight_bytes(lm),
                                                                                   rel=0.01)
    import onnx

    onnx.save(onnx.helper.make_model(onnx.helper.make_graph([], "g", [], [])), str(tmp_path / "empty.onnx"))
    with pytest.raises(RadtrtError, match="keeps no weights as external data"):
        bundle_decoder_weight_bytes(tmp_path / "empty.onnx")


def test_gemv_probe_reports_its_method() -> None:
    bw = measure_gemv_bandwidth(matrix_bytes=4 << 20, repeats=2)  # tiny: structure only, no timing claims
    assert bw.gb_per_s > 0 and bw.matrix_bytes == 4 << 20 and bw.repeats == 2 and bw.threads >= 1
    assert bw.best_ms <= bw.median_ms
    assert set(bw.probes) == {"torch.mv fp32", "numpy.matmul fp32"} and bw.gb_per_s == max(bw.probes.values())


def test_the_probes_blas_runs_on_the_threads_the_backends_were_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """With --threads 1, numpy's BLAS still read on every core: the floor was ~40% above one thread's, and labelled
    "1 threads"."""
    import numpy as np
    from threadpoolctl import threadpool_info

    seen: list[int] = []
    matmul = np.matmul

    def recording(*args: object, **kwargs: object) -> object:
        seen.extend(pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas")
        return matmul(*args, **kwargs)

    monkeypatch.setattr(np, "matmul", recording)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        bw = measure_gemv_bandwidth(matrix_bytes=1 << 20, repeats=1, decoder=preset("tiny").decoder)
    finally:
        torch.set_num_threads(before)
    assert bw.threads == 1 and seen and set(seen) == {1}


def test_decoder_matrix_shapes_follow_the_config() -> None:
    from radtrt.benchmarks.bandwidth import decoder_matrix_shapes

    cfg = DecoderConfig(vocab_size=500, hidden_size=64, intermediate_size=172, num_hidden_layers=3,
                        num_attention_heads=8, num_key_value_heads=2)
    layer, head = decoder_matrix_shapes(cfg)
    assert layer == [(64, 64), (16, 64), (16, 64), (64, 64), (172, 64), (172, 64), (64, 172)] and head == (500, 64)
    lm = LlamaForCausalLM(cfg)  # the same matrices as the model's Linear weights ([out, in])
    linears = sorted(tuple(m.weight.shape) for m in lm.model.layers[0].modules() if isinstance(m, torch.nn.Linear))
    assert linears == sorted(layer) and tuple(lm.lm_head.weight.shape) == head


def test_shaped_probe_is_reported_beside_the_floor_not_as_it() -> None:
    from radtrt.benchmarks.bandwidth import measure_shaped_gemv

    cfg = DecoderConfig(vocab_size=500, hidden_size=64, intermediate_size=172, num_hidden_layers=3,
                        num_attention_heads=8, num_key_value_heads=2)
    rate, nbytes = measure_shaped_gemv(cfg, min_bytes=1 << 20, repeats=1)
    per_layer = 4 * 64 * (64 * 2 + 16 * 2 + 172 * 3)
    assert rate > 0 and nbytes == 4 * 500 * 64 + 3 * per_layer  # capped at the config's layers
    bw = measure_gemv_bandwidth(matrix_bytes=4 << 20, repeats=1, decoder=cfg)
    assert bw.shaped_gb_per_s and bw.gb_per_s == max(bw.probes.values())  # the floor's rate is unchanged
    f = decode_floor(1_000_000_000, Bandwidth(gb_per_s=40.0, matrix_bytes=1, best_ms=1, median_ms=1, repeats=1,
                                              threads=2, shaped_gb_per_s=30.0), achieved_tokens_per_s=24.0)
    assert f.floor_tokens_per_s == pytest.approx(40.0) and f.achieved_fraction == pytest.approx(0.6)
    assert f.floor_shaped_tokens_per_s == pytest.approx(30.0) and f.achieved_fraction_shaped == pytest.approx(0.8)
