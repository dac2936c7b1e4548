"""``radtrt export`` as a library call: options as given, refused or defaulted in one place, then the steps.

Why a request object with ``None`` for "not given": several refusals depend on whether an option was given at
all (a ``--max-batch`` with nothing to build, an explicit ``--precision`` beside ``--bundle``), and the retry
command after a failed engine step repeats only what the user typed."""

from __future__ import annotations


from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from rich.console import Console

from radtrt.errors import RadtrtError, fail, shell_quote
from radtrt.outputs import resolved
from radtrt.progress import plain
from radtrt.exporter import targets


@dataclass(frozen=True)
class ExportRequest:
    """What the user asked for; ``None``: not given."""

    target: str = "onnx"
    model: Path | None = None
    base_model: Path | None = None
    precision: str | None = None
    out: Path | None = None
    bundle: Path | None = None
    int8_decoder: str | None = None
    int8_kv_cache: bool = False
    attention: str | None = None
    calibration_stats: Path | None = None
    calibration_data: str | None = None
    calibration_n: int | None = None
    smoothquant_alpha: float | None = None
    int8_lm_head: bool = True
    int8_embeddings: bool = True
    parity_samples: int | None = None
    max_batch: int | None = None
    trtllm_engine: Path | None = None
    trtllm_logits: bool = False


def run_export(req: ExportRequest, console: Console) -> Path:
    """Run the export; returns the folder written (the bundle, or the Triton repository). Progress and the
    export check's summary go to ``console``."""
    from radtrt.calibration.run import DEFAULT_N
    from radtrt.exporter.gqa import DEFAULT_ATTENTION
    from radtrt.exporter.onnx_int8 import DEFAULT_PARITY_SAMPLES
    from radtrt.exporter.quant import DEFAULT_ALPHA

    bundle, out = req.bundle, req.out
    precision = targets.resolve_precision(req.precision, bundle, req.target)
    targets.refuse_unused_options(
        precision=precision, target=req.target, bundle=bundle, int8_decoder=req.int8_decoder,
        calibration_data=req.calibration_data, calibration_stats=req.calibration_stats,
        int8_kv_cache=req.int8_kv_cache,
        int8_only={"--calibration-n": req.calibration_n is not None,
                   "--smoothquant-alpha": req.smoothquant_alpha is not None,
                   "--fp32-lm-head": not req.int8_lm_head, "--fp32-embeddings": not req.int8_embeddings,
                   "--parity-samples": req.parity_samples is not None},
        attention=req.attention, trtllm_engine=req.trtllm_engine, max_batch_given=req.max_batch is not None,
        precision_given=req.precision is not None, model_given=req.model is not None,
        base_model_given=req.base_model is not None, trtllm_logits=req.trtllm_logits)
    calibration_data, calibration_stats = req.calibration_data, req.calibration_stats
    if precision == "int8" and bundle is None and calibration_data is None and calibration_stats is not None:
        calibration_data = str(calibration_stats)  # a 'radtrt calibrate' file serves the ONNX INT8 export too
    if bundle is not None and calibration_stats is None and (bundle / targets.CALIBRATION_FILE).is_file() \
            and targets.uses_statistics(precision, req.int8_decoder, req.int8_kv_cache):
        calibration_stats = bundle / targets.CALIBRATION_FILE  # an INT8 bundle carries its calibration
    alpha = DEFAULT_ALPHA if req.smoothquant_alpha is None else req.smoothquant_alpha
    plan = targets.ExportPlan(req.target, precision, req.int8_decoder, req.int8_kv_cache, calibration_stats,
                              8 if req.max_batch is None else req.max_batch, req.trtllm_engine,
                              calibration_data=calibration_data, smoothquant_alpha=alpha,
                              keep_logits=req.trtllm_logits)
    targets.preflight(plan)
    if out is None and (bundle is None or plan.target == "triton"):
        fail("-o/--out is required: the bundle folder to write (Triton: the repository folder)")
    if bundle is not None and plan.target != "triton" and out is not None and resolved(out) != resolved(bundle):
        fail(f"with --bundle the engines go into {bundle}; drop -o {out} (or pass the same folder)")

    def log(line: str) -> None:  # lines name the user's folders: taken as they are, not as markup
        console.print(plain(line), highlight=False, soft_wrap=True)

    if plan.target == "triton":
        if bundle is None:
            fail("--target triton needs --bundle (the bundle to serve) and -o (the repository to write)")
        assert out is not None
        targets.write_triton(bundle, out, plan, log)
        return out
    int8_plan = None
    if precision == "int8" and bundle is None:
        from radtrt.exporter.onnx_int8 import Int8Plan

        int8_plan = Int8Plan(calibration_data, decoder="smoothquant" if req.int8_decoder is None else req.int8_decoder,
                             alpha=alpha, lm_head=req.int8_lm_head,
                             n=DEFAULT_N if req.calibration_n is None else req.calibration_n,
                             embeddings="int8" if req.int8_embeddings else "fp32",
                             kv_cache="int8" if req.int8_kv_cache else "fp32",
                             attention=req.attention or DEFAULT_ATTENTION,
                             parity_samples=DEFAULT_PARITY_SAMPLES if req.parity_samples is None else req.parity_samples)
        int8_plan.check_ready()
    if bundle is None:
        from radtrt.outputs import check_new_dir

        assert out is not None
        check_new_dir(out, "bundle directory")  # before the model loads: minutes at 7B
    bundle_dir = bundle or out
    assert bundle_dir is not None
    loaded = _load_for(plan, req, calibration_stats, console, log)
    if bundle is None:
        _export_onnx(loaded, bundle_dir, precision, int8_plan, req.attention or DEFAULT_ATTENTION, console, log)
    else:
        from radtrt.exporter.bundle import read_manifest

        read_manifest(bundle)
    step = ""
    engine_options = {"model": req.model, "base_model": req.base_model, "max_batch_given": req.max_batch is not None,
                      "alpha_given": req.smoothquant_alpha is not None, "precision_given": req.precision is not None}
    try:
        if "tensorrt" in plan.steps:
            step = "tensorrt"
            targets.add_tensorrt(bundle_dir, plan, log)
        if "trtllm" in plan.steps:
            step = "trtllm"
            build = targets.retry_engines_command(bundle_dir, "trtllm", plan, **engine_options)
            targets.add_trtllm(bundle_dir, loaded, plan, log, build_command=build)
    except RadtrtError as e:
        if bundle is not None:
            raise
        # the bundle written above is complete; rerunning this command is refused ('not empty') after loading
        # the model, so say how to redo just the engines
        retry = targets.retry_engines_command(bundle_dir, step, plan, **engine_options)
        both = step == "tensorrt" and "trtllm" in plan.steps
        fail(f"{e}; the ONNX bundle at {bundle_dir} is complete: retry only the engine{'s' if both else ''} "
             f"with: {retry}")  # bare: its quoted paths nested in quotes did not paste
    return bundle_dir


