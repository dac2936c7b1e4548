"""Vision INT8: a Q/DQ ONNX graph from the fp32 ``vision.onnx`` and calibration pixels.

ONNX Runtime's ``quantize_static`` in QDQ format (NVIDIA ModelOpt's ONNX PTQ would need
``onnxruntime-gpu`` 1.24 and ``onnx`` 1.21, replacing this environment's ONNX Runtime, so it is not
used). Choices, each measured (``radtrt calibrate``/``export`` report, and the INT8 notes):

* weights: INT8, symmetric, per output channel; activations: INT8, symmetric (zero point 0), one
  static scale per tensor from the calibration images' min/max (percentile 99.999 and entropy
  calibration gave the same cosine to 1e-4 on a trained phantom model, and print to stdout). This
  is the form TensorRT consumes as explicit quantization (it requires zero points of 0); biases
  stay float.
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
from contextlib import contextmanager
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from onnxruntime.quantization import CalibrationDataReader

from radtrt.errors import fail

VISION_OP_TYPES = ["MatMul", "Conv", "Gemm"]
# Linear layers left float, by module name: the attention output projections (their input, the
# attention output, has outliers a per-tensor scale serves badly) and the projector (its output is
# the decoder's input). Keeping them float trades some speed for report parity on the trained
# default model; the README's INT8 table has the measured numbers and the commands.
KEEP_FLOAT = ("vision_tower.blocks.*.attn.proj", "mm_projector.*")
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


class PixelReader(CalibrationDataReader):
    """``CalibrationDataReader``: one preprocessed image per batch (what ``radtrt infer`` feeds)."""

    def __init__(self, pixels: list[torch.Tensor], input_name: str = "pixel_values") -> None:
        self._batches = [{input_name: p[None].float().numpy()} for p in pixels]
        self._next, self._end = 0, len(self._batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= self._end:
            return None
        self._next += 1
        return self._batches[self._next - 1]

    def __len__(self) -> int:
        return len(self._batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        """``CalibStridedMinMax`` calibrates one slice at a time and merges the ranges."""
        self._next, self._end = start_index, min(end_index, len(self._batches))


def activation_matmuls(path: Path) -> list[str]:
    """MatMul nodes with no constant input (attention's q@k^T and p@v): they stay float.

    (``MatMulConstBOnly`` would say the same, but ONNX Runtime 1.32's QDQ quantizer ignores it.)
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    constants = {i.name for i in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and not any(i in constants for i in n.input)]


def module_of(node: Any) -> str:
    """The innermost PyTorch module a node was exported from (the dynamo exporter's name scopes), or ''."""
    import ast

    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            scopes = [s for s in ast.literal_eval(prop.value) if s.startswith("model.")]
            return scopes[-1].removeprefix("model.") if scopes else ""
    return ""


def float_modules(path: Path, patterns: Sequence[str]) -> list[str]:
    """Names of the linear nodes exported from modules matching ``patterns`` (fnmatch, module names)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return [n.name for n in model.graph.node if n.op_type in VISION_OP_TYPES
            and any(fnmatchcase(module_of(n), p) for p in patterns)]


def quantize_vision(fp32_model: Path, out: Path, pixels: list[torch.Tensor], *,
                    keep_float: Sequence[str] = KEEP_FLOAT) -> dict[str, Any]:
    """Write the Q/DQ INT8 vision graph (external weights next to it); returns what the manifest records."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if not pixels:
        fail("vision INT8 quantization needs at least one calibration image")
    reader = PixelReader(pixels)
    exclude = activation_matmuls(fp32_model) + float_modules(fp32_model, keep_float)
    extra = {"ActivationSymmetric": True, "WeightSymmetric": True,
             "QuantizeBias": False,  # biases stay float: TensorRT's explicit quantization has no int32 bias Q/DQ
             "OpTypesToExcludeOutputQuantization": VISION_OP_TYPES,
             # one image's intermediate tensors at a time (518 px attention maps are large), ranges merged;
             # not CalibMaxIntermediateOutputs: ORT 1.32 drops the collected outputs without merging them
             "CalibStridedMinMax": 1}
    with quiet_quantizer():
        quantize_static(str(fp32_model), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=VISION_OP_TYPES, nodes_to_exclude=exclude,
                        calibrate_method=CalibrationMethod.MinMax,
                        use_external_data_format=True, extra_options=extra)
    return {"method": "onnxruntime quantize_static QDQ", "calibration": "minmax", "samples": len(pixels),
            "weights": "int8 symmetric per output channel", "activations": "int8 symmetric per tensor (static)",
            "quantized_ops": "linear layers (MatMul with constant weight, patch Conv)",
            "float_ops": "LayerNorm, Softmax, GELU, attention activation x activation MatMuls",
            "float_linears": list(keep_float),
            "image_embeds_dtype": "float32"}
