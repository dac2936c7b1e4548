"""Markdown summaries of evaluation reports (what ``radtrt eval`` prints on stdout).

Fractions are shown as percentages with one decimal, like the paper's tables; CheXprompt counts stay in
errors per report. Every table names the judge and labeler it came from, so an offline proxy or radtrt's
own judge prompt is never mistaken for the published metric.
"""

from __future__ import annotations

from typing import Any, Optional

from radtrt.evaluation.bootstrap import MIN_INTERVAL_N, NO_INTERVAL_REASON, ROUGH_INTERVAL_N, Estimate
from radtrt.evaluation.chexprompt.parser import ERROR_TYPES
from radtrt.evaluation.run import EvalReport, PairedReport

_LEXICAL = {"rouge_l": "ROUGE-L", "bleu_1": "BLEU-1", "bleu_4": "BLEU-4"}
_LABEL_KEYS = {"micro_f1_14": "Micro-F1-14", "macro_f1_14": "Macro-F1-14", "micro_f1_5": "Micro-F1-5",
               "macro_f1_5": "Macro-F1-5", "micro_f1_14+": "Micro-F1-14+", "macro_f1_14+": "Macro-F1-14+",
               "micro_f1_5+": "Micro-F1-5+", "macro_f1_5+": "Macro-F1-5+"}
_LABEL_PREFIX = {"offline_labels": "offline labels", "chexbert": "CheXbert"}


def _pct(e: Optional[Estimate]) -> str:
    if e is None:
        return "n/a"
    return f"{100 * e.value:.1f} " + (f"[{100 * e.ci_low:.1f}, {100 * e.ci_high:.1f}]" if e.has_interval else "[n/a]")


def _num(e: Optional[Estimate]) -> str:
    if e is None:
        return "n/a"
    return f"{e.value:.3f} " + (f"[{e.ci_low:.3f}, {e.ci_high:.3f}]" if e.has_interval else "[n/a]")


def _interval_note(estimates: list[Optional[Estimate]]) -> list[str]:
    """Why a table's intervals are missing or rough, under it: "[85.7, 85.7]" from one report read as certainty."""
    ns = [e.n for e in estimates if e is not None]
    if not ns or min(ns) >= ROUGH_INTERVAL_N:
        return []
    if min(ns) < MIN_INTERVAL_N:
        return ["", f"CIs n/a: {NO_INTERVAL_REASON}."]
    return ["", f"Intervals from fewer than {ROUGH_INTERVAL_N} reports (here {min(ns)}) are rough: a bootstrap over "
                f"so few is too narrow, and has zero width when they all score alike."]


def _metric_rows(report: EvalReport) -> list[tuple[str, Estimate]]:
    rows = [(_LEXICAL[k], v) for k, v in report.lexical.items()]
    for key, scores in report.labels.items():
        rows += [(f"{name} ({_LABEL_PREFIX[key]})", scores.scores[k]) for k, name in _LABEL_KEYS.items()]
    if report.radgraph is not None:
        rows.append(("F1-RadGraph (partial)", report.radgraph))
    return rows


def _footnotes(report: EvalReport) -> list[str]:
    return [f"- {scores.name}" for scores in report.labels.values()]


def _chexprompt(summary: Any) -> list[str]:
    lines = [f"### CheXprompt: {summary.judge}", "",
             f"Judge model `{summary.judge_model}`; scored {summary.n_scored} of {summary.n_reports} reports."]
    if summary.failures:
        lines.append("Not scored (left out of the means): "
                     + "; ".join(f"{reason}: {n}" for reason, n in sorted(summary.failures.items())) + ".")
        lines += [f"The server said, first for {reason.removeprefix('request failed: ')}: "
                  f"{example.removeprefix(reason + ': ')}" for reason, example in sorted(summary.failure_examples.items())]
    if summary.mean_significant is None:
        return lines + ["", "No report could be scored."]
    lines += ["", "| errors per report (95% CI) | clinically significant | clinically insignificant |",
              "|---|---|---|",
              f"| all types | {_num(summary.mean_significant)} | {_num(summary.mean_insignificant)} |"]
    for letter, text in ERROR_TYPES.items():
        lines.append(f"| {letter}: {text} | {_num(summary.per_type_significant[letter])} | "
                     f"{_num(summary.per_type_insignificant[letter])} |")
    lines += ["", f"Reports without a clinically significant error (%): {_pct(summary.share_without_significant)}."]
    return lines + _interval_note([summary.mean_significant])


def render_report(report: EvalReport) -> str:
    """One predictions file."""
    b = report.bootstrap
    lines = [f"## radtrt eval: {report.n_reports} reports", "",
             f"Values in % with 95% bootstrap CIs ({b.n_resamples} resamples, seed {b.seed})."]
    rows = _metric_rows(report)
    if rows:
        lines += ["", "| metric | value [95% CI] |", "|---|---|"] + [f"| {name} | {_pct(e)} |" for name, e in rows]
        lines += _interval_note([e for _, e in rows])
        lines += [""] + _footnotes(report)
    if report.chexprompt is not None:
        lines += [""] + _chexprompt(report.chexprompt)
    return "\n".join(lines).rstrip() + "\n"


def render_paired(report: PairedReport) -> str:
    """Two arms side by side, then the parity verdict."""
    ref, cand = report.reference, report.candidate
    b = ref.bootstrap
    lines = [f"## radtrt eval (paired): {ref.n_reports} studies, reference vs candidate backend", "",
             f"Values in % with 95% bootstrap CIs ({b.n_resamples} resamples, seed {b.seed})."]
    ref_rows, cand_rows = _metric_rows(ref), dict(_metric_rows(cand))
    if ref_rows:
        lines += ["", "| metric | reference | candidate |", "|---|---|---|"]
        lines += [f"| {name} | {_pct(e)} | {_pct(cand_rows[name])} |" for name, e in ref_rows]
        lines += _interval_note([e for _, e in ref_rows] + list(cand_rows.values()))
        lines += [""] + _footnotes(ref)
    for title, arm in (("reference", ref), ("candidate", cand)):
        if arm.chexprompt is not None:
            lines += ["", f"#### {title} backend", ""] + _chexprompt(arm.chexprompt)
    parity = report.parity
    if parity is not None:
        lines += ["", f"### CheXprompt parity: **{parity.verdict.upper()}**", "",
                  f"{parity.reason}.",
                  f"Margin {parity.margin} significant errors per report; {parity.n_paired} of {parity.n_studies} "
                  f"studies scored in both arms; {parity.identical_predictions} identical predictions.",
                  f"Judge: {parity.judge}, model `{parity.judge_model}`."]
    return "\n".join(lines).rstrip() + "\n"
