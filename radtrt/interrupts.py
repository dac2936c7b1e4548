"""Ctrl-C and SIGTERM that wait for a module import in progress to finish, then interrupt as usual.

Why: radtrt imports its heavy dependencies lazily (torch, onnx, onnxruntime), and an interrupt landing inside
one of their C extensions' initialisation did not end as an interrupt: torch's pybind11 code aborted the
process (``terminate called after throwing an instance of 'pybind11::error_already_set'``, status 134), and
ml_dtypes (imported by onnx) left numpy half-initialised, so the next attribute lookup recursed into a
900-frame ``RecursionError`` traceback, status 1, an "internal error". So the interrupt is held back while the
main thread imports (usually a second or two), and delivered once, as ``KeyboardInterrupt``, when the import
is over; the commands' wrappers turn that into status 130 after their cleanup. Python can lose a raise from a
signal handler (see ``_recheck``), so each one is checked on a moment later and raised again if it was lost. A
second press (or a SIGTERM) while one is held back adds nothing (two interrupts landing together cut the first
one's cleanup short). An import still running ``MAX_HOLD_S`` after the interrupt (a hung network filesystem) is
interrupted anyway.
This module imports nothing heavy itself.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import threading
import time
from types import FrameType
from typing import Any, Iterator

from radtrt.errors import printable

POLL_S = 0.05
RECHECK_S = 0.25
MAX_HOLD_S = 30.0
IMPORT_MACHINERY = ("<frozen importlib._bootstrap>", "<frozen importlib._bootstrap_external>")

_held: set[int] = set()  # signals waiting for an import to end (at most one delivery each)
_forced: set[int] = set()  # signals re-sent by a watcher: delivered whatever the main thread is doing
_deferring = 0  # depth of ``deferred`` blocks
_deferred: set[int] = set()  # signals that arrived inside one, delivered as it ends
_notes: list[str | None] = []  # what each open ``deferred`` block is doing, said when an interrupt is held
_complete: list[tuple[str, str]] = []  # outputs this process finished ("bundle directory", "e32"): named if interrupted
_explained = False  # the command (or ``report``) has said on stderr what its interruption left
_rechecks: list[object] = []  # the token of a SIGINT sent by _recheck: the handler looks whether its raise was lost
_installed: list[Any] = []  # [pid, token] of the last ``install``: a forked DataLoader worker inherits the handler


def importing(frame: FrameType | None) -> bool:
    """Whether ``frame`` runs inside a module import (a frame of the import system is among its callers)."""
    while frame is not None:
        if frame.f_code.co_filename in IMPORT_MACHINERY:
            return True
        frame = frame.f_back
    return False


def _watch(signum: int, main_id: int) -> None:
    """Re-send ``signum`` once the main thread's import is over (or has run past ``MAX_HOLD_S``)."""
    deadline = time.monotonic() + MAX_HOLD_S
    while time.monotonic() < deadline and importing(sys._current_frames().get(main_id)):
        time.sleep(POLL_S)
    _forced.add(signum)
    os.kill(os.getpid(), signum)


def _unwinding() -> bool:
    """Whether the main thread is handling a ``KeyboardInterrupt``, or an exception raised while it did (click's
    ``Abort``, ``SystemExit(130)``, a cleanup's own error): the ``except`` and ``finally`` blocks and ``__exit__``
    methods an interrupt runs all see it in ``sys.exc_info``."""
    exc = sys.exc_info()[1]
    while exc is not None:
        if isinstance(exc, KeyboardInterrupt):
            return True
        exc = exc.__context__
    return False


def _recheck(token: object) -> None:
    """A moment after a raise, send SIGINT for the handler to look whether the raise was lost. CPython 3.11 drops
    one now and then: a signal landing as ``int("Keyword", 16)`` fails (pydicom's ``"Keyword" in dataset``) lost
    about 1 in 40 interrupts, and ``data phantoms`` ran to its end with exit 0 (seen in CI); one raised inside a
    finalizer (torch's weakref callbacks, a ``__del__``, logging's at-fork hook) is ignored too. Nothing is sent
    once radtrt's handler is gone (the command has ended, or a caller put its own back), nor after another
    ``install`` (a caller's next run, whose handler is radtrt's again)."""
    if _installed and _installed[1] is token and signal.getsignal(signal.SIGINT) is _interrupt:
        _rechecks[:] = [token]
        os.kill(os.getpid(), signal.SIGINT)


