"""The tensorrt backend's pure parts: fake image ids, prompt tables, runner output parsing; CPU refusal."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from radtrt.errors import RadtrtError
from radtrt.exporter.gpu import gpu_stamp
from radtrt.model.prompt import IMAGE_TOKEN_INDEX
from radtrt.runtime.tensorrt import (PromptTableInput, TensorRTBackend, batch_prompt_tables, fake_prompt_ids,
                                     generated_tokens, runner_options, streams_cheaply, usable_engines)

from test_trt_vision import make_fake_bundle


def _decoder_record(bundle: Path, gpu: object, name: str) -> Path:
    """A w8a16 TensorRT-LLM engine's build record for ``gpu`` in ``bundle``, as the engine build writes it."""
    folder = bundle / "trtllm" / name
    folder.mkdir(parents=True)
    (folder / "build.json").write_text(json.dumps({"format": "radtrt-trtllm-engine", "gpu": gpu_stamp(gpu),
                                                   "mode": "w8a16", "int8_kv": False, "limits": LIMITS}))
    return folder


def test_fake_ids_replace_the_image_placeholder() -> None:
    ids = [1, 319, 13563, IMAGE_TOKEN_INDEX, 13, 1019, 29901]
    fake = fake_prompt_ids(ids, 4, 32000)
    assert fake == [1, 319, 13563, 32000, 32001, 32002, 32003, 13, 1019, 29901]
    assert len(fake_prompt_ids(ids, 1369, 32000)) == len(ids) - 1 + 1369  # LLaVA-Rad: 37 x 37 patches
    with pytest.raises(RadtrtError, match="exactly one <image>"):
        fake_prompt_ids([1, 2, 3], 4, 32000)
    with pytest.raises(RadtrtError, match="exactly one <image>"):
        fake_prompt_ids([IMAGE_TOKEN_INDEX, IMAGE_TOKEN_INDEX], 4, 32000)


def test_batched_prompt_tables_use_one_task_per_request() -> None:
    a = PromptTableInput([1, 512, 513, 7], torch.full((2, 8), 1.0))
    b = PromptTableInput([1, 9, 512, 513, 7, 7], torch.full((2, 8), 2.0))
    assert a.shape == (4, 8)
    ids, table, tasks = batch_prompt_tables([a, b])
    assert ids == [a.input_ids, b.input_ids] and tasks == "0,1"
    assert table.shape == (2, 2, 8) and table[1, 0, 0] == 2.0
    # TensorRT-LLM looks fake id v + j of request b up at row b * N + j of the flattened table
    flat = table.view(-1, 8)
    assert torch.equal(flat[1 * 2 + 1], b.table[1])
    with pytest.raises(RadtrtError, match="one shape"):
        batch_prompt_tables([a, PromptTableInput([1], torch.zeros(3, 8))])


def test_generated_tokens_strip_prompt_and_eos() -> None:
    # runner output: [batch, beams, max_len], prompt included, padded with end_id
    out = torch.tensor([[[1, 5, 6, 40, 41, 2, 2, 2]], [[1, 5, 6, 7, 50, 51, 52, 53]]])
    lengths = torch.tensor([[6], [8]])
    assert generated_tokens(out, lengths, [3, 4], eos_token_id=2) == [[40, 41], [50, 51, 52, 53]]
    assert generated_tokens(out, torch.tensor([[3], [4]]), [3, 4], eos_token_id=2) == [[], []]


def test_backend_refuses_cleanly_without_a_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import radtrt.runtime.tensorrt as trt_runtime

    monkeypatch.setattr(trt_runtime, "detect_gpu", lambda: None)  # a CPU host's refusal, on a GPU host too
    bundle = make_fake_bundle(tmp_path)
    with pytest.raises(RadtrtError, match="no CUDA GPU is visible"):
        TensorRTBackend(bundle)


LIMITS = {"max_batch": 8, "max_input_len": 64, "max_seq_len": 96}  # what a decoder engine's stamp records


