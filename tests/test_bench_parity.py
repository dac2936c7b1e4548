"""Parity bench metrics on hand-made outcomes: divergence, cosine, ROUGE-L, logits, reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from radtrt.benchmarks.machine import MachineInfo
from radtrt.benchmarks.markdown import parity_markdown
from radtrt.benchmarks.parity import Outcome, ParityReport, StudyParity, compare, cosine, first_divergence, rouge_l
from radtrt.errors import RadtrtError

MACHINE = MachineInfo(cpu="Test CPU", logical_cores=2, usable_cores=2, platform="Linux-test", python="3.11",
                      load_average=None, torch_threads=2)


@pytest.mark.parametrize("a,b,expected", [([1, 2, 3], [1, 2, 3], None), ([1, 2, 3], [1, 5, 3], 1),
                                           ([7], [8], 0), ([1, 2], [1, 2, 3], 2), ([1, 2, 3], [1], 1),
                                           ([], [], None), ([], [4], 0)])
def test_first_divergence(a: list[int], b: list[int], expected: int | None) -> None:
    assert first_divergence(a, b) == expected


def test_cosine() -> None:
    x = torch.randn(4, 8)
    assert cosine(x, x) == pytest.approx(1.0)
    assert cosine(x, -x) == pytest.approx(-1.0)
    assert cosine(x, 3 * x) == pytest.approx(1.0)
    assert cosine(torch.zeros(3), torch.zeros(3)) == 1.0 and cosine(torch.zeros(3), torch.ones(3)) == 0.0
    # never past +-1 by rounding: identical tensors read 1.0000000000000004
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))  # unclamped: 1.0000000000000007
    assert cosine(w, w) == 1.0 and cosine(w, -w) == -1.0
    with pytest.raises(RadtrtError):
        cosine(torch.ones(3), torch.ones(4))


def test_rouge_l_uses_the_released_scorer_and_identical_texts_score_one() -> None:
    assert rouge_l("", "") == 1.0
    assert rouge_l("The lungs are clear.", "The lungs are clear.") == 1.0
    assert rouge_l("no effusion", "the heart is enlarged") == 0.0
    # LCS "the lungs are clear" = 4 tokens; P = 4/5, R = 4/4 -> F1 = 8/9
    assert rouge_l("the lungs are very clear", "the lungs are clear") == pytest.approx(8 / 9)


def _outcome(ids: list[int], logits: list, embeds: torch.Tensor, report: str) -> Outcome:
    """``logits``: one step's vector (the first), or a list of steps."""
    t = torch.tensor(logits)
    return Outcome(embeds, ids, t if t.dim() == 2 else t[None], report)


def test_decode_logits_are_compared_only_where_both_sides_had_the_same_tokens() -> None:
    e = torch.zeros(2, 2)
    steps = [[0.0, 1.0], [1.0, 0.0], [2.0, 0.0], [3.0, 0.0]]  # prompt step, then one per token; EOS at step 3
    ref = _outcome([1, 0, 0], steps, e, "x")
    same = compare("a", _outcome([1, 0, 0], [[0.0, 1.0], [1.5, 0.0], [2.0, 0.25], [3.0, 0.0]], e, "x"), ref)
    assert same.decode_steps_compared == 3 and same.decode_logits_max_abs_diff == pytest.approx(0.5)
    assert same.decode_logits_mean_max_abs_diff == pytest.approx((0.5 + 0.25 + 0.0) / 3)
    # diverging at token 1: step 1 (same inputs, different choice) is compared; step 2 fed different tokens
    diverged = compare("b", _outcome([1, 1], [[0.0, 1.0], [0.0, 1.25], [9.0, 9.0]], e, "y"), ref)
    assert diverged.first_divergence == 1 and diverged.decode_steps_compared == 1
    assert diverged.decode_logits_max_abs_diff == pytest.approx(1.25)
    first_only = compare("c", _outcome([1, 0, 0], [0.0, 1.0], e, "x"), ref)  # only the prompt step kept
    assert first_only.decode_steps_compared == 0 and first_only.decode_logits_max_abs_diff is None
    report = ParityReport(command="c", model="m", backend="onnxruntime", reference="torch", precision="int8 vs fp32",
                          max_new_tokens=3, machine=MACHINE, studies=[same, diverged, first_only])
    s = report.summary()
    assert s["decode_steps_compared"] == 4 and s["decode_logits_max_abs_diff"] == pytest.approx(1.25)
    assert s["decode_logits_mean_max_abs_diff"] == pytest.approx((0.75 + 1.25) / 4)
    assert "| 1.25 / 0.5 (4) |" in parity_markdown(report)


