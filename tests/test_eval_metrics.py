"""Lexical metrics against the reference packages, the bootstrap, and label F1 against hand counts."""

from __future__ import annotations

import numpy as np
import pytest

from radtrt.errors import RadtrtError
from radtrt.evaluation import label_f1, lexical
from radtrt.evaluation.bootstrap import BootstrapConfig, bootstrap_mean, resample_indices, resampled_sums
from radtrt.evaluation.labels import CONDITIONS, Label

PREDS = [
    "The heart is normal in size. No pleural effusion.",
    "Small left pleural effusion with adjacent atelectasis.",
    "Moderate cardiomegaly. Mild pulmonary edema, improved since the prior study.",
    "No acute cardiopulmonary process.",
    "",
]
REFS = [
    "The heart size is normal. No pleural effusion or pneumothorax.",
    "Small left pleural effusion. Left basilar atelectasis.",
    "Stable moderate cardiomegaly. Pulmonary edema has improved.",
    "Lungs are clear. No acute cardiopulmonary process.",
    "Endotracheal tube terminates 3 cm above the carina.",
]
CFG = BootstrapConfig(n_resamples=200, seed=3)


def test_rouge_l_matches_rouge_score_per_pair() -> None:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    expected = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(PREDS, REFS)]
    assert lexical.rouge_l_scores(PREDS, REFS).tolist() == pytest.approx(expected, abs=1e-12)
    assert lexical.rouge_l(PREDS, REFS, CFG).value == pytest.approx(float(np.mean(expected)), abs=1e-12)


def test_rouge_l_hand_value_and_argument_order() -> None:
    # LCS of "the heart is normal" with "the heart size is normal" is 4 tokens: P = 4/4, R = 4/5.
    value = lexical.rouge_l_scores(["the heart is normal"], ["the heart size is normal"])[0]
    assert value == pytest.approx(2 * 1.0 * 0.8 / 1.8)
    # rouge-score lower-cases and drops punctuation; no stemming ("effusions" != "effusion").
    assert lexical.rouge_l_scores(["No effusion."], ["no effusion"])[0] == pytest.approx(1.0)
    assert lexical.rouge_l_scores(["no effusions"], ["no effusion"])[0] == pytest.approx(0.5)


@pytest.mark.parametrize("order", [1, 4])
def test_bleu_equals_sacrebleu_corpus_score(order: int) -> None:
    from sacrebleu.metrics import BLEU

    # The released evaluator's call: BLEU(max_ngram_order=N).corpus_score(hypotheses, [references]).
    expected = BLEU(max_ngram_order=order).corpus_score(PREDS, [REFS]).score / 100
    got = lexical.bleu(PREDS, REFS, order, CFG)
    assert got.value == pytest.approx(expected, abs=1e-12)
    assert got.ci_low <= got.value <= got.ci_high
    # Subsets too: statistics are summed, not scores averaged.
    sub = BLEU(max_ngram_order=order).corpus_score(PREDS[:3], [REFS[:3]]).score / 100
    assert lexical.bleu_from_statistics(lexical.bleu_statistics(PREDS[:3], REFS[:3], order), order) == \
        pytest.approx(sub, abs=1e-12)


def test_bleu_1_hand_value() -> None:
    # 5 of 6 unigrams match, equal lengths: brevity penalty 1.
    got = lexical.bleu(["the cat sat on the mat"], ["the cat is on the mat"], 1, CFG)
    assert got.value == pytest.approx(5 / 6)


def test_bootstrap_is_seeded_and_brackets_the_mean() -> None:
    values = np.arange(50, dtype=float)
    a, b = bootstrap_mean(values, CFG), bootstrap_mean(values, CFG)
    assert a == b
    assert a.value == pytest.approx(24.5)
    assert a.ci_low < 24.5 < a.ci_high
    other = bootstrap_mean(values, BootstrapConfig(n_resamples=200, seed=4))
    assert (other.ci_low, other.ci_high) != (a.ci_low, a.ci_high)
    const = bootstrap_mean(np.full(10, 2.0), CFG)
    assert (const.ci_low, const.value, const.ci_high) == (2.0, 2.0, 2.0)


def test_resampled_sums_equal_explicit_sums() -> None:
    per_report = np.arange(21, dtype=np.int64).reshape(7, 3)
    idx = resample_indices(7, BootstrapConfig(n_resamples=5, seed=1))
    assert np.array_equal(resampled_sums(idx, per_report), per_report[idx].sum(axis=1))


