"""The benchmarks as library calls: resolve inputs, open backends, measure, and build the report.

The CLI is a thin layer over ``run_latency`` and ``run_parity``; scripts and notebooks call them
directly. ``progress`` is an optional rich ``Progress`` for stderr.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from radtrt.benchmarks.assets import check_vs_bundle_fits, resolve_assets, study_entries, study_paths
from radtrt.benchmarks.latency import BackendInfo, LatencyReport, LatencySettings, build_report, measure
from radtrt.benchmarks.machine import (
    PEAK_AFTER_BUILD,
    PEAK_WHILE_MEASURED,
    PEAK_WHOLE_PROCESS,
    gpu_peak_memory_mb,
    machine_info,
    peak_rss_mb,
    reset_peak_rss,
)
from radtrt.benchmarks.parity import ParityReport, measure_parity, prompts_note, study_indication, study_names
from radtrt.benchmarks.sides import open_sides
from radtrt.errors import fail
from radtrt.threads import check_threads


class _Step:
    """One progress line that each step of a benchmark rewrites."""

    def __init__(self, progress: Any, first: str) -> None:
        self.progress = progress
        self.task = progress.add_task(first, total=None) if progress else None

    def __call__(self, description: str) -> None:
        if self.progress:
            self.progress.update(self.task, description=description)


def run_latency(*, bundle: Path | None = None, model: Path | None = None, base_model: Path | None = None,
                random_model: str | None = None, work_dir: Path, seed: int = 0, backends: list[str],
                studies: Path | None = None, synthetic: int | None = None, stages: str = "all", runs: int = 3,
                warmup: int = 1, max_new_tokens: int = 64, indication: str | None = None,
                threads: int | None = None, device: str = "cpu", ort_provider: str = "cpu", command: str = "",
                progress: Any = None, bandwidth_probe: bool = True, vs_bundle: Path | None = None,
                ort_spin: bool = False, trt_decoder: str | None = None) -> LatencyReport:
    from radtrt.benchmarks.bandwidth import measure_gemv_bandwidth

    settings = LatencySettings(stages=stages, runs=runs, warmup=warmup, max_new_tokens=max_new_tokens,
                               indication=indication)
    check_threads(threads)  # before a random model is built and exported, not after
    if random_model is not None and vs_bundle is not None:  # before the build, not after it
        check_vs_bundle_fits(random_model, stages == "vision", vs_bundle)
    machine = machine_info()  # before anything heavy runs: the load average is other work's
    paths = study_paths(studies, synthetic, work_dir, default_synthetic=1)  # refused before a random model's build
    assets = resolve_assets(model=model, bundle=bundle, random_model=random_model, work_dir=work_dir, seed=seed,
                            vision_only=stages == "vision", progress=progress)
    step = _Step(progress, "opening backends")
    # the peak memory is of loading and measuring the backends: the random model's build before and the
    # bandwidth probe's matrix between are left out where the kernel can restart the high-water mark
    scoped = reset_peak_rss()
    sides = open_sides(backends, assets, base_model=base_model, device=device, ort_provider=ort_provider,
                       threads=threads, vs_bundle=vs_bundle, ort_spin=ort_spin, trt_decoder=trt_decoder)
    for side in sides:  # refused before any study: its times would be one call's, copies included
        if not getattr(side.pipeline.backend, "streams_cheaply", True):
            fail(f"{side.name}: its TensorRT-LLM engine keeps generation logits (built with --trtllm-logits, for "
                 f"parity), and this TensorRT-LLM copies all of them at every streamed step, so its first token "
                 f"cannot be timed apart and decoding reads slow; time an engine built without --trtllm-logits")
        if stages != "vision":  # a prompt past the positions was refused after the bandwidth probe and a first run
            side.pipeline.check_fits(indication, max_new_tokens)
    peak = peak_rss_mb()
    bandwidth = None
    if stages == "all" and bandwidth_probe:
        step("measuring matrix-vector bandwidth")
        bandwidth = measure_gemv_bandwidth(decoder=sides[0].pipeline.cfg.decoder)
        scoped = reset_peak_rss() and scoped
    samples = measure(sides, paths, settings, on_step=step)
    peak = max(peak, peak_rss_mb())
    pipeline = sides[0].pipeline
    prompt_tokens = len(pipeline.prompt_ids(indication)) - 1 + pipeline.cfg.num_image_tokens
    machine.torch_threads = _torch_threads()
    return build_report(command=command, model=assets.label, settings=settings, machine=machine,
                        infos=[BackendInfo.of(s) for s in sides], samples=samples, n_studies=len(paths),
                        study_names=study_names(paths),
                        prompt_tokens=prompt_tokens, image_tokens=pipeline.cfg.num_image_tokens,
                        bandwidth=bandwidth, peak_rss_mb=peak, gpu_peak_memory_mb=gpu_peak_memory_mb(),
                        peak_rss_scope=(PEAK_WHOLE_PROCESS if not scoped else
                                        PEAK_AFTER_BUILD if assets.built else PEAK_WHILE_MEASURED))


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def run_parity(*, bundle: Path | None = None, model: Path | None = None, base_model: Path | None = None,
               random_model: str | None = None, work_dir: Path, seed: int = 0, backend: str = "onnxruntime",
               reference: str = "torch", studies: Path | None = None, synthetic: int | None = None,
               max_new_tokens: int = 64, indication: str | None = None, threads: int | None = None,
               device: str = "cpu", ort_provider: str = "cpu", command: str = "",
               progress: Any = None, need_findings: bool = False, ort_spin: bool = False,
               trt_decoder: str | None = None) -> ParityReport:
    """``need_findings``: refuse, before any work, studies without ground-truth findings (for CheXprompt)."""
    if max_new_tokens < 1:  # checked before both backends load (it ended as "returned no logits")
        fail("--max-new-tokens must be at least 1")
    check_threads(threads)
    if need_findings and studies is None:
        fail("--predictions-out needs --studies with ground-truth findings (a phantom set from 'radtrt data "
             "phantoms', or a JSONL manifest with 'findings')")
    machine = machine_info()
    entries = study_entries(studies, synthetic, work_dir, default_synthetic=2)  # refused before a random model's build
    if need_findings and any(e.findings is None for e in entries):
        fail(f"--predictions-out needs ground-truth findings for every study; {studies} has studies without them")
    if need_findings and len(set(study_names([e.study for e in entries]))) != len(entries):  # before the run
        fail(f"--predictions-out: {studies} lists a study twice (the predictions name each study once)")
    assets = resolve_assets(model=model, bundle=bundle, random_model=random_model, work_dir=work_dir, seed=seed,
                            vision_only=False, progress=progress)
    step = _Step(progress, "opening backends")
    got, ref = open_sides([backend, reference], assets, base_model=base_model, device=device,
                          ort_provider=ort_provider, threads=threads, ort_spin=ort_spin, trt_decoder=trt_decoder)
    names = study_names([e.study for e in entries])
    # each prompt checked once, its remedy naming where its indication came from
    asked = {study_indication(e, indication): (f"the indication of {name} in {studies}" if e.indication is not None
                                               else "--indication") for e, name in zip(entries, names)}
    for side in (got, ref):  # parity compares logits: refused now, not after the first study
        for one, source in asked.items():
            side.pipeline.check_fits(one, max_new_tokens, source=source)
        if not getattr(side.pipeline.backend, "keeps_logits", True):
            fail(f"{side.name}: its TensorRT-LLM engine was built without generation logits, which parity compares; "
                 f"'radtrt bench latency' times it, and 'radtrt export --bundle B --model M --target trtllm "
                 f"--trtllm-logits' builds one that keeps them")
    results = measure_parity(got.pipeline, ref.pipeline, entries, indication=indication,
                             max_new_tokens=max_new_tokens, on_step=step)
    machine.torch_threads = _torch_threads()
    precision = f"{got.pipeline.backend.precision} vs {ref.pipeline.backend.precision}"
    return ParityReport(command=command, model=assets.label, backend=got.name, reference=ref.name,
                        precision=precision, max_new_tokens=max_new_tokens, machine=machine, studies=results,
                        prompts=prompts_note(entries, indication))
