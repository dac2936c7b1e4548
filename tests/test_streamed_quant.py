"""``streamed_quant`` writes what ONNX Runtime's quantizers write.

On the tiny model's fp32 decoder (fused attention; plain too for weight-only): the same initializers bit for
bit, the same operators, the same logits from ONNX Runtime, for ``quantize_w8a8`` against
``quantize_dynamic`` and ``quantize_nbits8`` against ``MatMulNBitsQuantizer``; ``exclude`` keeps a MatMul
float; W8A8 refuses a plain-attention graph.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic

from radtrt.errors import RadtrtError
from radtrt.exporter.streamed_quant import quantize_nbits8, quantize_w8a8
from radtrt.exporter.gqa import FusedAttention, io_names
from radtrt.exporter.int8_decoder import NBITS_ACCURACY_LEVEL, NBITS_BLOCK, REDUCE_RANGE, lm_head_node
from radtrt.exporter.onnx import export_decoder
from radtrt.model.config import preset
from radtrt.model.tiny import random_model


def _export(folder: Path, fused: FusedAttention | None) -> Path:
    path = folder / "decoder.onnx"
    export_decoder(random_model(preset("tiny")).language_model, path, fused=fused)
    return path


@pytest.fixture(scope="module")
def fp32_decoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(tmp_path_factory.mktemp("dec"), FusedAttention("float32"))


@pytest.fixture(scope="module")
def plain_decoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(tmp_path_factory.mktemp("plain"), None)


def _both(src: Path, out_dir: Path, exclude: list[str], method: str = "w8a8") -> tuple[onnx.ModelProto, onnx.ModelProto]:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    streamed, library = out_dir / "streamed" / "decoder.onnx", out_dir / "library" / "decoder.onnx"
    streamed.parent.mkdir()
    library.parent.mkdir()
    if method == "w8a8":
        assert quantize_w8a8(src, streamed, exclude=set(exclude), reduce_range=REDUCE_RANGE) > 0
        quantize_dynamic(str(src), str(library), per_channel=True, reduce_range=REDUCE_RANGE,
                         weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"], nodes_to_exclude=exclude,
                         use_external_data_format=True)
    else:
        assert quantize_nbits8(src, streamed, exclude=set(exclude), block_size=NBITS_BLOCK,
                               accuracy_level=NBITS_ACCURACY_LEVEL) > 0
        quant = MatMulNBitsQuantizer(onnx.load(str(src)), bits=8, block_size=NBITS_BLOCK, is_symmetric=True,
                                     accuracy_level=NBITS_ACCURACY_LEVEL, nodes_to_exclude=exclude)
        quant.process()
        quant.model.save_model_to_file(str(library), use_external_data_format=True)
    assert (streamed.parent / "decoder.onnx.data").exists() and not (streamed.parent / "decoder.onnx.data.new").exists()
    return onnx.load(str(streamed)), onnx.load(str(library))


def _same(streamed: onnx.ModelProto, library: onnx.ModelProto, quantized_op: str) -> None:
    ours = {t.name: numpy_helper.to_array(t) for t in streamed.graph.initializer}
    theirs = {t.name: numpy_helper.to_array(t) for t in library.graph.initializer}
    assert ours.keys() == theirs.keys()
    for name, array in ours.items():
        assert array.dtype == theirs[name].dtype and np.array_equal(array, theirs[name]), name
    ops = Counter(n.op_type for n in streamed.graph.node)
    assert ops == Counter(n.op_type for n in library.graph.node) and ops[quantized_op] > 0
    ours_attrs = [(n.op_type, list(n.input), list(n.output), sorted((a.name, helper.get_attribute_value(a))
                   for a in n.attribute)) for n in streamed.graph.node if n.op_type == quantized_op]
    theirs_attrs = [(n.op_type, list(n.input), list(n.output), sorted((a.name, helper.get_attribute_value(a))
                     for a in n.attribute)) for n in library.graph.node if n.op_type == quantized_op]
    assert sorted(ours_attrs) == sorted(theirs_attrs)


def _logits(model: onnx.ModelProto) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    cfg = preset("tiny").decoder
    ins, _ = io_names(cfg.num_hidden_layers)
    prompt = 7
    feeds = {ins[0]: np.random.default_rng(0).standard_normal((1, prompt, cfg.hidden_size)).astype(np.float32),
             ins[1]: np.array([prompt - 1], np.int32), ins[2]: np.array(prompt, np.int32)}
    for name in ins[3:]:
        feeds[name] = np.zeros((1, cfg.num_key_value_heads, 16, cfg.head_dim), np.float32)
    return session.run(["logits"], feeds)[0]


def test_w8a8_same_tensors_operators_and_logits_as_quantize_dynamic(fp32_decoder: Path, tmp_path: Path) -> None:
    streamed, library = _both(fp32_decoder, tmp_path, [])
    _same(streamed, library, "MatMulInteger")
    assert not any(n.op_type == "MatMul" for n in streamed.graph.node)
    np.testing.assert_array_equal(_logits(streamed), _logits(library))


@pytest.mark.parametrize("attention", ["fused", "plain"])
def test_nbits8_same_tensors_operators_and_logits_as_matmul_nbits_quantizer(
        attention: str, fp32_decoder: Path, plain_decoder: Path, tmp_path: Path) -> None:
    streamed, library = _both(fp32_decoder if attention == "fused" else plain_decoder, tmp_path, [], "nbits8")
    _same(streamed, library, "MatMulNBits")
    if attention == "fused":
        np.testing.assert_array_equal(_logits(streamed), _logits(library))
    else:  # the attention's activation x activation MatMuls are left float, as the library leaves them
        constants = {t.name for t in streamed.graph.initializer}
        left = [n for n in streamed.graph.node if n.op_type == "MatMul"]
        assert left and not any(n.input[1] in constants for n in left)


@pytest.mark.parametrize("method", ["w8a8", "nbits8"])
def test_excluded_matmul_stays_float(method: str, fp32_decoder: Path, tmp_path: Path) -> None:
    head = lm_head_node(onnx.load(str(fp32_decoder), load_external_data=False))
    streamed, library = _both(fp32_decoder, tmp_path, [head], method)
    for model in (streamed, library):
        assert [n.name for n in model.graph.node if n.op_type == "MatMul"] == [head]
    np.testing.assert_array_equal(_logits(streamed), _logits(library))


def test_activation_by_activation_matmul_is_refused(tmp_path: Path) -> None:
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["y"])], "g",
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 2]) for n in ("a", "b")],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])])
    src = tmp_path / "plain.onnx"
    onnx.save(helper.make_model(graph), str(src))
    with pytest.raises(RadtrtError, match="two activations"):
        quantize_w8a8(src, tmp_path / "out.onnx", exclude=set(), reduce_range=True)
    assert not (tmp_path / "out.onnx").exists()


class _Recorder:
    """The two ``rich.progress.Progress`` calls the quantizers make."""

    def __init__(self) -> None:
        self.tasks: dict[int, tuple[str, int]] = {}
        self.completed: dict[int, list[int]] = {}

    def add_task(self, description: str, total: int) -> int:
        self.tasks[len(self.tasks)] = (description, total)
        self.completed[len(self.tasks) - 1] = []
        return len(self.tasks) - 1

    def update(self, task: int, completed: int) -> None:
        self.completed[task].append(completed)


def test_progress_counts_every_weight_matrix(fp32_decoder: Path, tmp_path: Path) -> None:
    recorder = _Recorder()
    n = quantize_nbits8(fp32_decoder, tmp_path / "decoder.onnx", exclude=set(), block_size=NBITS_BLOCK,
                        accuracy_level=NBITS_ACCURACY_LEVEL, progress=recorder)
    assert recorder.tasks == {0: (f"weight-only INT8: {n} weight matrices", n)}
    assert recorder.completed[0] == list(range(1, n + 1))