def test_bootstrap_draws_resamples_in_blocks_with_unchanged_intervals(monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole (resamples x reports) index matrix was drawn at once, and copied by each metric: 100 000
    resamples of 20 000 reports ended in a MemoryError traceback. Blocks of rows from the one generator give the
    intervals of the single draw."""
    from radtrt.evaluation import bootstrap as bootstrap_module

    shapes: list[tuple[int, ...]] = []

    def mean(idx: np.ndarray) -> np.ndarray:
        shapes.append(idx.shape)
        return values[idx].mean(axis=1)

    values = np.random.default_rng(0).random(1000)
    bootstrap_module.bootstrap(0.0, 1000, mean, BootstrapConfig(n_resamples=20_000))
    assert max(r * n for r, n in shapes) <= 1 << 22 and sum(r for r, _ in shapes) == 20_000

    values, cfg = values[:101], BootstrapConfig(n_resamples=300, seed=5)
    whole = np.random.default_rng(5).integers(0, 101, size=(300, 101))  # the single draw radtrt made before
    assert np.array_equal(resample_indices(101, cfg), whole)
    monkeypatch.setattr(bootstrap_module, "CHUNK_ELEMENTS", 10**9)  # one block: the single draw
    before = bootstrap_module.bootstrap(0.0, 101, mean, cfg)
    monkeypatch.setattr(bootstrap_module, "CHUNK_ELEMENTS", 1000)  # blocks of 9 rows, the last one shorter
    shapes.clear()
    assert bootstrap_module.bootstrap(0.0, 101, mean, cfg) == before
    assert shapes[0] == (9, 101) and shapes[-1] == (3, 101)


def test_bootstrap_refuses_bad_settings() -> None:
    with pytest.raises(RadtrtError):
        BootstrapConfig(n_resamples=0)
    with pytest.raises(RadtrtError):
        bootstrap_mean([], CFG)


def _codes(rows: list[dict[str, Label]]) -> np.ndarray:
    out = np.zeros((len(rows), len(CONDITIONS)), dtype=np.int8)
    for i, row in enumerate(rows):
        for cond, label in row.items():
            out[i, CONDITIONS.index(cond)] = label
    return out


def test_label_f1_against_hand_counts() -> None:
    P, N, U = Label.POSITIVE, Label.NEGATIVE, Label.UNCERTAIN
    true = _codes([{"Cardiomegaly": P, "Edema": P}, {"Pleural Effusion": P}, {"Atelectasis": U}])
    pred = _codes([{"Cardiomegaly": P}, {"Pleural Effusion": P, "Pneumothorax": P}, {"Atelectasis": P}])
    scores = label_f1.label_f1(pred, true, CFG)
    # Positive only: TP = 2 (cardiomegaly, effusion), FP = 2 (pneumothorax, atelectasis), FN = 1 (edema).
    assert scores["micro_f1_14"].value == pytest.approx(4 / 7)
    # Per finding: cardiomegaly 1, effusion 1, edema 0, pneumothorax 0, atelectasis 0, rest 0 -> 2/14.
    assert scores["macro_f1_14"].value == pytest.approx(2 / 14)
    # Five findings (no pneumothorax): TP 2, FP 1, FN 1 -> 4/6; macro (1 + 1 + 0 + 0 + 0) / 5.
    assert scores["micro_f1_5"].value == pytest.approx(4 / 6)
    assert scores["macro_f1_5"].value == pytest.approx(2 / 5)
    # Uncertain counted as positive: atelectasis becomes a true positive.
    assert scores["micro_f1_14+"].value == pytest.approx(6 / 8)
    assert scores["micro_f1_5+"].value == pytest.approx(6 / 7)
    per = label_f1.per_finding_f1(pred, true)
    assert per["Cardiomegaly"] == 1.0 and per["Edema"] == 0.0 and per["Pneumothorax"] == 0.0
    # Negative labels are not findings: all-negative predictions against all-blank truth score 0, not 1.
    assert label_f1.label_f1(_codes([{"Edema": N}]), _codes([{}]), CFG)["micro_f1_14"].value == 0.0


def test_label_f1_refuses_misshapen_arrays() -> None:
    with pytest.raises(RadtrtError):
        label_f1.label_f1(np.zeros((2, 13), dtype=np.int8), np.zeros((2, 13), dtype=np.int8), CFG)
