"""Open a pipeline from CLI-level choices and run studies, reporting progress on stderr."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import torch
from rich.console import Console

from radtrt import interrupts
from radtrt.errors import RadtrtError, fail, printable
from radtrt.outputs import broken_link
from radtrt.progress import plain
from radtrt.imaging.study import split_studies, study_error, study_warnings
from radtrt.model.loading import load_model
from radtrt.runtime.backends import DTYPES, TorchBackend, choose_backend, resolve_device
from radtrt.runtime.pipeline import Pipeline, PreparedStudy, StudyFailure, StudyResult


def check_studies_exist(studies: list[Path]) -> None:
    """Fail before the (slow) model load when a study path is mistyped."""
    for study in studies:
        if not study.exists():
            fail(f"study {study} is {broken_link(study)}" if broken_link(study) else f"study not found: {study}")


def expand_studies(studies: list[Path], *, allow_any_modality: bool, console: Console,
                   filed: bool = False) -> list[Path]:
    """Each folder of several studies (one per entry) in place of the folder, said on ``console``. ``filed``: each
    study gets an SR (``--sr-out``), so none may be given twice."""
    out: list[Path] = []
    given: list[Path] = []  # the argument each came from, for the messages
    for study in studies:
        try:
            parts = split_studies(study, allow_any_modality=allow_any_modality) if study.is_dir() else [study]
        except RadtrtError as e:  # named as given ('.', a path), not by the folder's last part
            fail(study_error(study, e))
        if len(parts) > 1:
            console.print(plain(f"{study}: a folder of {len(parts)} studies (one per entry); each is reported on"),
                          highlight=False, soft_wrap=True)
        out.extend(parts)
        given.extend([study] * len(parts))
    if filed:
        _check_given_once(out, given)
    return out


def _check_given_once(studies: list[Path], given: list[Path]) -> None:
    """Refuse a study named twice (``s``, ``s/``, or its folder and a file in it): each copy got its own SR, so one
    study was filed several times (without SRs a repeat only prints its report again)."""
    def named(i: int) -> str:  # a study found in a folder of studies is said to be there
        return str(studies[i]) if studies[i] == given[i] else f"{studies[i]} (in {given[i]})"

    seen: dict[Path, int] = {}
    for i, study in enumerate(studies):
        resolved = study.resolve()
        if resolved in seen and given[seen[resolved]].resolve() == given[i].resolve():  # 'S S/' read 'S and S are'
            fail(f"{given[i]} is given twice: each study would get two SRs; give it once")
        if resolved in seen:
            fail(f"{named(seen[resolved])} and {named(i)} are the same study, given twice: each would get an SR; "
                 f"give it once")
        seen[resolved] = i
    for i, study in enumerate(studies):
        holder = next((seen[p] for p in study.resolve().parents if p in seen), None)
        if holder is not None:
            fail(f"{named(i)} is inside the study {named(holder)}: the study is given twice, and each would get an "
                 f"SR; give it once")


def infer_studies(studies: list[Path], *, console: Console, model: Path | None = None,
                  base_model: Path | None = None, bundle: Path | None = None, backend: str = "auto",
                  device: str | None = None, dtype: str | None = None, indication: str | None = None,
                  max_new_tokens: int = 256, batch_size: int = 1, sr_out: Path | None = None,
                  allow_any_modality: bool = False, ort_provider: str = "auto", trt_cache: Path | None = None,
                  ort_spin: bool = False, trt_decoder: str | None = None) -> Iterator[StudyResult | StudyFailure]:
    """``radtrt infer`` as a library call: one record per study, in the order given (see :func:`run_studies`).

    What can be refused without the model (a mistyped study, an indication the prompt refuses, an unusable
    ``sr_out``) is refused before the slow model load, not after the first study was generated."""
    from radtrt.model.prompt import build_query

    check_studies_exist(studies)
    studies = expand_studies(studies, allow_any_modality=allow_any_modality, console=console, filed=sr_out is not None)
    build_query(indication)
    if sr_out is not None:
        from radtrt.outputs import check_folder_target

        check_folder_target(sr_out, "--sr-out folder")
        if sr_out.is_dir():
            from radtrt.imaging.sr import remove_unfinished_srs

            if cleared := remove_unfinished_srs(sr_out):
                console.print(plain(f"radtrt: removed {cleared} unfinished SR file{'s' if cleared > 1 else ''} that "
                                    f"a killed run left in {sr_out}"), highlight=False, soft_wrap=True)
    pipeline = open_pipeline(model=model, base_model=base_model, bundle=bundle, backend=backend, device=device,
                             dtype=dtype, console=console, ort_provider=ort_provider, trt_cache=trt_cache,
                             ort_spin=ort_spin, trt_decoder=trt_decoder)
    yield from run_studies(pipeline, studies, indication=indication, max_new_tokens=max_new_tokens,
                           allow_any_modality=allow_any_modality, sr_out=sr_out, console=console,
                           batch_size=batch_size)


def open_pipeline(*, model: Path | None, base_model: Path | None, bundle: Path | None, backend: str,
                  device: str | None,
                  dtype: str | None, console: Console, ort_provider: str = "auto", trt_cache: Path | None = None,
                  ort_spin: bool = False, trt_decoder: str | None = None) -> Pipeline:
    """The pipeline for the CLI-level choices: picks the backend (``--backend auto``: TensorRT > ONNX Runtime >
    torch), says on ``console`` what it chose and why, and refuses every option the chosen backend would not
    use, since an option silently ignored is one the user believes took effect."""
    from radtrt.runtime.ort import usable_providers

    if base_model is not None and model is None:  # it completes a release --model; alone it would be ignored
        if bundle is not None:  # "pass --model too" sent the user to the --model refusal below
            fail("--base-model is not used with --bundle: the bundle holds its decoder already; drop --base-model")
        fail("--base-model names the Vicuna folder of a LLaVA-Rad release given with --model; pass --model too")
    for flag, path in (("--model", model), ("--base-model", base_model)):
        if path is not None and not path.exists():  # found even when the bundle's backend would not read it
            fail(f"{flag} directory not found: {path}")
    providers = usable_providers() if bundle is not None else []  # onnxruntime-gpu lists CUDA without a GPU
    cpu = device == "cpu"
    from radtrt.exporter.gpu import detect_gpu

    gpu = detect_gpu() if bundle is not None and backend == "auto" and not cpu else None
    trt_ready, trt_unusable = _trt_ready(bundle, gpu, trt_decoder) if gpu is not None and bundle is not None \
        else (False, None)
    chosen, why = choose_backend(backend, bundle=bundle is not None, model=model is not None, ort_providers=providers,
                                 trt_ready=trt_ready, cpu=cpu, gpu_here=gpu is not None or cpu or backend != "auto",
                                 trt_unusable=trt_unusable)
    _refuse_unused(chosen, why, dtype=dtype, ort_provider=ort_provider, trt_cache=trt_cache, ort_spin=ort_spin,
                   model=model, bundle=bundle, trt_decoder=trt_decoder)
    dtype = "float32" if dtype is None else dtype  # an empty one (an unset shell variable) is refused below
    if chosen == "onnxruntime":
        assert bundle is not None
        return _open_ort(bundle, device, ort_provider, trt_cache, why, console, ort_spin)
    if chosen == "tensorrt":
        assert bundle is not None
        return _open_trt(bundle, why, console, trt_decoder)
    device = resolve_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype not in DTYPES:
        fail(f"unknown dtype '{dtype}' ({', '.join(DTYPES)})")
    if model is None:
        from radtrt.model.default_model import load_default_model

        with console.status("loading radtrt's embedded default model"):
            loaded = load_default_model(dtype=DTYPES[dtype], device=device, console=console)
    else:
        with console.status(plain(f"loading model from {model}")):
            loaded = load_model(model, base_model, dtype=DTYPES[dtype], device=device)
    console.print(plain(f"backend: {chosen} ({why}), device {device}, {dtype}; model {loaded.name}"), highlight=False,
                  soft_wrap=True)
    return Pipeline(TorchBackend(loaded.model, device), loaded.tokenizer, loaded.model.cfg, model_name=loaded.name)


def _refuse_unused(chosen: str, why: str, *, dtype: str | None, ort_provider: str, trt_cache: Path | None,
                   ort_spin: bool, model: Path | None = None, bundle: Path | None = None,
                   trt_decoder: str | None = None) -> None:
    """Options of a backend this run does not use are refused, not ignored: the user believes they took effect."""
    if chosen != "tensorrt" and trt_decoder is not None:
        fail(f"--trt-decoder picks a TensorRT-LLM engine of the tensorrt backend; this run uses {chosen} ({why})")
    if chosen != "onnxruntime":
        given = [flag for flag, used in (("--ort-provider", ort_provider != "auto"), ("--trt-cache", trt_cache),
                                         ("--ort-spin", ort_spin)) if used]
        if given:
            fail(f"{given[0]} applies to the onnxruntime backend; this run uses {chosen} ({why})")
    elif trt_cache is not None and ort_provider != "tensorrt":
        fail("--trt-cache is the TensorRT execution provider's engine cache: pass --ort-provider tensorrt too")
    if chosen != "torch" and dtype is not None:
        fail(f"--dtype applies to the torch backend; this run uses {chosen} ({why}), which runs the bundle in the "
             f"precision it was exported in")
    if chosen == "torch" and bundle is not None:
        fail(f"--bundle is not used: this run uses torch ({why}), which runs --model; drop --bundle or --model")
    if chosen != "torch" and model is not None:
        fail(f"--model is not used: this run uses {chosen} ({why}) on --bundle; drop --model, or pass "
             f"--backend torch and drop --bundle to run the model")


def _trt_ready(bundle: Path, gpu: Any, decoder: str | None = None) -> tuple[bool, str | None]:  # GpuInfo
    """(whether ``--backend auto`` runs the bundle's engines, why not when it holds a pair for this GPU that cannot
    run here): picking tensorrt and then refusing left the user to find ``--backend onnxruntime`` alone."""
    from radtrt.exporter.gpu import tensorrt_problem
    from radtrt.runtime.tensorrt import engines_problem, usable_engines

    engines = usable_engines(bundle, gpu)
    if not (engines["vision"] and engines["decoder"]):
        return False, None
    problem = tensorrt_problem(gpu)
    if problem:  # TensorRT installed but not loading (libnvinfer missing): the engines match, the import fails
        return False, f"the bundle's TensorRT engines for this GPU cannot run here ({problem})"
    problem = engines_problem(bundle, gpu, decoder)
    if problem:  # the checks --backend tensorrt makes: auto picked it, and then it refused
        return False, f"the bundle's TensorRT engines for this GPU do not fit it ({problem})"
    return True, None


def _open_trt(bundle: Path, why: str, console: Console, decoder: str | None = None) -> Pipeline:
    from radtrt.exporter.bundle import read_bundle_side
    from radtrt.runtime.tensorrt import TensorRTBackend

    with console.status(plain(f"verifying bundle {bundle} and loading its TensorRT engines")):
        backend = TensorRTBackend(bundle, decoder=decoder)
        cfg, tokenizer = read_bundle_side(bundle)
    name = backend.manifest["model"]["name"]
    console.print(plain(f"backend: tensorrt ({why}), {backend.precision}, decoder engine batch up to "
                        f"{backend.limits['max_batch']} (a larger --batch-size runs in parts); model {name}"),
                  highlight=False, soft_wrap=True)
    return Pipeline(backend, tokenizer, cfg, model_name=name)


def _open_ort(bundle: Path, device: str | None, ort_provider: str, trt_cache: Path | None, why: str,
              console: Console, spin: bool = False) -> Pipeline:
    from radtrt.exporter.bundle import read_bundle_side
    from radtrt.runtime.ort import OrtBackend, usable_providers

    if device not in (None, "cpu", "cuda"):
        fail(f"unknown device '{device}' (cpu or cuda)")
    on_gpu = ort_provider in ("cuda", "tensorrt")
    if device is not None and ort_provider != "auto" and (device == "cuda") != on_gpu:  # one would be ignored
        fail(f"--device {device} contradicts --ort-provider {ort_provider} (ONNX Runtime's provider decides where "
             f"a bundle runs); give one of them")
    if ort_provider == "auto":
        gpu = "CUDAExecutionProvider" in usable_providers()
        ort_provider = "cuda" if device == "cuda" or (device is None and gpu) else "cpu"
    with console.status(plain(f"verifying and loading bundle {bundle}")):
        backend = OrtBackend(bundle, provider=ort_provider, trt_cache=trt_cache, spin=spin)
        cfg, tokenizer = read_bundle_side(bundle)
    name = backend.manifest["model"]["name"]
    console.print(plain(f"backend: onnxruntime ({why}), provider {ort_provider}{', spinning threads' if spin else ''}, "
                        f"{backend.precision}; model {name}"), highlight=False, soft_wrap=True)
    note = backend.attention_note()
    if note:
        console.print(plain(f"note: {note}"), highlight=False, soft_wrap=True)
    return Pipeline(backend, tokenizer, cfg, model_name=name)


def run_studies(pipeline: Pipeline, studies: list[Path], *, indication: str | None, max_new_tokens: int,
                allow_any_modality: bool, sr_out: Path | None, console: Console,
                batch_size: int = 1) -> Iterator[StudyResult | StudyFailure]:
    """Yield one record per study, in the order given; a bad study gets one stderr line and the rest still run.

    Raises one ``RadtrtError`` at the end when any study failed, so the exit code is 2: a lone study's own
    error, or a count of the failures whose lines came before.
    """
    if batch_size < 1:
        fail("--batch-size must be at least 1")
    if max_new_tokens < 1:  # the CLI's option refuses it; a library call got records of no tokens, 'truncated'
        fail("--max-new-tokens must be at least 1")
    pipeline.check_fits(indication, max_new_tokens)
    failures: list[StudyFailure] = []

    def failure(study: Path, error: RadtrtError, stage: str) -> StudyFailure:
        failures.append(StudyFailure(study=str(study), error=study_error(study, error), stage=stage))
        if len(studies) > 1:  # a lone study's error is the final line the CLI prints
            console.print(f"radtrt: error: {printable(failures[-1].error)}", markup=False, highlight=False, soft_wrap=True)
        return failures[-1]

    done = 0
    for start in range(0, len(studies), batch_size):
        chunk = studies[start:start + batch_size]
        outcomes: list[PreparedStudy | StudyFailure] = []
        for study in chunk:
            try:
                outcomes.append(pipeline.prepare(study, indication=indication, allow_any_modality=allow_any_modality))
            except RadtrtError as e:
                outcomes.append(failure(study, e, "input"))
                continue
            for warning in study_warnings(study, outcomes[-1].image):
                console.print(f"radtrt: warning: {printable(warning)}", markup=False, highlight=False, soft_wrap=True)
        prepared = [o for o in outcomes if isinstance(o, PreparedStudy)]
        results: Iterator[StudyResult] = iter(())
        if prepared:
            with console.status(f"[{done + 1}-{done + len(prepared)}/{len(studies)}] generating"):
                results = iter(pipeline.generate(prepared, max_new_tokens=max_new_tokens))
            done += len(prepared)
        for outcome in outcomes:  # the order given, failures in their place
            if isinstance(outcome, StudyFailure):
                yield outcome
                continue
            result = next(results)
            yield result
            if sr_out is not None:  # after the report is out: an SR that cannot be written does not lose it
                from radtrt.imaging.sr import write_sr

                assert result.image is not None
                refused: RadtrtError | None = None
                # the SR and its line as one step: an interrupt between them left an SR that no line named
                with interrupts.deferred():
                    try:
                        path = write_sr(result.report, result.image, sr_out, model_name=pipeline.model_name,
                                        model_version=pipeline.model_version, complete=result.stop_reason == "eos")
                    except RadtrtError as e:
                        refused = e
                    else:  # named after a new UID: which study's it is was said nowhere
                        console.print(plain(f"structured report of {result.study}: {path}"), highlight=False,
                                      soft_wrap=True)
                if refused is not None:
                    yield failure(Path(result.study), refused, "sr")
    if len(studies) == 1 and failures:
        fail(failures[0].error)  # the line its --json record holds
    if failures:
        fail(f"{len(failures)} of {len(studies)} studies failed (see the lines above)")