def test_compare_identical_and_divergent() -> None:
    e = torch.randn(5, 4)
    ref = _outcome([5, 6, 7], [0.1, 3.0, -2.0], e, "the lungs are clear")
    same = compare("s1", _outcome([5, 6, 7], [0.1, 3.0, -2.0], e.clone(), "the lungs are clear"), ref)
    assert same.tokens_equal and same.first_divergence is None and same.rouge_l == 1.0
    assert same.first_logits_max_abs_diff == 0.0 and same.first_argmax_equal and same.vision_cosine == pytest.approx(1)
    other = compare("s2", _outcome([5, 9], [0.1, 2.5, 2.9], e + 0.01, "the lungs are very clear"), ref)
    assert not other.tokens_equal and other.first_divergence == 1
    assert other.new_tokens == 2 and other.reference_new_tokens == 3
    # the ids the divergence was read from are kept (the JSON had none: the report could not be checked)
    assert (other.token_ids, other.reference_token_ids) == ([5, 9], [5, 6, 7])
    assert other.first_logits_max_abs_diff == pytest.approx(4.9) and not other.first_argmax_equal
    assert other.reference_first_logits_max_abs == pytest.approx(3.0)
    assert other.vision_max_abs_diff == pytest.approx(0.01, abs=1e-6) and other.vision_cosine < 1.0


def _report() -> ParityReport:
    e = torch.ones(3, 2)
    ref = _outcome([1, 2, 3], [0.0, 1.0], e, "a b c")
    studies = [compare("s1.dcm", _outcome([1, 2, 3], [0.0, 1.0 + 2**-10], e, "a b c"), ref),
               compare("s2.dcm", _outcome([1, 2, 4], [0.0, 1.0], e, "a b d"), ref)]
    return ParityReport(command="radtrt bench parity --random-model tiny", model="tiny", backend="onnxruntime",
                        reference="torch", precision="fp32 vs fp32", max_new_tokens=8, machine=MACHINE,
                        studies=studies)


def test_summary_and_json() -> None:
    report = _report()
    s = report.summary()
    assert s["exact_match_rate"] == 0.5 and s["first_divergences"] == [None, 2]
    assert s["rouge_l_min"] == pytest.approx(2 / 3) and s["rouge_l_mean"] == pytest.approx(5 / 6)
    assert s["first_logits_max_abs_diff"] == 2**-10
    data = json.loads(json.dumps(report.to_json()))
    assert data["kind"] == "parity" and len(data["studies"]) == 2 and data["studies"][1]["first_divergence"] == 2


def test_markdown() -> None:
    md = parity_markdown(_report())
    assert "```\nradtrt bench parity --random-model tiny\n```" in md
    assert "| exact-match rate of generated tokens (95% interval) | 1/2 (50%; 9% to 91%) |" in md
    assert "| first divergence position per study | none, 2 |" in md
    assert "| s2.dcm | NO | 2 | 3 / 3 |" in md


