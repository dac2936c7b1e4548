"""A Triton Inference Server model repository, so many requests and boxes are served by Triton itself.

``write_triton_repo(bundle, REPO)`` writes an ensemble ``radtrt`` chaining four models:

    IMAGE (PNG/JPEG/DICOM bytes), INDICATION, MAX_NEW_TOKENS
      -> preprocessing (Python backend: radtrt's DICOM/PNG ingest, open_clip transform, v1 prompt with
                        fake image ids vocab_size .. vocab_size + N - 1)
      -> vision        (TensorRT ``model.plan`` or ONNX Runtime ``model.onnx``: pixels -> [N, H])
      -> tensorrt_llm  (TensorRT-LLM backend; the image rows arrive as ``prompt_embedding_table``)
      -> postprocessing (Python backend: ids -> report text)
    -> REPORT, TOKEN_IDS, WARNINGS (what 'radtrt infer' says on stderr about the image: a lateral view, a thumbnail)

The Python models are two-line ``model.py`` shims importing ``radtrt.exporter.triton_models``, so
radtrt must be installed in the Python backend's environment; the tokenizer and model config are copied
next to them. The TensorRT-LLM engine is referenced by absolute path (``gpt_model_path``), not copied.
Configs are built as dicts, written as protobuf text (``radtrt.exporter.pbtxt``), and ``check_repo``
parses them back and verifies the ensemble's wiring (names, dtypes, producers).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from radtrt import __version__
from radtrt.errors import fail
from radtrt.exporter.bundle import read_bundle_side
from radtrt.exporter.gpu import GpuInfo, require_gpu, stamp_gpu
from radtrt.exporter.pbtxt import Ident, as_list, parse_pbtxt, to_pbtxt
from radtrt.exporter.tensorrt import find_vision_engine, inspect_onnx, read_vision_manifest
from radtrt.exporter.trtllm_build import (check_decoder_engine, engine_count, find_decoder_engine, kv_cache_tokens,
                                          read_engine_config)
from radtrt.model.prompt import shortest_prompt_length
from radtrt.outputs import check_new_dir, new_dir_built_aside, resolved, write_text

TRITON_DTYPES = {"float16": "TYPE_FP16", "float32": "TYPE_FP32", "bfloat16": "TYPE_BF16"}
CASTABLE = {"float16": 10, "bfloat16": 16}  # prompt-table dtypes -> onnx.TensorProto element types
SIDE_FILES = ("tokenizer.model", "tokenizer_config.json", "model_config.json")


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
                  kv_cache_free_gpu_mem_fraction: float = 0.85, max_queue_delay_us: int = 1000,
                  engine_limits: dict[str, int] | None = None) -> dict[str, dict]:
    """Every model's config (pure). ``vision_platform``: ``tensorrt_plan`` or ``onnxruntime_onnx``.
    ``engine_limits``: the TensorRT-LLM engine's ``max_input_len`` and ``max_seq_len``, where they are known here.
    Preprocessing refuses a request over them, as ``radtrt infer`` does (the backend cut such a request's
    MAX_NEW_TOKENS to fit with only a warning in the server's log, and the client got a shorter report and no
    error), and the backend's KV cache takes no more than they can use (``kv_cache_tokens``), not the whole
    free-memory fraction (a Jetson's RAM).

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
         _io("END_ID", i32, [1]), _io("PAD_ID", i32, [1]), _io("WARNINGS", "TYPE_STRING", [1])],
        {"vocab_size": spec.vocab_size, "num_image_tokens": n, "pixel_dtype": spec.pixel_dtype,
         **(engine_limits or {})})
    max_kv_tokens = kv_cache_tokens(b, engine_limits["max_seq_len"]) if engine_limits else None
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
                                  "enable_kv_cache_reuse": "false",
                                  **({} if max_kv_tokens is None else {"max_tokens_in_paged_kv_cache": max_kv_tokens})})}
    post = _python_model("postprocessing", b,
                         [_io("TOKENS_BATCH", i32, [-1, -1]), _io("SEQUENCE_LENGTH", i32, [-1])],
                         [_io("REPORT", "TYPE_STRING", [1]), _io("TOKEN_IDS", i32, [-1])],
                         {"eos_token_id": spec.eos_token_id})

    def step(model: str, inputs: dict[str, str], outputs: dict[str, str]) -> dict[str, Any]:
        return {"model_name": model, "model_version": -1,
                "input_map": [{"key": k, "value": v} for k, v in inputs.items()],
                "output_map": [{"key": k, "value": v} for k, v in outputs.items()]}

    # WARNINGS: what 'radtrt infer' prints on stderr about a study (a lateral view, a thumbnail), for the client
    ensemble = {"name": "radtrt", "platform": "ensemble", "max_batch_size": b,
                "input": pre["input"], "output": [*post["output"], _io("WARNINGS", "TYPE_STRING", [1])],
                "ensemble_scheduling": {"step": [
                    step("preprocessing", {"IMAGE": "IMAGE", "INDICATION": "INDICATION",
                                           "MAX_NEW_TOKENS": "MAX_NEW_TOKENS"},
                         {**{k: f"_{k.lower()}" for k in ("PIXEL_VALUES", "INPUT_IDS", "INPUT_LENGTH",
                                                          "REQUEST_OUTPUT_LEN", "PROMPT_VOCAB_SIZE", "END_ID", "PAD_ID")},
                          "WARNINGS": "WARNINGS"}),
                    step("vision", {spec.vision_input: "_pixel_values"}, {spec.vision_output: "_image_embeds"}),
                    step("tensorrt_llm", {"input_ids": "_input_ids", "input_lengths": "_input_length",
                                          "request_output_len": "_request_output_len", "end_id": "_end_id",
                                          "pad_id": "_pad_id", "prompt_embedding_table": "_image_embeds",
                                          "prompt_vocab_size": "_prompt_vocab_size"},
                         {"output_ids": "_output_ids", "sequence_length": "_sequence_length"}),
                    step("postprocessing", {"TOKENS_BATCH": "_output_ids", "SEQUENCE_LENGTH": "_sequence_length"},
                         {"REPORT": "REPORT", "TOKEN_IDS": "TOKEN_IDS"})]}}
    return {"preprocessing": pre, "vision": vision, "tensorrt_llm": llm, "postprocessing": post, "radtrt": ensemble}


