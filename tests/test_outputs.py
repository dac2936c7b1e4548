"""Output writing never touches a user's file: fresh temporary names, and a build folder radtrt can prove is its own."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from radtrt.errors import RadtrtError
from radtrt.model.io import load_tensors, save_tensors
from radtrt.outputs import WORK_MARKER, check_creatable, check_file_target, check_new_dir, new_dir_built_aside, write_text


def test_atomic_writes_leave_a_users_partial_file_alone(tmp_path: Path) -> None:
    """'calibrate -o c.safetensors' wrote through c.safetensors.partial and renamed it: a user's file of that
    name was destroyed."""
    for name in ("c.safetensors.partial", "r.md.partial"):
        (tmp_path / name).write_text("precious")
    save_tensors({"x": torch.ones(2)}, tmp_path / "c.safetensors")
    write_text(tmp_path / "r.md", "# report", "report")
    assert torch.equal(load_tensors(tmp_path / "c.safetensors")["x"], torch.ones(2))
    assert (tmp_path / "r.md").read_text() == "# report"
    assert all((tmp_path / n).read_text() == "precious" for n in ("c.safetensors.partial", "r.md.partial"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors", "c.safetensors.partial", "r.md",
                                                          "r.md.partial"]  # no temporary file left
    assert (tmp_path / "r.md").stat().st_mode & 0o044  # readable by others as umask allows, not mkstemp's 0600


def test_a_link_as_output_file_stays_and_its_target_is_replaced(tmp_path: Path) -> None:
    """'eval -o LINK' replaced the link with a file and left the old results at its target."""
    (tmp_path / "runs").mkdir()
    target = tmp_path / "runs" / "results.json"
    target.write_text("old")
    (tmp_path / "latest.json").symlink_to(target)
    write_text(tmp_path / "latest.json", "new", "results file")
    assert (tmp_path / "latest.json").is_symlink() and target.read_text() == "new"
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["results.json"]


def test_a_named_pipe_as_output_file_is_refused_and_stays_a_pipe(tmp_path: Path) -> None:
    """'eval -o /dev/null' (or a FIFO) renamed a regular file over the device: as root, /dev/null was gone for
    the whole machine."""
    import os
    import stat

    fifo = tmp_path / "results.fifo"
    os.mkfifo(fifo)
    with pytest.raises(RadtrtError, match="is not a regular file"):
        check_file_target(fifo, "results file")  # before the work
    with pytest.raises(RadtrtError, match="is not a regular file"):
        write_text(fifo, "{}", "results file")  # and where every output is written
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    assert [p.name for p in tmp_path.iterdir()] == ["results.fifo"]


def test_build_folder_that_is_not_radtrts_is_refused(tmp_path: Path) -> None:
    """'export -o OUT' deleted a user's folder named OUT.partial (say, the model being exported)."""
    user = tmp_path / "out.partial"
    user.mkdir()
    (user / "model.safetensors").write_text("weights")
    with pytest.raises(RadtrtError, match="out.partial is in the way"):
        with new_dir_built_aside(tmp_path / "out"):
            pass
    assert (user / "model.safetensors").read_text() == "weights" and not (tmp_path / "out").exists()
    (tmp_path / "f.partial").write_text("x")
    with pytest.raises(RadtrtError, match="in the way"):  # a file there was a NotADirectoryError traceback
        with new_dir_built_aside(tmp_path / "f"):
            pass


def test_build_folder_left_by_an_interrupted_run_is_replaced(tmp_path: Path) -> None:
    left = tmp_path / "out.partial"
    left.mkdir()
    (left / WORK_MARKER).write_text("")
    (left / "half.onnx").write_text("x")
    with new_dir_built_aside(tmp_path / "out") as work:
        assert work == left and not (work / "half.onnx").exists()
        (work / "manifest.json").write_text("{}")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["manifest.json"] and not left.exists()
    with pytest.raises(ValueError):
        with new_dir_built_aside(tmp_path / "out2"):
            raise ValueError("export failed")
    assert not (tmp_path / "out2").exists() and not (tmp_path / "out2.partial").exists()
    with pytest.raises(RadtrtError, match=r"\(problem writing element 1024 to file; \d+ MB free there\); nothing"):
        with new_dir_built_aside(tmp_path / "out3"):  # numpy's full-disk error, without an errno
            raise OSError("problem writing element 1024 to file")


