"""``dynamic_int8.quantize_matmuls_streaming`` writes what ONNX Runtime's ``quantize_dynamic`` writes.

On the tiny model's fused-attention fp32 decoder: the same initializers bit for bit, the same operators,
the same logits from ONNX Runtime; ``exclude`` keeps a MatMul float; a plain-attention graph is refused.
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
from radtrt.exporter.dynamic_int8 import quantize_matmuls_streaming
from radtrt.exporter.gqa import FusedAttention, io_names
from radtrt.exporter.int8_decoder import REDUCE_RANGE, lm_head_node
from radtrt.exporter.onnx import export_decoder
from radtrt.model.config import preset
from radtrt.model.tiny import random_model


@pytest.fixture(scope="module")
def fp32_decoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("dec") / "decoder.onnx"
    export_decoder(random_model(preset("tiny")).language_model, path, fused=FusedAttention("float32"))
    return path


def _both(src: Path, out_dir: Path, exclude: list[str]) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    streamed, library = out_dir / "streamed" / "decoder.onnx", out_dir / "library" / "decoder.onnx"
    streamed.parent.mkdir()
    library.parent.mkdir()
    assert quantize_matmuls_streaming(src, streamed, exclude=set(exclude), reduce_range=REDUCE_RANGE) > 0
    quantize_dynamic(str(src), str(library), per_channel=True, reduce_range=REDUCE_RANGE, weight_type=QuantType.QInt8,
                     op_types_to_quantize=["MatMul"], nodes_to_exclude=exclude, use_external_data_format=True)
    assert (streamed.parent / "decoder.onnx.data").exists() and not (streamed.parent / "decoder.onnx.data.new").exists()
    return onnx.load(str(streamed)), onnx.load(str(library))


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


def test_same_tensors_operators_and_logits_as_quantize_dynamic(fp32_decoder: Path, tmp_path: Path) -> None:
    streamed, library = _both(fp32_decoder, tmp_path, [])
    ours = {t.name: numpy_helper.to_array(t) for t in streamed.graph.initializer}
    theirs = {t.name: numpy_helper.to_array(t) for t in library.graph.initializer}
    assert ours.keys() == theirs.keys()
    for name, array in ours.items():
        assert array.dtype == theirs[name].dtype and np.array_equal(array, theirs[name]), name
    ops = Counter(n.op_type for n in streamed.graph.node)
    assert ops == Counter(n.op_type for n in library.graph.node) and ops["MatMulInteger"] > 0 and not ops["MatMul"]
    np.testing.assert_array_equal(_logits(streamed), _logits(library))


def test_excluded_matmul_stays_float(fp32_decoder: Path, tmp_path: Path) -> None:
    head = lm_head_node(onnx.load(str(fp32_decoder), load_external_data=False))
    streamed, library = _both(fp32_decoder, tmp_path, [head])
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
        quantize_matmuls_streaming(src, tmp_path / "out.onnx", exclude=set(), reduce_range=True)
    assert not (tmp_path / "out.onnx").exists()