def test_label_agreement_and_true_label_f1() -> None:
    e = torch.ones(3, 2)
    ref = _outcome([1], [0.0, 1.0], e, "Moderate cardiomegaly. Small right pleural effusion.")
    studies = [compare("a", _outcome([2], [0.0, 1.0], e, "Moderate cardiomegaly. No pleural effusion."), ref,
                       ["cardiomegaly", "pleural_effusion_right"]),
               compare("b", _outcome([1], [0.0, 1.0], e, ref.report), ref, ["cardiomegaly", "pleural_effusion_right"])]
    assert studies[0].labels == ["cardiomegaly"] and studies[0].reference_labels == ["cardiomegaly", "pleural_effusion_right"]
    report = ParityReport(command="c", model="m", backend="onnxruntime", reference="torch", precision="int8 vs fp32",
                          max_new_tokens=8, machine=MACHINE, studies=studies)
    s = report.summary()
    assert s["label_f1_vs_reference"] == pytest.approx(2 * 3 / (2 * 3 + 1))  # tp 3, fn 1
    assert s["reference_label_f1_true"] == 1.0 and s["label_f1_drop"] == pytest.approx(1 - 6 / 7)
    md = parity_markdown(report)
    assert s["label_f1_drop_ci"] == pytest.approx([0.0, 1 - 2 / 3])  # resamples of {a, b}: 0, 1 - 6/7 or 1 - 2/3
    # named for its sign: reference - backend, a drop ("difference" after "backend / reference" read the other way)
    assert "| finding-label micro-F1 against the manifest's true labels: backend / reference / drop, reference - " \
           "backend (95% interval) | 0.857 / 1.000 / 0.143 (0.000 to 0.333) |" in md
    too_few = " (its 95% interval reaches the target: too few studies to tell)"
    assert ("INT8 targets: image-embedding cosine >= 0.99: met; identical reports >= 80%: NOT MET" + too_few
            + "; label micro-F1 within 0.02 of the reference: NOT MET" + too_few) in md
    without_truth = ParityReport(command="c", model="m", backend="onnxruntime", reference="torch",
                                 precision="fp32 vs fp32", max_new_tokens=8, machine=MACHINE, studies=[
                                     compare("c", _outcome([1], [0.0], e, "x"), _outcome([1], [0.0], e, "x"))])
    assert "label_f1_true" not in without_truth.summary()
    assert "INT8 targets" not in parity_markdown(without_truth)


def test_one_study_gives_no_label_f1_drop_interval() -> None:
    """One study printed a label-F1-drop interval "0.000 to 0.000": every resample of it is that study, a certainty
    it cannot give; eval shows n/a there, and so does bench parity now (JSON null with the reason)."""
    e = torch.ones(3, 2)
    ref = _outcome([1], [0.0, 1.0], e, "Moderate cardiomegaly.")
    one = ParityReport(command="c", model="m", backend="onnxruntime", reference="torch", precision="int8 vs fp32",
                       max_new_tokens=8, machine=MACHINE,
                       studies=[compare("a", _outcome([2], [0.0, 1.0], e, "No acute findings."), ref, ["cardiomegaly"])])
    s = one.summary()
    assert s["label_f1_drop"] == 1.0 and s["label_f1_drop_ci"] is None and "fewer than 2 studies" in \
        s["label_f1_drop_ci_reason"]
    assert json.loads(json.dumps(one.to_json()))["summary"]["label_f1_drop_ci"] is None
    md = parity_markdown(one)
    assert "| 0.000 / 1.000 / 1.000 (n/a: one study gives no interval) |" in md and "to 1.000)" not in md
    assert "label micro-F1 within 0.02 of the reference: NOT MET (one study: too few to tell)" in md
    # a pass on one study is no surer: "met" with no interval, and identical reports "met" at 21% to 100%
    same = ParityReport(command="c", model="m", backend="onnxruntime", reference="torch", precision="int8 vs fp32",
                        max_new_tokens=8, machine=MACHINE, studies=[compare("a", ref, ref, ["cardiomegaly"])])
    assert ("identical reports >= 80%: met (its 95% interval reaches past the target: too few studies to confirm); "
            "label micro-F1 within 0.02 of the reference: met (one study: too few to confirm)") in parity_markdown(same)


