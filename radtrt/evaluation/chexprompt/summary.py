"""CheXprompt aggregates: errors per report (significant, insignificant, per type) and error-free share.

Means are over the reports the judge scored; failed reports are counted and listed by reason, never
averaged in as zero errors.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from radtrt.evaluation.bootstrap import BootstrapConfig, Estimate, bootstrap_mean
from radtrt.evaluation.chexprompt.judge import Judgement
from radtrt.evaluation.chexprompt.parser import LETTERS
from radtrt.http_retry import retryable_status

# how the judge records a request that ended in an HTTP status (``describe`` in client.py)
_HTTP_FAILURE = re.compile(r"request failed: HTTP (\d{3})\b")


@dataclass(frozen=True)
class ChexpromptSummary:
    """Aggregates of one set of judgements, labelled with the judge that produced them."""

    judge: str
    published_prompt: bool
    judge_model: str
    n_reports: int
    n_scored: int
    failures: dict[str, int]  # by category ('request failed: HTTP 429', 'unparseable answer', ...)
    mean_significant: Optional[Estimate]
    mean_insignificant: Optional[Estimate]
    share_without_significant: Optional[Estimate]
    per_type_significant: dict[str, Estimate]
    per_type_insignificant: dict[str, Estimate]
    # the first failure of each category whose server said why ('request failed: HTTP 400: Unsupported ...')
    failure_examples: dict[str, str] = field(default_factory=dict)

    @property
    def n_failed(self) -> int:
        return self.n_reports - self.n_scored

    def to_json(self) -> dict[str, Any]:
        def est(e: Optional[Estimate]) -> Optional[dict[str, Any]]:
            return None if e is None else e.to_json()

        return {
            "judge": self.judge, "published_prompt": self.published_prompt, "judge_model": self.judge_model,
            "n_reports": self.n_reports, "n_scored": self.n_scored, "n_failed": self.n_failed,
            "failures": self.failures, "failure_examples": self.failure_examples,
            "mean_significant_errors": est(self.mean_significant),
            "mean_insignificant_errors": est(self.mean_insignificant),
            "share_without_significant_error": est(self.share_without_significant),
            "per_type_significant": {k: v.to_json() for k, v in self.per_type_significant.items()},
            "per_type_insignificant": {k: v.to_json() for k, v in self.per_type_insignificant.items()},
        }


def _reason(failure: str) -> str:
    """Coarse failure category for the tally: 'unparseable answer', 'request failed: HTTP 429', ... (the server's
    message, which differs from report to report, "try again in 600ms", is kept apart as an example)."""
    if failure.startswith("unparseable"):
        return failure.split(":", 1)[0]
    match = _HTTP_FAILURE.match(failure)
    return match.group(0) if match else failure


def summarize(judgements: Sequence[Judgement], judge: str, published_prompt: bool, judge_model: str,
              cfg: BootstrapConfig) -> ChexpromptSummary:
    scored = [j.counts for j in judgements if j.counts is not None]
    failures = Counter(_reason(j.failure) for j in judgements if j.failure is not None)
    examples: dict[str, str] = {}
    for j in judgements:
        if j.failure is not None and _HTTP_FAILURE.match(j.failure) and j.failure != _reason(j.failure):
            examples.setdefault(_reason(j.failure), j.failure)
    per_sig: dict[str, Estimate] = {}
    per_insig: dict[str, Estimate] = {}
    mean_sig = mean_insig = share = None
    if scored:
        sig = np.array([c.significant for c in scored], dtype=np.float64)
        insig = np.array([c.insignificant for c in scored], dtype=np.float64)
        mean_sig = bootstrap_mean(sig.sum(axis=1), cfg)
        mean_insig = bootstrap_mean(insig.sum(axis=1), cfg)
        share = bootstrap_mean((sig.sum(axis=1) == 0).astype(np.float64), cfg)
        for k, letter in enumerate(LETTERS):
            per_sig[letter] = bootstrap_mean(sig[:, k], cfg)
            per_insig[letter] = bootstrap_mean(insig[:, k], cfg)
    return ChexpromptSummary(judge=judge, published_prompt=published_prompt, judge_model=judge_model,
                             n_reports=len(judgements), n_scored=len(scored), failures=dict(failures),
                             mean_significant=mean_sig, mean_insignificant=mean_insig,
                             share_without_significant=share, per_type_significant=per_sig,
                             per_type_insignificant=per_insig, failure_examples=examples)


def nothing_judged(result: Any) -> bool:
    """True when some CheXprompt summary in an eval result (plain or paired) scored none of its reports.

    Why: such a run prints a table of failures and no number; exiting 0 would let a script take it for a
    result."""
    if isinstance(result, dict):
        if isinstance(result.get("n_reports"), int) and "n_scored" in result:
            return result["n_reports"] > 0 and result["n_scored"] == 0
        return any(nothing_judged(v) for v in result.values())
    if isinstance(result, list):
        return any(nothing_judged(v) for v in result)
    return False


def refusal(result: Any) -> Optional[str]:
    """The first CheXprompt failure of an eval result (plain or paired), ``HTTP 400: <server message>``, when every
    failure is an HTTP 4xx status not worth another attempt (400, 413, 422), else None. Why: the endpoint then
    rejects the request itself, so "rerun" cannot help, while a timeout, a 429 or a 5xx may pass next time."""
    summaries = _summaries(result)
    reasons = [r for s in summaries for r in s["failures"]]
    if not reasons or not all(_refused_status(r) for r in reasons):
        return None
    examples = {k: v for s in summaries for k, v in (s.get("failure_examples") or {}).items()}
    return examples.get(reasons[0], reasons[0]).removeprefix("request failed: ")


def unreadable_only(result: Any) -> Optional[int]:
    """How many judge answers did not parse, when that was every CheXprompt failure of an eval result (no request
    failed), else None. Why: the judge answers at temperature 0, so asking again brings the same answers; the
    judge model or the prompt has to change, not the attempt."""
    failures = [s["failures"] for s in _summaries(result)]
    reasons = [r for f in failures for r in f]
    if not reasons or not all(r.startswith("unparseable") for r in reasons):
        return None
    return sum(n for f in failures for n in f.values())


def unscored(result: Any) -> Optional[str]:
    """A warning for a run that scored some reports but not all (plain or paired), or None. Why: the failures were
    counted on standard output only, and the run exited 0, so a script, or a user reading stderr, took the means
    for those of every report; and only a failed request is worth a rerun (its answer was never cached), not an
    unreadable answer (at temperature 0 it comes back the same) nor a refusal."""
    # a paired result holds each arm's summary twice: in the arm's metrics and in the parity verdict
    arms = {k: v for k, v in result.items() if k != "chexprompt_parity"} if isinstance(result, dict) else result
    summaries = _summaries(arms)
    left = sum(s["n_reports"] - s["n_scored"] for s in summaries if isinstance(s.get("n_reports"), int))
    if left <= 0:
        return None
    again = sum(n for s in summaries for r, n in s["failures"].items()
                if r.startswith("request failed") and not _refused_status(r))
    total = sum(s["n_reports"] for s in summaries if isinstance(s.get("n_reports"), int))
    return (f"CheXprompt left {left} of {total} reports unscored (out of its means; the reasons are in the summary)"
            + (f": rerun the same command to ask again for the {again} whose requests failed (the answers already "
               f"given are cached)" if again else ""))


def _refused_status(reason: str) -> bool:
    match = _HTTP_FAILURE.match(reason)
    return match is not None and 400 <= int(match.group(1)) < 500 and not retryable_status(int(match.group(1)))


def _summaries(result: Any) -> list[dict[str, Any]]:
    """The CheXprompt summaries (as JSON) of an eval result, plain or paired."""
    if isinstance(result, dict):
        own = [result] if "n_scored" in result and isinstance(result.get("failures"), dict) else []
        return own + [s for k, v in result.items() if k not in ("failures", "failure_examples") for s in _summaries(v)]
    if isinstance(result, list):
        return [s for v in result for s in _summaries(v)]
    return []
