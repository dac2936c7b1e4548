"""``radtrt bench parity``: does a backend write the same reports as the reference, and how close is it?

Per study, both backends see the same preprocessed pixels; each then runs its own vision, prompt
splice and greedy decode, exactly as ``radtrt infer`` would. Compared:

* image embeddings: cosine of the flattened tensors (float64) and max |difference|;
* first decode step: max |logit difference| and whether the argmax agrees; later steps run on the same
  tokens by both sides: the largest |logit difference| and the mean of each step's largest;
* generated tokens: identical or not, and the first position where they differ;
* report text: ROUGE-L F1 (backend vs reference), with LLaVA-Rad's evaluator settings;
* finding labels (phantom labeler): agreement, and micro-F1 against the manifest's true labels.

CheXprompt (an LLM judge) is not run here: ``write_paired_predictions`` writes both sides' reports for
``radtrt eval --paired``, which talks to the judge.

The per-study comparisons (``compare``) are pure functions so they are tested without any model. The
export's INT8 parity gate (``radtrt.calibration.parity``) measures with the same ``outcome``/``compare``.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from radtrt.benchmarks.machine import MachineInfo
from radtrt.calibration.samples import Entry
from radtrt.errors import fail
from radtrt.evaluation.bootstrap import (MIN_INTERVAL_N, BootstrapConfig, Estimate, bootstrap, resampled_sums,
                                        wilson_interval)
from radtrt.model.tokenizer import LlamaSPTokenizer
from radtrt.outputs import make_dir, write_set
from radtrt.runtime.backends import Backend
from radtrt.runtime.pipeline import Pipeline, postprocess


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first differing token; the shorter length when one is a prefix; None when equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.detach().double().flatten(), b.detach().double().flatten()
    if a64.shape != b64.shape:
        fail(f"image embeddings differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    denom = float(a64.norm() * b64.norm())
    if denom == 0.0:  # an all-zero embedding: only another all-zero one is "the same direction"
        return 1.0 if torch.equal(a64, b64) else 0.0
    # rounding put identical embeddings at 1.0000000000000004, printed as "1 - min = -4.4e-16"
    return min(1.0, max(-1.0, float(a64 @ b64) / denom))


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 as LLaVA-Rad's evaluator scores it; identical texts score 1 (rouge-score gives an
    empty pair 0, which would read as total disagreement for two backends that agree)."""
    if prediction == reference:
        return 1.0
    try:
        import rouge_score  # noqa: F401  (radtrt.evaluation.lexical imports it lazily)
    except ImportError:
        fail("ROUGE-L needs the rouge-score package (a radtrt dependency): pip install rouge-score")
    from radtrt.evaluation.lexical import rouge_l_scores

    return float(rouge_l_scores([prediction], [reference])[0])


@dataclass(frozen=True)
class StudyParity:
    study: str
    tokens_equal: bool
    first_divergence: int | None
    new_tokens: int
    reference_new_tokens: int
    rouge_l: float
    first_logits_max_abs_diff: float
    reference_first_logits_max_abs: float
    reference_first_logits_range: float  # max - min: what the INT8 gate states the difference against
    first_argmax_equal: bool
    # Steps after the first whose inputs were the same on both sides (up to and including the step where the
    # tokens diverge), the largest |logit difference| over them and the mean over them of each step's largest:
    # what a quantized KV cache changes, which the first step (the prompt's) does not see. None: no such step.
    decode_steps_compared: int
    decode_logits_max_abs_diff: float | None
    decode_logits_mean_max_abs_diff: float | None
    vision_cosine: float
    vision_max_abs_diff: float
    report: str
    reference_report: str
    labels: list[str]  # the phantom labeler's finding labels of each report (radtrt.data.labeler)
    reference_labels: list[str]
    true_labels: list[str] | None = None  # from the studies' manifest, where it has them
    true_findings: str | None = None  # the manifest's ground-truth findings (what CheXprompt judges against)
    # both sides' generated ids: what the first divergence and the reports were read from, kept so a report can
    # be checked without running again
    token_ids: list[int] | None = None
    reference_token_ids: list[int] | None = None