def test_a_failed_output_takes_back_the_parent_folders_it_made(tmp_path: Path) -> None:
    """'-o new/deep/out' that failed left new/deep/ behind, empty; a folder that was there before, or one that
    something else was put in meanwhile, stays."""
    with pytest.raises(ValueError):
        with new_dir_built_aside(tmp_path / "new" / "deep" / "out"):
            raise ValueError("export failed")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RadtrtError, match="was not written"):
        with new_dir_built_aside(tmp_path / "new" / "deep" / "out"):
            (tmp_path / "new" / "notes.txt").write_text("the user's")
            raise OSError(28, "No space left on device")
    assert [p.name for p in tmp_path.rglob("*")] == ["new", "notes.txt"]
    (tmp_path / "new" / "notes.txt").unlink()
    with new_dir_built_aside(tmp_path / "new" / "deep" / "out") as work:  # a success keeps them, of course
        (work / "manifest.json").write_text("{}")
    assert (tmp_path / "new" / "deep" / "out" / "manifest.json").is_file()


def test_outputs_are_readable_by_others_as_the_umask_allows(tmp_path: Path) -> None:
    """safetensors renames its own temporary file over ours, and quantizers write through mkstemp: bundles
    came out 0600, unreadable by a Triton server running as another user."""
    import os
    import tempfile

    old = os.umask(0o022)
    try:
        save_tensors({"x": torch.ones(2)}, tmp_path / "c.safetensors")
        assert (tmp_path / "c.safetensors").stat().st_mode & 0o777 == 0o644
        with new_dir_built_aside(tmp_path / "out") as work:
            fd, _ = tempfile.mkstemp(dir=work)  # 0600, as ONNX Runtime's quantizer leaves its data file
            os.close(fd)
            (work / "sub").mkdir(mode=0o700)
        modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").rglob("*")}
        assert modes.pop("sub") == 0o755 and set(modes.values()) == {0o644}
    finally:
        os.umask(old)


def test_a_symlink_or_mount_point_as_output_folder_is_refused_up_front(tmp_path: Path) -> None:
    """The finished folder cannot be renamed onto either: the export ended in a traceback after all its
    work, leaving a complete bundle under OUT.partial that blocked every rerun."""
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    ran = []
    with pytest.raises(RadtrtError, match="is a symbolic link.*give a new folder inside it"):
        with new_dir_built_aside(tmp_path / "link"):
            ran.append(True)
    assert not ran and not (tmp_path / "link.partial").exists()


def test_sigterm_removes_what_was_half_built(tmp_path: Path) -> None:
    """'timeout' or a scheduler's kill left OUT.partial (at 7B, gigabytes of fp32 graphs) behind."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "set"
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from radtrt.cli import main; sys.argv[0] = 'radtrt'; "
                             "main()", "data", "phantoms", "-o", str(out), "--n", "5000", "--rows", "64", "--cols", "64",
                             "--formats", "png"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (tmp_path / "set.partial" / "png").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode != 0 and not out.exists() and not (tmp_path / "set.partial").exists()


def test_a_folder_another_live_radtrt_is_building_is_left_alone(tmp_path: Path) -> None:
    """A second export to the same -o deleted the first one's OUT.partial while it was being written."""
    import subprocess
    import sys

    work = tmp_path / "out.partial"
    work.mkdir()
    marker = work / WORK_MARKER
    (work / "decoder.onnx").write_text("being written")
    # a builder holds its marker's lock for as long as it builds (what outputs._claim does)
    holder = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX); "
              "print('locked', flush=True); time.sleep(60)")
    builder = subprocess.Popen([sys.executable, "-c", holder, str(marker)], stdout=subprocess.PIPE, text=True)
    try:
        marker.write_text(f"an unfinished radtrt output; safe to delete\npid {builder.pid}\n")
        assert builder.stdout is not None and builder.stdout.readline() == "locked\n"
        with pytest.raises(RadtrtError, match=f"another radtrt \\(process {builder.pid}\\) is building"):
            with new_dir_built_aside(tmp_path / "out"):
                pass
        assert (work / "decoder.onnx").is_file()
    finally:
        builder.kill()
        builder.wait()
    with new_dir_built_aside(tmp_path / "out") as fresh:  # the process has ended: its leftovers go
        assert not (fresh / "decoder.onnx").exists()


