"""Export: write a run's lists, data and report in the layout of interface.md.

Everything here is derived from the cached steps' artifacts, so export always runs (it is
cheap) and each run gets a complete run directory of its own. `LATEST` is written last:
a reader that follows it always finds a finished run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import pandera.pandas as pa

from tasks.describe import METADATA_SCHEMA, metadata_frame
from tasks.formats import (
    embedding_csv_header,
    embedding_csv_rows,
    read_npy,
    read_parquet_bytes,
    text_lines,
    to_parquet_bytes,
)
from tasks.monitor import current, step_activity, verdict
from tasks.naming import is_video
from tasks.shards import CheckedShard, EmbeddedShard, StepStats
from tasks.storage import Storage, open_storage

RUN_METADATA_SCHEMA = METADATA_SCHEMA.add_columns(
    {
        "duplicate_of": pa.Column(str, nullable=True),
        "selected": pa.Column(bool),
    }
)


@dataclass(frozen=True)
class Exported:
    """A written run directory and what the datapool and the report still need."""

    run: str  # key of the run directory
    metadata: pd.DataFrame  # the run's samples
    corrupt: dict[str, str]  # corrupt images and videos, with reasons
    report: dict[str, Any]  # report.json's content, written by `write_report`
    # What report.html and report.pdf are drawn from (`tasks.report`).
    selected: tuple[str, ...] = ()  # this run's picks, in pick order
    shards: tuple[tuple[CheckedShard, EmbeddedShard], ...] = ()
    source_url: str | None = None  # the input, for thumbnails of selected images


@dataclass
class RunSummary:
    run_id: str
    config: dict[str, Any]
    discovered: int  # relevant objects listed
    processed: int  # of them, new or changed since the datapool
    skipped: int
    dataset_bytes: int
    steps: dict[str, StepStats]
    embedding: dict[str, Any]
    versions: dict[str, str]
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    # Listed but not readable as objects (discovery's `unreadable`): in the corrupt lists.
    unreadable: dict[str, str] = field(default_factory=dict)


def _embedding_rows(
    storage: Storage,
    checked: list[CheckedShard],
    embedded: list[EmbeddedShard],
    duplicates: dict[str, str],
) -> Iterator[bytes]:
    """embeddings.csv in Lightly's format, one shard in memory at a time."""
    header_written = False
    for check, embed in zip(checked, embedded, strict=True):
        names = read_parquet_bytes(storage.read(check.metadata))["filename"].tolist()
        vectors = read_npy(storage, embed.embeddings)
        if not header_written:
            yield embedding_csv_header(vectors.shape[1]).encode()
            header_written = True
        keep = [i for i, name in enumerate(names) if name not in duplicates]
        # In blocks: a video's shard can hold 100,000 frames, ~5 KB of text each.
        for start in range(0, len(keep), CSV_BLOCK):
            block = keep[start : start + CSV_BLOCK]
            yield embedding_csv_rows([names[i] for i in block], vectors[block]).encode()


CSV_BLOCK = 1000  # rows formatted at a time


