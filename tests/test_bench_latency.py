"""Latency bench: interleaving, warmup exclusion, summary math on fake timings, Markdown/JSON/PNG reports."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest

from radtrt.benchmarks.bandwidth import Bandwidth
from radtrt.benchmarks.chart import matplotlib_available, stage_medians, write_chart
from radtrt.benchmarks.latency import (
    BackendInfo,
    LatencyReport,
    LatencySettings,
    Sample,
    build_report,
    measure,
    run_order,
)
from radtrt.benchmarks.machine import MachineInfo, machine_info, peak_rss_mb
from radtrt.benchmarks.markdown import latency_markdown
from radtrt.benchmarks.sides import Side
from radtrt.errors import RadtrtError

MACHINE = MachineInfo(cpu="Test CPU", logical_cores=2, usable_cores=2, platform="Linux-test", python="3.11",
                      load_average=(0.1, 0.2, 0.3), torch_threads=2, versions={"radtrt": "0"})
BW = Bandwidth(gb_per_s=27.0, matrix_bytes=512 << 20, best_ms=20.0, median_ms=21.0, repeats=10, threads=2)


@dataclass
class FakePipeline:
    """Records the order of runs; returns fixed timings scaled per backend."""

    name: str
    scale: float
    log: list[str]
    cfg: object = None
    backend: object = field(init=False)

    def __post_init__(self) -> None:
        self.backend = SimpleNamespace(name=self.name, precision="fp32")

    def run(self, study: Path, *, indication: str | None, max_new_tokens: int) -> SimpleNamespace:
        self.log.append(f"{self.name}:{study.name}")
        t = {"preprocess": 10.0, "vision": 100.0 * self.scale, "prefill": 50.0 * self.scale, "decode": 99.0,
             "decode_per_token": 10.0 * self.scale, "end_to_end": 500.0 * self.scale}
        return SimpleNamespace(timings_ms=t, token_ids=list(range(max_new_tokens)))


def _info(name: str, weight_bytes: int = 270_000_000) -> BackendInfo:
    return BackendInfo(name=name, precision="fp32", settings={"threads": 2}, load_seconds=1.5, rss_added_mb=900.0,
                       weight_bytes=weight_bytes, kv_geometry=(12, 16, 64))


def test_run_order_alternates() -> None:
    assert run_order(["a", "b"], 0) == [0, 1] and run_order(["a", "b"], 1) == [1, 0]
    assert run_order(["a"], 3) == [0]


def test_measure_interleaves_backends_and_drops_warmup() -> None:
    log: list[str] = []
    sides = [Side(FakePipeline("ort", 0.5, log), 1, 0.0, None), Side(FakePipeline("torch", 1.0, log), 1, 0.0, None)]
    studies = [Path("s1"), Path("s2")]
    samples = measure(sides, studies, LatencySettings(runs=2, warmup=1, max_new_tokens=5))  # type: ignore[arg-type]
    # warmup is run -1 (odd: reversed), then run 0 (as given), then run 1 (reversed)
    assert log == ["torch:s1", "ort:s1", "torch:s2", "ort:s2",
                   "ort:s1", "torch:s1", "ort:s2", "torch:s2",
                   "torch:s1", "ort:s1", "torch:s2", "ort:s2"]
    assert len(samples) == 8 and {s.run for s in samples} == {0, 1}
    assert all(s.new_tokens == 5 for s in samples)


@pytest.mark.parametrize("kwargs", [dict(stages="text"), dict(runs=0), dict(warmup=-1), dict(max_new_tokens=0)])
def test_settings_are_validated(kwargs: dict) -> None:
    with pytest.raises(RadtrtError):
        LatencySettings(**kwargs)


def _samples() -> list[Sample]:
    out = []
    for run, (a, b) in enumerate([(20.0, 40.0), (25.0, 50.0), (30.0, 45.0)]):
        for name, per_token in (("onnxruntime", a), ("torch", b)):
            t = {"preprocess": 10.0, "vision": 2 * per_token, "prefill": 3 * per_token, "decode": per_token * 31,
                 "decode_per_token": per_token, "end_to_end": 10 + 5 * per_token + per_token * 31}
            out.append(Sample(name, run, 0, t, 32))
    return out


def _report(**kw: object) -> LatencyReport:
    args = dict(command="radtrt bench latency --random-model mid", model="mid (random weights, seed 0)",
                settings=LatencySettings(runs=3, warmup=0, max_new_tokens=32), machine=MACHINE,
                infos=[_info("onnxruntime"), _info("torch")], samples=_samples(), n_studies=1, prompt_tokens=1430,
                image_tokens=1369, bandwidth=BW, peak_rss_mb=2048.0)
    args.update(kw)
    return build_report(**args)  # type: ignore[arg-type]


def test_report_math_on_fake_timings() -> None:
    report = _report()
    ort, torch_ = report.backends
    assert ort.stages["decode_per_token"].median == 25.0 and torch_.stages["decode_per_token"].median == 45.0
    assert ort.tokens_per_s is not None and ort.tokens_per_s.median == pytest.approx(40.0)
    assert ort.floor is not None
    assert ort.floor.floor_tokens_per_s == pytest.approx(27e9 / 270e6)
    assert ort.floor.achieved_fraction == pytest.approx(40.0 / 100.0)
    kv = 2 * 12 * 16 * 64 * (1430 + 16) * 4
    assert ort.floor.kv_bytes_at_mean_context == pytest.approx(kv)
    ratios = report.ratios()
    assert ratios["decode_per_token"] == pytest.approx(25 / 45)
    assert ratios["vision"] == pytest.approx(50 / 90)
    assert ratios["tokens_per_s"] == pytest.approx(40 / (1000 / 45))


def test_tokens_per_s_ratio_is_the_inverse_of_the_decode_ms_ratio() -> None:
    """With an even number of passes a median of per-pass tokens/s is not 1000 / the median ms per token: the
    report printed a 1.025 time ratio beside a 0.751 tokens/s ratio for one measurement."""
    samples = [s for s in _samples() if s.run < 2]  # two runs each: 20, 25 ms against 40, 50 ms
    report = _report(settings=LatencySettings(runs=2, warmup=0, max_new_tokens=32), samples=samples)
    ort = report.backends[0]
    assert ort.tokens_per_s is not None and ort.tokens_per_s.median == pytest.approx(1e3 / 22.5)
    assert report.ratios()["tokens_per_s"] == pytest.approx(1 / report.ratios()["decode_per_token"])
    assert ort.floor is not None and ort.floor.achieved_tokens_per_s == pytest.approx(1e3 / 22.5)


def test_single_backend_has_no_ratios_and_passes_without_a_decode_step_are_left_out() -> None:
    """A pass whose first token was EOS ran no decode step (the pipeline records no decode per token for it); one that
    gave one token, then EOS, ran one, and was left out too (a rule from before EOS's step counted)."""
    stages = ("preprocess", "vision", "prefill", "decode", "decode_per_token", "end_to_end")
    no_step = {k: 1.0 for k in stages if k != "decode_per_token"}
    samples = [Sample("onnxruntime", 0, 0, no_step, 0),
               Sample("onnxruntime", 0, 1, {k: 10.0 for k in stages}, 8)]
    report = _report(infos=[_info("onnxruntime")], samples=samples)
    assert report.ratios() == {}
    assert report.backends[0].stages["decode_per_token"].n == 1 and report.backends[0].stages["vision"].n == 2
    assert report.backends[0].stages["decode_per_token"].median == 10.0
    one_step = Sample("onnxruntime", 0, 2, {k: 4.0 for k in stages}, 1)  # a token, then EOS: one measured step
    assert _report(infos=[_info("onnxruntime")], samples=samples + [one_step]).backends[0].stages[
        "decode_per_token"].n == 2
    md = latency_markdown(report)
    assert " / " not in md.split("| median |")[1].splitlines()[0]
    # said: 'generated tokens 0' beside a tokens/s read as if every pass had decoded
    assert "- onnxruntime: decode per token (and tokens/s) over 1 of its 2 passes: the other ended at EOS" in md
    # one side without warmup: the cold first pass is half the samples, and nothing said so
    assert "**Warning: --warmup 0.** The first measured pass pays one-time costs" in md
    with pytest.raises(RadtrtError, match="ran no decode step for any study"):
        _report(infos=[_info("onnxruntime")], samples=samples[:1])
    with pytest.raises(RadtrtError, match="needs --max-new-tokens 2 or more"):
        LatencySettings(max_new_tokens=1)


def test_missing_samples_for_a_backend_is_an_error() -> None:
    with pytest.raises(RadtrtError, match="no measured samples"):
        _report(infos=[_info("onnxruntime"), _info("tensorrt")])


def test_vision_only_report_has_vision_stages_only() -> None:
    samples = [Sample(n, r, 0, {"preprocess": 5.0, "vision": v, "end_to_end": 5.0 + v}, 0)
               for r in range(2) for n, v in (("onnxruntime", 1820.0), ("torch", 1930.0))]
    report = _report(settings=LatencySettings(stages="vision", runs=2, warmup=0), samples=samples, bandwidth=None)
    assert report.stage_names == ("preprocess", "vision", "end_to_end")
    assert report.ratios()["vision"] == pytest.approx(1820 / 1930)
    md = latency_markdown(report)
    assert "| vision (ViT + projector) (ms) | 1,820.0 | 1,930.0 | 0.943 |" in md
    assert "prefill" not in md and "bandwidth floor" not in md
    # no prompt or decoder ran: the JSON recorded the default 64 new tokens and a prompt length as if one had
    data = report.to_json()
    assert data["prompt_tokens"] is None and data["settings"]["max_new_tokens"] is None
    named = _report(study_names=["a/frontal.dcm"])  # the samples' study indices, named
    assert named.to_json()["study_names"] == ["a/frontal.dcm"] and named.to_json()["prompt_tokens"] == 1430


def test_markdown_has_command_tables_and_ratios() -> None:
    md = latency_markdown(_report())
    assert "```\nradtrt bench latency --random-model mid\n```" in md
    assert "| median | onnxruntime | torch | onnxruntime / torch |" in md
    assert "| decode per token (ms) | 25.0 | 45.0 | 0.556 |" in md
    assert "| decode tokens/s | 40.0 | 22.2 | 1.800 |" in md
    # three samples: p90 / p95 would only interpolate towards the maximum
    assert "| onnxruntime | decode_per_token | 3 | 20.0 | 25.0 | n/a | n/a | 30.0 |" in md
    assert "27.0 GB/s" in md and "floor 100.0 tokens/s" in md and "= 40% of the floor" in md
    # two sides measured without warmup: the first passes' one-time costs skewed identical work by 2-6x
    assert "**Warning: --warmup 0.**" in md and "onnxruntime was opened first" in md
    warmed = latency_markdown(_report(settings=LatencySettings(runs=3, warmup=1, max_new_tokens=32)))
    assert "--warmup 0" not in warmed
    assert "Test CPU" in md and "Peak RSS" in md
    assert "own matrix shapes" not in md  # no shaped probe ran
    assert "| resident memory added by loading (MiB) | 900 | 900 |" in md


def test_sub_millisecond_times_keep_their_digits_and_a_cached_decoder_is_not_said_to_beat_the_floor() -> None:
    """'decode per token 0.2' beside '4,975 tokens/s' (and a tiny model's '0.0'); '117% of the floor' under 'tokens/s
    cannot exceed' it, for a decoder that stays in the caches."""
    from radtrt.benchmarks.markdown import _ms

    assert (_ms(0.2325), _ms(0.04), _ms(9.996), _ms(12.34), _ms(1234.5), _ms(None)) == (
        "0.233", "0.04", "10", "12.3", "1,234.5", "n/a")
    fast = [dataclasses.replace(s, timings_ms={**s.timings_ms, "decode_per_token": 0.2325}) for s in _samples()]
    md = latency_markdown(_report(samples=fast, infos=[_info("onnxruntime", 7_871_232), _info("torch", 7_871_232)]))
    assert "| decode per token (ms) | 0.233 | 0.233 | 1.000 |" in md
    assert "Above 100%: these 7.9 MB of weights were read faster than the probe streams its 512 MiB matrix" in md
    assert "Above 100%" not in latency_markdown(_report())  # 40% of the floor


def test_resident_memory_that_fell_while_loading_is_not_a_negative_addition() -> None:
    """'-40' MiB added by loading read as a measuring error: the allocator had returned pages meanwhile."""
    report = _report(infos=[dataclasses.replace(_info("onnxruntime"), rss_added_mb=-40.4), _info("torch")])
    md = latency_markdown(report)
    assert "| resident memory added by loading (MiB) | 0 (resident memory fell by 40 while loading) | 900 |" in md


def test_markdown_prints_the_shaped_probe_beside_the_floor() -> None:
    import dataclasses

    report = _report()
    report.bandwidth = dataclasses.replace(BW, shaped_gb_per_s=21.6, shaped_bytes=400 << 20)
    for b in report.backends:
        if b.floor is not None:
            b.floor = dataclasses.replace(b.floor, floor_shaped_tokens_per_s=80.0, achieved_fraction_shaped=0.5)
    md = latency_markdown(report)
    assert "own matrix shapes (one layer's q/k/v/o/gate/up/down repeated + lm_head, 400 MiB per pass): 21.6 GB/s" in md
    assert "(a diagnostic, not the floor) 80.0 tokens/s, achieved 50%" in md and "= 40% of the floor" in md
    report.bandwidth = dataclasses.replace(BW, shaped_gb_per_s=21.6, shaped_bytes=300_000)  # tiny: was "0 MiB"
    assert "lm_head, 293.0 KiB per pass)" in latency_markdown(report)
    report.bandwidth = dataclasses.replace(BW, shaped_gb_per_s=21.6, shaped_bytes=5 << 19)
    assert "lm_head, 2.5 MiB per pass)" in latency_markdown(report)


def test_json_report_is_complete_and_serializable() -> None:
    data = json.loads(json.dumps(_report().to_json()))
    assert data["kind"] == "latency" and data["command"].startswith("radtrt bench latency")
    assert data["ratios"]["numerator"] == "onnxruntime" and data["ratios"]["denominator"] == "torch"
    ort = data["backends"][0]
    assert set(ort["stages_ms"]["vision"]) == {"n", "min", "median", "p90", "p95", "max", "mean"}
    assert len(ort["samples"]) == 3 and ort["decode_floor"]["achieved_fraction"] == pytest.approx(0.4)
    assert data["bandwidth"]["gb_per_s"] == 27.0 and data["machine"]["cpu"] == "Test CPU"


def test_chart_medians_and_png(tmp_path: Path) -> None:
    report = _report()
    medians = stage_medians(report)
    assert medians["torch"]["decode"] == pytest.approx(45.0 * 31)
    if not matplotlib_available():
        pytest.skip("matplotlib is not installed")
    png = write_chart(report, tmp_path / "chart.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_machine_info_and_memory_are_reported() -> None:
    info = machine_info()
    assert info.cpu and info.versions["radtrt"] and "torch" in info.versions
    assert peak_rss_mb() > 10
    assert "load average" in info.one_line()