class FakeRunner:
    """Records what TensorRTBackend hands TensorRT-LLM's runner and answers like ModelRunnerCpp."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def generate(self, **kw: object):  # noqa: ANN201
        self.calls.append(kw)
        ids = kw["batch_input_ids"]
        out = torch.full((len(ids), 1, 20), 2, dtype=torch.int32)
        for b, x in enumerate(ids):
            out[b, 0, :len(x)] = x
            out[b, 0, len(x):len(x) + 3] = torch.tensor([40 + b, 41, 2])
        lengths = torch.tensor([[len(x) + 3] for x in ids])
        result = {"output_ids": out, "sequence_lengths": lengths}
        if kw.get("output_generation_logits"):
            # [B, beams, max_new_tokens, padded vocab] as ModelRunner allocates it; step k filled with k
            result["generation_logits"] = torch.arange(3.0)[None, None, :, None].expand(len(ids), 1, 3, 576).clone()
            return result
        if not kw.get("streaming"):
            return result
        return iter([result, result])


def test_generate_drives_the_runner_with_a_prompt_table() -> None:
    backend = object.__new__(TensorRTBackend)  # no engines on a CPU host: wire the parts by hand
    backend.runner = FakeRunner()
    backend.vocab_size, backend.num_image_tokens, backend.table_dtype = 512, 2, torch.float16
    backend.limits = {"max_batch": 8, "max_input_len": 64, "max_seq_len": 96}
    backend.decoder_stamp = {"gather_generation_logits": True}
    backend.streams_cheaply = True
    a = backend.embed_prompt([1, IMAGE_TOKEN_INDEX, 7], torch.ones(2, 8))
    b = backend.embed_prompt([1, 9, IMAGE_TOKEN_INDEX, 7], torch.zeros(2, 8))
    assert a.input_ids == [1, 512, 513, 7] and a.table.dtype == torch.float16
    gen = backend.generate([a, b], max_new_tokens=5, eos_token_id=2)
    assert gen.token_ids == [[40, 41], [41, 41]]
    call = backend.runner.calls[0]
    assert call["prompt_tasks"] == "0,1" and call["prompt_table"].shape == (2, 2, 8)
    assert [x.tolist() for x in call["batch_input_ids"]] == [[1, 512, 513, 7], [1, 9, 512, 513, 7]]
    assert (call["end_id"], call["max_new_tokens"], call["top_k"], call["num_beams"]) == (2, 5, 1, 1)
    assert gen.prefill_ms >= 0 and gen.decode_ms >= 0
    assert call["streaming"]  # the first token's time is the first response's
    parity = backend.generate([a], max_new_tokens=3, eos_token_id=2, keep_logits=True)
    assert parity.first_logits is not None and parity.first_logits.shape == (1, 512)
    assert parity.logits.shape == (1, 3, 512) and parity.logits[0, :, 0].tolist() == [0.0, 1.0, 2.0]
    backend.decoder_stamp = {"gather_generation_logits": False}  # what 'radtrt export --target trtllm' builds
    with pytest.raises(RadtrtError, match="built without generation logits"):
        backend.generate([a], max_new_tokens=3, eos_token_id=2, keep_logits=True)
    with pytest.raises(RadtrtError, match="expected 2 image tokens"):
        backend.embed_prompt([1, IMAGE_TOKEN_INDEX], torch.ones(3, 8))


class FailingRunner:
    """TensorRT-LLM's runner refusing a request as 0.12-1.x do: a bare RuntimeError (``_fill_output``'s
    ``response.error_msg``), raised at the call or while streaming."""

    def __init__(self, streaming_too: bool) -> None:
        self.streaming_too = streaming_too

    def generate(self, **kw: object):  # noqa: ANN201
        if kw.get("streaming") and self.streaming_too:
            def steps():  # noqa: ANN202
                yield {}
                raise RuntimeError("[TensorRT-LLM][ERROR] Encountered an error in forwardAsync function\n  at 0x7f")
            return steps()
        raise RuntimeError("Input batch size (2) exceeds the engine or specified limit (1)")


@pytest.mark.parametrize("streaming_too", [False, True])
def test_tensorrt_llm_runtime_errors_are_one_line(streaming_too: bool, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A RuntimeError from TensorRT-LLM's runner (loading a damaged engine, a request it refuses, an error response)
    reached the user as a traceback with exit 1."""
    import types

    import radtrt.runtime.tensorrt as module

    backend = object.__new__(TensorRTBackend)
    backend.runner = FailingRunner(streaming_too)
    backend.vocab_size, backend.num_image_tokens, backend.table_dtype = 512, 2, torch.float16
    backend.limits, backend.decoder_stamp, backend.streams_cheaply = LIMITS, {}, True
    prompt = backend.embed_prompt([1, IMAGE_TOKEN_INDEX, 7], torch.ones(2, 8))
    reason = re.escape("[TensorRT-LLM][ERROR] Encountered an error in forwardAsync function" if streaming_too
                       else "Input batch size (2) exceeds")
    with pytest.raises(RadtrtError, match=rf"^TensorRT-LLM failed to generate: {reason}"
                                          rf"[^\n]*$"):
        backend.generate([prompt], max_new_tokens=3, eos_token_id=2)

    def from_dir(**_: object) -> None:
        raise RuntimeError("[TensorRT-LLM][ERROR] Assertion failed: Failed to deserialize cuda engine.")

    cls = types.SimpleNamespace(from_dir=from_dir)
    monkeypatch.setattr(module, "import_vendor", lambda *_: types.SimpleNamespace(ModelRunnerCpp=cls, ModelRunner=cls))
    with pytest.raises(RadtrtError, match=rf"^TensorRT-LLM failed to load the engine {tmp_path} \(rebuild it if it is "
                                          r"damaged\): \[TensorRT-LLM\]\[ERROR\] Assertion failed: Failed to "
                                          r"deserialize cuda engine.$"):
        module.open_runner(tmp_path, "cpp", LIMITS)