def _dims_match(produced: list[int], consumed: list[int]) -> bool:
    """Whether a tensor of ``produced`` dims fits an input declared ``consumed`` (-1 takes any size)."""
    return len(produced) == len(consumed) and all(-1 in (a, b) or a == b for a, b in zip(produced, consumed))


def check_repo(repo: Path) -> dict[str, dict[str, Any]]:
    """Parse every ``config.pbtxt`` back and check the ensemble as Triton does when it loads it: each step's model
    and tensor names exist, every required input of a step is fed, every consumed tensor is an ensemble input or
    an earlier step's output of the same dtype and dims, and every ensemble output is produced. Returns the
    parsed configs."""
    configs = {p.parent.name: parse_pbtxt(p.read_text(encoding="utf-8")) for p in sorted(repo.glob("*/config.pbtxt"))}
    for name, cfg in configs.items():
        if cfg.get("name") != name:
            fail(f"{repo / name / 'config.pbtxt'} names the model {cfg.get('name')!r}")
    ens = configs.get("radtrt") or fail(f"{repo} has no 'radtrt' ensemble")

    def typed(ios: Any) -> dict[str, tuple[Any, list[int]]]:
        return {io["name"]: (io["data_type"], as_list(io.get("dims"))) for io in as_list(ios)}

    tensors = typed(ens.get("input"))
    for step in as_list(ens["ensemble_scheduling"]["step"]):
        name = step["model_name"]
        model = configs.get(name) or fail(f"ensemble step uses unknown model {name!r}")
        ins, outs = typed(model.get("input")), typed(model.get("output"))
        fed = {m["key"] for m in as_list(step.get("input_map"))}
        missing = [io["name"] for io in as_list(model.get("input")) if not io.get("optional") and io["name"] not in fed]
        if missing:
            fail(f"the ensemble feeds model {name} no {', '.join(missing)} (required inputs)")
        for m in as_list(step.get("input_map")):
            if m["key"] not in ins:
                fail(f"model {name} has no input {m['key']!r}")
            if m["value"] not in tensors:
                fail(f"ensemble tensor {m['value']!r} is consumed before anything produces it")
            (got, got_dims), (want, want_dims) = tensors[m["value"]], ins[m["key"]]
            if got != want:
                fail(f"{name}.{m['key']} wants {want} but receives {got}")
            if not _dims_match(got_dims, want_dims):
                fail(f"{name}.{m['key']} wants dims {want_dims} but receives {got_dims}")
        for m in as_list(step.get("output_map")):
            if m["key"] not in outs:
                fail(f"model {name} has no output {m['key']!r}")
            tensors[m["value"]] = outs[m["key"]]
    for io in as_list(ens.get("output")):
        produced = tensors.get(io["name"])
        if produced is None or produced[0] != io["data_type"] or not _dims_match(produced[1], as_list(io.get("dims"))):
            fail(f"ensemble output {io['name']!r} is not produced with {io['data_type']} {as_list(io.get('dims'))}")
    return configs


