"""The ``trtllm-build`` step on the target GPU: weight-only INT8 rearranged for that GPU's kernels, the
build command, and the stamped engine directory that ``find_decoder_engine`` matches against a host.

The checkpoint itself is written anywhere, without TensorRT-LLM (``radtrt.exporter.trtllm``)."""

from __future__ import annotations

import inspect
import json
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from radtrt import __version__
from radtrt.errors import fail, shell_quote
from radtrt.exporter.gpu import (
    GpuInfo,
    check_trtllm,
    refuse_missing_engine,
    engine_key,
    gpu_stamp,
    import_vendor,
    newest_first,
    read_stamp,
    same_gpu,
    stamp_mismatch,
)
from radtrt.exporter.trtllm import (
    BUILD_STAMP,
    DTYPES,
    META,
    mode_tag,
    read_checkpoint,
    split_mode_tag,
)
from radtrt.model.io import read_json, save_tensors, sha256_file
from radtrt.outputs import write_text

# Oldest GPU the Python port of the preprocessing handles (it asserts ``sm_ >= 75``); the C++ op also
# knows Volta's layout (cutlass_preprocessors.cpp: getLayoutDetailsForArch<cutlass::arch::Sm70>).
PY_PREPROCESS_MIN_SM = (7, 5)


def mixed_gemm_preprocessor(op: Callable[..., torch.Tensor] | None, py_fn: Callable[..., torch.Tensor] | None,
                            sm: tuple[int, int], op_arity: int = 3) -> Callable[[torch.Tensor], torch.Tensor]:
    """Choose TensorRT-LLM's rearrangement of row-major int8 ``[in, out]`` weights for its weight-only GEMM.

    Pure (the candidates are passed in) so the choice is tested without TensorRT-LLM. Why this order:

    * ``op`` = ``torch.ops.trtllm.preprocess_weights_for_mixed_gemm(weight, quant_type, activation_type)``,
      the C++ op TensorRT-LLM's own converters use. It is registered in every target version (0.12 through
      1.x) and lays weights out for the GPU it runs on, Volta included, so it is preferred.
    * ``py_fn`` = ``tensorrt_llm.quantization.functional.preprocess_weights_for_mixed_gemm`` is *not* one
      function across versions: 0.12 has none, 0.13-0.14 have a two-argument helper that only
      transposes int8 weights (no interleaving or bias, so the plugin would read garbage); later it is a
      Python port of the op taking ``act_dtype`` that asserts sm >= 75. It is only a fallback, and only
      in its port form on Turing or newer.

    The activation type is float16 as in TensorRT-LLM's own int8 calls: the W8A16 layout is the same for
    fp16 and bf16 activations. ``op_arity`` is how many arguments the op's schema declares: older builds
    registered it as ``(row_major_quantized_weight, quant_type)``, before the activation type was added for
    the W4A8 kernels; called with three there, it raised a bare RuntimeError (a traceback) mid-export.
    """
    if op is not None:
        if op_arity == 2:
            return lambda w: op(w, torch.int8)
        if op_arity != 3:
            fail(f"this TensorRT-LLM's torch.ops.trtllm.preprocess_weights_for_mixed_gemm takes {op_arity} "
                 f"arguments, not the (weight, quant_type[, activation_type]) radtrt knows; use TensorRT-LLM "
                 f"0.12-0.14 (or 1.x)")
        return lambda w: op(w, torch.int8, torch.float16)
    if py_fn is None:
        fail("TensorRT-LLM provides no preprocess_weights_for_mixed_gemm (neither torch.ops.trtllm nor "
             "tensorrt_llm.quantization.functional); is tensorrt_llm installed correctly?")
    try:
        params = inspect.signature(py_fn).parameters
    except (TypeError, ValueError):
        params = {}
    if "act_dtype" not in params:
        fail("this TensorRT-LLM has no torch.ops.trtllm.preprocess_weights_for_mixed_gemm, and its Python "
             "preprocess_weights_for_mixed_gemm is the transpose-only helper, not the kernel layout; "
             "weight-only INT8 cannot be prepared with it")
    if sm < PY_PREPROCESS_MIN_SM:
        fail(f"TensorRT-LLM's Python weight preprocessing needs sm75 or newer and its C++ op is missing; "
             f"cannot prepare weight-only INT8 for sm{sm[0]}{sm[1]}")
    return lambda w: py_fn(w, torch.int8, torch.float16)