def test_leftovers_whose_pid_was_given_to_another_process_are_replaced(tmp_path: Path) -> None:
    """The marker's pid alone was the test of a live builder: once the system gave that number to another process
    (after a reboot, say), 'another radtrt (process N) is building OUT' refused every rerun for good."""
    import subprocess
    import sys

    unrelated = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        work = tmp_path / "out.partial"
        work.mkdir()
        (work / WORK_MARKER).write_text(f"an unfinished radtrt output; safe to delete\npid {unrelated.pid}\n")
        (work / "half.onnx").write_text("x")
        with new_dir_built_aside(tmp_path / "out") as fresh:
            assert not (fresh / "half.onnx").exists()
            with pytest.raises(RadtrtError, match=f"another radtrt \\(process {os.getpid()}\\) is building"):
                with new_dir_built_aside(tmp_path / "out"):  # while this one builds, its lock keeps others out
                    pass
        assert (tmp_path / "out").is_dir() and not (tmp_path / "out" / WORK_MARKER).exists()
    finally:
        unrelated.kill()
        unrelated.wait()


@pytest.mark.parametrize("name", [".", "", ".."])
def test_the_current_folder_is_not_an_output_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """``-o .`` in an empty folder passed, then ``Path('.').with_name`` crashed (after loading the model); built
    aside and renamed into place, the shell's own folder would have been replaced under it."""
    here = tmp_path / "parent" / "empty"
    here.mkdir(parents=True)
    monkeypatch.chdir(here)
    with pytest.raises(RadtrtError, match="is the current folder or one above it"):
        check_new_dir(Path(name))
    check_new_dir(Path("out"))  # a new folder inside it is fine


def test_atomic_writes_reach_the_disk_before_the_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an fsync before the rename, a power cut soon after could leave the final name on an empty file."""
    import radtrt.outputs as outputs_module

    synced: list[str] = []
    real_fsync = outputs_module.os.fsync

    def fsync(fd: int) -> None:
        synced.append(Path(f"/proc/self/fd/{fd}").resolve().name)
        real_fsync(fd)

    monkeypatch.setattr(outputs_module.os, "fsync", fsync)
    write_text(tmp_path / "r.md", "# report", "report")
    assert len(synced) == 1 and synced[0].startswith(".r.md.") and synced[0].endswith(".partial")


def test_a_full_disk_while_building_a_folder_is_one_line_and_leaves_nothing(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """An OSError inside the block (or writing the marker) was a traceback."""
    with pytest.raises(RadtrtError, match="model folder .*out was not written \\(No space left on device\\)"):
        with new_dir_built_aside(tmp_path / "out", "model folder"):
            raise OSError(28, "No space left on device")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="a bug"):  # not the user's: it goes on as it was
        with new_dir_built_aside(tmp_path / "out"):
            raise ValueError("a bug")
    assert list(tmp_path.iterdir()) == []
    source = tmp_path / "gone.onnx"  # a file read into the output, vanished meanwhile: named, not blamed on -o
    with pytest.raises(RadtrtError, match=f"was not written \\(No such file or directory: {source}\\)"):
        with new_dir_built_aside(tmp_path / "out"):
            source.read_bytes()
    assert list(tmp_path.iterdir()) == []
    real_write_text = Path.write_text

    def full_disk(self: Path, *args: object, **kwargs: object) -> int:
        if self.name.startswith(WORK_MARKER):  # written as WORK_MARKER.new, then renamed
            raise OSError(28, "No space left on device")
        return real_write_text(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(RadtrtError, match="output directory .*out was not written \\(No space left on device\\)"):
        with new_dir_built_aside(tmp_path / "out"):
            pass
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc")
def test_a_folder_that_takes_no_files_is_named_so() -> None:
    """/proc refuses new files with ENOENT: 'not writable (No such file or directory)' read as a contradiction."""
    from radtrt.outputs import check_folder_target

    with pytest.raises(RadtrtError, match="cannot write SR folder /proc/sr: /proc takes no new files"):
        check_folder_target(Path("/proc/sr"), "SR folder")


def test_a_work_folder_made_after_the_checks_is_not_shared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two builders that both passed the checks shared one OUT.partial (made with exist_ok): the second's clean-up
    deleted the first's half-built folder."""
    import radtrt.outputs as outputs

    made = outputs.make_dir

    def racing(path: Path, what: str = "output directory") -> Path:
        (tmp_path / "out.partial").mkdir(exist_ok=True)  # the other builder, between the checks and our mkdir
        return made(path, what)

    monkeypatch.setattr(outputs, "make_dir", racing)
    with pytest.raises(RadtrtError, match="another radtrt is building .*out right now"):
        with new_dir_built_aside(tmp_path / "out"):
            pass
    assert (tmp_path / "out.partial").is_dir() and not (tmp_path / "out").exists()


