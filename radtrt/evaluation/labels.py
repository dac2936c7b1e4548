"""An offline, rule-based CheXpert-style labeler: the 14 findings as positive, negative, uncertain or blank.

This is a PROXY for F1-CheXbert, not CheXbert: CheXbert is a BERT model whose weights are not shipped
with radtrt, so the offline F1 uses sentence rules in the spirit of the CheXpert labeler (mention phrases,
then pre-negation uncertainty, negation and uncertainty cues inside the mention's clause). It agrees
with CheXbert on plainly phrased findings sections; it is not calibrated against it, so compare its
numbers only with other runs of this labeler (e.g. an exported engine against the PyTorch reference).

Label codes match the released evaluator's (``BLANK 0, POSITIVE 1, NEGATIVE 2, UNCERTAIN 3``) and the
column order is CheXbert's, so the same F1 code scores both labelers.
"""

from __future__ import annotations

import re
from enum import IntEnum
from typing import Iterable, Sequence

import numpy as np


class Label(IntEnum):
    BLANK = 0
    POSITIVE = 1
    NEGATIVE = 2
    UNCERTAIN = 3


# CheXbert's output order (the released evaluator's CheXbert_CONDITIONS).
CONDITIONS: tuple[str, ...] = (
    "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation",
    "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
    "Support Devices", "No Finding",
)
CONDITIONS_5: tuple[str, ...] = ("Cardiomegaly", "Edema", "Consolidation", "Atelectasis", "Pleural Effusion")

_LINK = r"(?:is|are|appears?|remains?|seems?|looks?)"
_MOD = r"(?:[a-z-]+ )?"  # one optional modifier: "mildly", "slightly", "not"

# Phrases that mention a finding (its presence, absence or possibility is decided by the cues).
_MENTIONS: dict[str, tuple[str, ...]] = {
    "Enlarged Cardiomediastinum": (
        r"(?:widen\w*|enlarge\w*) (?:of )?(?:the )?(?:cardio)?mediastin\w*",
        r"mediastinal widening", rf"mediastinum {_LINK} {_MOD}(?:widened|enlarged|prominent)",
        r"(?:prominent|widened|enlarged) (?:cardio)?mediastinal (?:silhouette|contours?)",
        rf"(?:cardio)?mediastinal (?:silhouette|contours?) {_LINK} {_MOD}(?:enlarged|widened|prominent)",
        r"enlarged cardiomediastinum",
    ),
    "Cardiomegaly": (
        r"cardiomegaly",
        rf"(?:heart|heart size|cardiac size|cardiac silhouette|cardiac shadow) {_LINK} (?:[a-z-]+ ){{0,3}}?enlarged",
        rf"(?:heart|heart size|cardiac silhouette) {_LINK} (?:[a-z]+ )?large",
        r"enlarged (?:heart|cardiac silhouette)",
        r"(?:enlargement of the (?:heart|cardiac silhouette)|cardiac enlargement)",
    ),
    "Lung Opacity": (
        r"opacit(?:y|ies)", r"opacification", r"opacified", r"infiltrat\w*", r"(?<!bone )densit(?:y|ies)",
        r"haziness", r"air[- ]?space (?:disease|process)",
        r"(?:increased|prominent|prominence of|coarse\w*|accentuated) (?:the )?interstitial markings?",
        r"peribronchial (?:thickening|cuffing)", r"ground[- ]glass",
        r"(?<!pleural )(?<!pleural-parenchymal )(?<!pleural parenchymal )scarring",  # CheXpert: pleural scar aside
    ),
    "Lung Lesion": (
        r"nodules?", r"nodular", r"mass(?:es)?", r"(?:lung|pulmonary|cavitary|spiculated) lesions?", r"tumou?rs?",
        r"neoplasms?", r"carcinoma", r"(?<!osseous )(?<!bone )(?<!skeletal )metasta\w+", r"granulomas?",
    ),
    "Edema": (
        r"edema", r"(?:vascular|pulmonary) congestion", r"congestive heart failure", r"chf",
        r"fluid overload",
    ),
    "Consolidation": (r"consolidat\w*",),
    "Pneumonia": (r"pneumonias?", r"bronchopneumonia", r"infections?", r"infectious (?:process|etiology)"),
    "Atelectasis": (r"atelecta\w*", r"collapsed?"),
    "Pneumothorax": (r"pneumothora(?:x|ces)", r"hydropneumothorax", r"ptx"),
    "Pleural Effusion": (
        r"(?<!pericardial )effusions?", r"pleural fluid", r"hydropneumothorax",
        r"blunting of the (?:\w+ )?costophrenic angles?", r"costophrenic (?:angle )?blunting",
        rf"costophrenic angles? {_LINK} {_MOD}blunted",
    ),
    "Pleural Other": (
        r"pleural(?:[- ]parenchymal)? (?:thickening|plaques?|scarring|calcifications?)", r"fibrothorax",
    ),
    "Fracture": (r"fractur\w*", r"fx"),
    "Support Devices": (
        r"tubes?", r"ett", r"catheters?", r"picc",
        r"(?:central|venous|arterial|midline|swan[- ]ganz|subclavian|ij|internal jugular) lines?", r"mediport",
        r"cannula", r"coils?", r"(?:pacing|pacer) wires",
        r"pacemakers?", r"pacer", r"defibrillators?", r"a?icd", r"(?:pacer|pacemaker|pacing|icd) leads?",
        r"stents?", r"port(?:-a-cath)?", r"(?:sternal|sternotomy) wires", r"(?:surgical )?clips?", r"drains?",
        r"(?:prosthetic (?:[a-z]+ )?valve|valve (?:replacement|prosthesis))", r"hardware", r"(?:support )?devices?",
        r"monitoring devices?", r"balloon pump", r"lvad", r"plates?(?!-like| like| atelectasis)", r"screws",
    ),
}

