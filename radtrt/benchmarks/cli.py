"""``radtrt bench latency|parity``: a thin typer layer over ``radtrt.benchmarks``.

``register(app)`` adds the ``bench`` group to the main app. Results go to stdout (Markdown, or JSON
with ``--json``); ``-o report.md`` also writes ``report.json`` and, for latency, ``report.png`` next
to it. Progress goes to stderr. A ``RadtrtError`` becomes one stderr line and exit code 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from radtrt.benchmarks.assets import DEFAULT_WORK_DIR
from radtrt.benchmarks.report_files import (check_outside_studies, check_predictions_apart, check_report_path,
                                           report_files, reproduce_command, without_non_finite)
from radtrt.cli_support import PathOption, emit, err, user_errors
from radtrt.errors import fail, shell_join, valid_unicode, valid_unicode_in
from radtrt.progress import LineProgress, make_progress, plain

_guarded = user_errors


def _progress() -> Progress | LineProgress:
    return make_progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err,
                         transient=True)


DEFAULT_MAX_NEW_TOKENS = 64


def _check_work_dir(work_dir: Path, used: bool) -> None:
    if used:
        from radtrt.outputs import check_folder_target

        check_folder_target(work_dir, "--work-dir folder")


def _emit(markdown: str, data: dict[str, Any], as_json: bool, out: Path | None,
          chart: Callable[[Path], bool] | None = None) -> None:
    """Every report file first, then stdout: a closed or full stdout fails the command, and it left the chart
    unwritten. ``chart`` renders ``-o``'s PNG into the file it is given and says whether it did; without one
    (parity, or no matplotlib) an earlier report's PNG there is removed, as it describes another run."""
    # a study or path whose name is not UTF-8 (an old PACS export's Latin-1): written as '\xff', as in infer --json;
    # the strict UTF-8 writer raised UnicodeEncodeError after the whole benchmark had run
    markdown, data = valid_unicode(markdown), without_non_finite(valid_unicode_in(data))
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    if out is not None:
        from radtrt.outputs import make_dir, write_set

        make_dir(out.parent, "report folder")
        md_path, json_path, png_path = report_files(out)
        # the set or none of it (a full disk at the JSON left an earlier run's JSON and chart, and no Markdown)
        from radtrt import interrupts

        with interrupts.completing("report", md_path):
            written = write_set([(md_path, lambda tmp: tmp.write_text(markdown, encoding="utf-8")),
                                 (json_path, lambda tmp: tmp.write_text(text, encoding="utf-8")),
                                 (png_path, lambda tmp: chart is not None and chart(tmp))], "report")
        err.print(plain(f"wrote {', '.join(map(str, written[:-1]))} and {written[-1]}"))
    emit(text if as_json else markdown, nl=False)


MODEL_HELP = "radtrt model dir (or LLaVA-Rad release dir) for the torch/transformers side."
RANDOM_HELP = ("Build random weights of this preset (tiny | phantom | mid | llava-rad), its model dir and bundle, in "
               "--work-dir.")

# Options both commands take, declared once.
BundleOpt = Annotated[Optional[Path], PathOption("--bundle", help="Bundle from 'radtrt export' (onnxruntime and "
                                                                   "tensorrt sides).")]
ModelOpt = Annotated[Optional[Path], PathOption("--model", help=MODEL_HELP)]
BaseModelOpt = Annotated[Optional[Path], PathOption("--base-model", help="Vicuna-7B v1.5 dir (release layout).")]
RandomOpt = Annotated[Optional[str], typer.Option("--random-model", help=RANDOM_HELP)]
WorkDirOpt = Annotated[Optional[Path], PathOption(
    "--work-dir", help=f"Cache for random models and synthetic studies (default {DEFAULT_WORK_DIR}).")]
SeedOpt = Annotated[int, typer.Option("--seed", min=0, max=2**32 - 1, help="Seed of the random weights.")]
BackendOpt = Annotated[str, typer.Option("--backend", help="onnxruntime | torch | transformers | tensorrt")]
TrtDecoderOpt = Annotated[Optional[str], typer.Option(
    "--trt-decoder", help="TensorRT-LLM engine of the tensorrt side: fp16 | w8a16 | w8a8_sq, with -kv8 for an INT8 KV "
                          "cache. \\[default: the one built for this host]")]