def test_a_symbolic_link_loop_in_an_output_path_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """convert/export/data phantoms -o loop/x was a RuntimeError traceback; bench/calibrate said 'File exists'."""
    from radtrt.outputs import make_dir, resolved

    monkeypatch.chdir(tmp_path)
    Path("loop").symlink_to("loop")
    with pytest.raises(RadtrtError, match="cannot write output directory loop/x: .*loop is a symbolic link loop"):
        check_new_dir(Path("loop/x"))
    with pytest.raises(RadtrtError, match="cannot follow the path loop"):
        resolved(Path("loop"))
    with pytest.raises(RadtrtError, match="cannot create report folder loop: loop is a symbolic link loop"):
        make_dir(Path("loop"), "report folder")
    Path("dangling").symlink_to("gone")
    for path, what in ((Path("loop/c.safetensors"), "loop is a symbolic link loop"),
                       (Path("dangling/x/c.safetensors"), "dangling is a symbolic link to a missing target"),
                       (Path("dangling"), "it is a symbolic link to a missing target")):
        with pytest.raises(RadtrtError, match=what):  # passed as 'not there yet': failed after the work
            check_creatable(path, "calibration file")


def test_a_json_file_that_is_a_folder_or_a_dangling_link_is_said_so(tmp_path: Path) -> None:
    """Both were 'missing file'."""
    from radtrt.model.io import read_json

    (tmp_path / "config.json").mkdir()
    with pytest.raises(RadtrtError, match="config.json is not a file"):
        read_json(tmp_path / "config.json")
    (tmp_path / "other.json").symlink_to(tmp_path / "gone")
    with pytest.raises(RadtrtError, match="other.json is a symbolic link to a missing target"):
        read_json(tmp_path / "other.json")


def test_a_report_set_is_not_split_by_an_interrupt_between_its_renames(tmp_path: Path, monkeypatch) -> None:
    """A Ctrl-C after the Markdown's rename and before the JSON's left this run's Markdown beside the last run's
    JSON: the renames now run with interrupts deferred, and the interrupt lands once the set is in place."""
    import os
    import signal

    from radtrt import interrupts
    from radtrt.outputs import replaced_together

    md, js = tmp_path / "r.md", tmp_path / "r.json"
    md.write_text("old"), js.write_text("old")
    replace = Path.replace
    calls: list[Path] = []

    def interrupted_replace(self: Path, target: Path) -> Path:
        calls.append(self)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)  # pressed just as the first file goes into place
        return replace(self, target)

    monkeypatch.setattr(Path, "replace", interrupted_replace)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    interrupts.install()
    try:
        with pytest.raises(KeyboardInterrupt):
            with replaced_together([md, js]) as (md_tmp, js_tmp):
                md_tmp.write_text("new")
                js_tmp.write_text("new")
    finally:
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGTERM, before[1])
    assert md.read_text() == js.read_text() == "new" and len(calls) == 2


def test_a_file_left_out_of_a_set_removes_a_link_not_what_it_names(tmp_path: Path) -> None:
    """bench parity (no chart) over a report whose PNG was a link deleted the user's file it named, and the dangling
    link then refused the next bench run. The link goes; the file stays; a written file still goes through it."""
    from radtrt.outputs import write_set

    real = tmp_path / "real"
    real.mkdir()
    (real / "r.png").write_text("chart"), (real / "r.md").write_text("old")
    (tmp_path / "r.png").symlink_to(real / "r.png")
    (tmp_path / "r.md").symlink_to(real / "r.md")
    written = write_set([(tmp_path / "r.md", lambda tmp: tmp.write_text("new")),
                         (tmp_path / "r.png", lambda tmp: False)], "report")
    assert written == [tmp_path / "r.md"]
    assert not (tmp_path / "r.png").is_symlink() and (real / "r.png").read_text() == "chart"
    assert (tmp_path / "r.md").is_symlink() and (real / "r.md").read_text() == "new"


