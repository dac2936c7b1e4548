"""``radtrt export --target ...``: which artifacts to make, in order, and what this host can make.

``onnx`` writes the bundle; ``tensorrt`` adds this GPU's vision engine to it; ``trtllm`` adds the
TensorRT-LLM checkpoint (anywhere) and builds its engine when TensorRT-LLM and a GPU are present;
``all`` does the three. ``triton`` writes a Triton model repository from an existing bundle. Every
refusal (no GPU, a mode the GPU cannot run) happens before anything is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from radtrt.errors import fail, shell_join
from radtrt.exporter.quant import DEFAULT_ALPHA

TARGETS = ("onnx", "tensorrt", "trtllm", "triton", "all")
CALIBRATION_FILE = "calibration.safetensors"  # what an INT8 bundle carries (``onnx_int8`` writes it)


@dataclass
class ExportPlan:
    target: str
    precision: str
    int8_decoder: str | None = None
    int8_kv: bool = False
    calibration_stats: Path | None = None
    max_batch: int = 8
    trtllm_engine: Path | None = None  # Triton: the decoder engine dir on the serving host
    calibration_data: str | None = None  # INT8 ONNX export: its calibration file lands in the bundle
    smoothquant_alpha: float = DEFAULT_ALPHA  # TensorRT-LLM SmoothQuant checkpoint (the ONNX export has its own plan)
    keep_logits: bool = False  # the TensorRT-LLM engine returns each step's logits: 'radtrt bench parity' needs them
    steps: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            fail(f"unknown export target '{self.target}' ({', '.join(TARGETS)})")
        self.steps = {"onnx": ["onnx"], "tensorrt": ["onnx", "tensorrt"], "trtllm": ["onnx", "trtllm"],
                      "all": ["onnx", "tensorrt", "trtllm"], "triton": ["triton"]}[self.target]


PRECISION_NAMES = ("fp32", "fp16", "int8")  # every target's


def resolve_precision(precision: str | None, bundle: Path | None, target: str) -> str:
    """``--precision``, by default fp32, or with ``--bundle`` the bundle's own: the vision engine is built from
    its graphs, so another precision there is refused; a TensorRT-LLM decoder of another precision than the
    bundle's is asked for explicitly (an INT8 bundle gave an fp16 decoder by default). Checked before any other
    option against it: "--calibration-data applies to --precision int8 only (this export is INT8)" answered a
    mistyped int8, and an empty one (an unset shell variable) was the default without a word."""
    if precision is not None and precision not in PRECISION_NAMES:
        fail(f"unknown --precision {precision!r} ({', '.join(PRECISION_NAMES)})")
    if bundle is None:
        return precision or "fp32"
    from radtrt.exporter.bundle import read_manifest

    own = str(read_manifest(bundle, verify=False).get("precision"))
    if precision is not None and precision != own and target in ("tensorrt", "all"):
        fail(f"the TensorRT vision engine is built from the {own} graphs of {bundle}: drop --precision {precision}, "
             f"or export a {precision} bundle to build it from")
    return precision or own


def refuse_unused_options(*, precision: str, target: str, bundle: Path | None, int8_decoder: str | None,
                          calibration_data: str | None, calibration_stats: Path | None, int8_kv_cache: bool,
                          int8_only: dict[str, bool], attention: str | None = None,
                          trtllm_engine: Path | None = None, max_batch_given: bool = False,
                          precision_given: bool = False, model_given: bool = False,
                          base_model_given: bool = False, trtllm_logits: bool = False) -> None:
    """Options this export would not use are refused, not ignored: the user believes they took effect.
    ``int8_only``: option -> whether it was given (options of the ONNX INT8 export only)."""
    if bundle is not None:  # the ONNX export's options: that export happened before
        if calibration_data is not None:
            engines = ("it serves engines built already" if target == "triton" else
                       "its own calibration (INT8 bundles carry one) or --calibration-stats FILE serves its engines")
            fail(f"--calibration-data calibrates an ONNX INT8 export; {bundle} is exported already: {engines}")
        if attention is not None:
            fail(f"--attention chooses the ONNX decoder's attention; {bundle} is exported already")
    if trtllm_engine is not None and target != "triton":
        fail("--trtllm-engine names the decoder engine a Triton repository serves (--target triton)")
    if trtllm_logits and target not in ("trtllm", "all"):
        fail("--trtllm-logits is a TensorRT-LLM engine build option (--target trtllm | all)")
    if max_batch_given and target == "onnx":
        fail("--max-batch limits engines (--target tensorrt | trtllm | triton | all); an ONNX bundle takes any batch")
    if target == "tensorrt" and bundle is not None:
        for flag, given in (("--int8-kv-cache", int8_kv_cache), ("--int8-decoder", int8_decoder is not None)):
            if given:
                fail(f"{flag} is the decoder's; --target tensorrt with --bundle builds the vision engine only")
    if target == "triton" and trtllm_engine is not None:  # the engine named is served as it is
        for flag, given in (("--int8-kv-cache", int8_kv_cache), ("--int8-decoder", int8_decoder is not None),
                            ("--precision", precision_given)):
            if given:
                fail(f"{flag} chooses which engine of the bundle to serve; with --trtllm-engine that engine is "
                     f"served as it was built")
    if precision != "int8":
        for flag, value in (("--int8-decoder", int8_decoder), ("--calibration-data", calibration_data)):
            if value is not None:
                fail(f"{flag} applies to --precision int8 only (this export is {precision})")
    onnx_int8 = precision == "int8" and bundle is None
    smoothquant = (onnx_int8 and int8_decoder in (None, "smoothquant")) or (
        precision == "int8" and target in ("trtllm", "all") and int8_decoder == "smoothquant")
    if int8_only["--smoothquant-alpha"] and not smoothquant:
        fail("--smoothquant-alpha applies to SmoothQuant INT8 exports only (ONNX: --precision int8, SmoothQuant "
             "by default; TensorRT-LLM: --int8-decoder smoothquant)")
    given = [flag for flag, changed in int8_only.items() if changed and flag != "--smoothquant-alpha"]
    if given and not onnx_int8:
        fail(f"{given[0]} applies to the ONNX INT8 export only (--precision int8 without --bundle)")
    if onnx_int8 and calibration_data is not None and calibration_stats is not None:
        fail("give --calibration-data or --calibration-stats, not both (both name the calibration to use)")
    if calibration_stats is not None:
        stats_used = onnx_int8 or (target in ("trtllm", "all")
                                   and uses_statistics(precision, int8_decoder, int8_kv_cache))
        if not stats_used:
            fail("--calibration-stats is used by INT8 exports (ONNX --precision int8; TensorRT-LLM SmoothQuant or "
                 "--int8-kv-cache); this export would ignore it")
        if not calibration_stats.is_file():
            fail(f"--calibration-stats {calibration_stats}: no such file")
    calibration_file = calibration_data if calibration_data is not None else calibration_stats
    if onnx_int8 and calibration_file not in (None, "phantom") and int8_only["--calibration-n"]:
        from radtrt.calibration.run import is_calibration_file

        if is_calibration_file(Path(calibration_file)):
            fail("--calibration-n does not apply to a calibration file: it holds the samples it was made from")
    # the model is read by the ONNX export (without --bundle) and the TensorRT-LLM checkpoint; a vision engine
    # is built from the bundle's graphs and a Triton repository from the bundle (a --model that did not even
    # exist was accepted with --bundle --target tensorrt)
    for flag, given in (("--model", model_given), ("--base-model", base_model_given)):
        if given and target == "triton":
            fail(f"--target triton writes its repository from --bundle alone; drop {flag}")
        if given and target == "tensorrt" and bundle is not None:
            fail(f"--target tensorrt with --bundle builds the vision engine from the graphs of {bundle}, not from a "
                 f"model; drop {flag}")
    if bundle is not None and target == "onnx":
        fail(f"{bundle} is already an ONNX bundle: --bundle adds engines (--target tensorrt | trtllm | all) or "
             f"serves it (--target triton); to export again, drop --bundle and pass -o")


def uses_statistics(precision: str, int8_decoder: str | None, int8_kv: bool) -> bool:
    """Whether the TensorRT-LLM decoder of these options needs calibration statistics (SmoothQuant scales, INT8
    KV-cache scales); fp16 and weight-only checkpoints need none, so an INT8 bundle's calibration (one of an
    older format, say) must not stand in their way."""
    from radtrt.exporter.trtllm import decoder_mode

    return int8_kv or decoder_mode(precision, int8_decoder) == "w8a8_sq"


def preflight(plan: ExportPlan) -> None:
    """Refuse, before any export work, what this host or its GPU cannot make."""
    from radtrt.exporter.gpu import check_tensorrt, check_trtllm, detect_gpu, library_version, require_gpu
    from radtrt.exporter.trtllm import decoder_mode

    # Who reads --int8-kv-cache: the ONNX INT8 export, the TensorRT-LLM step, and Triton (which decoder engine
    # to serve). Not the fp32/fp16 ONNX export, nor the TensorRT vision engine (it has no KV cache): a
    # --target tensorrt export of an fp16 bundle took the flag and wrote a float32 KV cache.
    if plan.int8_kv and plan.precision != "int8" and "trtllm" not in plan.steps and plan.target != "triton":
        fail("--int8-kv-cache in an ONNX bundle needs --precision int8 (or --target trtllm | all for the TensorRT-LLM "
             "engine)" + ("; the TensorRT vision engine has no KV cache" if "tensorrt" in plan.steps else ""))
    if "tensorrt" in plan.steps:
        check_tensorrt(require_gpu(detect_gpu()))
    if "trtllm" in plan.steps:
        mode = decoder_mode(plan.precision, plan.int8_decoder)
        # what the GPU cannot run first: asking for calibration statistics (a long 'radtrt calibrate' at 7B)
        # for a mode that is then refused on this GPU anyway wastes that run
        gpu = detect_gpu()
        if gpu is not None and library_version("tensorrt_llm") is not None:
            check_trtllm(gpu, mode, int8_kv=plan.int8_kv)
        calibrated_here = "onnx" in plan.steps and plan.precision == "int8" and plan.calibration_data is not None
        if uses_statistics(plan.precision, plan.int8_decoder, plan.int8_kv) and plan.calibration_stats is None \
                and not calibrated_here:
            fail("SmoothQuant and the INT8 KV cache need calibration statistics: pass --calibration-stats FILE "
                 "(from 'radtrt calibrate'), or --calibration-data with --precision int8 when this run exports "
                 "the ONNX bundle too")


def retry_engines_command(bundle: Path, step: str, plan: ExportPlan, *, model: Path | None = None,
                          base_model: Path | None = None, max_batch_given: bool = False,
                          alpha_given: bool = False, precision_given: bool = False) -> str:
    """The command that redoes, on the bundle this run wrote, the engine step that failed (``step``) and the
    ones after it, with this run's options for them: the bundle is complete by then, and the same command
    again is refused ('not empty') after minutes of loading the model. Only options ``--bundle`` accepts
    (``refuse_unused_options``): an INT8 bundle carries its calibration, and the precision is the bundle's own
    unless this run chose the decoder's (``precision_given``: an fp16 bundle's INT8 TensorRT-LLM decoder)."""
    from radtrt.exporter.trtllm import decoder_mode

    target = plan.target if step == "tensorrt" else "trtllm"  # 'all' redoes both; after the vision engine, one
    cmd = ["radtrt", "export", "--bundle", str(bundle), "--target", target]
    if target != "tensorrt":
        cmd += ["--model", str(model)] + (["--base-model", str(base_model)] if base_model is not None else [])
        if precision_given:
            cmd += ["--precision", plan.precision]
        if plan.int8_decoder is not None:
            cmd += ["--int8-decoder", plan.int8_decoder]
        if plan.int8_kv:
            cmd.append("--int8-kv-cache")
        if plan.calibration_stats is not None and uses_statistics(plan.precision, plan.int8_decoder, plan.int8_kv):
            cmd += ["--calibration-stats", str(plan.calibration_stats)]
        if alpha_given and decoder_mode(plan.precision, plan.int8_decoder) == "w8a8_sq":
            cmd += ["--smoothquant-alpha", str(plan.smoothquant_alpha)]
        if plan.keep_logits:
            cmd.append("--trtllm-logits")
    if max_batch_given:
        cmd += ["--max-batch", str(plan.max_batch)]
    return shell_join(cmd)


def add_tensorrt(bundle: Path, plan: ExportPlan, log: Callable[[str], None]) -> Path:
    from radtrt.exporter.gpu import detect_gpu, require_gpu
    from radtrt.exporter.tensorrt import build_vision_engine

    gpu = require_gpu(detect_gpu())
    path = build_vision_engine(bundle, gpu, max_batch=plan.max_batch)
    log(f"TensorRT vision engine for {gpu.describe()}: {path}")
    return path


def check_same_model(bundle: Path, model: Any) -> str:
    """Refuse to put a checkpoint of one model beside the graphs of another (say, two fine-tunes of one
    architecture): the bundle would run two different models depending on the backend. Returns the weights'
    fingerprint, which the checkpoint and the engine built from it keep."""
    from radtrt.exporter.bundle import BUNDLE_FINGERPRINT, bundle_fingerprint, read_manifest
    from radtrt.model.fingerprint import config_sha256

    recorded = read_manifest(bundle, verify=False)["model"]
    if recorded.get("config_sha256") != config_sha256(model):
        fail(f"--model has another configuration than the model {bundle} was exported from: pass that model")
    fingerprint = bundle_fingerprint(model)
    if recorded.get(BUNDLE_FINGERPRINT) != fingerprint:
        fail(f"--model has other weights than the model {bundle} was exported from: pass that model")
    return fingerprint


def add_trtllm(bundle: Path, loaded: Any, plan: ExportPlan, log: Callable[[str], None], *,
               build_command: str) -> Path:
    """Write the checkpoint; build the engine only where TensorRT-LLM and a GPU are present. ``build_command``:
    what builds it on the GPU host (``retry_engines_command``), said when this host cannot: with every option
    of this run, as a bare 'radtrt export --target trtllm' lost --trtllm-logits and the INT8 choices."""
    from radtrt.calibration.file import load_activation_stats
    from radtrt.exporter.gpu import detect_gpu, library_version
    from radtrt.exporter.trtllm import decoder_mode, mode_tag, write_trtllm_checkpoint
    from radtrt.exporter.trtllm_build import BuildLimits, build_decoder_engine

    weights = check_same_model(bundle, loaded.model)
    mode = decoder_mode(plan.precision, plan.int8_decoder)
    stats_file = plan.calibration_stats
    needed = uses_statistics(plan.precision, plan.int8_decoder, plan.int8_kv)
    if stats_file is None and needed and (bundle / CALIBRATION_FILE).is_file():
        stats_file = bundle / CALIBRATION_FILE  # an INT8 bundle carries the calibration it was made with
    stats = load_activation_stats(stats_file, loaded.model) if stats_file else None
    gpu = detect_gpu()
    checkpoint = bundle / "trtllm" / f"checkpoint-{mode_tag(mode, plan.int8_kv)}"
    alpha = plan.smoothquant_alpha if mode == "w8a8_sq" else None
    if checkpoint.is_dir():  # written on the CPU host before; the GPU host builds from it
        check_reusable_checkpoint(checkpoint, alpha, stats.identity if stats else None, weights)
        log(f"TensorRT-LLM checkpoint ({mode_tag(mode, plan.int8_kv)}), written before: {checkpoint}")
    else:
        write_trtllm_checkpoint(loaded, checkpoint, mode, smoothquant_stats=stats, int8_kv=plan.int8_kv,
                                alpha=plan.smoothquant_alpha, bundle_weights=weights)
        log(f"TensorRT-LLM checkpoint ({mode_tag(mode, plan.int8_kv)}): {checkpoint}")
    if gpu is None or library_version("tensorrt_llm") is None:
        # the command last and bare: its quoted paths nested in quotes ('... --bundle '/a/my b' ...') did not paste
        log(f"no GPU with TensorRT-LLM here: build the engine on the GPU host ({checkpoint.name} is GPU-independent; "
            f"the model must be there too) with: {build_command}")
        return checkpoint
    cfg = loaded.model.cfg
    limits = BuildLimits.for_llava(cfg.num_image_tokens, max_batch=plan.max_batch,
                                   max_position_embeddings=cfg.decoder.max_position_embeddings)
    engine = build_decoder_engine(bundle, checkpoint, gpu, limits, gather_generation_logits=plan.keep_logits)
    log(f"TensorRT-LLM engine for {gpu.describe(trtllm=True)}: {engine}")
    return engine


def check_reusable_checkpoint(checkpoint: Path, alpha: float | None, calibration: str | None, weights: str) -> None:
    """An existing checkpoint of this mode is built from only when it was written from this bundle's weights
    (``weights``, from ``check_same_model``), with these settings, and is intact: one copied in from another
    bundle would be built, stamped and served as this bundle's model."""
    from radtrt.exporter.trtllm import read_checkpoint_meta
    from radtrt.model.io import sha256_file

    meta = read_checkpoint_meta(checkpoint)
    again = f"delete {checkpoint} to write it again from this bundle's model"
    if meta.get("bundle_weights") != weights:
        fail(f"{checkpoint} was not written from the weights of the model this bundle was exported from (copied "
             f"from another bundle, or written by an older radtrt): {again}")
    rank0 = checkpoint / "rank0.safetensors"
    if not rank0.is_file() or sha256_file(rank0) != meta.get("rank0_sha256"):
        fail(f"{rank0} does not match its checkpoint's record (damaged, replaced or missing): {again}")
    if meta.get("smoothquant_alpha") != alpha or meta.get("calibration") != calibration:
        fail(f"{checkpoint} was written with other settings (SmoothQuant alpha {meta.get('smoothquant_alpha')}, "
             f"calibration {meta.get('calibration')!r}); delete it to write it again with these")


