"""The Triton model repository: configs written, parsed back and checked; the Python models' logic."""

from __future__ import annotations

import io
import json
import re
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from onnx import TensorProto
from PIL import Image

from radtrt.errors import RadtrtError
from radtrt.exporter.gpu import gpu_stamp
from radtrt.exporter.pbtxt import Ident, parse_pbtxt, to_pbtxt
from radtrt.exporter.triton import RepoSpec, check_repo, model_configs, write_triton_repo
from radtrt.exporter.trtllm_build import engine_files
from radtrt.exporter.triton_models import PostprocessingModel, PreprocessingModel, decode_output

from test_trt_vision import ORIN, fake_engine, make_fake_bundle

SPEC = RepoSpec(image_size=518, num_image_tokens=1369, hidden_size=4096, vocab_size=32000, eos_token_id=2,
                pixel_dtype="float16", embeds_dtype="float16", vision_input="pixel_values",
                vision_output="image_embeds", max_batch=8)


def _decoder_engine(root: Path) -> Path:
    engine = root / "engine"
    engine.mkdir()
    (engine / "config.json").write_text(json.dumps({"pretrained_config": {"dtype": "float16"}}))
    return engine


def test_configs_round_trip_through_protobuf_text(tmp_path: Path) -> None:
    configs = model_configs(SPEC, "tensorrt_plan", tmp_path / "engine")
    for cfg in configs.values():
        assert parse_pbtxt(to_pbtxt(cfg)) == cfg
    text = to_pbtxt(configs["vision"])
    assert 'platform: "tensorrt_plan"' in text and "data_type: TYPE_FP16" in text and "dims: [ 1369, 4096 ]" in text
    llm = configs["tensorrt_llm"]
    params = {p["key"]: p["value"]["string_value"] for p in llm["parameters"]}
    assert params["gpt_model_path"] == str(tmp_path / "engine")
    assert params["gpt_model_type"] == "inflight_fused_batching"
    assert params["exclude_input_in_output"] == "true"
    # identical fake image ids in every request: reused KV blocks would carry another image (backend >= 0.19
    # turns reuse on when the parameter is absent)
    assert params["enable_kv_cache_reuse"] == "false"
    inputs = {i["name"]: i for i in llm["input"]}
    for scalar in ("input_lengths", "request_output_len", "end_id", "pad_id", "prompt_vocab_size"):
        assert inputs[scalar]["dims"] == [1] and inputs[scalar]["reshape"] == {"shape": []}, scalar
    assert {i["name"] for i in llm["input"]} >= {"input_ids", "prompt_embedding_table", "prompt_vocab_size"}


def test_parser_reads_triton_style_configs() -> None:
    text = """
    # comment
    name: "tensorrt_llm"
    backend: "tensorrtllm"
    max_batch_size: 4
    model_transaction_policy { decoupled: false }
    input [
      { name: "input_ids" data_type: TYPE_INT32 dims: [ -1 ] allow_ragged_batch: true },
      { name: "input_lengths" data_type: TYPE_INT32 dims: [ 1 ] reshape: { shape: [ ] } }
    ]
    parameters: { key: "gpt_model_path" value: { string_value: "/e" } }
    parameters: { key: "max_beam_width" value: { string_value: "1" } }
    instance_group [ { count: 1 kind: KIND_CPU } ]
    """
    cfg = parse_pbtxt(text)
    assert cfg["model_transaction_policy"] == {"decoupled": False}
    assert cfg["input"][1]["reshape"] == {"shape": []} and cfg["input"][0]["dims"] == [-1]
    assert [p["key"] for p in cfg["parameters"]] == ["gpt_model_path", "max_beam_width"]
    assert cfg["instance_group"][0]["kind"] == Ident("KIND_CPU")
    with pytest.raises(RadtrtError, match="cannot parse"):
        parse_pbtxt('name: "x" ~')


