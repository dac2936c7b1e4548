"""TensorFile: a graph rewrite that keeps the weights on disk gives the same graph as one in memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from radtrt.errors import RadtrtError
from radtrt.exporter.external import InMemory, TensorFile


def _model(path: Path) -> dict[str, np.ndarray]:
    """x -> MatMul(a), MatMul(b), MatMul(c) -> three outputs, weights in ``path.name + '.data'``."""
    rng = np.random.default_rng(0)
    weights = {n: rng.standard_normal((8, w)).astype(np.float32) for n, w in (("a", 16), ("b", 24), ("c", 40))}
    nodes = [helper.make_node("MatMul", ["x", n], ["y_" + n], name="mm_" + n) for n in weights]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y_" + n, TensorProto.FLOAT, [1, w.shape[1]])
                               for n, w in weights.items()],
                              [numpy_helper.from_array(w, n) for n, w in weights.items()])
    onnx.save(helper.make_model(graph), str(path), save_as_external_data=True, location=path.name + ".data",
              size_threshold=0)
    return weights


def _pack_ab(model: onnx.ModelProto, store) -> None:
    """Pack a and b into one MatMul + Split (what the decoder rewrite does to gate/up)."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    packed = np.concatenate([store.read(inits["a"]), store.read(inits["b"])], axis=1)
    graph.initializer.append(store.add(packed, "ab"))
    graph.initializer.append(numpy_helper.from_array(np.array([16, 24], np.int64), "widths"))
    keep = [n for n in graph.node if n.name == "mm_c"]
    del graph.node[:]
    graph.node.extend([helper.make_node("MatMul", ["x", "ab"], ["y_ab"]),
                       helper.make_node("Split", ["y_ab", "widths"], ["y_a", "y_b"], axis=-1), *keep])
    kept = [t for t in graph.initializer if t.name not in ("a", "b")]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def test_rewrite_on_disk_matches_the_original(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    _model(path)
    x = np.random.default_rng(1).standard_normal((1, 8)).astype(np.float32)
    before = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})

    model = onnx.load(str(path), load_external_data=False)
    fresh = tmp_path / "m.onnx.data.new"
    with TensorFile(tmp_path, fresh, "m.onnx.data") as store:
        assert isinstance(store.read(model.graph.initializer[0]), np.memmap)  # read in place, not loaded
        _pack_ab(model, store)
        store.finish(model.graph)
    fresh.replace(tmp_path / "m.onnx.data")
    onnx.save(model, str(path))

    onnx.checker.check_model(str(path))
    after = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    for b, a in zip(before, after):
        np.testing.assert_array_equal(b, a)
    # the new file holds the packed a|b and c only (page-aligned), not the dropped a and b as well
    assert (tmp_path / "m.onnx.data").stat().st_size == 4096 + 8 * 40 * 4


def test_in_memory_store_gives_the_same_graph(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    weights = _model(path)
    model = onnx.load(str(path))
    _pack_ab(model, InMemory())
    ab = next(t for t in model.graph.initializer if t.name == "ab")
    np.testing.assert_array_equal(numpy_helper.to_array(ab), np.concatenate([weights["a"], weights["b"]], axis=1))


def test_truncated_data_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    _model(path)
    data = tmp_path / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:100])
    model = onnx.load(str(path), load_external_data=False)
    fresh = tmp_path / "m.onnx.data.new"
    with pytest.raises(RadtrtError, match="shorter than tensor"):
        with TensorFile(tmp_path, fresh, "m.onnx.data") as store:
            store.finish(model.graph)
    assert not fresh.exists()  # nothing half-written left behind
