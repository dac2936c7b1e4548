"""Long work stays visible in logs: without a terminal, progress is printed as lines."""

from __future__ import annotations

import io

from rich.console import Console
from rich.progress import Progress

from radtrt.progress import LineProgress, make_progress


def _log_console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, force_terminal=False, width=200), buf


def test_a_log_gets_lines_for_start_tenths_renames_and_fields() -> None:
    console, buf = _log_console()
    assert isinstance(make_progress(console=console), LineProgress)
    with LineProgress(console, quiet_seconds=0) as progress:
        task = progress.add_task("collecting statistics", total=20, loss=float("nan"))
        for i in range(20):
            progress.update(task, advance=1, loss=1.0 / (i + 1))
        other = progress.add_task("export", total=None)
        progress.update(other, description="exporting vision.onnx")
        progress.update(other, description="exporting vision.onnx")  # unchanged: no new line
        progress.update(other, description="exporting decoder.onnx")
    lines = buf.getvalue().splitlines()
    stats = [line for line in lines if line.startswith("collecting statistics")]
    assert stats[0].startswith("collecting statistics 0/20  loss nan")
    assert len(stats) == 11 and stats[-1].startswith("collecting statistics 20/20  loss 0.05")
    assert [line.split("  [")[0] for line in lines[11:]] == ["export", "exporting vision.onnx", "exporting decoder.onnx"]


def test_training_progress_shows_no_loss_before_its_first_step() -> None:
    """'stage2 0/1  loss nan  lr 0  sps 0' was printed before any step ran, as a log line and on the live bar: a
    NaN loss is what a diverged run stops for."""
    from radtrt.training.loop import _progress

    console, buf = _log_console()
    assert isinstance(_progress(console), LineProgress)
    with LineProgress(console, quiet_seconds=0) as progress:
        task = progress.add_task("stage2", total=2, completed=0, loss=None, lr=None, sps=None)
        progress.update(task, completed=1, loss=0.5, lr=1e-4, sps=3.0)
    first, second = buf.getvalue().splitlines()[:2]
    assert first.startswith("stage2 0/2  [") and "nan" not in first
    assert second.startswith("stage2 1/2  loss 0.5  lr 0.0001  sps 3  [")
    live = io.StringIO()
    with _progress(Console(file=live, force_terminal=True, width=200)) as progress:
        task = progress.add_task("stage2", total=2, completed=0, loss=None, lr=None, sps=None)
        progress.refresh()
        assert "loss" not in live.getvalue() and "nan" not in live.getvalue()
        progress.update(task, completed=1, loss=0.5, lr=1e-4, sps=3.0)
        progress.refresh()
    assert "loss 0.5000  lr 1.00e-04  3.0 samples/s" in live.getvalue()


def test_a_terminal_gets_rich_live_bars_and_disable_prints_nothing() -> None:
    assert isinstance(make_progress(console=Console(file=io.StringIO(), force_terminal=True)), Progress)
    console, buf = _log_console()
    with make_progress(console=console, disable=True) as progress:
        progress.advance(progress.add_task("quiet", total=3))
    assert buf.getvalue() == ""


def test_quick_failures_print_only_their_error_and_quick_successes_their_last_lines() -> None:
    console, buf = _log_console()
    try:
        with LineProgress(console, quiet_seconds=60) as progress:
            progress.add_task("reading studies", total=4)
            raise RuntimeError("bad input")
    except RuntimeError:
        pass
    assert buf.getvalue() == ""  # the caller's one error line stays the only line
    with LineProgress(console, quiet_seconds=60) as progress:
        first = progress.add_task("reading studies", total=4)
        progress.update(first, advance=4)
        second = progress.add_task("export", total=None)
        progress.update(second, description="exporting decoder.onnx")
    lines = [line.split("  [")[0] for line in buf.getvalue().splitlines()]
    assert lines == ["reading studies 4/4", "exporting decoder.onnx"]


def test_held_lines_appear_when_the_quiet_window_ends_while_work_runs() -> None:
    import time

    console, buf = _log_console()
    with LineProgress(console, quiet_seconds=0.05) as progress:
        progress.add_task("exporting vision.onnx", total=None)
        deadline = time.monotonic() + 5
        while not buf.getvalue() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert buf.getvalue().startswith("exporting vision.onnx")


def test_a_task_that_advances_gets_a_line_at_least_every_heartbeat() -> None:
    """A tenth of a long training run can be an hour: the log looked hung in between."""
    import time

    console, buf = _log_console()
    with LineProgress(console, quiet_seconds=0, heartbeat_seconds=0.05) as progress:
        task = progress.add_task("stage2", total=1000, loss=1.0)
        progress.update(task, completed=1)  # within the heartbeat, no tenth reached: no line
        time.sleep(0.06)
        progress.update(task, completed=1)  # a heartbeat later, with progress since the last line
        progress.update(task, completed=2, loss=0.5)  # within the heartbeat again
        time.sleep(0.06)
        progress.update(task, completed=2, loss=0.5)
        time.sleep(0.06)
        progress.update(task, completed=2, loss=0.5)  # no progress since the last line: no line
    lines = [line.split("  [")[0] for line in buf.getvalue().splitlines()]
    assert lines == ["stage2 0/1000  loss 1", "stage2 1/1000  loss 1", "stage2 2/1000  loss 0.5"]


def test_a_stderr_that_cannot_take_progress_stops_the_lines_not_the_work() -> None:
    """Progress through rich into a full disk (2>/dev/full) raised an error, and into a reader gone (2>&1 | head) a
    SystemExit: either removed the output nearly built. Progress is a courtesy."""
    for error in (OSError(28, "No space left on device"), BrokenPipeError(32, "Broken pipe")):
        class Failing(io.StringIO):
            def write(self, text: str) -> int:
                raise error

        console = Console(file=Failing(), force_terminal=False, width=200)
        with LineProgress(console, quiet_seconds=0) as progress:
            task = progress.add_task("writing phantoms", total=10)
            for _ in range(10):
                progress.advance(task)
        assert progress.disable  # no more attempts once one failed


def test_a_task_added_after_one_is_removed_gets_an_id_of_its_own() -> None:
    """Ids were len(tasks): after a removal the next task got a live task's id, and updating one moved the other."""
    console, buf = _log_console()
    with LineProgress(console, quiet_seconds=0) as progress:
        first = progress.add_task("a", total=10)
        second = progress.add_task("b", total=10)
        progress.remove_task(first)
        third = progress.add_task("c", total=10)
        assert len({first, second, third}) == 3
        progress.update(second, completed=10)
    assert any(line.startswith("b 10/10") for line in buf.getvalue().splitlines())
    assert not any(line.startswith("c 10/10") for line in buf.getvalue().splitlines())


def test_a_quiet_console_gets_no_lines() -> None:
    """Phantoms written for calibration report on a quiet console inside calibrate's own progress display."""
    buf = io.StringIO()
    with LineProgress(Console(file=buf, force_terminal=False, quiet=True), quiet_seconds=0) as progress:
        task = progress.add_task("writing phantoms", total=4)
        for _ in range(4):
            progress.advance(task)
    assert buf.getvalue() == ""
