"""The curate pipeline: discover -> check (+describe) -> dedup -> embed -> select -> export
-> datapool commit.

Discover lists the input and leaves out what the output's datapool already holds with the
same identity, so a scheduled run processes only new and changed objects; dedup and select
measure the new samples against the datapool's selection. Images come in shards of
thousands; a video is a shard of its own, its frames the samples.

Shards flow through check and embed as a stream: each shard's model inputs are embedded
(and deleted) soon after its check, so the disk holds those of the shards in flight
only. On a GPU the check of shard i+1 overlaps the embedding of shard i. Every step but
discover and export is cached by content identity; the report says how many shards each
step took from the cache.

The flow's parameters are the config's top-level keys (one per section), so a deployment
run can override one section and keep the rest. This module imports neither torch nor
PyAV: a run with nothing new never pays for them, and a bad parameter fails at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import platform
import time
import traceback
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from importlib.metadata import version
from typing import Any

import numpy as np
from prefect import flow, get_run_logger
from prefect.futures import PrefectFuture
from prefect.states import Failed
from prefect.task_runners import ThreadPoolTaskRunner

from flows.artifacts import RunProgress, publish_run, summary_line
from flows.preflight import apply_credentials, check_output
from flows.slots import global_slot, output_limit_name
from flows.steps import step_options
from flows.streams import Streams, check_model, replace_plan, stream_shards
from tasks.config import CurateConfig, as_flow_parameters, parse_config
from tasks.datapool import (
    Datapool,
    DatapoolLock,
    commit,
    discard_run,
    load_datapool,
    merge,
    next_version,
    prior_for,
    run_outcome,
)
from tasks.discover import Discovery
from tasks.errors import CurateError, redact
from tasks.export import Exported, RunSummary, export, point_latest, write_report
from tasks.formats import npy_bytes, read_npy, to_parquet_bytes
from tasks.keys import PIPELINE_VERSION, artifact_key
from tasks.monitor import Monitor, judge, monitoring, step_activity
from tasks.resources import check_config
from tasks.shards import CheckedShard, EmbeddedShard, StepStats, read_manifest
from tasks.stop import stop_threads_on_sigterm
from tasks.storage import Storage, open_storage
from tasks.weights import resolve_weights

# How many corrupt files the flow log names (all are in corrupt_filenames.txt).
LOGGED_CORRUPT = 10


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def new_run_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def package_versions() -> dict[str, str]:
    names = ("prefect", "torch", "timm", "numpy", "pillow", "pandas", "pandera", "pydantic")
    return {"python": platform.python_version(), "pipeline": PIPELINE_VERSION} | {
        name: version(name) for name in names
    }


def run_name() -> str:
    """Flow runs are named after their deployment (or `curate`), start time and input:
    `incremental 2026-12-01 09:00 s3://raw/cam1`."""
    from prefect.runtime import deployment, flow_run

    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")
    source = flow_run.parameters.get("input", "")
    return f"{deployment.name or 'curate'} {started} {source}"


@contextlib.contextmanager
def one_run_per_output(output_url: str, logger: Any) -> Iterator[None]:
    """Deployment runs on one output queue behind each other, whichever deployment they
    come from (`full`, `incremental`, `local`): a Prefect global concurrency limit of 1
    named after the output. Runs outside a deployment (`curate run`) rely on the
    datapool lock alone, which fails fast with the holder's name."""
    from prefect.runtime import deployment

    if deployment.id is None:
        yield
        return
    with global_slot(output_limit_name(output_url), 1, logger, f"other runs on {output_url}"):
        yield


@flow(
    name="curate",
    flow_run_name=run_name,
    task_runner=ThreadPoolTaskRunner(max_workers=4),  # type: ignore[arg-type]
    persist_result=False,
)
@as_flow_parameters
def curate(**sections: Any) -> str:
    """Curate `input` into `output`; returns the run directory's URL.

    Only objects the datapool does not hold with the same identity are processed, and
    selection counts what the datapool selected before. The run holds the datapool's
    lock throughout and commits the datapool last, in one atomic step."""
    logger = get_run_logger()
    try:
        with stop_threads_on_sigterm():
            return _locked(sections, logger)
    except Exception as exc:
        # A failed run's state carries its error in memory only: Prefect would pickle a
        # raised exception (paths, messages) into its local result storage.
        # Both go to the Prefect server (logs, the state's message): credentials redacted.
        if isinstance(exc, CurateError):  # one line; the CLI prints it itself
            logger.error("%s", redact(str(exc)), extra={"curate_user_error": True})
        else:
            trace = "".join(traceback.format_exception(exc))
            logger.error("curate run failed\n%s", redact(trace))
        message = redact(f"{type(exc).__name__}: {exc}")
        return Failed(message=message, data=exc)  # type: ignore[return-value]


