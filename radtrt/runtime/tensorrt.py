"""The ``tensorrt`` backend: TensorRT vision engine -> prompt table -> TensorRT-LLM decoder -> tokens.

One interface difference from the other backends, kept minimal: TensorRT-LLM takes token ids, not
input embeddings. The image enters as a *prompt table* (prompt tuning): the ``<image>`` position
holds fake ids ``vocab_size .. vocab_size + N - 1`` that index the table's N rows. So
``embed_prompt`` returns a ``PromptTableInput`` (ids + table) instead of spliced embeddings, and only
this backend's ``generate`` consumes it; ``Pipeline`` and the parity benchmark pass it through
unchanged. With a batch, request ``b`` uses task ``b`` of a ``[B, N, H]`` table (TensorRT-LLM's
``prompt_tasks``), so every request keeps the same fake ids.

Everything that needs TensorRT / TensorRT-LLM is imported lazily; the id/table/output handling is
pure and tested on CPU.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from radtrt.errors import fail
from radtrt.exporter.bundle import BUNDLE_FINGERPRINT, read_manifest
from radtrt.exporter.gpu import (GpuInfo, detect_gpu, import_vendor, loaded_tensorrt_problem, parse_version, read_stamp,
                                 require_gpu, stamp_gpu, stamp_mismatch, tensorrt_problem)
from radtrt.exporter.tensorrt import (STAMP_FILE, STAMP_FORMAT, VISION_STAMP_KEYS, find_vision_engine,
                                      this_hosts_vision_engine, vision_engine_problem)
from radtrt.exporter.trtllm import BUILD_STAMP, mode_tag, split_mode_tag
from radtrt.exporter.trtllm_build import (built_from_problem, check_decoder_engine, decoder_engine_problem,
                                          find_decoder_engine, kv_cache_tokens, read_decoder_stamp,
                                          read_engine_config)
from radtrt.model.generate import Generation
from radtrt.model.prompt import IMAGE_TOKEN_INDEX

TRT_TO_TORCH = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT8": torch.int8,
                "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool}


@dataclass
class PromptTableInput:
    """A prompt for TensorRT-LLM: ids with fake image ids, and the image rows they point to."""

    input_ids: list[int]
    table: torch.Tensor  # [N, H]

    @property
    def shape(self) -> tuple[int, int]:
        """(prompt length, hidden): what callers read off spliced embeddings."""
        return len(self.input_ids), self.table.shape[-1]


def fake_prompt_ids(input_ids: list[int], num_image_tokens: int, vocab_size: int) -> list[int]:
    """Replace the single ``<image>`` placeholder by ``vocab_size .. vocab_size + N - 1``."""
    if input_ids.count(IMAGE_TOKEN_INDEX) != 1:
        fail(f"the prompt must contain exactly one <image> placeholder, found {input_ids.count(IMAGE_TOKEN_INDEX)}")
    pos = input_ids.index(IMAGE_TOKEN_INDEX)
    return input_ids[:pos] + list(range(vocab_size, vocab_size + num_image_tokens)) + input_ids[pos + 1:]


def batch_prompt_tables(inputs: list[PromptTableInput]) -> tuple[list[list[int]], torch.Tensor, str]:
    """(ids per request, table ``[B, N, H]``, prompt_tasks ``"0,1,..."``) for ``runner.generate``."""
    shapes = {tuple(p.table.shape) for p in inputs}
    if len(shapes) != 1:
        fail(f"all image tables of a batch must have one shape, got {sorted(shapes)}")
    return [p.input_ids for p in inputs], torch.stack([p.table for p in inputs]), ",".join(map(str, range(len(inputs))))


def generated_tokens(output_ids: torch.Tensor, sequence_lengths: torch.Tensor, input_lengths: list[int],
                     eos_token_id: int) -> list[list[int]]:
    """New ids per request from a runner's ``[B, beams, L]`` output (prompt included), EOS and after removed."""
    out = []
    for b, start in enumerate(input_lengths):
        ids = output_ids[b, 0, start:int(sequence_lengths[b, 0])].tolist()
        out.append(ids[:ids.index(eos_token_id)] if eos_token_id in ids else ids)
    return out


