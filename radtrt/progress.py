"""Progress display for long work: rich's live bars on a terminal, plain lines everywhere else.

Rich draws nothing while a live display runs on a console that is not a terminal (a CI log, ``nohup``,
``2> export.log``): a 20-minute INT8 export or a training run would look hung until it ended.
``LineProgress`` takes the same calls (the subset of ``rich.progress.Progress`` this package uses) and
prints one line when a task starts or changes description, at every tenth of a known total, when it
completes, and, while it advances, at least every ``HEARTBEAT_SECONDS`` (a tenth of a long training run
can be an hour), with its fields (loss, lr, ...) and the elapsed time.

Nothing is printed during the first ``QUIET_SECONDS``: a command that fails on bad input at once
still says so in one line on stderr. Lines due in that window are held (the latest per task), printed
when it ends if the work is still running, or at a normal exit; an error drops them.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from rich.console import Console
from rich.progress import Progress, ProgressColumn
from rich.text import Text

from radtrt.errors import printable

STEPS = 10  # lines per task with a known total
QUIET_SECONDS = 2.0
HEARTBEAT_SECONDS = 300.0


def plain(text: str) -> Text:
    """A line for a rich console or status taken as it is: a file or model name holding ``[/red]`` was read as
    markup (a MarkupError traceback), and a newline or escape sequence in it reached the terminal."""
    return Text(printable(text))


def progress_callback(progress: Any, text: str, total: int) -> Callable[[int], None] | None:
    """A new task on ``progress`` (None: no display) and the callback that reports how much of it is done."""
    if progress is None:
        return None
    task = progress.add_task(text, total=total)
    return lambda done: progress.update(task, completed=done)


def make_progress(*columns: str | ProgressColumn, console: Console, transient: bool = False,
                  disable: bool = False) -> Progress | LineProgress:
    """A live ``Progress`` on a terminal, a ``LineProgress`` otherwise (same calls)."""
    if console.is_terminal:
        return Progress(*columns, console=console, transient=transient, disable=disable)
    return LineProgress(console, disable=disable)


@dataclass
class _Task:
    description: str
    total: float | None
    completed: float
    fields: dict[str, Any]
    started: float = field(default_factory=time.perf_counter)
    reported: int = -1  # last tenth of the total printed
    finished: bool = False
    last_line: float = field(default_factory=time.perf_counter)  # when the task's last line was due
    last_completed: float = 0  # its progress then


class LineProgress:
    def __init__(self, console: Console, *, disable: bool = False, quiet_seconds: float = QUIET_SECONDS,
                 heartbeat_seconds: float = HEARTBEAT_SECONDS) -> None:
        self.console = console
        self.disable = disable
        self.heartbeat_seconds = heartbeat_seconds
        self._tasks: dict[int, _Task] = {}
        self._ids = itertools.count()
        self._held: dict[int, str] = {}  # task -> its latest line, during the quiet window
        self._lock = threading.Lock()
        self._quiet_until = time.perf_counter() + quiet_seconds
        self._timer: threading.Timer | None = None
        if quiet_seconds > 0 and not disable:
            self._timer = threading.Timer(quiet_seconds, self._release)
            self._timer.daemon = True
            self._timer.start()

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if self._timer is not None:
            self._timer.cancel()
        with self._lock:
            held, self._held = self._held, {}
            self._quiet_until = 0.0
        if exc_type is None:
            for line in held.values():
                self._print(line)

    def _release(self) -> None:
        with self._lock:
            held, self._held = self._held, {}
            self._quiet_until = 0.0
            for line in held.values():
                self._print(line)

    def _print(self, line: str) -> None:
        """One progress line, a courtesy: a stderr that cannot take it (a full disk, ``2>&1 | head`` gone) stops the
        lines, not the work. Through rich, a broken pipe raised SystemExit and a full disk an error, and the output
        nearly built was removed."""
        if self.disable or self.console.quiet:  # quiet: a progress inside another's display (phantoms calibrating)
            return
        try:
            self.console.file.write(line + "\n")
            self.console.file.flush()
        except (OSError, ValueError):  # ValueError: a stream closed under us
            self.disable = True

    def add_task(self, description: str, total: float | None = 100.0, *, start: bool = True, completed: float = 0,
                 visible: bool = True, **fields: Any) -> int:
        task_id = next(self._ids)  # not len(): a task removed would give the next one a live task's id
        self._tasks[task_id] = _Task(description, total, completed, fields)
        self._report(task_id, force=True)
        return task_id

    def update(self, task_id: int, *, total: float | None = None, completed: float | None = None,
               advance: float | None = None, description: str | None = None, visible: bool | None = None,
               refresh: bool = False, **fields: Any) -> None:
        task = self._tasks[task_id]
        renamed = description is not None and description != task.description
        if description is not None:
            task.description = description
        if total is not None:
            task.total = total
        if completed is not None:
            task.completed = completed
        if advance is not None:
            task.completed += advance
        task.fields.update(fields)
        self._report(task_id, force=renamed)

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def remove_task(self, task_id: int) -> None:
        self._tasks.pop(task_id, None)

    def _report(self, task_id: int, *, force: bool) -> None:
        task = self._tasks[task_id]
        if self.disable or task.finished:
            return
        tenth = int(STEPS * task.completed / task.total) if task.total else -1
        now = time.perf_counter()
        beat = task.completed != task.last_completed and now - task.last_line >= self.heartbeat_seconds
        if not force and tenth <= task.reported and not beat:
            return
        task.reported = max(task.reported, tenth)
        task.last_line, task.last_completed = now, task.completed
        task.finished = bool(task.total) and task.completed >= task.total
        count = f" {task.completed:g}/{task.total:g}" if task.total else ""
        extras = "".join(f"  {k} {_fmt(v)}" for k, v in task.fields.items() if v is not None)  # None: none yet
        line = f"{task.description}{count}{extras}  [{time.perf_counter() - task.started:.0f} s]"
        with self._lock:
            if time.perf_counter() < self._quiet_until:
                self._held.pop(task_id, None)
                self._held[task_id] = line  # re-inserted: held lines keep the order they were last due in
                return
        self._print(line)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