def test_only_tensorrt_llms_own_errors_become_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """A RuntimeError of radtrt's own handling of the runner's output is a bug to see whole, not "TensorRT-LLM
    failed" (the whole generation was wrapped)."""
    import radtrt.runtime.tensorrt as module

    backend = object.__new__(TensorRTBackend)
    backend.runner = FakeRunner()
    backend.vocab_size, backend.num_image_tokens, backend.table_dtype = 512, 2, torch.float16
    backend.limits, backend.decoder_stamp, backend.streams_cheaply = LIMITS, {}, True
    prompt = backend.embed_prompt([1, IMAGE_TOKEN_INDEX, 7], torch.ones(2, 8))

    def broken(*_: object) -> None:
        raise RuntimeError("a bug in radtrt")

    monkeypatch.setattr(module, "generated_tokens", broken)
    with pytest.raises(RuntimeError, match="a bug in radtrt") as e:
        backend.generate([prompt], max_new_tokens=3, eos_token_id=2)
    assert not isinstance(e.value, RadtrtError)


def test_a_logits_engine_before_trtllm_1_is_not_streamed() -> None:
    """0.12-0.14's ModelRunnerCpp returns the whole generation-logits buffer with every streamed response when
    the engine keeps logits (~33 MB a step at 256 tokens): such engines run in one call."""
    assert streams_cheaply(True, "cpp", "0.14.0") is False and streams_cheaply(True, "cpp", "0.12.0.dev2024") is False
    assert streams_cheaply(True, "cpp", None) is False  # version unknown: the safe way
    assert streams_cheaply(True, "cpp", "1.0.0rc4") and streams_cheaply(False, "cpp", "0.14.0")
    assert streams_cheaply(True, "python", "0.14.0")
    backend = object.__new__(TensorRTBackend)
    backend.runner = FakeRunner()
    backend.vocab_size, backend.num_image_tokens, backend.table_dtype = 512, 2, torch.float16
    backend.limits, backend.decoder_stamp, backend.streams_cheaply = LIMITS, {"gather_generation_logits": True}, False
    gen = backend.generate([backend.embed_prompt([1, IMAGE_TOKEN_INDEX, 7], torch.ones(2, 8))], max_new_tokens=5,
                           eos_token_id=2)
    assert gen.token_ids == [[40, 41]] and gen.prefill_ms == 0.0 and gen.decode_ms >= 0
    assert not backend.runner.calls[0].get("streaming") and "output_generation_logits" not in backend.runner.calls[0]


def test_the_cpp_runner_kv_cache_is_bounded_by_the_engine_limits() -> None:
    """KvCacheConfig's default takes 90% of the free GPU memory: on a Jetson, most of the system's RAM."""
    # whole 64-token blocks per sequence: 96 positions take two (a full batch queued on 8 x 96 tokens)
    assert runner_options("cpp", LIMITS) == {"max_tokens_in_paged_kv_cache": 8 * 128}
    assert runner_options("cpp", {**LIMITS, "max_seq_len": 128}) == {"max_tokens_in_paged_kv_cache": 8 * 128}
    assert runner_options("python", LIMITS) == {}
    with pytest.raises(RadtrtError, match="unknown TensorRT-LLM session 'rust'"):
        runner_options("rust", LIMITS)


