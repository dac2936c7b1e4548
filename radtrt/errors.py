"""The one error type for failures the user can fix (bad input, missing files, wrong versions).

The CLI turns it into a single line on stderr and exit code 2; anything else is a bug and exits 1.
Messages must never contain patient names or IDs.
"""

from __future__ import annotations

import os
import re
import shlex
from typing import Any, Iterable, NoReturn

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class RadtrtError(Exception):
    """A user-facing failure: bad input, missing or incompatible files, unsupported requests.

    ``remedy``, when given apart, lets a caller that knows a better one (the demo, for the bundle it made itself)
    quote only the problem; ``str()`` is the whole line either way."""

    def __init__(self, problem: str, remedy: str | None = None) -> None:
        super().__init__(f"{problem}: {remedy}" if remedy else problem)
        self.problem, self.remedy = problem, remedy


def printable(text: str) -> str:
    """``text`` with control characters escaped (``\\n``, ``\\x1b``), for the terminal: a file named with a newline
    split the one error line in two (a second line could pose as radtrt's), and an escape sequence reached the
    terminal. A file name's undecodable bytes are written as ``\\xfe`` (:func:`valid_unicode`), as in ``--json``
    records: stderr showed Python's ``\\udcfe`` for the same file. Applied where lines are printed, not to the
    messages themselves: JSON records keep the names as they are (JSON escapes them), so a record's error still
    starts with its study."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), valid_unicode(text))


def shell_quote(text: str) -> str:
    """``shlex.quote``, except for text holding a file name's undecodable bytes or control characters: bash's
    ``$'...'`` with those bytes escaped. A printed command must paste: ``'/runs/nu\udcffrun'`` became
    ``'/runs/nu\xffrun'`` on stderr (:func:`printable`), a folder that does not exist."""
    if not _CONTROL.search(text) and valid_unicode(text) == text:
        return shlex.quote(text)
    quoted = "".join(chr(b) if 0x20 <= b < 0x7F and b not in b"\\'" else f"\\x{b:02x}" for b in os.fsencode(text))
    return f"$'{quoted}'"


def shell_join(words: Iterable[str]) -> str:
    """``shlex.join`` with :func:`shell_quote`."""
    return " ".join(shell_quote(word) for word in words)


def valid_unicode(text: str) -> str:
    """``text`` with a file name's undecodable bytes written as ``\\xff``. Python carries them as lone surrogates
    (``\\udcff``), which ``json.dumps`` writes out but strict JSON parsers reject and jq replaces: a ``--json``
    record could not be read back, or traced to its file."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate no file name's byte decodes to (``\\ud800``): its escape
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def valid_unicode_in(value: Any) -> Any:
    """:func:`valid_unicode` on every string of a JSON-able value, keys included: a report's file names (a study,
    -o, the command that reproduces it) reach the JSON inside lists and objects."""
    if isinstance(value, str):
        return valid_unicode(value)
    if isinstance(value, dict):
        return {valid_unicode_in(k): valid_unicode_in(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [valid_unicode_in(v) for v in value]
    return value


def fail(message: str, *, remedy: str | None = None) -> NoReturn:
    """Raise the user-facing error; the single place such failures originate."""
    raise RadtrtError(message, remedy)
