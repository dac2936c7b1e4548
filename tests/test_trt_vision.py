"""TensorRT vision engine planning, profiles, command lines and engine lookup/stamps, without TensorRT.

``make_fake_bundle`` writes a small but valid bundle (a hand-made vision.onnx with external weights,
the tiny tokenizer and config, a manifest with hashes) in well under a second, instead of a 50 s export.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from radtrt.errors import RadtrtError
from radtrt.exporter.bundle import BUNDLE_FORMAT, BUNDLE_FORMAT_VERSION, MANIFEST, sha256_file
from radtrt.exporter.gpu import GpuInfo, engine_key, gpu_stamp
from radtrt.exporter.tensorrt import (STAMP_FORMAT, find_vision_engine, inspect_onnx, plan_vision_build,
                                      trtexec_command, vision_profile)
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
    manifest = {"format": BUNDLE_FORMAT, "format_version": BUNDLE_FORMAT_VERSION,
                "precision": "int8" if qdq else precision, "model": {"name": "tiny"}, "files": files,
                "decoder": {"num_layers": 2, "num_kv_heads": 2, "head_dim": 16, "hidden_size": 64, "vocab_size": 512,
                            "eos_token_id": 2},
                "vision": {"image_size": 56, "num_image_tokens": cfg.num_image_tokens}}
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
    old = plan_vision_build(fp16, "8.6.2")  # JetPack 5: no strong typing, pin norm/softmax to fp32
    assert (old.strongly_typed, old.builder_flags, old.fp32_layer_types) == (
        False, ("FP16", "OBEY_PRECISION_CONSTRAINTS"), ("NORMALIZATION", "SOFTMAX"))
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


def test_profile_and_trtexec_command(tmp_path: Path) -> None:
    vision_graph(tmp_path / "v.onnx")
    info = inspect_onnx(tmp_path / "v.onnx")
    profile = vision_profile(info, 8)
    assert profile == {"min": [1, 3, 56, 56], "opt": [8, 3, 56, 56], "max": [8, 3, 56, 56]}
    assert vision_profile(info, 8, 2)["opt"][0] == 2
    with pytest.raises(RadtrtError):
        vision_profile(info, 4, 5)
    cmd = trtexec_command(tmp_path / "v.onnx", tmp_path / "e", info, plan_vision_build(info, "10.3.0"), profile,
                          tmp_path / "t.cache")
    assert cmd == ["trtexec", f"--onnx={tmp_path / 'v.onnx'}", f"--saveEngine={tmp_path / 'e'}",
                   "--minShapes=pixel_values:1x3x56x56", "--optShapes=pixel_values:8x3x56x56",
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
                            f"rebuild it on this host with 'radtrt export --target tensorrt'")
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


def test_vision_files_are_hash_checked(tmp_path: Path) -> None:
    from radtrt.exporter.tensorrt import read_vision_manifest

    bundle = make_fake_bundle(tmp_path)
    assert read_vision_manifest(bundle)["precision"] == "fp16"
    data = bundle / "vision.onnx.data"
    raw = data.read_bytes()
    data.write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))
    with pytest.raises(RadtrtError, match="vision.onnx.data is missing or does not match"):
        read_vision_manifest(bundle)