@pytest.mark.parametrize("errno_name", ["EPERM", "EOPNOTSUPP", "ENOSYS"])
def test_a_new_file_on_a_file_system_without_hard_links_is_still_saved(tmp_path: Path, monkeypatch,
                                                                       errno_name: str) -> None:
    """FAT, some shares and FUSE mounts (ENOSYS) have no hard links: the calibration file was lost after all its
    work. The check that the name is free is then made just before the rename."""
    import errno
    import os

    from radtrt.outputs import replaced_atomically

    def no_links(src: object, dst: object) -> None:
        raise OSError(getattr(errno, errno_name), os.strerror(getattr(errno, errno_name)))

    monkeypatch.setattr(os, "link", no_links)
    out = tmp_path / "cal.safetensors"
    with replaced_atomically(out, new="calibration file") as tmp:
        tmp.write_text("data")
    assert out.read_text() == "data" and [p.name for p in tmp_path.iterdir()] == ["cal.safetensors"]
    with pytest.raises(RadtrtError, match="was written by another run meanwhile"):
        with replaced_atomically(out, new="calibration file") as tmp:
            tmp.write_text("other")
    assert out.read_text() == "data" and [p.name for p in tmp_path.iterdir()] == ["cal.safetensors"]


def test_an_interrupt_names_only_finished_outputs_that_are_still_there(tmp_path: Path, capsys, monkeypatch) -> None:
    """A temporary phantom folder (calibrate --data phantom) was named complete after it had been removed."""
    from radtrt import interrupts

    monkeypatch.setattr(interrupts, "_complete", [])
    monkeypatch.setattr(interrupts, "_explained", False)
    (tmp_path / "bundle").mkdir()
    interrupts.completed("phantom folder", tmp_path / "gone")
    interrupts.completed("bundle directory", tmp_path / "bundle")
    interrupts.report()
    err = capsys.readouterr().err
    assert f"bundle directory {tmp_path / 'bundle'} is complete" in err and "gone" not in err, err


def test_a_users_empty_folder_keeps_its_modes(tmp_path: Path) -> None:
    """The output replaced the user's empty -o folder with one of default modes: a 0700 folder became 0755."""
    from radtrt.outputs import _umask

    out = tmp_path / "private"
    out.mkdir(mode=0o700)
    out.chmod(0o700)
    with new_dir_built_aside(out) as work:
        (work / "report.md").write_text("x")
    assert (out / "report.md").read_text() == "x" and (out.stat().st_mode & 0o777) == 0o700
    with new_dir_built_aside(tmp_path / "new") as work:  # a new one: as mkdir makes it
        (work / "a").write_text("y")
    assert ((tmp_path / "new").stat().st_mode & 0o777) == 0o777 & ~_umask()


def test_a_rerun_never_deletes_a_build_another_rerun_has_just_started(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Two reruns found an interrupted run's OUT.partial dead; the slower one deleted the folder the faster one had
    just made and claimed, which then ended with exit 0 and a manifest naming files that were gone."""
    from radtrt import outputs

    out = tmp_path / "out"
    work = outputs.work_dir(out)
    work.mkdir()
    claim = outputs._claim(work)  # the faster rerun, building now
    (work / "new").write_text("being built")
    monkeypatch.setattr(outputs, "_builder", lambda marker: None)  # the slower one looked while the leftover was dead
    try:
        with pytest.raises(RadtrtError, match="another radtrt is building .* right now"):
            with new_dir_built_aside(out):
                pass
        assert (work / "new").read_text() == "being built"
    finally:
        os.close(claim)
    monkeypatch.undo()
    with new_dir_built_aside(out) as fresh:  # once the builder is gone, its leftover goes
        (fresh / "done").write_text("y")
    assert sorted(p.name for p in out.iterdir()) == ["done"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no leftover folder beside it
