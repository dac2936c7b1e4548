"""The CheXprompt answer parser, radtrt's own prompt, and use of an installed chexprompt package."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from radtrt.errors import RadtrtError
from radtrt.evaluation.chexprompt import published
from radtrt.evaluation.chexprompt.parser import AnswerFormatError, ErrorCounts, format_answer, parse_answer
from radtrt.evaluation.chexprompt.prompt import RADTRT_JUDGE_LABEL, radtrt_messages, select_prompt

GOOD = ("Number of clinically significant errors by type: [(A, 1), (B, 0), (C, 2), (D, 0), (E, 0), (F, 1)]\n"
        "Number of clinically insignificant errors by type: [(A, 0), (B, 3), (C, 0), (D, 0), (E, 1), (F, 0)]")


def test_parse_well_formed_answer() -> None:
    counts = parse_answer(GOOD)
    assert counts.significant == (1, 0, 2, 0, 0, 1)
    assert counts.insignificant == (0, 3, 0, 0, 1, 0)
    assert (counts.total_significant, counts.total_insignificant) == (4, 4)
    assert counts.to_json()["significant"]["C"] == 2


@pytest.mark.parametrize("variant", [
    "Errors: " + GOOD,
    GOOD.replace("[", "(").replace("]", ")"),  # the published examples' parenthesised lists
    GOOD.replace("\n", "\n\n") + "\n\nExplanation: the candidate misplaces the effusion.",
    GOOD.replace("(A, 1)", "( A ,1 )"),
])
def test_parse_tolerates_layout_only(variant: str) -> None:
    assert parse_answer(variant) == parse_answer(GOOD)


@pytest.mark.parametrize("bad,reason", [
    ("", "empty"),
    (None, "empty"),
    ("There are no errors.", "missing"),
    (GOOD.splitlines()[0], "insignificant-errors line is missing"),
    (GOOD.replace("(F, 1)", "(F, one)"), "whole number"),
    (GOOD.replace("(F, 1)", "(F, 1.5)"), "whole number"),
    (GOOD.replace("(F, 1)", "(F, -1)"), "whole number"),
    (GOOD.replace(", (F, 1)", ""), "A-F"),
    (GOOD.replace("(B, 0), (C, 2)", "(C, 2), (B, 0)"), "A-F"),
    (GOOD.replace("(F, 1)", "(G, 1)"), "A-F"),
    (GOOD + "\n" + GOOD.splitlines()[0], "more than once"),
    ("\n".join(reversed(GOOD.splitlines())), "before"),
    (GOOD.replace("[(A, 1)", "(A, 1)").replace("(F, 1)]", "(F, 1)"), "list"),
])
def test_parse_refuses_malformed_answers(bad: str, reason: str) -> None:
    with pytest.raises(AnswerFormatError, match=reason):
        parse_answer(bad)


def test_radtrt_prompt_layout_and_examples_follow_the_format() -> None:
    messages = radtrt_messages("REFERENCE TEXT", "CANDIDATE TEXT")
    assert [m["role"] for m in messages] == ["system", "user"]
    user = messages[1]["content"]
    assert user.endswith('Reference Findings: """REFERENCE TEXT"""\n\n'
                         'Candidate Findings: """CANDIDATE TEXT"""\n\nErrors:')
    assert "Number of clinically significant errors by type: [(A, n), (B, n), (C, n), (D, n), (E, n), (F, n)]" in user
    for letter in "ABCDEF":
        assert f"\n{letter}) " in user
    # Every worked example's answer is readable by the strict parser, and all six types occur.
    examples = [block for block in user.split("###") if "Errors: Number" in block]
    assert len(examples) == 5
    seen = [0] * 6
    for block in examples:
        counts = parse_answer(block.split("Errors:", 1)[1])
        seen = [s + a + b for s, a, b in zip(seen, counts.significant, counts.insignificant)]
    assert all(seen)
    assert format_answer(parse_answer(GOOD)) == GOOD


def test_auto_prompt_without_package_is_labelled_radtrt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(published, "is_installed", lambda: False)
    prompt = select_prompt("auto")
    assert prompt.name == "radtrt" and prompt.label == RADTRT_JUDGE_LABEL
    assert "not the published" in prompt.label
    with pytest.raises(RadtrtError, match="chexprompt package .*'pip install --no-deps -e CHECKOUT'"):
        select_prompt("published")  # a plain install pins openai==0.28 over the judge client's openai>=1
    with pytest.raises(RadtrtError, match="unknown judge prompt"):
        select_prompt("gpt")


# A stand-in for an installed chexprompt with the published module layout (not its text).
_EVAL_UTILS = '''
ERROR_TYPE_MAP = {"A": "fa", "B": "fb", "C": "fc", "D": "fd", "E": "fe", "F": "ff"}

def parse_rating_text(text):
    def one(line):
        body = line.split(":", 1)[1].replace("(", "").replace(")", "").replace("[", "").replace("]", "")
        items = [p.strip() for p in body.split(",")]
        try:
            return {ERROR_TYPE_MAP[items[i]]: int(items[i + 1]) for i in range(0, len(items), 2)}
        except Exception:
            return None
    lines = [l for l in text.splitlines() if l.strip()]
    if len(lines) < 2:
        return None, None
    return one(lines[0]), one(lines[1])
'''


def _fake_package(root: Path, importable: bool) -> None:
    pkg = root / "chexprompt"
    pkg.mkdir()
    pkg.joinpath("__init__.py").write_text("from .evaluator import ReportEvaluator\n")
    pkg.joinpath("eval_utils.py").write_text(_EVAL_UTILS)
    first = "" if importable else "import openai.error  # the openai==0.28 pin\n"
    pkg.joinpath("evaluator.py").write_text(first + textwrap.dedent('''
        SYSTEM_INSTRUCTIONS = "STUB SYSTEM"
        USER_INSTRUCTIONS = """STUB {examples_formatted}
        Reference Findings: \\"\\"\\"{eval_reference}\\"\\"\\"
        Candidate Findings: \\"\\"\\"{eval_candidate}\\"\\"\\"
        Errors:"""
        EXAMPLES_FORMATTED = "STUB EXAMPLES"

        class ReportEvaluator:
            pass
        '''))


@pytest.mark.parametrize("importable", [True, False], ids=["plain-import", "openai-0.28-pin"])
def test_published_prompt_and_parser_are_used_when_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            importable: bool) -> None:
    _fake_package(tmp_path, importable)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "chexprompt" or m.startswith("chexprompt.")]:
        monkeypatch.delitem(sys.modules, name)
    if not importable:
        monkeypatch.setitem(sys.modules, "openai.error", None)  # make the pin's import fail here too
    prompt = select_prompt("auto")
    assert prompt.name == "published"
    assert ("chexprompt.evaluator" in sys.modules) == importable  # the pinned package was read, not run
    assert prompt.label.startswith("CheXprompt (published prompt and parser")
    messages = prompt.build("REF", "CAND")
    assert messages[0] == {"role": "system", "content": "STUB SYSTEM"}
    assert messages[1]["content"].startswith("STUB STUB EXAMPLES")
    assert 'Candidate Findings: """CAND"""' in messages[1]["content"]
    assert prompt.parse(GOOD) == ErrorCounts((1, 0, 2, 0, 0, 1), (0, 3, 0, 0, 1, 0))
    # The published parser's None, or a dict with the wrong keys, is a failure, never zeros.
    with pytest.raises(AnswerFormatError):
        prompt.parse("nonsense")
    with pytest.raises(AnswerFormatError):
        prompt.parse(GOOD.replace("(F, 1)", "(F, 1), (G, 2)"))
