"""The INT8 parity gate: an INT8 bundle (ONNX Runtime, CPU) against the fp32 PyTorch model.

On held-out studies (never the calibration ones), per study, measured as ``radtrt bench parity``
measures (``radtrt.benchmarks.parity``): cosine of the image embeddings, the first decode step's
logits (max |difference| relative to the reference's logit range, and whether the argmax agrees),
the later steps' logits where both sides ran on the same tokens (what an INT8 KV cache changes),
greedy tokens identical or not, ROUGE-L of the report against the reference report, and the phantom
labeler's finding labels of both reports (``radtrt.data.labeler``). The
summary gives the rates, the label micro-F1 of INT8 against fp32 (agreement), and, where the data
has true labels, both backends' micro-F1 against them and the drop (fp32's minus INT8's: positive when
INT8 is worse, which is how the printout names it; the JSON key ``label_f1_drop`` says the same).

Thresholds (the INT8 issue's targets): vision cosine >= 0.99, identical reports >= 80%, label
micro-F1 within 0.02 of fp32. Below them the export warns loudly; it does not refuse, because the
thresholds are for the trained model and a random-weight test model cannot meet them.

The rate of identical reports comes with a 95% Wilson score interval and the F1 drop with the
same seeded bootstrap as every other metric, paired over studies (both in ``radtrt.evaluation.bootstrap``).
On the gate's few studies one changed report moves micro-F1 by several hundredths, so a warning says
whether its interval still reaches the threshold, i.e. whether more studies are needed before reading
it as a regression.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch

from radtrt.benchmarks.parity import StudyParity
from radtrt.calibration.samples import Sample
from radtrt.model.llava_rad import LlavaRad
from radtrt.model.tokenizer import LlamaSPTokenizer

MIN_VISION_COSINE = 0.99
MIN_EXACT_MATCH = 0.80
MAX_LABEL_F1_DROP = 0.02
PARITY_MAX_NEW_TOKENS = 64
FIRM_STUDIES = 30  # fewer held-out studies than this, and the printout says the gate is a weak one
PER_STUDY_FIELDS = ("vision_cosine", "first_logits_max_abs_diff", "first_argmax_equal", "tokens_equal",
                    "first_divergence", "decode_logits_max_abs_diff", "rouge_l", "labels", "reference_labels",
                    "true_labels")


@torch.no_grad()
def measure(bundle: Path, model: LlavaRad, tokenizer: LlamaSPTokenizer, samples: list[Sample], *,
            max_new_tokens: int = PARITY_MAX_NEW_TOKENS, threads: int | None = None,
            on_sample: Callable[[int], None] | None = None) -> list[StudyParity]:
    """Both sides on each sample's pixels and prompt, compared as ``radtrt bench parity`` compares them."""
    from radtrt.benchmarks.parity import compare, outcome
    from radtrt.runtime.backends import TorchBackend
    from radtrt.runtime.ort import OrtBackend

    backend, reference = OrtBackend(bundle, verify=False, threads=threads), TorchBackend(model)
    results = []
    for i, sample in enumerate(samples):
        got = outcome(backend, tokenizer, sample.pixels, sample.prompt_ids, max_new_tokens=max_new_tokens)
        ref = outcome(reference, tokenizer, sample.pixels, sample.prompt_ids, max_new_tokens=max_new_tokens)
        truth = list(sample.ref.labels) if sample.ref.labels is not None else None
        results.append(compare(sample.ref.study, got, ref, truth))
        if on_sample:
            on_sample(i + 1)
    return results


def summarize(results: list[StudyParity], *, source: str = "", max_new_tokens: int = PARITY_MAX_NEW_TOKENS
              ) -> dict[str, Any]:
    """Rates over the studies, the label F1s, and the list of thresholds missed (``warnings``). The
    per-study part keeps numbers and labels only: no report text goes into the bundle's manifest."""
    from radtrt.benchmarks.parity import label_f1_drop_interval, totals
    from radtrt.data.labeler import label_f1

    summary: dict[str, Any] = totals(results) | {
        "source": source, "max_new_tokens": max_new_tokens,
        "label_f1_vs_fp32": label_f1([r.labels for r in results], [r.reference_labels for r in results]).micro_f1,
    }
    truth = [r.true_labels for r in results]
    if all(t is not None for t in truth):
        f1_int8 = label_f1([r.labels for r in results], truth).micro_f1  # type: ignore[arg-type]
        f1_fp32 = label_f1([r.reference_labels for r in results], truth).micro_f1  # type: ignore[arg-type]
        summary |= {"label_f1_int8": f1_int8, "label_f1_fp32": f1_fp32, "label_f1_drop": f1_fp32 - f1_int8,
                    **label_f1_drop_interval(results)}
    summary["warnings"] = _warnings(summary)
    summary["thresholds"] = {"vision_cosine_min": MIN_VISION_COSINE, "exact_match_rate": MIN_EXACT_MATCH,
                             "label_f1_drop": MAX_LABEL_F1_DROP}
    # numbered, not named: study folders are often accession numbers or patient IDs, and this goes into the
    # bundle's manifest, which travels to other machines
    summary["per_study"] = [{"sample": i} | {k: v for k, v in asdict(r).items() if k in PER_STUDY_FIELDS}
                            for i, r in enumerate(results, 1)]
    return summary


