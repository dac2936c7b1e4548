"""ONNX Runtime providers: which start here, and a GPU provider that fell back to the CPU without a word."""

from __future__ import annotations

import pytest

import radtrt.runtime.ort as ort_module
from radtrt.errors import RadtrtError
from radtrt.runtime.ort import check_started, provider_starts, usable_providers


def test_a_provider_that_fell_back_to_the_cpu_is_refused() -> None:
    """onnxruntime-gpu without a driver or cuDNN prints a banner and runs on the CPU: the run said 'provider cuda'."""
    requested = [("TensorrtExecutionProvider", {"trt_fp16_enable": True}), "CUDAExecutionProvider",
                 "CPUExecutionProvider"]
    with pytest.raises(RadtrtError, match=r"could not start its TensorrtExecutionProvider for vision.onnx and fell "
                                          r"back to CUDAExecutionProvider, CPUExecutionProvider .*run with --ort-provider cuda, or "
                                          r"--ort-provider cpu"):
        check_started(["CUDAExecutionProvider", "CPUExecutionProvider"], requested, "vision.onnx")
    with pytest.raises(RadtrtError, match=r"run with --ort-provider cpu$"):  # CUDA's own fallback: CPU only
        check_started(["CPUExecutionProvider"], requested[1:], "vision.onnx")
    check_started(["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"], requested, "x")
    check_started(["CPUExecutionProvider"], ["CPUExecutionProvider"], "x")


def test_providers_built_in_but_not_starting_are_not_usable(monkeypatch: pytest.MonkeyPatch) -> None:
    """get_available_providers lists what onnxruntime was built with; CUDA on a host without a GPU chose
    '--backend auto: ONNX Runtime has CUDA', and doctor called it usable."""
    assert provider_starts("CPUExecutionProvider")  # the one-node probe session itself
    if "CUDAExecutionProvider" not in ort_module.available_providers():  # a CPU build: nothing to probe
        assert not provider_starts("CUDAExecutionProvider")
        assert usable_providers() == ort_module.available_providers()
    monkeypatch.setattr(ort_module, "available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort_module, "provider_starts", lambda name: name == "CPUExecutionProvider")
    assert usable_providers() == ["CPUExecutionProvider"]
    from radtrt.runtime.doctor import report

    line = next(x for x in report() if x.startswith("onnxruntime"))
    assert line.endswith(": providers CPUExecutionProvider (built in but not starting here: CUDAExecutionProvider)")


def test_a_missing_provider_is_refused_with_a_remedy_that_works(monkeypatch: pytest.MonkeyPatch) -> None:
    """It said '--ort-provider cpu, or --device cpu in place of --device cuda': with --device cuda still given,
    --ort-provider cpu was refused as a contradiction."""
    from radtrt.runtime.ort import provider_list

    monkeypatch.setattr(ort_module, "available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(RadtrtError, match=r"run ONNX Runtime on the CPU: --ort-provider cpu without --device cuda "
                                          r"\(or leave both at their defaults\)$"):
        provider_list("cuda")
    assert provider_list("cpu") == ["CPUExecutionProvider"]


def test_a_graph_that_fails_to_load_prints_radtrts_line_only(tmp_path, capfd: pytest.CaptureFixture[str]) -> None:
    """A damaged external-data file printed ONNX Runtime's coloured '[E:onnxruntime:...]' lines before radtrt's
    one line (the session logger was left at its default level; the provider probe already set it)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    # the Transpose is constant-folded at load, which reads the truncated initializer during the session's
    # initialization, where ONNX Runtime logs the failure before raising it
    nodes = [helper.make_node("Transpose", ["w"], ["wt"]), helper.make_node("MatMul", ["x", "wt"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
                              [numpy_helper.from_array(np.ones((64, 64), np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save_model(model, str(tmp_path / "m.onnx"), save_as_external_data=True, location="m.onnx.data",
                    size_threshold=0)
    data = tmp_path / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(RadtrtError, match="ONNX Runtime cannot load m.onnx"):
        ort_module._session(tmp_path / "m.onnx", ["CPUExecutionProvider"], None)
    captured = capfd.readouterr()
    assert "onnxruntime:" not in captured.err + captured.out, captured.err