def _onnx_files(onnx_path: Path) -> list[Path]:
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    locations = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    return [onnx_path.parent / loc for loc in sorted(locations)]


def check_engine_fits(engine: Path, config: dict[str, Any], spec: RepoSpec, prompt_length: int) -> None:
    """A ``--trtllm-engine`` readable here must take what the repository sends it: with another vocabulary the
    image's fake ids ``vocab_size ..`` become ordinary tokens (reports without the image), and a smaller prompt
    table, batch or input length fails every request at serving time. Keys an engine's version does not
    write are not checked (radtrt's own engines are checked against their stamps instead)."""
    pretrained, build = config["pretrained_config"], config.get("build_config") or {}
    for key, want in (("vocab_size", spec.vocab_size), ("hidden_size", spec.hidden_size)):
        if key in pretrained and pretrained[key] != want:
            fail(f"{engine} is a TensorRT-LLM engine of another model ({key} {pretrained[key]}, the bundle's {want})")
    need = (("max_prompt_embedding_table_size", spec.num_image_tokens * spec.max_batch,
             f"the image rows of a full batch ({spec.max_batch} x {spec.num_image_tokens})", "--max-batch"),
            ("max_batch_size", spec.max_batch, f"Triton's max batch {spec.max_batch}", "--max-batch"),
            ("max_input_len", prompt_length, f"the {prompt_length}-token prompt without an indication", None))
    for key, want, what, option in need:
        got = engine_count(build.get(key))
        if got is not None and got < want:
            fits = got // (want // spec.max_batch) if option else 0  # the batch the engine does take
            fix = f"pass {option} {fits}, or rebuild the engine" if fits >= 1 else "rebuild the engine"
            fail(f"{engine} was built with {key} {got}, below {what}: {fix}")


