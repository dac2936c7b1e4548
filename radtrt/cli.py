"""The ``radtrt`` command: a thin typer layer over the library.

Results go to stdout, logs and progress to stderr. A ``RadtrtError`` (bad input, missing files)
becomes one line on stderr and exit code 2; so does a usage error (``main``); anything else is a bug: 1.
"""

from __future__ import annotations

if __name__ == "__main__":  # ``python -m radtrt.cli`` (torchrun): before the heavy imports below, as the script does
    from radtrt.entry import main as _entry_main

    _entry_main()  # imports this module as ``radtrt.cli`` with interrupts held, runs it, and exits

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional, TypeVar

import typer

from radtrt import __version__, interrupts
from radtrt.cli_support import WRITE_ERRNOS, PathArgument, PathOption, emit, err, print_error, stdout_failed, user_errors
from radtrt.entry import INTERRUPTED
from radtrt.errors import RadtrtError, fail, printable, valid_unicode_in
from radtrt.progress import plain

if TYPE_CHECKING:
    from radtrt.runtime.pipeline import StudyFailure, StudyResult

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Run LLaVA-Rad chest X-ray report generation fast on the hardware you have.")
F = TypeVar("F", bound=Callable[..., Any])


def command(fn: F) -> F:
    """Register a command whose user-facing failures end as one stderr line and exit code 2."""
    app.command()(user_errors(fn))
    return fn