@dataclass(frozen=True)
class Outcome:
    """What one backend produced for one study."""

    image_embeds: torch.Tensor
    token_ids: list[int]
    logits: torch.Tensor  # [steps, V]: every step's logits, the first being the prompt's
    report: str

    @property
    def first_logits(self) -> torch.Tensor:
        return self.logits[0]


def compare(study: str, got: Outcome, ref: Outcome, true_labels: list[str] | None = None,
            true_findings: str | None = None) -> StudyParity:
    from radtrt.data.labeler import extract_labels

    diff = (got.first_logits.float() - ref.first_logits.float()).abs()
    divergence = first_divergence(got.token_ids, ref.token_ids)
    # step k's input is the prompt and tokens[:k]: equal on both sides for every k up to the divergence
    same_input = divergence + 1 if divergence is not None else len(ref.token_ids) + 1
    steps = min(same_input, got.logits.shape[0], ref.logits.shape[0])
    decode = (got.logits[1:steps].float() - ref.logits[1:steps].float()).abs().amax(-1)  # per step
    return StudyParity(
        study=study, tokens_equal=got.token_ids == ref.token_ids,
        first_divergence=divergence, new_tokens=len(got.token_ids),
        reference_new_tokens=len(ref.token_ids), rouge_l=rouge_l(got.report, ref.report),
        first_logits_max_abs_diff=float(diff.max()),
        reference_first_logits_max_abs=float(ref.first_logits.float().abs().max()),
        reference_first_logits_range=float(ref.first_logits.float().max() - ref.first_logits.float().min()),
        first_argmax_equal=bool(torch.equal(got.first_logits.argmax(-1), ref.first_logits.argmax(-1))),
        decode_steps_compared=max(steps - 1, 0),
        decode_logits_max_abs_diff=float(decode.max()) if decode.numel() else None,
        decode_logits_mean_max_abs_diff=float(decode.mean()) if decode.numel() else None,
        vision_cosine=cosine(got.image_embeds, ref.image_embeds),
        vision_max_abs_diff=float((got.image_embeds.float() - ref.image_embeds.float()).abs().max()),
        report=got.report, reference_report=ref.report, labels=extract_labels(got.report),
        reference_labels=extract_labels(ref.report), true_labels=true_labels, true_findings=true_findings,
        token_ids=list(got.token_ids), reference_token_ids=list(ref.token_ids))


def outcome(backend: Backend, tokenizer: LlamaSPTokenizer, pixels: torch.Tensor, prompt_ids: list[int], *,
            max_new_tokens: int) -> Outcome:
    """A backend's compute stages on given pixels and prompt, keeping every step's logits."""
    image_embeds = backend.encode_images(pixels[None])[0]
    embeds = backend.embed_prompt(prompt_ids, image_embeds)
    gen = backend.generate([embeds], max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                           keep_logits=True)
    if gen.logits is None:
        fail(f"backend {backend.name} returned no logits")
    ids = gen.token_ids[0]
    return Outcome(image_embeds.detach().cpu(), ids, gen.logits[0].cpu(), postprocess(tokenizer.decode(ids)))


def run_one(pipeline: Pipeline, pixels: torch.Tensor, *, indication: str | None, max_new_tokens: int) -> Outcome:
    return outcome(pipeline.backend, pipeline.tokenizer, pixels, pipeline.prompt_ids(indication),
                   max_new_tokens=max_new_tokens)


# The stated fp16 tolerance (README "What was verified"): image embeddings and first-step logits of an fp16 side against
# the fp32 reference. fp32 sides must give the reference's tokens exactly; INT8 has the export's parity gate.
FP16_MIN_VISION_COSINE = 0.999
FP16_MAX_LOGIT_REL_DIFF = 0.02