def test_many_studies_list_only_the_divergences() -> None:
    from radtrt.benchmarks.markdown import _divergences

    assert _divergences([None, 3]) == "none, 3"
    assert _divergences([None] * 10) == "none of 10 studies diverge"
    assert _divergences([None] * 8 + [5, 0]) == "2 of 10 studies diverge, at 5, 0"


def _study(i: int, labels: list[str], reference: list[str], truth: list[str], equal: bool) -> StudyParity:
    return StudyParity(study=f"s{i}", tokens_equal=equal, first_divergence=None if equal else 3, new_tokens=9,
                       reference_new_tokens=9, rouge_l=1.0 if equal else 0.8, first_logits_max_abs_diff=0.01,
                       reference_first_logits_max_abs=5.0, reference_first_logits_range=10.0, first_argmax_equal=True,
                       decode_steps_compared=8, decode_logits_max_abs_diff=0.02, decode_logits_mean_max_abs_diff=0.01,
                       vision_cosine=0.9999, vision_max_abs_diff=0.001, report="", reference_report="",
                       labels=labels, reference_labels=reference, true_labels=truth)


def test_int8_gate_warnings_say_whether_more_studies_are_needed() -> None:
    """One changed report of 8 moves micro-F1 by ~0.1: the warning must say its interval still reaches the
    target. The same loss in every one of 100 studies is a regression, and is said without that hint."""
    from radtrt.calibration.parity import summarize

    truth = ["cardiomegaly", "pleural_effusion_left"]
    few = [_study(0, ["cardiomegaly"], truth, truth, False)] + [_study(i, truth, truth, truth, True) for i in range(1, 8)]
    s = summarize(few)
    assert s["label_f1_drop"] == pytest.approx(1 - 30 / 31) and s["exact_match_rate"] == 7 / 8
    low, high = s["label_f1_drop_ci"]
    assert low <= 0.0 < s["label_f1_drop"] <= high and 0.95 < s["exact_match_rate_ci"][1] < 1.0  # Wilson, 7 of 8
    assert not any("identical reports" in w for w in s["warnings"])  # 7/8 >= 80%
    many = [_study(i, ["cardiomegaly"], truth, truth, i % 2 == 0) for i in range(100)]
    s = summarize(many)
    assert s["label_f1_drop"] == pytest.approx(1 - 2 / 3) and s["label_f1_drop_ci"][0] > 0.3
    f1_warning, exact_warning = (next(w for w in s["warnings"] if key in w) for key in ("micro-F1", "identical"))
    assert "more studies are needed" not in f1_warning and "more studies are needed" not in exact_warning
    assert "over 100 studies" in f1_warning
    few[1] = _study(1, ["cardiomegaly"], truth, truth, False)
    s = summarize(few)
    assert s["exact_match_rate"] == 0.75 and s["label_f1_drop"] > 0.02
    assert all("more studies are needed" in w for w in s["warnings"] if "micro-F1" in w or "identical" in w)
    assert len([w for w in s["warnings"] if "micro-F1" in w or "identical" in w]) == 2
    from radtrt.calibration.parity import summary_lines

    # a passing gate on 8 studies (the default) used to read as confident as one on 100
    assert "only 8 held-out studies: a pass says little" in "\n".join(summary_lines(s))
    assert "a pass says little" not in "\n".join(summary_lines(summarize(many)))


def test_gate_printout_names_the_f1_drop_by_its_sign() -> None:
    """INT8 better than fp32 printed "int8 0.833, fp32 0.800 (difference -0.033, ...)": a negative
    "difference" read as INT8 - fp32, the opposite sign. The value is fp32 - int8, and is called so."""
    from radtrt.calibration.parity import summarize, summary_lines

    truth = ["cardiomegaly", "pleural_effusion_left"]
    # INT8 finds both labels in every study, fp32 misses one in the first: INT8 is the better one here
    studies = [_study(0, truth, ["cardiomegaly"], truth, False)] + [_study(i, truth, truth, truth, True)
                                                                     for i in range(1, 8)]
    s = summarize(studies)
    assert s["label_f1_int8"] == 1.0 and s["label_f1_drop"] == pytest.approx(30 / 31 - 1)  # the JSON key keeps its name
    line = next(x for x in summary_lines(s) if "vs true labels" in x)
    assert f"int8 1.000, fp32 {30 / 31:.3f} (drop, fp32 - int8: {30 / 31 - 1:.3f}; 95% interval" in line
    assert "difference" not in line


