"""The decode bandwidth floor: on a CPU, each generated token reads every decoder weight once.

A decode step is a chain of matrix-vector products, so its speed is set by how fast the host streams
weights from memory, not by FLOPs. We measure that rate directly, as an fp32 GEMV over a matrix far
larger than the caches (best of several runs, all threads, with torch and with numpy's BLAS), and derive

    floor tokens/s   = bandwidth / bytes read per token
    achieved fraction = measured tokens/s / floor tokens/s

Bytes per token counts the decoder's layer weights, final norm and ``lm_head``, but not the token
embedding table (a step reads one row of it). The KV cache is also read every step; it is reported
separately (``floor_with_kv``) because it grows with the context and is not a property of the model.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from radtrt.errors import fail
from radtrt.model.config import DecoderConfig

DEFAULT_MATRIX_BYTES = 512 << 20


@dataclass(frozen=True)
class Bandwidth:
    """Matrix-vector read bandwidth of this host: the best of the probes, each timed in this process."""

    gb_per_s: float  # 1 GB = 1e9 bytes
    matrix_bytes: int
    best_ms: float
    median_ms: float
    repeats: int
    threads: int
    method: str = "torch.mv fp32"
    probes: dict[str, float] = field(default_factory=dict)  # GB/s of every probe that ran
    # numpy's GEMV over the decoder's own matrix shapes (``measure_shaped_gemv``): a diagnostic printed
    # beside the floor, never the floor itself (that stays the host's best streaming rate above)
    shaped_gb_per_s: float | None = None
    shaped_bytes: int | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _time_best(fn: Callable[[], object], repeats: int) -> list[float]:
    times = []
    for i in range(repeats + 2):
        t0 = time.perf_counter()
        fn()
        if i >= 2:  # two warmups: page faults, thread pool start
            times.append(time.perf_counter() - t0)
    return sorted(times)


def decoder_matrix_shapes(cfg: DecoderConfig) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """``[out, in]`` of the weight matrices one decode step multiplies: one layer's (q, k, v, o, gate, up,
    down) and ``lm_head``'s."""
    h, kv = cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim
    layer = [(h, h), (kv, h), (kv, h), (h, h), (cfg.intermediate_size, h), (cfg.intermediate_size, h),
             (h, cfg.intermediate_size)]
    return layer, (cfg.vocab_size, h)