def usable_engines(bundle: Path, gpu: GpuInfo | None) -> dict[str, list[str]]:
    """Engines in ``bundle`` built for this GPU and library versions: ``{"vision": [precisions],
    "decoder": [mode tags]}`` (both empty without a GPU). For ``--backend auto`` and ``radtrt doctor``."""
    found: dict[str, list[str]] = {"vision": [], "decoder": []}
    if gpu is None:
        return found
    for path in sorted(bundle.glob(f"tensorrt/*/{STAMP_FILE}")):
        stamp = read_stamp(path, STAMP_FORMAT, VISION_STAMP_KEYS)
        if stamp is not None and stamp_mismatch(stamp, gpu) is None:
            found["vision"].append(stamp["precision"])
    for path in sorted(bundle.glob(f"trtllm/*/{BUILD_STAMP}")):
        stamp = read_decoder_stamp(path)
        if stamp is not None and stamp_mismatch(stamp, gpu, trtllm=True) is None:
            found["decoder"].append(mode_tag(stamp["mode"], stamp["int8_kv"]))
    # one precision built twice (a folder of an older engine key beside its rebuild) is one engine to choose
    return {part: sorted(set(names)) for part, names in found.items()}


def engines_problem(bundle: Path, gpu: GpuInfo, decoder: str | None = None) -> str | None:
    """Why the engines ``bundle`` holds for this GPU (``usable_engines``: both found) cannot run it, by the checks
    ``--backend tensorrt`` makes (the vision engine intact and built from this vision.onnx, the decoder engine
    built from these weights), or None. ``--backend auto`` checked only the GPU records: it picked tensorrt, which
    then refused a decoder engine from another model or a vision engine from another export."""
    manifest = read_manifest(bundle, verify=False)
    chosen, _ = this_hosts_vision_engine(bundle, gpu)
    problem = vision_engine_problem(*chosen, manifest, bundle) if chosen is not None else None
    if problem:
        return problem
    problems = []
    for tag in [mode_tag(*split_mode_tag(decoder))] if decoder is not None else usable_engines(bundle, gpu)["decoder"]:
        engine, stamp = find_decoder_engine(bundle, gpu, tag)  # one asked for and missing: its own line, as before
        problems.append(built_from_problem(engine, stamp, manifest, bundle)
                        or decoder_engine_problem(engine, stamp, hashes=False))  # sizes: the backend hashes them
    # any one that fits: with several, the backend asks which (choose_decoder), as before
    return None if None in problems or not problems else problems[0]


def choose_decoder(usable: list[str], requested: str | None, bundle: Path) -> str | None:
    """The decoder engine to run. Every precision ``radtrt export --target trtllm`` builds must be runnable (only
    fp16 was, whatever the bundle held), and with several built none is picked silently."""
    if requested is not None:
        return mode_tag(*split_mode_tag(requested))  # missing or built elsewhere: find_decoder_engine says which
    if len(usable) == 1:
        return usable[0]
    if not usable:
        return None  # find_decoder_engine then says why the engines there do not fit, or how to build one
    fail(f"bundle {bundle} has TensorRT-LLM decoder engines {', '.join(usable)} for this host: choose one with "
         f"--trt-decoder")


def check_engine_limits(prompt_lengths: list[int], max_new_tokens: int, limits: dict[str, Any], *,
                        shorten: tuple[str, int] | None = None, limit: str = "--max-new-tokens") -> None:
    """Refuse what the TensorRT-LLM engine was not built for, before it runs: its runner raises a bare
    ``RuntimeError`` (a traceback) for a prompt or sequence over the build limits. ``shorten`` and ``limit``: as
    ``generate.check_positions`` takes them (what the prompt can be shortened by, the length without it; the
    new-token limit as the caller's user sets it); "shorten --indication" was said to runs that gave none."""
    longest = max(prompt_lengths)
    if longest > limits["max_input_len"]:  # fewer new tokens cannot help
        fix = f"shorten {shorten[0]}" if shorten and shorten[1] <= limits["max_input_len"] else \
            "this engine cannot take it"
        fail(f"the prompt ({longest} positions, with the image) is longer than the TensorRT-LLM engine's prompts "
             f"(up to {limits['max_input_len']} positions): {fix}")
    if longest + max_new_tokens > limits["max_seq_len"]:
        fail(f"the prompt ({longest} positions, with the image) + {max_new_tokens} new tokens exceed the TensorRT-LLM "
             f"engine's sequences (up to {limits['max_seq_len']} positions): {limit} "
             f"{limits['max_seq_len'] - longest} at most for this prompt")