def _locked(sections: dict[str, Any], logger: Any) -> str:
    config = parse_config(sections)  # each section is valid; this checks rules across them
    check_config(config)  # resources that cannot fit fail before any work
    apply_credentials(config.storage.credentials_secret)
    output = open_storage(config.output)
    check_output(output)
    stale = config.datapool.lock_stale_after_seconds
    with one_run_per_output(config.output, logger):
        run_id = new_run_id()  # once the run may start: run ids sort by start
        with DatapoolLock(output, f"curate run {run_id}", stale_after=stale):
            return _curate(config, output, run_id, logger)


def _curate(config: CurateConfig, output: Storage, run_id: str, logger: Any) -> str:
    progress = RunProgress(config.output)
    settings = config.monitoring
    try:
        with monitoring(settings.enabled, settings.interval_seconds) as monitor:
            return _stages(config, output, run_id, logger, progress, monitor)
    finally:
        progress.close()  # the terminal's bars, before the CLI prints its summary


def _stages(
    config: CurateConfig,
    output: Storage,
    run_id: str,
    logger: Any,
    progress: RunProgress,
    monitor: Monitor,
) -> str:
    started = time.perf_counter()
    started_at = _now()
    pool = load_datapool(output)
    repair_latest(output, pool, logger)
    process_all = config.datasource.process_all
    logger.info(
        "datapool: %s (%d objects, %d selected samples)%s",
        pool.version or "none yet",
        pool.size,
        len(pool.selected),
        "; ignored: process_all" if process_all else "",
    )
    # Streams cancel their child runs on pools when the run fails.
    with stream_shards(config, output, pool, progress, logger) as streams:
        steps = {"discover": streams.discover_stats()}
        checked = streams.collect_checks(steps)
        prior_key, prior_hashes_key = prior_artifacts(output, pool, streams.found, process_all)
        duplicates_key = find_duplicates(config, checked, prior_hashes_key, streams, steps)
        pretag_keys: list[str] = []
        if streams.deferred and streams.plan is not None:
            pretag_keys = train_and_pretag(
                config, pool, output, checked, duplicates_key, streams, steps, logger
            )
        embedded = streams.collect_embeddings(steps)
        picked = select(config, checked, embedded, duplicates_key, prior_key, streams, steps)
        log_steps(steps, logger)
        duplicates = json.loads(output.read(duplicates_key)) if duplicates_key else {}
        summary = RunSummary(
            run_id=run_id,
            config=config.model_dump(mode="json"),
            discovered=streams.found.discovered
            + streams.found.known
            + len(streams.found.unreadable),
            processed=streams.found.discovered,
            skipped=streams.found.skipped,
            dataset_bytes=streams.found.total_bytes,
            steps=steps,
            embedding=streams.embedding_report(),
            versions=package_versions(),
            unreadable=streams.found.unreadable,
        )
        source = open_storage(config.input)
        try:
            with step_activity("export"):
                exported = export(
                    output, source, summary, checked, embedded, duplicates, picked, started
                )
            if config.monitoring.enabled:
                judge(exported.report, monitor)
                exported.report["monitoring"] = monitor.summary(exported.report["seconds"])
            write_training_files(output, exported.run, streams, pretag_keys)
            exported.report.update(started_at=started_at, finished_at=_now())
            exported.report["resources"] = streams.resources_report()
            run_dir = commit_run(
                config, output, pool, streams, exported, duplicates, picked, run_id, prior_key
            )
        except Exception:
            discard_run(output, run_id)  # no half-written run folder per failed run
            raise
        log_outcome(exported, run_dir, logger)
        publish_run(exported.report, exported.corrupt, run_dir)
        progress.finish()
        return run_dir


