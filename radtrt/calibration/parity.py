"""The INT8 parity gate: an INT8 bundle (ONNX Runtime, CPU) against the fp32 PyTorch model.

On held-out studies (never the calibration ones), per study: cosine of the image embeddings, the
first decode step's logits (max |difference| relative to the reference's logit range, and whether
the argmax agrees), greedy tokens identical or not, ROUGE-L of the report against the reference
report, and the phantom labeler's finding labels of both reports (``radtrt.data.labeler``). The
summary gives the rates, the label micro-F1 of INT8 against fp32 (agreement), and, where the data
has true labels, both backends' micro-F1 against them and the difference.

Thresholds (the INT8 issue's targets): vision cosine >= 0.99, identical reports >= 80%, label
micro-F1 within 0.02 of fp32. Below them the export warns loudly; it does not refuse, because the
thresholds are for the trained model and a random-weight test model cannot meet them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from radtrt.calibration.samples import Sample
from radtrt.model.generate import greedy_generate
from radtrt.model.llava_rad import LlavaRad
from radtrt.model.tokenizer import LlamaSPTokenizer

MIN_VISION_COSINE = 0.99
MIN_EXACT_MATCH = 0.80
MAX_LABEL_F1_DROP = 0.02
PARITY_MAX_NEW_TOKENS = 64


@dataclass(frozen=True)
class StudyResult:
    study: str
    vision_cosine: float
    first_logits_max_abs_diff: float
    first_logits_rel_diff: float  # max |diff| / the reference's logit range
    first_argmax_equal: bool
    tokens_equal: bool
    rouge_l: float
    labels: list[str]
    reference_labels: list[str]
    true_labels: list[str] | None


@torch.no_grad()
def measure(bundle: Path, model: LlavaRad, tokenizer: LlamaSPTokenizer, samples: list[Sample], *,
            max_new_tokens: int = PARITY_MAX_NEW_TOKENS, threads: int | None = None,
            on_sample: Callable[[int], None] | None = None) -> list[StudyResult]:
    from radtrt.benchmarks.parity import cosine, rouge_l
    from radtrt.data.labeler import extract_labels
    from radtrt.runtime.ort import OrtBackend
    from radtrt.runtime.pipeline import postprocess

    backend = OrtBackend(bundle, verify=False, threads=threads)
    eos = tokenizer.eos_token_id
    results = []
    for i, sample in enumerate(samples):
        ref_img = model.encode_images(sample.pixels[None].to(model.dtype))[0]
        got_img = backend.encode_images(sample.pixels[None])[0]
        ref = greedy_generate(model.language_model, [model.embed_multimodal(sample.prompt_ids, ref_img)],
                              eos_token_id=eos, max_new_tokens=max_new_tokens, keep_logits=True)
        got = backend.generate([backend.embed_prompt(sample.prompt_ids, got_img)], eos_token_id=eos,
                               max_new_tokens=max_new_tokens, keep_logits=True)
        assert ref.first_logits is not None and got.first_logits is not None
        r_logits, g_logits = ref.first_logits[0].float(), got.first_logits[0].float()
        diff = float((g_logits - r_logits).abs().max())
        span = float(r_logits.max() - r_logits.min()) or 1.0
        report, ref_report = (postprocess(tokenizer.decode(g.token_ids[0])) for g in (got, ref))
        truth = list(sample.ref.labels) if sample.ref.labels is not None else None
        results.append(StudyResult(sample.ref.study, cosine(got_img, ref_img), diff, diff / span,
                                   bool(g_logits.argmax() == r_logits.argmax()), got.token_ids == ref.token_ids,
                                   rouge_l(report, ref_report), extract_labels(report), extract_labels(ref_report),
                                   truth))
        if on_sample:
            on_sample(i + 1)
    return results


def summarize(results: list[StudyResult], *, source: str = "", max_new_tokens: int = PARITY_MAX_NEW_TOKENS
              ) -> dict[str, Any]:
    """Rates over the studies, the label F1s, and the list of thresholds missed (``warnings``)."""
    from radtrt.data.labeler import label_f1

    n = len(results)
    cos = [r.vision_cosine for r in results]
    summary: dict[str, Any] = {
        "studies": n, "source": source, "max_new_tokens": max_new_tokens,
        "vision_cosine_min": min(cos), "vision_cosine_mean": sum(cos) / n,
        "first_logits_max_abs_diff": max(r.first_logits_max_abs_diff for r in results),
        "first_logits_max_rel_diff": max(r.first_logits_rel_diff for r in results),
        "first_argmax_agreement": sum(r.first_argmax_equal for r in results) / n,
        "exact_match_rate": sum(r.tokens_equal for r in results) / n,
        "rouge_l_mean": sum(r.rouge_l for r in results) / n,
        "label_f1_vs_fp32": label_f1([r.labels for r in results], [r.reference_labels for r in results]).micro_f1,
    }
    truth = [r.true_labels for r in results]
    if all(t is not None for t in truth):
        f1_int8 = label_f1([r.labels for r in results], truth).micro_f1  # type: ignore[arg-type]
        f1_fp32 = label_f1([r.reference_labels for r in results], truth).micro_f1  # type: ignore[arg-type]
        summary |= {"label_f1_int8": f1_int8, "label_f1_fp32": f1_fp32, "label_f1_drop": f1_fp32 - f1_int8}
    summary["warnings"] = _warnings(summary)
    summary["thresholds"] = {"vision_cosine_min": MIN_VISION_COSINE, "exact_match_rate": MIN_EXACT_MATCH,
                             "label_f1_drop": MAX_LABEL_F1_DROP}
    summary["per_study"] = [asdict(r) for r in results]
    return summary


def _warnings(s: dict[str, Any]) -> list[str]:
    out = []
    if s["vision_cosine_min"] < MIN_VISION_COSINE:
        out.append(f"vision-embedding cosine {s['vision_cosine_min']:.4f} < {MIN_VISION_COSINE}")
    if s["exact_match_rate"] < MIN_EXACT_MATCH:
        out.append(f"identical reports {s['exact_match_rate']:.0%} < {MIN_EXACT_MATCH:.0%}")
    if s.get("label_f1_drop", 0.0) > MAX_LABEL_F1_DROP:
        out.append(f"finding-label micro-F1 {s['label_f1_int8']:.3f} is {s['label_f1_drop']:.3f} below fp32's "
                   f"{s['label_f1_fp32']:.3f} (> {MAX_LABEL_F1_DROP})")
    return out


def summary_lines(s: dict[str, Any]) -> list[str]:
    """The export's parity printout (without the warnings, which are printed in red)."""
    lines = [f"INT8 parity vs fp32 PyTorch on {s['source'] or str(s['studies']) + ' studies'} "
             f"({s['max_new_tokens']} new tokens max):",
             f"  vision-embedding cosine min {s['vision_cosine_min']:.5f} mean {s['vision_cosine_mean']:.5f}; "
             f"first-step logits max |diff| {s['first_logits_max_abs_diff']:.3g} "
             f"({s['first_logits_max_rel_diff']:.2%} of the logit range), argmax agreement "
             f"{s['first_argmax_agreement']:.0%}",
             f"  identical reports {s['exact_match_rate']:.0%}, ROUGE-L mean {s['rouge_l_mean']:.3f}, "
             f"finding labels micro-F1 vs fp32 {s['label_f1_vs_fp32']:.3f}"]
    if "label_f1_int8" in s:
        lines.append(f"  finding-label micro-F1 vs true labels: int8 {s['label_f1_int8']:.3f}, "
                     f"fp32 {s['label_f1_fp32']:.3f}")
    return lines