def precision_targets(precision: str, s: dict[str, Any]) -> dict[str, bool]:
    """Each requirement of the backend side's precision (``"fp16 vs fp32"``: the side's first) against the summary
    ``s``, met or not: only INT8's were stated, so an fp32 side that changed tokens read as a plain measurement. A
    non-finite difference (an fp16 overflow) meets none. Empty where radtrt states none (bf16)."""
    from radtrt.calibration.parity import MAX_LABEL_F1_DROP, MIN_EXACT_MATCH, MIN_VISION_COSINE

    side, _, reference = precision.partition(" vs ")
    if "int8" in side:
        out = {f"image-embedding cosine >= {MIN_VISION_COSINE}": s["vision_cosine_min"] >= MIN_VISION_COSINE,
               f"identical reports >= {MIN_EXACT_MATCH:.0%}": s["exact_match_rate"] >= MIN_EXACT_MATCH}
        if "label_f1_drop" in s:
            out[f"label micro-F1 within {MAX_LABEL_F1_DROP} of the reference"] = s["label_f1_drop"] <= MAX_LABEL_F1_DROP
        return out
    if side == "fp32" and reference == "fp32":
        return {"identical tokens in every study (fp32)": s["exact_match_rate"] == 1.0}
    if "fp16" in side:
        return {f"image-embedding cosine >= {FP16_MIN_VISION_COSINE} (fp16)":
                s["vision_cosine_min"] >= FP16_MIN_VISION_COSINE,
                f"first-step logits within {FP16_MAX_LOGIT_REL_DIFF:.0%} of the reference's range (fp16)":
                s["first_logits_max_rel_diff"] <= FP16_MAX_LOGIT_REL_DIFF}
    return {}


def totals(studies: Sequence[StudyParity]) -> dict[str, Any]:
    """The rates and extremes over studies that this bench and the export's INT8 gate both report."""
    n = len(studies)
    cos = [s.vision_cosine for s in studies]
    decode = [s for s in studies if s.decode_logits_max_abs_diff is not None]
    steps = sum(s.decode_steps_compared for s in decode)
    return {"studies": n,
            "exact_match_rate": sum(s.tokens_equal for s in studies) / n,
            "rouge_l_mean": sum(s.rouge_l for s in studies) / n,
            "first_logits_max_abs_diff": max(s.first_logits_max_abs_diff for s in studies),
            # against each study's reference logit range (max - min), what the fp16 and INT8 tolerances are stated in
            "first_logits_max_rel_diff": max(s.first_logits_max_abs_diff / (s.reference_first_logits_range or 1.0)
                                             for s in studies),
            "first_argmax_agreement": sum(s.first_argmax_equal for s in studies) / n,
            "decode_steps_compared": steps,
            "decode_logits_max_abs_diff": max((s.decode_logits_max_abs_diff for s in decode), default=None),
            "decode_logits_mean_max_abs_diff": (sum(s.decode_logits_mean_max_abs_diff * s.decode_steps_compared
                                                    for s in decode) / steps) if steps else None,
            "vision_cosine_min": min(cos), "vision_cosine_mean": sum(cos) / n,
            "exact_match_rate_ci": list(wilson_interval(sum(s.tokens_equal for s in studies), n))}


# why bench parity's JSON has no label-F1-drop interval (as ``radtrt eval``'s ``ci_reason``)
NO_DROP_INTERVAL_REASON = (f"no interval from fewer than {MIN_INTERVAL_N} studies: every resample of one study is "
                           f"that study, so the interval would be the drop itself")


def label_f1_drop_interval(studies: Sequence[StudyParity]) -> dict[str, Any]:
    """``label_f1_drop_ci``, :func:`label_f1_drop_estimate`'s bounds: null, with ``label_f1_drop_ci_reason``, from
    one study, whose "0.000 to 0.000" claimed a certainty it cannot give (bench parity and the export's gate)."""
    drop = label_f1_drop_estimate(studies)
    if not drop.has_interval:
        return {"label_f1_drop_ci": None, "label_f1_drop_ci_reason": NO_DROP_INTERVAL_REASON}
    return {"label_f1_drop_ci": [drop.ci_low, drop.ci_high]}


def label_f1_drop_estimate(studies: Sequence[StudyParity]) -> Estimate:
    """95% interval of the reference's micro-F1 minus the backend's, both against the true labels, resampling
    studies with both sides together (the seeded bootstrap of ``radtrt.evaluation``). On a few studies one
    changed report moves micro-F1 by several hundredths; the interval says how far that can be trusted."""
    def counts(predicted: list[str], truth: list[str]) -> list[int]:
        p, t = set(predicted), set(truth)
        return [len(p & t), len(p - t), len(t - p)]

    per_study = np.array([counts(s.reference_labels, s.true_labels) + counts(s.labels, s.true_labels)  # type: ignore[arg-type]
                          for s in studies], dtype=np.float64)

    def micro_f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
        denominator = 2 * tp + fp + fn
        return np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 1.0)  # label_f1's empty case

    def statistic(idx: np.ndarray) -> np.ndarray:
        sums = resampled_sums(idx, per_study)
        return micro_f1(*sums[:, :3].T) - micro_f1(*sums[:, 3:].T)

    point = float(statistic(np.arange(len(studies))[None])[0])  # all studies once: label_f1's difference
    return bootstrap(point, len(studies), statistic, BootstrapConfig())