def engine_io_problem(io: dict[str, str], input_name: str, output_name: str) -> str | None:
    """Why an engine's I/O tensors (name -> ``trt.TensorIOMode`` name, from ``num_io_tensors`` /
    ``get_tensor_name`` / ``get_tensor_mode``) do not match the stamp's one input and one output, or None."""
    want = {input_name: "INPUT", output_name: "OUTPUT"}
    if io != want:
        return f"the engine's I/O tensors are {io}, its stamp says {want}"
    return None


def torch_dtype(trt_dtype_name: str, tensor: str) -> torch.dtype:
    """The torch dtype of a ``trt.DataType`` name; a clear refusal for types torch buffers cannot hold."""
    if trt_dtype_name not in TRT_TO_TORCH:
        fail(f"the vision engine's tensor {tensor} has TensorRT type {trt_dtype_name}, which radtrt cannot bind")
    return TRT_TO_TORCH[trt_dtype_name]


class TrtVisionEngine:
    """A deserialized vision engine, run on torch CUDA buffers (batches above the profile are split).

    Runs on a stream of its own: ``execute_async_v3`` on the legacy default stream makes TensorRT 10
    add stream synchronizations (and warn on every call)."""

    def __init__(self, engine_path: Path, stamp: dict[str, Any]) -> None:
        trt = import_vendor("tensorrt", "TensorRT")

        problem = loaded_tensorrt_problem(stamp_gpu(stamp).tensorrt, trt.__version__)
        if problem:
            fail(f"{engine_path}: {problem}")
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            fail(f"TensorRT could not deserialize {engine_path} (see its log above)")
        self.input, self.output = stamp["input"], stamp["output"]
        io = {self.engine.get_tensor_name(i): self.engine.get_tensor_mode(self.engine.get_tensor_name(i)).name
              for i in range(self.engine.num_io_tensors)}
        problem = engine_io_problem(io, self.input, self.output)
        if problem:
            fail(f"{engine_path}: {problem}; rebuild it")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            fail(f"TensorRT could not create an execution context for {engine_path} (GPU memory? see its log above)")
        self.in_dtype = torch_dtype(self.engine.get_tensor_dtype(self.input).name, self.input)
        self.out_dtype = torch_dtype(self.engine.get_tensor_dtype(self.output).name, self.output)
        self.max_batch = int(stamp["profile"]["max"][0])
        self.stream = torch.cuda.Stream()

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        self.stream.wait_stream(torch.cuda.current_stream())  # pixels may come from work queued by the caller
        outs = []
        with torch.cuda.stream(self.stream):  # buffers allocated, filled and read in this stream's order
            for chunk in pixels.split(self.max_batch):
                x = chunk.to("cuda", self.in_dtype).contiguous()
                if not self.context.set_input_shape(self.input, tuple(x.shape)):
                    fail(f"the vision engine does not accept input shape {tuple(x.shape)} (its profile: batch "
                         f"1..{self.max_batch} at the built image size)")
                y = torch.empty(tuple(self.context.get_tensor_shape(self.output)), dtype=self.out_dtype,
                                device="cuda")
                self.context.set_tensor_address(self.input, x.data_ptr())
                self.context.set_tensor_address(self.output, y.data_ptr())
                if not self.context.execute_async_v3(self.stream.cuda_stream):
                    fail("the TensorRT vision engine failed to run (see its log above)")
                outs.append(y)
            out = torch.cat(outs) if len(outs) > 1 else outs[0]
        self.stream.synchronize()  # the caller's stream may use ``out`` at once; a later call waits for it above
        return out


def _sync() -> None:
    """Wait for queued GPU work before reading a clock (a no-op where CUDA was never used)."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def runner_options(session: str, limits: dict[str, Any]) -> dict[str, Any]:
    """``from_dir`` keywords: the C++ executor's KV cache bounded by the engine's limits (``kv_cache_tokens``;
    ``max_tokens_in_paged_kv_cache`` is a ``ModelRunnerCpp.from_dir`` keyword from 0.12 to 1.x), taken after the
    vision engine and before the studies' tensors. The Python session sizes its cache from the limits itself."""
    if session not in ("cpp", "python"):
        fail(f"unknown TensorRT-LLM session '{session}' (cpp, python)")
    if session == "python":
        return {}
    return {"max_tokens_in_paged_kv_cache": kv_cache_tokens(int(limits["max_batch"]), int(limits["max_seq_len"]))}