def _load_for(plan: targets.ExportPlan, req: ExportRequest, calibration_stats: Path | None, console: Console,
              log: Callable[[str], None]) -> Any:
    """The model, when a step reads it (the ONNX export without --bundle, the TensorRT-LLM checkpoint)."""
    from radtrt.model.loading import cast_on_load, load_model

    bundle, model = req.bundle, req.model
    if not ("onnx" in plan.steps and bundle is None or "trtllm" in plan.steps):
        return None
    if model is None and bundle is not None:
        fail(f"--target {plan.target} needs --model as well (the model {bundle} was exported from): the "
             f"TensorRT-LLM checkpoint is written from its weights, and one written before is checked against them")
    if model is None:
        fail("--model is required to export (or pass --bundle to add engines to an existing bundle)")
    with console.status(plain(f"loading model from {model}")):
        loaded = load_model(model, req.base_model)
    if "trtllm" in plan.steps and calibration_stats is not None:
        from radtrt.calibration.file import load_activation_stats

        load_activation_stats(calibration_stats, loaded.model)  # checked now, not after the ONNX bundle is written
    cast = cast_on_load(model)
    if cast is not None and cast[1] >= 1e9 and "onnx" in plan.steps and bundle is None:  # small ones don't matter
        log(f"note: {model} stores {cast[0]} weights: the export casts them to float32 in memory "
            f"({cast[1] / 1e9:.1f} GB) instead of reading them memory-mapped; 'radtrt convert --dtype float32' "
            f"avoids that")
    return loaded


def _export_onnx(loaded: Any, out: Path, precision: str, int8_plan: Any, attention: str, console: Console,
                 log: Callable[[str], None]) -> None:
    """The ONNX bundle, then the export check's summary (and the INT8 parity gate's)."""
    from rich.progress import SpinnerColumn, TextColumn, TimeElapsedColumn

    from radtrt.exporter.bundle import export_bundle
    from radtrt.progress import make_progress

    with make_progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                       console=console) as progress:
        manifest = export_bundle(loaded, out, precision=precision, progress=progress, int8=int8_plan,
                                 attention=attention)
    check = manifest["export_check"]
    what = "random-pixel smoke check, " if precision == "int8" else ""  # INT8 is judged on held-out studies
    # the reference the check measured ('torch float16 on the CPU' for fp16), not always 'fp32'
    vision, logits = check["vision"], check["decoder_first_logits"]
    log(f"ONNX Runtime vs PyTorch ({what}reference {check['reference']}): image embeddings max abs err "
        f"{vision['max_abs']:.3g} (rel {vision['max_rel']:.3g}), first-step logits max abs err {logits['max_abs']:.3g} "
        f"(rel {logits['max_rel']:.3g}), greedy tokens "
        f"{'identical' if check['greedy_tokens_equal'] else 'DIFFER'} over {check['greedy_steps']} steps")
    dec = manifest["decoder"]
    log(f"decoder attention: {dec['attention']}"
        + (" (GroupQueryAttention, com.microsoft)" if dec["attention"] == "fused" else "")
        + f", {dec['kv_cache']} KV cache")
    if check.get("int8_parity"):
        from radtrt.calibration.parity import summary_lines

        parity = check["int8_parity"]
        for line in summary_lines(parity):
            log(line)
        for warning in parity["warnings"]:
            console.print(f"[bold red]WARNING: INT8 parity below target: {warning}[/bold red]", highlight=False,
                          soft_wrap=True)
    elif int8_plan is not None and int8_plan.parity_samples == 0:  # the smoke check above judges no studies
        # the command last and bare: a quoted path nested in quotes did not paste
        log(f"INT8 parity gate skipped (--parity-samples 0); measure it with: radtrt bench parity --bundle "
            f"{shell_quote(str(out))} --model MODEL --studies HELD_OUT_STUDIES")
