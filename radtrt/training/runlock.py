"""One process at a time in a run folder: ``RUN/train.lock``, held for the whole run (see ``radtrt.locks``).

Why: two ``radtrt train resume RUN`` at once both ran, interleaved ``log.jsonl`` for good and removed
each other's ``lora/``. A new run's exclusive ``train_config.json`` kept a second new run out, but not a
resume.
"""

from __future__ import annotations

from pathlib import Path

from radtrt.locks import FileLock, lock_file
from radtrt.locks import lock_holder as _holder

LOCK_FILE = "train.lock"
RunLock = FileLock
UNLOCKABLE = ("radtrt trains only in folders it can lock, so that two runs never write into one: choose a run "
              "folder on a local file system")


def lock_run(run_dir: Path, busy: str) -> FileLock:
    """Take the run folder's lock, or fail with ``busy``, its ``{holder}`` replaced by e.g. 'process 42'."""
    return lock_file(run_dir / LOCK_FILE, busy, UNLOCKABLE)


def lock_holder(run_dir: Path) -> str | None:
    """Who holds the run folder's lock ('process N'), or None when no process does."""
    return _holder(run_dir / LOCK_FILE, UNLOCKABLE)