def test_repository_with_onnxruntime_vision(tmp_path: Path) -> None:
    bundle = make_fake_bundle(tmp_path)
    engine = _decoder_engine(tmp_path)
    repo = write_triton_repo(bundle, tmp_path / "repo", vision_backend="onnxruntime", decoder_engine=engine,
                             max_batch=4)
    assert sorted(p.name for p in repo.iterdir()) == ["postprocessing", "preprocessing", "radtrt",
                                                      "radtrt-serving.json", "tensorrt_llm", "vision"]
    # an engine given by its path on the serving host: which TensorRT-LLM built it is not known here
    serving = json.loads((repo / "radtrt-serving.json").read_text())
    assert serving["tensorrt_llm"] is None and "its version is not known here" in serving["needs"]
    assert (repo / "vision/1/model.onnx").is_file() and (repo / "vision/1/vision.onnx.data").is_file()
    for name, cls in (("preprocessing", PreprocessingModel), ("postprocessing", PostprocessingModel)):
        shim: dict = {}
        exec((repo / name / "1" / "model.py").read_text(), shim)  # what Triton's Python backend imports
        assert shim["TritonPythonModel"] is cls
        assert {"tokenizer.model", "model_config.json"} <= {p.name for p in (repo / name / "1").iterdir()}
    configs = check_repo(repo)
    vision = configs["vision"]
    assert vision["platform"] == "onnxruntime_onnx" and vision["max_batch_size"] == 4
    assert vision["input"][0]["dims"] == [3, 56, 56] and vision["output"][0]["dims"] == [16, 64]
    steps = configs["radtrt"]["ensemble_scheduling"]["step"]
    assert [s["model_name"] for s in steps] == ["preprocessing", "vision", "tensorrt_llm", "postprocessing"]
    llm_inputs = {m["key"]: m["value"] for m in steps[2]["input_map"]}
    assert llm_inputs["prompt_embedding_table"] == "_image_embeds"  # the image rows feed the prompt table
    params = {p["key"]: p["value"]["string_value"] for p in configs["tensorrt_llm"]["parameters"]}
    assert params["gpt_model_path"] == str(engine)
    pre = {p["key"]: p["value"]["string_value"] for p in configs["preprocessing"]["parameters"]}
    assert pre == {"vocab_size": "512", "num_image_tokens": "16", "pixel_dtype": "float16"}
    with pytest.raises(RadtrtError, match="not empty"):
        write_triton_repo(bundle, repo, vision_backend="onnxruntime", decoder_engine=engine)
    (tmp_path / "a-file").write_text("user data")  # NotADirectoryError traceback from iterdir()
    with pytest.raises(RadtrtError, match="exists and is not a folder"):
        write_triton_repo(bundle, tmp_path / "a-file", vision_backend="onnxruntime", decoder_engine=engine)


