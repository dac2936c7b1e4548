"""The answer format of CheXprompt and a strict reader for it.

A judge answer must contain exactly these two lines (an optional ``Errors:`` may precede the first)::

    Number of clinically significant errors by type: [(A, n), (B, n), (C, n), (D, n), (E, n), (F, n)]
    Number of clinically insignificant errors by type: [(A, n), (B, n), (C, n), (D, n), (E, n), (F, n)]

Anything else about them (a type missing, out of order or repeated, a count that is not a whole number, a
line missing or given twice) makes the answer unreadable. An unreadable answer is recorded as a failure
and left out of the means; reading it as "no errors" would flatter the model being judged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

# The six CheXprompt error types, in the order the answer lists them.
ERROR_TYPES: dict[str, str] = {
    "A": "false prediction of a finding",
    "B": "omission of a finding",
    "C": "incorrect location or position of a finding",
    "D": "incorrect severity of a finding",
    "E": "mention of a comparison not in the reference",
    "F": "omission of a comparison describing a change",
}
LETTERS = tuple(ERROR_TYPES)

SIGNIFICANT_HEADER = "Number of clinically significant errors by type:"
INSIGNIFICANT_HEADER = "Number of clinically insignificant errors by type:"

_LINE = re.compile(r"^\s*(?:Errors:\s*)?Number of clinically (significant|insignificant) errors by type:(.*)$",
                   re.IGNORECASE | re.MULTILINE)
_LIST = re.compile(r"^\s*[\[(]\s*((?:\(\s*[A-Za-z]\s*,\s*[^()]*?\s*\)\s*,?\s*)+)[\])]\s*$")
_PAIR = re.compile(r"\(\s*([A-Za-z])\s*,\s*([^()]*?)\s*\)")
MAX_COUNT = 999
_COUNT = re.compile(r"[0-9]{1,3}")


class AnswerFormatError(ValueError):
    """A judge answer that does not follow the CheXprompt format (recorded per report, never raised to users)."""


@dataclass(frozen=True)
class ErrorCounts:
    """Error counts of one candidate report, per type A-F."""

    significant: tuple[int, ...]
    insignificant: tuple[int, ...]

    def __post_init__(self) -> None:
        for counts in (self.significant, self.insignificant):
            if len(counts) != len(LETTERS) or any(not isinstance(c, int) or not 0 <= c <= MAX_COUNT for c in counts):
                raise AnswerFormatError(f"error counts must be six whole numbers from 0 to {MAX_COUNT}")

    @property
    def total_significant(self) -> int:
        return sum(self.significant)

    @property
    def total_insignificant(self) -> int:
        return sum(self.insignificant)

    def to_json(self) -> dict[str, Any]:
        return {"significant": dict(zip(LETTERS, self.significant)),
                "insignificant": dict(zip(LETTERS, self.insignificant))}


def format_counts(counts: tuple[int, ...]) -> str:
    """``[(A, 0), (B, 1), ...]``: the list part of an answer line."""
    return "[" + ", ".join(f"({letter}, {n})" for letter, n in zip(LETTERS, counts)) + "]"


def format_answer(counts: ErrorCounts) -> str:
    """The two answer lines for ``counts`` (used for radtrt's worked examples and by tests)."""
    return (f"{SIGNIFICANT_HEADER} {format_counts(counts.significant)}\n"
            f"{INSIGNIFICANT_HEADER} {format_counts(counts.insignificant)}")


def _parse_list(body: str, which: str) -> tuple[int, ...]:
    match = _LIST.match(body)
    if match is None:
        raise AnswerFormatError(f"the {which} line does not hold a list of (type, count) pairs")
    pairs = _PAIR.findall(match.group(1))
    letters = tuple(letter.upper() for letter, _ in pairs)
    if letters != LETTERS:
        raise AnswerFormatError(f"the {which} line must list types A-F once each, in order")
    values = []
    for _, raw in pairs:
        # ASCII digits only (str.isdigit also takes "²", which int() refuses) and a bounded count: a
        # findings section has a few sentences, and a runaway number would dominate every mean
        if _COUNT.fullmatch(raw) is None:
            raise AnswerFormatError(f"the {which} line has a count that is not a whole number up to {MAX_COUNT}")
        values.append(int(raw))
    return tuple(values)


def parse_answer(text: str | None) -> ErrorCounts:
    """Read the two count lines of a judge answer; raise ``AnswerFormatError`` when they are not exact."""
    if not text or not text.strip():
        raise AnswerFormatError("the answer is empty")
    found: dict[str, list[str]] = {"significant": [], "insignificant": []}
    for match in _LINE.finditer(text):
        found[match.group(1).lower()].append(match.group(2))
    for which, bodies in found.items():
        if not bodies:
            raise AnswerFormatError(f"the {which}-errors line is missing")
        if len(bodies) > 1:
            raise AnswerFormatError(f"the {which}-errors line appears more than once")
    if text.lower().find(SIGNIFICANT_HEADER.lower()) > text.lower().find(INSIGNIFICANT_HEADER.lower()):
        raise AnswerFormatError("the insignificant-errors line comes before the significant one")
    return ErrorCounts(significant=_parse_list(found["significant"][0], "significant"),
                       insignificant=_parse_list(found["insignificant"][0], "insignificant"))
