"""Micro/macro F1 over the 14 and the 5 CheXpert findings, as the released evaluator scores CheXbert labels.

The released ``rrg_eval/chexbert.py`` maps the four label codes to binary (``rrg``: only positive counts;
``rrg+``: positive or uncertain counts), treats the ground-truth report's labels as truth, and reads
micro and macro F1 from scikit-learn's ``classification_report(..., zero_division=0)``. The same
arithmetic is done here with per-report confusion counts (a finding with no positives on either side
scores 0 in the macro mean, as with ``zero_division=0``), so the bootstrap can resample reports cheaply.
Used for both the offline rule labeler and CheXbert.
"""

from __future__ import annotations

import numpy as np

from radtrt.errors import fail
from radtrt.evaluation.bootstrap import BatchStatistic, BootstrapConfig, Estimate, bootstrap, resampled_sums
from radtrt.evaluation.labels import CONDITIONS, CONDITIONS_5, Label

_INDEX_5 = [CONDITIONS.index(c) for c in CONDITIONS_5]


def binarize(codes: np.ndarray, uncertain_as_positive: bool) -> np.ndarray:
    """Positive -> 1 (and uncertain -> 1 in the ``+`` variant); negative and blank -> 0."""
    positive = codes == Label.POSITIVE
    if uncertain_as_positive:
        positive |= codes == Label.UNCERTAIN
    return positive.astype(np.int64)


def _confusion(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Per-report counts (n, 3k): true positives, false positives, false negatives for k findings."""
    tp, fp, fn = pred & true, pred & (1 - true), (1 - pred) & true
    return np.concatenate([tp, fp, fn], axis=1)


def _f1_from_counts(counts: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Micro and macro F1 from summed counts (..., 3k)."""
    tp, fp, fn = counts[..., :k], counts[..., k:2 * k], counts[..., 2 * k:]
    with np.errstate(divide="ignore", invalid="ignore"):
        denom = 2 * tp + fp + fn
        per_class = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
        micro_denom = denom.sum(axis=-1)
        micro = np.where(micro_denom > 0, 2 * tp.sum(axis=-1) / np.maximum(micro_denom, 1), 0.0)
    return micro, per_class.mean(axis=-1)


def per_finding_f1(pred_codes: np.ndarray, true_codes: np.ndarray, uncertain_as_positive: bool = False
                   ) -> dict[str, float]:
    """F1 for each of the 14 findings on all reports (no interval: a breakdown, not a headline)."""
    counts = _confusion(binarize(pred_codes, uncertain_as_positive), binarize(true_codes, uncertain_as_positive))
    k = len(CONDITIONS)
    tp, fp, fn = (counts[:, i * k:(i + 1) * k].sum(axis=0) for i in range(3))
    denom = 2 * tp + fp + fn
    return {c: float(2 * tp[i] / denom[i]) if denom[i] else 0.0 for i, c in enumerate(CONDITIONS)}


def _resampled_f1(counts: np.ndarray, k: int, which: int) -> BatchStatistic:
    """Micro (``which`` 0) or macro (1) F1 of every resample, from per-report confusion counts."""
    return lambda idx: _f1_from_counts(resampled_sums(idx, counts), k)[which]


def label_f1(pred_codes: np.ndarray, true_codes: np.ndarray, cfg: BootstrapConfig) -> dict[str, Estimate]:
    """Micro/Macro-F1-14 and -5, plain and ``+`` (uncertain counted as positive), with intervals."""
    if pred_codes.shape != true_codes.shape or pred_codes.ndim != 2 or pred_codes.shape[1] != len(CONDITIONS):
        fail("label arrays must both be (n_reports, 14)")
    out: dict[str, Estimate] = {}
    for suffix, uncertain in (("", False), ("+", True)):
        pred, true = binarize(pred_codes, uncertain), binarize(true_codes, uncertain)
        for name, cols in (("14", list(range(len(CONDITIONS)))), ("5", _INDEX_5)):
            counts = _confusion(pred[:, cols], true[:, cols])
            k = len(cols)
            micro, macro = _f1_from_counts(counts.sum(axis=0), k)
            out[f"micro_f1_{name}{suffix}"] = bootstrap(float(micro), len(counts), _resampled_f1(counts, k, 0), cfg)
            out[f"macro_f1_{name}{suffix}"] = bootstrap(float(macro), len(counts), _resampled_f1(counts, k, 1), cfg)
    return out