def test_repository_with_tensorrt_vision_and_refusals(tmp_path: Path) -> None:
    bundle = make_fake_bundle(tmp_path)
    folder = fake_engine(bundle, ORIN, max_batch=8)
    engine = _decoder_engine(tmp_path)
    repo = write_triton_repo(bundle, tmp_path / "repo", gpu=ORIN, decoder_engine=engine)
    assert (repo / "vision/1/model.plan").read_bytes() == (folder / "vision.engine").read_bytes()
    assert check_repo(repo)["vision"]["platform"] == "tensorrt_plan"
    with pytest.raises(RadtrtError, match="allows batch 8, below Triton's max batch 16"):
        write_triton_repo(bundle, tmp_path / "repo2", gpu=ORIN, decoder_engine=engine, max_batch=16)
    assert not (tmp_path / "repo2").exists() and not (tmp_path / "repo2.partial").exists()  # nothing half-written
    built = bundle / "trtllm" / "orin-fp16"  # the bundle's own decoder engine, built for batch 2
    built.mkdir(parents=True)
    (built / "build.json").write_text(json.dumps({"format": "radtrt-trtllm-engine", "gpu": gpu_stamp(ORIN),
                                                  "mode": "fp16", "int8_kv": False,
                                                  "limits": {"max_batch": 2, "max_input_len": 64, "max_seq_len": 96},
                                                  "engine_files": engine_files(_decoder_engine(built))}))
    with pytest.raises(RadtrtError, match="the TensorRT-LLM fp16 engine allows batch 2, below Triton's max batch 8: "
                                          "pass --max-batch 2"):
        write_triton_repo(bundle, tmp_path / "repo4", gpu=ORIN)
    llm = check_repo(write_triton_repo(bundle, tmp_path / "repo5", gpu=ORIN, max_batch=2))["tensorrt_llm"]
    # the engines load only under the libraries that built them: the repository says which
    serving = json.loads((tmp_path / "repo5" / "radtrt-serving.json").read_text())
    assert serving["tensorrt_llm"] == ORIN.tensorrt_llm and serving["tensorrt"] == [ORIN.tensorrt]
    assert serving["needs"] == (f"serve it from a tritonserver image with TensorRT-LLM {ORIN.tensorrt_llm} and TensorRT "
                                f"{ORIN.tensorrt} (the tensorrtllm_backend release of TensorRT-LLM {ORIN.tensorrt_llm}), "
                                f"on {ORIN.name} (sm{ORIN.sm[0]}{ORIN.sm[1]}): its engines were built with these and "
                                f"load with no other")
    assert llm["max_batch_size"] == 2
    # the KV cache bounded by the engine's limits (2 x two 64-token blocks of its 96 positions), not 85% of a
    # Jetson's free memory
    assert {p["key"]: p["value"]["string_value"] for p in llm["parameters"]}["max_tokens_in_paged_kv_cache"] == "256"
    pre = check_repo(tmp_path / "repo5")["preprocessing"]
    assert {p["key"]: p["value"]["string_value"] for p in pre["parameters"]}.items() >= {
        "max_input_len": "64", "max_seq_len": "96"}.items()  # requests over them are refused, not cut short
    fp32_out = make_fake_bundle(tmp_path / "b2", out_dtype=TensorProto.FLOAT)
    with pytest.raises(RadtrtError, match="vision engine outputs float32 but the decoder's prompt table is float16"):
        write_triton_repo(fp32_out, tmp_path / "repo3", gpu=ORIN, decoder_engine=engine)