# Statements that a finding is normal, which the CheXpert labeler reads as a negative mention.
_NORMAL = r"(?:normal|within normal limits|unremarkable)"
_NORMAL_STATEMENTS: dict[str, tuple[str, ...]] = {
    "Cardiomegaly": (
        rf"(?:heart|cardiac)(?: size| silhouette)?(?: and [a-z ,]+?)? {_LINK} {_MOD}{_NORMAL}",
        r"normal (?:heart|cardiac) (?:size|silhouette)",
    ),
    "Enlarged Cardiomediastinum": (
        rf"(?:cardio)?mediastinal(?: and hilar)? (?:silhouette|contours?)(?: and [a-z ,]+?)? {_LINK} {_MOD}{_NORMAL}",
        r"normal (?:cardio)?mediastinal (?:silhouette|contours?)",
        rf"heart and mediastinum {_LINK} {_MOD}{_NORMAL}",
    ),
}


# What CheXpert's "No Finding" also excludes though no class names it (its no_finding mention list, abridged).
_OTHER_FINDINGS = (
    r"emphysema", r"elevat\w*", r"eventration", r"scoliosis", r"kyphosis", r"degenera\w*", r"calcifi\w*",
    r"hyperinfla\w*", r"hyperexpan\w*", r"hernias?", r"copd", r"osteopenia", r"granulomas?", r"metasta\w+",
    r"pneumomediastinum", r"pneumoperitoneum", r"volume loss", r"deformity", r"bullae?", r"hematoma",
)


def _compile(patterns: Iterable[str]) -> re.Pattern[str]:
    return re.compile(r"\b(?:" + "|".join(patterns) + r")\b")


_MENTION_RE = {cond: _compile(p) for cond, p in _MENTIONS.items()}
_NORMAL_RE = {cond: _compile(p) for cond, p in _NORMAL_STATEMENTS.items()}
_OTHER_RE = _compile(_OTHER_FINDINGS)

# "cannot exclude X", "X is not excluded": negation words that express uncertainty (checked first).
_NEG_UNCERTAIN = re.compile(
    r"\b(?:(?:cannot|can ?not|can't|could not|not)\s+(?:be\s+)?(?:entirely\s+|completely\s+|definitely\s+)?"
    r"|(?:difficult|hard)\s+to\s+)(?:exclude|excluded|rule out|ruled out)\b")
