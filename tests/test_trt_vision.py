"""TensorRT vision engine planning, profiles, command lines and engine lookup/stamps, without TensorRT.

``make_fake_bundle`` writes a small but valid bundle (a hand-made vision.onnx with external weights,
the tiny tokenizer and config, a manifest with hashes) in well under a second, instead of a 50 s export.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from radtrt.errors import RadtrtError
from radtrt.exporter.bundle import BUNDLE_FORMAT, BUNDLE_FORMAT_VERSION, MANIFEST, sha256_file
from radtrt.exporter.onnx import GRAPH_REVISION
from radtrt.exporter.gpu import GpuInfo, engine_key, gpu_stamp
from radtrt.exporter.tensorrt import (STAMP_FORMAT, _build_serialized, attach_timing_cache, build_vision_engine,
                                      find_vision_engine,
                                      inspect_onnx, network_flag_names, plan_vision_build, trtexec_command,
                                      vision_profile)
from radtrt.model.config import preset
from radtrt.model.tiny import train_tiny_tokenizer

ORIN = GpuInfo("Orin", (8, 7), "12.6", "10.3.0", "0.12.0")
V100 = GpuInfo("Tesla V100-SXM2-32GB", (7, 0), "12.4", "10.4.0", "0.14.0")


@functools.cache
def _tokenizer():  # noqa: ANN202
    return train_tiny_tokenizer()


def vision_graph(path: Path, *, dtype: int = TensorProto.FLOAT16, qdq: bool = False, out_dtype: int | None = None,
                 size: int = 56, patch: int = 14, hidden: int = 64) -> None:
    """pixel_values [B,3,S,S] -> patch Conv -> image_embeds [B,N,H]; weights stored as external data."""
    np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
    weight = numpy_helper.from_array(np.random.default_rng(0).normal(size=(hidden, 3, patch, patch)).astype(np_dtype),
                                     "patch.weight")
    nodes, src = [], "pixel_values"
    if qdq:
        nodes += [helper.make_node("QuantizeLinear", [src, "x_scale"], ["x_q"]),
                  helper.make_node("DequantizeLinear", ["x_q", "x_scale"], ["x_dq"])]
        src = "x_dq"
    nodes += [helper.make_node("Conv", [src, "patch.weight"], ["c"], strides=[patch, patch]),
              helper.make_node("Reshape", ["c", "shape"], ["r"]),
              helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 1])]
    out_dtype = dtype if out_dtype is None else out_dtype
    nodes.append(helper.make_node("Cast", ["t"], ["image_embeds"], to=out_dtype))
    inits = [weight, numpy_helper.from_array(np.array([0, hidden, -1], dtype=np.int64), "shape"),
             numpy_helper.from_array(np.array(0.05, dtype=np_dtype), "x_scale")]
    inputs = [helper.make_tensor_value_info("pixel_values", dtype, ["batch", 3, size, size])]
    outputs = [helper.make_tensor_value_info("image_embeds", out_dtype, ["batch", (size // patch) ** 2, hidden])]
    graph = helper.make_graph(nodes, "vision", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)


def make_fake_bundle(root: Path, *, precision: str = "fp16", qdq: bool = False, out_dtype: int | None = None) -> Path:
    bundle = root / "bundle"
    bundle.mkdir(parents=True)
    dtype = TensorProto.FLOAT16 if precision == "fp16" else TensorProto.FLOAT
    vision_graph(bundle / "vision.onnx", dtype=dtype, qdq=qdq, out_dtype=out_dtype)
    _tokenizer().save(bundle)
    cfg = preset("tiny")
    (bundle / "model_config.json").write_text(cfg.to_json())
    files = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in sorted(bundle.iterdir())}
    manifest = {"format": BUNDLE_FORMAT, "format_version": BUNDLE_FORMAT_VERSION, "graph_revision": GRAPH_REVISION,
                "precision": "int8" if qdq else precision, "model": {"name": "tiny"}, "files": files,
                "decoder": {"num_layers": 2, "num_kv_heads": 2, "head_dim": 16, "hidden_size": 64, "vocab_size": 512,
                            "eos_token_id": 2, "attention": "fused", "kv_cache": "float16"},
                "vision": {"image_size": 56, "num_image_tokens": cfg.num_image_tokens}}
    if qdq:
        manifest["int8"] = {"vision_method": "Q/DQ", "decoder_method": "weight-only"}
    (bundle / MANIFEST).write_text(json.dumps(manifest))
    return bundle


def fake_engine(bundle: Path, gpu: GpuInfo, precision: str = "fp16", *, max_batch: int = 8) -> Path:
    """What build_vision_engine leaves behind, with a placeholder engine file."""
    onnx_info = inspect_onnx(bundle / "vision.onnx")
    folder = bundle / "tensorrt" / engine_key(gpu, precision)
    folder.mkdir(parents=True)
    (folder / "vision.engine").write_bytes(b"serialized engine for " + gpu.name.encode())
    stamp = {"format": STAMP_FORMAT, "format_version": 1, "component": "vision", "precision": precision,
             "gpu": gpu_stamp(gpu), "onnx": {"file": "vision.onnx", "sha256": sha256_file(bundle / "vision.onnx")},
             "engine_sha256": sha256_file(folder / "vision.engine"), "input": "pixel_values", "output": "image_embeds",
             "profile": vision_profile(onnx_info, max_batch)}
    (folder / "engine.json").write_text(json.dumps(stamp))
    return folder


def test_inspect_onnx_reads_the_io_contract(tmp_path: Path) -> None:
    vision_graph(tmp_path / "v.onnx")
    info = inspect_onnx(tmp_path / "v.onnx")
    assert (info.input_name, info.input_dtype, info.output_name, info.output_dtype) == (
        "pixel_values", "float16", "image_embeds", "float16")
    assert info.input_shape == ("batch", 3, 56, 56) and info.output_shape == ("batch", 16, 64)
    assert info.image_size == 56 and not info.has_qdq
    vision_graph(tmp_path / "q.onnx", dtype=TensorProto.FLOAT, qdq=True)
    assert inspect_onnx(tmp_path / "q.onnx").has_qdq


def test_build_plans(tmp_path: Path) -> None:
    vision_graph(tmp_path / "h.onnx")
    vision_graph(tmp_path / "f.onnx", dtype=TensorProto.FLOAT)
    vision_graph(tmp_path / "q.onnx", dtype=TensorProto.FLOAT, qdq=True)
    fp16, fp32, qdq = (inspect_onnx(tmp_path / n) for n in ("h.onnx", "f.onnx", "q.onnx"))
    plan = plan_vision_build(fp16, "10.3.0")
    assert (plan.precision, plan.strongly_typed, plan.builder_flags, plan.fp32_layer_types) == ("fp16", True, (), ())
    old = plan_vision_build(fp16, "8.6.2")  # JetPack 6.0: no strong typing, pin norm/softmax to fp32
    assert (old.strongly_typed, old.builder_flags, old.fp32_layer_types) == (
        False, ("FP16", "OBEY_PRECISION_CONSTRAINTS"), ("NORMALIZATION", "SOFTMAX"))
    with pytest.raises(RadtrtError, match="needs TensorRT 8.6 or newer"):  # JetPack 5: no LayerType.NORMALIZATION
        plan_vision_build(fp16, "8.5.2")
    assert plan_vision_build(qdq, "10.4.0").precision == "int8" and plan_vision_build(qdq, "10.4.0").strongly_typed
    with pytest.raises(RadtrtError, match="needs TensorRT 10 or newer, found 8.6.2"):
        plan_vision_build(qdq, "8.6.2")
    assert plan_vision_build(fp32, "10.3.0").precision == "fp32"
    from_fp32 = plan_vision_build(fp32, "10.3.0", "fp16")
    assert not from_fp32.strongly_typed and "FP16" in from_fp32.builder_flags
    with pytest.raises(RadtrtError, match="strongly typed only"):
        plan_vision_build(fp32, "11.0.0", "fp16")
    with pytest.raises(RadtrtError, match="Q/DQ-quantized vision.onnx"):
        plan_vision_build(fp16, "10.3.0", "int8")
    # strong typing keeps Q/DQ: asking a Q/DQ graph for fp16 must not silently give an int8 engine
    with pytest.raises(RadtrtError, match="graph is Q/DQ INT8; an fp16 vision engine"):
        plan_vision_build(qdq, "10.3.0", "fp16")
    assert "deprecated since TensorRT 10.12" in plan_vision_build(fp32, "10.13.0", "fp16").note
    assert plan_vision_build(fp16, "11.0.0").strongly_typed and plan_vision_build(qdq, "11.1.0").precision == "int8"


def test_network_flags_per_version() -> None:
    assert network_flag_names("8.6.2", False) == ("EXPLICIT_BATCH",)  # required before 10
    assert network_flag_names("10.3.0", True) == ("STRONGLY_TYPED",)
    assert network_flag_names("10.4.0", False) == ()  # explicit batch is implied from 10.0
    assert network_flag_names("11.0.0", True) == ()  # always strongly typed; the flag is deprecated
    with pytest.raises(RadtrtError, match="needs TensorRT 10"):
        network_flag_names("8.6.2", True)


def test_profile_and_trtexec_command(tmp_path: Path) -> None:
    vision_graph(tmp_path / "v.onnx")
    info = inspect_onnx(tmp_path / "v.onnx")
    profile = vision_profile(info, 8)
    # kernels chosen for one image, what infer and bench latency run by default
    assert profile == {"min": [1, 3, 56, 56], "opt": [1, 3, 56, 56], "max": [8, 3, 56, 56]}
    assert vision_profile(info, 8, 2)["opt"][0] == 2
    with pytest.raises(RadtrtError):
        vision_profile(info, 4, 5)
    cmd = trtexec_command(tmp_path / "v.onnx", tmp_path / "e", info, plan_vision_build(info, "10.3.0"), profile,
                          tmp_path / "t.cache")
    assert cmd == ["trtexec", f"--onnx={tmp_path / 'v.onnx'}", f"--saveEngine={tmp_path / 'e'}",
                   "--minShapes=pixel_values:1x3x56x56", "--optShapes=pixel_values:1x3x56x56",
                   "--maxShapes=pixel_values:8x3x56x56", f"--timingCacheFile={tmp_path / 't.cache'}", "--stronglyTyped"]


def test_engine_lookup_and_refusals(tmp_path: Path) -> None:
    bundle = make_fake_bundle(tmp_path)
    with pytest.raises(RadtrtError, match="has no TensorRT vision engine"):
        find_vision_engine(bundle, ORIN)
    folder = fake_engine(bundle, ORIN)
    engine, stamp = find_vision_engine(bundle, ORIN, "fp16")
    assert engine == folder / "vision.engine" and stamp["precision"] == "fp16"
    with pytest.raises(RadtrtError) as e:  # one line naming both machines
        find_vision_engine(bundle, V100)
    assert str(e.value) == (f"the TensorRT vision engine in {bundle} was built for Orin (sm87), TensorRT 10.3.0, "
                            f"CUDA 12.6; this host has Tesla V100-SXM2-32GB (sm70), TensorRT 10.4.0, CUDA 12.4: "
                            f"rebuild it on this host with: radtrt export --bundle {bundle} --target tensorrt")
    with pytest.raises(RadtrtError, match="install TensorRT on this host"):  # a rebuild there is refused too
        find_vision_engine(bundle, dataclasses.replace(V100, tensorrt=None))
    with pytest.raises(RadtrtError, match="has no TensorRT int8 vision engine"):
        find_vision_engine(bundle, ORIN, "int8")
    (folder / "vision.engine").write_bytes(b"truncated")
    with pytest.raises(RadtrtError, match="does not match its stamp"):
        find_vision_engine(bundle, ORIN)
    shutil.rmtree(folder)
    stamp_path = fake_engine(bundle, ORIN) / "engine.json"
    stamp = json.loads(stamp_path.read_text())
    stamp["onnx"]["sha256"] = "0" * 64
    stamp_path.write_text(json.dumps(stamp))
    with pytest.raises(RadtrtError, match="built from another export"):
        find_vision_engine(bundle, ORIN)


def test_lookup_takes_the_rebuild_after_a_cuda_update(tmp_path: Path) -> None:
    """A bundle from when engine keys held the CUDA version keeps its old folder after a rebuild under a new
    CUDA; both fit the host (CUDA is not compared), and the lookup must return the rebuild, not the folder
    that sorts first."""
    bundle = make_fake_bundle(tmp_path)
    old = fake_engine(bundle, ORIN)
    legacy = old.with_name("orin_sm87_trt10.3.0_cuda12.2_fp16")  # the old key layout, CUDA 12.2
    old.rename(legacy)
    updated = GpuInfo("Orin", (8, 7), "12.8", "10.3.0", "0.12.0")
    new = fake_engine(bundle, updated)
    for folder, built in ((legacy, "2026-01-01T00:00:00Z"), (new, "2026-02-01T00:00:00Z")):
        stamp = json.loads((folder / "engine.json").read_text())
        (folder / "engine.json").write_text(json.dumps(stamp | {"built": built}))
    assert min(p.name for p in (bundle / "tensorrt").iterdir()) == legacy.name
    for precision in ("fp16", None):
        engine, stamp = find_vision_engine(bundle, updated, precision)
        assert engine == new / "vision.engine" and stamp["gpu"]["cuda"] == "12.8"


def test_vision_files_are_hash_checked(tmp_path: Path) -> None:
    from radtrt.exporter.tensorrt import read_vision_manifest

    bundle = make_fake_bundle(tmp_path)
    assert read_vision_manifest(bundle)["precision"] == "fp16"
    data = bundle / "vision.onnx.data"
    raw = data.read_bytes()
    data.write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))
    with pytest.raises(RadtrtError, match="vision.onnx.data is missing or does not match"):
        read_vision_manifest(bundle)


# --- the build and the runtime against a stand-in ``tensorrt`` module (TensorRT 10 Python API names) ---

class _Layer:
    def __init__(self, kind: str, outputs: int = 1) -> None:
        self.type, self.num_outputs, self.precision, self.output_types = kind, outputs, None, {}

    def set_output_type(self, index: int, dtype: str) -> None:
        self.output_types[index] = dtype


class _Cache:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def serialize(self) -> bytes:
        return self.data or b"fresh cache"


class _Config:
    def __init__(self, *, other_device: bool = False) -> None:
        self.flags: list[str] = []
        self.profiles: list[object] = []
        self.pool: tuple | None = None
        self.cache: _Cache | None = None
        self.other_device = other_device

    def set_memory_pool_limit(self, pool: str, size: int) -> None:
        self.pool = (pool, size)

    def set_flag(self, flag: str) -> None:
        self.flags.append(flag)

    def add_optimization_profile(self, profile: object) -> int:
        self.profiles.append(profile)
        return 0

    def create_timing_cache(self, data: bytes) -> _Cache | None:
        return None if data == b"garbage" else _Cache(bytes(data))

    def set_timing_cache(self, cache: _Cache, ignore_mismatch: bool) -> bool:
        assert isinstance(cache, _Cache) and ignore_mismatch is False
        if self.other_device and cache.data:
            return False
        self.cache = cache
        return True

    def get_timing_cache(self) -> _Cache | None:
        return self.cache


def fake_tensorrt(version: str, *, cache_on_other_device: bool = False) -> types.SimpleNamespace:
    """The parts of the ``tensorrt`` module radtrt calls, recording what it is asked to do. Enum values
    follow the release: STRONGLY_TYPED is 1 on 10.x and 0 (ignored) on 11; EXPLICIT_BATCH is gone in 11."""
    major = int(version.split(".")[0])
    calls: dict = {"logs": []}
    layers = [_Layer("MATRIX_MULTIPLY"), _Layer("NORMALIZATION"), _Layer("SOFTMAX"), _Layer("ELEMENTWISE")]

    class Logger:
        WARNING = "warning"

        def __init__(self, severity: str) -> None:
            pass

        def log(self, severity: str, msg: str) -> None:
            calls["logs"].append(msg)

    class Builder:
        def __init__(self, logger: Logger) -> None:
            pass

        def create_network(self, flags: int = 0) -> types.SimpleNamespace:
            calls["network_flags"] = flags
            return types.SimpleNamespace(num_layers=len(layers), get_layer=layers.__getitem__)

        def create_builder_config(self) -> _Config:
            calls["config"] = _Config(other_device=cache_on_other_device)
            return calls["config"]

        def create_optimization_profile(self) -> types.SimpleNamespace:
            return types.SimpleNamespace(set_shape=lambda *a: calls.setdefault("shape", a))

        def build_serialized_network(self, network: object, config: _Config) -> bytes:
            return b"plan"

    class OnnxParser:
        num_errors = 0

        def __init__(self, network: object, logger: Logger) -> None:
            pass

        def parse_from_file(self, path: str) -> bool:
            calls["parsed"] = path
            return True

    flags = {"STRONGLY_TYPED": 0} if major >= 11 else {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1}
    builder_flags = {} if major >= 11 else {"FP16": "FP16", "OBEY_PRECISION_CONSTRAINTS": "OBEY_PRECISION_CONSTRAINTS"}
    return types.SimpleNamespace(
        __version__=version, calls=calls, layers=layers, Logger=Logger, Builder=Builder, OnnxParser=OnnxParser,
        NetworkDefinitionCreationFlag=types.SimpleNamespace(**flags),
        BuilderFlag=types.SimpleNamespace(**builder_flags),
        MemoryPoolType=types.SimpleNamespace(WORKSPACE="WORKSPACE"), float32="float32",
        LayerType=types.SimpleNamespace(**{k: k for k in ("MATRIX_MULTIPLY", "NORMALIZATION", "SOFTMAX",
                                                          "ELEMENTWISE")}))


def _fake_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, version: str, *, dtype: int = TensorProto.FLOAT16,
                requested: str | None = None, **fake_kw: bool) -> types.SimpleNamespace:
    trt = fake_tensorrt(version, **fake_kw)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    vision_graph(tmp_path / "v.onnx", dtype=dtype)
    info = inspect_onnx(tmp_path / "v.onnx")
    plan = plan_vision_build(info, version, requested)
    trt.engine = _build_serialized(tmp_path / "v.onnx", info, plan, vision_profile(info, 4), tmp_path / "t.cache",
                                   2**30, version)
    return trt


@pytest.mark.parametrize("version,flags", [("10.3.0", 1 << 1), ("10.4.0", 1 << 1), ("11.0.0", 0)])
def test_strongly_typed_build_sets_no_precision_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, version: str,
                                                     flags: int) -> None:
    trt = _fake_build(tmp_path, monkeypatch, version)
    config = trt.calls["config"]
    assert trt.engine == b"plan" and trt.calls["network_flags"] == flags
    assert config.flags == [] and config.pool == ("WORKSPACE", 2**30)  # TensorRT refuses FP16 on strong networks
    assert all(layer.precision is None and not layer.output_types for layer in trt.layers)
    assert trt.calls["shape"] == ("pixel_values", [1, 3, 56, 56], [1, 3, 56, 56], [4, 3, 56, 56])
    assert (tmp_path / "t.cache").read_bytes() == b"fresh cache" and not trt.calls["logs"]


@pytest.mark.parametrize("version,flags", [("8.6.2", 1 << 0), ("10.3.0", 0)])
def test_weakly_typed_fp16_pins_norm_and_softmax(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, version: str,
                                                 flags: int) -> None:
    trt = _fake_build(tmp_path, monkeypatch, version, dtype=TensorProto.FLOAT, requested="fp16")
    assert trt.calls["network_flags"] == flags  # EXPLICIT_BATCH only before 10
    assert trt.calls["config"].flags == ["FP16", "OBEY_PRECISION_CONSTRAINTS"]
    pinned = {layer.type for layer in trt.layers
              if layer.precision == "float32" and layer.output_types == {0: "float32"}}
    assert pinned == {"NORMALIZATION", "SOFTMAX"}


def test_timing_cache_is_reused_or_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "t.cache").write_bytes(b"tactics")
    trt = _fake_build(tmp_path, monkeypatch, "10.3.0")
    assert trt.calls["config"].cache.data == b"tactics" and not trt.calls["logs"]
    (tmp_path / "t.cache").write_bytes(b"garbage")  # unreadable: a fresh cache, not a crash
    trt = _fake_build(tmp_path, monkeypatch, "10.3.0")
    assert "cannot be read" in trt.calls["logs"][0] and (tmp_path / "t.cache").read_bytes() == b"fresh cache"
    (tmp_path / "t.cache").write_bytes(b"tactics")  # other device properties: set_timing_cache says False
    trt = _fake_build(tmp_path, monkeypatch, "10.3.0", cache_on_other_device=True)
    assert "another device" in trt.calls["logs"][0] and trt.calls["config"].cache.data == b""
    assert not (tmp_path / "t.cache.partial").exists()
    assert attach_timing_cache(_Config(), b"") is None


def test_build_refuses_a_different_imported_tensorrt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("10.4.0"))
    vision_graph(tmp_path / "v.onnx")
    info = inspect_onnx(tmp_path / "v.onnx")
    with pytest.raises(RadtrtError, match="imported tensorrt module is version 10.4.0, but TensorRT 10.3.0"):
        _build_serialized(tmp_path / "v.onnx", info, plan_vision_build(info, "10.3.0"), vision_profile(info, 2),
                          tmp_path / "t.cache", 2**30, "10.3.0")


class _Enum(str):
    @property
    def name(self) -> str:
        return str(self)


def fake_runtime_module(version: str, io: dict[str, str], *, context: bool = True) -> types.SimpleNamespace:
    """``tensorrt`` for TrtVisionEngine's checks, which all run before any CUDA work."""
    engine = types.SimpleNamespace(
        num_io_tensors=len(io), get_tensor_name=list(io).__getitem__,
        get_tensor_mode=lambda name: _Enum(io[name]), get_tensor_dtype=lambda name: _Enum("HALF"),
        create_execution_context=lambda: object() if context else None)
    runtime = types.SimpleNamespace(deserialize_cuda_engine=lambda data: engine if data == b"plan" else None)
    logger = type("Logger", (), {"WARNING": "warning", "__init__": lambda self, severity: None})
    return types.SimpleNamespace(__version__=version, Logger=logger, Runtime=lambda logger: runtime)