def test_int8_gate_on_one_study_gives_no_drop_interval() -> None:
    """'radtrt export --parity-samples 1' printed "95% interval 0.000 to 0.000" for the label-F1 drop and called a
    drop of 1.0 settled: one study gives no interval (bench parity says n/a), so the gate says it cannot tell."""
    import json

    from radtrt.calibration.parity import summarize, summary_lines, undecided

    truth = ["cardiomegaly", "pleural_effusion_left"]
    s = summarize([_study(0, ["cardiomegaly"], truth, truth, False)])
    assert s["label_f1_drop_ci"] is None and "fewer than 2 studies" in s["label_f1_drop_ci_reason"]
    assert json.loads(json.dumps(s))["label_f1_drop_ci"] is None  # the bundle's manifest keeps it
    assert undecided(s, "label_f1_drop")
    f1_warning = next(w for w in s["warnings"] if "micro-F1" in w)
    assert "no 95% interval from one study, so more studies are needed to tell" in f1_warning
    text = "\n".join(summary_lines(s))
    assert "n/a: one study gives no interval" in text and "0.000 to 0.000" not in text
    assert "only 1 held-out study: a pass says little; --parity-samples" in text  # not "the interval is zero-width"


def test_identical_report_rate_interval_is_wilsons() -> None:
    """A bootstrap over 2 of 2 identical reports said '100% to 100%': two studies proved nothing of the sort."""
    from radtrt.evaluation.bootstrap import wilson_interval

    assert wilson_interval(2, 2) == (pytest.approx(0.3424, abs=1e-4), 1.0)
    assert wilson_interval(50, 100) == (pytest.approx(0.4038, abs=1e-4), pytest.approx(0.5962, abs=1e-4))
    low, high = wilson_interval(0, 5)
    assert low == pytest.approx(0.0, abs=1e-12) and high == pytest.approx(0.4345, abs=1e-4)


