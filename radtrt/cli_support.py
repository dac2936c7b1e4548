"""What every command module shares: the stderr console and the user-error wrapper.

A ``RadtrtError`` leaving a command becomes one ``radtrt: error: ...`` line on stderr and exit
code 2; anything else is a bug and propagates (exit 1).
"""

from __future__ import annotations

import errno
import functools
from typing import Any, Callable, TypeVar

import typer
from rich.console import Console

from radtrt.errors import RadtrtError, printable

err = Console(stderr=True, highlight=False)
F = TypeVar("F", bound=Callable[..., Any])


def user_errors(fn: F) -> F:
    """Wrap a command so that a ``RadtrtError`` ends as one stderr line and exit code 2, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RadtrtError as e:
            err.print(f"radtrt: error: {printable(str(e))}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except OSError as e:
            # a path the user typed that the file system cannot even look up; pathlib's exists() and
            # is_file() raise it from wherever a path is first touched
            if e.errno != errno.ENAMETOOLONG:
                raise
            err.print(f"radtrt: error: a file or folder name is too long for the file system: "
                      f"{printable(str(e.filename))}",
                      markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]