def measure_shaped_gemv(cfg: DecoderConfig, min_bytes: int = DEFAULT_MATRIX_BYTES, repeats: int = 5) -> tuple[float, int]:
    """GB/s of numpy's GEMV over fp32 matrices of the decoder's own shapes, one after another as a decode step
    runs them (``lm_head`` and as many layers as make ``min_bytes``, at least one; not the whole model, so a
    7B config allocates about one layer and ``lm_head``). Why: the floor's probe streams one large matrix, the
    best case; a step's matrices are small (a few MB each, each product its own parallel region), and this
    rate shows what a good BLAS gets on them, so a reader can tell the library's share of a gap from the
    shapes' share. Returns (GB/s, bytes per pass)."""
    import numpy as np

    layer, head = decoder_matrix_shapes(cfg)
    layer_bytes = 4 * sum(o * i for o, i in layer)
    n_layers = max(1, min(cfg.num_hidden_layers, -(-(min_bytes - 4 * head[0] * head[1]) // layer_bytes)))
    shapes = layer * n_layers + [head]
    mats = [np.full(shape, 0.5, dtype=np.float32) for shape in shapes]
    vecs = {i: np.ones(i, dtype=np.float32) for _, i in shapes}
    outs = [np.empty(o, dtype=np.float32) for o, _ in shapes]

    def step() -> None:
        for m, out in zip(mats, outs):
            np.matmul(m, vecs[m.shape[1]], out=out)

    nbytes = sum(m.nbytes for m in mats)
    return nbytes / _time_best(step, repeats)[0] / 1e9, nbytes


def _stream_probes(matrix_bytes: int, repeats: int) -> tuple[dict[str, list[float]], int]:
    """Sorted run times of ``torch.mv`` and numpy's ``matmul`` over one fp32 matrix, and its bytes."""
    import numpy as np
    import torch

    cols = 4096
    rows = max(matrix_bytes // (4 * cols), 1)
    matrix = np.full((rows, cols), 0.5, dtype=np.float32)  # filled, so every page is really mapped
    vector = np.ones(cols, dtype=np.float32)
    out = np.empty(rows, dtype=np.float32)
    t_matrix, t_vector, t_out = torch.from_numpy(matrix), torch.from_numpy(vector), torch.from_numpy(out)
    with torch.no_grad():
        results = {"torch.mv fp32": _time_best(lambda: torch.mv(t_matrix, t_vector, out=t_out), repeats),
                   "numpy.matmul fp32": _time_best(lambda: np.matmul(matrix, vector, out=out), repeats)}
    return results, matrix.nbytes


def measure_gemv_bandwidth(matrix_bytes: int = DEFAULT_MATRIX_BYTES, repeats: int = 10,
                           decoder: DecoderConfig | None = None) -> Bandwidth:
    """Stream an fp32 matrix through ``torch.mv`` and numpy's BLAS ``matmul``; the best run of the
    faster one is the host's attainable rate (libraries differ by up to ~30% on the same host). With
    ``decoder``, also ``measure_shaped_gemv`` for it."""
    import torch
    from threadpoolctl import threadpool_limits

    if matrix_bytes < 1 << 20 or repeats < 1:
        fail("the bandwidth probe needs at least 1 MiB and one repeat")
    threads = torch.get_num_threads()  # what --threads set for the backends
    # numpy's BLAS has its own pool: with --threads 1 it read on both cores, a floor ~40% above one thread's
    with threadpool_limits(limits=threads, user_api="blas"):
        results, nbytes = _stream_probes(matrix_bytes, repeats)  # its matrix is freed before the shaped probe
        shaped, shaped_bytes = measure_shaped_gemv(decoder, matrix_bytes) if decoder is not None else (None, None)
    probes = {name: nbytes / times[0] / 1e9 for name, times in results.items()}
    method = max(probes, key=probes.__getitem__)
    times = results[method]
    return Bandwidth(gb_per_s=probes[method], matrix_bytes=nbytes, best_ms=times[0] * 1e3,
                     median_ms=times[len(times) // 2] * 1e3, repeats=repeats, threads=threads,
                     method=method, probes=probes, shaped_gb_per_s=shaped, shaped_bytes=shaped_bytes)


def torch_decoder_weight_bytes(lm: Any) -> int:
    """Bytes a decode step reads from a radtrt ``LlamaForCausalLM``: layers, final norm, ``lm_head``."""
    params = [*lm.model.layers.parameters(), *lm.model.norm.parameters(), lm.lm_head.weight]
    return sum(p.numel() * p.element_size() for p in params)


def bundle_decoder_weight_bytes(graph: Path) -> int:
    """Bytes of the decoder graph's weights: its initializers stored as external data (every layer weight
    and ``lm_head``, and the norms except in tiny graphs, where they stay inline: 0.3% of the bytes; the
    embedding table lives in its own file).

    Why not the files' sizes: the graph file itself holds the graph and small constants (rotary tables,
    read a row per step), 22% of a tiny decoder's bytes, so the same model got two different floors on
    torch and ONNX Runtime; and the data file's page alignment is not read either."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    total = 0
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            total += int({e.key: e.value for e in tensor.external_data}.get("length", 0))
    if total == 0:
        fail(f"{graph} keeps no weights as external data (not a radtrt export?); re-export the bundle")
    return total


def kv_bytes_per_step(num_layers: int, num_kv_heads: int, head_dim: int, context: float, dtype_bytes: int) -> float:
    """Keys and values a decode step reads at a given context length."""
    return 2.0 * num_layers * num_kv_heads * head_dim * context * dtype_bytes


@dataclass(frozen=True)
class DecodeFloor:
    """Floor and achieved fraction for one backend; ``*_with_kv`` also counts the KV cache reads."""

    weight_bytes: int
    bandwidth_gb_per_s: float
    floor_tokens_per_s: float
    achieved_tokens_per_s: float | None
    achieved_fraction: float | None
    kv_bytes_at_mean_context: float | None = None
    floor_with_kv_tokens_per_s: float | None = None
    achieved_fraction_with_kv: float | None = None
    floor_shaped_tokens_per_s: float | None = None  # weights only, at ``Bandwidth.shaped_gb_per_s``
    achieved_fraction_shaped: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def decode_floor(weight_bytes: int, bandwidth: Bandwidth, achieved_tokens_per_s: float | None,
                 kv_bytes: float | None = None) -> DecodeFloor:
    if weight_bytes <= 0:
        fail("decoder weight bytes must be positive")
    rate = bandwidth.gb_per_s * 1e9
    floor = rate / weight_bytes
    frac = achieved_tokens_per_s / floor if achieved_tokens_per_s is not None else None
    floor_kv = rate / (weight_bytes + kv_bytes) if kv_bytes is not None else None
    frac_kv = (achieved_tokens_per_s / floor_kv if achieved_tokens_per_s is not None and floor_kv is not None
               else None)
    shaped = bandwidth.shaped_gb_per_s * 1e9 / weight_bytes if bandwidth.shaped_gb_per_s else None
    frac_shaped = achieved_tokens_per_s / shaped if achieved_tokens_per_s is not None and shaped else None
    return DecodeFloor(weight_bytes=weight_bytes, bandwidth_gb_per_s=bandwidth.gb_per_s, floor_tokens_per_s=floor,
                       achieved_tokens_per_s=achieved_tokens_per_s, achieved_fraction=frac,
                       kv_bytes_at_mean_context=kv_bytes, floor_with_kv_tokens_per_s=floor_kv,
                       achieved_fraction_with_kv=frac_kv, floor_shaped_tokens_per_s=shaped,
                       achieved_fraction_shaped=frac_shaped)
