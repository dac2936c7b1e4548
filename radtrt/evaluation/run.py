"""``evaluate``: score a predictions file with the chosen metrics; ``evaluate_paired``: two arms plus parity.

Every metric value is a fraction in [0, 1] with a seeded bootstrap interval, except CheXprompt, which is
in errors per report. Metrics that need weights or a judge refuse to start, with one line saying what to
provide, before any work is done.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field, replace
from typing import Any, Optional, Sequence

from radtrt import __version__
from radtrt.errors import fail
from radtrt.evaluation.bootstrap import BootstrapConfig, Estimate
from radtrt.evaluation.chexbert import WHAT_TO_PROVIDE as CHEXBERT_NEEDS
from radtrt.evaluation.chexbert import CheXbertConfig
from radtrt.evaluation.chexprompt.config import JudgeConfig
from radtrt.evaluation.parity import DEFAULT_MARGIN, DEFAULT_MAX_FAILURE_SHARE, ParityVerdict
from radtrt.evaluation.radgraph_metric import WHAT_TO_PROVIDE as RADGRAPH_NEEDS
from radtrt.evaluation.radgraph_metric import RadGraphConfig
from radtrt.evaluation.records import ReportPair, align_pairs

METRICS = ("rouge", "bleu", "labels", "chexprompt", "radgraph", "chexbert")
DEFAULT_METRICS = ("rouge", "bleu", "labels")

OFFLINE_LABELS_NAME = ("radtrt offline labels: rule-based CheXpert-style finding labels, an offline proxy "
                       "for F1-CheXbert (not CheXbert)")
CHEXBERT_NAME = "F1-CheXbert (CheXbert labeler from local weights, as in the released LLaVA-Rad evaluator)"


def parse_metrics(text: str) -> tuple[str, ...]:
    """``"rouge,bleu"`` -> ``("rouge", "bleu")``; unknown names are refused."""
    names = tuple(dict.fromkeys(n.strip().lower() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        fail(f"unknown metric(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(METRICS)}")
    return names


@dataclass(frozen=True)
class EvalConfig:
    """What to compute and with which resources."""

    metrics: tuple[str, ...] = DEFAULT_METRICS
    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)
    judge: Optional[JudgeConfig] = None
    chexbert: Optional[CheXbertConfig] = None
    radgraph: Optional[RadGraphConfig] = None
    show_progress: bool = True

    def check(self) -> None:
        """Refuse missing resources up front, before any metric runs."""
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown:
            fail(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(METRICS)}")
        if "chexprompt" in self.metrics and self.judge is None:
            fail("CheXprompt needs a judge: --judge-model NAME and --endpoint URL (or --azure-endpoint)")
        # the eval extra's libraries: BLEU is a default metric, and 'pip install radtrt' leaves sacrebleu out
        for metric, module in (("bleu", "sacrebleu"), ("chexprompt", "openai")):
            if metric in self.metrics and importlib.util.find_spec(module) is None:
                fail(f"the {metric} metric needs the eval extra ({module} is not installed): pip install "
                     f"'radtrt[eval]', or leave {metric} out of --metrics")
        if "chexbert" in self.metrics:
            if self.chexbert is None:
                fail(CHEXBERT_NEEDS)
            self.chexbert.check()
        if "radgraph" in self.metrics:
            if self.radgraph is None:
                fail(RADGRAPH_NEEDS)
            self.radgraph.check()


@dataclass(frozen=True)
class LabelScores:
    """Micro/macro F1 from one labeler (the offline rules, or CheXbert)."""

    name: str
    scores: dict[str, Estimate]
    per_finding_f1: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, **{k: v.to_json() for k, v in self.scores.items()},
                "per_finding_f1": self.per_finding_f1}


@dataclass(frozen=True)
class EvalReport:
    """All metrics of one predictions file."""

    n_reports: int
    bootstrap: BootstrapConfig
    lexical: dict[str, Estimate]
    labels: dict[str, LabelScores]
    radgraph: Optional[Estimate]
    chexprompt: Optional[Any]  # ChexpromptSummary
    judgements: list[Any]  # Judgement per report, in input order, when CheXprompt ran

    def to_json(self) -> dict[str, Any]:
        metrics: dict[str, Any] = {k: v.to_json() for k, v in self.lexical.items()}
        metrics.update({k: v.to_json() for k, v in self.labels.items()})
        if self.radgraph is not None:
            metrics["f1_radgraph"] = self.radgraph.to_json()
        if self.chexprompt is not None:
            metrics["chexprompt"] = self.chexprompt.to_json()
        out: dict[str, Any] = {
            "radtrt_version": __version__, "n_reports": self.n_reports,
            "bootstrap": {"n_resamples": self.bootstrap.n_resamples, "seed": self.bootstrap.seed,
                          "level": self.bootstrap.level, "method": "percentile"},
            "scale": "fractions in [0, 1]; CheXprompt in errors per report",
            "metrics": metrics,
        }
        if self.judgements:
            out["chexprompt_judgements"] = [j.to_json() for j in self.judgements]
        return out


@dataclass(frozen=True)
class PairedReport:
    """Two arms (reference backend, candidate backend) on the same studies, and their CheXprompt parity."""

    reference: EvalReport
    candidate: EvalReport
    parity: Optional[ParityVerdict]

    def to_json(self) -> dict[str, Any]:
        return {"reference": self.reference.to_json(), "candidate": self.candidate.to_json(),
                "chexprompt_parity": None if self.parity is None else self.parity.to_json()}


def _make_judge(cfg: EvalConfig) -> Any:
    try:
        from radtrt.evaluation.chexprompt.judge import Judge
    except ImportError as e:
        fail(f"CheXprompt needs the eval extra (pip install 'radtrt[eval]'): {e}")
    assert cfg.judge is not None  # EvalConfig.check
    return Judge(cfg.judge)


def evaluate(pairs: Sequence[ReportPair], cfg: EvalConfig, judge: Optional[Any] = None) -> EvalReport:
    """Compute ``cfg.metrics`` over ``pairs``; ``judge`` (a ``Judge``) may be shared between calls."""
    cfg.check()
    if not pairs:
        fail("no reports to evaluate")
    if judge is None and "chexprompt" in cfg.metrics:
        judge = _make_judge(cfg)  # the key, prompt and cache are checked before the other metrics run
        try:
            return _evaluate(pairs, cfg, judge)
        finally:
            judge.cache.close()
    return _evaluate(pairs, cfg, judge)


def _evaluate(pairs: Sequence[ReportPair], cfg: EvalConfig, judge: Optional[Any]) -> EvalReport:
    from radtrt.evaluation import label_f1, labels, lexical

    preds = [p.prediction for p in pairs]
    refs = [p.reference for p in pairs]
    b = cfg.bootstrap
    lex: dict[str, Estimate] = {}
    if "rouge" in cfg.metrics:
        lex["rouge_l"] = lexical.rouge_l(preds, refs, b)
    if "bleu" in cfg.metrics:
        lex["bleu_1"] = lexical.bleu(preds, refs, 1, b)
        lex["bleu_4"] = lexical.bleu(preds, refs, 4, b)
    label_sets: dict[str, LabelScores] = {}
    if "labels" in cfg.metrics:
        p, r = labels.label_reports(preds), labels.label_reports(refs)
        label_sets["offline_labels"] = LabelScores(OFFLINE_LABELS_NAME, label_f1.label_f1(p, r, b),
                                                   label_f1.per_finding_f1(p, r))
    if "chexbert" in cfg.metrics:
        from radtrt.evaluation.chexbert import chexbert_labels

        assert cfg.chexbert is not None
        codes = chexbert_labels(preds + refs, cfg.chexbert)
        p, r = codes[:len(preds)], codes[len(preds):]
        label_sets["chexbert"] = LabelScores(CHEXBERT_NAME, label_f1.label_f1(p, r, b), label_f1.per_finding_f1(p, r))
    radgraph = None
    if "radgraph" in cfg.metrics:
        from radtrt.evaluation.radgraph_metric import f1_radgraph

        assert cfg.radgraph is not None
        radgraph = f1_radgraph(preds, refs, cfg.radgraph, b)
    summary, judgements = None, []
    if "chexprompt" in cfg.metrics:
        from radtrt.evaluation.chexprompt.summary import summarize

        assert cfg.judge is not None and judge is not None
        judgements = judge.judge(pairs, show_progress=cfg.show_progress)
        summary = summarize(judgements, judge.prompt.label, judge.prompt.name == "published", cfg.judge.model, b)
    return EvalReport(n_reports=len(pairs), bootstrap=b, lexical=lex, labels=label_sets, radgraph=radgraph,
                      chexprompt=summary, judgements=judgements)


def evaluate_paired(reference_arm: Sequence[ReportPair], candidate_arm: Sequence[ReportPair], cfg: EvalConfig,
                    margin: float = DEFAULT_MARGIN,
                    max_failure_share: float = DEFAULT_MAX_FAILURE_SHARE) -> PairedReport:
    """Both arms with the same metrics and one judge; the CheXprompt parity verdict when it was requested."""
    from radtrt.evaluation.parity import parity_from_judgements

    cfg.check()
    ref_pairs, cand_pairs = align_pairs(list(reference_arm), list(candidate_arm))
    judge = _make_judge(cfg) if "chexprompt" in cfg.metrics else None
    try:
        ref = evaluate(ref_pairs, cfg, judge=judge)
        cand = evaluate(cand_pairs, cfg, judge=judge)
    finally:
        if judge is not None:
            judge.cache.close()
    parity = None
    if judge is not None:
        assert cfg.judge is not None and ref.chexprompt is not None
        parity = replace(
            parity_from_judgements(
                ref.judgements, cand.judgements, margin=margin, cfg=cfg.bootstrap, judge=ref.chexprompt.judge,
                judge_model=cfg.judge.model, max_failure_share=max_failure_share,
                identical_predictions=sum(r.prediction == c.prediction for r, c in zip(ref_pairs, cand_pairs))),
            reference_summary=ref.chexprompt, candidate_summary=cand.chexprompt)
    return PairedReport(reference=ref, candidate=cand, parity=parity)