def undecided(s: dict[str, Any], metric: str) -> bool:
    """Whether a missed target's 95% interval still reaches it (``exact_match_rate`` or ``label_f1_drop``):
    then the studies were too few to call it a regression. One study gives no interval, so it cannot tell either."""
    if s[f"{metric}_ci"] is None:
        return True
    low, high = s[f"{metric}_ci"]
    if metric == "exact_match_rate":
        return high >= MIN_EXACT_MATCH
    return low <= MAX_LABEL_F1_DROP


def _interval(s: dict[str, Any], metric: str, fmt: str) -> str:
    if s[f"{metric}_ci"] is None:
        return "no 95% interval from one study, so more studies are needed to tell (--parity-samples)"
    low, high = s[f"{metric}_ci"]
    text = f"95% interval {low:{fmt}} to {high:{fmt}} over {s['studies']} studies"
    if undecided(s, metric):
        text += "; it reaches the target, so more studies are needed to tell (--parity-samples)"
    return text


def _warnings(s: dict[str, Any]) -> list[str]:
    out = []
    if s["vision_cosine_min"] < MIN_VISION_COSINE:
        out.append(f"vision-embedding cosine {s['vision_cosine_min']:.4f} < {MIN_VISION_COSINE}")
    if s["exact_match_rate"] < MIN_EXACT_MATCH:
        out.append(f"identical reports {s['exact_match_rate']:.0%} < {MIN_EXACT_MATCH:.0%} ("
                   + _interval(s, "exact_match_rate", ".0%") + ")")
    if s.get("label_f1_drop", 0.0) > MAX_LABEL_F1_DROP:
        out.append(f"finding-label micro-F1 {s['label_f1_int8']:.3f} is {s['label_f1_drop']:.3f} below fp32's "
                   f"{s['label_f1_fp32']:.3f} (> {MAX_LABEL_F1_DROP}; the drop's "
                   + _interval(s, "label_f1_drop", ".3f") + ")")
    return out


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def summary_lines(s: dict[str, Any]) -> list[str]:
    """The export's parity printout (without the warnings, which are printed in red)."""
    lines = [f"INT8 parity vs fp32 PyTorch on {s['source'] or str(s['studies']) + ' studies'} "
             f"({s['max_new_tokens']} new tokens max):",
             f"  vision-embedding cosine min {s['vision_cosine_min']:.5f} mean {s['vision_cosine_mean']:.5f}; "
             f"first-step logits max |diff| {s['first_logits_max_abs_diff']:.3g} "
             f"({s['first_logits_max_rel_diff']:.2%} of the logit range), argmax agreement "
             f"{s['first_argmax_agreement']:.0%}",
             f"  later steps on the same tokens ({s['decode_steps_compared']}): logits max |diff| "
             f"{_num(s['decode_logits_max_abs_diff'])}, mean of each step's {_num(s['decode_logits_mean_max_abs_diff'])}",
             f"  identical reports {s['exact_match_rate']:.0%} (95% interval {s['exact_match_rate_ci'][0]:.0%} to "
             f"{s['exact_match_rate_ci'][1]:.0%}), ROUGE-L mean {s['rouge_l_mean']:.3f}, "
             f"finding labels micro-F1 vs fp32 {s['label_f1_vs_fp32']:.3f}"]
    if "label_f1_int8" in s:
        from radtrt.benchmarks.markdown import drop_interval_text

        lines.append(f"  finding-label micro-F1 vs true labels: int8 {s['label_f1_int8']:.3f}, "
                     f"fp32 {s['label_f1_fp32']:.3f} (drop, fp32 - int8: {s['label_f1_drop']:.3f}; 95% interval "
                     f"{drop_interval_text(s)})")
    if s["studies"] < FIRM_STUDIES:
        held_out = "1 held-out study" if s["studies"] == 1 else f"{s['studies']} held-out studies"
        why = "" if s["studies"] == 1 else " (the label-F1 interval is zero-width when every study agrees)"
        lines.append(f"  only {held_out}: a pass says little{why}; --parity-samples {FIRM_STUDIES} or more for a "
                     f"firmer gate")
    return lines