def test_a_given_engine_is_written_as_typed_and_checked_against_the_bundle(tmp_path: Path) -> None:
    """--trtllm-engine names a folder on the serving host: /var/run/... was written as /run/... (this host's
    symlink). An engine readable here was checked for its dtype only: another model's vocabulary turned the
    image's fake ids into words, and a smaller prompt table, batch or input length failed every request."""
    bundle = make_fake_bundle(tmp_path)
    engine = _decoder_engine(tmp_path)
    (tmp_path / "alias").symlink_to(engine)
    repo = write_triton_repo(bundle, tmp_path / "r0", vision_backend="onnxruntime", decoder_engine=tmp_path / "alias")
    params = {p["key"]: p["value"]["string_value"] for p in check_repo(repo)["tensorrt_llm"]["parameters"]}
    assert params["gpt_model_path"] == str(tmp_path / "alias")
    good = {"pretrained_config": {"dtype": "float16", "vocab_size": 512, "hidden_size": 64},
            "build_config": {"max_batch_size": 4, "max_input_len": 256, "max_prompt_embedding_table_size": 64}}
    cases = [({"pretrained_config": {"vocab_size": 32000}}, r"engine of another model \(vocab_size 32000, the "
                                                           r"bundle's 512\)"),
             ({"pretrained_config": {"hidden_size": 4096}}, r"hidden_size 4096, the bundle's 64"),
             ({"build_config": {"max_prompt_embedding_table_size": 32}},
              r"max_prompt_embedding_table_size 32, below the image rows of a full batch \(4 x 16\): pass "
              r"--max-batch 2, or rebuild"),
             ({"build_config": {"max_prompt_embedding_table_size": 0}}, r"table_size 0, .*: rebuild the engine"),
             ({"build_config": {"max_batch_size": 1}}, r"max_batch_size 1, below Triton's max batch 4: pass "
                                                       r"--max-batch 1"),
             ({"build_config": {"max_input_len": 8}}, r"max_input_len 8, below the \d+-token prompt without an "
                                                      r"indication: rebuild the engine")]
    for i, (edit, match) in enumerate(cases):
        config = {k: {**v, **edit.get(k, {})} for k, v in good.items()}
        (engine / "config.json").write_text(json.dumps(config))
        with pytest.raises(RadtrtError, match=match):
            write_triton_repo(bundle, tmp_path / f"r{i + 1}", vision_backend="onnxruntime", decoder_engine=engine,
                              max_batch=4)
    for bad in ([], 0):  # falsy: it passed as "no build_config"
        (engine / "config.json").write_text(json.dumps({**good, "build_config": bad}))
        with pytest.raises(RadtrtError, match=r"build_config is (list|int), not an object"):
            write_triton_repo(bundle, tmp_path / "rb", vision_backend="onnxruntime", decoder_engine=engine, max_batch=4)
    (engine / "config.json").write_text(json.dumps(good))
    assert write_triton_repo(bundle, tmp_path / "ok", vision_backend="onnxruntime", decoder_engine=engine,
                             max_batch=4).is_dir()
    assert "max_tokens_in_paged_kv_cache" not in params  # an engine not readable here: the backend's default
    good["build_config"]["max_seq_len"] = 300
    (engine / "config.json").write_text(json.dumps(good))
    repo = write_triton_repo(bundle, tmp_path / "ok2", vision_backend="onnxruntime", decoder_engine=engine, max_batch=4)
    params = {p["key"]: p["value"]["string_value"] for p in check_repo(repo)["tensorrt_llm"]["parameters"]}
    assert params["max_tokens_in_paged_kv_cache"] == str(4 * 320)
    pre = {p["key"]: p["value"]["string_value"] for p in check_repo(repo)["preprocessing"]["parameters"]}
    assert pre["max_input_len"] == "256" and pre["max_seq_len"] == "300"
    good["build_config"]["max_seq_len"] = True  # a damaged config: not 1 token (it bounded the cache at 256)
    (engine / "config.json").write_text(json.dumps(good))
    repo = write_triton_repo(bundle, tmp_path / "ok3", vision_backend="onnxruntime", decoder_engine=engine, max_batch=4)
    params = {p["key"]: p["value"]["string_value"] for p in check_repo(repo)["tensorrt_llm"]["parameters"]}
    assert "max_tokens_in_paged_kv_cache" not in params
    for key in ("max_seq_len", "max_batch_size"):  # 10**29 reached config.pbtxt: past int64 when served
        (engine / "config.json").write_text(json.dumps({**good, "build_config": {**good["build_config"], key: 10**29}}))
        with pytest.raises(RadtrtError, match=f"build_config.{key} is {10**29}, more than any engine holds \\(at "
                                              f"most 2147483647, .*rebuild the engine$"):
            write_triton_repo(bundle, tmp_path / "huge", vision_backend="onnxruntime", decoder_engine=engine,
                              max_batch=4)
        assert not (tmp_path / "huge").exists()
    for damaged, match in (({**good, "build_config": "x"}, "build_config is str, not an object"),
                           ([good], "does not hold a JSON object")):  # AttributeError tracebacks
        (engine / "config.json").write_text(json.dumps(damaged))
        with pytest.raises(RadtrtError, match=match):
            write_triton_repo(bundle, tmp_path / "bad", vision_backend="onnxruntime", decoder_engine=engine)


def test_an_fp32_or_int8_bundles_vision_graph_is_cast_for_the_prompt_table(tmp_path: Path) -> None:
    """An fp32 or INT8 bundle (float32 image embeddings) could not be served: the TensorRT-LLM engine takes its
    prompt table in float16. Through ONNX Runtime, the served graph now ends in a cast."""
    import onnxruntime as ort

    engine = _decoder_engine(tmp_path)
    for precision, qdq in (("fp32", False), ("int8", True)):
        bundle = make_fake_bundle(tmp_path / precision, precision=precision, qdq=qdq)
        repo = write_triton_repo(bundle, tmp_path / f"repo-{precision}", vision_backend="onnxruntime",
                                 decoder_engine=engine)
        configs = check_repo(repo)  # the vision output and the prompt table agree
        assert configs["vision"]["output"][0]["data_type"] == Ident("TYPE_FP16")
        assert configs["vision"]["input"][0]["data_type"] == Ident("TYPE_FP32")
        pixels = np.random.default_rng(0).standard_normal((2, 3, 56, 56)).astype(np.float32)
        served = ort.InferenceSession(str(repo / "vision/1/model.onnx"), providers=["CPUExecutionProvider"])
        original = ort.InferenceSession(str(bundle / "vision.onnx"), providers=["CPUExecutionProvider"])
        out, = served.run(None, {"pixel_values": pixels})
        ref, = original.run(None, {"pixel_values": pixels})
        assert out.dtype == np.float16 and served.get_outputs()[0].name == "image_embeds"
        np.testing.assert_array_equal(out, ref.astype(np.float16))
        assert (bundle / "vision.onnx").read_bytes() != (repo / "vision/1/model.onnx").read_bytes()