def test_usable_engines_lists_only_this_hosts_builds(tmp_path: Path) -> None:
    from test_trt_vision import ORIN, V100, fake_engine

    bundle = make_fake_bundle(tmp_path)
    assert usable_engines(bundle, ORIN) == {"vision": [], "decoder": []}
    fake_engine(bundle, ORIN)
    stamp_dir = bundle / "trtllm" / "orin-w8a16"
    stamp_dir.mkdir(parents=True)
    (stamp_dir / "build.json").write_text(json.dumps({"format": "radtrt-trtllm-engine", "gpu": gpu_stamp(ORIN),
                                                      "mode": "w8a16", "int8_kv": True, "limits": LIMITS}))
    assert usable_engines(bundle, ORIN) == {"vision": ["fp16"], "decoder": ["w8a16-kv8"]}
    older = bundle / "trtllm" / "orin-cuda12.4-w8a16"  # an engine key of before, beside its rebuild
    older.mkdir()
    (older / "build.json").write_text((stamp_dir / "build.json").read_text())
    assert usable_engines(bundle, ORIN)["decoder"] == ["w8a16-kv8"]  # not "choose one of w8a16-kv8, w8a16-kv8"
    stray = bundle / "trtllm" / "junk"  # someone else's build.json: passed over, where it failed every run
    stray.mkdir()
    (stray / "build.json").write_text(json.dumps({"format": "other", "name": "x"}))
    assert usable_engines(bundle, ORIN)["decoder"] == ["w8a16-kv8"]
    damaged = json.loads((stamp_dir / "build.json").read_text())
    del damaged["limits"]  # a KeyError traceback from TensorRTBackend
    (older / "build.json").write_text(json.dumps(damaged))
    with pytest.raises(RadtrtError, match=f"engine stamp {older / 'build.json'} is malformed \\(no 'limits'\\)"):
        usable_engines(bundle, ORIN)
    (older / "build.json").write_text(json.dumps({**damaged, "limits": LIMITS, "gpu": {"name": "x"}}))
    with pytest.raises(RadtrtError, match=f"engine stamp {older / 'build.json'} is malformed"):
        usable_engines(bundle, ORIN)
    (older / "build.json").write_text(json.dumps({**damaged, "limits": None}))  # a traceback at the batch split
    with pytest.raises(RadtrtError, match=f"engine stamp {older / 'build.json'} is malformed \\(its limits\\)"):
        usable_engines(bundle, ORIN)
    shutil.rmtree(older)
    from radtrt.exporter.trtllm_build import find_decoder_engine

    with pytest.raises(RadtrtError, match=r"has no TensorRT-LLM w8a8_sq-kv8 decoder engine \(for this host it has "
                                          r"w8a16-kv8\); build one with: radtrt export --bundle .* --model MODEL "
                                          r"--target trtllm --precision int8 --int8-decoder smoothquant "
                                          r"--int8-kv-cache --calibration-stats CALIB$"):
        find_decoder_engine(bundle, ORIN, "w8a8_sq-kv8")
    assert usable_engines(bundle, V100) == {"vision": [], "decoder": []}
    assert usable_engines(bundle, None) == {"vision": [], "decoder": []}


