"""The ONNX Runtime backend: a bundle's vision and decoder graphs behind the ``Backend`` interface.

Generation keeps one preallocated key and value buffer per layer for the whole request and binds
them to the decoder with I/O binding, so nothing grows or is concatenated per step. A decoder with
fused attention (``radtrt.exporter.gqa``, the default) writes its own buffers in place (past and
present bound to one ``OrtValue``, fp32/fp16 or int8); it takes positions from the cache slots, so
studies are batched only with others of the same prompt length (all of them, with one prompt
template). A plain decoder (``--attention plain``, ``radtrt.exporter.onnx``) only reads the buffers;
the new keys/values of each step are written into them here, and left padding lets any prompts share
a batch.
"""

from __future__ import annotations

import contextlib
import functools
import sys

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from radtrt.errors import fail, shell_quote
from radtrt.exporter.bundle import BUNDLE_FINGERPRINT, MODEL_CONFIG, REEXPORT, load_embedding_table, read_manifest
from radtrt.exporter.gqa import SEQLENS, io_names as gqa_io_names
from radtrt.exporter.onnx import decoder_io_names
from radtrt.model.generate import Generation, check_positions
from radtrt.model.io import read_json
from radtrt.model.prompt import IMAGE_TOKEN_INDEX
from radtrt.outputs import make_dir

ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int8)": "int8"}
# what each precision's vision graph takes: an INT8 one quantizes its fp32 pixels itself (Q/DQ)
VISION_INPUT = {"fp32": "tensor(float)", "fp16": "tensor(float16)", "int8": "tensor(float)"}
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


def available_providers() -> list[str]:
    import onnxruntime as ort

    return ort.get_available_providers()


def provider_list(provider: str, trt_cache: Path | None = None) -> list[Any]:
    """ORT providers, most preferred first, with CPU always last as the fallback for unsupported ops."""
    if provider not in PROVIDERS:
        fail(f"unknown ONNX Runtime provider '{provider}' (auto, {', '.join(PROVIDERS)})")
    name = PROVIDERS[provider]
    if name not in available_providers():
        fail(f"ONNX Runtime here has no {name} (available: {', '.join(available_providers())}); "
             f"install onnxruntime-gpu on a GPU host, or run ONNX Runtime on the CPU: --ort-provider cpu without "
             f"--device cuda (or leave both at their defaults)")
    chain: list[Any] = []
    if provider == "tensorrt":
        opts = {"trt_fp16_enable": True, "trt_engine_cache_enable": trt_cache is not None}
        if trt_cache is not None:
            make_dir(trt_cache, "--trt-cache folder")
            opts |= {"trt_engine_cache_path": str(trt_cache), "trt_timing_cache_enable": True,
                     "trt_timing_cache_path": str(trt_cache)}
        chain.append((name, opts))
    if provider in ("tensorrt", "cuda"):
        chain.append(PROVIDERS["cuda"])
    chain.append(PROVIDERS["cpu"])
    return chain


