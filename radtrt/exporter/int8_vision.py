"""Vision INT8: a Q/DQ ONNX graph from the fp32 ``vision.onnx`` and the calibration's statistics.

ONNX Runtime's ``quantize_static`` in QDQ format (NVIDIA ModelOpt's ONNX PTQ would need
``onnxruntime-gpu`` 1.24 and ``onnx`` 1.21, replacing this environment's ONNX Runtime, so it is not
used). Choices, each measured (``radtrt calibrate``/``export`` report, and the INT8 notes):

* weights: INT8, symmetric, per output channel, in the 7-bit range (``ORT_REDUCE_RANGE``: ONNX Runtime's
  integer kernels saturate on x86 without VNNI otherwise); activations: INT8, symmetric (zero point 0), one
  static scale per tensor: the input absolute maximum of each linear layer over the calibration
  images, which ``radtrt calibrate`` records with forward hooks on the PyTorch model
  (``radtrt.calibration.stats``), passed to ``quantize_static`` as its calibration cache. ONNX
  Runtime's own MinMax calibration of the fp32 graph gives the same scales to float rounding (a test
  checks it) but runs every image again through an augmented graph that held 7.5 GB at 518 px; this
  way the export reruns nothing, and a calibration file fixes the vision scales as it fixes the
  decoder's. (Percentile 99.999 and entropy calibration gave the same cosine to 1e-4 on a trained
  phantom model.) This is the form TensorRT consumes as explicit quantization (it requires zero
  points of 0); biases stay float.
* only linear layers (``MatMul`` with a constant weight, the patch ``Conv``) are quantized, except
  those in ``KEEP_FLOAT``; LayerNorm, softmax and GELU have no Q/DQ and stay float; the attention's
  activation x activation MatMuls stay float too (excluded by name): quantizing them gave no
  speed-up with ONNX Runtime's CPU kernels (no integer kernel for a non-constant B), only error.
* outputs of the quantized layers are not re-quantized (``OpTypesToExcludeOutputQuantization``), so
  ONNX Runtime fuses each ``DQ -> MatMul`` into ``MatMulIntegerToFloat`` (integer GEMM, float output
  with the bias added) instead of ``QLinearMatMul`` + DQ; measured faster and closer to fp32.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from contextlib import contextmanager
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from radtrt.errors import fail
from radtrt.exporter.onnx import VISION_ROOT, module_of
from radtrt.exporter.quant import ORT_REDUCE_RANGE

VISION_OP_TYPES = ["MatMul", "Conv", "Gemm"]
# Linear layers left float, by module name: the projector (its output is the decoder's input).
# Measured on the default model's 100 held-out phantoms (SmoothQuant + INT8 KV bundle, only the vision
# graph re-quantized; README, "Vision >= 2.5x"), identical reports / 1 - min image cosine, 7-bit weights:
# projector float 93% / 9.6e-6; attention output projections float too 91% / 9.5e-6; everything INT8
# 89% / 7.3e-5. With 8-bit weights (saturating on this CPU, see ORT_REDUCE_RANGE) the same three were
# 85% / 9.7e-5, 90% / 3.0e-5 and 78% / 6.0e-4, which is why the attention projections used to stay float.
KEEP_FLOAT = ("mm_projector.*",)
_ORT_LOGGERS = ("onnxruntime.quantization", "root")


@contextmanager
def quiet_quantizer() -> Iterator[None]:
    """ONNX Runtime's quantization tools log an INFO line per node (thousands) and a pre-processing hint
    on the root logger; keep them to warnings that matter for the duration of the call."""
    loggers = [logging.getLogger(name if name != "root" else None) for name in _ORT_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def activation_matmuls(path: Path) -> list[str]:
    """MatMul nodes with no constant input (attention's q@k^T and p@v): they stay float.

    (``MatMulConstBOnly`` would say the same, but ONNX Runtime 1.32's QDQ quantizer ignores it.)
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    constants = {i.name for i in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and not any(i in constants for i in n.input)]


def float_modules(path: Path, patterns: Sequence[str]) -> list[str]:
    """Names of the linear nodes exported from modules matching ``patterns`` (fnmatch, module names)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return [n.name for n in model.graph.node if n.op_type in VISION_OP_TYPES
            and any(fnmatchcase(module_of(n, VISION_ROOT), p) for p in patterns)]


def activation_ranges(path: Path, input_absmax: Mapping[str, torch.Tensor], exclude: set[str]) -> dict[str, float]:
    """Per-tensor absolute maximum of each quantized node's activation input, from its module's per-channel
    input maxima (the graph's linear nodes carry the module they came from, ``module_of``)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    ranges: dict[str, float] = {}
    for node in model.graph.node:
        if node.op_type not in VISION_OP_TYPES or node.name in exclude:
            continue
        module = module_of(node, VISION_ROOT)
        if module not in input_absmax:
            fail(f"the calibration has no vision statistics for '{module or node.name}': it was made for another "
                 "model or by an older radtrt; re-run 'radtrt calibrate'")
        absmax = float(input_absmax[module].float().max())
        ranges[node.input[0]] = max(ranges.get(node.input[0], 0.0), absmax)
    return ranges


@contextmanager
def _read_back_errors(folder: Path) -> Iterator[None]:
    """ONNX Runtime's quantizer writes a shape-inferred copy of the graph beside it and reads it back; onnx's
    writer ignores a full disk, so the read met a truncated file and its protobuf DecodeError was a traceback."""
    from google.protobuf.message import DecodeError

    try:
        yield
    except DecodeError:
        free = shutil.disk_usage(folder).free
        fail(f"ONNX Runtime's quantizer could not read back the vision graph it wrote in {folder} (the file is cut "
             f"short: a full disk? {free / 1e6:.0f} MB free there)")


def quantize_vision(fp32_model: Path, out: Path, input_absmax: Mapping[str, torch.Tensor], *,
                    keep_float: Sequence[str] = KEEP_FLOAT, reduce_range: bool = ORT_REDUCE_RANGE) -> dict[str, Any]:
    """Write the Q/DQ INT8 vision graph (external weights next to it); returns what the manifest records.

    ``input_absmax``: per-channel input absolute maxima by module name (``CalibrationFile.vision.inputs``)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data

    exclude = activation_matmuls(fp32_model) + float_modules(fp32_model, keep_float)
    ranges = activation_ranges(fp32_model, input_absmax, set(exclude))
    if not ranges:
        fail("the vision graph has no linear layer to quantize (has the exporter changed?)")
    extra = {"ActivationSymmetric": True, "WeightSymmetric": True,
             "QuantizeBias": False,  # biases stay float: TensorRT's explicit quantization has no int32 bias Q/DQ
             "OpTypesToExcludeOutputQuantization": VISION_OP_TYPES}
    with tempfile.TemporaryDirectory(prefix=".radtrt-vision-ranges-", dir=out.parent) as tmp:
        cache = Path(tmp) / "ranges.json"  # quantize_static's calibration cache: it then runs no calibration
        save_tensors_data(TensorsData(CalibrationMethod.MinMax, {
            name: TensorData(lowest=np.array(-a, dtype=np.float32), highest=np.array(a, dtype=np.float32))
            for name, a in ranges.items()}), cache)
        with quiet_quantizer(), _read_back_errors(fp32_model.parent):  # where ORT writes its inferred copy
            quantize_static(str(fp32_model), str(out), None, quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, reduce_range=reduce_range,
                            op_types_to_quantize=VISION_OP_TYPES, nodes_to_exclude=exclude,
                            calibrate_method=CalibrationMethod.MinMax, calibration_cache_path=str(cache),
                            use_external_data_format=True, extra_options=extra)
    return {"method": "onnxruntime quantize_static QDQ",
            "calibration": "per-tensor input absmax of each linear layer (the calibration file's vision statistics)",
            "quantized_tensors": len(ranges),
            "weights": "int8 symmetric per output channel" + (", 7-bit range (reduce_range)" if reduce_range else ""),
            "activations": "int8 symmetric per tensor (static)",
            "quantized_ops": "linear layers (MatMul with constant weight, patch Conv)",
            "float_ops": "LayerNorm, Softmax, GELU, attention activation x activation MatMuls",
            "float_linears": list(keep_float),
            "image_embeds_dtype": "float32"}