def test_generate_keeps_to_the_engines_build_limits() -> None:
    """TensorRT-LLM's runner raised a bare RuntimeError (a traceback) for a batch, prompt or sequence over the
    engine's build limits: batches are now split to the engine's size, and too long a generation is one line."""
    backend = object.__new__(TensorRTBackend)
    backend.runner = FakeRunner()
    backend.vocab_size, backend.num_image_tokens, backend.table_dtype = 512, 2, torch.float16
    backend.limits = {"max_batch": 2, "max_input_len": 6, "max_seq_len": 10}
    backend.decoder_stamp, backend.streams_cheaply = {"gather_generation_logits": True}, True
    prompts = [backend.embed_prompt([1, IMAGE_TOKEN_INDEX, 7 + i], torch.ones(2, 8)) for i in range(5)]
    gen = backend.generate(prompts, max_new_tokens=5, eos_token_id=2)
    assert [len(c["batch_input_ids"]) for c in backend.runner.calls] == [2, 2, 1]
    assert gen.token_ids == [[40, 41], [41, 41], [40, 41], [41, 41], [40, 41]]
    last, size = gen.batch_of(4)  # a study's record takes its own chunk's times, not the sum over chunks
    assert size == 1 and last is gen.parts[2][1] and gen.batch_of(1)[1] == 2
    assert gen.decode_ms == pytest.approx(sum(part.decode_ms for _, part in gen.parts))
    parity = backend.generate(prompts[:3], max_new_tokens=3, eos_token_id=2, keep_logits=True)
    assert parity.logits is not None and parity.logits.shape == (3, 3, 512)
    with pytest.raises(RadtrtError, match=r"the prompt \(4 positions, with the image\) \+ 7 new tokens exceed the "
                                          r"TensorRT-LLM engine's sequences \(up to 10 positions\): --max-new-tokens 6 "
                                          r"at most for this prompt"):
        backend.generate(prompts, max_new_tokens=7, eos_token_id=2)
    long_prompt = backend.embed_prompt([1, IMAGE_TOKEN_INDEX, 7, 8, 9, 10, 11], torch.ones(2, 8))
    with pytest.raises(RadtrtError, match=r"the prompt \(8 positions, with the image\) is longer than the "
                                          r"TensorRT-LLM engine's prompts \(up to 6 positions\): this engine cannot take it"):
        backend.generate([long_prompt], max_new_tokens=1, eos_token_id=2)


def test_an_engine_prompt_refusal_names_the_indication_only_where_shortening_it_helps() -> None:
    """'shorten --indication' was said whether or not one was given (the shorten hint was dropped)."""
    from radtrt.runtime.tensorrt import check_engine_limits

    limits = {"max_input_len": 512, "max_seq_len": 1024}
    with pytest.raises(RadtrtError, match=r"\(up to 512 positions\): this engine cannot take it$"):
        check_engine_limits([600], 10, limits)
    with pytest.raises(RadtrtError, match=r"\(up to 512 positions\): shorten --indication$"):
        check_engine_limits([600], 10, limits, shorten=("--indication", 500))
    with pytest.raises(RadtrtError, match=r"\(up to 512 positions\): this engine cannot take it$"):
        check_engine_limits([600], 10, limits, shorten=("--indication", 520))


def test_the_decoder_engine_is_the_one_built_not_always_fp16(tmp_path: Path) -> None:
    """The backend always asked for the fp16 engine: every INT8 engine 'radtrt export' built could not run."""
    from radtrt.runtime.tensorrt import choose_decoder

    assert choose_decoder(["w8a16"], None, tmp_path) == "w8a16"
    assert choose_decoder(["w8a8_sq-kv8"], None, tmp_path) == "w8a8_sq-kv8"
    assert choose_decoder([], None, tmp_path) is None  # the lookup then says why none fits, or how to build one
    with pytest.raises(RadtrtError, match="has TensorRT-LLM decoder engines fp16, w8a16 for this host: choose one "
                                          "with --trt-decoder"):
        choose_decoder(["fp16", "w8a16"], None, tmp_path)
    assert choose_decoder(["fp16", "w8a16"], "w8a16", tmp_path) == "w8a16"
    assert choose_decoder(["fp16"], "w8a8_sq-kv8", tmp_path) == "w8a8_sq-kv8"  # missing: the lookup's own line
    for bad in ("int8", "w8a16-kv4", "w8a16-"):
        with pytest.raises(RadtrtError, match="--trt-decoder|unknown TensorRT-LLM decoder mode"):
            choose_decoder([], bad, tmp_path)


def test_device_cpu_never_runs_the_tensorrt_backend() -> None:
    """'--device cpu' was silently ignored: auto picked the GPU engines, and '--backend tensorrt' ran them."""
    from radtrt.runtime.backends import choose_backend

    assert choose_backend("auto", bundle=True, model=False, ort_providers=[], trt_ready=True) == (
        "tensorrt", "the bundle has TensorRT and TensorRT-LLM engines built for this GPU")
    assert choose_backend("auto", bundle=True, model=False, ort_providers=[], trt_ready=True, cpu=True) == (
        "onnxruntime", "--device cpu")
    with pytest.raises(RadtrtError, match="--device cpu: the tensorrt backend runs on the GPU"):
        choose_backend("tensorrt", bundle=True, model=False, ort_providers=[], cpu=True)