def _load_errors() -> tuple[type[Exception], ...]:
    """ONNX Runtime's own exception types for a graph it cannot load (they derive from Exception only)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = ("Fail", "InvalidGraph", "InvalidProtobuf", "NoSuchFile", "NotImplemented", "InvalidArgument",
             "RuntimeException", "EPFail")
    return tuple(getattr(state, n) for n in names if hasattr(state, n)) + (RuntimeError, ValueError)


def _linked_out(path: Path) -> str | None:
    """Why ONNX Runtime will refuse ``path``'s external data, or None: it resolves the link and refuses a file
    outside the graph's folder ("External data path escapes model directory"), which a bundle copied with its
    ``.onnx.data`` files as symbolic links to the original has."""
    data = path.with_name(path.name + ".data")
    if not data.is_symlink():
        return None
    target = data.resolve()
    if target.is_relative_to(path.resolve().parent):
        return None
    return (f"{data} is a symbolic link out of the bundle folder (to {target}), which ONNX Runtime refuses to read: "
            f"copy the bundle with real files, e.g. cp -rL {shell_quote(str(path.parent))} NEW_FOLDER")


def _session(path: Path, providers: list[Any], threads: int | None, spin: bool = False, prepack: bool = True) -> Any:
    import onnxruntime as ort

    linked = _linked_out(path)
    if linked:
        fail(linked)

    opts = ort.SessionOptions()
    # Fatal only, as in the provider probe: a graph that fails to load (a damaged external-data file) printed
    # ONNX Runtime's coloured "[E:onnxruntime:...]" lines before radtrt's one line, which says the same. The
    # session logger carries nothing else radtrt relies on: the provider-fallback banner is print()ed and the
    # provider-creation warnings go to ONNX Runtime's default logger, so both still reach stderr.
    opts.log_severity_level = 4
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Off by default: busy-waiting worker threads halve decode speed when any other process shares the
    # cores (measured: 171.9 -> 86.9 ms/token on the 2-core CI-class machine under load). On a machine
    # that does nothing else they save each operator's thread wake-up: INT8 decode, dozens of short
    # operators per token, measured 1.23x faster (12.3 -> 10.0 ms/token, mid-size, 2 cores); fp32 decode
    # no faster. ``--ort-spin`` turns it on, for the duration of each run only: the threads stop spinning
    # when a run returns, so they do not burn the cores between decode steps' Python work or between
    # studies (within a run: same speed; with another process busy: 24.3 -> 21.0 ms/token, INT8 decode).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    if spin:
        opts.add_session_config_entry("session.force_spinning_stop", "1")
    if not prepack:  # the weights stay memory-mapped instead of copied into packed layouts (one-off runs)
        opts.add_session_config_entry("session.disable_prepacking", "1")
    if threads:
        opts.intra_op_num_threads = threads
    try:
        # ONNX Runtime prints its provider-fallback banner ("EP Error ...") with print(): on stdout it would break
        # the --json stream, which holds results only
        with contextlib.redirect_stdout(sys.stderr):
            session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except _load_errors() as e:
        fail(f"ONNX Runtime cannot load {path.name}: {str(e).splitlines()[0]}")
    check_started(session.get_providers(), providers, path.name)
    return session


def _name(provider: Any) -> str:
    return provider[0] if isinstance(provider, tuple) else provider


def check_started(started: list[str], requested: list[Any], what: str) -> None:
    """ONNX Runtime falls back to the CPU when a GPU provider it was built with cannot start (no driver, a
    missing CUDA or cuDNN library), printing a banner and carrying on: the run then said "provider cuda" and
    ran on the CPU."""
    wanted = _name(requested[0])
    if started[:1] != [wanted]:
        other = "--ort-provider cuda, or " if started[0] == PROVIDERS["cuda"] else ""  # TensorRT's libraries missing
        fail(f"ONNX Runtime could not start its {wanted} for {what} and fell back to {', '.join(started)} (its "
             f"message is above): check the GPU driver and the libraries onnxruntime-gpu needs, or run with "
             f"{other}--ort-provider cpu")


def usable_providers() -> list[str]:
    """The providers that start here: the GPU ones each probed (``provider_starts``), the rest as built in."""
    gpu = {PROVIDERS["cuda"], PROVIDERS["tensorrt"]}
    return [p for p in available_providers() if p not in gpu or provider_starts(p)]


@functools.cache  # a process probes each provider once: a TensorRT probe builds an engine
def provider_starts(name: str) -> bool:
    """Whether ``name`` starts here, on a one-node graph: ``get_available_providers`` lists what onnxruntime
    was built with, so onnxruntime-gpu lists CUDA on a host without a GPU."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    if name not in available_providers():
        return False
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8  # what every onnxruntime radtrt supports reads
    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # the probe's own fallback warning is not the user's concern
    try:
        with contextlib.redirect_stdout(sys.stderr):
            session = ort.InferenceSession(model.SerializeToString(), sess_options=opts,
                                           providers=list(dict.fromkeys([name, PROVIDERS["cpu"]])))
    except _load_errors():  # the provider failed outright: it does not start
        return False
    return session.get_providers()[:1] == [name]


