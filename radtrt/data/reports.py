"""Findings text from structured findings: varied natural language, deterministic for a seed.

This is the offline "template mode" of report synthesis (the paper used GPT-4 to write reports
from labels; ``synthesize`` can call such a model). Each finding has several phrasings, negatives
are stated the way radiologists state them ("No pleural effusion or pneumothorax."), and the
order follows the usual reading order (devices, lungs, pleura, heart, bones) with some shuffling,
so a model cannot learn one fixed sentence per label. ``labeler`` must read every phrasing back:
``tests/test_data_reports.py`` checks that round trip over many seeds.
"""

from __future__ import annotations

import random

from radtrt.data.vocabulary import CVC, ETT, SIDES, Findings

_CARDIOMEGALY = ["The heart is enlarged.", "Moderate cardiomegaly.", "The cardiac silhouette is enlarged.",
                 "There is cardiomegaly.", "Mild cardiomegaly is present.", "Heart size is enlarged."]
_HEART_NORMAL = ["Heart size is normal.", "The cardiomediastinal silhouette is within normal limits.",
                 "The cardiac and mediastinal contours are normal.", "The heart is normal in size.",
                 "Normal cardiomediastinal silhouette."]
_EFFUSION_ONE = ["There is a {size} {side} pleural effusion.", "{Size} {side} pleural effusion.",
                 "{Side}-sided pleural effusion with blunting of the costophrenic angle.",
                 "Blunting of the {side} costophrenic angle consistent with a {size} pleural effusion.",
                 "A {size} {side} pleural effusion is present."]
_EFFUSION_BOTH = ["{Size} bilateral pleural effusions.", "There are {size} bilateral pleural effusions.",
                  "Bilateral pleural effusions, {side} greater than {other}."]
_PNEUMOTHORAX = ["There is a small {side} apical pneumothorax.", "{Side}-sided pneumothorax is present.",
                 "A {side} pneumothorax is seen.", "{Side} apical pneumothorax."]
_CONSOLIDATION = ["Focal consolidation in the {region} lobe.", "There is a {region} lobe opacity concerning for pneumonia.",
                  "{Region} lobe airspace consolidation.", "Patchy consolidation is seen in the {region} lung.",
                  "There is consolidation in the {region} lobe."]
_NODULE = ["A {mm} mm nodule is seen in the {where} lung.", "There is a well-circumscribed nodule in the {where} lung.",
           "{Where} lung nodule measuring {mm} mm.", "A rounded {mm} mm nodule projects over the {where} lung."]
_ETT = ["An endotracheal tube terminates {cm} cm above the carina.", "Endotracheal tube in standard position.",
        "The endotracheal tube tip is {cm} cm above the carina."]
_CVC = ["Right internal jugular central venous catheter tip in the mid SVC.",
        "A right-sided central venous catheter terminates at the cavoatrial junction.",
        "Central venous catheter with tip in the superior vena cava."]
_LUNGS_CLEAR = ["The lungs are clear.", "Lungs are clear without focal consolidation.", "The lungs are clear bilaterally."]
_NO_CONSOLIDATION = ["No focal consolidation.", "There is no focal consolidation."]
_NO_PLEURAL = ["No pleural effusion or pneumothorax.", "There is no pleural effusion or pneumothorax.",
               "No pleural effusion or pneumothorax is seen."]
_NO_EFFUSION = ["No pleural effusion.", "There is no pleural effusion."]
_NO_PNEUMOTHORAX = ["No pneumothorax.", "There is no pneumothorax."]
_BONES = ["No acute osseous abnormality.", "The visualized osseous structures are unremarkable.",
          "No acute osseous abnormalities."]


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _fill(rng: random.Random, templates: list[str], **values: str) -> str:
    """A random template with ``{x}`` and capitalised ``{X}`` placeholders filled."""
    values.update({_cap(k): _cap(v) for k, v in values.items()})
    return rng.choice(templates).format(**values)


def _devices(rng: random.Random, f: Findings) -> list[str]:
    out = []
    if ETT in f.devices:
        out.append(_fill(rng, _ETT, cm=str(rng.randint(3, 6))))
    if CVC in f.devices:
        out.append(rng.choice(_CVC))
    return out


def _lungs(rng: random.Random, f: Findings) -> list[str]:
    out = []
    if f.consolidation:
        out.append(_fill(rng, _CONSOLIDATION, region=f.consolidation))
    if f.nodule:
        out.append(_fill(rng, _NODULE, where=f.nodule, mm=str(rng.randint(8, 20))))
    if not f.consolidation:
        out.append(rng.choice(_NO_CONSOLIDATION if f.nodule else _LUNGS_CLEAR + _NO_CONSOLIDATION))
    return out


def _pleura(rng: random.Random, f: Findings) -> list[str]:
    out = []
    size = rng.choice(["small", "moderate"])
    if len(f.effusion) == 2:
        side = rng.choice(SIDES)
        out.append(_fill(rng, _EFFUSION_BOTH, size=size, side=side, other=SIDES[1 - SIDES.index(side)]))
    elif f.effusion:
        out.append(_fill(rng, _EFFUSION_ONE, size=size, side=f.effusion[0]))
    if f.pneumothorax:
        out.append(_fill(rng, _PNEUMOTHORAX, side=f.pneumothorax))
    if not f.effusion and not f.pneumothorax:
        out.append(rng.choice(_NO_PLEURAL))
    elif not f.effusion:
        out.append(rng.choice(_NO_EFFUSION))
    elif not f.pneumothorax:
        out.append(rng.choice(_NO_PNEUMOTHORAX))
    return out


def findings_text(findings: Findings, rng: random.Random) -> str:
    """One findings paragraph stating every positive finding and the relevant negatives."""
    lungs, pleura = _lungs(rng, findings), _pleura(rng, findings)
    middle = lungs + pleura if rng.random() < 0.7 else pleura + lungs
    heart = [rng.choice(_CARDIOMEGALY if findings.cardiomegaly else _HEART_NORMAL)]
    body = heart + middle if rng.random() < 0.3 else middle + heart
    sentences = _devices(rng, findings) + body
    if rng.random() < 0.5:
        sentences.append(rng.choice(_BONES))
    return " ".join(sentences)
