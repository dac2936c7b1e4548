"""The offline CheXpert-style labeler on hand-written findings sentences."""

from __future__ import annotations

import pytest

from radtrt.evaluation.labels import CONDITIONS, Label, label_report, label_reports

P, N, U, B = Label.POSITIVE, Label.NEGATIVE, Label.UNCERTAIN, Label.BLANK

CASES = [
    # negation
    ("No effusion.", {"Pleural Effusion": N, "No Finding": P}),
    ("No pleural effusion or pneumothorax.", {"Pleural Effusion": N, "Pneumothorax": N, "No Finding": P}),
    ("There is no focal consolidation, pleural effusion, or pneumothorax.",
     {"Consolidation": N, "Pleural Effusion": N, "Pneumothorax": N, "No Finding": P}),
    ("Lungs are clear without consolidation.", {"Consolidation": N, "No Finding": P}),
    ("No evidence of pneumonia.", {"Pneumonia": N, "No Finding": P}),
    ("The previously seen pneumothorax has resolved.", {"Pneumothorax": N, "No Finding": P}),
    ("The cardiac silhouette is not enlarged.", {"Cardiomegaly": N, "No Finding": P}),
    # uncertainty
    ("Left basilar opacity may represent atelectasis.", {"Lung Opacity": P, "Atelectasis": U}),
    ("Bibasilar opacities, likely atelectasis.", {"Lung Opacity": P, "Atelectasis": U}),
    ("Pneumonia cannot be excluded.", {"Pneumonia": U}),
    ("Cannot exclude a small pneumothorax.", {"Pneumothorax": U}),
    ("Findings are concerning for pneumonia.", {"Pneumonia": U}),
    ("Atelectasis versus pneumonia in the right lower lobe.", {"Atelectasis": U, "Pneumonia": U}),
    ("Possible small right pleural effusion.", {"Pleural Effusion": U}),
    # laterality and severity do not hide a finding
    ("Small left pleural effusion.", {"Pleural Effusion": P}),
    ("Moderate bilateral pleural effusions, right greater than left.", {"Pleural Effusion": P}),
    ("Tiny right apical pneumothorax.", {"Pneumothorax": P}),
    ("Severe pulmonary edema.", {"Edema": P}),
    ("Mild cardiomegaly.", {"Cardiomegaly": P}),
    ("The heart is mildly enlarged.", {"Cardiomegaly": P}),
    ("Right lower lobe consolidation.", {"Consolidation": P}),
    ("Subsegmental atelectasis at the left lung base.", {"Atelectasis": P}),
    # normal statements, clause breaks and "no change"
    ("Heart size is normal.", {"Cardiomegaly": N, "No Finding": P}),
    ("Heart size and mediastinal contours are normal.",
     {"Cardiomegaly": N, "Enlarged Cardiomediastinum": N, "No Finding": P}),
    ("Mild pulmonary edema, but no effusion.", {"Edema": P, "Pleural Effusion": N}),
    ("No pneumothorax, small left effusion.", {"Pneumothorax": N, "Pleural Effusion": P}),
    ("No change in the moderate right pleural effusion.", {"Pleural Effusion": P}),
    ("Pericardial effusion.", {"No Finding": P}),
    # devices
    ("Endotracheal tube terminates 4 cm above the carina.", {"Support Devices": P, "No Finding": P}),
    ("The nasogastric tube has been removed.", {"Support Devices": N, "No Finding": P}),
    ("Healing fracture of the left sixth rib.", {"Fracture": P}),
]


@pytest.mark.parametrize("text,expected", CASES, ids=[c[0][:40] for c in CASES])
def test_labels(text: str, expected: dict[str, Label]) -> None:
    got = label_report(text)
    want = {c: expected.get(c, B) for c in CONDITIONS}
    assert {c: got[c].name for c in CONDITIONS if got[c] != want[c]} == {}, f"wanted {want}"


def test_positive_mention_wins_over_negative_across_sentences() -> None:
    got = label_report("No right pleural effusion. Small left pleural effusion.")
    assert got["Pleural Effusion"] == P and got["No Finding"] == B


def test_uncertain_finding_clears_no_finding_but_devices_do_not() -> None:
    assert label_report("Possible pneumonia.")["No Finding"] == B
    assert label_report("Right PICC line terminates in the SVC.")["No Finding"] == P


def test_label_reports_matrix_is_in_chexbert_order() -> None:
    codes = label_reports(["Mild cardiomegaly.", "No effusion."])
    assert codes.shape == (2, 14)
    assert codes[0, CONDITIONS.index("Cardiomegaly")] == P
    assert codes[1, CONDITIONS.index("Pleural Effusion")] == N
    assert CONDITIONS[0] == "Enlarged Cardiomediastinum" and CONDITIONS[-1] == "No Finding"