# Decoder ops whose CPU kernels make a row's result depend on the rest of the batch: SmoothQuant's activations are
# quantized with one scale per call over the whole [batch, tokens, hidden] tensor (2 of 6 phantom reports changed
# with their neighbours), and weight-only INT8's MatMulNBits tiles the flattened batch x tokens rows, so a study's
# logits moved by ~1e-6 with its place in the batch and a near-tie flipped a token 175 steps in
BATCH_DEPENDENT_OPS = ("DynamicQuantizeLinear", "MatMulNBits")


def depends_on_batch(graph: Path) -> bool:
    """Whether a decoder graph holds an op whose results for one study depend on the others batched with it (INT8,
    ``BATCH_DEPENDENT_OPS``); fp32 and fp16 graphs gave bit-identical logits batched and alone. The graph alone is
    read, not its weights."""
    import onnx

    nodes = onnx.load(str(graph), load_external_data=False).graph.node
    return any(node.op_type in BATCH_DEPENDENT_OPS for node in nodes)


class OrtBackend:
    """A bundle run by ONNX Runtime behind the torch backend's interface: the bundle is verified against its
    manifest first, and generation keeps its KV cache in preallocated buffers bound to the sessions (I/O
    binding), so a decode step copies no cache."""

    name = "onnxruntime"

    def __init__(self, bundle: Path, *, provider: str = "cpu", trt_cache: Path | None = None,
                 threads: int | None = None, spin: bool = False, verify: bool = True, prepack: bool = True) -> None:
        """``prepack=False``: ONNX Runtime keeps no packed copy of each weight matrix, about the decoder's
        size less memory for slower large products; for one-off runs such as the export check."""
        self.manifest = read_manifest(bundle, verify=verify)
        self.bundle = bundle
        self.precision = self.manifest["precision"]
        self.provider = provider
        providers = provider_list(provider, trt_cache)
        self.spin = spin
        self.vision = _session(bundle / "vision.onnx", providers, threads, spin, prepack)
        self.decoder = _session(bundle / "decoder.onnx", providers, threads, spin, prepack)
        dec = self.manifest["decoder"]
        self.table = load_embedding_table(bundle, (dec["vocab_size"], dec["hidden_size"]))
        size = self.manifest["vision"]["image_size"]
        if self.vision.get_inputs()[0].shape[2:] != [size, size]:
            fail(f"{bundle / 'vision.onnx'} takes {self.vision.get_inputs()[0].shape[2:]} pixels, the manifest says "
                 f"{size}", remedy=REEXPORT)
        self.num_layers, self.num_kv, self.head_dim = dec["num_layers"], dec["num_kv_heads"], dec["head_dim"]
        self.input_names, self.output_names = decoder_io_names(self.num_layers)
        self.dtype = self.table.dtype
        embeds_type = next((i.type for i in self.decoder.get_inputs() if i.name == "inputs_embeds"), None)
        if (self.precision == "fp16") != (embeds_type == "tensor(float16)"):  # reports and logs name the precision
            fail(f"{bundle}/manifest.json says precision {self.precision}, but decoder.onnx takes "
                 f"{ORT_TYPES.get(embeds_type, embeds_type)} embeddings", remedy=REEXPORT)
        pixels_type = self.vision.get_inputs()[0].type  # a vision graph of another precision failed at its first run
        if pixels_type != VISION_INPUT[self.precision]:
            fail(f"{bundle}/manifest.json says precision {self.precision}, but vision.onnx takes "
                 f"{ORT_TYPES.get(pixels_type, pixels_type)} pixels (an {self.precision} bundle's takes "
                 f"{ORT_TYPES[VISION_INPUT[self.precision]]})", remedy=REEXPORT)
        self.fused = self._check_decoder_io(bundle, dec["attention"])
        # an INT8 decoder's report must not change with its neighbours (``BATCH_DEPENDENT_OPS``); read from the
        # graph, not the manifest's INT8 record, which is not hashed: emptying it made a SmoothQuant bundle's
        # batches decode together
        self.per_study = self.precision == "int8" and depends_on_batch(bundle / "decoder.onnx")
        past_type = next((i.type for i in self.decoder.get_inputs() if i.name == "past_key.0"), None)
        if past_type not in ORT_TYPES:
            fail(f"{bundle / 'decoder.onnx'} has no past_key.0 input of a KV-cache type radtrt knows ({past_type})",
                 remedy=f"{REEXPORT} with this radtrt")
        self.kv_dtype = np.dtype(ORT_TYPES[past_type])
        # every backend refuses to generate past the model's positions (GroupQueryAttention's rotary tables end there)
        self.max_positions = read_json(bundle / MODEL_CONFIG)["decoder"]["max_position_embeddings"]

    def _check_decoder_io(self, bundle: Path, attention: str) -> bool:
        """Whether the decoder graph has fused attention, from the graph itself: generation binds every input and
        output by name, so a graph whose names are not those the manifest's attention kind has (a decoder copied
        in from another bundle) ended in an ONNX Runtime binding traceback."""
        fused = attention == "fused"
        inputs, outputs = gqa_io_names(self.num_layers) if fused else decoder_io_names(self.num_layers)
        got = ({i.name for i in self.decoder.get_inputs()}, {o.name for o in self.decoder.get_outputs()})
        if got != (set(inputs), set(outputs)):
            layers = sum(n.startswith("past_key.") for n in got[0])
            kind = "fused" if SEQLENS in got[0] else "plain" if "position_ids" in got[0] else None
            theirs = f"another decoder's ({kind} attention, {layers} layers)" if kind and layers else "no radtrt decoder's"
            fail(f"{bundle / 'decoder.onnx'} does not match its manifest ({attention} attention, {self.num_layers} "
                 f"layers): the graph's inputs and outputs are {theirs}", remedy=REEXPORT)
        return fused

    @property
    def weights_id(self) -> str:
        return str(self.manifest["model"].get(BUNDLE_FINGERPRINT, "unknown"))

    def check_length(self, prompt_length: int, max_new_tokens: int, *,
                     shorten: tuple[str, int] | None = None) -> None:
        check_positions(prompt_length, max_new_tokens, self.max_positions, shorten=shorten)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = pixel_values.detach().cpu().numpy().astype(self.dtype, copy=False)
        return torch.from_numpy(self.vision.run(None, {"pixel_values": x})[0])

    def embed_prompt(self, input_ids: list[int], image_embeds: torch.Tensor) -> torch.Tensor:
        if input_ids.count(IMAGE_TOKEN_INDEX) != 1:
            fail(f"the prompt must contain exactly one <image> placeholder, found {input_ids.count(IMAGE_TOKEN_INDEX)}")
        pos = input_ids.index(IMAGE_TOKEN_INDEX)
        parts = [self.table[input_ids[:pos]], image_embeds.detach().cpu().numpy().astype(self.dtype, copy=False),
                 self.table[input_ids[pos + 1:]]]
        return torch.from_numpy(np.concatenate(parts, axis=0))

    def _step(self, binding: Any, embeds: np.ndarray, positions: np.ndarray, past_mask: np.ndarray,
              new_mask: np.ndarray, past: list[Any]) -> list[np.ndarray]:
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        for name, value in zip(self.input_names[:4], (embeds, positions, past_mask, new_mask)):
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name, value in zip(self.input_names[4:], past):
            binding.bind_ortvalue_input(name, value)
        for name in self.output_names:
            binding.bind_output(name, "cpu")
        self.decoder.run_with_iobinding(binding)
        return [v.numpy() for v in binding.get_outputs()]

    def generate(self, embeds: list[torch.Tensor], *, max_new_tokens: int, eos_token_id: int,
                 keep_logits: bool = False) -> Generation:
        if max_new_tokens < 1:
            return Generation([[] for _ in embeds])
        check_positions(max(e.shape[0] for e in embeds), max_new_tokens, self.max_positions)  # before any buffer
        if self.per_study and len(embeds) > 1:  # each alone: its tokens must not depend on the batch
            return self._in_groups(embeds, [[i] for i in range(len(embeds))], max_new_tokens, eos_token_id,
                                   keep_logits)
        if self.fused:  # GQA has no left padding: batches of equal prompt length, each from cache slot 0
            groups: dict[int, list[int]] = {}
            for i, e in enumerate(embeds):
                groups.setdefault(e.shape[0], []).append(i)
            return self._in_groups(embeds, list(groups.values()), max_new_tokens, eos_token_id, keep_logits)
        return self._generate_plain(embeds, max_new_tokens, eos_token_id, keep_logits)

    def _generate_plain(self, embeds: list[torch.Tensor], max_new_tokens: int, eos_token_id: int,
                        keep_logits: bool) -> Generation:
        """One batch, prompts left-padded to the longest, over caller-owned KV buffers."""
        import onnxruntime as ort

        batch, length = len(embeds), max(e.shape[0] for e in embeds)
        hidden = embeds[0].shape[-1]
        x = np.zeros((batch, length, hidden), dtype=self.dtype)
        valid = np.zeros((batch, length), dtype=bool)
        for i, e in enumerate(embeds):
            x[i, length - e.shape[0]:] = e.detach().cpu().numpy()
            valid[i, length - e.shape[0]:] = True
        total = length + max_new_tokens
        shape = (batch, self.num_kv, total, self.head_dim)
        buffers = [np.zeros(shape, dtype=self.dtype) for _ in range(2 * self.num_layers)]
        bound = [ort.OrtValue.ortvalue_from_numpy(b) for b in buffers]  # shares the numpy memory
        empty = [ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, self.num_kv, 0, self.head_dim), self.dtype))
                 for _ in buffers]
        past_mask = np.zeros((batch, total), dtype=bool)
        binding = self.decoder.io_binding()

        t0 = time.perf_counter()
        positions = np.clip(valid.cumsum(-1) - 1, 0, None).astype(np.int64)
        outputs = self._step(binding, x, positions, np.zeros((batch, 0), bool), valid, empty)
        for buf, new in zip(buffers, outputs[1:]):
            buf[:, :, :length] = new
        past_mask[:, :length] = valid
        logits = outputs[0]
        kept: list[np.ndarray] | None = [] if keep_logits else None
        next_pos = positions[:, -1:] + 1
        t1 = time.perf_counter()
        ones = np.ones((batch, 1), dtype=bool)

        def advance(token: np.ndarray, step: int) -> np.ndarray:
            outputs = self._step(binding, self.table[token][:, None], next_pos + step, past_mask, ones, bound)
            slot = length + step
            for buf, new in zip(buffers, outputs[1:]):
                buf[:, :, slot] = new[:, :, 0]
            past_mask[:, slot] = True
            return outputs[0]

        out = _greedy(logits, advance, max_new_tokens, eos_token_id, kept)
        t2 = time.perf_counter()
        return Generation(out, prefill_ms=(t1 - t0) * 1e3, decode_ms=(t2 - t1) * 1e3, logits=_stacked(kept))

    def attention_note(self) -> str | None:
        """Where a fused attention cannot run on the chosen provider: ONNX Runtime's CUDA kernel takes
        fp16 queries only, so an fp32 or INT8 bundle's attention falls back to the CPU there."""
        if self.fused and self.provider != "cpu" and self.dtype != np.float16:
            return (f"this {self.precision} bundle's fused attention (GroupQueryAttention) has no CUDA kernel in ONNX "
                    f"Runtime and runs on the CPU; for the GPU export --precision fp16, or --attention plain")
        return None

    def _cache_buffer(self, shape: tuple[int, ...]) -> Any:
        """One fused decoder's KV buffer: on the GPU where the fused attention runs there (fp16 bundles under
        the CUDA/TensorRT providers; not run here, no GPU), so no step copies the cache between host and
        device; in host memory otherwise."""
        import onnxruntime as ort

        if self.provider != "cpu" and self.attention_note() is None:
            return ort.OrtValue.ortvalue_from_shape_and_type(shape, self.kv_dtype, "cuda", 0)
        return ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, self.kv_dtype))

    def _in_groups(self, embeds: list[torch.Tensor], groups: list[list[int]], max_new_tokens: int,
                   eos_token_id: int, keep_logits: bool) -> Generation:
        """Each group of studies generated as a batch of its own, the results put back in the order given."""
        parts = [(members, self._generate_fused_batch(np.stack([embeds[i].detach().cpu().numpy() for i in members]),
                                                      max_new_tokens, eos_token_id, keep_logits) if self.fused else
                  self._generate_plain([embeds[i] for i in members], max_new_tokens, eos_token_id, keep_logits))
                 for members in groups]
        return Generation.merged(len(embeds), parts, keep_logits=keep_logits)

    def _generate_fused_batch(self, x: np.ndarray, max_new_tokens: int, eos_token_id: int,
                              keep_logits: bool) -> Generation:
        inputs, outputs = gqa_io_names(self.num_layers)
        batch, length = x.shape[:2]
        check_positions(length, max_new_tokens, self.max_positions)
        shape = (batch, self.num_kv, length + max_new_tokens, self.head_dim)
        buffers = [self._cache_buffer(shape) for _ in range(2 * self.num_layers)]
        binding = self.decoder.io_binding()
        binding.bind_output(outputs[0], "cpu")  # first: get_outputs() lists outputs in binding order
        for name, value in zip(inputs[3:], buffers):  # bound once for the whole generation
            binding.bind_ortvalue_input(name, value)
        for name, value in zip(outputs[1:], buffers):  # the same buffers: written in place
            binding.bind_ortvalue_output(name, value)

        def step(x: np.ndarray, total: int) -> np.ndarray:  # rebinding a name replaces its value
            binding.bind_cpu_input(inputs[0], np.ascontiguousarray(x, dtype=self.dtype))
            binding.bind_cpu_input(inputs[1], np.full(batch, total - 1, np.int32))
            binding.bind_cpu_input(inputs[2], np.array(total, np.int32))
            self.decoder.run_with_iobinding(binding)
            return binding.get_outputs()[0].numpy()

        t0 = time.perf_counter()
        logits = step(x, length)
        kept: list[np.ndarray] | None = [] if keep_logits else None
        t1 = time.perf_counter()
        out = _greedy(logits, lambda token, i: step(self.table[token][:, None], length + i + 1), max_new_tokens,
                      eos_token_id, kept)
        t2 = time.perf_counter()
        return Generation(out, prefill_ms=(t1 - t0) * 1e3, decode_ms=(t2 - t1) * 1e3, logits=_stacked(kept))