@dataclass
class ParityReport:
    command: str
    model: str
    backend: str
    reference: str
    precision: str
    max_new_tokens: int
    machine: MachineInfo
    studies: list[StudyParity]
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    prompts: str | None = None  # which indication prompted which studies, where a manifest gave some its own

    def summary(self) -> dict[str, Any]:
        s = totals(self.studies) | {
            "first_divergences": [s.first_divergence for s in self.studies],
            "rouge_l_min": min(s.rouge_l for s in self.studies),
            "vision_max_abs_diff": max(s.vision_max_abs_diff for s in self.studies)} | self.label_summary()
        return s | {"targets": precision_targets(self.precision, s)}

    def label_summary(self) -> dict[str, Any]:
        """Finding-label agreement (micro-F1 of the backend's labels against the reference's) and, where
        every study has true labels, each side's micro-F1 against them and the drop (``label_f1_drop``: the
        reference's minus the backend's, positive when the backend is worse) with its interval
        (:func:`label_f1_drop_interval`)."""
        from radtrt.data.labeler import label_f1

        got, ref = [s.labels for s in self.studies], [s.reference_labels for s in self.studies]
        out = {"label_f1_vs_reference": label_f1(got, ref).micro_f1}
        truth = [s.true_labels for s in self.studies]
        if all(t is not None for t in truth):
            f1, ref_f1 = label_f1(got, truth).micro_f1, label_f1(ref, truth).micro_f1  # type: ignore[arg-type]
            out |= {"label_f1_true": f1, "reference_label_f1_true": ref_f1, "label_f1_drop": ref_f1 - f1,
                    **label_f1_drop_interval(self.studies)}
        return out

    def to_json(self) -> dict[str, Any]:
        return {"kind": "parity", "command": self.command, "created": self.created, "model": self.model,
                "backend": self.backend, "reference": self.reference, "precision": self.precision,
                "max_new_tokens": self.max_new_tokens, "machine": self.machine.to_json(), "prompts": self.prompts,
                "summary": self.summary(), "studies": [asdict(s) for s in self.studies]}


def study_names(paths: list[Path]) -> list[str]:
    """Each study's name in reports and predictions: the fewest trailing parts of its path that tell it from the
    others (a PACS set's studies are all '.../frontal.dcm': named by their file alone they could not be told
    apart, and --predictions-out was refused). A study listed twice keeps one name."""
    from radtrt.benchmarks.sides import distinct_suffixes

    unique = list(dict.fromkeys(os.path.abspath(p) for p in paths))
    names = dict(zip(unique, distinct_suffixes([Path(u) for u in unique])))
    return [names[os.path.abspath(p)] for p in paths]


def study_indication(entry: Entry, indication: str | None) -> str | None:
    """A manifest row's own indication, else ``--indication``: the INT8 export's parity gate prompts each held-out
    study with its row's, and parity ignoring it measured other prompts (the gate's "100% identical" read 50% here,
    on the same bundle and studies)."""
    return entry.indication if entry.indication is not None else indication


def prompts_note(entries: list[Entry], indication: str | None) -> str | None:
    """Which indication prompted which studies, for the report (None where no manifest row has one of its own):
    with rows of their own, --indication prompts only the others, and a report naming it misled."""
    own = sum(e.indication is not None for e in entries)
    if not own:
        return None
    rest = len(entries) - own
    others = ("" if not rest else "; the others --indication" if indication is not None else "; the others none")
    unused = "; --indication prompted none of them" if indication is not None and not rest else ""
    studies = "study" if len(entries) == 1 else "studies"
    return f"{own} of {len(entries)} {studies} prompted with the indication of its manifest row{others}{unused}"