def test_auto_says_no_gpu_where_there_is_none() -> None:
    """On a host without a GPU, "no TensorRT engine pair for this host" read as if building some would help."""
    from radtrt.runtime.backends import choose_backend

    cpu = ["CPUExecutionProvider"]
    assert choose_backend("auto", bundle=True, model=False, ort_providers=cpu, gpu_here=False) == (
        "onnxruntime", "no CUDA GPU visible here, so ONNX Runtime on the CPU")
    assert choose_backend("auto", bundle=True, model=False, ort_providers=["CUDAExecutionProvider", *cpu],
                          gpu_here=False)[1].endswith("ONNX Runtime has CUDA")  # onnxruntime-gpu beside CPU torch
    assert "holds no TensorRT vision engine" in choose_backend("auto", bundle=True, model=False, ort_providers=cpu)[1]


def test_an_engine_on_a_host_without_tensorrt_llm_asks_for_it_not_for_a_rebuild(tmp_path: Path) -> None:
    """'rebuild it on this host' was the remedy where no rebuild is possible: TensorRT-LLM is not installed."""
    import dataclasses

    from test_trt_vision import ORIN

    from radtrt.exporter.trtllm_build import find_decoder_engine

    bundle = make_fake_bundle(tmp_path)
    folder = _decoder_record(bundle, ORIN, "orin-w8a16")
    with pytest.raises(RadtrtError, match="install TensorRT-LLM on this host"):
        find_decoder_engine(bundle, dataclasses.replace(ORIN, tensorrt_llm=None), "w8a16")
    # no --trt-decoder: the engine there is named with why it does not fit (it read "no fp16 decoder engine")
    with pytest.raises(RadtrtError, match=r"the TensorRT-LLM decoder engine in .* was built for Orin .*install "
                                          r"TensorRT-LLM on this host"):
        find_decoder_engine(bundle, dataclasses.replace(ORIN, tensorrt_llm=None), None)
    # with TensorRT-LLM there: the rebuild named goes into this bundle (without --bundle it made a new one)
    with pytest.raises(RadtrtError, match=f"rebuild it on this host with: radtrt export --bundle {bundle} --model "
                                          f"MODEL --target trtllm --precision int8$"):
        find_decoder_engine(bundle, dataclasses.replace(ORIN, tensorrt_llm="0.14.0"), "w8a16")
    shutil.rmtree(folder)
    with pytest.raises(RadtrtError, match=r"has no TensorRT-LLM decoder engine; build one with: .*--target trtllm "
                                          r"--precision fp16$"):
        find_decoder_engine(bundle, ORIN, None)
    with pytest.raises(RadtrtError, match=r"--int8-kv-cache --calibration-stats CALIB$"):  # an fp16 bundle has none
        find_decoder_engine(bundle, ORIN, "w8a16-kv8")