def _greedy(logits: np.ndarray, advance: Callable[[np.ndarray, int], np.ndarray], max_new_tokens: int,
            eos_token_id: int, kept: list[np.ndarray] | None = None) -> list[list[int]]:
    """Greedy tokens from the prefill's logits; ``advance(token, step)`` runs one decode step. A finished
    row keeps stepping with the others (its tokens are dropped) until every row is done. ``kept``: receives
    a copy of every step's logits (the binding's output buffer is reused by the next step)."""
    batch = logits.shape[0]
    out: list[list[int]] = [[] for _ in range(batch)]
    done = np.zeros(batch, dtype=bool)
    for step in range(max_new_tokens):
        if kept is not None:
            kept.append(np.array(logits, dtype=np.float32))
        token = logits.argmax(-1)
        for row in range(batch):
            if not done[row] and token[row] != eos_token_id:
                out[row].append(int(token[row]))
        done |= token == eos_token_id
        if done.all() or step == max_new_tokens - 1:
            break
        logits = advance(token, step)
    return out


def _stacked(kept: list[np.ndarray] | None) -> torch.Tensor | None:
    """``_greedy``'s kept steps as ``Generation.logits`` (``[B, steps, V]``)."""
    return None if kept is None else torch.from_numpy(np.stack(kept, axis=1))