def test_predictions_out_is_replaced_as_a_set(tmp_path: Path) -> None:
    """The marker, reference.jsonl and candidate.jsonl were written one by one: an interrupt between them left this
    run's reference arm beside the last run's candidate arm, which 'eval --paired' accepted as one run's pair."""
    import dataclasses

    from radtrt.benchmarks.parity import write_paired_predictions

    earlier = _report()
    earlier.studies = [dataclasses.replace(s, true_findings="Clear lungs.") for s in earlier.studies]
    folder = tmp_path / "preds"
    write_paired_predictions(earlier, folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert set(before) == {"radtrt-bench-predictions.json", "reference.jsonl", "candidate.jsonl"}

    class CutShort:  # a study whose candidate report is reached only after the reference arm is written
        study, true_findings, reference_report = "s1.dcm", "Clear lungs.", "another run's report"

        @property
        def report(self) -> str:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_paired_predictions(dataclasses.replace(earlier, command="radtrt bench parity --synthetic 1",
                                                     studies=[CutShort()]), folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # the earlier set, whole; no temporaries


def test_each_manifest_row_is_prompted_with_its_own_indication(monkeypatch: pytest.MonkeyPatch,
                                                              tmp_path: Path) -> None:
    """bench parity prompted every study with --indication alone (none by default), while the INT8 export's gate
    prompts each held-out row with its own: one bundle read 100% identical at export and 50% in bench parity."""
    from types import SimpleNamespace

    import radtrt.benchmarks.parity as module
    import radtrt.imaging.study as study_module
    from radtrt.calibration.samples import Entry

    asked: list[tuple[str, str | None]] = []
    monkeypatch.setattr(study_module, "load_study", lambda path: SimpleNamespace(pixels_u8=path.name))
    monkeypatch.setattr(module, "run_one", lambda pipeline, pixels, *, indication, max_new_tokens:
                        asked.append((pixels, indication)))
    monkeypatch.setattr(module, "compare", lambda name, got, ref, truth, findings: name)
    side = SimpleNamespace(cfg=SimpleNamespace(preprocessing=lambda pixels: pixels))
    entries = [Entry(tmp_path / "a.png", indication="Cough."), Entry(tmp_path / "b.png")]
    module.measure_parity(side, side, entries, indication="Fever.", max_new_tokens=4)  # type: ignore[arg-type]
    assert asked == [("a.png", "Cough."), ("a.png", "Cough."), ("b.png", "Fever."), ("b.png", "Fever.")]


def test_fp32_and_fp16_sides_have_their_requirements_marked() -> None:
    """Only INT8 had targets: an fp32 side that changed a token, or an fp16 one 3% of the logit range off, was a
    plain measurement with exit 0 and no 'NOT MET' in the report or the JSON."""
    import dataclasses

    truth = ["cardiomegaly"]

    def report(precision: str, studies: list[StudyParity]) -> ParityReport:
        return ParityReport(command="c", model="m", backend="onnxruntime", reference="torch", precision=precision,
                            max_new_tokens=8, machine=MACHINE, studies=studies)

    same, changed = _study(0, truth, truth, truth, True), _study(1, truth, truth, truth, False)
    fp32 = report("fp32 vs fp32", [same, changed])
    assert fp32.summary()["targets"] == {"identical tokens in every study (fp32)": False}
    assert "Targets: identical tokens in every study (fp32): NOT MET" in parity_markdown(fp32)
    assert report("fp32 vs fp32", [same]).summary()["targets"] == {"identical tokens in every study (fp32)": True}
    near, far = (dataclasses.replace(same, first_logits_max_abs_diff=d) for d in (0.1, 0.3))  # range 10: 1%, 3%
    within = "first-step logits within 2% of the reference's range (fp16)"
    assert report("fp16 vs fp32", [near]).summary()["targets"][within] is True
    md = parity_markdown(report("fp16 vs fp32", [near, far]))
    assert f"{within}: NOT MET" in md and "image-embedding cosine >= 0.999 (fp16): met" in md and "(3.00%)" in md
    assert report("bf16 vs fp32", [near]).summary()["targets"] == {}  # none stated: none claimed


def test_a_non_finite_difference_is_valid_json_and_fails_its_target(tmp_path: Path) -> None:
    """An fp16 overflow made the first-step difference inf: the JSON said Infinity, which no JSON reader accepts."""
    import dataclasses

    from radtrt.benchmarks.report_files import without_non_finite

    truth = ["cardiomegaly"]
    overflow = dataclasses.replace(_study(0, truth, truth, truth, True), first_logits_max_abs_diff=float("inf"))
    rep = ParityReport(command="c", model="m", backend="onnxruntime", reference="torch", precision="fp16 vs fp32",
                       max_new_tokens=8, machine=MACHINE, studies=[overflow])
    data = without_non_finite(rep.to_json())
    text = json.dumps(data, allow_nan=False)  # raised ValueError had anything non-finite been left
    back = json.loads(text)
    assert back["summary"]["first_logits_max_abs_diff"] is None
    assert "summary.first_logits_max_abs_diff: inf" in back["non_finite"]
    assert "studies[0].first_logits_max_abs_diff: inf" in back["non_finite"]
    assert back["summary"]["targets"]["image-embedding cosine >= 0.999 (fp16)"] is True  # measured finite: met
    assert back["summary"]["targets"]["first-step logits within 2% of the reference's range (fp16)"] is False
    assert without_non_finite({"a": [1.0, {"b": 2}]}) == {"a": [1.0, {"b": 2}]}  # nothing added when all is finite
