"""Output-path checks shared by every command that writes files or folders.

A mistyped ``-o`` (an existing file where a folder is wanted, a folder inside a file, a place that
cannot be written) must end as one ``RadtrtError`` line, and must do so *before* the slow work
(model loading, export, calibration) rather than as an ``OSError`` traceback after it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Sequence

from radtrt import interrupts
from radtrt.errors import fail

WORK_MARKER = ".radtrt-unfinished"  # inside OUT.partial while radtrt builds an output folder there
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)  # what flock says where there are none


def resolved(path: Path) -> Path:
    """``path.resolve()``, with a symbolic link loop on the way said in one line (a RuntimeError traceback
    before Python 3.13, an OSError after)."""
    try:
        return path.resolve()
    except (OSError, RuntimeError) as e:
        fail(f"cannot follow the path {path}: {getattr(e, 'strerror', None) or e}")


def broken_link(path: Path) -> str | None:
    """What is wrong with ``path`` when it is a symbolic link that leads nowhere ("a symbolic link loop", "a
    symbolic link to a missing target"), else None."""
    if not path.is_symlink() or path.exists():
        return None
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symbolic link loop"
    return "a symbolic link to a missing target"


def check_creatable(path: Path, what: str) -> None:
    """Fail unless ``path`` could be created: its nearest existing ancestor must be a writable folder.

    Probed by creating (and at once removing) a temporary file there, not with ``os.access``: root passes
    every ``access`` check, and folders such as /proc or /sys refuse new files whatever their mode bits say.
    No folder is created, so a later failure leaves none behind.
    """
    if broken_link(path):  # neither a folder nor creatable: mkdir says "File exists"
        fail(f"cannot write {what} {path}: it is {broken_link(path)}")
    ancestor = path.absolute() if path.is_dir() else path.absolute().parent  # an existing folder: itself
    while not ancestor.exists() and ancestor != ancestor.parent:
        if broken_link(ancestor):  # passed as "not there yet", then mkdir failed after the work
            fail(f"cannot write {what} {path}: {ancestor} is {broken_link(ancestor)}")
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        fail(f"cannot write {what} {path}: {ancestor} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as e:
        fail(f"cannot write {what} {path}: {ancestor} takes no new files ({e.strerror})")  # /proc: ENOENT


def check_folder_target(path: Path, what: str) -> None:
    """Fail unless ``path`` is a folder or could be created as one (what is in it is the caller's concern)."""
    if path.exists() and not path.is_dir():
        fail(f"{what} {path} exists and is not a folder")
    check_creatable(path, what)


def check_file_target(path: Path, what: str) -> None:
    """Fail unless ``path`` could be written as a file (an existing file is overwritten by the caller)."""
    if path.is_dir():
        fail(f"{what} {path} is a folder; give the file to write")
    _check_not_special(path, what)
    check_creatable(path, what)


def _check_not_special(path: Path, what: str) -> None:
    """Outputs are written beside their name and renamed over it: onto ``/dev/null`` or a named pipe that
    replaced the device or pipe with a regular file (for everyone on the machine, when run as root)."""
    if path.exists() and not path.is_file() and not path.is_dir():
        fail(f"{what} {path} is not a regular file (a device, pipe or socket); give the path of a file to write")


def check_new_dir(path: Path, what: str = "output directory") -> None:
    """Fail unless ``path`` is an empty folder or can be created as one (never merge into user data)."""
    check_folder_target(path, what)
    here = Path.cwd()
    if resolved(path) == here or resolved(path) in here.parents:
        # the output is built beside it and renamed into place: the shell's folder would be replaced under it
        fail(f"{what} '{path}' is the current folder or one above it; give a new folder, e.g. {path / 'out'}")
    if path.is_dir() and any(path.iterdir()):
        fail(f"{what} {path} is not empty")


def check_new_file(path: Path, what: str = "output file") -> None:
    """Fail unless ``path`` names a file that does not exist yet and could be written."""
    if path.exists():
        fail(f"{what} {path} already exists; choose another -o")
    check_creatable(path, what)


@contextlib.contextmanager
def replaced_atomically(path: Path, mode: int | None = None, *, new: str | None = None,
                        held: bool = False) -> Iterator[Path]:
    """Yield a new temporary file beside ``path`` to write; it replaces ``path`` when the block succeeds and
    is removed when it fails. The name is fresh (``mkstemp``), never a fixed ``NAME.partial`` that could be
    a user's file. A link at ``path`` stays: the file it names is replaced, as a plain write through it would.

    The data is flushed to disk before the rename: otherwise a power cut soon after can leave the final name
    pointing at an empty file. ``mode`` (default: what a plain ``open`` gives under the umask) is for files
    that must stay private, such as an SR carrying patient data.

    ``new`` (what the file is, for the message) is for outputs that :func:`check_new_file` said must be new: the
    file is then put in place only if nothing has taken the name since. Two runs to one -o both passed that check
    at their start and both exited 0, the file holding one of them's data and the other's result gone.

    ``held``: a lock is held on the temporary file while it is written, so that :func:`remove_unfinished` can tell
    a killed run's leftover from a file being written. Only for writers that write into the file they are given
    (a writer that renames its own temporary file over it, as safetensors does, leaves the lock on the old one)."""
    _check_not_special(path, "output")
    path = _target(path)
    tmp = _temp_beside(path)
    hold = _hold(tmp) if held else -1
    try:
        yield tmp
        _settle(tmp, mode)
        if new is None:
            tmp.replace(path)
        else:
            _place_new(tmp, path, new)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        if hold >= 0:
            os.close(hold)


def _hold(path: Path) -> int:
    """A descriptor holding a lock on ``path`` (a new file: no one else holds it), or -1 where the file system has
    no locks (its leftovers then stay, as :func:`remove_unfinished` cannot tell them from files being written)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:  # another run's sweep took it for a leftover in the instant before the lock: the
        return -1              # writer creates it again, unheld
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno not in _NO_LOCKS:
            raise
        return -1
    return fd


def remove_unfinished(folder: Path, final: str) -> int:
    """Remove the temporary files that runs killed while writing (``kill -9``, a power cut) left in ``folder``
    under :func:`replaced_atomically`'s names, for final names matching the regular expression ``final``; how many.
    Only files whose lock no one holds go: one a live run is writing (``held=True``) is locked. Where the file
    system has no locks, nothing goes.

    Why: such a file is hidden and never renamed into place, and an SR's holds the patient's data. Ctrl-C and a
    failure remove their own; only a killed process cannot."""
    leftover = re.compile(rf"\.({final})\.[a-z0-9_]{{8}}\.partial")
    removed = 0
    for entry in os.scandir(folder):
        if not leftover.fullmatch(entry.name) or not entry.is_file(follow_symlinks=False):
            continue
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:  # its writer renamed it into place meanwhile
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # being written
            continue
        except OSError as e:
            if e.errno in _NO_LOCKS:
                return removed
            raise
        else:
            try:
                os.unlink(entry.path)
            except FileNotFoundError:  # its writer renamed it into place before letting go of the lock
                continue
            removed += 1
        finally:
            os.close(fd)
    return removed


@contextlib.contextmanager
def replaced_together(paths: Sequence[Path]) -> Iterator[list[Path]]:
    """:func:`replaced_atomically` for files that belong together (a report's Markdown, JSON and chart): yield a
    new temporary file beside each path to write. Only once the block has succeeded and every file is flushed
    to disk are they renamed into place, one after the other, so a failure while writing leaves the earlier set
    whole instead of half this run's and half an older one's. A temporary file the block removed means "no such
    file this time": its path is removed as well (an earlier run's file there would describe another run; a link
    there is removed, and the file it names is left alone)."""
    for path in paths:
        _check_not_special(path, "output")
    targets = [_target(path) for path in paths]
    temps: list[Path] = []
    try:
        for target in targets:
            temps.append(_temp_beside(target))
        yield list(temps)
        for tmp in temps:
            if tmp.exists():
                _settle(tmp, None)
        with interrupts.deferred():  # a Ctrl-C between two renames left this run's Markdown by the last one's JSON
            for tmp, target, path in zip(temps, targets, paths):
                if tmp.exists():
                    tmp.replace(target)
                else:  # the name goes, not a file a link there names (bench parity deleted a user's chart)
                    path.unlink(missing_ok=True)
    except BaseException:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        raise


def write_set(files: Sequence[tuple[Path, Callable[[Path], object]]], what: str) -> list[Path]:
    """Write files that belong together with :func:`replaced_together`: each writer fills the temporary file it is
    given (one returning False writes none this time: an earlier run's file there goes). A failure is one line
    naming the file being written. The paths written, in order."""
    paths = [path for path, _ in files]
    written: list[Path] = []
    writing = paths[0]
    try:
        with replaced_together(paths) as temps:
            for (path, write), tmp in zip(files, temps):
                writing = path
                if write(tmp) is False:
                    tmp.unlink()
                else:
                    written.append(path)
            writing = paths[0]
    except OSError as e:
        fail(f"cannot write {what} {writing}: {e.strerror or e}")
    return written


def _target(path: Path) -> Path:
    """The file a write to ``path`` replaces: a link at ``path`` stays, and the file it names is replaced, as a
    plain write through it would."""
    return resolved(path) if path.is_symlink() else path


def _temp_beside(path: Path) -> Path:
    """A fresh temporary file beside ``path`` (``mkstemp``), never a fixed ``NAME.partial`` that could be a
    user's file."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(fd)
    return Path(name)


def _settle(tmp: Path, mode: int | None) -> None:
    """Give a written temporary file its final mode and flush it to disk before it is renamed into place: a power
    cut soon after a rename can otherwise leave the final name pointing at an empty file. After the writer, since
    mkstemp's 0600 (or a writer's own temporary file renamed over ``tmp``, as safetensors does) would make every
    output private to its writer."""
    tmp.chmod(0o666 & ~_umask() if mode is None else mode)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _place_new(tmp: Path, path: Path, what: str) -> None:
    """Give ``tmp`` the name ``path`` unless something has it (a hard link fails then, where a rename replaces),
    and drop the temporary name."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        fail(f"{what} {path} was written by another run meanwhile (this run's result was not saved); "
             f"choose another -o")
    except OSError as e:
        # a file system without hard links (FAT, some shares; FUSE mounts say ENOSYS)
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        if path.exists() or path.is_symlink():  # the best such a file system allows: checked just before
            fail(f"{what} {path} was written by another run meanwhile (this run's result was not saved); "
                 f"choose another -o")
        tmp.replace(path)
        return
    tmp.unlink()


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _share_like_new_files(folder: Path) -> None:
    """Give everything in ``folder`` the modes a plain ``open``/``mkdir`` would have (umask applied).

    Why: writers that go through temporary files (``mkstemp``, safetensors, ONNX Runtime's quantizer)
    leave some files 0600, and a bundle must be readable by the server (Triton, another user) that loads it."""
    umask = _umask()
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~umask)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~umask)


def write_text(path: Path, text: str, what: str) -> None:
    """Write ``text`` whole or not at all; a full disk or a vanished folder is a user error, and never
    leaves half a file under the final name."""
    try:
        with replaced_atomically(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
    except OSError as e:
        fail(f"cannot write {what} {path}: {e.strerror}")


def make_dir(path: Path, what: str = "output directory") -> Path:
    """``mkdir -p`` whose failure (a file in the way, no such device, no permission) is a user error."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        broken = next((p for p in (path, *path.parents) if broken_link(p)), None)
        why = f"{broken} is {broken_link(broken)}" if broken is not None else e.strerror
        fail(f"cannot create {what} {path}: {why}")
    return path


def missing_parents(path: Path) -> list[Path]:
    """The folders above ``path`` that do not exist yet, deepest first: what creating it with its parents makes,
    for :func:`remove_empty` to take back when the output fails."""
    return [parent for parent in path.absolute().parents if not (parent.exists() or parent.is_symlink())]


def remove_empty(folders: Sequence[Path]) -> None:
    """Remove the folders a failed output had created (:func:`missing_parents`), deepest first, as long as they are
    empty: ``-o new/deep/out`` left ``new/deep/`` behind after a failure, and a file put there meanwhile stays."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (something else was put there), or gone: what is above it stays too
            return


def _builder(marker: Path) -> str | None:
    """Who is still building the folder a marker belongs to (e.g. 'process 42'), or None when it has ended (an
    interrupted run: its leftovers may go). Two exports to one -o deleted each other's files.

    The builder holds a lock on its marker (:func:`_claim`), which ends with the process however it ends: a pid
    alone outlived it, and once the system gave the number to another process the leftovers were "being built"
    for good. Only where the file system has no locks is the pid all there is to go by."""
    text = marker.read_text(errors="replace").splitlines()
    pid = next((int(line[4:]) for line in text if line.startswith("pid ") and line[4:].strip().isdigit()), None)
    fd = os.open(marker, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return f"process {pid}" if pid is not None else "another process"
    except OSError as e:
        if e.errno not in _NO_LOCKS:
            raise
    else:
        return None
    finally:
        os.close(fd)
    if pid is None:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # alive, another user's
        return f"process {pid}"
    return f"process {pid}" if pid != os.getpid() else None


def _claim(work: Path) -> int:
    """Put the unfinished-work marker in ``work`` and hold a lock on it while the folder is built; the descriptor
    that holds it, for the caller to close once done. Written and locked under another name, then renamed: a
    marker seen unlocked is then always a dead builder's, never one about to be locked."""
    pending = work / f"{WORK_MARKER}.new"
    pending.write_text(f"an unfinished radtrt output; safe to delete\npid {os.getpid()}\n")
    fd = os.open(pending, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file in a new folder: no one else holds it
    except OSError as e:
        if e.errno not in _NO_LOCKS:  # without locks, the pid in it is what _builder goes by
            os.close(fd)
            raise
    try:
        pending.rename(work / WORK_MARKER)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _take_leftover(work: Path, out: Path) -> Path:
    """Move an interrupted run's ``OUT.partial`` into a fresh hidden folder beside it, for the caller to delete, and
    return that folder. Taken under its marker's lock and only if the marker is still the one locked: two reruns
    that both found it dead each deleted it, one of them the other's new build, which then ended with exit 0 and
    a manifest naming files no longer there."""
    marker = work / WORK_MARKER
    busy = f"another radtrt is building {out} right now; wait for it or choose another -o"
    builder = _builder(marker)
    if builder is not None:
        fail(f"another radtrt ({builder}) is building {out} right now; wait for it or choose another -o "
             f"(if none is running, delete {work})")
    try:
        fd = os.open(marker, os.O_RDONLY)
    except FileNotFoundError:  # another rerun took it meanwhile
        fail(busy)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a builder that has just claimed it, or another rerun taking it
            fail(busy)
        except OSError as e:
            if e.errno not in _NO_LOCKS:  # without locks, _builder's pid is all there is to go by
                raise
        try:
            same = os.stat(marker).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # taken and built anew while this run looked
            fail(busy)
        trash = Path(tempfile.mkdtemp(prefix=f".{work.name}.", suffix=".leftover", dir=work.parent))
        work.rename(trash / work.name)
    finally:
        os.close(fd)
    return trash


def check_buildable_aside(out: Path, what: str = "output directory") -> None:
    """What :func:`new_dir_built_aside` refuses, for callers to check before their slow work (a tokenizer
    trained, then refused for its -o)."""
    check_new_dir(out, what)
    if out.is_symlink() or os.path.ismount(out):  # neither can be replaced by the finished folder
        fail(f"{what} {out} is {'a symbolic link' if out.is_symlink() else 'a mount point'}; radtrt builds the "
             f"folder beside it and renames it into place: give a new folder inside it, e.g. {out / 'out'}")


def work_dir(out: Path) -> Path:
    """Where :func:`new_dir_built_aside` builds ``out``."""
    return out.with_name(out.name + ".partial")


def not_ours(work: Path) -> bool:
    """Whether something is at ``work`` (``OUT.partial``) that radtrt may not delete: anything but a folder
    holding radtrt's unfinished-work marker."""
    if not (work.is_symlink() or work.exists()):
        return False
    return not (work.is_dir() and not work.is_symlink() and (work / WORK_MARKER).is_file())


@contextlib.contextmanager
def new_dir_built_aside(out: Path, what: str = "output directory") -> Iterator[Path]:
    """Yield ``OUT.partial`` to fill, renamed to ``out`` (new or empty) only when the block ends without error:
    an interrupted or failed export never leaves a half-written folder under the name the user asked for."""
    check_buildable_aside(out, what)
    work = work_dir(out)
    if work.is_symlink() or work.exists():
        if not_ours(work):
            fail(f"{work} is in the way of the {what} (radtrt builds it there first); move it or choose another -o")
        shutil.rmtree(_take_leftover(work, out))  # what an interrupted run of radtrt left (its marker says so)
    made = missing_parents(work)
    make_dir(work.parent, f"{what}'s parent folder")
    try:
        work.mkdir()  # exclusive: a second radtrt that passed the checks above in the meantime stops here
    except FileExistsError:
        fail(f"another radtrt is building {out} right now ({work} appeared); wait for it or choose another -o")
    except OSError as e:
        remove_empty(made)
        fail(f"cannot create {what} work folder {work}: {e.strerror}")
    claim = -1  # held until the folder is in place: unlocked, a finished one was another run's leftovers
    try:
        try:
            claim = _claim(work)
            yield work
        except OSError as e:  # a full disk, a vanished folder: the user's to fix, and no traceback
            # numpy's tofile (inside torch's ONNX exporter) says only "problem writing element 1024 to file"; the
            # room is measured before the half-written folder goes (after, it was the room that folder had taken)
            room = "" if e.errno is not None or not out.parent.is_dir() else \
                f"; {shutil.disk_usage(out.parent).free / 1e6:.0f} MB free there"
            shutil.rmtree(work, ignore_errors=True)
            remove_empty(made)
            # a file outside the folder (one being read, say) is named: the failure need not be the output's
            elsewhere = f": {e.filename}" if e.filename and not Path(str(e.filename)).is_relative_to(work) else ""
            fail(f"{what} {out} was not written ({e.strerror or e}{elsewhere}{room}); nothing was left under that name")
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)  # the error itself goes on
            remove_empty(made)
            raise
        _share_like_new_files(work)
        # not cut in two by an interrupt: a complete folder with the unfinished-work marker inside, or one not yet
        # recorded as complete (what an interrupted command's last line names), would be taken for a half-built one
        with interrupts.deferred():
            try:
                if out.exists():  # the user's empty folder: its place, and its modes (a 0700 one became 0755)
                    os.chmod(work, stat.S_IMODE(out.stat().st_mode))
                    out.rmdir()
                work.rename(out)
            except OSError as e:  # e.g. a folder created in the meantime; the finished output stays where it is
                (work / WORK_MARKER).unlink(missing_ok=True)
                fail(f"cannot move the finished {what} into place at {out} ({e.strerror}); it is complete in {work}")
            (out / WORK_MARKER).unlink()
            interrupts.completed(what, out)
    finally:
        if claim >= 0:
            os.close(claim)