def trtllm_mixed_gemm_preprocessor(gpu: GpuInfo) -> Callable[[torch.Tensor], torch.Tensor]:
    """TensorRT-LLM's weight rearrangement for *this* GPU (see ``mixed_gemm_preprocessor``)."""
    import_vendor("tensorrt_llm", "TensorRT-LLM")  # importing it loads libth_common, which registers torch.ops.trtllm

    try:
        op = torch.ops.trtllm.preprocess_weights_for_mixed_gemm
    except (AttributeError, RuntimeError):
        op, arity = None, 3
    else:
        try:
            arity = len(op.default._schema.arguments)
        except (AttributeError, RuntimeError):  # no single overload to read: the form every target version has
            arity = 3
    try:
        import tensorrt_llm.quantization.functional as functional

        py_fn = getattr(functional, "preprocess_weights_for_mixed_gemm", None)
    except ImportError:
        py_fn = None
    return mixed_gemm_preprocessor(op, py_fn, gpu.sm, arity)


def prepare_checkpoint_for_host(plain: Path, out_dir: Path, gpu: GpuInfo,
                                preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Path:
    """Plain W8A16 checkpoint -> the layout TensorRT-LLM's kernels expect on ``gpu`` (run on that GPU)."""
    config, meta, tensors = read_checkpoint(plain)
    if meta["weight_layout"] != "plain":
        fail(f"{plain} is already in TensorRT-LLM's layout; build it directly")
    fn = preprocess or trtllm_mixed_gemm_preprocessor(gpu)
    prepared = {}
    for name, t in tensors.items():
        if name.endswith(".weight") and t.dtype == torch.int8:
            t = fn(t.contiguous())
            if t.dtype != torch.int8 or t.shape != tensors[name].shape:
                fail(f"TensorRT-LLM's weight preprocessing changed {name} to {t.dtype} {tuple(t.shape)}")
        prepared[name] = t
    out_dir.mkdir(parents=True, exist_ok=True)
    save_tensors(prepared, out_dir / "rank0.safetensors")
    write_text(out_dir / "config.json", json.dumps(config, indent=2), "TensorRT-LLM checkpoint config")
    meta = meta | {"weight_layout": f"trtllm-mixed-gemm-{gpu.sm_tag}", "needs_host_preprocessing": False,
                   "prepared_for": gpu_stamp(gpu), "prepared_from": str(plain)}
    write_text(out_dir / META, json.dumps(meta, indent=2), "TensorRT-LLM checkpoint metadata")
    return out_dir


KV_BLOCK_TOKENS = 64  # the paged KV cache's block in 0.12-0.14 (1.x: 32, which divides it)


def kv_cache_tokens(max_batch: int, max_seq_len: int) -> int:
    """The paged KV cache an engine's limits can use: whole blocks per sequence, for the whole batch. Given to
    the runtime (``max_tokens_in_paged_kv_cache``) in place of TensorRT-LLM's default, 90% of the GPU memory free
    when it loads, which on a Jetson (GPU and CPU share the memory) is most of the system's RAM."""
    return max_batch * -(-max_seq_len // KV_BLOCK_TOKENS) * KV_BLOCK_TOKENS


DECODER_STAMP_FORMAT = "radtrt-trtllm-engine"
DECODER_STAMP_KEYS = ("mode", "int8_kv", "gpu", "limits")  # what the lookups and the runtime read
DEFAULT_TEXT_TOKENS, DEFAULT_NEW_TOKENS = 512, 256


@dataclass(frozen=True)
class BuildLimits:
    """Engine limits: prompts are the image tokens plus the text around them."""

    max_batch: int
    max_input_len: int
    max_seq_len: int
    num_image_tokens: int

    @classmethod
    def for_llava(cls, num_image_tokens: int, *, max_batch: int = 8, max_text_tokens: int | None = None,
                  max_new_tokens: int | None = None, max_position_embeddings: int = 4096) -> "BuildLimits":
        """Room for the image, the prompt text (default 512 tokens) and the new tokens (default 256). A decoder
        with fewer positions (the embedded default model has 512) gets defaults cut to what is left after the
        image, shared between the two, instead of limits it can never build; given values are kept as given
        (and refused when they do not fit)."""
        room = max_position_embeddings - num_image_tokens
        new = max_new_tokens if max_new_tokens is not None else min(DEFAULT_NEW_TOKENS, max(room // 2, 1))
        text = max_text_tokens if max_text_tokens is not None else min(DEFAULT_TEXT_TOKENS, room - new)
        limits = cls(max_batch, num_image_tokens + text, num_image_tokens + text + new, num_image_tokens)
        limits.check(max_position_embeddings)
        return limits

    def check(self, max_position_embeddings: int) -> None:
        if self.max_batch < 1:
            fail("max batch size must be at least 1")
        if self.max_input_len <= self.num_image_tokens:
            fail(f"max input length {self.max_input_len} leaves no room for text after "
                 f"{self.num_image_tokens} image tokens")
        if not self.max_input_len < self.max_seq_len <= max_position_embeddings:
            fail(f"max sequence length {self.max_seq_len} must exceed the max input length {self.max_input_len} "
                 f"and fit the decoder's {max_position_embeddings} positions")

    @property
    def max_multimodal_len(self) -> int:
        return self.max_batch * self.num_image_tokens


def trtllm_build_command(checkpoint_dir: Path, engine_dir: Path, gpu: GpuInfo, limits: BuildLimits, *,
                         dtype: str = "float16", gather_generation_logits: bool = False,
                         workers: int = 1) -> list[str]:
    """The ``trtllm-build`` command line (options present from 0.12 through 1.x); quantization plugins
    follow the checkpoint's quant_algo inside trtllm-build (builder.build sets the weight-only / SmoothQuant
    plugins to the model dtype). The GEMM and attention plugins take the checkpoint ``dtype`` explicitly:
    a float16 plugin on a bfloat16 checkpoint does not match its weights."""
    if dtype not in DTYPES:
        fail(f"unsupported checkpoint dtype '{dtype}' ({', '.join(DTYPES)})")
    cmd = ["trtllm-build", "--checkpoint_dir", str(checkpoint_dir), "--output_dir", str(engine_dir),
           "--max_batch_size", str(limits.max_batch), "--max_input_len", str(limits.max_input_len),
           "--max_seq_len", str(limits.max_seq_len), "--max_num_tokens", str(limits.max_batch * limits.max_input_len),
           "--max_multimodal_len", str(limits.max_multimodal_len),
           "--gemm_plugin", dtype, "--gpt_attention_plugin", dtype, "--remove_input_padding", "enable",
           "--workers", str(workers)]
    if gpu.sm < (8, 0) and gpu.sm != (7, 0):
        # FusedMHARunnerV2 has kernels for sm70 (FP16 fMHA on V100 since 0.8) and sm80+, and asserts on sm75; on
        # V100 disabling it ran unfused context attention, slower and with a prompt-squared attention buffer
        cmd += ["--context_fmha", "disable"]
    if gather_generation_logits:
        cmd.append("--gather_generation_logits")  # first-step logits for parity checks
    return cmd


def decoder_engine_dir(bundle: Path, gpu: GpuInfo, tag: str) -> Path:
    return bundle / "trtllm" / engine_key(gpu, tag, trtllm=True)


def build_decoder_engine(bundle: Path, checkpoint: Path, gpu: GpuInfo, limits: BuildLimits, *,
                         gather_generation_logits: bool = False,
                         run: Callable[..., subprocess.CompletedProcess] = subprocess.run,
                         preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Path:
    """Refuse what ``gpu`` cannot run, prepare a plain checkpoint for it, run trtllm-build, stamp the result.
    ``run`` / ``preprocess`` default to the real subprocess and TensorRT-LLM's weight preprocessing."""
    config, meta, _ = read_checkpoint(checkpoint)
    tag = mode_tag(meta["mode"], meta["int8_kv"])
    check_trtllm(gpu, meta["mode"], int8_kv=meta["int8_kv"])
    limits.check(config["max_position_embeddings"])
    if shutil.which("trtllm-build") is None:
        fail("trtllm-build is not on PATH (install TensorRT-LLM on this GPU host)")
    root = decoder_engine_dir(bundle, gpu, tag)
    # first: a rebuild that fails or is interrupted halfway must not leave the old stamp vouching for a torn engine
    (root / BUILD_STAMP).unlink(missing_ok=True)
    if meta["needs_host_preprocessing"]:
        checkpoint = prepare_checkpoint_for_host(checkpoint, root / "checkpoint", gpu, preprocess)
    engine = root / "engine"
    cmd = trtllm_build_command(checkpoint, engine, gpu, limits, dtype=config["dtype"],
                               gather_generation_logits=gather_generation_logits)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with (root / "trtllm-build.log").open("w") as log:
        result = run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False)
    if result.returncode != 0:
        fail(f"trtllm-build failed (exit {result.returncode}); see {root / 'trtllm-build.log'}")
    stamp = {"format": DECODER_STAMP_FORMAT, "format_version": 1, "mode": meta["mode"], "int8_kv": meta["int8_kv"],
             "gpu": gpu_stamp(gpu), "command": cmd, "limits": asdict(limits), "engine_files": engine_files(engine),
             "gather_generation_logits": gather_generation_logits, "bundle_weights": meta.get("bundle_weights"),
             "build_seconds": round(time.perf_counter() - t0, 1),
             "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "radtrt": __version__}
    write_text(root / BUILD_STAMP, json.dumps(stamp, indent=2), "TensorRT-LLM engine stamp")
    return engine


def engine_files(engine: Path) -> dict[str, dict[str, Any]]:
    """Each file trtllm-build wrote (the rank engines, config.json) with its size and sha256, for the stamp to vouch
    for, as the vision engine's stamp does for its plan: a truncated or edited engine otherwise reached TensorRT-LLM's
    C++ loader, whose RuntimeError said nothing of which file."""
    if not engine.is_dir():
        fail(f"trtllm-build wrote no engine folder {engine}; see the trtllm-build.log beside it")
    return {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(engine.iterdir())
            if p.is_file()}


def decoder_engine_problem(engine: Path, stamp: dict[str, Any], *, hashes: bool = True) -> str | None:
    """Why a decoder engine folder is not the one its stamp vouches for (a file missing, truncated or changed; a
    stamp without the record), or None. ``hashes`` False compares sizes only: ``--backend auto``'s cheap look."""
    bundle = engine.parent.parent.parent  # BUNDLE/trtllm/KEY/engine
    rebuild = f"rebuild it with: {_build_command(bundle, mode_tag(stamp['mode'], stamp['int8_kv']))}"
    files = stamp.get("engine_files")
    if not isinstance(files, dict) or not files or not all(
            isinstance(m, dict) and isinstance(m.get("bytes"), int) and isinstance(m.get("sha256"), str)
            for m in files.values()):
        return (f"the TensorRT-LLM engine stamp {engine.parent / BUILD_STAMP} records no engine files (built by an "
                f"older radtrt, or damaged): {rebuild}")
    for name, meta in files.items():
        path = engine / name
        if not path.is_file() or path.stat().st_size != meta["bytes"] or (hashes and sha256_file(path) != meta["sha256"]):
            return (f"the TensorRT-LLM engine file {path} is missing or does not match its stamp (corrupt or "
                    f"modified): {rebuild}")
    return None


# the limits of an engine's build_config radtrt reads; TensorRT's shapes are 32-bit, so no engine's exceed that
ENGINE_COUNTS = ("max_batch_size", "max_input_len", "max_seq_len", "max_prompt_embedding_table_size")
MAX_ENGINE_COUNT = 2**31 - 1


def read_engine_config(engine: Path) -> dict[str, Any] | None:
    """An engine's config.json, or None when the engine is on the serving host rather than here."""
    config = engine / "config.json"
    if not config.is_file():
        return None
    data = read_json(config)
    if not isinstance(data.get("pretrained_config"), dict) or not isinstance(data["pretrained_config"].get("dtype"),
                                                                             str):
        fail(f"{engine} is not a TensorRT-LLM engine folder (its config.json has no pretrained_config.dtype; a "
             f"checkpoint folder becomes an engine with 'radtrt export --target trtllm' on the GPU host)")
    if data.get("build_config") is not None and not isinstance(data["build_config"], dict):  # [] or 0 passed
        fail(f"{config}: build_config is {type(data['build_config']).__name__}, not an object (damaged?)")
    for key in ENGINE_COUNTS:  # max_seq_len 1e29 went into config.pbtxt's KV cache size, past int64 when served
        value = engine_count((data.get("build_config") or {}).get(key))
        if value is not None and value > MAX_ENGINE_COUNT:
            fail(f"{config}: build_config.{key} is {value}, more than any engine holds (at most {MAX_ENGINE_COUNT}, "
                 f"TensorRT's 32-bit dimensions): a damaged or hand-edited config; rebuild the engine")
    return data


def engine_count(value: Any) -> int | None:
    """An engine limit as a number, where its config holds one (a bool is not one)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def read_decoder_stamp(path: Path) -> dict[str, Any] | None:
    """A TensorRT-LLM engine's stamp (``read_stamp``), with the build limits the runtime splits batches by."""
    stamp = read_stamp(path, DECODER_STAMP_FORMAT, DECODER_STAMP_KEYS)
    limits = stamp["limits"] if stamp is not None else {}
    if stamp is not None and not (isinstance(limits, dict) and all(
            isinstance(limits.get(k), int) for k in ("max_batch", "max_input_len", "max_seq_len"))):
        fail(f"engine stamp {path} is malformed (its limits); rebuild the engine")
    return stamp


def built_from_problem(engine: Path, stamp: dict[str, Any], manifest: dict[str, Any], bundle: Path) -> str | None:
    """Why a decoder engine was not built from the weights the bundle's graphs hold (an engine folder copied in
    from another bundle), or None: it would run beside this bundle's vision engine, and reports would name this
    bundle's weights. ``check_decoder_engine`` refuses it; ``--backend auto`` passes it over."""
    from radtrt.exporter.bundle import BUNDLE_FINGERPRINT

    if stamp.get("bundle_weights") != manifest["model"].get(BUNDLE_FINGERPRINT):
        return (f"the TensorRT-LLM engine {engine} was not built from the weights of the model {bundle} was exported "
                f"from (copied from another bundle, or built by an older radtrt): delete its folder and rebuild it "
                f"with: radtrt export --bundle {shell_quote(str(bundle))} --model MODEL --target trtllm ...")
    return None


def check_decoder_engine(engine: Path, stamp: dict[str, Any], manifest: dict[str, Any], bundle: Path, *,
                         hashes: bool = True) -> None:
    """Refuse a decoder engine built from other weights than the bundle's graphs hold (``built_from_problem``), or
    whose files are not those its stamp vouches for (``decoder_engine_problem``)."""
    problem = built_from_problem(engine, stamp, manifest, bundle) or decoder_engine_problem(engine, stamp, hashes=hashes)
    if problem:
        fail(problem)


def _build_command(bundle: Path, tag: str) -> str:
    """The export that builds the ``tag`` decoder engine into ``bundle``."""
    mode, kv = split_mode_tag(tag)
    options = {"fp16": "--precision fp16", "w8a16": "--precision int8",
               "w8a8_sq": "--precision int8 --int8-decoder smoothquant"}.get(mode, "") + (" --int8-kv-cache" if kv else "")
    if (kv or mode == "w8a8_sq") and not (bundle / "calibration.safetensors").is_file():
        options += " --calibration-stats CALIB"  # an fp16/fp32 bundle carries no statistics to take them from
    # --bundle: into this one; the command last and bare (its quoted path nested in quotes did not paste)
    return f"radtrt export --bundle {shell_quote(str(bundle))} --model MODEL --target trtllm {options}".rstrip()


def find_decoder_engine(bundle: Path, gpu: GpuInfo, tag: str | None) -> tuple[Path, dict[str, Any]]:
    """The engine directory built for this GPU and versions, or one line naming what exists instead. ``tag``
    None: any engine (the runtime asks so when none fits this host, for the line that says why)."""
    root = bundle / "trtllm"
    stamps = sorted(root.glob(f"*/{BUILD_STAMP}")) if root.is_dir() else []
    others: list[tuple[str, bool]] = []
    fitting, here = [], set()
    for path in stamps:
        stamp = read_decoder_stamp(path)
        if stamp is None:
            continue
        if tag is not None and mode_tag(stamp["mode"], stamp["int8_kv"]) != tag:
            if stamp_mismatch(stamp, gpu, trtllm=True) is None:
                here.add(mode_tag(stamp["mode"], stamp["int8_kv"]))
            continue
        mismatch = stamp_mismatch(stamp, gpu, trtllm=True)
        if mismatch is None:
            fitting.append((path, stamp))
        else:
            others.append((mismatch, same_gpu(stamp, gpu)))
    if fitting:  # the newest build: an older folder of the same engine may remain (see newest_first)
        path, stamp = newest_first(fitting)[0]
        return path.parent / "engine", stamp
    what = f"{tag} decoder engine" if tag is not None else "decoder engine"
    build = _build_command(bundle, tag or "fp16")
    has = f" (for this host it has {', '.join(sorted(here))})" if here else ""
    refuse_missing_engine("TensorRT-LLM", what, bundle, others, installed=gpu.tensorrt_llm is not None, build=build,
                          has=has)
