"""CheXprompt parity: does an exported engine make more factual errors than the PyTorch reference?

Both arms' predictions for the same studies are judged against the same ground truth. Per study, the
difference in clinically significant errors (candidate minus reference) is averaged, with a paired
bootstrap interval (the same resampled studies for both arms). This is a non-inferiority test against
a stated margin, by default 0.1 significant errors per report:

* ``pass``: the interval's upper bound is at most the margin;
* ``fail``: its lower bound is above the margin (the candidate is clearly worse);
* ``inconclusive``: the interval straddles the margin, fewer than ``MIN_PAIRED_STUDIES`` studies were
  scored in both arms, or too many studies could not be judged in one of the arms (judge more studies, or
  fix the judge).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from radtrt.errors import fail
from radtrt.evaluation.bootstrap import BootstrapConfig, Estimate, bootstrap_mean
from radtrt.evaluation.chexprompt.config import JudgeConfig
from radtrt.evaluation.records import load_predictions

DEFAULT_MARGIN = 0.1
DEFAULT_MAX_FAILURE_SHARE = 0.05
# Fewest studies scored in both arms for a pass or a fail. Why: a percentile bootstrap interval means something
# only when the resampled studies can stand in for the population, and 30 is the usual floor for that. Below it
# the interval is too narrow, and when every paired difference is the same (an engine that reproduces the
# reference: every resample's mean is 0) it has zero width, so one study "proved" parity: the reasoning that
# bootstrap.wilson_interval's docstring rejects for proportions.
MIN_PAIRED_STUDIES = 30


@dataclass(frozen=True)
class ParityVerdict:
    """The outcome of a CheXprompt parity comparison, with everything needed to audit it."""

    verdict: str  # pass | fail | inconclusive
    reason: str
    margin: float
    judge: str
    judge_model: str
    n_studies: int
    n_paired: int
    identical_predictions: int
    reference_mean_significant: Optional[float]
    candidate_mean_significant: Optional[float]
    difference: Optional[Estimate]  # candidate minus reference, significant errors per report
    reference_summary: Optional[Any] = None  # ChexpromptSummary of each arm, when judged here
    candidate_summary: Optional[Any] = None

    @property
    def passed(self) -> bool:
        return self.verdict == "pass"

    def to_json(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict, "reason": self.reason, "margin": self.margin, "judge": self.judge,
            "judge_model": self.judge_model, "n_studies": self.n_studies, "n_paired": self.n_paired,
            "n_excluded": self.n_studies - self.n_paired, "identical_predictions": self.identical_predictions,
            "reference_mean_significant_errors": self.reference_mean_significant,
            "candidate_mean_significant_errors": self.candidate_mean_significant,
            "difference_significant_errors": None if self.difference is None else self.difference.to_json(),
            "reference": None if self.reference_summary is None else self.reference_summary.to_json(),
            "candidate": None if self.candidate_summary is None else self.candidate_summary.to_json(),
        }


def check_margin(margin: float) -> None:
    """A finite margin >= 0 (checked by the CLI before any paid judge request, and here for library callers)."""
    if not (math.isfinite(margin) and margin >= 0):
        fail(f"--margin must be a number >= 0 (significant errors per report), got {margin}")


def parity_from_judgements(reference: Sequence[Any], candidate: Sequence[Any], *, margin: float = DEFAULT_MARGIN,
                           cfg: Optional[BootstrapConfig] = None, judge: str = "", judge_model: str = "",
                           identical_predictions: int = 0,
                           max_failure_share: float = DEFAULT_MAX_FAILURE_SHARE) -> ParityVerdict:
    """Verdict from two lists of ``Judgement`` for the same studies, in the same order."""
    check_margin(margin)
    cfg = cfg or BootstrapConfig()
    if len(reference) != len(candidate) or any(r.study != c.study for r, c in zip(reference, candidate)):
        fail("the two arms' judgements are not for the same studies in the same order")
    both = [(r.counts, c.counts) for r, c in zip(reference, candidate)
            if r.counts is not None and c.counts is not None]
    n = len(reference)
    diff: Optional[Estimate] = None
    ref_mean = cand_mean = None
    if not both:
        verdict, reason = "inconclusive", "no study was scored by the judge in both arms"
    else:
        ref = np.array([r.total_significant for r, _ in both], dtype=np.float64)
        cand = np.array([c.total_significant for _, c in both], dtype=np.float64)
        ref_mean, cand_mean = float(ref.mean()), float(cand.mean())
        diff = bootstrap_mean(cand - ref, cfg)
        verdict, reason = _decide(diff, margin, n - len(both), n, max_failure_share)
    return ParityVerdict(verdict=verdict, reason=reason, margin=margin, judge=judge, judge_model=judge_model,
                         n_studies=n, n_paired=len(both), identical_predictions=identical_predictions,
                         reference_mean_significant=ref_mean, candidate_mean_significant=cand_mean,
                         difference=diff)


def _decide(diff: Estimate, margin: float, excluded: int, n: int, max_failure_share: float) -> tuple[str, str]:
    """Non-inferiority against ``margin``, unless too many studies went unjudged or too few were judged."""
    if excluded / n > max_failure_share:
        return "inconclusive", (f"{excluded} of {n} studies could not be judged in one arm "
                                f"(more than {max_failure_share:.0%}); rerun to resume the judge")
    stated = (f"candidate minus reference: {diff.value:+.3f} significant errors per report, "
              f"95% CI [{diff.ci_low:+.3f}, {diff.ci_high:+.3f}]")
    if n - excluded < MIN_PAIRED_STUDIES:
        return "inconclusive", (f"{stated}, but only {n - excluded} studies were scored in both arms: a pass or "
                                f"fail needs at least {MIN_PAIRED_STUDIES}, as a bootstrap interval from fewer "
                                f"is too narrow to trust; judge more studies")
    if diff.ci_high <= margin:
        return "pass", f"{stated}, upper bound within the margin of {margin}"
    if diff.ci_low > margin:
        return "fail", f"{stated}, entirely above the margin of {margin}"
    return "inconclusive", f"{stated}, straddles the margin of {margin}; judge more studies"


def chexprompt_parity(reference_jsonl: Path, candidate_jsonl: Path, judge_config: JudgeConfig,
                      margin: float = DEFAULT_MARGIN, bootstrap: Optional[BootstrapConfig] = None,
                      show_progress: bool = True,
                      max_failure_share: float = DEFAULT_MAX_FAILURE_SHARE) -> ParityVerdict:
    """Judge reference-backend and exported-backend predictions and return the parity verdict.

    ``reference_jsonl`` and ``candidate_jsonl`` hold ``{study, reference, prediction}`` lines for the same
    studies with the same ground truth (``reference`` is the radiologist's text in both).
    """
    from radtrt.evaluation.run import EvalConfig, evaluate_paired

    cfg = EvalConfig(metrics=("chexprompt",), bootstrap=bootstrap or BootstrapConfig(), judge=judge_config,
                     show_progress=show_progress)
    report = evaluate_paired(load_predictions(reference_jsonl, cfg.metrics),
                             load_predictions(candidate_jsonl, cfg.metrics), cfg,
                             margin=margin, max_failure_share=max_failure_share)
    assert report.parity is not None  # chexprompt was requested
    return report.parity
