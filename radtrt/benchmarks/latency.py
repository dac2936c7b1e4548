"""``radtrt bench latency``: per-stage timings of whole pipelines, optionally two backends interleaved.

Each measured run sends every study through every backend. With two backends the order alternates
run by run (A,B then B,A) in one process on the same inputs, so thermal state, other load on the
machine and cache warmth affect both alike; the ratios printed are of medians from this one run.
Warmup runs go through the same code and are discarded.

Measurement (``measure``) and summarizing (``build_report``) are separate so the summary math is
tested on fake timings, without timing anything.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from radtrt.benchmarks.bandwidth import Bandwidth, DecodeFloor, decode_floor, kv_bytes_per_step
from radtrt.benchmarks.machine import PEAK_WHOLE_PROCESS, MachineInfo
from radtrt.benchmarks.sides import Side
from radtrt.benchmarks.stats import Summary, rates, ratio, summarize
from radtrt.errors import fail
from radtrt.runtime.pipeline import Pipeline

FULL_STAGES = ("preprocess", "vision", "prefill", "decode_per_token", "end_to_end")
VISION_STAGES = ("preprocess", "vision", "end_to_end")
STAGE_MODES = {"all": FULL_STAGES, "vision": VISION_STAGES}


@dataclass(frozen=True)
class LatencySettings:
    stages: str = "all"  # "all" or "vision"
    runs: int = 3
    warmup: int = 1
    max_new_tokens: int = 64
    indication: str | None = None

    def __post_init__(self) -> None:
        if self.stages not in STAGE_MODES:
            fail(f"unknown --stages '{self.stages}' ({', '.join(STAGE_MODES)})")
        if self.runs < 1:
            fail("--runs must be at least 1")
        if self.warmup < 0:
            fail("--warmup cannot be negative")
        if self.max_new_tokens < 1:
            fail("--max-new-tokens must be at least 1")
        if self.max_new_tokens < 2 and "decode_per_token" in STAGE_MODES[self.stages]:
            fail("decode per token needs --max-new-tokens 2 or more (the first token comes from the prefill)")


@dataclass(frozen=True)
class Sample:
    """One measured pass of one study through one backend."""

    backend: str
    run: int
    study: int
    timings_ms: dict[str, float]
    new_tokens: int = 0


@dataclass(frozen=True)
class BackendInfo:
    """What the report needs to know about a backend besides its timings."""

    name: str
    precision: str
    settings: dict[str, Any]
    load_seconds: float
    rss_added_mb: float | None
    weight_bytes: int
    kv_geometry: tuple[int, int, int]  # decoder layers, KV heads, head dim
    kv_dtype_bytes: int = 4

    @classmethod
    def of(cls, side: Side) -> "BackendInfo":
        d = side.pipeline.cfg.decoder
        return cls(side.name, side.pipeline.backend.precision, side.settings, side.load_seconds,
                   side.rss_added_mb, side.weight_bytes, (d.num_hidden_layers, d.num_key_value_heads, d.head_dim),
                   side.kv_dtype_bytes)


def run_vision_only(pipeline: Pipeline, study: Path, settings: LatencySettings) -> tuple[dict[str, float], int]:
    """Read + preprocess + vision tower and projector, timed like ``Pipeline.run`` times them."""
    from radtrt.imaging.study import load_study

    cfg = pipeline.cfg
    t0 = time.perf_counter()
    image = load_study(study)
    pixels = cfg.preprocessing(image.pixels_u8)
    t1 = time.perf_counter()
    pipeline.backend.encode_images(pixels[None])
    t2 = time.perf_counter()
    return {"preprocess": (t1 - t0) * 1e3, "vision": (t2 - t1) * 1e3, "end_to_end": (t2 - t0) * 1e3}, 0


def run_full(pipeline: Pipeline, study: Path, settings: LatencySettings) -> tuple[dict[str, float], int]:
    result = pipeline.run(study, indication=settings.indication, max_new_tokens=settings.max_new_tokens)
    return dict(result.timings_ms), len(result.token_ids)


RUNNERS: dict[str, Callable[[Pipeline, Path, LatencySettings], tuple[dict[str, float], int]]] = {
    "all": run_full, "vision": run_vision_only}


def run_order(names: list[str], run: int) -> list[int]:
    """Indices of the backends in the order run ``run`` uses: as given on even runs, reversed on odd."""
    order = list(range(len(names)))
    return order if run % 2 == 0 else order[::-1]


def measure(sides: list[Side], studies: list[Path], settings: LatencySettings,
            on_step: Callable[[str], None] | None = None) -> list[Sample]:
    """Warmup, then ``runs`` interleaved passes; returns the measured samples only."""
    runner = RUNNERS[settings.stages]
    samples = []
    for run in range(-settings.warmup, settings.runs):
        for s, study in enumerate(studies):
            for i in run_order([side.name for side in sides], run):
                side = sides[i]
                if on_step:
                    what = "warmup" if run < 0 else f"run {run + 1}/{settings.runs}"
                    on_step(f"{what}: {side.name} on study {s + 1}/{len(studies)}")
                timings, n = runner(side.pipeline, study, settings)
                if run >= 0:
                    samples.append(Sample(side.name, run, s, timings, n))
    return samples


@dataclass
class BackendLatency:
    info: BackendInfo
    stages: dict[str, Summary]
    tokens_per_s: Summary | None
    new_tokens: Summary | None
    floor: DecodeFloor | None
    samples: list[Sample] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self.info), "stages_ms": {k: v.to_json() for k, v in self.stages.items()},
                "tokens_per_s": self.tokens_per_s.to_json() if self.tokens_per_s else None,
                "new_tokens": self.new_tokens.to_json() if self.new_tokens else None,
                "decode_floor": self.floor.to_json() if self.floor else None,
                "samples": [asdict(s) for s in self.samples]}


@dataclass
class LatencyReport:
    command: str
    model: str
    settings: LatencySettings
    machine: MachineInfo
    n_studies: int
    prompt_tokens: int
    image_tokens: int
    backends: list[BackendLatency]
    bandwidth: Bandwidth | None
    peak_rss_mb: float
    gpu_peak_memory_mb: float | None
    peak_rss_scope: str = PEAK_WHOLE_PROCESS  # what the peak covers (``radtrt.benchmarks.machine``)
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    study_names: list[str] = field(default_factory=list)  # what each sample's ``study`` index names

    @property
    def stage_names(self) -> tuple[str, ...]:
        return STAGE_MODES[self.settings.stages]

    def ratios(self) -> dict[str, float | None]:
        """Medians of the first backend over the second (time: < 1 = first faster; tokens/s: > 1)."""
        if len(self.backends) < 2:
            return {}
        a, b = self.backends[0], self.backends[1]
        out = {stage: ratio(a.stages[stage].median, b.stages[stage].median) for stage in self.stage_names}
        if a.tokens_per_s and b.tokens_per_s:
            out["tokens_per_s"] = ratio(a.tokens_per_s.median, b.tokens_per_s.median)
        return out

    def to_json(self) -> dict[str, Any]:
        vision = self.settings.stages == "vision"  # no prompt or decoder ran: none is recorded as if it had
        settings = asdict(self.settings) | ({"max_new_tokens": None, "indication": None} if vision else {})
        return {"kind": "latency", "command": self.command, "created": self.created, "model": self.model,
                "settings": settings, "machine": self.machine.to_json(), "studies": self.n_studies,
                "study_names": self.study_names,
                "prompt_tokens": None if vision else self.prompt_tokens, "image_tokens": self.image_tokens,
                "bandwidth": self.bandwidth.to_json() if self.bandwidth else None,
                "peak_rss_mb": round(self.peak_rss_mb, 1), "peak_rss_scope": self.peak_rss_scope,
                "gpu_peak_memory_mb": self.gpu_peak_memory_mb,
                "backends": [b.to_json() for b in self.backends],
                "ratios": {"numerator": self.backends[0].info.name,
                           "denominator": self.backends[1].info.name if len(self.backends) > 1 else None,
                           "of_medians": self.ratios()}}


def summarize_backend(info: BackendInfo, samples: list[Sample], stages: tuple[str, ...], prompt_tokens: int,
                      bandwidth: Bandwidth | None) -> BackendLatency:
    mine = [s for s in samples if s.backend == info.name]
    if not mine:
        fail(f"no measured samples for backend {info.name}")
    # decode per token over the passes that ran a decode step (the pipeline's rule: the step that produced EOS counts,
    # so one token then EOS is one measured step); a pass whose first token was EOS ran none
    decoding = [s for s in mine if s.timings_ms.get("decode_per_token", 0) > 0]
    if "decode_per_token" in stages and not decoding:
        fail(f"{info.name} ran no decode step for any study (each one's first token was EOS): decode per token "
             f"was not measured; use other studies, or --stages vision")
    summaries = {stage: summarize([s.timings_ms[stage] for s in (decoding if stage == "decode_per_token" else mine)])
                 for stage in stages}
    if "decode_per_token" not in stages:
        return BackendLatency(info, summaries, None, None, None, mine)
    tps = rates([s.timings_ms["decode_per_token"] for s in decoding])  # 1e3 / the decode ms per token shown
    new_tokens = summarize([s.new_tokens for s in mine])
    floor = None
    if bandwidth is not None:
        layers, kv_heads, head_dim = info.kv_geometry
        mean_context = prompt_tokens + new_tokens.mean / 2
        kv = kv_bytes_per_step(layers, kv_heads, head_dim, mean_context, info.kv_dtype_bytes)
        floor = decode_floor(info.weight_bytes, bandwidth, tps.median, kv)
    return BackendLatency(info, summaries, tps, new_tokens, floor, mine)


def build_report(*, command: str, model: str, settings: LatencySettings, machine: MachineInfo,
                 infos: list[BackendInfo], samples: list[Sample], n_studies: int, prompt_tokens: int,
                 image_tokens: int, bandwidth: Bandwidth | None, peak_rss_mb: float,
                 gpu_peak_memory_mb: float | None = None, peak_rss_scope: str = PEAK_WHOLE_PROCESS,
                 study_names: list[str] | None = None) -> LatencyReport:
    stages = STAGE_MODES[settings.stages]
    backends = [summarize_backend(info, samples, stages, prompt_tokens, bandwidth) for info in infos]
    return LatencyReport(command, model, settings, machine, n_studies, prompt_tokens, image_tokens, backends,
                         bandwidth, peak_rss_mb, gpu_peak_memory_mb, peak_rss_scope, study_names=study_names or [])
