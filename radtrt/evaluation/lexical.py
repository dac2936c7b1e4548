"""ROUGE-L and BLEU-1/4 exactly as the released LLaVA-Rad evaluator computes them.

The released ``rrg_eval/run.py`` (with its default ``bootstrap_ci=True``, the setting behind the paper's
tables) scores:

* ROUGE-L with Google's ``rouge-score`` (``RougeScorer(["rougeL"], use_stemmer=False)``, default
  tokenizer), F-measure per report, averaged over reports;
* BLEU-4 and BLEU-1 with ``sacrebleu``'s corpus BLEU (``BLEU()`` / ``BLEU(max_ngram_order=1)``: 13a
  tokenization, case-sensitive, exponential smoothing, one reference per hypothesis).

Corpus BLEU is not a mean of per-report values, so the bootstrap resamples per-report n-gram statistics
and recombines them with sacrebleu's own ``compute_bleu``; on all reports this equals
``BLEU().corpus_score(predictions, [references]).score``. Values are returned as fractions in [0, 1]
(sacrebleu's 0-100 score divided by 100) so every radtrt metric shares one scale.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from radtrt.evaluation.bootstrap import BootstrapConfig, Estimate, bootstrap, bootstrap_mean, resampled_sums


def rouge_l_scores(predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """Per-report ROUGE-L F-measure, as ``rouge_score`` computes it with the released settings."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return np.array([scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)],
                    dtype=np.float64)


def rouge_l(predictions: Sequence[str], references: Sequence[str], cfg: BootstrapConfig) -> Estimate:
    """Mean ROUGE-L F-measure over reports with a bootstrap interval."""
    return bootstrap_mean(rouge_l_scores(predictions, references), cfg)


def bleu_statistics(predictions: Sequence[str], references: Sequence[str], max_order: int) -> np.ndarray:
    """Per-report sufficient statistics: matches[0:N], totals[0:N], hypothesis length, reference length."""
    from sacrebleu.metrics import BLEU

    # effective_order only changes sentence-level scores, not the counts read here; it silences
    # sacrebleu's advice about sentence BLEU.
    metric = BLEU(max_ngram_order=max_order, effective_order=True)
    rows = []
    for pred, ref in zip(predictions, references):
        s = metric.sentence_score(pred, [ref])
        rows.append([*s.counts, *s.totals, s.sys_len, s.ref_len])
    return np.array(rows, dtype=np.int64).reshape(len(rows), 2 * max_order + 2)


def bleu_from_statistics(stats: np.ndarray, max_order: int) -> float:
    """Corpus BLEU (fraction) from summed statistics, through sacrebleu's scoring with its defaults."""
    from sacrebleu.metrics import BLEU

    total = stats.sum(axis=0) if stats.ndim == 2 else stats
    score = BLEU.compute_bleu(correct=[int(x) for x in total[:max_order]],
                              total=[int(x) for x in total[max_order:2 * max_order]],
                              sys_len=int(total[2 * max_order]), ref_len=int(total[2 * max_order + 1]),
                              smooth_method="exp", max_ngram_order=max_order)
    return score.score / 100.0


def bleu(predictions: Sequence[str], references: Sequence[str], max_order: int, cfg: BootstrapConfig) -> Estimate:
    """Corpus BLEU-``max_order`` with an interval from resampling reports."""
    stats = bleu_statistics(predictions, references, max_order)

    def per_resample(idx: np.ndarray) -> np.ndarray:
        sums = resampled_sums(idx, stats)  # (n_resamples, 2N+2)
        return np.array([bleu_from_statistics(row, max_order) for row in sums])

    return bootstrap(bleu_from_statistics(stats, max_order), len(stats), per_resample, cfg)