def measure_parity(backend: Pipeline, reference: Pipeline, studies: list[Entry], *, indication: str | None,
                   max_new_tokens: int, on_step: Callable[[str], None] | None = None) -> list[StudyParity]:
    from radtrt.imaging.study import load_study

    if not studies:
        fail("no studies to compare")
    cfg = reference.cfg
    results = []
    names = study_names([entry.study for entry in studies])
    for i, (entry, name) in enumerate(zip(studies, names), 1):
        study = entry.study
        if on_step:
            on_step(f"study {i}/{len(studies)}: {name}")
        image = load_study(study)
        pixels = cfg.preprocessing(image.pixels_u8)
        asked = study_indication(entry, indication)
        got = run_one(backend, pixels, indication=asked, max_new_tokens=max_new_tokens)
        ref = run_one(reference, pixels, indication=asked, max_new_tokens=max_new_tokens)
        truth = list(entry.labels) if entry.labels is not None else None
        results.append(compare(name, got, ref, truth, entry.findings))
    return results


PREDICTIONS_MARKER = "radtrt-bench-predictions.json"  # beside the two files: the folder is radtrt's to replace
PREDICTION_FILES = ("reference.jsonl", "candidate.jsonl")
_PREDICTIONS_WRITER = "radtrt bench parity --predictions-out"


def is_earlier_predictions(folder: Path) -> bool:
    """Whether ``folder`` holds only what an earlier ``--predictions-out`` wrote (its marker says so): the
    printed reproduce command names the same folder, and must run again; anything else there is the user's."""
    import json

    if not folder.is_dir():
        return False
    names = {p.name for p in folder.iterdir()}
    if PREDICTIONS_MARKER not in names or not names <= {PREDICTIONS_MARKER, *PREDICTION_FILES}:
        return False
    try:
        data = json.loads((folder / PREDICTIONS_MARKER).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and data.get("written_by") == _PREDICTIONS_WRITER


def check_predictions_dir(folder: Path) -> None:
    """Fail, before any work, unless ``folder`` is new, empty, or an earlier run's predictions (replaced)."""
    from radtrt.outputs import check_folder_target, check_new_dir

    if is_earlier_predictions(folder):
        check_folder_target(folder, "--predictions-out folder")
        return
    if folder.is_dir() and any(folder.iterdir()):
        fail(f"--predictions-out folder {folder} is not empty, and not an earlier run's predictions "
             f"({', '.join(PREDICTION_FILES)} and {PREDICTIONS_MARKER} only); choose a new folder")
    check_new_dir(folder, "--predictions-out folder")


def write_paired_predictions(report: ParityReport, folder: Path) -> tuple[Path, Path]:
    """Both sides' reports as ``radtrt eval`` prediction files (``study``, ``reference`` = the ground-truth
    findings, ``prediction``), so ``radtrt eval --paired REF CAND --metrics chexprompt`` can judge the
    backend's factuality against the reference's. Needs studies whose manifest has findings."""
    import json

    if any(s.true_findings is None for s in report.studies):
        fail("--predictions-out needs ground-truth findings: pass --studies with a manifest that has them "
             "(a phantom set from 'radtrt data phantoms', or your own JSONL manifest with 'findings')")
    names = [s.study for s in report.studies]
    if len(set(names)) != len(names):
        fail("--predictions-out needs distinct study file names")
    make_dir(folder, "--predictions-out folder")
    marker = folder / PREDICTIONS_MARKER
    paths = [folder / name for name in PREDICTION_FILES]
    # the set or none of it: written one by one, an interrupt or a full disk between them left this run's reference
    # arm beside an earlier run's candidate arm, a pair 'radtrt eval --paired' accepts (same studies and ground
    # truth). The marker is renamed first, so a folder cut short even then is one the next run may replace.
    marker_text = json.dumps({"written_by": _PREDICTIONS_WRITER, "command": report.command,
                              "files": list(PREDICTION_FILES)}) + "\n"

    def arm(field_name: str) -> Callable[[Path], int]:
        return lambda tmp: tmp.write_text("".join(
            json.dumps({"study": s.study, "reference": s.true_findings, "prediction": getattr(s, field_name)}) + "\n"
            for s in report.studies), encoding="utf-8")

    write_set([(marker, lambda tmp: tmp.write_text(marker_text, encoding="utf-8")),
               *zip(paths, (arm("reference_report"), arm("report")))], "predictions file")
    return paths[0], paths[1]
