"""The phantom vocabulary, the report generator and the phrase labeler agree; F1 is computed right."""

from __future__ import annotations

import random

import pytest

from radtrt.data.labeler import extract_labels, label_f1
from radtrt.data.reports import findings_text
from radtrt.data.vocabulary import CVC, ETT, LABELS, Findings, sample_findings
from radtrt.errors import RadtrtError


@pytest.mark.parametrize("text, expected", [
    ("The lungs are clear. No pleural effusion or pneumothorax. Heart size is normal.", ["no_finding"]),
    ("The heart is enlarged without pleural effusion.", ["cardiomegaly"]),
    ("The heart is not enlarged.", ["no_finding"]),
    ("Bilateral pleural effusions, left greater than right.", ["pleural_effusion_right", "pleural_effusion_left"]),
    ("Blunting of the left costophrenic angle consistent with a small pleural effusion.", ["pleural_effusion_left"]),
    ("Left pleural effusion and right pneumothorax.", ["pleural_effusion_left", "pneumothorax_right"]),
    ("A pneumothorax is seen on the left.", ["pneumothorax_left"]),
    ("Lungs are clear without focal consolidation. A 12 mm nodule is seen in the right upper lung.",
     ["nodule_right"]),
    ("There is a left lower lobe opacity concerning for pneumonia.", ["consolidation_left_lower"]),
    ("Patchy consolidation is seen in the right upper lung; no effusion.", ["consolidation_right_upper"]),
    ("Endotracheal tube in standard position. The lungs are clear.", ["no_finding", "endotracheal_tube"]),
    ("A right-sided central venous catheter terminates at the cavoatrial junction. Moderate cardiomegaly.",
     ["cardiomegaly", "central_line"]),
    # the vocabulary is sided: no side, no label; but a pathology all the same, not a normal study ("no_finding")
    ("Small pleural effusion.", []),
    ("There is a pneumothorax. Endotracheal tube in place.", ["endotracheal_tube"]),
    ("Consolidation in the lung base.", []),
    # negation after the finding; a negation's reach ends at "but" / "and there is"; "cannot exclude" and "no change
    # in" state a finding (each gave the opposite label)
    ("The right pleural effusion has resolved.", ["no_finding"]),
    ("Left pneumothorax is absent.", ["no_finding"]),
    ("No pneumothorax, but there is a small left pleural effusion.", ["pleural_effusion_left"]),
    ("The heart is not enlarged and there is a left pleural effusion.", ["pleural_effusion_left"]),
    ("Can not exclude a small left pneumothorax.", ["pneumothorax_left"]),
    ("No change in the right pleural effusion.", ["pleural_effusion_right"]),
    ("No pleural effusion, pneumothorax, or consolidation.", ["no_finding"]),  # commas keep the negation
    # sides: those named for this finding, not the nearest one of another's (each gave a right effusion)
    ("Right upper lobe consolidation with a pleural effusion on the left.",
     ["pleural_effusion_left", "consolidation_right_upper"]),
    ("Pneumothorax on the right and effusion on the left.", ["pleural_effusion_left", "pneumothorax_right"]),
    ("Small left and moderate right pleural effusions.", ["pleural_effusion_right", "pleural_effusion_left"]),
    ("Right upper lobe nodule and consolidation in the left lower lobe.", ["consolidation_left_lower", "nodule_right"]),
    ("", ["no_finding"]),
])
def test_extract_labels(text: str, expected: list[str]) -> None:
    assert extract_labels(text) == expected


def test_every_generated_phrasing_reads_back() -> None:
    rng = random.Random(0)
    seen: set[str] = set()
    for i in range(1500):
        findings = sample_findings(rng)
        text = findings_text(findings, random.Random(i))
        assert extract_labels(text) == findings.labels(), text
        seen.update(findings.labels())
    assert seen == set(LABELS)  # the sampler reaches every label


def test_reports_vary_and_are_deterministic() -> None:
    f = Findings(cardiomegaly=True, effusion=("left",), devices=(ETT, CVC))
    texts = {findings_text(f, random.Random(seed)) for seed in range(30)}
    assert len(texts) > 10
    assert findings_text(f, random.Random(3)) == findings_text(f, random.Random(3))


def test_findings_labels_roundtrip_and_validation() -> None:
    f = Findings(effusion=("right", "left"), pneumothorax=None, consolidation="left upper", nodule="right lower")
    assert f.labels() == ["pleural_effusion_right", "pleural_effusion_left", "consolidation_left_upper", "nodule_right"]
    assert Findings.from_labels(f.labels()).labels() == f.labels()
    assert Findings().labels() == ["no_finding"]
    assert Findings(devices=(ETT,)).labels() == ["no_finding", "endotracheal_tube"]
    with pytest.raises(RadtrtError, match="invalid phantom findings"):
        Findings(consolidation="right middle")
    with pytest.raises(RadtrtError, match="unknown phantom label"):
        Findings.from_labels(["edema"])
    with pytest.raises(RadtrtError, match="both"):
        Findings.from_labels(["no_finding", "cardiomegaly"])


def test_sampled_findings_are_compatible() -> None:
    rng = random.Random(1)
    for _ in range(2000):
        f = sample_findings(rng)
        assert f.pneumothorax not in f.effusion
        assert f.nodule != f.consolidation or f.nodule is None
        for region in (f.consolidation, f.nodule):
            if region and region.endswith("lower"):
                assert region.split()[0] not in f.effusion


def test_label_f1() -> None:
    pred = [["cardiomegaly", "nodule_left"], ["no_finding"], ["pleural_effusion_left"]]
    ref = [["cardiomegaly"], ["no_finding"], ["pleural_effusion_right"]]
    report = label_f1(pred, ref)
    # tp: cardiomegaly, no_finding = 2; fp: nodule_left, effusion_left = 2; fn: effusion_right = 1
    assert report.micro_f1 == pytest.approx(2 * 2 / (2 * 2 + 2 + 1))
    assert report.per_label["cardiomegaly"] == 1.0 and report.per_label["pleural_effusion_right"] == 0.0
    assert report.support == {"no_finding": 1, "cardiomegaly": 1, "pleural_effusion_right": 1}
    assert report.per_label["nodule_left"] == 0.0 and len(report.per_label) == 5
    assert report.macro_f1 == pytest.approx(2 / 5)
    assert label_f1(ref, ref).micro_f1 == 1.0
    with pytest.raises(ValueError):
        label_f1(pred, ref[:2])