StudiesOpt = Annotated[Optional[Path], PathOption(
    "--studies", help="A study (file or folder: its series may be subfolders), a folder whose entries are studies (a "
    "PNG/JPEG each), or a "
    "JSONL manifest / phantom set (true labels).")]
MaxNewOpt = Annotated[int, typer.Option("--max-new-tokens", help="Generation limit per study.")]
# latency: None tells an explicit --max-new-tokens (refused with --stages vision, which decodes nothing) from none
LatencyMaxNewOpt = Annotated[Optional[int], typer.Option(
    "--max-new-tokens", help=f"Generation limit per study (default {DEFAULT_MAX_NEW_TOKENS}; not with --stages "
                             "vision).")]
IndicationOpt = Annotated[Optional[str], typer.Option("--indication", help="Exam indication added to the prompt.")]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", help="Intra-op threads for torch and ONNX Runtime.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu | cuda (torch side).")]
ProviderOpt = Annotated[str, typer.Option("--ort-provider", help="cpu | cuda | tensorrt (onnxruntime side).")]
SpinOpt = Annotated[bool, typer.Option("--ort-spin", help="ONNX Runtime threads busy-wait between operators (every "
                                       "onnxruntime side; for a machine doing nothing else).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the JSON report instead of Markdown.")]


def latency(
    bundle: BundleOpt = None,
    model: ModelOpt = None,
    base_model: BaseModelOpt = None,
    random_model: RandomOpt = None,
    work_dir: WorkDirOpt = None,
    seed: SeedOpt = 0,
    backend: BackendOpt = "onnxruntime",
    vs_backend: Optional[str] = typer.Option(None, "--vs-backend", help="Second backend, run interleaved."),
    vs_bundle: Optional[Path] = PathOption(None, "--vs-bundle", help="Second bundle (onnxruntime), run interleaved: "
                                             "INT8 against fp32, say."),
    studies: StudiesOpt = None,
    synthetic: Optional[int] = typer.Option(None, "--synthetic", help="Use N synthetic studies (default 1)."),
    stages: str = typer.Option("all", "--stages", help="all | vision (vision: read, preprocess, ViT + projector)."),
    runs: int = typer.Option(3, "--runs", help="Measured runs (each over every study and backend)."),
    warmup: int = typer.Option(1, "--warmup", help="Unmeasured runs first."),
    max_new_tokens: LatencyMaxNewOpt = None,
    indication: IndicationOpt = None,
    threads: ThreadsOpt = None,
    device: DeviceOpt = "cpu",
    ort_provider: ProviderOpt = "cpu",
    ort_spin: SpinOpt = False,
    trt_decoder: TrtDecoderOpt = None,
    as_json: JsonOpt = False,
    out: Optional[Path] = PathOption(None, "-o", "--out", file="report.md",
                                     help="Markdown report file to write (the .json and .png beside it)."),
) -> None:
    """Per-stage latency, tokens/s against the bandwidth floor, memory; ratios when two backends run."""
    from radtrt.benchmarks.api import run_latency

    if studies is None and synthetic is None:
        synthetic = 1
    sides = {backend, vs_backend or backend} | ({"onnxruntime"} if vs_bundle else set())
    given_work_dir = work_dir  # the default (a hidden folder) may lie in a --studies '.': never read
    work_dir = _refuse_unused(sides=sides, random_model=random_model, seed=seed, device=device,
                              ort_provider=ort_provider, ort_spin=ort_spin, model=model, base_model=base_model,
                              work_dir=work_dir, studies=studies, trt_decoder=trt_decoder)
    # the default value is accepted: reports before 2026-11-30 printed it in their vision-stage reproduce command
    if stages == "vision" and (indication is not None or max_new_tokens not in (None, DEFAULT_MAX_NEW_TOKENS)):
        fail("--stages vision runs no decoder: drop --indication / --max-new-tokens")
    if max_new_tokens is None:
        max_new_tokens = DEFAULT_MAX_NEW_TOKENS
    check_report_path(out)
    _check_work_dir(work_dir, random_model is not None or studies is None)
    check_outside_studies(studies, [("-o", out),
                                     ("--work-dir", given_work_dir if random_model is not None else None)])

    command = reproduce_command("latency", [
        *_model_options(bundle, model, base_model, random_model, work_dir, seed, studies), ("--backend", backend),
        ("--vs-backend", vs_backend), ("--vs-bundle", vs_bundle), ("--studies", studies), ("--synthetic", synthetic),
        ("--stages", stages), ("--runs", runs), ("--warmup", warmup),
        ("--max-new-tokens", None if stages == "vision" else max_new_tokens), ("--indication", indication),
        *_run_options(threads, device, ort_provider, ort_spin, trt_decoder, as_json, out)])
    with _progress() as progress:
        report = run_latency(
            bundle=bundle, model=model, base_model=base_model, random_model=random_model, work_dir=work_dir,
            seed=seed, backends=[backend] + ([vs_backend] if vs_backend else []), studies=studies,
            synthetic=synthetic, stages=stages, runs=runs, warmup=warmup, max_new_tokens=max_new_tokens,
            indication=indication, threads=threads, device=device, ort_provider=ort_provider, command=command,
            progress=progress, vs_bundle=vs_bundle, ort_spin=ort_spin, trt_decoder=trt_decoder)
    from radtrt.benchmarks.markdown import latency_markdown

    def chart(file: Path) -> bool:
        from radtrt.benchmarks.chart import matplotlib_available, save_chart

        if matplotlib_available():
            save_chart(report, file)
            return True
        err.print("radtrt: no PNG chart: matplotlib is not installed (pip install 'radtrt[bench]')", markup=False)
        return False

    _emit(latency_markdown(report), report.to_json(), as_json, out, chart)


