"""INT8 decoder graphs quantized one weight matrix at a time.

Why: ONNX Runtime's quantizers load the whole fp32 graph into memory and hold it with its quantized copy
until they save. Measured (RssAnon, sampled every 0.1-0.25 s): ``quantize_dynamic`` +2.3 GB for the
mid-size decoder's 0.88 GB and +7 GB on a Vicuna-shaped 3-layer decoder (3.5 GB), then the peak of the
whole INT8 export; ``MatMulNBitsQuantizer`` +4.5 GB on the latter. At Vicuna-7B's 27 GB that is tens of
GB. Here each weight is read through a memory map and its quantized form appended to the new data file
(``radtrt.exporter.external``), so memory holds about one weight matrix at a time, and the graph written is
the one the library writes:

* ``quantize_w8a8``: what ``quantize_dynamic(per_channel=True, reduce_range=..., weight_type=QInt8,
  op_types_to_quantize=["MatMul"])`` writes for a MatMul with a constant weight -- one
  ``DynamicQuantizeLinear`` per activation (uint8, shared by the MatMuls reading it), ``MatMulInteger`` with
  the int8 weight and per-output-channel zero points of 0, ``Cast`` to float and a ``Mul`` by activation
  scale x weight scale (fused into ``DynamicQuantizeMatMul`` by ONNX Runtime at load). Each weight column
  goes through ONNX Runtime's own ``quant_utils.quantize_data``. A graph with an activation x activation
  MatMul (``--attention plain``), which ``quantize_dynamic`` also quantizes, is refused here.
* ``quantize_nbits8``: what ``MatMulNBitsQuantizer(bits=8, is_symmetric=True, ...)`` writes -- each
  constant-weight MatMul as ``MatMulNBits`` (com.microsoft), its blocks packed by the library's own
  ``DefaultWeightOnlyQuantizer.qbits_block_quant``; other MatMuls are left as they are, as there.

Both are checked against the library's output tensor for tensor (``tests/test_streamed_quant.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from radtrt.errors import fail
from radtrt.exporter.external import TensorFile, rewrite_graph_file
from radtrt.progress import progress_callback

# (the MatMul, its weight, the store) -> nodes replacing it, new initializers
Rewrite = Callable[[onnx.NodeProto, np.ndarray, TensorFile], tuple[list[onnx.NodeProto], list[TensorProto]]]


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


def _rewrite_matmuls(src: Path, out: Path, exclude: set[str], rewrite: Rewrite, progress: Any, what: str, *,
                     refuse_activation_products: bool = False) -> int:
    """Write ``out`` (+ ``out.name + '.data'``): ``src`` with each chosen MatMul replaced by ``rewrite``'s
    nodes, in place in the node order; returns how many were replaced."""
    replaced = 0

    def edit(model: onnx.ModelProto, store: TensorFile) -> None:
        nonlocal replaced
        graph = model.graph
        targets, activation_products = constant_weight_matmuls(graph, exclude)
        if activation_products and refuse_activation_products:
            fail("the decoder graph multiplies two activations (plain attention): quantize it with quantize_dynamic")
        weights = {i.name: i for i in graph.initializer}
        chosen = {id(n) for n in targets}
        tick = progress_callback(progress, f"{what}: {len(targets)} weight matrices", len(targets))
        nodes: list[onnx.NodeProto] = []
        new_weights: list[TensorProto] = []
        for node in graph.node:
            if id(node) not in chosen:
                nodes.append(node)
                continue
            replacement, tensors = rewrite(node, store.read(weights[node.input[1]]), store)
            nodes += replacement
            new_weights += tensors
            replaced += 1
            if tick:
                tick(replaced)
        still_read = {i for n in nodes for i in n.input}
        kept = [t for t in graph.initializer if t.name in still_read]
        del graph.initializer[:]
        graph.initializer.extend(kept + new_weights)
        del graph.node[:]
        graph.node.extend(nodes)
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))

    rewrite_graph_file(src, out, edit)
    return replaced


def quantize_w8a8(src: Path, out: Path, *, exclude: set[str], reduce_range: bool, progress: Any = None) -> int:
    """Dynamic W8A8 (``quantize_dynamic``'s graph) of every constant-weight MatMul not in ``exclude``."""
    quantized_inputs: dict[str, tuple[str, str, str]] = {}

    def rewrite(node: onnx.NodeProto, weight: np.ndarray, store: TensorFile) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
        x, w_name, y = node.input[0], node.input[1], node.output[0]
        nodes = []
        if x not in quantized_inputs:
            quantized_inputs[x] = (x + "_quantized", x + "_scale", x + "_zero_point")
            nodes.append(helper.make_node("DynamicQuantizeLinear", [x], list(quantized_inputs[x]),
                                          name=x + "_QuantizeLinear"))
        xq, xs, xz = quantized_inputs[x]
        q, scale = per_channel_int8(weight, reduce_range)
        tensors = [store.add(q, w_name + "_quantized"), numpy_helper.from_array(scale, w_name + "_scale"),
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
        return nodes, tensors

    return _rewrite_matmuls(src, out, exclude, rewrite, progress, "W8A8", refuse_activation_products=True)


def quantize_nbits8(src: Path, out: Path, *, exclude: set[str], block_size: int, accuracy_level: int,
                    progress: Any = None) -> int:
    """Weight-only INT8 ``MatMulNBits`` (``MatMulNBitsQuantizer``'s graph, symmetric) of every constant-weight
    MatMul not in ``exclude``."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, DefaultWeightOnlyQuantizer

    quantizer = DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(
        block_size=block_size, is_symmetric=True, accuracy_level=accuracy_level, bits=8))

    def rewrite(node: onnx.NodeProto, weight: np.ndarray, store: TensorFile) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
        w_name = node.input[1]
        packed, scales, _ = quantizer.qbits_block_quant(np.ascontiguousarray(weight, dtype=np.float32))
        tensors = [store.add(packed, w_name + "_Q8"), numpy_helper.from_array(scales, w_name + "_scales")]
        rows, cols = weight.shape
        attrs = {"K": rows, "N": cols, "bits": 8, "block_size": block_size}
        if accuracy_level:
            attrs["accuracy_level"] = accuracy_level
        return [helper.make_node("MatMulNBits", [node.input[0], w_name + "_Q8", w_name + "_scales"], [node.output[0]],
                                 name=node.name + "_Q8" if node.name else "", domain="com.microsoft", **attrs)], tensors

    return _rewrite_matmuls(src, out, exclude, rewrite, progress, "weight-only INT8")
