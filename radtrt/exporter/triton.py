"""A Triton Inference Server model repository, so many requests and boxes are served by Triton itself.

``write_triton_repo(bundle, REPO)`` writes an ensemble ``radtrt`` chaining four models:

    IMAGE (PNG/JPEG/DICOM bytes), INDICATION, MAX_NEW_TOKENS
      -> preprocessing (Python backend: radtrt's DICOM/PNG ingest, open_clip transform, v1 prompt with
                        fake image ids vocab_size .. vocab_size + N - 1)
      -> vision        (TensorRT ``model.plan`` or ONNX Runtime ``model.onnx``: pixels -> [N, H])
      -> tensorrt_llm  (TensorRT-LLM backend; the image rows arrive as ``prompt_embedding_table``)
      -> postprocessing (Python backend: ids -> report text)
    -> REPORT, TOKEN_IDS

The Python models are two-line ``model.py`` shims importing the classes below, so radtrt must be
installed in the Python backend's environment; the tokenizer and model config are copied next to
them. The TensorRT-LLM engine is referenced by absolute path (``gpt_model_path``), not copied.
Configs are built as dicts, written as protobuf text (``to_pbtxt``), and ``check_repo`` parses them
back and verifies the ensemble's wiring (names, dtypes, producers).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from radtrt.errors import RadtrtError, fail
from radtrt.exporter.gpu import GpuInfo, require_gpu
from radtrt.exporter.tensorrt import find_vision_engine, inspect_onnx, read_vision_manifest
from radtrt.exporter.trtllm import find_decoder_engine
from radtrt.outputs import check_new_dir, new_dir_built_aside

TRITON_DTYPES = {"float16": "TYPE_FP16", "float32": "TYPE_FP32", "bfloat16": "TYPE_BF16"}
NP_DTYPES = {"float16": np.float16, "float32": np.float32}
SIDE_FILES = ("tokenizer.model", "tokenizer_config.json", "model_config.json")


class Ident(str):
    """A bare protobuf-text identifier (an enum value such as TYPE_FP16), written without quotes."""


# --- protobuf text format: writer and a parser for what it writes (and Triton's own configs) --------

def _scalar(v: Any) -> str:
    if isinstance(v, Ident):
        return str(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))


def to_pbtxt(msg: dict[str, Any], indent: int = 0) -> str:
    pad = "  " * indent
    lines = []
    for key, value in msg.items():
        if isinstance(value, dict):
            lines.append(f"{pad}{key} {{\n{to_pbtxt(value, indent + 1)}{pad}}}")
        elif isinstance(value, list) and all(isinstance(v, dict) for v in value) and value:
            items = ",\n".join(f"{pad}  {{\n{to_pbtxt(v, indent + 2)}{pad}  }}" for v in value)
            lines.append(f"{pad}{key} [\n{items}\n{pad}]")
        elif isinstance(value, list):  # scalar lists need the colon in protobuf text
            lines.append(f"{pad}{key}: [ {', '.join(_scalar(v) for v in value)} ]")
        else:
            lines.append(f"{pad}{key}: {_scalar(value)}")
    return "".join(line + "\n" for line in lines)


_TOKEN = re.compile(r'\s*(?:#[^\n]*\n?|("(?:[^"\\]|\\.)*")|([\[\]{}:,])|([A-Za-z_][A-Za-z0-9_.]*)|'
                    r'(-?[0-9][0-9.eE+-]*))')


def _tokens(text: str) -> list[tuple[str, Any]]:
    out, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            if text[pos:].strip():
                fail(f"cannot parse protobuf text near: {text[pos:pos + 30]!r}")
            break
        pos = m.end()
        if m.group(1):
            out.append(("value", json.loads(m.group(1))))
        elif m.group(2):
            out.append(("punct", m.group(2)))
        elif m.group(3):
            word = m.group(3)
            out.append(("value", {"true": True, "false": False}.get(word, Ident(word))))
        elif m.group(4):
            num = m.group(4)
            out.append(("value", float(num) if any(c in num for c in ".eE") else int(num)))
    return out


def parse_pbtxt(text: str) -> dict[str, Any]:
    """Protobuf text -> dicts; a field written several times or with ``[...]`` becomes a list."""
    tokens = _tokens(text)
    pos = 0

    def value() -> Any:
        nonlocal pos
        kind, tok = tokens[pos]
        pos += 1
        if (kind, tok) == ("punct", "{"):
            return message("}")
        if kind != "value":
            fail(f"unexpected {tok!r} in protobuf text")
        return tok

    def message(end: str | None) -> dict[str, Any]:
        nonlocal pos
        msg: dict[str, Any] = {}
        repeated: set[str] = set()
        while pos < len(tokens) and tokens[pos] != ("punct", end):
            name = str(tokens[pos][1])
            pos += 1
            if tokens[pos] == ("punct", ":"):
                pos += 1
            if tokens[pos] == ("punct", "["):
                pos += 1
                items = []
                while tokens[pos] != ("punct", "]"):
                    items.append(value())
                    if tokens[pos] == ("punct", ","):
                        pos += 1
                pos += 1
                msg[name] = (msg[name] + items) if name in repeated else items
                repeated.add(name)
                continue
            item = value()
            if name in msg:
                if name not in repeated:
                    msg[name] = [msg[name]]
                    repeated.add(name)
                msg[name].append(item)
            else:
                msg[name] = item
        pos += 1
        return msg

    return message(None)


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [] if value is None else [value]


# --- configs --------------------------------------------------------------------------------------

def _io(name: str, dtype: str, dims: list[int], **extra: Any) -> dict[str, Any]:
    return {"name": name, "data_type": Ident(dtype), "dims": dims, **extra}


def _params(values: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"key": k, "value": {"string_value": str(v)}} for k, v in values.items()]


def _python_model(name: str, max_batch: int, inputs: list[dict], outputs: list[dict],
                  params: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "backend": "python", "max_batch_size": max_batch, "input": inputs, "output": outputs,
            "instance_group": [{"count": 1, "kind": Ident("KIND_CPU")}], "parameters": _params(params)}


@dataclass(frozen=True)
class RepoSpec:
    """What the configs depend on, read from the bundle."""

    image_size: int
    num_image_tokens: int
    hidden_size: int
    vocab_size: int
    eos_token_id: int
    pixel_dtype: str
    embeds_dtype: str
    vision_input: str
    vision_output: str
    max_batch: int


def model_configs(spec: RepoSpec, vision_platform: str, engine_dir: Path,
                  kv_cache_free_gpu_mem_fraction: float = 0.85, max_queue_delay_us: int = 1000) -> dict[str, dict]:
    """Every model's config (pure). ``vision_platform``: ``tensorrt_plan`` or ``onnxruntime_onnx``.

    The ``tensorrt_llm`` model follows tensorrtllm_backend's ``inflight_batcher_llm/tensorrt_llm/config.pbtxt``
    (scalar inputs declared ``dims: [1]`` with ``reshape: { shape: [] }``). KV-cache block reuse is switched
    off explicitly: every request carries the same fake image ids ``vocab_size ..``, so reused blocks would
    hold another image's keys/values, and the backend turns reuse on when the parameter is absent (from
    v0.19.0; off before).
    """
    b, n, s = spec.max_batch, spec.num_image_tokens, spec.image_size
    i32 = "TYPE_INT32"
    pre = _python_model(
        "preprocessing", b,
        [_io("IMAGE", "TYPE_STRING", [1]), _io("INDICATION", "TYPE_STRING", [1]), _io("MAX_NEW_TOKENS", i32, [1])],
        [_io("PIXEL_VALUES", TRITON_DTYPES[spec.pixel_dtype], [3, s, s]), _io("INPUT_IDS", i32, [-1]),
         _io("INPUT_LENGTH", i32, [1]), _io("REQUEST_OUTPUT_LEN", i32, [1]), _io("PROMPT_VOCAB_SIZE", i32, [1]),
         _io("END_ID", i32, [1]), _io("PAD_ID", i32, [1])],
        {"vocab_size": spec.vocab_size, "num_image_tokens": n, "pixel_dtype": spec.pixel_dtype})
    vision = {"name": "vision", "platform": vision_platform, "max_batch_size": b,
              "input": [_io(spec.vision_input, TRITON_DTYPES[spec.pixel_dtype], [3, s, s])],
              "output": [_io(spec.vision_output, TRITON_DTYPES[spec.embeds_dtype], [n, spec.hidden_size])],
              "instance_group": [{"count": 1, "kind": Ident("KIND_GPU")}],
              "dynamic_batching": {"max_queue_delay_microseconds": max_queue_delay_us}}
    llm = {"name": "tensorrt_llm", "backend": "tensorrtllm", "max_batch_size": b,
           "model_transaction_policy": {"decoupled": False},
           "dynamic_batching": {"preferred_batch_size": [b], "max_queue_delay_microseconds": max_queue_delay_us},
           "input": [_io("input_ids", i32, [-1], allow_ragged_batch=True),
                     _io("input_lengths", i32, [1], reshape={"shape": []}),
                     _io("request_output_len", i32, [1], reshape={"shape": []}),
                     _io("end_id", i32, [1], reshape={"shape": []}, optional=True),
                     _io("pad_id", i32, [1], reshape={"shape": []}, optional=True),
                     _io("prompt_embedding_table", TRITON_DTYPES[spec.embeds_dtype], [-1, -1], optional=True,
                         allow_ragged_batch=True),
                     _io("prompt_vocab_size", i32, [1], reshape={"shape": []}, optional=True)],
           "output": [_io("output_ids", i32, [-1, -1]), _io("sequence_length", i32, [-1])],
           "instance_group": [{"count": 1, "kind": Ident("KIND_CPU")}],
           "parameters": _params({"gpt_model_type": "inflight_fused_batching", "gpt_model_path": engine_dir,
                                  "max_beam_width": 1, "batch_scheduler_policy": "guaranteed_no_evict",
                                  "kv_cache_free_gpu_mem_fraction": kv_cache_free_gpu_mem_fraction,
                                  "exclude_input_in_output": "true", "enable_chunked_context": "false",
                                  "enable_kv_cache_reuse": "false"})}
    post = _python_model("postprocessing", b,
                         [_io("TOKENS_BATCH", i32, [-1, -1]), _io("SEQUENCE_LENGTH", i32, [-1])],
                         [_io("REPORT", "TYPE_STRING", [1]), _io("TOKEN_IDS", i32, [-1])],
                         {"eos_token_id": spec.eos_token_id})

    def step(model: str, inputs: dict[str, str], outputs: dict[str, str]) -> dict[str, Any]:
        return {"model_name": model, "model_version": -1,
                "input_map": [{"key": k, "value": v} for k, v in inputs.items()],
                "output_map": [{"key": k, "value": v} for k, v in outputs.items()]}

    ensemble = {"name": "radtrt", "platform": "ensemble", "max_batch_size": b,
                "input": pre["input"], "output": post["output"],
                "ensemble_scheduling": {"step": [
                    step("preprocessing", {"IMAGE": "IMAGE", "INDICATION": "INDICATION",
                                           "MAX_NEW_TOKENS": "MAX_NEW_TOKENS"},
                         {k: f"_{k.lower()}" for k in ("PIXEL_VALUES", "INPUT_IDS", "INPUT_LENGTH",
                                                       "REQUEST_OUTPUT_LEN", "PROMPT_VOCAB_SIZE", "END_ID", "PAD_ID")}),
                    step("vision", {spec.vision_input: "_pixel_values"}, {spec.vision_output: "_image_embeds"}),
                    step("tensorrt_llm", {"input_ids": "_input_ids", "input_lengths": "_input_length",
                                          "request_output_len": "_request_output_len", "end_id": "_end_id",
                                          "pad_id": "_pad_id", "prompt_embedding_table": "_image_embeds",
                                          "prompt_vocab_size": "_prompt_vocab_size"},
                         {"output_ids": "_output_ids", "sequence_length": "_sequence_length"}),
                    step("postprocessing", {"TOKENS_BATCH": "_output_ids", "SEQUENCE_LENGTH": "_sequence_length"},
                         {"REPORT": "REPORT", "TOKEN_IDS": "TOKEN_IDS"})]}}
    return {"preprocessing": pre, "vision": vision, "tensorrt_llm": llm, "postprocessing": post, "radtrt": ensemble}


def check_repo(repo: Path) -> dict[str, dict[str, Any]]:
    """Parse every ``config.pbtxt`` back and check the ensemble: each step's model and tensor names
    exist, every consumed tensor is an ensemble input or an earlier step's output of the same dtype,
    and every ensemble output is produced. Returns the parsed configs."""
    configs = {p.parent.name: parse_pbtxt(p.read_text()) for p in sorted(repo.glob("*/config.pbtxt"))}
    for name, cfg in configs.items():
        if cfg.get("name") != name:
            fail(f"{repo / name / 'config.pbtxt'} names the model {cfg.get('name')!r}")
    ens = configs.get("radtrt") or fail(f"{repo} has no 'radtrt' ensemble")
    dtypes = {io["name"]: io["data_type"] for io in as_list(ens.get("input"))}
    for step in as_list(ens["ensemble_scheduling"]["step"]):
        model = configs.get(step["model_name"]) or fail(f"ensemble step uses unknown model {step['model_name']!r}")
        ins = {io["name"]: io["data_type"] for io in as_list(model.get("input"))}
        outs = {io["name"]: io["data_type"] for io in as_list(model.get("output"))}
        for m in as_list(step.get("input_map")):
            if m["key"] not in ins:
                fail(f"model {step['model_name']} has no input {m['key']!r}")
            if m["value"] not in dtypes:
                fail(f"ensemble tensor {m['value']!r} is consumed before anything produces it")
            if dtypes[m["value"]] != ins[m["key"]]:
                fail(f"{step['model_name']}.{m['key']} wants {ins[m['key']]} but receives {dtypes[m['value']]}")
        for m in as_list(step.get("output_map")):
            if m["key"] not in outs:
                fail(f"model {step['model_name']} has no output {m['key']!r}")
            dtypes[m["value"]] = outs[m["key"]]
    for io in as_list(ens.get("output")):
        if dtypes.get(io["name"]) != io["data_type"]:
            fail(f"ensemble output {io['name']!r} is not produced with {io['data_type']}")
    return configs


def _onnx_files(onnx_path: Path) -> list[Path]:
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    locations = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    return [onnx_path.parent / loc for loc in sorted(locations)]


def write_triton_repo(bundle: Path, out: Path, *, gpu: GpuInfo | None = None, vision_backend: str = "tensorrt",
                      decoder_tag: str = "fp16", decoder_engine: Path | None = None, max_batch: int = 8,
                      kv_cache_free_gpu_mem_fraction: float = 0.85) -> Path:
    """Write the repository; engines come from the bundle (built for ``gpu``) unless given explicitly."""
    manifest = read_vision_manifest(bundle, extra=SIDE_FILES)
    check_new_dir(out, "Triton repository")
    if vision_backend not in ("tensorrt", "onnxruntime"):
        fail(f"unknown vision backend '{vision_backend}' for Triton (tensorrt, onnxruntime)")
    onnx = inspect_onnx(bundle / "vision.onnx")
    if decoder_engine is None:
        decoder_engine, _ = find_decoder_engine(bundle, require_gpu(gpu), decoder_tag)
    engine_cfg = decoder_engine / "config.json"
    table_dtype = (json.loads(engine_cfg.read_text())["pretrained_config"]["dtype"] if engine_cfg.is_file()
                   else "float16")
    if onnx.output_dtype != table_dtype:
        fail(f"the vision graph outputs {onnx.output_dtype} but the decoder's prompt table is {table_dtype}; "
             f"export the bundle so that image_embeds is {table_dtype}")
    dec = manifest["decoder"]
    spec = RepoSpec(onnx.image_size, manifest["vision"]["num_image_tokens"], dec["hidden_size"], dec["vocab_size"],
                    dec["eos_token_id"], onnx.input_dtype, onnx.output_dtype, onnx.input_name, onnx.output_name,
                    max_batch)
    platform = "tensorrt_plan" if vision_backend == "tensorrt" else "onnxruntime_onnx"
    configs = model_configs(spec, platform, decoder_engine.resolve(), kv_cache_free_gpu_mem_fraction)
    with new_dir_built_aside(out, "Triton repository") as work:
        _fill_repo(work, bundle, manifest, configs, vision_backend, gpu, max_batch)
    return out


def _fill_repo(out: Path, bundle: Path, manifest: dict[str, Any], configs: dict[str, dict[str, Any]],
               vision_backend: str, gpu: GpuInfo | None, max_batch: int) -> None:
    for name, cfg in configs.items():
        (out / name / "1").mkdir(parents=True, exist_ok=True)
        (out / name / "config.pbtxt").write_text(to_pbtxt(cfg))
    if vision_backend == "tensorrt":
        engine, stamp = find_vision_engine(bundle, require_gpu(gpu), manifest=manifest)
        if stamp["profile"]["max"][0] < max_batch:
            fail(f"the vision engine allows batch {stamp['profile']['max'][0]}, below Triton's max batch {max_batch}")
        shutil.copyfile(engine, out / "vision" / "1" / "model.plan")
    else:
        shutil.copyfile(bundle / "vision.onnx", out / "vision" / "1" / "model.onnx")
        for data in _onnx_files(bundle / "vision.onnx"):
            shutil.copyfile(data, out / "vision" / "1" / data.name)
    for name, cls in (("preprocessing", "PreprocessingModel"), ("postprocessing", "PostprocessingModel")):
        folder = out / name / "1"
        (folder / "model.py").write_text("# Triton Python backend entry point (needs radtrt installed)\n"
                                         f"from radtrt.exporter.triton import {cls} as TritonPythonModel"
                                         "  # noqa: F401\n")
        for f in SIDE_FILES:
            shutil.copyfile(bundle / f, folder / f)
    check_repo(out)


# --- the Python-backend models (their pure parts are tested without Triton) ------------------------

@dataclass
class RequestPreparer:
    """Image bytes + indication -> the tensors the vision and TensorRT-LLM models take (one request)."""

    tokenizer: Any
    cfg: Any  # LlavaRadConfig
    vocab_size: int
    num_image_tokens: int
    pixel_dtype: str

    @classmethod
    def from_dir(cls, folder: Path, params: dict[str, str]) -> "RequestPreparer":
        from radtrt.model.config import LlavaRadConfig
        from radtrt.model.io import read_json
        from radtrt.model.tokenizer import LlamaSPTokenizer

        return cls(LlamaSPTokenizer.from_dir(folder), LlavaRadConfig.from_dict(read_json(folder / "model_config.json")),
                   int(params["vocab_size"]), int(params["num_image_tokens"]), params["pixel_dtype"])

    def __call__(self, image: bytes, indication: str, max_new_tokens: int) -> dict[str, np.ndarray]:
        from radtrt.imaging.preprocess import preprocess
        from radtrt.imaging.study import load_study
        from radtrt.model.prompt import build_prompt, build_query, tokenizer_image_token
        from radtrt.runtime.tensorrt import fake_prompt_ids

        if max_new_tokens < 1:
            fail("MAX_NEW_TOKENS must be at least 1")
        with tempfile.TemporaryDirectory() as tmp:  # the study reader sniffs content, not names
            path = Path(tmp) / "image"
            path.write_bytes(image)
            selected = load_study(path)
        pixels = preprocess(selected.pixels_u8, image_size=self.cfg.vision.img_size, mean=self.cfg.image_mean,
                            std=self.cfg.image_std)
        prompt = build_prompt(build_query(indication or None), self.cfg.conv_template)
        ids = tokenizer_image_token(prompt, self.tokenizer.encode, self.tokenizer.bos_token_id)
        ids = fake_prompt_ids(ids, self.num_image_tokens, self.vocab_size)
        eos = self.tokenizer.eos_token_id
        col = lambda v: np.array([[v]], dtype=np.int32)  # noqa: E731 - [batch 1, 1]
        return {"PIXEL_VALUES": pixels.numpy().astype(NP_DTYPES[self.pixel_dtype])[None],
                "INPUT_IDS": np.array([ids], dtype=np.int32), "INPUT_LENGTH": col(len(ids)),
                "REQUEST_OUTPUT_LEN": col(max_new_tokens), "PROMPT_VOCAB_SIZE": col(self.num_image_tokens),
                "END_ID": col(eos), "PAD_ID": col(eos)}


def decode_output(tokenizer: Any, output_ids: np.ndarray, sequence_length: np.ndarray,
                  eos_token_id: int) -> tuple[str, list[int]]:
    """One request's ``[beams, L]`` generated ids (prompt excluded) -> (report, ids without EOS)."""
    from radtrt.runtime.pipeline import postprocess

    ids = [int(x) for x in output_ids[0][: int(sequence_length[0])]]
    ids = ids[:ids.index(eos_token_id)] if eos_token_id in ids else ids
    return postprocess(tokenizer.decode(ids)), ids


