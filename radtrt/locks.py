"""One process at a time on an output: a lock file held (``flock``) while the output is written.

Why: two ``radtrt train resume RUN`` at once both ran, interleaved ``log.jsonl`` for good and removed each
other's ``lora/``; two ``radtrt data synthesize`` to one ``-o`` appended to one ``OUT.partial`` and left a
manifest with rows twice under the final name. ``flock`` ends with the process however it ends (a kill, a
crash), so a lock can never be stale; the file holds the holder's process id only to name it in the refusal.

The file is removed by its holder before the lock is let go, and a process that locked a file which
was meanwhile removed tries again on the new one: otherwise two processes could each hold a lock, one
on the removed file and one on its successor.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import time
from pathlib import Path
from types import TracebackType
from typing import Callable

from radtrt.errors import fail


class FileLock:
    """A held lock; a context manager that lets it go (and removes its file)."""

    def __init__(self, fd: int, path: Path) -> None:
        self.fd, self.path = fd, path

    def release(self) -> None:
        if self.fd < 0:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still held: see the module docstring
        finally:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "FileLock":
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.release()


def _holder_text(fd: int) -> str:
    """'process N' from the lock file, or a plain 'another process' when it has not written its id yet."""
    text = os.pread(fd, 64, 0).decode("ascii", errors="replace")
    pid = text[4:].strip() if text.startswith("pid ") else ""
    return f"process {pid}" if pid.isdigit() else "another process"


def _ours(fd: int) -> bool:
    """Whether the locked file is empty (just made, by us or a holder that has not written yet) or holds what
    radtrt writes there: a lock beside a user's output must not take over a file that only shares its name."""
    text = os.pread(fd, 65, 0)
    return text == b"" or re.fullmatch(rb"pid [0-9]+\n", text) is not None


def lock_file(path: Path, busy: str, unlockable: str) -> FileLock:
    """Take the lock of ``path``, or fail with ``busy``, its ``{holder}`` replaced by e.g. 'process 42'.
    ``unlockable``: what to say where the file system has no locks."""
    return _lock(path, unlockable, busy=busy)


def wait_for_lock(path: Path, unlockable: str, on_wait: Callable[[str], None]) -> FileLock:
    """Take the lock of ``path``, waiting for its holder to let it go (``on_wait`` is first told who, e.g.
    'process 42'): for work the holder does for us too, such as a cache entry the waiter then reuses. A Ctrl-C
    ends the wait."""
    return _lock(path, unlockable, on_wait=on_wait)


def _lock(path: Path, unlockable: str, *, busy: str = "", on_wait: Callable[[str], None] | None = None) -> FileLock:
    while True:
        try:  # O_NOFOLLOW: a link there would have had its target emptied and overwritten
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        except OSError as e:
            if e.errno == errno.ELOOP:
                fail(f"{path} is a symbolic link, where radtrt keeps its lock file; move it away")
            fail(f"cannot create the lock file {path} ({e.strerror or e})")
        try:
            _flock_soon(fd)
        except BlockingIOError:
            holder = _holder_text(fd)
            if on_wait is None:
                os.close(fd)
                fail(busy.replace("{holder}", holder))
            _wait(fd, lambda: on_wait(holder))
        except OSError as e:  # a file system without locks: running unprotected is what this module prevents
            os.close(fd)
            fail(f"cannot lock {path} ({e.strerror or e}); {unlockable}")
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:  # its holder removed it between our open and our lock
            current = None
        if current == os.fstat(fd).st_ino:
            break
        os.close(fd)
    if not _ours(fd):  # a user's file of that name: never emptied, written or removed
        os.close(fd)
        fail(f"{path} exists and is not a radtrt lock file; move it away (radtrt keeps its lock there)")
    lock = FileLock(fd, path)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}\n".encode())
    except OSError as e:
        lock.release()
        fail(f"cannot write the lock file {path} ({e.strerror or e})")
    return lock


PROBE_GRACE_S = 0.5


def _flock_soon(fd: int) -> None:
    """Take the lock on ``fd`` without waiting for a holder, retrying for ``PROBE_GRACE_S``: ``lock_holder`` takes
    it for an instant to see whether anyone holds it, and a run landing then was refused as "another process is
    training right now" with nobody training (about 1 in 3 against a loop of probes)."""
    deadline = time.monotonic() + PROBE_GRACE_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.01)


def _wait(fd: int, announce: Callable[[], None]) -> None:
    """Say so, then block until the lock on ``fd`` is ours; ``fd`` is closed when the wait ends otherwise (an
    interrupt)."""
    try:
        announce()
        fcntl.flock(fd, fcntl.LOCK_EX)
    except BaseException:
        os.close(fd)
        raise


def lock_holder(path: Path, unlockable: str) -> str | None:
    """Who holds the lock of ``path`` ('process N'), or None when no process does. Only probes: a lock taken
    here is let go at once, and the file is left as it was."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError as e:
        fail(f"cannot read the lock file {path} ({e.strerror or e})")
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder_text(fd)
        except OSError as e:
            fail(f"cannot lock {path} ({e.strerror or e}); {unlockable}")
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