@contextmanager
def trtllm_errors(doing: str) -> Iterator[None]:
    """TensorRT-LLM reports what it refuses at run time as a bare ``RuntimeError``: the C++ executor's exceptions
    (an engine it cannot deserialize, GPU memory), ``ModelRunnerCpp._check_inputs`` (a batch or length over the
    engine's), and ``_fill_output``'s ``response.error_msg``. One line naming what radtrt was doing, not a
    traceback; its first line is the vendor's reason."""
    try:
        yield
    except RuntimeError as exc:
        reason = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        fail(f"TensorRT-LLM failed {doing}: {reason}")


def open_runner(engine_dir: Path, session: str, limits: dict[str, Any]) -> Any:
    """TensorRT-LLM's C++ runtime (``ModelRunnerCpp``) or its Python session (``ModelRunner``)."""
    options = runner_options(session, limits)
    runtime = import_vendor("tensorrt_llm.runtime", "TensorRT-LLM")
    cls = runtime.ModelRunnerCpp if session == "cpp" else runtime.ModelRunner
    with trtllm_errors(f"to load the engine {engine_dir} (rebuild it if it is damaged)"):
        return cls.from_dir(engine_dir=str(engine_dir), rank=0, **options)


def streams_cheaply(keeps_logits: bool, session: str, trtllm_version: str | None) -> bool:
    """Whether streaming generation costs no more than one call. Before 1.0, ``ModelRunnerCpp.generate`` asks
    for generation logits whenever the engine keeps them (``OutputConfig(return_generation_logits=
    self.gather_generation_logits)``, whatever the caller passed) and every streamed response carries the whole
    ``[beams, max_new_tokens, vocab]`` buffer, which it copies to the GPU: ~33 MB a step at 256 tokens. 1.x
    streams one step's slice."""
    if not keeps_logits or session != "cpp":
        return True
    return trtllm_version is not None and parse_version(trtllm_version) >= (1, 0)


