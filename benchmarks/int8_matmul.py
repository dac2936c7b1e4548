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

from radtrt.model.config import preset

NBITS_BLOCK = 128


def decoder_shapes(name: str) -> list[tuple[int, int]]:
    """(K, N) of every weight product of one decode step of the preset's decoder."""
    d = preset(name).decoder
    kv = d.num_key_value_heads * d.head_dim
    layer = [(d.hidden_size, d.hidden_size + 2 * kv), (d.hidden_size, d.hidden_size),
             (d.hidden_size, 2 * d.intermediate_size), (d.intermediate_size, d.hidden_size)]
    return layer * d.num_hidden_layers + [(d.hidden_size, d.vocab_size)]


def _graph(kind: str, shapes: list[tuple[int, int]], rng: np.random.Generator) -> onnx.ModelProto:
    nodes, inits, outputs = [], [], []
    for i, (k, n) in enumerate(shapes):
        w = rng.standard_normal((k, n), dtype=np.float32) * 0.02
        x, y = f"x{k}", f"y{i}"
        if kind == "fp32":
            inits.append(numpy_helper.from_array(w, f"w{i}"))
            nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [y]))
        elif kind == "w8a8":  # SmoothQuant's graph before ONNX Runtime fuses it into DynamicQuantizeMatMul,
            scale = np.abs(w).max(0) / 64  # with its 7-bit weights (ORT_REDUCE_RANGE: no int16 saturation)
            inits += [numpy_helper.from_array(np.round(w / scale).astype(np.int8), f"w{i}"),
                      numpy_helper.from_array(scale.astype(np.float32), f"s{i}")]
            nodes += [helper.make_node("DynamicQuantizeLinear", [x], [f"q{i}", f"qs{i}", f"qz{i}"]),
                      helper.make_node("MatMulInteger", [f"q{i}", f"w{i}", f"qz{i}"], [f"m{i}"]),
                      helper.make_node("Cast", [f"m{i}"], [f"f{i}"], to=TensorProto.FLOAT),
                      helper.make_node("Mul", [f"qs{i}", f"s{i}"], [f"ss{i}"]),
                      helper.make_node("Mul", [f"f{i}", f"ss{i}"], [y])]
        else:  # weight-only: MatMulNBits, 8 bits, symmetric (zero point 128), int8 compute
            blocks = -(-k // NBITS_BLOCK)
            wt = np.zeros((n, blocks * NBITS_BLOCK), np.float32)
            wt[:, :k] = w.T
            wt = wt.reshape(n, blocks, NBITS_BLOCK)
            scale = np.abs(wt).max(-1) / 127 + 1e-12
            q = (np.clip(np.round(wt / scale[..., None]), -127, 127) + 128).astype(np.uint8)
            inits += [numpy_helper.from_array(q, f"w{i}"),
                      numpy_helper.from_array(scale.astype(np.float32).reshape(-1), f"s{i}")]
            nodes.append(helper.make_node("MatMulNBits", [x, f"w{i}", f"s{i}"], [y], domain="com.microsoft",
                                          K=k, N=n, bits=8, block_size=NBITS_BLOCK, accuracy_level=4))
        outputs.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, None))
    inputs = [helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, [1, k]) for k in sorted({k for k, _ in shapes})]
    graph = helper.make_graph(nodes, kind, inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="mid")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    shapes = decoder_shapes(args.preset)
    params = sum(k * n for k, n in shapes)
    rng = np.random.default_rng(0)
    feeds = {f"x{k}": rng.standard_normal((1, k), dtype=np.float32) for k in {k for k, _ in shapes}}
    sessions = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("fp32", "w8a8", "w8-nbits"):
            path = Path(tmp) / f"{kind}.onnx"
            onnx.save(_graph(kind, shapes, rng), str(path), save_as_external_data=True, location=f"{kind}.data")
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