def export(
    output: Storage,
    source: Storage,
    summary: RunSummary,
    checked: list[CheckedShard],
    embedded: list[EmbeddedShard],
    duplicates: dict[str, str],
    picked: dict[str, Any],
    run_started: float,
) -> Exported:
    """Write the run directory, all but its report (see `write_report`). `picked` is the
    select step's result: `selected` names and `sequences`."""
    export_started = time.perf_counter()
    run = f"runs/{summary.run_id}"
    selected: list[str] = picked["selected"]
    corrupt: dict[str, str] = {}
    corrupt_videos: dict[str, str] = {}
    videos: dict[str, Any] = {}
    for name, reason in summary.unreadable.items():
        (corrupt_videos if is_video(name) else corrupt)[name] = reason
    for check in checked:
        reasons = json.loads(output.read(check.corrupt))
        (corrupt if check.videos is None else corrupt_videos).update(reasons)
        if check.videos is not None:
            videos.update(json.loads(output.read(check.videos)))

    shard_rows = [read_parquet_bytes(output.read(c.metadata)) for c in checked]
    metadata = pd.concat(shard_rows, ignore_index=True) if shard_rows else metadata_frame([])
    metadata["duplicate_of"] = metadata["filename"].map(duplicates)
    metadata["selected"] = metadata["filename"].isin(set(selected))
    output.write(
        f"{run}/data/metadata.parquet", to_parquet_bytes(RUN_METADATA_SCHEMA.validate(metadata))
    )
    # Selected video frames become files of their own; selected images already are.
    frames = metadata[metadata["selected"] & metadata["video"].notna()]
    frames_started = time.perf_counter()
    frame_bytes = 0
    if len(frames):
        from tasks.frames import export_frames  # PyAV: only for runs that selected frames

        with step_activity("export_frames"):
            frame_bytes = export_frames(source, output, f"{run}/selected", frames)
    summary.steps["export_frames"] = StepStats(
        seconds=time.perf_counter() - frames_started,
        bytes_read=frame_bytes,
        retries=source.retries,
        shards=frames["video"].nunique(),
    )
    if videos:
        output.write_text(f"{run}/data/videos.json", json.dumps(videos, indent=2, sort_keys=True))
    if picked.get("explanation"):  # why each sample was picked, dropped or cut
        output.write(f"{run}/data/selection.parquet", output.read(picked["explanation"]))
    if picked["sequences"]:
        output.write_text(
            f"{run}/sequence_information.json", json.dumps(picked["sequences"], indent=2)
        )
    output.write_stream(
        f"{run}/data/embeddings.csv", _embedding_rows(output, checked, embedded, duplicates)
    )
    output.write(f"{run}/filenames/selected_filenames.txt", text_lines(selected))
    all_corrupt = corrupt | corrupt_videos
    output.write(f"{run}/filenames/corrupt_filenames.txt", text_lines(sorted(all_corrupt)))
    output.write(f"{run}/filenames/duplicate_filenames.txt", text_lines(sorted(duplicates)))
    information = {"corrupt_samples": corrupt, "corrupt_videos": corrupt_videos}
    output.write_text(
        f"{run}/corruptness_check_information.json",
        json.dumps(information, indent=2, sort_keys=True),
    )
    finished = time.perf_counter()
    summary.steps["export"] = StepStats(
        seconds=finished - export_started, retries=output.retries, shards=1
    )
    summary.seconds = finished - run_started
    document = report(summary, metadata, all_corrupt, duplicates, selected)
    document["counts"] |= {
        "videos": len(videos),
        "corrupt_videos": len(corrupt_videos),
        "frames": int(metadata["video"].notna().sum()),
        "unreadable": len(summary.unreadable),
        "selected_sequences": len(picked["sequences"]),
    }
    return Exported(
        run,
        metadata,
        all_corrupt,
        document,
        selected=tuple(selected),
        shards=tuple(zip(checked, embedded, strict=True)),
        source_url=source.url,
    )


def write_report(output: Storage, exported: Exported, prior_key: str | None = None) -> None:
    """Write report.html and report.pdf, then report.json. `prior_key` names the .npy of
    the datapool's earlier picks this run selected against (drawn apart on the map). The
    drawing reads thumbnails of selected images from the input again (at most 96): those
    reads are in report.json's `report_reads`, apart from the pipeline's one read per
    object. A run that processed nothing has nothing to draw: its report.json says so,
    and the drawing (seconds of matplotlib) would be most of a scheduled no-op's cost."""
    if exported.report.get("counts", {}).get("processed") != 0:
        from tasks.report import write_run_reports

        started = time.perf_counter()
        prior = read_npy(output, prior_key) if prior_key else None
        source = open_storage(exported.source_url) if exported.source_url else None
        with step_activity("report"):
            write_run_reports(output, source, exported, prior)
        exported.report["report_reads"] = {
            "seconds": round(time.perf_counter() - started, 3),
            "bytes_read": source.bytes_read if source else 0,
            "retries": source.retries if source else 0,
        }
        monitor = current()
        if monitor is not None and "monitoring" in exported.report:
            # Judged after it drew the others: in report.json only.
            monitor.sample_now()
            figures = monitor.figures("report")
            reads = exported.report["report_reads"]
            reads["verdict"], reads["why"] = verdict(figures)
            if figures is not None:
                reads["monitor"] = figures
    output.write_text(f"{exported.run}/report.json", json.dumps(exported.report, indent=2))


def point_latest(output: Storage, exported: Exported) -> str:
    """Point LATEST at the run (after the datapool commit, so that LATEST always names a
    run whose datapool version is published); returns the run directory's URL."""
    output.write_text("LATEST", exported.report["run_id"] + "\n")
    return output.join(exported.run)


def report(
    summary: RunSummary,
    metadata: pd.DataFrame,
    corrupt: dict[str, str],
    duplicates: dict[str, str],
    selected: list[str],
) -> dict[str, Any]:
    bytes_read = sum(step.bytes_read for step in summary.steps.values())
    retries = sum(step.retries for step in summary.steps.values())
    return {
        "run_id": summary.run_id,
        "counts": {
            "discovered": summary.discovered,
            "processed": summary.processed,
            "skipped_not_images": summary.skipped,
            "valid": len(metadata),
            "corrupt": len(corrupt),
            "duplicates": len(duplicates),
            "embedded": len(metadata),
            "selected": len(selected),
            "datapool_size": 0,
        },
        "steps": {name: vars(step) for name, step in summary.steps.items()},
        "bytes_read": {
            "total": bytes_read,
            "dataset": summary.dataset_bytes,
            "ratio": round(bytes_read / summary.dataset_bytes, 4) if summary.dataset_bytes else 0,
        },
        "retries": retries,
        "seconds": round(summary.seconds, 3),
        "embedding": summary.embedding,
        "config": summary.config,
        "versions": summary.versions,
        **summary.extra,
    }
