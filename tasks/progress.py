"""Progress bars on the terminal for `curate run`: one bar per step, in shards and samples.

Shown only when a person is watching: stdout is a terminal and no CI variable is set. On a
pipe, under cron, in CI or on a Prefect worker nothing is printed, so logs and the last
line of stdout (`run: <run directory>`) stay as they are.

The API the flow calls (every method is a no-op when the display is off):

    progress = TerminalProgress.start(enabled=None)   # None: auto (terminal only)
    progress.add_step("check", total_shards=12, total_samples=24_000)
    progress.add_step("check", total_shards=13)        # again: totals grow as listing goes
    progress.advance("check", shards=1, samples=2_000)
    progress.close()                                   # or `with TerminalProgress.start():`

Each bar shows the step, shards done of total, samples done of total, samples per second
and the time left. A total left as None shows as unknown (the bar pulses) until it is set.
"""

from __future__ import annotations

import os
import sys
import threading
from types import TracebackType
from typing import IO, Any

# Set by CI services (GitHub Actions, GitLab, Jenkins, ...): no one watches a bar there.
CI_VARIABLES = ("CI", "BUILD_NUMBER", "JENKINS_URL", "GITHUB_ACTIONS")


def wanted(stream: IO[str]) -> bool:
    """Whether a display belongs on `stream`: a terminal, outside CI, not a dumb one."""
    try:
        terminal = stream.isatty()
    except (AttributeError, ValueError):
        return False
    return (
        terminal
        and os.environ.get("TERM") != "dumb"
        and not any(os.environ.get(name) for name in CI_VARIABLES)
    )


class TerminalProgress:
    """Per-step progress bars (rich), or nothing when disabled."""

    def __init__(self, progress: Any | None) -> None:
        self._progress = progress
        self._tasks: dict[str, Any] = {}  # step name -> rich task id
        self._shards: dict[str, int] = {}  # step name -> shards done
        self._lock = threading.Lock()

    @classmethod
    def start(cls, enabled: bool | None = None, stream: IO[str] | None = None) -> TerminalProgress:
        """Start the display on `stream` (stdout). `enabled=None` decides by `wanted`;
        False turns it off; True forces it on (off a terminal the bars are printed once,
        without colour, when the display is closed)."""
        stream = stream or sys.stdout
        if enabled is None:
            enabled = wanted(stream)
        if not enabled:
            return cls(None)
        from rich.console import Console
        from rich.progress import Progress

        progress = Progress(
            *_columns(), console=Console(file=stream), refresh_per_second=4, transient=False
        )
        progress.start()
        return cls(progress)

    @property
    def enabled(self) -> bool:
        return self._progress is not None

    def add_step(
        self, name: str, total_shards: int | None = None, total_samples: int | None = None
    ) -> None:
        """Add a bar for step `name`, or update the totals of its bar."""
        if self._progress is None:
            return
        with self._lock:
            if name not in self._tasks:
                self._tasks[name] = self._progress.add_task(
                    name, total=total_samples, shards=0, total_shards=total_shards
                )
                self._shards[name] = 0
                return
            task = self._tasks[name]
            if total_shards is not None:
                self._progress.update(task, total_shards=total_shards)
            if total_samples is not None:
                self._progress.update(task, total=total_samples)

    def advance(self, name: str, shards: int = 1, samples: int = 0) -> None:
        """Count `shards` and `samples` as done for step `name` (added if new)."""
        if self._progress is None:
            return
        if name not in self._tasks:
            self.add_step(name)
        with self._lock:
            task = self._tasks[name]
            self._shards[name] += shards
            self._progress.update(task, advance=samples, shards=self._shards[name])

    def close(self) -> None:
        """Draw the bars a last time and give the terminal back."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def __enter__(self) -> TerminalProgress:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _columns() -> list[Any]:
    """Step, bar, percent, shards, samples, rate, time left."""
    from rich.progress import (
        BarColumn,
        ProgressColumn,
        Task,
        TaskProgressColumn,
        TextColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class Counts(ProgressColumn):
        def render(self, task: Task) -> Text:
            shards, total = task.fields["shards"], task.fields["total_shards"]
            samples = "?" if task.total is None else f"{task.total:,.0f}"
            return Text(
                f"{shards:,}/{'?' if total is None else f'{total:,}'} shards  "
                f"{task.completed:,.0f}/{samples} samples"
            )

    class Rate(ProgressColumn):
        def render(self, task: Task) -> Text:
            speed = task.finished_speed or task.speed
            return Text("" if speed is None else f"{speed:,.0f} samples/s")

    return [
        TextColumn("[bold]{task.description:<8}"),
        BarColumn(bar_width=24),
        TaskProgressColumn(),
        Counts(),
        Rate(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    ]