def _model_args(args: dict[str, Any]) -> tuple[Path, dict[str, str]]:
    cfg = json.loads(args["model_config"])
    params = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
    return Path(args["model_repository"]) / str(args["model_version"]), params


class PreprocessingModel:
    """Triton Python-backend model (``TritonPythonModel`` interface); a bad image fails its request only."""

    def initialize(self, args: dict[str, Any]) -> None:
        folder, params = _model_args(args)
        self.prepare = RequestPreparer.from_dir(folder, params)

    def execute(self, requests: list[Any]) -> list[Any]:
        import triton_python_backend_utils as pb_utils

        def first(request: Any, name: str) -> Any:
            return pb_utils.get_input_tensor_by_name(request, name).as_numpy().reshape(-1)[0]

        responses = []
        for request in requests:
            indication = first(request, "INDICATION")
            try:
                arrays = self.prepare(bytes(first(request, "IMAGE")), indication.decode()
                                      if isinstance(indication, bytes) else str(indication),
                                      int(first(request, "MAX_NEW_TOKENS")))
            except RadtrtError as e:
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(e))))
                continue
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(k, v) for k, v in arrays.items()]))
        return responses


class PostprocessingModel:
    """Triton Python-backend model: generated ids -> report text."""

    def initialize(self, args: dict[str, Any]) -> None:
        from radtrt.model.tokenizer import LlamaSPTokenizer

        folder, params = _model_args(args)
        self.tokenizer = LlamaSPTokenizer.from_dir(folder)
        self.eos = int(params["eos_token_id"])

    def execute(self, requests: list[Any]) -> list[Any]:
        import triton_python_backend_utils as pb_utils

        responses = []
        for request in requests:
            ids = pb_utils.get_input_tensor_by_name(request, "TOKENS_BATCH").as_numpy()[0]
            lengths = pb_utils.get_input_tensor_by_name(request, "SEQUENCE_LENGTH").as_numpy()[0]
            report, kept = decode_output(self.tokenizer, ids, lengths, self.eos)
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("REPORT", np.array([[report.encode()]], dtype=object)),
                pb_utils.Tensor("TOKEN_IDS", np.array([kept], dtype=np.int32))]))
        return responses
