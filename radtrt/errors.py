"""The one error type for failures the user can fix (bad input, missing files, wrong versions).

The CLI turns it into a single line on stderr and exit code 2; anything else is a bug and exits 1.
Messages must never contain patient names or IDs.
"""

from __future__ import annotations

import re
from typing import NoReturn

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class RadtrtError(Exception):
    """A user-facing failure: bad input, missing or incompatible files, unsupported requests."""


def printable(text: str) -> str:
    """``text`` with control characters escaped (``\\n``, ``\\x1b``), for the terminal: a file named with a newline
    split the one error line in two (a second line could pose as radtrt's), and an escape sequence reached the
    terminal. Applied where lines are printed, not to the messages themselves: JSON records keep the names as
    they are (JSON escapes them), so a record's error still starts with its study."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def fail(message: str) -> NoReturn:
    """Raise the user-facing error; the single place such failures originate."""
    raise RadtrtError(message)