class TensorRTBackend:
    """The ``Backend`` interface over a bundle's TensorRT vision engine and TensorRT-LLM decoder engine."""

    name = "tensorrt"

    def __init__(self, bundle: Path, *, decoder: str | None = None, vision_precision: str | None = None,
                 session: str = "cpp", gpu: GpuInfo | None = None, verify: bool = True) -> None:
        """``decoder``: the TensorRT-LLM engine's mode tag (``fp16``, ``w8a16``, ``w8a8_sq-kv8`` ...); None takes
        the one engine built for this host, and asks for a choice when there are several."""
        gpu = require_gpu(gpu or detect_gpu())  # before hashing gigabytes of bundle on a host that cannot run it
        if gpu.tensorrt_error:  # installed but not loading: engines built for this GPU would match, then not import
            fail(f"the tensorrt backend cannot run here: {tensorrt_problem(gpu)}")
        self.manifest = read_manifest(bundle, verify=verify)
        engine, self.vision_stamp = find_vision_engine(bundle, gpu, vision_precision, self.manifest)
        tag = choose_decoder(usable_engines(bundle, gpu)["decoder"], decoder, bundle)
        self.decoder_dir, self.decoder_stamp = find_decoder_engine(bundle, gpu, tag)
        check_decoder_engine(self.decoder_dir, self.decoder_stamp, self.manifest, bundle, hashes=verify)
        self.limits = self.decoder_stamp["limits"]
        engine_config = read_engine_config(self.decoder_dir)  # before either engine loads onto the GPU
        dtype = engine_config["pretrained_config"]["dtype"] if engine_config is not None else None
        if not isinstance(getattr(torch, str(dtype), None), torch.dtype):  # the prompt table is made in this dtype
            fail(f"{self.decoder_dir / 'config.json'} names no torch dtype (pretrained_config.dtype {dtype!r}): "
                 f"rebuild the engine")
        self.table_dtype = getattr(torch, dtype)
        self.vision = TrtVisionEngine(engine, self.vision_stamp)
        self.runner = open_runner(self.decoder_dir, session, self.limits)
        self.streams_cheaply = streams_cheaply(self.keeps_logits, session, gpu.tensorrt_llm)
        self.vocab_size = int(self.manifest["decoder"]["vocab_size"])
        self.num_image_tokens = int(self.manifest["vision"]["num_image_tokens"])
        decoder_tag = mode_tag(self.decoder_stamp["mode"], self.decoder_stamp["int8_kv"])
        self.precision = f"{self.vision_stamp['precision']}+{decoder_tag}"

    @property
    def keeps_logits(self) -> bool:
        """Whether the decoder engine returns each step's logits (built with ``--gather_generation_logits``)."""
        return bool(self.decoder_stamp.get("gather_generation_logits"))

    @property
    def weights_id(self) -> str:
        return str(self.manifest["model"].get(BUNDLE_FINGERPRINT, "unknown"))

    def check_length(self, prompt_length: int, max_new_tokens: int, *,
                     shorten: tuple[str, int] | None = None) -> None:
        check_engine_limits([prompt_length], max_new_tokens, self.limits, shorten=shorten)  # tighter than the
        # model's positions

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision(pixel_values)

    def embed_prompt(self, input_ids: list[int], image_embeds: torch.Tensor) -> PromptTableInput:
        if image_embeds.shape[0] != self.num_image_tokens:
            fail(f"expected {self.num_image_tokens} image tokens, got {image_embeds.shape[0]}")
        return PromptTableInput(fake_prompt_ids(input_ids, self.num_image_tokens, self.vocab_size),
                                image_embeds.to(self.table_dtype))

    def generate(self, embeds: list[PromptTableInput], *, max_new_tokens: int, eos_token_id: int,
                 keep_logits: bool = False) -> Generation:
        if max_new_tokens < 1:
            return Generation([[] for _ in embeds])
        check_engine_limits([len(p.input_ids) for p in embeds], max_new_tokens, self.limits)
        size = int(self.limits["max_batch"])
        if len(embeds) <= size:
            return self._generate(embeds, max_new_tokens, eos_token_id, keep_logits)
        # more studies than the engine's batch: in engine-sized chunks, as the vision engine splits its batches
        parts = [(list(range(i, min(i + size, len(embeds)))),
                  self._generate(embeds[i:i + size], max_new_tokens, eos_token_id, keep_logits))
                 for i in range(0, len(embeds), size)]
        return Generation.merged(len(embeds), parts, keep_logits=keep_logits)

    def _generate(self, embeds: list[PromptTableInput], max_new_tokens: int, eos_token_id: int,
                  keep_logits: bool) -> Generation:
        ids, table, tasks = batch_prompt_tables(embeds)
        if table.is_cuda:  # the stack (and the dtype cast) are queued on this stream; the executor reads on its own
            torch.cuda.current_stream().synchronize()
        args = dict(batch_input_ids=[torch.tensor(x, dtype=torch.int32) for x in ids], prompt_table=table,
                    prompt_tasks=tasks, max_new_tokens=max_new_tokens, end_id=eos_token_id, pad_id=max(eos_token_id, 0),
                    num_beams=1, top_k=1, temperature=1.0, output_sequence_lengths=True, return_dict=True)
        lengths = [len(x) for x in ids]
        t0 = time.perf_counter()
        if keep_logits:  # needs an engine built with --gather_generation_logits
            if not self.keeps_logits:
                fail("the TensorRT-LLM engine was built without generation logits (--gather_generation_logits); "
                     "rebuild it with 'radtrt export --bundle B --model M --target trtllm --trtllm-logits'")
            with trtllm_errors("to generate"):  # the runner's calls only: radtrt's own errors stay what they are
                out = self.runner.generate(**args, output_generation_logits=True)
                _sync()
            total = (time.perf_counter() - t0) * 1e3
            tokens = generated_tokens(out["output_ids"], out["sequence_lengths"], lengths, eos_token_id)
            # [B, beams, max_new_tokens, padded vocab] (ModelRunner): beam 0, the real vocabulary
            logits = out["generation_logits"][:, 0, :, :self.vocab_size].float().cpu()
            return Generation(tokens, prefill_ms=0.0, decode_ms=total, logits=logits)
        if not self.streams_cheaply:  # one call, as the parity path: the first token cannot be timed apart
            with trtllm_errors("to generate"):
                out = self.runner.generate(**args)
                _sync()
            tokens = generated_tokens(out["output_ids"], out["sequence_lengths"], lengths, eos_token_id)
            return Generation(tokens, prefill_ms=0.0, decode_ms=(time.perf_counter() - t0) * 1e3)
        first_ms, last = None, None
        with trtllm_errors("to generate"):  # a streamed response's error is raised as it is read
            for step in self.runner.generate(**args, streaming=True):  # first yield: prompt + first token
                if first_ms is None:
                    _sync()
                    first_ms = (time.perf_counter() - t0) * 1e3
                last = step
            _sync()
        total = (time.perf_counter() - t0) * 1e3
        if last is None:
            fail("TensorRT-LLM returned no output")
        tokens = generated_tokens(last["output_ids"], last["sequence_lengths"], lengths, eos_token_id)
        return Generation(tokens, prefill_ms=first_ms or 0.0, decode_ms=total - (first_ms or 0.0))