def test_vision_runtime_checks_before_running(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from radtrt.runtime.tensorrt import TrtVisionEngine, engine_io_problem, torch_dtype

    stamp = {"gpu": gpu_stamp(ORIN), "input": "pixel_values", "output": "image_embeds",
             "profile": {"max": [4, 3, 56, 56]}}
    path = tmp_path / "vision.engine"
    path.write_bytes(b"plan")
    good = {"pixel_values": "INPUT", "image_embeds": "OUTPUT"}
    monkeypatch.setitem(sys.modules, "tensorrt", fake_runtime_module("10.4.0", good))
    with pytest.raises(RadtrtError, match="imported tensorrt module is version 10.4.0, but TensorRT 10.3.0"):
        TrtVisionEngine(path, stamp)
    renamed = {"input": "INPUT", "image_embeds": "OUTPUT"}
    monkeypatch.setitem(sys.modules, "tensorrt", fake_runtime_module("10.3.0", renamed))
    with pytest.raises(RadtrtError, match="I/O tensors are"):
        TrtVisionEngine(path, stamp)
    monkeypatch.setitem(sys.modules, "tensorrt", fake_runtime_module("10.3.0", good, context=False))
    with pytest.raises(RadtrtError, match="could not create an execution context"):
        TrtVisionEngine(path, stamp)
    path.write_bytes(b"truncated")
    with pytest.raises(RadtrtError, match="could not deserialize"):
        TrtVisionEngine(path, stamp)
    assert engine_io_problem(good, "pixel_values", "image_embeds") is None
    with pytest.raises(RadtrtError, match="TensorRT type FP8"):
        torch_dtype("FP8", "image_embeds")


def test_a_failed_rebuild_leaves_no_stamp_vouching_for_the_old_engine(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine was rewritten in place with the old stamp still beside it: an interrupted rebuild left a torn
    engine, and a stamp cut short was a JSONDecodeError traceback at the next lookup."""
    import radtrt.exporter.tensorrt as tensorrt_module

    bundle = make_fake_bundle(tmp_path)
    folder = fake_engine(bundle, ORIN)

    def interrupted(*args: object, **kwargs: object) -> bytes:
        raise KeyboardInterrupt

    monkeypatch.setattr(tensorrt_module, "_build_serialized", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_vision_engine(bundle, ORIN, precision="fp16")
    assert not (folder / "engine.json").exists()
    with pytest.raises(RadtrtError, match="has no TensorRT fp16 vision engine"):
        find_vision_engine(bundle, ORIN, "fp16")
    monkeypatch.setattr(tensorrt_module, "_build_serialized", lambda *a, **k: b"plan")
    assert build_vision_engine(bundle, ORIN, precision="fp16") == folder
    engine, stamp = find_vision_engine(bundle, ORIN, "fp16")
    assert engine.read_bytes() == b"plan" and stamp["precision"] == "fp16"
    (folder / "engine.json").write_text('{"format": ')  # cut short
    with pytest.raises(RadtrtError, match="engine.json is not valid JSON"):
        find_vision_engine(bundle, ORIN, "fp16")


def test_a_failed_first_build_leaves_no_engine_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh bundle whose build failed kept an empty tensorrt/<key>/ folder; a folder is made once there is
    an engine, and one made by a build that then fails is removed (an engine without its stamp is no use)."""
    import radtrt.exporter.tensorrt as tensorrt_module
    from radtrt.errors import fail

    bundle = make_fake_bundle(tmp_path)

    def refused(*args: object, **kwargs: object) -> bytes:
        fail("TensorRT could not build the vision engine (its log above says why)")

    monkeypatch.setattr(tensorrt_module, "_build_serialized", refused)
    with pytest.raises(RadtrtError, match="could not build"):
        build_vision_engine(bundle, ORIN, precision="fp16")
    assert not (bundle / "tensorrt").exists()

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tensorrt_module, "_build_serialized", lambda *a, **k: b"plan")
    monkeypatch.setattr(tensorrt_module, "write_text", disk_full)  # the stamp, after the engine file
    with pytest.raises(OSError):
        build_vision_engine(bundle, ORIN, precision="fp16")
    assert not (bundle / "tensorrt" / engine_key(ORIN, "fp16")).exists()


def test_a_damaged_vision_engine_names_the_rebuild_command(tmp_path: Path) -> None:
    """'does not match its stamp (corrupt): rebuild it' and 'built from another export of vision.onnx: rebuild it'
    gave no command, where the other engine messages do."""
    bundle = make_fake_bundle(tmp_path)
    folder = fake_engine(bundle, ORIN)
    build = f"rebuild it with: radtrt export --bundle {bundle} --target tensorrt$"
    stamp = json.loads((folder / "engine.json").read_text())
    (folder / "engine.json").write_text(json.dumps({**stamp, "onnx": {"file": "vision.onnx", "sha256": "0" * 64}}))
    with pytest.raises(RadtrtError, match=f"built from another export of vision.onnx: {build}"):
        find_vision_engine(bundle, ORIN)
    (folder / "vision.engine").write_bytes(b"truncated")
    with pytest.raises(RadtrtError, match=f"does not match its stamp \\(corrupt\\): {build}"):
        find_vision_engine(bundle, ORIN)
