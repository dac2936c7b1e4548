"""Judge prompts: radtrt's own CheXprompt-format prompt, or the published one when it is installed.

radtrt's prompt is written for this project; it asks for the same six error types, split the same way,
in the same two-line answer, with the same layout as the published metric (system instructions, an
instruction block with the types and output format, worked examples, then ``Reference Findings``,
``Candidate Findings`` and ``Errors:``). Its worked examples are invented reports, not MIMIC text. Scores
from it are labelled "radtrt CheXprompt-format judge" so nobody mistakes them for the published metric.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from radtrt.errors import fail
from radtrt.evaluation.chexprompt.parser import ErrorCounts, format_answer, parse_answer

Messages = list[dict[str, str]]

RADTRT_JUDGE_LABEL = "radtrt CheXprompt-format judge (radtrt's own prompt, not the published CheXprompt prompt)"

SYSTEM_PROMPT = (
    "You are an experienced chest radiologist auditing findings sections written by an automated report "
    "generator. Compare each candidate findings section with the reference findings section that a "
    "radiologist wrote for the same study. Count the candidate's errors of six types, once for clinically "
    "significant errors and once for clinically insignificant ones, and answer only with the two count "
    "lines in the exact format you are given."
)

_TYPE_LINES = "\n".join(f"{letter}) {text[0].upper()}{text[1:]}." for letter, text in {
    "A": "the candidate reports a finding that the reference findings do not contain",
    "B": "the candidate leaves out a finding that the reference findings contain",
    "C": "the candidate gives a wrong location or position for a finding in the reference findings",
    "D": "the candidate gives a wrong severity for a finding in the reference findings",
    "E": "the candidate mentions a comparison with a prior study that the reference findings do not make",
    "F": "the candidate leaves out a comparison in the reference findings that describes a change since a "
         "prior study",
}.items())

_FORMAT = format_answer(ErrorCounts((0,) * 6, (0,) * 6)).replace("0)", "n)")

# Invented findings sections (not patient data) showing each error type at least once.
_EXAMPLES: tuple[tuple[str, str, ErrorCounts], ...] = (
    ("Moderate right pleural effusion, larger than on the prior radiograph. No pneumothorax. Heart size is "
     "normal.",
     "Small left pleural effusion. No pneumothorax. Heart size is normal.",
     ErrorCounts((0, 0, 1, 0, 0, 1), (0, 0, 0, 1, 0, 0))),
    ("The lungs are clear. No pleural effusion or pneumothorax. The cardiomediastinal silhouette is within "
     "normal limits.",
     "Right lower lobe consolidation concerning for pneumonia. No pleural effusion. The cardiomediastinal "
     "silhouette is within normal limits. Mild degenerative changes of the thoracic spine, unchanged from the "
     "prior study.",
     ErrorCounts((1, 0, 0, 0, 0, 0), (1, 0, 0, 0, 1, 0))),
    ("Endotracheal tube terminates 4 cm above the carina. Nasogastric tube courses below the diaphragm. Mild "
     "pulmonary edema. Small bilateral pleural effusions.",
     "Endotracheal tube terminates 4 cm above the carina. Mild pulmonary edema.",
     ErrorCounts((0, 1, 0, 0, 0, 0), (0, 1, 0, 0, 0, 0))),
    ("Heart size is mildly enlarged. Lungs are clear. No acute osseous abnormality.",
     "Mild cardiomegaly. The lungs are clear without focal consolidation. No acute osseous abnormality.",
     ErrorCounts((0, 0, 0, 0, 0, 0), (0, 0, 0, 0, 0, 0))),
    ("Severe pulmonary edema, worse than on the prior study. Large left pleural effusion.",
     "Mild pulmonary edema. Large left pleural effusion.",
     ErrorCounts((0, 0, 0, 1, 0, 1), (0, 0, 0, 0, 0, 0))),
)


def _block(reference: str, candidate: str) -> str:
    return f'Reference Findings: """{reference}"""\n\nCandidate Findings: """{candidate}"""\n\nErrors:'


_INSTRUCTIONS = (
    "An error is clinically significant when it would plausibly change treatment, management or outcome; "
    "every other error is clinically insignificant. Count each error once, under the type that fits it best. "
    "The six error types are:\n"
    f"{_TYPE_LINES}\n\n"
    "Answer with exactly these two lines, each n replaced by a whole number:\n"
    f"{_FORMAT}\n"
    "###\n"
    + "\n###\n".join(f"{_block(ref, cand)} {format_answer(counts)}" for ref, cand, counts in _EXAMPLES)
    + "\n###\n"
)


def radtrt_messages(reference: str, candidate: str) -> Messages:
    """radtrt's CheXprompt-format chat messages for one (reference, candidate) pair."""
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": _INSTRUCTIONS + _block(reference, candidate)}]


@dataclass(frozen=True)
class JudgePrompt:
    """How one judge asks and reads: the messages for a pair, the answer reader, and an honest label."""

    name: str  # "published" or "radtrt"
    label: str
    build: Callable[[str, str], Messages]
    parse: Callable[[str | None], ErrorCounts]


def radtrt_prompt() -> JudgePrompt:
    return JudgePrompt(name="radtrt", label=RADTRT_JUDGE_LABEL, build=radtrt_messages, parse=parse_answer)


def select_prompt(choice: str = "auto") -> JudgePrompt:
    """``auto``: the published prompt when the chexprompt package is installed, else radtrt's own."""
    from radtrt.evaluation.chexprompt import published

    if choice not in ("auto", "published", "radtrt"):
        fail(f"unknown judge prompt '{choice}' (auto | published | radtrt)")
    if choice == "radtrt":
        return radtrt_prompt()
    if published.is_installed():
        return published.load()
    if choice == "published":
        # --no-deps: the package pins openai==0.28, which would replace the openai>=1 client radtrt's judge calls
        fail("the published CheXprompt prompt needs the chexprompt package (GitHub microsoft/chexprompt): install "
             "it from a checkout with 'pip install --no-deps -e CHECKOUT' (its openai==0.28 pin would break radtrt's "
             "judge client), or use --judge-prompt radtrt")
    return radtrt_prompt()