def test_check_repo_catches_broken_wiring(tmp_path: Path) -> None:
    bundle = make_fake_bundle(tmp_path)
    repo = write_triton_repo(bundle, tmp_path / "repo", vision_backend="onnxruntime",
                             decoder_engine=_decoder_engine(tmp_path))
    path = repo / "tensorrt_llm" / "config.pbtxt"
    path.write_text(path.read_text().replace('"prompt_embedding_table"', '"prompt_table"'))
    with pytest.raises(RadtrtError, match="model tensorrt_llm has no input 'prompt_embedding_table'"):
        check_repo(repo)
    path = repo / "vision" / "config.pbtxt"
    path.write_text(path.read_text().replace("TYPE_FP16", "TYPE_FP32"))
    with pytest.raises(RadtrtError, match="wants TYPE_FP32 but receives TYPE_FP16"):
        check_repo(repo)
    # what Triton refuses as it loads the ensemble: an unfed required input, a tensor of other dims
    (tmp_path / "e").mkdir()
    engine = _decoder_engine(tmp_path / "e")
    for i, (model, old, new, match) in enumerate((
            ("radtrt", r'\{\s*key: "input_lengths"\s*value: "\w+"\s*\},', "",
             r"feeds model tensorrt_llm no input_lengths \(required"),
            ("radtrt", r'\{\s*key: "end_id"\s*value: "\w+"\s*\},', "", None),  # an optional input
            ("preprocessing", r"dims: \[ 3, 56, 56 \]", "dims: [ 3, 64, 64 ]",
             r"vision.pixel_values wants dims \[3, 56, 56\] but receives \[3, 64, 64\]"))):
        fresh = write_triton_repo(bundle, tmp_path / f"r{i}", vision_backend="onnxruntime", decoder_engine=engine)
        target = fresh / model / "config.pbtxt"
        edited = re.sub(old, new, target.read_text(), count=1)
        assert edited != target.read_text()
        target.write_text(edited)
        if match is None:
            check_repo(fresh)
        else:
            with pytest.raises(RadtrtError, match=match):
                check_repo(fresh)


