"""Markdown renderings of the latency and parity reports: readable tables plus the reproduce command."""

from __future__ import annotations

from typing import Any

from radtrt.benchmarks.latency import BackendLatency, LatencyReport
from radtrt.benchmarks.parity import ParityReport
from radtrt.benchmarks.stats import MIN_SAMPLES_P90, MIN_SAMPLES_P95
from radtrt.errors import printable

STAGE_LABELS = {
    "preprocess": "preprocess (read + resize + normalize)",
    "vision": "vision (ViT + projector)",
    "prefill": "prefill = time to first token after vision",
    "decode_per_token": "decode per token",
    "end_to_end": "end to end",
}


def _num(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _ms(value: float | None) -> str:
    """A time in ms with the digits it needs: below 10 ms, three significant ones (a 0.23 ms decode step read "0.2"
    beside its 4,975 tokens/s, and a tiny model's 0.04 ms "0.0")."""
    if value is None or abs(value) >= 10:
        return _num(value)
    return f"{value:.3g}"


def _rss_added(mb: float | None) -> str:
    """Loading can end with less resident memory than it began with (the allocator returned freed pages), and
    "-40 MiB added" read as a measuring error; say what happened instead."""
    if mb is None or mb >= 0:
        return _num(mb, 0)
    return f"0 (resident memory fell by {-mb:,.0f} while loading)"


def _mb(nbytes: float) -> str:
    mb = nbytes / 1e6
    return f"{mb:,.0f} MB" if mb >= 100 else f"{mb:.1f} MB" if mb >= 1 else f"{mb:.2f} MB"


def _mib(nbytes: int) -> str:
    """Binary sizes with a unit that keeps digits: a small decoder's matrices printed as "0 MiB per pass"."""
    mib = nbytes / (1 << 20)
    return f"{mib:,.0f} MiB" if mib >= 100 else f"{mib:.1f} MiB" if mib >= 1 else f"{nbytes / 1024:.1f} KiB"


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _settings(b: BackendLatency) -> str:
    parts = ", ".join(f"{k} {v}" for k, v in b.info.settings.items())
    return f"{b.info.name} ({b.info.precision}; {parts})"


def _header(title: str, command: str) -> list[str]:
    return [f"# {title}", "", "Reproduce with:", "", "```", command, "```", ""]


def latency_markdown(report: LatencyReport) -> str:
    names = [b.info.name for b in report.backends]
    title = "radtrt bench latency: " + " vs ".join(names)
    s = report.settings
    lines = _header(title, report.command)
    decode = "" if s.stages == "vision" else f"; up to {s.max_new_tokens} new tokens (greedy)"
    prompt = ("" if s.stages == "vision" else f"; prompt {report.prompt_tokens} tokens "
              f"({report.image_tokens} image tokens)")
    lines += [f"- Model: {report.model}{prompt}{decode}",
              f"- Stages: {s.stages}; {s.runs} measured run(s) x {report.n_studies} study(ies) after {s.warmup} "
              f"warmup run(s)" + ("; backends interleaved, order alternating per run" if len(names) > 1 else ""),
              f"- Backends: {'; '.join(_settings(b) for b in report.backends)}",
              f"- Machine: {report.machine.one_line()}"]
    if report.bandwidth:
        bw = report.bandwidth
        probes = "; probes GB/s: " + ", ".join(f"{n} {gb:.1f}" for n, gb in bw.probes.items()) if bw.probes else ""
        lines.append(f"- Matrix-vector bandwidth: {bw.gb_per_s:.1f} GB/s ({bw.method} over {_mib(bw.matrix_bytes)}, "
                     f"best of {bw.repeats}, {bw.threads} thread{'' if bw.threads == 1 else 's'}{probes})")
        if bw.shaped_gb_per_s is not None and bw.shaped_bytes is not None:
            lines.append(f"- numpy's GEMV over this decoder's own matrix shapes (one layer's q/k/v/o/gate/up/down "
                         f"repeated + lm_head, {_mib(bw.shaped_bytes)} per pass): {bw.shaped_gb_per_s:.1f} GB/s")
    if len(names) > 1:
        lines.append(f"- Loading: {names[0]} was opened first, so its load time and resident memory include "
                     f"importing shared libraries; compare those two rows with care")
        if s.warmup == 0:
            lines.append("- **Warning: --warmup 0.** Each side's first measured pass pays one-time costs (thread pools, "
                         "allocations, caches), so ratios from this run are biased; use --warmup 1 or more")
    for b in report.backends:  # a study that ends at EOS at once has no decode step to time
        if "decode_per_token" in b.stages and b.stages["decode_per_token"].n < b.stages["end_to_end"].n:
            timed, passes = b.stages["decode_per_token"].n, b.stages["end_to_end"].n
            rest = "the other" if passes - timed == 1 else "the others"
            lines.append(f"- {b.info.name}: decode per token (and tokens/s) over {timed} of its {passes} passes: "
                         f"{rest} ended at EOS with no decode step")
    if len(names) == 1 and s.warmup == 0:
        lines.append("- **Warning: --warmup 0.** The first measured pass pays one-time costs (thread pools, "
                     "allocations, caches), which the minimum and the median may show; use --warmup 1 or more")
    gpu = f"; GPU peak (torch) {_num(report.gpu_peak_memory_mb, 0)} MiB" if report.gpu_peak_memory_mb else ""
    lines += [f"- Peak RSS of the process (all backends together; {report.peak_rss_scope}): "
              f"{report.peak_rss_mb:,.0f} MiB{gpu}", ""]
    lines += _medians_table(report) + [""] + _distribution_table(report)
    floors = [b for b in report.backends if b.floor]
    if floors:
        lines += ["", "## Decode bandwidth floor", "",
                  "A decode step reads every decoder weight once (layers, final norm, lm_head; not the embedding "
                  "table), so tokens/s cannot exceed bandwidth / weight bytes. The KV cache is read too; the "
                  "'with KV' floor adds it at the mean context length.", ""]
        for b in floors:
            f = b.floor
            assert f is not None
            kv = ("" if f.kv_bytes_at_mean_context is None else
                  f"; with KV ({_mb(f.kv_bytes_at_mean_context)}) floor "
                  f"{_num(f.floor_with_kv_tokens_per_s)} tokens/s, achieved {_pct(f.achieved_fraction_with_kv)}")
            shaped = ("" if f.floor_shaped_tokens_per_s is None else
                      f"; at numpy's GEMV rate on this decoder's own matrix shapes (a diagnostic, not the floor) "
                      f"{_num(f.floor_shaped_tokens_per_s)} tokens/s, achieved {_pct(f.achieved_fraction_shaped)}")
            lines.append(f"- {b.info.name}: {_mb(f.weight_bytes)} per token -> floor "
                         f"{_num(f.floor_tokens_per_s)} tokens/s; achieved {_num(f.achieved_tokens_per_s)} tokens/s "
                         f"= {_pct(f.achieved_fraction)} of the floor{kv}{shaped}")
            if f.achieved_fraction is not None and f.achieved_fraction > 1:  # "cannot exceed", exceeded
                probe = _mib(report.bandwidth.matrix_bytes) if report.bandwidth else "probe's"
                lines.append(f"  - Above 100%: these {_mb(f.weight_bytes)} of weights were read faster than the probe "
                             f"streams its {probe} matrix from memory, so they likely stay in the CPU's caches from "
                             f"one step to the next; the floor bounds decoders larger than the caches")
    return "\n".join(lines) + "\n"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def _medians_table(report: LatencyReport) -> list[str]:
    backends = report.backends
    ratios = report.ratios()
    two = len(backends) > 1
    head = ["median", *(b.info.name for b in backends)]
    if two:
        head.append(f"{backends[0].info.name} / {backends[1].info.name}")
    lines = ["## Medians" + (" and ratios (time ratio < 1: first backend faster)" if two else ""), "",
             "| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]

    def row(label: str, values: list[str], r: float | None = None) -> None:
        cells = [label, *values] + ([_ratio(r)] if two else [])
        lines.append("| " + " | ".join(cells) + " |")

    for stage in report.stage_names:
        row(f"{STAGE_LABELS[stage]} (ms)", [_ms(b.stages[stage].median) for b in backends], ratios.get(stage))
    if any(b.tokens_per_s for b in backends):
        row("decode tokens/s", [_num(b.tokens_per_s.median if b.tokens_per_s else None) for b in backends],
            ratios.get("tokens_per_s"))
        row("generated tokens", [_num(b.new_tokens.median if b.new_tokens else None, 0) for b in backends])
    if any(b.floor for b in backends):
        row("most tokens/s the bandwidth allows (weights only)", [_num(b.floor.floor_tokens_per_s if b.floor else None)
                                                 for b in backends])
        row("achieved fraction of floor", [_pct(b.floor.achieved_fraction if b.floor else None) for b in backends])
    row("resident memory added by loading (MiB)", [_rss_added(b.info.rss_added_mb) for b in backends])
    row("load time (s)", [_num(b.info.load_seconds, 2) for b in backends])
    return lines


def _distribution_table(report: LatencyReport) -> list[str]:
    lines = ["## Distribution (ms)", "", f"p90 needs {MIN_SAMPLES_P90} samples and p95 {MIN_SAMPLES_P95} (more "
             f"--runs or studies); with fewer they are n/a here (the JSON keeps every sample).", "",
             "| backend | stage | n | min | median | p90 | p95 | max |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for b in report.backends:
        for stage in report.stage_names:
            v = b.stages[stage]
            p90 = _ms(v.p90) if v.n >= MIN_SAMPLES_P90 else "n/a"
            p95 = _ms(v.p95) if v.n >= MIN_SAMPLES_P95 else "n/a"
            lines.append(f"| {b.info.name} | {stage} | {v.n} | {_ms(v.min)} | {_ms(v.median)} | {p90} | {p95} | "
                         f"{_ms(v.max)} |")
    return lines


def _divergences(positions: list[int | None]) -> str:
    """'none' per study for a few studies; for many, only the diverging ones (the per-study table has all)."""
    if len(positions) <= 8:
        return ", ".join("none" if d is None else str(d) for d in positions)
    diverging = [d for d in positions if d is not None]
    if not diverging:
        return f"none of {len(positions)} studies diverge"
    return f"{len(diverging)} of {len(positions)} studies diverge, at {', '.join(map(str, diverging))}"


def int8_targets(s: dict[str, Any]) -> str:
    """The INT8 parity gate's thresholds (``radtrt.calibration.parity``), each marked met or not."""
    from radtrt.calibration.parity import MAX_LABEL_F1_DROP, MIN_EXACT_MATCH, undecided

    # the summary's targets (``parity.precision_targets``, in this order), each with the metric whose interval says
    # whether the verdict is settled
    checks = [(name, ok, metric) for (name, ok), metric in
              zip(s["targets"].items(), (None, "exact_match_rate", "label_f1_drop"))]

    def too_few(metric: str | None) -> str:
        if metric is not None and s[f"{metric}_ci"] is None:  # one study: no interval to reach the target
            return " (one study: too few to tell)"
        return (" (its 95% interval reaches the target: too few studies to tell)" if metric and undecided(s, metric)
                else "")

    def unconfirmed(metric: str | None) -> str:
        """A pass is no surer than a miss: 'met' on one study (interval 21% to 100%) read as settled."""
        if metric is None:
            return ""
        if s[f"{metric}_ci"] is None:
            return " (one study: too few to confirm)"
        low, high = s[f"{metric}_ci"]
        missed = low < MIN_EXACT_MATCH if metric == "exact_match_rate" else high > MAX_LABEL_F1_DROP
        return " (its 95% interval reaches past the target: too few studies to confirm)" if missed else ""

    return "; ".join(f"{name}: " + ("met" + unconfirmed(metric) if ok else "NOT MET" + too_few(metric))
                     for name, ok, metric in checks)


def drop_interval_text(s: dict[str, Any]) -> str:
    """The label-F1 drop's interval, or "n/a" as ``radtrt eval`` writes it where one study gives none."""
    ci = s["label_f1_drop_ci"]
    return "n/a: one study gives no interval" if ci is None else f"{ci[0]:.3f} to {ci[1]:.3f}"


def _cell(text: str) -> str:
    """A file name as a table cell: a '|' in it shifted every column after it, and a newline ended the row."""
    return printable(text).replace("|", "\\|")


def _maybe(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def parity_markdown(report: ParityReport) -> str:
    s = report.summary()
    n = s["studies"]
    equal = sum(st.tokens_equal for st in report.studies)
    lines = _header(f"radtrt bench parity: {report.backend} vs {report.reference} (reference)", report.command)
    lines += [f"- Model: {report.model}; {report.precision}; greedy, up to {report.max_new_tokens} new tokens; "
              f"{n} study(ies)"] + ([f"- Prompts: {report.prompts}"] if report.prompts else []) + [
              f"- Machine: {report.machine.one_line()}", "",
              "| metric | value |", "|---|---|",
              f"| exact-match rate of generated tokens (95% interval) | {equal}/{n} ({_pct(s['exact_match_rate'])}; "
              f"{_pct(s['exact_match_rate_ci'][0])} to {_pct(s['exact_match_rate_ci'][1])}) |",
              f"| first divergence position per study | {_divergences(s['first_divergences'])} |",
              f"| ROUGE-L F1 of the reports, mean / min | {s['rouge_l_mean']:.4f} / {s['rouge_l_min']:.4f} |",
              f"| max \\|logit difference\\| on the first step (of the reference's logit range) | "
              f"{s['first_logits_max_abs_diff']:.3g} ({s['first_logits_max_rel_diff']:.2%}) |",
              f"| first-step argmax agreement | {_pct(s['first_argmax_agreement'])} |",
              f"| max \\|logit difference\\| on the decode steps both sides ran on the same tokens: largest / "
              f"mean of each step's (steps, all studies) | {_maybe(s['decode_logits_max_abs_diff'])} / "
              f"{_maybe(s['decode_logits_mean_max_abs_diff'])} ({s['decode_steps_compared']}) |",
              f"| image-embedding cosine, min / mean | {s['vision_cosine_min']:.8f} / {s['vision_cosine_mean']:.8f} "
              f"(1 - min = {1 - s['vision_cosine_min']:.2g}) |",
              f"| image-embedding max \\|difference\\| | {s['vision_max_abs_diff']:.3g} |",
              f"| finding labels (phantom labeler): micro-F1 of the backend's against the reference's | "
              f"{s['label_f1_vs_reference']:.3f} |"]
    if "label_f1_true" in s:
        # the drop is reference - backend (positive: the backend is worse); "difference" beside
        # "backend / reference" read as backend - reference, the opposite sign
        lines.append(f"| finding-label micro-F1 against the manifest's true labels: backend / reference / "
                     f"drop, reference - backend (95% interval) | {s['label_f1_true']:.3f} / "
                     f"{s['reference_label_f1_true']:.3f} / {s['label_f1_drop']:.3f} ({drop_interval_text(s)}) |")
    if "int8" in report.precision.split(" vs ")[0]:
        lines += ["", f"INT8 targets: {int8_targets(s)}"]
    elif s["targets"]:  # fp32 and fp16 sides: their stated requirements, as INT8's are
        lines += ["", "Targets: " + "; ".join(f"{name}: {'met' if ok else 'NOT MET'}" for name, ok in s["targets"].items())]
    lines += ["", "## Per study", "",
              "| study | tokens equal | first divergence | new tokens (backend / reference) | ROUGE-L | "
              "max \\|Δ first logits\\| (ref max \\|logit\\|) | max \\|Δ decode logits\\| (steps) | image cosine |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for st in report.studies:
        div = "none" if st.first_divergence is None else str(st.first_divergence)
        lines.append(f"| {_cell(st.study)} | {'yes' if st.tokens_equal else 'NO'} | {div} | {st.new_tokens} / "
                     f"{st.reference_new_tokens} | {st.rouge_l:.4f} | {st.first_logits_max_abs_diff:.3g} "
                     f"({st.reference_first_logits_max_abs:.3g}) | {_maybe(st.decode_logits_max_abs_diff)} "
                     f"({st.decode_steps_compared}) | {st.vision_cosine:.8f} |")
    return "\n".join(lines) + "\n"