def settled() -> None:
    """The interrupt has reached the command's end with no exception left in flight (typer answers a command's
    ``KeyboardInterrupt`` with exit code 130): a check on it now would find it lost and raise a second one, which
    could cut short the one line that says what it left."""
    if _installed:
        _installed[1] = object()  # checks already scheduled, or sent, are stale


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGINT and SIGTERM both unwind as Ctrl-C does (a ``timeout``, ``kill`` or batch scheduler's SIGTERM too, so
    the ``finally`` blocks that remove half-built outputs run instead of the process just ending)."""
    if _rechecks:
        token = _rechecks.pop()
        if _unwinding() or not _installed or token is not _installed[1]:
            return  # the raise it checks on is on its way (a second one would cut its cleanup short), or received
    forced = signum in _forced
    if forced:
        _forced.clear()
        _held.clear()
    elif _held:
        return  # a second press, or a SIGTERM after a Ctrl-C, while the first waits: the watcher delivers one
    if _deferring:  # a held import's signal, re-sent inside a deferred block, waits for it too (it was raised in
        # the DataLoader's at-fork hook, where Python ignores exceptions, and training ran to its end)
        if not _deferred and _notes and _notes[-1] and sys.stderr is not None:
            try:  # a press that seems to do nothing is pressed again, or the job is killed outright
                sys.stderr.write(f"radtrt: {_notes[-1]} first, then stopping\n")
                sys.stderr.flush()
            except (OSError, RuntimeError):  # stderr gone, or being written right now (the note is a courtesy)
                pass
        _deferred.add(signum)
        return
    if not forced and importing(frame):
        _held.add(signum)
        threading.Thread(target=_watch, args=(signum, threading.get_ident()), daemon=True).start()
        return
    if _installed and _installed[0] == os.getpid():  # a DataLoader worker ends its loop on this raise, and a
        # second one landing in its exit printed multiprocessing's "Process ...: Traceback"; its main process is
        # checked on instead
        recheck = threading.Timer(RECHECK_S, _recheck, args=(_installed[1],))
        recheck.daemon = True
        recheck.start()
    raise KeyboardInterrupt


def _unraisable(unraisable: Any) -> None:
    """``sys.unraisablehook``: an interrupt raised where Python ignores exceptions (a weakref callback torch runs, a
    ``__del__``, logging's at-fork hook as the DataLoader forks) was printed as "Exception ignored in ..." with a
    traceback. It is not printed: ``_recheck`` raises it again once the finalizer has returned (sent as a plain
    interrupt, not forced: landing in an import by then, it is held for the import as any other; raised into
    onnxruntime's, it became "ImportError: import numpy failed" and exit 1)."""
    if not isinstance(unraisable.exc_value, KeyboardInterrupt):
        sys.__unraisablehook__(unraisable)


@contextlib.contextmanager
def deferred(note: str | None = None) -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM (as ``install`` handles them) for the few lines inside, then deliver one as
    ``KeyboardInterrupt``: for steps that must not be cut in two, such as a finished output renamed into place and
    recorded as complete (an interrupt between the two made the output look unfinished). Dropped when the block
    fails: its error ends the command anyway. ``note`` (say "finishing the checkpoint save") is printed when an
    interrupt is held, for a block that can take seconds."""
    global _deferring
    _deferring += 1
    _notes.append(note)
    try:
        yield
    finally:
        _deferring -= 1
        _notes.pop()
        deliver = not _deferring and bool(_deferred)
        if not _deferring:
            _deferred.clear()
    if deliver:
        raise KeyboardInterrupt


@contextlib.contextmanager
def completing(what: str, path: os.PathLike[str] | str) -> Iterator[None]:
    """The block puts ``what`` in place at ``path``: it runs ``deferred``, and the output is recorded ``completed``
    once the block succeeds, so an interrupt after it names the output (a calibrate rerun refused a whole file no
    line had named)."""
    with deferred():
        yield
        completed(what, path)


def completed(what: str, path: os.PathLike[str] | str) -> None:
    """``what`` at ``path`` (e.g. "bundle directory", e32) is complete in its place: an interrupt later in the
    command ends it with 130 all the same (later steps did not run), and ``report`` says the output is whole.
    Without it, the rerun refused the output as "not empty", and a user could delete a good bundle as a half-built
    one. One gone by then (a temporary folder of phantoms, removed as the interrupt unwound) is not named."""
    _complete.append((what, os.fspath(path)))


def explained() -> None:
    """The command has said on stderr what its interruption left (train names the resume command): ``report``
    would only repeat it."""
    global _explained
    _explained = True


def report() -> None:
    """The one stderr line of an interrupted command (exit 130), printed once. It claims no more than radtrt
    ensures: no output is left half-written under its own name (a half-built folder or file is removed, or kept as
    ``OUT.partial`` for a rerun to complete), and the outputs finished before the interrupt are named. An
    interrupted ``infer --sr-out`` may have printed a study's report whose SR was not written yet: each SR
    written has its own line."""
    global _explained
    if _explained or sys.stderr is None:
        return
    _explained = True
    kept = "".join(f"; {what} {path} is complete (finished before the interrupt)" for what, path in _complete
                   if os.path.lexists(path))
    try:
        sys.stderr.write(printable(f"radtrt: interrupted{kept}; no output was left half-written under its name")
                         + "\n")
        sys.stderr.flush()
    except OSError:  # stderr gone (a reader closed, a full disk): the status, 130, still says it
        pass


def _excepthook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
    """``sys.excepthook``: multiprocessing's resource-sharer thread (DataLoader workers hand tensors to the main
    process through it) reports a worker that died mid-handshake through this hook, and a SIGTERM to the whole job
    (a scheduler's, ``kill`` of the process group) printed that as a traceback beside train's one line. The worker's
    death is the DataLoader's to report (it does, in the main thread); everything else goes to Python's own hook."""
    frames, step = [], tb
    while step is not None:
        frames.append(step.tb_frame.f_globals.get("__name__"))
        step = step.tb_next
    if issubclass(kind, (EOFError, ConnectionError)) and "multiprocessing.resource_sharer" in frames:
        return
    sys.__excepthook__(kind, value, tb)


def install() -> None:
    """Take over SIGINT and SIGTERM for this process (the main thread only, as ``signal`` requires)."""
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    _installed[:] = [os.getpid(), object()]
    sys.unraisablehook = _unraisable
    sys.excepthook = _excepthook


def finished(status: int) -> None:
    """The command has ended with ``status`` (its results printed, or its failure said): a Ctrl-C during the second
    or so the interpreter takes to tear down (torch's thread pools, module finalizers) no longer turns a complete
    run into exit 130, which made ``radtrt ... && next`` skip ``next`` over output that was whole; a SIGTERM then
    ends the process at once with that status (a teardown that hangs can still be stopped, without a traceback
    or a misreported 143). An interrupt still held for an import is dropped: the command it would have stopped
    has ended."""

    ending: list[bool] = []

    def end_now(signum: int, frame: FrameType | None) -> None:
        if ending:  # a second SIGTERM while the first flushes
            return
        ending.append(True)
        for stream in (sys.stdout, sys.stderr):  # os._exit skips the flush at exit
            try:
                if stream is not None:
                    stream.flush()
            except RuntimeError:  # the interpreter was flushing it (a slow reader): its own exit follows
                return
            except (OSError, ValueError):  # closed, or a reader gone: nothing more can reach it
                pass
        os._exit(status)

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, end_now)
    # Python gives its signals back their defaults as it finalizes, before torch's and ONNX Runtime's teardown
    # (a second or so): a SIGTERM then killed a complete run (status 143, and 'cmd && next' skipped next). From the
    # interpreter's exit on, it is ignored, as SIGINT is; SIGKILL still stops a teardown that hangs.
    atexit.register(signal.signal, signal.SIGTERM, signal.SIG_IGN)
