"""Output-path checks shared by every command that writes files or folders.

A mistyped ``-o`` (an existing file where a folder is wanted, a folder inside a file, a place that
cannot be written) must end as one ``RadtrtError`` line, and must do so *before* the slow work
(model loading, export, calibration) rather than as an ``OSError`` traceback after it.
"""

from __future__ import annotations

import os
from pathlib import Path

from radtrt.errors import fail


def check_creatable(path: Path, what: str) -> None:
    """Fail unless ``path`` could be created: its nearest existing ancestor must be a writable folder.

    Checked without creating anything, so a later failure leaves no empty folders behind.
    """
    ancestor = path.absolute() if path.is_dir() else path.absolute().parent  # an existing folder: itself
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        fail(f"cannot write {what} {path}: {ancestor} is not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        fail(f"cannot write {what} {path}: {ancestor} is not writable")


def check_folder_target(path: Path, what: str) -> None:
    """Fail unless ``path`` is a folder or could be created as one (what is in it is the caller's concern)."""
    if path.exists() and not path.is_dir():
        fail(f"{what} {path} exists and is not a folder")
    check_creatable(path, what)


def check_file_target(path: Path, what: str) -> None:
    """Fail unless ``path`` could be written as a file (an existing file is overwritten by the caller)."""
    if path.is_dir():
        fail(f"{what} {path} is a folder; give the file to write")
    check_creatable(path, what)


def check_new_dir(path: Path, what: str = "output directory") -> None:
    """Fail unless ``path`` is an empty folder or can be created as one (never merge into user data)."""
    check_folder_target(path, what)
    if path.is_dir() and any(path.iterdir()):
        fail(f"{what} {path} is not empty")


def check_new_file(path: Path, what: str = "output file") -> None:
    """Fail unless ``path`` names a file that does not exist yet and could be written."""
    if path.exists():
        fail(f"{what} {path} already exists; choose another -o")
    check_creatable(path, what)


def make_dir(path: Path, what: str = "output directory") -> Path:
    """``mkdir -p`` whose failure (a file in the way, no such device, no permission) is a user error."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"cannot create {what} {path}: {e.strerror}")
    return path
