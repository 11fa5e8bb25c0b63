"""What a run shows in the Prefect UI: a progress bar that moves as shards finish, the
counts of `report.json` as a table, the corrupt files with their reasons, and a summary
with the location of the report and each step's bottleneck verdict. Artifacts attach to
the flow run they are made in (a local `curate run` included); their keys are named after
the output, so the Artifacts page keeps one history per datapool.
"""

from __future__ import annotations

import re
import time
from typing import Any

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from tasks.progress import TerminalProgress

# Shares of the progress bar: listing, then check and embed of every shard, then the rest.
_LISTED, _STREAMED = 0.05, 0.85
MAX_CORRUPT_ROWS = 1000  # the table is for reading; corrupt_filenames.txt has them all


def artifact_key(kind: str, output: str) -> str:
    """`curate-counts-out-s3-curated-cam1`: Prefect's keys are lowercase letters, digits
    and dashes."""
    slug = re.sub(r"[^a-z0-9]+", "-", output.lower()).strip("-")[-60:].strip("-")
    return f"curate-{kind}-{slug or 'output'}"


class RunProgress:
    """A progress artifact from 0 to 100 %: listing, then the check and embed of each
    shard (`done` counts finished step runs), then dedup, selection and export. Updates
    are sent at most once a second (each is an API call). On a terminal (`curate run`)
    the same counts draw a bar per step."""

    def __init__(self, output: str) -> None:
        self.id = create_progress_artifact(
            0.0, key=artifact_key("progress", output), description="curate run progress"
        )
        self.terminal = TerminalProgress.start(None)  # on a terminal only
        self.shards = 0
        self.samples = 0
        self.listed = False
        self.done = 0
        self._sent = -1.0
        self._at = 0.0

    def listed_shard(self, samples: int) -> None:
        self.shards += 1
        self.samples += samples
        self.terminal.add_step("check", total_shards=self.shards, total_samples=self.samples)
        self.terminal.add_step("embed", total_shards=self.shards)
        self.update()

    def finished(self, step: str, samples: int, done: int) -> None:
        self.terminal.advance(step, samples=samples)
        self.done = done
        self.update()

    @property
    def percent(self) -> float:
        share = _LISTED if self.listed else 0.0
        if self.shards:
            share += _STREAMED * self.done / (2 * self.shards)
        return round(100 * share, 1)

    def update(self, force: bool = False, percent: float | None = None) -> None:
        value = self.percent if percent is None else percent
        if value != self._sent and (force or time.monotonic() - self._at >= 1.0):
            update_progress_artifact(self.id, value)  # type: ignore[arg-type]
            self._sent, self._at = value, time.monotonic()

    def finish(self) -> None:
        self.update(force=True, percent=100.0)
        self.close()

    def close(self) -> None:
        self.terminal.close()


def publish_run(report: dict[str, Any], corrupt: dict[str, str], run_dir: str) -> str:
    """The counts table, the corrupt-files table and the markdown summary of a finished
    run; returns the summary's text."""
    output = report["config"]["output"]
    counts = report["counts"]
    create_table_artifact(
        [{"count": name, "value": value} for name, value in counts.items()],
        key=artifact_key("counts", output),
        description=f"counts of run {report['run_id']} (as in report.json)",
    )
    if corrupt:
        rows = [{"file": name, "reason": reason} for name, reason in sorted(corrupt.items())]
        create_table_artifact(
            rows[:MAX_CORRUPT_ROWS],
            key=artifact_key("corrupt", output),
            description=f"{len(rows)} corrupt files of run {report['run_id']}"
            + (f" (first {MAX_CORRUPT_ROWS})" if len(rows) > MAX_CORRUPT_ROWS else ""),
        )
    steps = "\n".join(
        f"| {name} | {step['seconds']:.2f} | {step['bytes_read']:,} | "
        f"{step['cached_shards']}/{step['shards']} | {step.get('verdict', '')} | "
        f"{step.get('why', '')} |"
        for name, step in report["steps"].items()
    )
    summary = (
        f"# curate run {report['run_id']}\n\n"
        f"**{summary_line(report)}**\n\n"
        f"- input: `{report['config']['input']}`\n- output: `{output}`\n"
        f"- run directory: `{run_dir}` (report: `{run_dir}/report.json`)\n"
        f"- model: {_model(report['embedding'])}\n"
        f"- took {report['seconds']:.1f} s\n\n"
        "| step | seconds | bytes read | shards from cache | bottleneck | why |\n"
        "| --- | --- | --- | --- | --- | --- |\n"
        f"{steps}\n"
    )
    create_markdown_artifact(
        summary, key=artifact_key("summary", output), description="curate run summary"
    )
    return summary


def _model(embedding: dict[str, Any]) -> str:
    if embedding.get("device") is None:
        return f"{embedding.get('model')} (not loaded: nothing new to embed)"
    return (
        f"{embedding['model']} at {embedding['input_size']} px on {embedding['device']}, "
        f"weights: {embedding['weights']}"
    )


def summary_line(report: dict[str, Any]) -> str:
    """One line on what a run did, from its report."""
    counts = report["counts"]
    videos = (
        f" ({counts['videos']} videos, {counts['frames']} frames)" if counts.get("videos") else ""
    )
    return (
        f"processed {counts['processed']} objects{videos}, "
        f"{counts['already_in_datapool']} already in the datapool: "
        f"{counts['corrupt']} corrupt, {counts['duplicates']} duplicates, "
        f"{counts['selected']} selected; datapool {report['datapool']['version']} "
        f"holds {counts['datapool_size']} objects"
    )
