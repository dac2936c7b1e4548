"""W8A8 dynamic quantization of a decoder graph, one weight matrix at a time.

Why: ONNX Runtime's ``quantize_dynamic`` loads the whole fp32 graph into memory, and holds it and its
quantized copy until it saves. Measured (RssAnon, sampled every 0.1 s): +2.3 GB during the call for the
mid-size decoder's 0.88 GB, and on a Vicuna-shaped 3-layer decoder (3.5 GB) +7 GB, the peak of the whole
INT8 export; at Vicuna-7B's 27 GB that is tens of GB. This writes the same graph while reading each weight
through a memory map and appending its int8 copy to the new data file (``radtrt.exporter.external``), so
memory holds about one weight matrix at a time.

"The same graph": what ``quantize_dynamic(per_channel=True, reduce_range=..., weight_type=QInt8,
op_types_to_quantize=["MatMul"])`` writes for a MatMul with a constant weight -- one
``DynamicQuantizeLinear`` per activation (uint8, shared by the MatMuls reading it), ``MatMulInteger`` with the
int8 weight and per-output-channel zero points of 0, ``Cast`` to float, and a ``Mul`` by activation scale x
weight scale, which ONNX Runtime fuses into ``DynamicQuantizeMatMul`` at load. Each weight column goes
through ONNX Runtime's own ``quant_utils.quantize_data``, so weights and scales are the library's, bit for
bit (a test compares both graphs' tensors). Only constant-weight MatMuls are handled: a graph with an
activation x activation MatMul (``--attention plain``) is quantized by ``quantize_dynamic`` itself.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from radtrt.errors import fail
from radtrt.exporter.external import TensorFile


def per_channel_int8(weight: np.ndarray, reduce_range: bool) -> tuple[np.ndarray, np.ndarray]:
    """``[K, N]`` fp32 -> int8 weight and ``[N]`` scales, symmetric per output column (zero points 0), as
    ONNX Runtime's quantizer computes them."""
    from onnxruntime.quantization.quant_utils import quantize_data

    columns, scales = [], []
    for j in range(weight.shape[1]):
        zero_point, scale, q = quantize_data(np.asarray(weight[:, j], dtype=np.float32), TensorProto.INT8, True,
                                             reduce_range=reduce_range)
        if np.any(zero_point != 0):
            fail("symmetric int8 weight quantization gave a nonzero zero point (unexpected ONNX Runtime version?)")
        columns.append(np.asarray(q, dtype=np.int8))
        scales.append(np.float32(np.asarray(scale).reshape(-1)[0]))
    return np.stack(columns, axis=1), np.array(scales, dtype=np.float32)


def constant_weight_matmuls(graph: onnx.GraphProto, exclude: set[str]) -> tuple[list[onnx.NodeProto], bool]:
    """The MatMuls to quantize (fp32 constant weight, not excluded), and whether any MatMul multiplies two
    activations (which this module does not handle)."""
    weights = {i.name: i for i in graph.initializer}
    chosen, activation_only = [], False
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        weight = weights.get(node.input[1])
        if weight is None:
            activation_only = True
        elif weight.data_type == TensorProto.FLOAT and len(weight.dims) == 2 and node.name not in exclude:
            chosen.append(node)
    return chosen, activation_only


def quantize_matmuls_streaming(src: Path, out: Path, *, exclude: set[str], reduce_range: bool) -> int:
    """Write ``out`` (+ ``out.name + '.data'``): ``src`` with its constant-weight MatMuls as dynamic W8A8.
    Returns how many were quantized."""
    model = onnx.load(str(src), load_external_data=False)
    graph = model.graph
    targets, activation_only = constant_weight_matmuls(graph, exclude)
    if activation_only:
        fail("the decoder graph multiplies two activations (plain attention): quantize it with quantize_dynamic")
    weights = {i.name: i for i in graph.initializer}
    location = out.name + ".data"
    fresh = out.with_name(location + ".new")
    by_node = {id(n): n for n in targets}
    quantized_inputs: dict[str, tuple[str, str, str]] = {}
    nodes: list[onnx.NodeProto] = []
    new_weights: list[TensorProto] = []
    with TensorFile(src.parent, fresh, location) as store:
        for node in graph.node:
            if id(node) not in by_node:
                nodes.append(node)
                continue
            x, w_name, y = node.input[0], node.input[1], node.output[0]
            if x not in quantized_inputs:
                quantized_inputs[x] = (x + "_quantized", x + "_scale", x + "_zero_point")
                nodes.append(helper.make_node("DynamicQuantizeLinear", [x], list(quantized_inputs[x]),
                                              name=x + "_QuantizeLinear"))
            xq, xs, xz = quantized_inputs[x]
            q, scale = per_channel_int8(store.read(weights[w_name]), reduce_range)
            new_weights += [store.add(q, w_name + "_quantized"), numpy_helper.from_array(scale, w_name + "_scale"),
                            numpy_helper.from_array(np.zeros(scale.shape, np.int8), w_name + "_zero_point")]
            base = node.name or y
            nodes += [helper.make_node("Mul", [xs, w_name + "_scale"], [base + "_quant_scales_mul:0"],
                                       name=base + "_quant_scales_mul"),
                      helper.make_node("MatMulInteger", [xq, w_name + "_quantized", xz, w_name + "_zero_point"],
                                       [y + "_output_quantized"], name=base + "_quant"),
                      helper.make_node("Cast", [y + "_output_quantized"], [y + "_output_quantized_cast_output"],
                                       name=y + "_output_quantized_cast", to=TensorProto.FLOAT),
                      helper.make_node("Mul", [y + "_output_quantized_cast_output", base + "_quant_scales_mul:0"], [y],
                                       name=base + "_quant_output_scale_mul")]
        still_read = {i for n in nodes for i in n.input}
        kept = [t for t in graph.initializer if t.name in still_read]
        del graph.initializer[:]
        graph.initializer.extend(kept + new_weights)
        del graph.node[:]
        graph.node.extend(nodes)
        store.finish(graph)
    fresh.replace(out.with_name(location))
    onnx.save(model, str(out))
    return len(targets)