def test_python_models_prepare_and_decode(tmp_path: Path) -> None:
    bundle = make_fake_bundle(tmp_path)
    repo = write_triton_repo(bundle, tmp_path / "repo", vision_backend="onnxruntime",
                             decoder_engine=_decoder_engine(tmp_path))
    args = {"model_config": json.dumps({"parameters": {k: {"string_value": v} for k, v in
                                                       {"vocab_size": "512", "num_image_tokens": "16",
                                                        "pixel_dtype": "float16"}.items()}}),
            "model_repository": str(repo / "preprocessing"), "model_version": "1"}
    model = PreprocessingModel()
    model.initialize(args)
    png = io.BytesIO()
    Image.fromarray((np.arange(80 * 60) % 251).astype(np.uint8).reshape(80, 60)).save(png, format="PNG")
    out = model.prepare(png.getvalue(), "Cough", 32)
    assert out["PIXEL_VALUES"].shape == (1, 3, 56, 56) and out["PIXEL_VALUES"].dtype == np.float16
    ids = out["INPUT_IDS"][0].tolist()
    assert ids[ids.index(512):ids.index(512) + 16] == list(range(512, 528)) and max(ids) == 527
    assert out["INPUT_LENGTH"].tolist() == [[len(ids)]] and out["REQUEST_OUTPUT_LEN"].tolist() == [[32]]
    assert out["PROMPT_VOCAB_SIZE"].tolist() == [[16]] and out["END_ID"].tolist() == [[2]]
    assert len(model.prepare(png.getvalue(), "", 32)["INPUT_IDS"][0]) < len(ids)  # no indication, shorter query
    # what infer says on stderr reaches the client: a Triton client never saw it
    assert out["WARNINGS"].tolist() == [[b"IMAGE: the image is only 60 x 80 pixels (a chest radiograph has "
                                         b"thousands a side); this report is unreliable"]]
    big = io.BytesIO()
    Image.fromarray((np.arange(512 * 512) % 251).astype(np.uint8).reshape(512, 512)).save(big, format="PNG")
    assert model.prepare(big.getvalue(), "", 32)["WARNINGS"].tolist() == [[b""]]
    with pytest.raises(RadtrtError):
        model.prepare(b"not an image", "", 32)
    # the engine's limits, tighter than the model's 512 positions: its backend cut MAX_NEW_TOKENS to fit with only a
    # warning in the server's log, and a longer prompt got the vendor's error instead of 'shorten INDICATION'
    limited = PreprocessingModel()
    limited.initialize({**args, "model_config": json.dumps({"parameters": {k: {"string_value": v} for k, v in {
        "vocab_size": "512", "num_image_tokens": "16", "pixel_dtype": "float16", "max_input_len": str(len(ids)),
        "max_seq_len": str(len(ids) + 40)}.items()}})})
    assert limited.prepare(png.getvalue(), "Cough", 40)["REQUEST_OUTPUT_LEN"].tolist() == [[40]]
    with pytest.raises(RadtrtError, match=rf"engine's sequences \(up to {len(ids) + 40} positions\): MAX_NEW_TOKENS 40 "
                                          r"at most for this prompt$"):
        limited.prepare(png.getvalue(), "Cough", 41)
    with pytest.raises(RadtrtError, match=r"longer than the TensorRT-LLM engine's prompts .*: shorten INDICATION$"):
        limited.prepare(png.getvalue(), "Cough with fever", 8)
    post = PostprocessingModel()
    post.initialize({"model_config": json.dumps({"parameters": {"eos_token_id": {"string_value": "2"}}}),
                     "model_repository": str(repo / "postprocessing"), "model_version": "1"})
    report, kept = decode_output(post.tokenizer, np.array([[300, 301, 2, 2]]), np.array([4]), post.eos)
    assert kept == [300, 301] and report == post.tokenizer.decode([300, 301]).strip()


def _fake_pb_utils() -> types.ModuleType:
    """The parts of Triton's ``triton_python_backend_utils`` the Python models use."""
    pb = types.ModuleType("triton_python_backend_utils")

    class Tensor:
        def __init__(self, name: str, array: np.ndarray) -> None:
            self.name, self.array = name, array

        def as_numpy(self) -> np.ndarray:
            return self.array

    class TritonError(Exception):
        pass

    class InferenceResponse:
        def __init__(self, output_tensors: list[Tensor], error: Any = None) -> None:
            self.output_tensors, self.error = output_tensors, error

    pb.Tensor, pb.TritonError, pb.InferenceResponse = Tensor, TritonError, InferenceResponse  # type: ignore[attr-defined]
    pb.get_input_tensor_by_name = lambda request, name: request[name]  # type: ignore[attr-defined]
    return pb