def _version(value: bool) -> None:
    if value:
        emit(f"radtrt {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """radtrt: LLaVA-Rad on Jetson Orin, V100 and plain CPUs."""


@command
def infer(
    studies: list[Path] = PathArgument(..., metavar="STUDY", help="DICOM file, study folder, folder of studies (one an entry), or PNG/JPEG; several allowed."),
    model: Optional[Path] = PathOption(None, "--model", help="LLaVA-Rad release dir or radtrt model dir (default: "
                                         "the embedded default model, phantoms only; 'radtrt doctor' names its folder)."),
    base_model: Optional[Path] = PathOption(None, "--base-model", help="Local Vicuna-7B v1.5 dir (release layout)."),
    bundle: Optional[Path] = PathOption(None, "--bundle", help="What 'radtrt export' wrote."),
    backend: str = typer.Option("auto", "--backend", help="auto | torch | onnxruntime | tensorrt"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu | cuda (default: cuda when usable, else cpu)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 | float16 | bfloat16 (torch backend). "
                                                              "\\[default: float32]"),
    indication: Optional[str] = typer.Option(None, "--indication", help="Exam indication added to the prompt."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1, help="Generation limit."),
    batch_size: int = typer.Option(1, "--batch-size", min=1, help="Studies generated together (left-padded; a fused-attention bundle groups prompts of equal length)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per study on stdout."),
    sr_out: Optional[Path] = PathOption(None, "--sr-out", help="Write a DICOM SR per study into this folder."),
    allow_any_modality: bool = typer.Option(False, "--allow-any-modality", help="Accept non-radiograph DICOMs."),
    ort_provider: str = typer.Option("auto", "--ort-provider", help="auto | cpu | cuda | tensorrt (onnxruntime)."),
    trt_cache: Optional[Path] = PathOption(None, "--trt-cache", help="Engine/timing cache dir for the TensorRT EP."),
    ort_spin: bool = typer.Option(False, "--ort-spin", help="ONNX Runtime threads busy-wait between operators: "
                                  "faster INT8 decode on a machine doing nothing else, slower when it is shared."),
    trt_decoder: Optional[str] = typer.Option(None, "--trt-decoder", help="TensorRT-LLM engine to run (tensorrt "
                                              "backend): fp16 | w8a16 | w8a8_sq, with -kv8 for an INT8 KV cache. "
                                              "\\[default: the one built for this host]"),
) -> None:
    """Generate the findings section for each study."""
    from radtrt.runtime.session import infer_studies

    _print_results(infer_studies(studies, model=model, base_model=base_model, bundle=bundle, backend=backend,
                                 device=device, dtype=dtype, indication=indication, max_new_tokens=max_new_tokens,
                                 batch_size=batch_size, sr_out=sr_out, allow_any_modality=allow_any_modality,
                                 ort_provider=ort_provider, trt_cache=trt_cache, ort_spin=ort_spin,
                                 trt_decoder=trt_decoder, console=err), as_json)


def _print_results(results: "Iterable[StudyResult | StudyFailure]", as_json: bool) -> None:
    """Reports on stdout (or one JSON record per study); timings and failures on stderr."""
    from radtrt.runtime.pipeline import StudyResult

    for result in results:
        if as_json:
            emit(json.dumps(valid_unicode_in(result.to_json())))
        elif isinstance(result, StudyResult):  # a failure's line is already on stderr
            t = result.timings_ms
            # the report's own line breaks kept, any other control character escaped (a damaged model's ESC
            # reached the terminal)
            report = "\n".join(printable(line) for line in result.report.split("\n"))
            emit(f"{printable(result.study)} [{result.view_position}]\n{report}\n")
            if not result.report:  # two blank lines read as a display fault
                err.print(plain(f"radtrt: warning: {result.study}: the model generated no findings text (it ended "
                                f"the report at its first token)"), highlight=False, soft_wrap=True)
            elif result.stop_reason != "eos":  # --json says "truncated"; a reader of the terminal saw half a sentence
                err.print(plain(f"radtrt: warning: {result.study}: the report was cut off at --max-new-tokens "
                                f"({len(result.token_ids)} tokens)"), highlight=False, soft_wrap=True)
            decode = f"{t['decode_per_token']:.1f} ms/token" if "decode_per_token" in t else "no step"
            err.print(f"timings: preprocess {t['preprocess']:.0f} ms, vision {t['vision']:.0f} ms, prefill "
                      f"{t['prefill']:.0f} ms, decode {decode}, end to end {t['end_to_end']:.0f} ms", highlight=False,
                      soft_wrap=True)


@command
def convert(
    model: Path = PathOption(..., "--model", help="LLaVA-Rad release dir, radtrt model dir, or (with --to llava-rad) a training run dir."),
    base_model: Optional[Path] = PathOption(None, "--base-model", help="Local Vicuna-7B v1.5 directory."),
    out: Path = PathOption(..., "-o", "--out", help="Output directory."),
    to: str = typer.Option("radtrt", "--to", help="radtrt (merged safetensors) | llava-rad (official release layout)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Stored dtype for --to radtrt: float16 | bfloat16 | "
                                                              "float32 \\[default: float16]"),
) -> None:
    """Convert between the official release layout and radtrt's merged layout."""
    from radtrt.model.loading import RUN_MARKS, load_model, save_toolkit
    from radtrt.outputs import check_new_dir
    from radtrt.runtime.backends import DTYPES

    if to not in ("radtrt", "llava-rad"):
        fail(f"unknown --to '{to}' (radtrt, llava-rad)")
    # None tells an explicit --dtype float16 from the default: refused with --to llava-rad too, not ignored (the
    # release layout is written in float32 whatever was asked)
    if to == "llava-rad" and dtype is not None:
        fail("--dtype applies to --to radtrt; the release layout is written as the release stores it")
    dtype = "float16" if dtype is None else dtype  # an empty one (an unset shell variable) is refused, not the default
    if dtype not in DTYPES:
        fail(f"unknown dtype '{dtype}' ({', '.join(DTYPES)})")
    check_new_dir(out)
    if to == "llava-rad":
        from radtrt.training.release_export import export_release

        if base_model is not None and model.is_dir() and not (model / "config.json").exists() \
                and any((model / mark).is_file() for mark in RUN_MARKS):
            # load_model refused the run folder for what it is ("give its model, RUN/model"), though a run folder
            # is what --to llava-rad takes: the --base-model was what sent it there
            fail(f"{model} is a training run folder, whose model holds its whole decoder (a stage-2 run's base is the "
                 f"model it started from, as the run records it): drop --base-model {base_model}")
        source = load_model(model, base_model) if base_model is not None else model
        with err.status(plain(f"writing the release layout to {out}")):
            release, base = export_release(source, out)
        emit(f"{release}\n{base}")
        return
    with err.status("loading and merging the model"):
        # Loaded in the stored dtype: a float32 copy of a float16 base would double the memory (7B: 27 GB)
        # for bytes that come out identical (LoRA merges in float32 either way, and float16 -> float32 is exact).
        loaded = load_model(model, base_model, dtype=DTYPES[dtype])  # which refuses one that cannot generate
    with err.status(plain(f"writing {out}")):
        save_toolkit(loaded, out, dtype=DTYPES[dtype])
    emit(str(out))


@command
def export(
    model: Optional[Path] = PathOption(None, "--model", help="LLaVA-Rad release dir or radtrt model dir."),
    base_model: Optional[Path] = PathOption(None, "--base-model", help="Local Vicuna-7B v1.5 dir (release layout)."),
    precision: Optional[str] = typer.Option(None, "--precision", help="fp32 | fp16 | int8 "
                                                                      "\\[default: fp32; with --bundle: the bundle's]"),
    target: str = typer.Option("onnx", "--target", help="onnx | tensorrt | trtllm | triton | all"),
    out: Optional[Path] = PathOption(None, "-o", "--out", help="Bundle directory (Triton: repository directory); "
                                       "not needed with --bundle, whose folder receives the engines."),
    bundle: Optional[Path] = PathOption(None, "--bundle", help="Existing bundle to add engines to / serve."),
    int8_decoder: Optional[str] = typer.Option(None, "--int8-decoder", help="weight-only | smoothquant (default: smoothquant for the ONNX decoder, weight-only for TensorRT-LLM)"),
    int8_kv_cache: bool = typer.Option(False, "--int8-kv-cache",
                                       help="INT8 KV cache (TensorRT-LLM engine; ONNX bundle with --precision int8)."),
    attention: Optional[str] = typer.Option(
        None, "--attention", help="ONNX decoder attention: fused (default: GroupQueryAttention; CPU, or fp16 on CUDA) | plain."),
    calibration_stats: Optional[Path] = PathOption(None, "--calibration-stats",
                                                     help="Activation statistics from 'radtrt calibrate'."),
    calibration_data: Optional[str] = typer.Option(
        None, "--calibration-data", help="INT8: a study folder or a folder of studies (one an entry; a PNG/JPEG each), a JSONL manifest, a 'radtrt calibrate' file, or 'phantom'."),
    calibration_n: Optional[int] = typer.Option(None, "--calibration-n", min=1,
                                                help="INT8: calibration samples to read. \\[default: 32]"),
    smoothquant_alpha: Optional[float] = typer.Option(None, "--smoothquant-alpha",
                                                      help="INT8 SmoothQuant migration strength. \\[default: 0.5]"),
    int8_lm_head: bool = typer.Option(True, "--int8-lm-head/--fp32-lm-head", help="INT8: quantize lm_head too."),
    int8_embeddings: bool = typer.Option(True, "--int8-embeddings/--fp32-embeddings",
                                         help="INT8: store the embedding table as INT8 rows."),
    parity_samples: Optional[int] = typer.Option(None, "--parity-samples", min=0,
                                                 help="INT8: held-out samples for the parity gate. \\[default: 8]"),
    max_batch: Optional[int] = typer.Option(None, "--max-batch", min=1, help="Engine batch limit. \\[default: 8]"),
    trtllm_engine: Optional[Path] = PathOption(None, "--trtllm-engine",
                                                 help="Triton: TensorRT-LLM engine dir on the serving host."),
    trtllm_logits: bool = typer.Option(False, "--trtllm-logits", help="TensorRT-LLM engine that returns each "
                                       "step's logits, for 'radtrt bench parity' (more GPU memory)."),
) -> None:
    """Export the model: ONNX bundle, TensorRT vision engine, TensorRT-LLM decoder, Triton repository."""
    from radtrt.exporter.run import ExportRequest, run_export

    request = ExportRequest(target=target, model=model, base_model=base_model, precision=precision, out=out,
                            bundle=bundle, int8_decoder=int8_decoder, int8_kv_cache=int8_kv_cache,
                            attention=attention, calibration_stats=calibration_stats,
                            calibration_data=calibration_data, calibration_n=calibration_n,
                            smoothquant_alpha=smoothquant_alpha, int8_lm_head=int8_lm_head,
                            int8_embeddings=int8_embeddings, parity_samples=parity_samples, max_batch=max_batch,
                            trtllm_engine=trtllm_engine, trtllm_logits=trtllm_logits)
    emit(str(run_export(request, err)))


@command
def calibrate(
    model: Path = PathOption(..., "--model", help="LLaVA-Rad release dir or radtrt model dir."),
    base_model: Optional[Path] = PathOption(None, "--base-model", help="Local Vicuna-7B v1.5 dir (release layout)."),
    data: str = typer.Option(..., "--data", help="A study folder or a folder of studies (one an entry; a PNG/JPEG each), a JSONL manifest, or 'phantom' (synthetic)."),
    n: int = typer.Option(32, "--n", min=1, max=10_000, help="Number of samples (the first N of the data)."),
    seed: Optional[int] = typer.Option(None, "--seed", min=0, help="Phantom seed (with --data phantom). "
                                                                   "\\[default: 11]"),
    out: Path = PathOption(..., "-o", "--out", file="calibration.safetensors",
                                     help="Calibration file to write (.safetensors)."),
) -> None:
    """Activation statistics on chest X-ray samples for INT8 export (one reusable, versioned file)."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    from radtrt.progress import make_progress

    from radtrt.calibration.run import PHANTOM_CALIBRATION_SEED, calibrate_phantoms, means_phantoms
    from radtrt.calibration.run import calibrate as run_calibration
    from radtrt.calibration.samples import check_samples
    from radtrt.model.loading import load_model
    from radtrt.outputs import check_new_file

    if out.suffix != ".safetensors":  # a name that is only the extension has none (".safetensors": a hidden file)
        fail(f"the calibration file must be named NAME.safetensors, got {out.name}")
    check_new_file(out, "calibration file")
    phantoms = means_phantoms(data)
    if not phantoms:  # before the model loads (minutes at 7B)
        if not data.strip():
            fail("--data is empty: name a studies folder, a JSONL manifest, or 'phantom'")
        if seed is not None:
            fail("--seed chooses the phantoms of --data phantom; it does not apply to other data")
        check_samples(Path(data), n)
    with err.status(plain(f"loading model from {model}")):
        loaded = load_model(model, base_model)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with make_progress(*columns, console=err) as progress:
        if phantoms:
            calibration = calibrate_phantoms(loaded, n, PHANTOM_CALIBRATION_SEED if seed is None else seed,
                                             progress=progress)
        else:
            calibration = run_calibration(loaded, Path(data), n, progress=progress)
    # saved and named complete together: an interrupt after the save said nothing of it, and the rerun refused the
    # whole file as already there
    with interrupts.completing("calibration file", out):
        calibration.file.save(out, new="calibration file")  # a second run to the same -o may have saved meanwhile
    meta = calibration.file.meta
    err.print(f"{calibration.file.n} samples ({meta['method']['samples_with_findings']} with findings, "
              f"{meta['method']['decoder_tokens']} decoder tokens), sample-list sha256 {calibration.file.hash[:16]}",
              highlight=False, soft_wrap=True)
    distinct = len({sample.ref.sha256 for sample in calibration.samples})
    if distinct < len(calibration.samples):  # rows naming one image (or copies of it) calibrate on it once per row
        err.print(plain(f"radtrt: warning: the {len(calibration.samples)} samples hold {distinct} distinct "
                        f"image{'s' if distinct != 1 else ''}; a repeated image counts once per row"),
                  highlight=False, soft_wrap=True)
    emit(str(out))


@command
def doctor() -> None:
    """What backends, providers, GPUs and versions are usable here, and why not."""
    from radtrt.runtime.doctor import report

    for line in report():
        emit(line)


@command
def demo(out: Path = PathOption(Path("radtrt-demo"), "-o", "--out", help="Where to write the demo files."),
         as_json: bool = typer.Option(False, "--json", help="The report as infer --json prints it.")) -> None:
    """First run: a synthetic phantom study through an ONNX bundle of the embedded default model."""
    from radtrt.outputs import check_folder_target
    from radtrt.runtime.demo import make_demo
    from radtrt.runtime.session import infer_studies

    check_folder_target(out / "sr", "demo SR folder (in -o)")  # before the export, not after it
    with err.status("preparing the demo: ONNX export of the default model and a phantom study"):
        bundle, study, row = make_demo(out)
    err.print(plain(f"demo: phantom study {study} (synthetic; its true findings: {row['findings']})"), highlight=False,
              soft_wrap=True)
    _print_results(infer_studies([study], bundle=bundle, backend="onnxruntime", device="cpu",
                                 indication=row.get("indication"), sr_out=out / "sr", ort_provider="cpu",
                                 console=err), as_json)


def _register_subcommands() -> None:
    """Command groups that live next to their library code."""
    from radtrt.benchmarks.cli import register as register_bench
    from radtrt.data.cli import register as register_data
    from radtrt.evaluation.cli import register as register_eval
    from radtrt.training.cli import register as register_train

    register_eval(app)
    register_bench(app)
    register_data(app)
    register_train(app)


_register_subcommands()


def main() -> None:
    interrupts.install()  # SIGTERM unwinds as Ctrl-C does; neither breaks an import in progress
    status = 1  # an exception that is neither: an internal error
    try:
        _run()
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        raise
    except KeyboardInterrupt:  # one landing outside typer's command call (typer makes those exit code 130)
        status = 130
        interrupts.report()
        raise
    finally:  # the outcome is settled, whichever it is: an interrupt now would only misreport it
        interrupts.finished(status)


def _run() -> None:
    try:
        try:
            code = app(standalone_mode=False)  # typer returns the exit code instead of leaving
        except OSError as e:  # --help from typer's rich formatter into a full disk (commands' wrappers take theirs)
            if e.errno not in WRITE_ERRNOS:
                raise
            stdout_failed(e)
        except SystemExit as e:  # rich ends a broken pipe (--help | head) with a silent exit 1, an "internal error"
            if not isinstance(e.__context__, BrokenPipeError):
                raise
            stdout_failed(e.__context__)
    except typer.TyperException as e:  # a usage error (unknown option, bad value): one line, like every refusal
        message = e.format_message().strip() if hasattr(e, "format_message") else str(e)
        ctx = getattr(e, "ctx", None)
        if message:  # empty for a group called without a command: typer has shown its help
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            print_error(f"{message}{hint}")
        sys.exit(getattr(e, "exit_code", 2))
    except typer.Abort:  # end of input at a prompt; standalone typer says the same
        err.print("Aborted.", highlight=False)
        sys.exit(1)
    except RadtrtError as e:  # from an option callback (--version) or stdout_failed: no command's wrapper covers them
        print_error(str(e))
        sys.exit(2)
    if code == INTERRUPTED:  # typer's code for a command ended by Ctrl-C or SIGTERM
        interrupts.settled()
        interrupts.report()
    sys.exit(code if isinstance(code, int) else 0)