def train_and_pretag(
    config: CurateConfig,
    pool: Datapool,
    output: Storage,
    checked: list[CheckedShard],
    duplicates_key: str | None,
    streams: Streams,
    steps: dict[str, StepStats],
    logger: Any,
) -> list[str]:
    """With `enable_training`, train the backbone on the checked, deduplicated samples
    and embed with it (a trained model is a model change for the datapool); with
    `pretagging.checkpoint`, predict classes before each embedding (which deletes the
    model inputs both read). Submits every deferred embedding; returns the pretag keys."""
    from tasks.pretag import pretag_identity, pretag_shard
    from tasks.train import local_checkpoint, resume_weights, train_step

    plan = streams.plan
    assert plan is not None
    planned = streams.resources  # training and pretagging run in this process
    if config.enable_training and checked:
        started = time.perf_counter()
        title = f"{config.training.method} on {len(checked)} shards"
        future = train_step.with_options(**step_options("train", title, streams.results)).submit(
            checked,
            duplicates_key,
            config.input,
            config.output,
            config.embedding.model,
            config.training,
            resume_weights(config.training),
            plan.input_size,
            config.seed,
            str(plan.device),
            planned["train"].num_proc,
        )
        trained = future.result()
        checkpoint = local_checkpoint(config.output, trained.checkpoint)
        weights = resolve_weights(checkpoint, False, config.seed)
        identity = plan.identity | {"weights": "trained", "weights_identity": weights.identity}
        plan = replace_plan(streams, weights=weights, checkpoint=checkpoint, identity=identity)
        streams.trained = trained
        if not config.datasource.process_all:
            check_model(pool, identity, output)
        seconds = time.perf_counter() - started
        steps["train"] = _single_step(future, seconds, bytes_read=trained.bytes_read)
        logger.info("embedding with the trained %s (%s)", trained.method, weights.describe())
    pretags: list[PrefectFuture[str]] = []
    if config.pretagging.checkpoint:
        identity_of_checkpoint = pretag_identity(config.pretagging)
        for shard, check in zip(streams.shards, checked, strict=True):
            pretags.append(
                pretag_shard.with_options(
                    **step_options("pretag", shard.title, streams.results)
                ).submit(
                    check,
                    config.input,
                    config.output,
                    config.pretagging,
                    identity_of_checkpoint,
                    config.embedding.model,
                    plan.input_size,
                    str(plan.device),
                    planned["pretag"].num_proc,
                )
            )
    streams.embed_deferred(checked, pretags)
    return [future.result() for future in pretags]


def write_training_files(
    output: Storage, run: str, streams: Streams, pretag_keys: list[str]
) -> None:
    """The run directory's checkpoint, data/training.json and data/predictions.parquet."""
    if streams.trained is not None:
        from tasks.train import run_files

        for path, data in run_files(output, streams.trained).items():
            output.write(f"{run}/{path}", data)
    if pretag_keys:
        from tasks.predictions import PREDICTIONS_FILE
        from tasks.pretag import merge_predictions

        output.write(f"{run}/{PREDICTIONS_FILE}", merge_predictions(output, pretag_keys))


def prior_artifacts(
    output: Storage, pool: Datapool, found: Discovery, process_all: bool
) -> tuple[str | None, str | None]:
    """What this run selects against: the datapool's picks (embeddings, and hashes for
    dedup), less the objects it processes again."""
    if process_all:
        return None, None
    prior, prior_hashes = prior_for(pool, found.keys)
    prior_key = write_artifact(output, "prior", npy_bytes(prior), ".npy") if len(prior) else None
    hashes_key = None
    if len(prior_hashes):
        hashes_key = write_artifact(output, "prior", to_parquet_bytes(prior_hashes), ".parquet")
    return prior_key, hashes_key


def write_artifact(output: Storage, step: str, data: bytes, suffix: str) -> str:
    """Store `data` under a key named by its content (so cache keys that name the key
    change exactly when the content does)."""
    key = artifact_key(step, hashlib.sha256(data).hexdigest()[:32], suffix)
    if not output.exists(key):
        output.write(key, data)
    return key


def find_duplicates(
    config: CurateConfig,
    checked: list[CheckedShard],
    prior_hashes_key: str | None,
    streams: Streams,
    steps: dict[str, StepStats],
) -> str | None:
    """The dedup step: the key of its {duplicate: kept} JSON, or None when off."""
    if not config.remove_exact_duplicates or not checked:
        return None
    from tasks.dedup import dedup

    started = time.perf_counter()
    title = f"{len(checked)} shards"
    future = dedup.with_options(**step_options("dedup", title, streams.results)).submit(
        checked,
        config.output,
        include_frames=not config.selected_sequence_length,
        prior_key=prior_hashes_key,
    )
    key: str = future.result()
    steps["dedup"] = _single_step(future, time.perf_counter() - started)
    return key