def test_preprocessing_execute_fails_only_the_bad_requests(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A request with two images lost the second silently, and a non-UTF-8 indication raised out of execute,
    which fails every request of the call."""
    pb = _fake_pb_utils()
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    bundle = make_fake_bundle(tmp_path)
    repo = write_triton_repo(bundle, tmp_path / "repo", vision_backend="onnxruntime",
                             decoder_engine=_decoder_engine(tmp_path))
    model = PreprocessingModel()
    model.initialize({"model_config": json.dumps(
        {"parameters": {k: {"string_value": v} for k, v in {"vocab_size": "512", "num_image_tokens": "16",
                                                           "pixel_dtype": "float16"}.items()}}),
        "model_repository": str(repo / "preprocessing"), "model_version": "1"})
    png = io.BytesIO()
    Image.fromarray((np.arange(80 * 60) % 251).astype(np.uint8).reshape(80, 60)).save(png, format="PNG")

    def request(images: list[bytes], indication: bytes = b"Cough", max_new: int = 32) -> dict[str, Any]:
        return {"IMAGE": pb.Tensor("IMAGE", np.array([[i] for i in images], dtype=object)),
                "INDICATION": pb.Tensor("INDICATION", np.array([[indication]], dtype=object)),
                "MAX_NEW_TOKENS": pb.Tensor("MAX_NEW_TOKENS", np.array([[max_new]], dtype=np.int32))}

    good = request([png.getvalue()])
    responses = model.execute([good, request([png.getvalue()] * 2), request([png.getvalue()], b"Dyspn\xe9e"),
                               request([png.getvalue()], b"x " * 3000, 10**6), good, request([b"not an image"]),
                               request([png.getvalue()], b"", 10**6)])
    errors = [str(r.error) if r.error is not None else None for r in responses]
    assert errors[0] is None and errors[4] is None
    assert errors[5].startswith("IMAGE: not a DICOM file")  # not the server's temporary path
    assert "IMAGE holds 2 values: send one request per study" in errors[1]
    assert errors[2] == "INDICATION is not UTF-8 text"
    assert "exceed the model's 512 positions; the prompt alone fills them: shorten INDICATION" in errors[3]
    assert errors[6].endswith(" positions; MAX_NEW_TOKENS 336 at most for this prompt"), errors[6]  # no INDICATION
    outputs = {t.name: t.array for t in responses[0].output_tensors}
    assert outputs["PIXEL_VALUES"].shape == (1, 3, 56, 56) and outputs["REQUEST_OUTPUT_LEN"].tolist() == [[32]]


def test_postprocessing_execute_answers_the_ensembles_outputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README says the ensemble answers REPORT, TOKEN_IDS and WARNINGS: postprocessing's execute, which makes
    the first two from TensorRT-LLM's output_ids/sequence_length ([batch 1, beam, ...] per request), never ran in a
    test, and nothing checked the ensemble's output names."""
    from radtrt.exporter.pbtxt import as_list

    pb = _fake_pb_utils()
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    bundle = make_fake_bundle(tmp_path)
    repo = write_triton_repo(bundle, tmp_path / "repo", vision_backend="onnxruntime",
                             decoder_engine=_decoder_engine(tmp_path))
    configs = check_repo(repo)
    assert {io["name"] for io in as_list(configs["radtrt"]["output"])} == {"REPORT", "TOKEN_IDS", "WARNINGS"}
    post = PostprocessingModel()
    post.initialize({"model_config": json.dumps({"parameters": {"eos_token_id": {"string_value": "2"}}}),
                     "model_repository": str(repo / "postprocessing"), "model_version": "1"})

    def request(ids: list[int], length: int) -> dict[str, Any]:
        return {"TOKENS_BATCH": pb.Tensor("TOKENS_BATCH", np.array([[ids]], dtype=np.int32)),
                "SEQUENCE_LENGTH": pb.Tensor("SEQUENCE_LENGTH", np.array([[length]], dtype=np.int32))}

    responses = post.execute([request([300, 301, 2, 2], 4), request([302, 303, 304, 0], 3)])
    outputs = [{t.name: t.array for t in r.output_tensors} for r in responses]
    assert outputs[0]["TOKEN_IDS"].tolist() == [[300, 301]] and outputs[1]["TOKEN_IDS"].tolist() == [[302, 303, 304]]
    assert outputs[0]["TOKEN_IDS"].dtype == np.int32
    assert outputs[0]["REPORT"].tolist() == [[post.tokenizer.decode([300, 301]).strip().encode()]]
    assert outputs[1]["REPORT"].tolist() == [[post.tokenizer.decode([302, 303, 304]).strip().encode()]]
