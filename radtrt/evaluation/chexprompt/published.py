"""The published CheXprompt prompt and parser, taken from an installed ``chexprompt`` package.

The package (GitHub microsoft/chexprompt) pins ``openai==0.28`` and imports ``openai.error`` at import
time, which does not exist in the openai>=1 SDK radtrt talks to judges with; so a plain import usually
fails. radtrt therefore needs only two things from it and never its client: the prompt text
(``SYSTEM_INSTRUCTIONS``, ``USER_INSTRUCTIONS``, ``EXAMPLES_FORMATTED`` in ``evaluator.py``) and the parser
(``parse_rating_text`` in ``eval_utils.py``, which imports nothing but the standard library). When the
normal import works they are used from it; otherwise the prompt constants are read as literals from the
installed source (without running it) and ``eval_utils.py`` is loaded on its own.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

from radtrt.errors import fail
from radtrt.evaluation.chexprompt.parser import LETTERS, AnswerFormatError, ErrorCounts
from radtrt.evaluation.chexprompt.prompt import JudgePrompt, Messages

_CONSTANTS = ("SYSTEM_INSTRUCTIONS", "USER_INSTRUCTIONS", "EXAMPLES_FORMATTED")


def is_installed() -> bool:
    """Whether a ``chexprompt`` package can be found (found, not imported)."""
    return importlib.util.find_spec("chexprompt") is not None


def _package_dir() -> Path:
    spec = importlib.util.find_spec("chexprompt")
    if spec is None or not spec.submodule_search_locations:
        fail("the chexprompt package is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def _version() -> str:
    try:
        return importlib.metadata.version("chexprompt")
    except importlib.metadata.PackageNotFoundError:
        return "unknown version"


def _constants_from_source(path: Path) -> dict[str, str]:
    """The prompt strings assigned at the top of ``evaluator.py``, read without executing the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name in _CONSTANTS and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
                found[name] = node.value.value
    missing = [c for c in _CONSTANTS if c not in found]
    if missing:
        fail(f"the installed chexprompt package lacks the prompt text radtrt expects ({', '.join(missing)})")
    return found


def _modules() -> tuple[dict[str, str], ModuleType]:
    """Prompt constants and the ``eval_utils`` module, by normal import or from the installed files."""
    try:
        evaluator = importlib.import_module("chexprompt.evaluator")
        eval_utils = importlib.import_module("chexprompt.eval_utils")
        return {c: getattr(evaluator, c) for c in _CONSTANTS}, eval_utils
    except ImportError:
        pass  # the openai==0.28 pin: read the files instead (module docstring)
    pkg = _package_dir()
    constants = _constants_from_source(pkg / "evaluator.py")
    spec = importlib.util.spec_from_file_location("radtrt_published_chexprompt_eval_utils", pkg / "eval_utils.py")
    if spec is None or spec.loader is None:
        fail("the installed chexprompt package has no eval_utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return constants, module


def _reader(eval_utils: ModuleType) -> Callable[[str | None], ErrorCounts]:
    """Wrap ``parse_rating_text`` so that anything short of six whole counts per line is a failure."""
    type_map: dict[str, str] = getattr(eval_utils, "ERROR_TYPE_MAP", {})
    names = [type_map.get(letter) for letter in LETTERS]
    if None in names or not hasattr(eval_utils, "parse_rating_text"):
        fail("the installed chexprompt package lacks the parser radtrt expects (parse_rating_text, ERROR_TYPE_MAP)")

    def counts(parsed: Any, which: str) -> tuple[int, ...]:
        if not isinstance(parsed, dict) or set(parsed) != set(names):
            raise AnswerFormatError(f"the published parser could not read the {which} errors")
        values = [parsed[n] for n in names]
        if any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in values):
            raise AnswerFormatError(f"the {which} errors are not whole numbers >= 0")
        return tuple(values)

    def parse(text: str | None) -> ErrorCounts:
        if not text or not text.strip():
            raise AnswerFormatError("the answer is empty")
        significant, insignificant = eval_utils.parse_rating_text(text)
        return ErrorCounts(counts(significant, "significant"), counts(insignificant, "insignificant"))

    return parse


def load() -> JudgePrompt:
    """The published prompt and parser as a ``JudgePrompt``."""
    constants, eval_utils = _modules()
    system, user_template, examples = (constants[c] for c in _CONSTANTS)

    def build(reference: str, candidate: str) -> Messages:
        user = user_template.format(examples_formatted=examples, eval_reference=reference, eval_candidate=candidate)
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]

    return JudgePrompt(name="published", label=f"CheXprompt (published prompt and parser, chexprompt {_version()})",
                       build=build, parse=_reader(eval_utils))
