"""A small phrase labeler for the phantom vocabulary, and micro/macro F1 between label sets.

It reads a findings paragraph the way CheXpert-style rule labelers do: sentences, finding
mentions by pattern, negation when a cue ("no", "without", "not", ...) occurs earlier in the same
clause than the end of the mention ("but", "however", "with" end its reach; "cannot exclude" and "no
change in" are no negations) or a phrase such as "has resolved" follows it, the sides named between
the previous mention and this one (else the first after it), and the region named likewise. It only
knows the phantom vocabulary (``vocabulary.LABELS``), which is what the default model's held-out
check needs: labels of generated vs. true reports.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from radtrt.data.vocabulary import LABELS, NO_FINDING, DEVICE_LABELS

_SENTENCE = re.compile(r"(?<=[.;!?])\s+|\n+")
_NEGATION = re.compile(r"\b(no|not|without|negative for|free of|absent|resolved)\b")
_SIDE = re.compile(r"\b(right|left|bilateral)\b")
_REGION = re.compile(r"\b(right|left)\s+(upper|lower)\b")
_PATTERNS: dict[str, re.Pattern[str]] = {
    "cardiomegaly": re.compile(r"cardiomegaly|\b(heart|cardiac silhouette|heart size)\b[^.;]*?\benlarged\b|"
                               r"\benlarged (heart|cardiac silhouette)"),
    "pleural_effusion": re.compile(r"\beffusions?\b"),
    "pneumothorax": re.compile(r"\bpneumothora(x|ces)\b"),
    "consolidation": re.compile(r"\bconsolidation\b|\bairspace (opacity|disease)\b|\bopacity concerning for pneumonia\b|"
                                r"\blobe opacity\b"),
    "nodule": re.compile(r"\bnodul(e|es|ar)\b"),
    "endotracheal_tube": re.compile(r"\bendotracheal tube\b|\bett\b"),
    "central_line": re.compile(r"\bcentral (venous )?(catheter|line)\b|\bpicc\b"),
}
_SIDED = {"pleural_effusion", "pneumothorax", "nodule"}


@dataclass(frozen=True)
class Mention:
    finding: str
    start: int
    end: int


# Phrases that hold a negation word but state a finding (uncertain, or unchanged): blanked before negation is read,
# so "Can not exclude a left pneumothorax" reads as "Right effusion is not excluded" does
_PSEUDO_NEGATION = re.compile(r"\b(?:can ?not|not|cannot) (?:be )?(?:exclude[sd]?|rule[sd]? out)\b|"
                              r"\bnot (?:been )?(?:excluded|ruled out)\b|\bno (?:significant |interval )?change\b")
# Where a negation's reach ends: "No pneumothorax, but there is a left effusion" negated the effusion too
_SCOPE_END = re.compile(r"\b(?:but|however|although|though|whereas|while)\b|\band there (?:is|are)\b|\bwith\b")
# A negation stated after the finding, before the next one: "Right pleural effusion has resolved"
_POST_NEGATION = re.compile(r"^[^,]*?\b(?:(?:has|have) resolved|resolved|(?:is|are) (?:absent|no longer (?:seen|present)|"
                            r"not (?:seen|present|identified|visualized)))\b")
# A side named right after the previous finding belongs to it: "Pneumothorax on the right and effusion on the left"
_SIDE_OF_PREVIOUS = re.compile(r"^\W*(?:\w+\W+){0,2}?(?:on|in|at|of|over)\s+the\s+(right|left)\b|"
                               r"^\W*(?:in|over) the\s+(?:\w+\s+)?(right|left)\b")


def _own_region(sentence: str, mention: Mention, previous_end: int, next_start: int) -> re.Match[str] | None:
    """The region named for a mention: the last between the previous mention and its end ("left lower lobe
    opacity"), else the first after it before the next mention. The nearest anywhere gave "Right upper lobe nodule
    and consolidation in the left lower lobe" a right upper consolidation."""
    before = list(_REGION.finditer(sentence, previous_end, mention.end))
    return before[-1] if before else next(_REGION.finditer(sentence, mention.start, next_start), None)


def _sides(sentence: str, mention: Mention, previous_end: int, next_start: int) -> set[str]:
    """The sides named for a mention: every side word between the previous mention and this one (both of "small
    left and moderate right pleural effusions"), less one that belongs to the previous mention; else the first
    one after it, before the next mention. The nearest side word anywhere gave "Right upper lobe consolidation
    with a pleural effusion on the left" a right effusion."""
    before = list(_SIDE.finditer(sentence, previous_end, mention.start))
    if before and previous_end and _SIDE_OF_PREVIOUS.match(sentence[previous_end:mention.start]):
        before = [m for m in before if not _SIDE_OF_PREVIOUS.match(sentence[previous_end:m.end()])]
    words = before or list(_SIDE.finditer(sentence, mention.end, next_start))[:1]
    return {side for m in words for side in (("right", "left") if m.group(1) == "bilateral" else (m.group(1),))}


def _sentence_labels(sentence: str) -> tuple[set[str], bool]:
    """The sentence's labels, and whether it mentions a pathology at all (not negated; sided or not)."""
    out: set[str] = set()
    pathology = False
    mentions = sorted((Mention(finding, m.start(), m.end()) for finding, pattern in _PATTERNS.items()
                       for m in pattern.finditer(sentence)), key=lambda m: m.start)
    plain = _PSEUDO_NEGATION.sub(lambda m: "_" * len(m.group()), sentence)  # same offsets
    for k, mention in enumerate(mentions):
        previous_end = mentions[k - 1].end if k else 0
        next_start = mentions[k + 1].start if k + 1 < len(mentions) else len(sentence)
        scope = max((m.end() for m in _SCOPE_END.finditer(plain, 0, mention.start)), default=0)
        if _NEGATION.search(plain[scope:mention.end]) or _POST_NEGATION.match(sentence[mention.end:next_start]):
            continue
        pathology |= mention.finding not in DEVICE_LABELS
        if mention.finding in _SIDED:
            out.update(f"{mention.finding}_{side}" for side in _sides(sentence, mention, previous_end, next_start))
        elif mention.finding == "consolidation":
            region = _own_region(sentence, mention, previous_end, next_start)
            if region:
                out.add(f"consolidation_{region.group(1)}_{region.group(2)}")
        else:
            out.add(mention.finding)
    return out, pathology


def extract_labels(text: str) -> list[str]:
    """Phantom-vocabulary labels of a findings paragraph, in ``LABELS`` order.

    ``no_finding`` is set when no pathology is mentioned (devices do not count), as in CheXpert.
    A mention whose side or region is not stated yields no label: the vocabulary is sided. It is still a
    pathology (it gave "There is a pleural effusion." ``no_finding``, a normal study).
    """
    found: set[str] = set()
    pathology = False
    for sentence in _SENTENCE.split(text.lower()):
        labels, mentioned = _sentence_labels(sentence)
        found |= labels
        pathology |= mentioned
    if not pathology:
        found.add(NO_FINDING)
    return [label for label in LABELS if label in found]


@dataclass(frozen=True)
class F1Report:
    micro_f1: float
    macro_f1: float
    per_label: dict[str, float]
    support: dict[str, int]
    n: int

    def to_dict(self) -> dict[str, object]:
        return {"micro_f1": self.micro_f1, "macro_f1": self.macro_f1, "per_label": self.per_label,
                "support": self.support, "n": self.n}


def _f1(tp: int, fp: int, fn: int) -> float:
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0


def label_f1(predicted: Iterable[Iterable[str]], reference: Iterable[Iterable[str]]) -> F1Report:
    """Micro F1 (pooled over labels and samples); macro F1 is the mean over labels in either side (as sklearn)."""
    counts = {label: [0, 0, 0] for label in LABELS}  # tp, fp, fn
    n = 0
    for pred, ref in zip(predicted, reference, strict=True):
        p, r = set(pred), set(ref)
        n += 1
        for label in p | r:
            c = counts.setdefault(label, [0, 0, 0])
            c[0 if label in p and label in r else 1 if label in p else 2] += 1
    tp, fp, fn = (sum(c[i] for c in counts.values()) for i in range(3))
    support = {label: c[0] + c[2] for label, c in counts.items()}
    per_label = {label: _f1(*c) for label, c in counts.items() if any(c)}
    macro = sum(per_label.values()) / len(per_label) if per_label else 1.0
    return F1Report(_f1(tp, fp, fn), macro, per_label, {k: v for k, v in support.items() if v}, n)