def write_triton(bundle: Path, out: Path, plan: ExportPlan, log: Callable[[str], None]) -> Path:
    from radtrt.exporter.gpu import detect_gpu
    from radtrt.exporter.trtllm import decoder_mode, mode_tag
    from radtrt.exporter.triton import SERVING_RECORD, write_triton_repo
    from radtrt.model.io import read_json

    gpu = detect_gpu()
    tag = mode_tag(decoder_mode(plan.precision, plan.int8_decoder), plan.int8_kv)
    if gpu is None and plan.trtllm_engine is None:
        fail("no GPU here to find this host's TensorRT-LLM engine: pass --trtllm-engine DIR (the engine "
             "directory on the serving host)")
    if plan.trtllm_engine is not None and not plan.trtllm_engine.is_absolute():
        # resolved here it would name a folder of this host, written into the repository as the serving host's
        fail(f"--trtllm-engine {plan.trtllm_engine}: give the engine folder's absolute path on the serving host")
    repo = write_triton_repo(bundle, out, gpu=gpu, vision_backend="tensorrt" if gpu else "onnxruntime",
                             decoder_tag=tag, decoder_engine=plan.trtllm_engine, max_batch=plan.max_batch)
    log(f"Triton model repository: {repo}")
    log(read_json(repo / SERVING_RECORD)["needs"])
    return repo