@pytest.mark.parametrize("host", ["orin", "cpu"])
def test_doctors_summary_agrees_with_its_tensorrt_line(host: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """'--backend tensorrt: usable once the engines are built' was followed by a summary without tensorrt."""
    from test_trt_vision import ORIN

    import radtrt.exporter.gpu as gpu_module
    from radtrt.runtime.doctor import report

    monkeypatch.setattr(gpu_module, "detect_gpu", lambda: ORIN if host == "orin" else None)
    lines = report()
    usable_line = any(line.strip().startswith("--backend tensorrt: usable") for line in lines)
    summary = next(line for line in lines if line.startswith("backends usable here:"))
    assert ("tensorrt" in summary) == usable_line
    assert usable_line == (host == "orin")


def test_an_srs_version_and_the_engines_limits_are_known_before_any_study() -> None:
    """weights_id sat under encode_images' @torch.no_grad(), so it was no property and writing an SR raised a
    TypeError; the engine's limits were checked only at the first batch, after earlier studies' records."""
    from radtrt.runtime.pipeline import Pipeline

    backend = object.__new__(TensorRTBackend)
    backend.manifest = {"model": {"weights_fingerprint_fp16": "ab" * 32}}
    backend.precision, backend.limits = "fp16+w8a16", {"max_batch": 2, "max_input_len": 6, "max_seq_len": 10}
    assert Pipeline(backend, None, None).model_version == f"weights {'ab' * 8}, fp16+w8a16 on tensorrt"
    backend.check_length(4, 6)
    with pytest.raises(RadtrtError, match=r"exceed the TensorRT-LLM engine's sequences \(up to 10 positions\)"):
        backend.check_length(4, 7)


def _broken_tensorrt(site: Path) -> None:
    """A TensorRT wheel whose package metadata is there but whose import fails (libnvinfer missing), and a
    TensorRT-LLM that fails the same way."""
    for name, version, error in (("tensorrt", "10.3.0", "libnvinfer.so.10: cannot open shared object file"),
                                 ("tensorrt_llm", "0.12.0", "libth_common.so: cannot open shared object file")):
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text(f"raise ImportError({error!r})\n")
        info = site / f"{name}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def test_a_tensorrt_that_does_not_import_is_not_usable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Package metadata without a loadable library: doctor called the vision engine buildable and tensorrt a usable
    backend, auto picked tensorrt, and infer/export ended in an ImportError traceback."""
    import dataclasses
    import types

    import radtrt.exporter.gpu as gpu_module
    from test_trt_vision import ORIN, fake_engine, vision_graph

    from radtrt.exporter.gpu import capability_lines, detect_gpu, tensorrt_backend_possible
    from radtrt.exporter.tensorrt import _build_serialized, inspect_onnx, plan_vision_build, vision_profile
    from radtrt.runtime.backends import choose_backend
    from radtrt.runtime.session import _trt_ready
    from radtrt.runtime.tensorrt import TrtVisionEngine, open_runner

    _broken_tensorrt(tmp_path / "site")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=0: types.SimpleNamespace(
        name="Orin", major=8, minor=7, total_memory=32 * 2**30))
    gpu = detect_gpu()
    assert gpu is not None and gpu.tensorrt == "10.3.0" and "libnvinfer.so.10" in str(gpu.tensorrt_error)
    assert gpu == dataclasses.replace(ORIN, memory_gib=32.0, cuda=gpu.cuda)  # an engine's identity is unchanged
    assert "tensorrt_error" not in gpu_stamp(gpu)
    lines = "\n".join(capability_lines(gpu))
    assert "vision engine: no (TensorRT 10.3.0 is installed but does not import (libnvinfer.so.10" in lines
    assert "buildable" not in lines and "--backend tensorrt: not usable here" in lines
    assert not tensorrt_backend_possible(gpu)
    # auto: the engines recorded for this GPU are passed over, saying why
    bundle = make_fake_bundle(tmp_path)
    fake_engine(bundle, ORIN)
    folder = _decoder_record(bundle, ORIN, "orin-w8a16")
    ready, why = _trt_ready(bundle, gpu)
    assert not ready and "does not import (libnvinfer.so.10" in str(why)
    chosen, said = choose_backend("auto", bundle=True, model=False, ort_providers=["CPUExecutionProvider"],
                                  trt_ready=ready, trt_unusable=why)
    assert chosen == "onnxruntime" and said.startswith("the bundle's TensorRT engines for this GPU cannot run here")
    # --backend tensorrt, and every import of the libraries: one line, not an ImportError traceback
    with pytest.raises(RadtrtError, match=r"the tensorrt backend cannot run here: TensorRT 10.3.0 is installed but "
                                          r"does not import"):
        TensorRTBackend(bundle, gpu=gpu)
    with pytest.raises(RadtrtError, match=r"^TensorRT does not import here \(libnvinfer.so.10.*\): reinstall it"):
        TrtVisionEngine(tmp_path / "vision.engine", {"gpu": gpu_stamp(ORIN)})
    with pytest.raises(RadtrtError, match=r"^TensorRT-LLM does not import here \(libth_common.so"):
        open_runner(folder / "engine", "cpp", LIMITS)
    vision_graph(tmp_path / "v.onnx")
    info = inspect_onnx(tmp_path / "v.onnx")
    with pytest.raises(RadtrtError, match=r"^TensorRT does not import here"):
        _build_serialized(tmp_path / "v.onnx", info, plan_vision_build(info, "10.3.0"), vision_profile(info, 2),
                          tmp_path / "t.cache", 2**30, "10.3.0")
    from radtrt.exporter.gpu import check_tensorrt

    with pytest.raises(RadtrtError, match="does not import"):  # export --target tensorrt's preflight
        check_tensorrt(gpu)
    assert gpu_module.trtllm_problem(gpu, "fp16").startswith("TensorRT-LLM needs TensorRT")


def test_an_engine_of_another_gpu_model_does_not_offer_installing_its_libraries(tmp_path: Path) -> None:
    """'install TensorRT on this host (the version it was built with), or rebuild...' for a V100's engine on an
    Orin: no install makes it run there; the offer is kept for an engine of this GPU model."""
    import dataclasses

    from test_trt_vision import ORIN, V100, fake_engine

    from radtrt.exporter.tensorrt import find_vision_engine
    from radtrt.exporter.trtllm_build import find_decoder_engine

    bundle = make_fake_bundle(tmp_path)
    fake_engine(bundle, V100)
    _decoder_record(bundle, V100, "tesla-w8a16")
    bare = dataclasses.replace(ORIN, tensorrt=None, tensorrt_llm=None)
    with pytest.raises(RadtrtError, match=f"built for Tesla V100.*: install TensorRT on this host, then rebuild it "
                                          f"here with: radtrt export --bundle {bundle} --target tensorrt$") as e:
        find_vision_engine(bundle, bare)
    assert "the version it was built with" not in str(e.value)
    with pytest.raises(RadtrtError, match=f"built for Tesla V100.*: install TensorRT-LLM on this host, then rebuild "
                                          f"it here with: radtrt export --bundle {bundle} --model MODEL --target "
                                          f"trtllm --precision int8$"):
        find_decoder_engine(bundle, bare, "w8a16")
    same_model = dataclasses.replace(V100, tensorrt=None, tensorrt_llm=None)  # this GPU model: installing helps
    with pytest.raises(RadtrtError, match=r"install TensorRT on this host \(the version it was built with\)"):
        find_vision_engine(bundle, same_model)
    with pytest.raises(RadtrtError, match=r"install TensorRT-LLM on this host \(the version it was built with\)"):
        find_decoder_engine(bundle, same_model, "w8a16")


def test_auto_passes_over_engines_that_fit_the_gpu_but_not_the_bundle(tmp_path: Path) -> None:
    """A decoder engine of another model, or a vision engine of another export: auto picked tensorrt (the GPU
    records fit), which then refused; it now makes the same checks and runs ONNX Runtime, saying why."""
    from test_trt_vision import ORIN, fake_engine

    from radtrt.exporter.trtllm_build import engine_files
    from radtrt.runtime.backends import choose_backend
    from radtrt.runtime.session import _trt_ready

    bundle = make_fake_bundle(tmp_path)
    vision = fake_engine(bundle, ORIN)
    folder = bundle / "trtllm" / "orin-w8a16"
    folder.mkdir(parents=True)
    (folder / "engine").mkdir()
    (folder / "engine" / "rank0.engine").write_bytes(b"serialized engine")
    decoder = {"format": "radtrt-trtllm-engine", "gpu": gpu_stamp(ORIN), "mode": "w8a16", "int8_kv": False,
               "limits": LIMITS, "engine_files": engine_files(folder / "engine")}
    (folder / "build.json").write_text(json.dumps(decoder))
    assert _trt_ready(bundle, ORIN) == (True, None)
    (folder / "engine" / "rank0.engine").write_bytes(b"truncated")  # auto compares sizes; the backend hashes too
    ready, why = _trt_ready(bundle, ORIN)
    assert not ready and "rank0.engine is missing or does not match its stamp" in str(why)
    (folder / "engine" / "rank0.engine").write_bytes(b"serialized engine")
    (folder / "build.json").write_text(json.dumps({**decoder, "bundle_weights": "ab" * 32}))  # another model's
    ready, why = _trt_ready(bundle, ORIN)
    assert not ready and "do not fit it (the TensorRT-LLM engine" in str(why) and "not built from the weights" in why
    assert choose_backend("auto", bundle=True, model=False, ort_providers=["CPUExecutionProvider"], trt_ready=ready,
                          trt_unusable=why) == ("onnxruntime", f"{why}; ONNX Runtime on the CPU")
    assert not _trt_ready(bundle, ORIN, "w8a16")[0]  # the one --trt-decoder names
    (folder / "build.json").write_text(json.dumps(decoder))
    stamp = json.loads((vision / "engine.json").read_text())
    (vision / "engine.json").write_text(json.dumps({**stamp, "onnx": {"file": "vision.onnx", "sha256": "0" * 64}}))
    ready, why = _trt_ready(bundle, ORIN)
    assert not ready and "built from another export of vision.onnx" in str(why)