def parity(
    bundle: BundleOpt = None,
    model: ModelOpt = None,
    base_model: BaseModelOpt = None,
    random_model: RandomOpt = None,
    work_dir: WorkDirOpt = None,
    seed: SeedOpt = 0,
    backend: BackendOpt = "onnxruntime",
    reference: str = typer.Option("torch", "--reference", help="torch | transformers | onnxruntime | tensorrt"),
    studies: StudiesOpt = None,
    synthetic: Optional[int] = typer.Option(None, "--synthetic", help="Use N synthetic studies (default 2)."),
    max_new_tokens: MaxNewOpt = DEFAULT_MAX_NEW_TOKENS,
    indication: IndicationOpt = None,
    threads: ThreadsOpt = None,
    device: DeviceOpt = "cpu",
    ort_provider: ProviderOpt = "cpu",
    ort_spin: SpinOpt = False,
    trt_decoder: TrtDecoderOpt = None,
    as_json: JsonOpt = False,
    out: Optional[Path] = PathOption(None, "-o", "--out", file="report.md",
                                     help="Markdown report file to write (the .json beside it)."),
    predictions_out: Optional[Path] = PathOption(
        None, "--predictions-out", help="Write reference.jsonl and candidate.jsonl here for 'radtrt eval --paired' "
                                        "(CheXprompt); needs --studies with ground-truth findings."),
) -> None:
    """Generated tokens, report text, first-step logits and image embeddings against a reference."""
    from radtrt.benchmarks.api import run_parity
    from radtrt.benchmarks.markdown import parity_markdown

    if studies is None and synthetic is None:
        synthetic = 2
    given_work_dir = work_dir  # the default (a hidden folder) may lie in a --studies '.': never read
    work_dir = _refuse_unused(sides={backend, reference}, random_model=random_model, seed=seed, device=device,
                              ort_provider=ort_provider, ort_spin=ort_spin, model=model, base_model=base_model,
                              work_dir=work_dir, studies=studies, trt_decoder=trt_decoder)
    check_report_path(out)
    _check_work_dir(work_dir, random_model is not None or studies is None)
    if predictions_out is not None:
        from radtrt.benchmarks.parity import check_predictions_dir

        check_predictions_dir(predictions_out)
    check_predictions_apart(predictions_out, out)
    check_outside_studies(studies, [("-o", out),
                                     ("--work-dir", given_work_dir if random_model is not None else None),
                                     ("--predictions-out", predictions_out)])
    command = reproduce_command("parity", [
        *_model_options(bundle, model, base_model, random_model, work_dir, seed, studies), ("--backend", backend),
        ("--reference", reference), ("--studies", studies), ("--synthetic", synthetic),
        ("--max-new-tokens", max_new_tokens), ("--indication", indication),
        *_run_options(threads, device, ort_provider, ort_spin, trt_decoder, as_json, out),
        ("--predictions-out", predictions_out)])
    with _progress() as progress:
        report = run_parity(
            bundle=bundle, model=model, base_model=base_model, random_model=random_model, work_dir=work_dir,
            seed=seed, backend=backend, reference=reference, studies=studies, synthetic=synthetic,
            max_new_tokens=max_new_tokens, indication=indication, threads=threads, device=device,
            ort_provider=ort_provider, command=command, progress=progress, need_findings=predictions_out is not None,
            ort_spin=ort_spin, trt_decoder=trt_decoder)
    if predictions_out is not None:
        from radtrt import interrupts
        from radtrt.benchmarks.parity import write_paired_predictions

        with interrupts.completing("paired predictions folder", predictions_out):
            ref, cand = write_paired_predictions(report, predictions_out)
    _emit(parity_markdown(report), report.to_json(), as_json, out)  # an earlier latency report's chart goes
    if predictions_out is not None:  # last: the next step, once every output is written
        err.print(plain(f"CheXprompt: radtrt eval --paired {shell_join([str(ref), str(cand)])} --metrics "
                        f"rouge,labels,chexprompt --endpoint URL --judge-model NAME"), highlight=False, soft_wrap=True)


