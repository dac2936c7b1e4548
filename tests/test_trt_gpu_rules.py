"""GPU keys, stamps and the compatibility refusals (radtrt.exporter.gpu) for each target GPU, on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from radtrt.errors import RadtrtError
from radtrt.exporter.gpu import (GpuInfo, capability_lines, check_tensorrt, check_trtllm, engine_key, gpu_stamp,
                                 loaded_tensorrt_problem, parse_version, stamp_mismatch, tensorrt_problem,
                                 timing_cache_name, trtllm_problem)

# The deployment targets with the library versions users run on them.
TARGETS = {
    "v100": GpuInfo("Tesla V100-SXM2-32GB", (7, 0), "12.4", "10.4.0", "0.14.0", 31.7),
    "orin": GpuInfo("Orin", (8, 7), "12.6", "10.3.0", "0.12.0", 61.4),  # JetPack 6.1, v0.12.0-jetson
    "a100": GpuInfo("NVIDIA A100-SXM4-80GB", (8, 0), "12.8", "10.9.0.34", "0.18.2", 79.3),
    "l4": GpuInfo("NVIDIA L4", (8, 9), "12.8", "10.11.0", "1.0.0rc4", 22.0),
    "h100": GpuInfo("NVIDIA H100 80GB HBM3", (9, 0), "12.8", "10.11.0", "1.0.0", 79.1),
}

EXPECTED_KEYS = {
    "v100": "tesla-v100-sxm2-32gb_sm70_trt10.4.0_fp16",
    "orin": "orin_sm87_trt10.3.0_fp16",
    "a100": "nvidia-a100-sxm4-80gb_sm80_trt10.9.0.34_fp16",
    "l4": "nvidia-l4_sm89_trt10.11.0_fp16",
    "h100": "nvidia-h100-80gb-hbm3_sm90_trt10.11.0_fp16",
}


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_engine_keys_per_target(target: str) -> None:
    gpu = TARGETS[target]
    assert engine_key(gpu, "fp16") == EXPECTED_KEYS[target]
    llm_key = engine_key(gpu, "w8a16-kv8", trtllm=True)
    assert llm_key.startswith(EXPECTED_KEYS[target].split("_trt")[0] + f"_trtllm{gpu.tensorrt_llm}_trt")
    assert llm_key.endswith("_w8a16-kv8") and "/" not in llm_key and " " not in llm_key
    name = EXPECTED_KEYS[target].split("_")[0]
    assert timing_cache_name(gpu) == f"timing_{name}_{gpu.sm_tag}_trt{gpu.tensorrt}.cache"


def test_engine_key_is_what_stamps_compare() -> None:
    """A rebuild after a CUDA update fits the host exactly as the old engine did (stamp_mismatch ignores CUDA),
    so it must land in the same folder and replace it, not beside it."""
    from dataclasses import replace

    for gpu in TARGETS.values():
        updated = replace(gpu, cuda="13.0")
        assert stamp_mismatch({"gpu": gpu_stamp(gpu)}, updated, trtllm=True) is None
        assert engine_key(updated, "fp16") == engine_key(gpu, "fp16")
        assert engine_key(updated, "w8a16", trtllm=True) == engine_key(gpu, "w8a16", trtllm=True)
        assert engine_key(replace(gpu, tensorrt="9.9.9"), "fp16") != engine_key(gpu, "fp16")


def test_version_parsing() -> None:
    assert parse_version("10.3.0.26") == (10, 3, 0, 26)
    assert parse_version("1.0.0rc4") == (1, 0, 0)
    assert parse_version("0.12.0.dev2024073000") == (0, 12, 0)
    with pytest.raises(RadtrtError):
        parse_version("unknown")


def test_every_target_runs_its_documented_modes() -> None:
    for gpu in TARGETS.values():
        assert tensorrt_problem(gpu) is None
        assert trtllm_problem(gpu, "fp16") is None and trtllm_problem(gpu, "w8a16", int8_kv=True) is None
    for name in ("orin", "a100", "l4", "h100"):
        assert trtllm_problem(TARGETS[name], "w8a8_sq") is None


@pytest.mark.parametrize("gpu,mode,message", [
    (TARGETS["v100"], "w8a8_sq", "SmoothQuant W8A8 needs sm75 or newer; Tesla V100-SXM2-32GB is sm70"),
    (TARGETS["v100"], "w4a16_awq", "AWQ INT4 needs sm75 or newer"),
    (TARGETS["a100"], "fp8", "FP8 needs sm89 or newer; NVIDIA A100-SXM4-80GB is sm80"),
    (GpuInfo("Tesla V100-PCIE-16GB", (7, 0), "12.4", "10.4.0", "0.15.0"), "fp16",
     "V100 support ended with TensorRT-LLM 0.14"),
    (GpuInfo("Orin", (8, 7), "12.6", "10.3.0", "0.13.0"), "fp16", "only from the v0.12.0-jetson branch"),
    (GpuInfo("Xavier", (7, 2), "11.4", "8.5.2", "0.12.0"), "fp16", r"does not support Xavier \(sm72\)"),
    (GpuInfo("NVIDIA A100", (8, 0), "12.4", "10.4.0", None), "fp16", "TensorRT-LLM is not installed"),
])
def test_trtllm_refusals_are_one_clear_line(gpu: GpuInfo, mode: str, message: str) -> None:
    with pytest.raises(RadtrtError, match=message) as e:
        check_trtllm(gpu, mode)
    assert "\n" not in str(e.value)
    assert trtllm_problem(TARGETS["l4"], "fp8") is None  # Ada runs FP8


def test_tensorrt_refusals() -> None:
    with pytest.raises(RadtrtError, match="Volta support ended with TensorRT 10.4"):
        check_tensorrt(GpuInfo("Tesla V100-SXM2-32GB", (7, 0), "12.4", "10.5.0"))
    assert "not installed" in tensorrt_problem(GpuInfo("Tesla T4", (7, 5)))
    check_tensorrt(TARGETS["v100"])  # 10.4 still supports Volta


def test_imported_tensorrt_must_be_the_recorded_release() -> None:
    assert loaded_tensorrt_problem("10.3.0", "10.3.0") is None
    assert loaded_tensorrt_problem("10.3.0.30", "10.3.0") is None  # JetPack's build number vs the wheel's x.y.z
    msg = loaded_tensorrt_problem("10.3.0", "10.4.0")  # stale metapackage metadata vs the bindings imported
    assert msg is not None and "10.4.0" in msg and "10.3.0" in msg and "\n" not in msg
    assert loaded_tensorrt_problem("10.3.0.26", "10.3.0.30") is not None  # engines need the exact build
    assert loaded_tensorrt_problem(None, "10.3.0") is not None


def test_stamp_mismatch_names_both_machines() -> None:
    stamp = {"gpu": gpu_stamp(TARGETS["orin"])}
    assert stamp_mismatch(stamp, TARGETS["orin"]) is None
    msg = stamp_mismatch(stamp, TARGETS["v100"])
    assert msg == ("built for Orin (sm87), TensorRT 10.3.0, CUDA 12.6; "
                   "this host has Tesla V100-SXM2-32GB (sm70), TensorRT 10.4.0, CUDA 12.4")
    newer_trt = GpuInfo("Orin", (8, 7), "12.6", "10.4.0", "0.12.0")
    msg = stamp_mismatch(stamp, newer_trt)
    assert msg is not None and "TensorRT 10.3.0" in msg and "TensorRT 10.4.0" in msg
    other_cuda = GpuInfo("Orin", (8, 7), "12.2", "10.3.0", "0.12.0")
    assert stamp_mismatch(stamp, other_cuda) is None  # engines bind to TensorRT, not torch's CUDA runtime
    other_llm = GpuInfo("Orin", (8, 7), "12.6", "10.3.0", "0.12.1")
    assert stamp_mismatch(stamp, other_llm) is None and "TensorRT-LLM 0.12.0" in stamp_mismatch(stamp, other_llm,
                                                                                               trtllm=True)


def test_doctor_lines() -> None:
    cpu = capability_lines(None)
    assert "no CUDA GPU" in cpu[0] and cpu[-1].startswith("Triton: tritonserver not on PATH")
    v100 = "\n".join(capability_lines(TARGETS["v100"], tritonserver="/opt/tritonserver/bin/tritonserver"))
    assert "decoder INT8 weight-only (W8A16) (TensorRT-LLM 0.14.0): yes" in v100
    assert "decoder SmoothQuant W8A8: no (SmoothQuant W8A8 needs sm75" in v100
    assert "--backend tensorrt: usable" in v100 and "tritonserver at /opt" in v100
    # INT8 vision engines are built strongly typed from Q/DQ graphs: TensorRT 10 or newer ("fp16/int8" before)
    older = "\n".join(capability_lines(GpuInfo("NVIDIA A10", (8, 6), "12.2", "9.2.0", None)))
    assert "vision engine (TensorRT 9.2.0): fp32/fp16 buildable (INT8 Q/DQ engines need TensorRT 10" in older
    assert "vision engine (TensorRT 10.4.0): fp32/fp16/int8 buildable" in v100
    nothing = "\n".join(capability_lines(GpuInfo("NVIDIA L4", (8, 9), "12.8")))
    assert "vision engine: no (TensorRT is not installed" in nothing and "--backend tensorrt: not usable" in nothing


def _gpu_host(monkeypatch: pytest.MonkeyPatch, gpu: GpuInfo) -> None:
    """``preflight`` on a simulated GPU host: ``gpu`` with its TensorRT-LLM installed."""
    import radtrt.exporter.gpu as gpu_module

    monkeypatch.setattr(gpu_module, "detect_gpu", lambda device=0: gpu)
    monkeypatch.setattr(gpu_module, "library_version",
                        lambda module: {"tensorrt": gpu.tensorrt, "tensorrt_llm": gpu.tensorrt_llm}.get(module))


@pytest.mark.parametrize("target, precision, used", [
    ("onnx", "fp32", False), ("onnx", "fp16", False), ("tensorrt", "fp32", False), ("tensorrt", "fp16", False),
    ("onnx", "int8", True), ("tensorrt", "int8", True),  # the ONNX INT8 export writes an INT8 KV cache
    ("trtllm", "fp16", True), ("all", "fp32", True), ("triton", "fp16", True),  # the TensorRT-LLM engine's
])
def test_int8_kv_cache_is_refused_where_no_step_uses_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, target: str,
                                                        precision: str, used: bool) -> None:
    """--target tensorrt of an fp32/fp16 bundle took --int8-kv-cache and wrote a float32 KV cache."""
    from radtrt.exporter.targets import ExportPlan, preflight

    _gpu_host(monkeypatch, TARGETS["a100"])
    plan = ExportPlan(target, precision, int8_kv=True, calibration_stats=tmp_path / "stats.safetensors")
    if used:
        preflight(plan)
        return
    with pytest.raises(RadtrtError, match=r"^--int8-kv-cache in an ONNX bundle needs --precision int8") as e:
        preflight(plan)
    assert ("vision engine has no KV cache" in str(e.value)) == (target == "tensorrt")


def test_smoothquant_on_v100_is_refused_before_calibration_is_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU rule comes first: asking for statistics (a long 'radtrt calibrate' at 7B) for a mode this GPU
    then refuses anyway wastes that run."""
    from radtrt.exporter.targets import ExportPlan, preflight

    _gpu_host(monkeypatch, TARGETS["v100"])
    for target in ("trtllm", "all"):
        with pytest.raises(RadtrtError, match="SmoothQuant W8A8 needs sm75 or newer; Tesla V100-SXM2-32GB is sm70"):
            preflight(ExportPlan(target, "int8", "smoothquant"))
    _gpu_host(monkeypatch, TARGETS["a100"])  # where it runs, the missing statistics are still asked for
    with pytest.raises(RadtrtError, match="need calibration statistics"):
        preflight(ExportPlan("trtllm", "int8", "smoothquant"))