def select(
    config: CurateConfig,
    checked: list[CheckedShard],
    embedded: list[EmbeddedShard],
    duplicates_key: str | None,
    prior_key: str | None,
    streams: Streams,
    steps: dict[str, StepStats],
) -> dict[str, Any]:
    """The select step: `selected` names in pick order, their `embeddings` key,
    `sequences`."""
    if not checked or streams.plan is None:
        return {"selected": [], "sequences": []}
    from tasks.select import select_samples

    started = time.perf_counter()
    title = f"from {len(checked)} shards"
    future = select_samples.with_options(**step_options("select", title, streams.results)).submit(
        checked,
        embedded,
        duplicates_key,
        config.output,
        config.selection,
        config.stopping_condition,
        config.seed,
        str(streams.plan.device),
        config.selected_sequence_length,
        prior_key,
        config.input,
    )
    picked: dict[str, Any] = json.loads(open_storage(config.output).read(future.result()))
    steps["select"] = _single_step(future, time.perf_counter() - started)
    return picked


def _single_step(future: PrefectFuture[Any], seconds: float, bytes_read: int = 0) -> StepStats:
    """What a whole-run step cost: nothing when it came from the cache."""
    if future.state.name == "Cached":
        return StepStats(shards=1, cached_shards=1)
    return StepStats(seconds=seconds, bytes_read=bytes_read, shards=1)


def commit_run(
    config: CurateConfig,
    output: Storage,
    pool: Datapool,
    streams: Streams,
    exported: Exported,
    duplicates: dict[str, str],
    picked: dict[str, Any],
    run_id: str,
    prior_key: str | None,
) -> str:
    """The datapool, last: this run's outcome merged in, published by one atomic write.
    The report first, then the commit, then LATEST: once the datapool holds this run's
    picks, its run directory is complete, and LATEST is repaired by the next run if the
    process dies before writing it (`repair_latest`). Returns the run directory."""
    found, process_all = streams.found, config.datasource.process_all
    version, datapool_size = pool.version, pool.size
    merged: Datapool | None = None
    if found.shards or process_all:
        outcome = run_outcome(
            [obj for shard in found.shards for obj in read_manifest(output, shard.manifest)],
            exported.metadata,
            exported.corrupt,
            duplicates,
            picked["selected"],
            read_npy(output, picked["embeddings"]) if picked["selected"] else np.zeros((0, 0)),
            run_id,
        )
        identity = streams.plan.identity if streams.plan else pool.model or {}
        base = Datapool.empty() if process_all else pool
        merged = merge(base, outcome.objects, outcome.selected, outcome.embeddings, identity)
        version = next_version(output, pool)
        datapool_size = merged.size
    exported.report["counts"]["datapool_size"] = datapool_size
    exported.report["counts"]["already_in_datapool"] = found.known
    exported.report["datapool"] = {
        "version": version,
        "previous": pool.version,
        "process_all": process_all,
    }
    write_report(output, exported, prior_key)
    if merged is not None:
        commit(output, pool, merged, run_id, config.datapool.keep_history, version)
    return point_latest(output, exported)


def repair_latest(output: Storage, pool: Datapool, logger: Any) -> None:
    """Point LATEST at the run that committed the datapool's current version when that
    run died after its commit, before writing LATEST (run ids sort by time)."""
    if pool.run_id is None or not output.exists(f"runs/{pool.run_id}/report.json"):
        return
    latest = output.read_text("LATEST").strip() if output.exists("LATEST") else ""
    if latest < pool.run_id:
        logger.warning(
            "LATEST named %s, but run %s committed the datapool: LATEST now names it",
            latest or "nothing",
            pool.run_id,
        )
        output.write_text("LATEST", pool.run_id + "\n")


def log_steps(steps: dict[str, StepStats], logger: Any) -> None:
    for name, stats in steps.items():
        logger.info(
            "step %s: %d/%d shards from cache, %.2f s, %d bytes read",
            name,
            stats.cached_shards,
            stats.shards,
            stats.seconds,
            stats.bytes_read,
        )


def log_outcome(exported: Exported, run_dir: str, logger: logging.Logger) -> None:
    """The summary line, and the first corrupt files with their reasons."""
    logger.info("%s", summary_line(exported.report))
    corrupt = sorted(exported.corrupt.items())
    for name, reason in corrupt[:LOGGED_CORRUPT]:
        logger.info("corrupt: %s: %s", name, reason)
    if len(corrupt) > LOGGED_CORRUPT:
        logger.info(
            "... and %d more corrupt files (filenames/corrupt_filenames.txt)",
            len(corrupt) - LOGGED_CORRUPT,
        )
    logger.info("run written to %s (report: %s/report.json)", run_dir, run_dir)