def write_triton_repo(bundle: Path, out: Path, *, gpu: GpuInfo | None = None, vision_backend: str = "tensorrt",
                      decoder_tag: str = "fp16", decoder_engine: Path | None = None, max_batch: int = 8,
                      kv_cache_free_gpu_mem_fraction: float = 0.85) -> Path:
    """Write the repository; engines come from the bundle (built for ``gpu``) unless given explicitly."""
    manifest = read_vision_manifest(bundle, extra=SIDE_FILES)
    check_new_dir(out, "Triton repository")
    if vision_backend not in ("tensorrt", "onnxruntime"):
        fail(f"unknown vision backend '{vision_backend}' for Triton (tensorrt, onnxruntime)")
    onnx = inspect_onnx(bundle / "vision.onnx")
    # the tokenizer and config the served models load, read here so that damage is said now, not at the server's
    # start; the end token is the tokenizer's, as in every radtrt backend (the manifest's copy is not hashed)
    bundle_cfg, tokenizer = read_bundle_side(bundle)
    given = decoder_engine is not None
    limits: dict[str, Any] = {}  # the engine's max_input_len / max_seq_len, where known here
    stamp = None
    if decoder_engine is None:
        decoder_engine, stamp = find_decoder_engine(bundle, require_gpu(gpu), decoder_tag)
        check_decoder_engine(decoder_engine, stamp, manifest, bundle)
        decoder_engine = resolved(decoder_engine)
        limits = stamp["limits"]
        engine_batch = int(stamp["limits"].get("max_batch", max_batch))
        if engine_batch < max_batch:  # as the vision engine's profile is checked: the server would accept more
            fail(f"the TensorRT-LLM {decoder_tag} engine allows batch {engine_batch}, below Triton's max batch "
                 f"{max_batch}: pass --max-batch {engine_batch}, or rebuild the engine with --max-batch {max_batch}")
    engine_config = read_engine_config(decoder_engine)
    table_dtype = engine_config["pretrained_config"]["dtype"] if engine_config else "float16"  # radtrt's engines'
    cast_to = None  # the served ONNX graph ends in a Cast to the prompt table's dtype
    if onnx.output_dtype != table_dtype:
        if vision_backend != "onnxruntime" or table_dtype not in CASTABLE:
            fail(f"the vision {'engine' if vision_backend == 'tensorrt' else 'graph'} outputs {onnx.output_dtype} "
                 f"but the decoder's prompt table is {table_dtype}; serve a bundle whose image_embeds are "
                 f"{table_dtype} ('radtrt export --precision fp16' for float16), or its ONNX graph through ONNX "
                 f"Runtime, which radtrt ends with a cast (an export host without a GPU writes that)")
        cast_to = table_dtype
    dec = manifest["decoder"]
    spec = RepoSpec(onnx.image_size, manifest["vision"]["num_image_tokens"], dec["hidden_size"], dec["vocab_size"],
                    tokenizer.eos_token_id, onnx.input_dtype, cast_to or onnx.output_dtype, onnx.input_name,
                    onnx.output_name, max_batch)
    if given and engine_config is not None:
        prompt = shortest_prompt_length(tokenizer.encode, tokenizer.bos_token_id, bundle_cfg.conv_template,
                                        spec.num_image_tokens)
        check_engine_fits(decoder_engine, engine_config, spec, prompt)
        limits = engine_config.get("build_config") or {}
    platform = "tensorrt_plan" if vision_backend == "tensorrt" else "onnxruntime_onnx"
    # a given engine's path as typed: it names a folder on the serving host, which this host's symlinks
    # (/var/run -> /run, a mount alias) say nothing about
    known = {key: engine_count(limits.get(key)) for key in ("max_input_len", "max_seq_len")}
    engine_limits = known if all(v is not None and v > 0 for v in known.values()) else None
    configs = model_configs(spec, platform, decoder_engine, kv_cache_free_gpu_mem_fraction, engine_limits=engine_limits)
    with new_dir_built_aside(out, "Triton repository") as work:
        vision_stamp = _fill_repo(work, bundle, manifest, configs, vision_backend, gpu, max_batch, cast_to)
        record = serving_record(stamp, vision_stamp)
        write_text(work / SERVING_RECORD, json.dumps(record, indent=2), "Triton repository's serving record")
    return out


SERVING_RECORD = "radtrt-serving.json"  # beside the model folders: Triton loads subfolders only


