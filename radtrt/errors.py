"""The one error type for failures the user can fix (bad input, missing files, wrong versions).

The CLI turns it into a single line on stderr and exit code 2; anything else is a bug and exits 1.
Messages must never contain patient names or IDs.
"""

from __future__ import annotations

from typing import NoReturn


class RadtrtError(Exception):
    """A user-facing failure: bad input, missing or incompatible files, unsupported requests."""


def fail(message: str) -> NoReturn:
    """Raise the user-facing error; the single place such failures originate."""
    raise RadtrtError(message)