def _model_options(bundle: Optional[Path], model: Optional[Path], base_model: Optional[Path],
                   random_model: Optional[str], work_dir: Path, seed: int, studies: Optional[Path]) -> list[tuple[str, Any]]:
    """What both benchmarks run, as their reproduce commands give it (the work dir and seed only where used)."""
    return [("--bundle", bundle), ("--model", model), ("--base-model", base_model), ("--random-model", random_model),
            ("--work-dir", work_dir if random_model or studies is None else None),
            ("--seed", seed if random_model else None)]


def _run_options(threads: Optional[int], device: str, ort_provider: str, ort_spin: bool, trt_decoder: Optional[str],
                 as_json: bool, out: Optional[Path]) -> list[tuple[str, Any]]:
    """How both benchmarks run their sides and where the report goes, as their reproduce commands give it."""
    return [("--threads", threads), ("--device", device), ("--ort-provider", ort_provider), ("--ort-spin", ort_spin),
            ("--trt-decoder", trt_decoder), ("--json", as_json), ("-o", out)]


def _refuse_unused(*, sides: set[str], random_model: Optional[str], seed: int, device: str, ort_provider: str,
                   ort_spin: bool, model: Optional[Path], base_model: Optional[Path], work_dir: Optional[Path],
                   studies: Optional[Path], trt_decoder: Optional[str] = None) -> Path:
    """Options of a side that does not run would be ignored without a word (and dropped from the reproduce
    command): the user believes they took effect. Returns the --work-dir to use (its default when not given)."""
    if model is not None and not sides & {"torch", "transformers"}:
        fail("--model is the torch / transformers side's model; none runs here (the onnxruntime side runs --bundle)")
    if work_dir is not None and random_model is None and studies is not None:
        fail("--work-dir caches random models and synthetic studies; with --studies and no --random-model it is "
             "not used")
    if base_model is not None and not sides & {"torch", "transformers"}:
        fail("--base-model completes --model for the torch / transformers side; none runs here")
    if seed != 0 and random_model is None:
        fail("--seed chooses the random weights of --random-model; it does not apply here")
    if device != "cpu" and not sides & {"torch", "transformers"}:
        fail("--device applies to the torch / transformers side; none runs here (--ort-provider for onnxruntime)")
    if (ort_provider != "cpu" or ort_spin) and "onnxruntime" not in sides:
        fail(f"{'--ort-provider' if ort_provider != 'cpu' else '--ort-spin'} applies to the onnxruntime side; "
             f"none runs here")
    if trt_decoder is not None and "tensorrt" not in sides:
        fail("--trt-decoder picks the tensorrt side's TensorRT-LLM engine; none runs here")
    if random_model is not None and "tensorrt" in sides:  # found after the build (minutes, at 7B) otherwise
        fail("--random-model builds an ONNX bundle without engines; the tensorrt side needs --bundle with engines "
             "built for this GPU ('radtrt export --bundle B --target tensorrt' and '--target trtllm')")
    return work_dir if work_dir is not None else DEFAULT_WORK_DIR


def register(app: typer.Typer) -> None:
    """Add ``radtrt bench latency`` and ``radtrt bench parity`` to ``app``."""
    bench = typer.Typer(no_args_is_help=True, help="Latency and parity benchmarks: Markdown and JSON reports (latency also a PNG chart).")
    bench.command("latency")(_guarded(latency))
    bench.command("parity")(_guarded(parity))
    app.add_typer(bench, name="bench")