_PRE_NEGATION = re.compile(
    r"\b(?:no|not|neither|without|negative for|free of|clear of|absence of|resolution of|clearing of|removal of|"
    r"nor|no longer|"  # "resolved X", not "has resolved, X" or "partially resolved X"
    r"(?<!has )(?<!have )(?<!been )(?<!partially )(?<!nearly )(?<!largely )(?<!mostly )resolved)\b")
_POST_NEGATION = re.compile(
    r"^[^,]*?(?<!which was )(?<!which were )(?<!that was )"  # "X, which was not present before", is present
    r"\b(?:(?:not|no longer)\b[a-z ]*?\b(?:seen|identified|present|visualized|visible|appreciated|"
    r"demonstrated|evident|noted|detected)(?!\s+(?:on|in)\s+(?:the\s+)?(?:prior|previous)|\s+previously|\s+before)"
    r"|(?<!partially )(?<!nearly )(?<!largely )(?<!mostly )(?<!almost )(?:resolved|removed|cleared)|absent)\b")
_PRE_UNCERTAINTY = re.compile(
    r"\b(?:may|might|could|possibl[ey]|probabl[ey]|likely|suspect\w*|suspicious for|concerning for|"
    r"worrisome for|questionab\w*|question of|equivocal|suggest\w*|versus|vs|differential|consider\w*|"
    r"borderline|indeterminate|rule out|r/o|presum\w*|favou?r\w*|and/or|or(?= (?:[a-z-]+ )?$))\b")
_POST_UNCERTAINTY = re.compile(
    r"^\s*(?:versus|vs|or|and/or)\b|^[^,]*?\b(?:(?:is|are) (?:also )?"
    r"(?:(?:possible|likely|probable)(?=\s*(?:$|present|[,.;]))"  # "opacity is likely atelectasis": the opacity is not
    r"|suspected|questioned|questionable|a consideration|considered)|may be present|could be present)\b")
# A comma or "and the" starting a new statement ends the reach of a preceding "no" or "may" (not inside an
# "X, Y, or Z" list: see _LISTED_AFTER and _LISTED_BEFORE).
_SCOPE_BREAK = re.compile(
    r"\band (?=(?:the|a|an)\b)|,\s*(?:and\s+)?(?:there|with|left|right|bilateral|small|mild|moderate|large|severe|"
    r"trace|tiny|minimal|new|persistent|stable|unchanged|increas\w*|decreas\w*|improv\w*|worsen\w*|the|a|an)\b")
_CLAUSE_BREAK = re.compile(r"\b(?:but|however|although|though|whereas|except|otherwise|while)\b|;|"
                           r"\band\b(?= there\b)|\bwith\b(?= (?:persistent|residual|new|unchanged|stable)\b)")
# After a mention and its verb, "and" starts another statement: "the line ends in the SVC and the tube was removed".
_AND = re.compile(r"\band\b")
_VERB = re.compile(r"\b(?:is|are|was|were|has|have|remains?|persists?|terminates?|ends?|projects?|seen|noted)\b")
_POST_NEG_UNCERTAIN = re.compile(r"^[^,]*?\b(?:is|are|be)\s+(?:not(?: entirely| completely| definitely)?\s+"
                                 r"(?:excluded|ruled out)|(?:difficult|hard)\s+to\s+(?:exclude|rule out))")
_HEDGED_MENTION = re.compile(r"\b(?:borderline|possibly|questionably|probably)\b")  # "borderline enlarged"
_NEGATED_MENTION = re.compile(r"\b(?:not|no)\b")
_LISTED_AFTER = re.compile(r"^\s*,?\s*(?:or|nor)\b")
_LISTED_BEFORE = re.compile(r",\s*(?:or|nor)\s+[a-z -]*$")
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+|\n+")
# "No change in the effusion" reports an unchanged effusion, not an absent one.
_NO_CHANGE = re.compile(r"\b(?:no|without)\s+(?:significant\s+|interval\s+|substantial\s+|appreciable\s+)*"
                        r"changes?\b(?:\s+(?:in|of))?")