def serving_record(decoder_stamp: dict[str, Any] | None, vision_stamp: dict[str, Any] | None) -> dict[str, Any]:
    """What the serving container must hold for the repository's engines to load, and a line saying so: a TensorRT
    plan and a TensorRT-LLM engine deserialize only under the TensorRT / TensorRT-LLM release that built them, and
    each tritonserver TensorRT-LLM image (tensorrtllm_backend release) ships one of each. An engine given by path
    (``--trtllm-engine``) was built elsewhere: its versions are not known here."""
    built = {part: stamp_gpu(stamp) for part, stamp in (("decoder", decoder_stamp), ("vision", vision_stamp))
             if stamp is not None}
    tensorrt = sorted({g.tensorrt for g in built.values() if g.tensorrt})
    trtllm = built["decoder"].tensorrt_llm if "decoder" in built else None
    gpus = sorted({f"{g.name} (sm{g.sm[0]}{g.sm[1]})" for g in built.values()})
    if trtllm is None:
        needs = ("serve it from the tritonserver TensorRT-LLM image of the TensorRT-LLM release that built the decoder "
                 "engine (given by path: its version is not known here)")
    else:
        needs = (f"serve it from a tritonserver image with TensorRT-LLM {trtllm}" +
                 (f" and TensorRT {' / '.join(tensorrt)}" if tensorrt else "") +
                 f" (the tensorrtllm_backend release of TensorRT-LLM {trtllm}), on {' / '.join(gpus)}: its engines "
                 f"were built with these and load with no other")
    return {"format": "radtrt-triton-serving", "format_version": 1, "tensorrt_llm": trtllm, "tensorrt": tensorrt,
            "gpus": gpus, "needs": needs, "radtrt": __version__}


def with_output_cast(onnx_path: Path, dtype: str) -> Any:
    """The vision graph (weights left in their external files) with its output cast to ``dtype``, under the
    same name: an fp32 or INT8 bundle's image embeddings (float32) then fill the float16 prompt table of a
    TensorRT-LLM engine, which takes that table in its own dtype only."""
    import onnx
    from onnx import helper

    proto = onnx.load(str(onnx_path), load_external_data=False)
    output = proto.graph.output[0]
    inner = f"{output.name}_before_cast"
    for node in proto.graph.node:
        node.output[:] = [inner if name == output.name else name for name in node.output]
        node.input[:] = [inner if name == output.name else name for name in node.input]
    proto.graph.node.append(helper.make_node("Cast", [inner], [output.name], to=CASTABLE[dtype],
                                             name="radtrt_prompt_table_cast"))
    output.type.tensor_type.elem_type = CASTABLE[dtype]
    return proto


def _fill_repo(out: Path, bundle: Path, manifest: dict[str, Any], configs: dict[str, dict[str, Any]],
               vision_backend: str, gpu: GpuInfo | None, max_batch: int,
               cast_to: str | None = None) -> dict[str, Any] | None:
    """Fill the repository; return the vision engine's stamp where it serves a TensorRT engine."""
    stamp = None
    for name, cfg in configs.items():
        (out / name / "1").mkdir(parents=True, exist_ok=True)
        (out / name / "config.pbtxt").write_text(to_pbtxt(cfg), encoding="utf-8")
    if vision_backend == "tensorrt":
        engine, stamp = find_vision_engine(bundle, require_gpu(gpu), manifest=manifest)
        if stamp["profile"]["max"][0] < max_batch:
            fail(f"the vision engine allows batch {stamp['profile']['max'][0]}, below Triton's max batch {max_batch}")
        shutil.copyfile(engine, out / "vision" / "1" / "model.plan")
    else:
        served = out / "vision" / "1" / "model.onnx"
        for data in _onnx_files(bundle / "vision.onnx"):
            shutil.copyfile(data, served.parent / data.name)
        if cast_to is None:
            shutil.copyfile(bundle / "vision.onnx", served)
        else:
            import onnx

            onnx.save(with_output_cast(bundle / "vision.onnx", cast_to), str(served))
            onnx.checker.check_model(str(served))  # by path: the weights stay in their external files
    for name, cls in (("preprocessing", "PreprocessingModel"), ("postprocessing", "PostprocessingModel")):
        folder = out / name / "1"
        (folder / "model.py").write_text("# Triton Python backend entry point (needs radtrt installed)\n"
                                         f"from radtrt.exporter.triton_models import {cls} as TritonPythonModel"
                                         "  # noqa: F401\n")
        for f in SIDE_FILES:
            shutil.copyfile(bundle / f, folder / f)
    check_repo(out)
    return stamp
