"""What every command module shares: the stderr console, results on stdout and the user-error wrapper.

A ``RadtrtError`` leaving a command becomes one ``radtrt: error: ...`` line on stderr and exit
code 2; anything else is a bug and propagates (exit 1).
"""

from __future__ import annotations

import errno
import functools
import os
import sys
from pathlib import Path
from typing import Any, Callable, TypeVar

import typer
from rich.console import Console

from radtrt.errors import RadtrtError, fail, printable

err = Console(stderr=True, highlight=False)
#: what writing stdout (a pipe, disk or terminal) fails with
WRITE_ERRNOS = frozenset({errno.EPIPE, errno.ENOSPC, errno.EIO, errno.EDQUOT, errno.EFBIG})
#: of those, what only a write raises (a read can fail with EIO too): a full disk or quota, a file too large
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
F = TypeVar("F", bound=Callable[..., Any])


def path_text(text: str) -> Path:
    """A path from the command line; an empty one (an unset shell variable) would silently mean this folder."""
    if not text:
        raise typer.BadParameter("is empty (an unset shell variable?): give a path")
    return Path(text)


def file_parser(example: str) -> Callable[[str], Path]:
    """:func:`path_text` for an output that is one file (``example``: a name for one): a value that names a folder by
    its spelling (``newdir/``, ``newdir/.``, ``.``), which ``Path`` turns into ``newdir``, is refused (``bench -o
    newdir/`` wrote a file named ``newdir`` and ``newdir.json``)."""
    def parse(text: str) -> Path:
        if text == "-":  # a file named '-' was written
            raise typer.BadParameter(f"'-' is not standard output here: give the file to write (say {example})")
        stripped = text.rstrip("/" + os.sep)
        if text and (stripped != text or os.path.basename(stripped) in (".", "..")):
            raise typer.BadParameter(f"'{text}' names a folder: give the file to write (say "
                                     f"{os.path.join(os.path.normpath(text), example)})")
        return path_text(text)
    return parse


def PathOption(default: Any, *names: str, file: str | None = None, **kwargs: Any) -> Any:  # noqa: N802 - as typer.Option
    """``typer.Option`` for a path: every path option refuses an empty value the same way; ``file``: the option is
    an output that is one file (a name for one, for the message), which refuses a folder too (:func:`file_parser`)."""
    kwargs.setdefault("metavar", "<path>")
    return typer.Option(default, *names, parser=file_parser(file) if file else path_text, **kwargs)


def PathArgument(default: Any, **kwargs: Any) -> Any:  # noqa: N802 - used like typer.Argument
    """``typer.Argument`` for paths, with the same empty-value refusal as ``PathOption``."""
    return typer.Argument(default, parser=path_text, **kwargs)


def print_error(message: str) -> None:
    """The one stderr line of a refusal (control characters escaped: a name could fake a second line)."""
    err.print(f"radtrt: error: {printable(message)}", markup=False, highlight=False, soft_wrap=True)


def user_errors(fn: F) -> F:
    """Wrap a command so that a ``RadtrtError`` ends as one stderr line and exit code 2, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RadtrtError as e:
            print_error(str(e))
            raise typer.Exit(2) from None
        except OSError as e:
            # a path the user typed that the file system cannot even look up; pathlib's exists() and
            # is_file() raise it from wherever a path is first touched
            if e.errno == errno.ENAMETOOLONG:
                print_error(f"a file or folder name is too long for the file system: {e.filename}")
            elif e.errno in FULL_ERRNOS:  # a full disk or quota where no output step expected it
                where = f": {e.filename}" if e.filename else ""
                print_error(f"a write failed ({e.strerror or e}){where}; stopped there")
            elif e.errno in (errno.EACCES, errno.EPERM) and e.filename:
                # a bundle or model copied from another user, left 0600, where no step expected it: each file
                # radtrt reads would need its own conversion, and a new one was missed each time
                print_error(f"cannot use {e.filename} ({e.strerror}): this user may not read it or a folder above "
                            f"it (or write it, where radtrt writes); stopped there")
            else:
                raise
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def emit(text: str, *, nl: bool = True) -> None:
    """A command's result on stdout. A full disk or a reader gone (``| head``) is one line and exit 2: it was
    a traceback, or click's silent exit 1, and what came after went unreported without a word."""
    if sys.stdout is None:  # started with stdout closed (``>&-``): click would drop the text without a word
        fail("standard output is closed; the results cannot be printed")
    try:
        typer.echo(text, nl=nl)
    except OSError as e:
        stdout_failed(e)


def stdout_failed(e: OSError) -> None:
    """Refuse on behalf of a write to stdout that failed; typer's help printer and ``emit`` both end here."""
    if e.errno == errno.EPIPE:  # Python flushes stdout again at exit: into nothing, not another EPIPE
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    fail(f"cannot write to standard output ({e.strerror or e}); stopped there")