def _in_scope(pre: str, cue: re.Pattern[str], listed: bool = False) -> bool:
    """Whether a cue occurs in ``pre`` (clause text before a mention) with no statement break after it
    (a break does not count inside an "X, Y, or Z" list)."""
    matches = list(cue.finditer(pre))
    return bool(matches) and (listed or _SCOPE_BREAK.search(pre, matches[-1].end()) is None)


def _classify(clause: str, start: int, end: int, question: bool) -> Label:
    pre, inside, post = clause[:start], clause[start:end], clause[end:]
    for conj in _AND.finditer(post):
        if _VERB.search(inside + post[:conj.start()]):
            post = post[:conj.start()]
            break
    if _in_scope(pre, _NEG_UNCERTAIN) or _NEG_UNCERTAIN.match(post.lstrip()) or _POST_NEG_UNCERTAIN.match(post):
        return Label.UNCERTAIN
    listed = bool(_LISTED_AFTER.match(post) or _LISTED_BEFORE.search(pre))
    if _in_scope(pre, _PRE_NEGATION, listed) or _NEGATED_MENTION.search(inside) or _POST_NEGATION.match(post):
        return Label.NEGATIVE
    if _in_scope(pre, _PRE_UNCERTAINTY) or _HEDGED_MENTION.search(inside) or _POST_UNCERTAINTY.match(post) or \
            question:
        return Label.UNCERTAIN
    return Label.POSITIVE


def _clauses(text: str) -> Iterable[tuple[str, bool]]:
    """Lower-cased clauses, each with whether its sentence is a question."""
    text = _NO_CHANGE.sub("unchanged", text.lower())
    for sentence in _SENTENCE_BREAK.split(text):
        sentence = sentence.strip()
        if not sentence:
            continue
        question = sentence.endswith("?")
        for clause in _CLAUSE_BREAK.split(sentence):
            if clause.strip():
                yield clause, question


def _merge(current: Label, new: Label) -> Label:
    """CheXpert's aggregation over mentions: positive over uncertain over negative over blank."""
    rank = {Label.BLANK: 0, Label.NEGATIVE: 1, Label.UNCERTAIN: 2, Label.POSITIVE: 3}
    return new if rank[new] > rank[current] else current


def label_report(text: str) -> dict[str, Label]:
    """The 14 CheXpert labels of one findings section."""
    labels = {cond: Label.BLANK for cond in CONDITIONS}
    other = False
    for clause, question in _clauses(text):
        for cond, pattern in _NORMAL_RE.items():
            if pattern.search(clause):
                labels[cond] = _merge(labels[cond], Label.NEGATIVE)
        for cond, pattern in _MENTION_RE.items():
            for match in pattern.finditer(clause):
                label = _classify(clause, match.start(), match.end(), question)
                if cond == "Pleural Effusion" and "blunt" in match.group() and label == Label.POSITIVE:
                    label = Label.UNCERTAIN  # CheXpert: blunting of the costophrenic angle is an uncertain effusion
                labels[cond] = _merge(labels[cond], label)
        for match in _OTHER_RE.finditer(clause):
            if _classify(clause, match.start(), match.end(), question) in (Label.POSITIVE, Label.UNCERTAIN):
                other = True
    # As in CheXpert: "No Finding" when no pathology (anything but support devices) is positive or uncertain.
    pathologies = [c for c in CONDITIONS if c not in ("Support Devices", "No Finding")]
    if not other and all(labels[c] not in (Label.POSITIVE, Label.UNCERTAIN) for c in pathologies):
        labels["No Finding"] = Label.POSITIVE
    return labels


def label_reports(texts: Sequence[str]) -> np.ndarray:
    """Label codes (n_reports, 14) in CheXbert's column order."""
    out = np.zeros((len(texts), len(CONDITIONS)), dtype=np.int8)
    for i, text in enumerate(texts):
        labels = label_report(text)
        out[i] = [labels[c] for c in CONDITIONS]
    return out
