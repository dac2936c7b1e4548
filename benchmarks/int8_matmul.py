"""One decode step's matrix products alone (M = 1), fp32 against the two INT8 forms radtrt's bundles use.

Why: it separates what ONNX Runtime's integer kernels give on this CPU from everything else in a decode step,
so a decode speed-up below target can be read as kernel-bound or not. The shapes are a decoder preset's own
(packed q/k/v and gate/up, as the fused bundles hold them, and lm_head); weights are random. The three graphs
run interleaved in one process, with threads that do not spin (a spinning session would steal the cores of
the next one), and the ratios come from that one run.

    python benchmarks/int8_matmul.py [--preset mid] [--runs 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from radtrt.exporter.int8_decoder import NBITS_ACCURACY_LEVEL, NBITS_BLOCK, REDUCE_RANGE
from radtrt.exporter.streamed_quant import quantize_nbits8, quantize_w8a8
from radtrt.model.config import PRESETS, preset

KINDS = ("fp32", "w8a8", "w8-nbits")


def decoder_shapes(name: str) -> list[tuple[int, int]]:
    """(K, N) of every weight product of one decode step of the preset's decoder."""
    d = preset(name).decoder
    kv = d.num_key_value_heads * d.head_dim
    layer = [(d.hidden_size, d.hidden_size + 2 * kv), (d.hidden_size, d.hidden_size),
             (d.hidden_size, 2 * d.intermediate_size), (d.intermediate_size, d.hidden_size)]
    return layer * d.num_hidden_layers + [(d.hidden_size, d.vocab_size)]


def build_graphs(shapes: list[tuple[int, int]], folder: Path, seed: int = 0) -> dict[str, Path]:
    """The fp32 products with random weights, and the same graph through radtrt's own INT8 quantizers (the
    bundles' operators and weights: W8A8 with its 7-bit weights, weight-only ``MatMulNBits``)."""
    rng = np.random.default_rng(seed)
    nodes, inits, outputs = [], [], []
    for i, (k, n) in enumerate(shapes):
        inits.append(numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32) * 0.02, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [f"x{k}", f"w{i}"], [f"y{i}"], name=f"product{i}"))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None))
    inputs = [helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, [1, k]) for k in sorted({k for k, _ in shapes})]
    model = helper.make_model(helper.make_graph(nodes, "products", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    paths = {kind: folder / f"{kind}.onnx" for kind in KINDS}
    onnx.save(model, str(paths["fp32"]), save_as_external_data=True, location="fp32.onnx.data")
    quantize_w8a8(paths["fp32"], paths["w8a8"], exclude=set(), reduce_range=REDUCE_RANGE)
    quantize_nbits8(paths["fp32"], paths["w8-nbits"], exclude=set(), block_size=NBITS_BLOCK,
                    accuracy_level=NBITS_ACCURACY_LEVEL)
    return paths


def _at_least_one(text: str) -> int:
    """argparse type: a median of no runs printed 'nan ms', exit 0."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="mid", choices=list(PRESETS))
    parser.add_argument("--runs", type=_at_least_one, default=10)
    parser.add_argument("--threads", type=_at_least_one, default=2)
    args = parser.parse_args(argv)
    shapes = decoder_shapes(args.preset)
    params = sum(k * n for k, n in shapes)
    rng = np.random.default_rng(1)
    feeds = {f"x{k}": rng.standard_normal((1, k), dtype=np.float32) for k in {k for k, _ in shapes}}
    sessions = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind, path in build_graphs(shapes, Path(tmp)).items():
            so = ort.SessionOptions()
            so.intra_op_num_threads = args.threads
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            sessions[kind] = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        times: dict[str, list[float]] = {kind: [] for kind in sessions}
        for _ in range(args.runs + 2):  # two warm-up rounds
            for kind, session in sessions.items():
                t0 = time.perf_counter()
                session.run(None, feeds)
                times[kind].append(time.perf_counter() - t0)
    print(f"{len(shapes)} products (M = 1) of the '{args.preset}' decoder, {params / 1e6:.0f}M weights, "
          f"onnxruntime {ort.__version__}, {args.threads} threads, median of {args.runs}")
    base = float(np.median(times["fp32"][2:]))
    for kind, t in times.items():
        median = float(np.median(t[2:]))
        weight_bytes = params * (4 if kind == "fp32" else 1)
        print(f"  {kind:9s} {median * 1e3:7.1f} ms  {weight_bytes / median / 1e9:5.1f} GB/s of weights  "
              f"{base / median:4.2f}x fp32")
    print("reproduce: python " + " ".join([sys.argv[0], *sys.argv[1:]]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
