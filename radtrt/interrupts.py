"""Ctrl-C and SIGTERM that wait for a module import in progress to finish, then interrupt as usual.

Why: radtrt imports its heavy dependencies lazily (torch, onnx, onnxruntime), and an interrupt landing inside
one of their C extensions' initialisation did not end as an interrupt: torch's pybind11 code aborted the
process (``terminate called after throwing an instance of 'pybind11::error_already_set'``, status 134), and
ml_dtypes (imported by onnx) left numpy half-initialised, so the next attribute lookup recursed into a
900-frame ``RecursionError`` traceback, status 1, an "internal error". An import takes a second at most, so
the interrupt is held back until the import is over (the handler looks again every ``RETRY_S``), and only
then raises ``KeyboardInterrupt``, which the commands' wrappers turn into status 130 after their cleanup.
This module imports nothing heavy itself.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

RETRY_S = 0.05
IMPORT_MACHINERY = ("<frozen importlib._bootstrap>", "<frozen importlib._bootstrap_external>")


def importing(frame: FrameType | None) -> bool:
    """Whether ``frame`` runs inside a module import (a frame of the import system is among its callers)."""
    while frame is not None:
        if frame.f_code.co_filename in IMPORT_MACHINERY:
            return True
        frame = frame.f_back
    return False


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGINT and SIGTERM both unwind as Ctrl-C does (a ``timeout``, ``kill`` or batch scheduler's SIGTERM too, so
    the ``finally`` blocks that remove half-built outputs run instead of the process just ending)."""
    if importing(frame):
        retry = threading.Timer(RETRY_S, os.kill, (os.getpid(), signum))
        retry.daemon = True  # never keeps a process that is ending alive
        retry.start()
        return
    raise KeyboardInterrupt


def install() -> None:
    """Take over SIGINT and SIGTERM for this process (the main thread only, as ``signal`` requires)."""
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)


def finished() -> None:
    """The command has ended (its results printed, or its failure said): a Ctrl-C during the second or so the
    interpreter takes to tear down (torch's thread pools, module finalizers) no longer turns a complete run into
    exit 130, which made ``radtrt ... && next`` skip ``next`` over output that was whole."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
