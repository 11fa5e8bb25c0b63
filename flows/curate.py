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
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
from prefect import flow, get_run_logger
from prefect.exceptions import UnfinishedRun
from prefect.futures import PrefectFuture
from prefect.task_runners import ThreadPoolTaskRunner

from tasks.caching import OutputResults
from tasks.check import check_shard
from tasks.config import CurateConfig
from tasks.datapool import (
    Datapool,
    DatapoolLock,
    commit,
    load_datapool,
    merge,
    next_version,
    prior_for,
    run_outcome,
)
from tasks.dedup import dedup
from tasks.device import default_input_size, pick_device
from tasks.discover import (
    Discovery,
    Shard,
    discover_shards,
    load_patterns,
)
from tasks.embed import Weights, check_model_name, embed_shard, resolve_weights
from tasks.errors import CurateError
from tasks.export import (
    RunSummary,
    export,
    point_latest,
    write_report,
)
from tasks.formats import npy_bytes, read_npy, to_parquet_bytes
from tasks.frames import check_video_shard
from tasks.keys import CACHE_PREFIX, PIPELINE_VERSION, artifact_key
from tasks.naming import is_sample_source
from tasks.select import select_samples
from tasks.shards import CheckedShard, EmbeddedShard, StepStats, read_manifest
from tasks.storage import LocalStorage, ObjectInfo, Storage, open_storage


def new_run_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def package_versions() -> dict[str, str]:
    names = ("prefect", "torch", "timm", "numpy", "pillow", "pandas", "pandera", "pydantic")
    return {"python": platform.python_version(), "pipeline": PIPELINE_VERSION} | {
        name: version(name) for name in names
    }


def num_workers(setting: int) -> int:
    """Threads for decoding: -1 means one per vCPU."""
    return (os.cpu_count() or 1) if setting == -1 else max(1, setting)


def _result_storage(output: Storage) -> Path | OutputResults:
    """Prefect's cache records live next to the artifacts they point to, so deleting the
    output deletes both, and a cache hit never points at a missing file."""
    if isinstance(output, LocalStorage):
        return output.root / CACHE_PREFIX / "results"
    # Prefect wants result storage saved server-side (so workers elsewhere can load it);
    # the block holds the URL only, credentials stay in each machine's environment.
    block = OutputResults(url=output.url)
    block.save(
        f"curate-results-{hashlib.sha256(output.url.encode()).hexdigest()[:16]}", overwrite=True
    )
    return block


def listing(
    config: CurateConfig, found: Discovery, is_known: Callable[[ObjectInfo], bool] | None
) -> Iterator[Shard]:
    """The discover step. It runs in the flow itself, not as a task, so that each shard
    is submitted the moment its manifest is written and a bucket of millions of keys is
    being worked on while it is still being listed; the storage layer retries transient
    listing failures. Never cached: listing is how a run learns what is new."""
    source, output = open_storage(config.input), open_storage(config.output)
    patterns = None
    if config.datasource.relevant_filenames_file:
        patterns = load_patterns(config.datasource.relevant_filenames_file, source, output)
    return discover_shards(source, output, config.shard_size, patterns, found, is_known)


# Environment variables a credentials secret may set: the cloud clients' own.
CREDENTIAL_PREFIXES = ("AWS_", "AZURE_", "GOOGLE_", "GCS", "STORAGE_EMULATOR_HOST")


def apply_credentials(secret_name: str | None) -> None:
    """Put a Prefect Secret's credentials into this process's environment, where the
    cloud clients look for them. Values are never logged or reported."""
    if not secret_name:
        return
    from prefect.blocks.system import Secret

    try:
        values = Secret.load(secret_name, _sync=True).get()  # type: ignore[call-arg, union-attr]
    except Exception as exc:
        raise CurateError(
            f"storage.credentials_secret: cannot load Prefect Secret '{secret_name}' "
            f"({type(exc).__name__})"
        ) from None
    if not isinstance(values, dict) or not all(
        isinstance(k, str) and k.startswith(CREDENTIAL_PREFIXES) for k in values
    ):
        raise CurateError(
            f"storage.credentials_secret: Secret '{secret_name}' must be a JSON object of "
            f"cloud environment variables ({', '.join(CREDENTIAL_PREFIXES)}...)"
        )
    os.environ.update({key: str(value) for key, value in values.items()})


def preflight(config: CurateConfig) -> None:
    """Fail fast, with one line naming the key or URL, before any Prefect run starts."""
    apply_credentials(config.storage.credentials_secret)
    output = open_storage(config.output)
    output.exists("LATEST")  # reachable, with working credentials
    source = open_storage(config.input)
    if not any(is_sample_source(obj.key) for obj in source.list()):
        raise CurateError(f"input {config.input}: no images or videos found")
    if config.datasource.relevant_filenames_file:
        load_patterns(config.datasource.relevant_filenames_file, source, output)
    pick_device(config.embedding.device)
    check_model_name(config.embedding.model)
    resolve_weights(config.embedding.checkpoint, config.embedding.pretrained, config.seed)


def _collect(futures: list[PrefectFuture[Any]], stats: StepStats) -> list[Any]:
    """Results in order, with this run's cost of the step added to `stats`."""
    results = []
    for future in futures:
        result = future.result()
        stats.shards += 1
        if future.state.name == "Cached":
            stats.cached_shards += 1
        else:
            stats.seconds += result.seconds
            stats.bytes_read += result.bytes_read
            stats.retries += result.retries
        results.append(result)
    return results


def model_identity(model: str, weights: Weights, input_size: int) -> dict[str, Any]:
    """What makes embeddings comparable: the same model, weights and input size."""
    return {
        "model": model,
        "weights": weights.source,
        "weights_identity": weights.identity,
        "input_size": input_size,
    }


def check_model(pool: Datapool, identity: dict[str, Any], output: Storage) -> None:
    """Embeddings of another model cannot be compared with the datapool's: refuse, and
    say how to go on (re-embedding them would mean re-reading every selected sample)."""
    if pool.model is not None and len(pool.selected) and pool.model != identity:
        raise CurateError(
            f"datapool {output.join('datapool')}: its {len(pool.selected)} selected "
            f"samples were embedded with {pool.model}, this run uses {identity}; run with "
            "datasource.process_all=true to rebuild it with this model, or use another output"
        )


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


def write_artifact(output: Storage, step: str, data: bytes, suffix: str) -> str:
    """Store `data` under a key named by its content (so cache keys that name the key
    change exactly when the content does)."""
    key = artifact_key(step, hashlib.sha256(data).hexdigest()[:32], suffix)
    if not output.exists(key):
        output.write(key, data)
    return key


@flow(name="curate", task_runner=ThreadPoolTaskRunner(max_workers=4))  # type: ignore[arg-type]
def curate(config: CurateConfig) -> str:
    """Curate `config.input` into `config.output`; returns the run directory's URL.

    Only objects the datapool does not hold with the same identity are processed, and
    selection counts what the datapool selected before. The run holds the datapool's
    lock throughout and commits the datapool last, in one atomic step."""
    apply_credentials(config.storage.credentials_secret)
    output = open_storage(config.output)
    run_id = new_run_id()
    with DatapoolLock(
        output, f"curate run {run_id}", stale_after=config.datapool.lock_stale_after_seconds
    ):
        return _curate(config, output, run_id)


def _curate(config: CurateConfig, output: Storage, run_id: str) -> str:
    logger = get_run_logger()
    started = time.perf_counter()
    results = _result_storage(output)
    device = pick_device(config.embedding.device)
    input_size = config.embedding.input_size or default_input_size(device)
    emb = config.embedding
    weights = resolve_weights(emb.checkpoint, emb.pretrained, config.seed)
    logger.info(
        "embedding: %s on %s at %d px, weights: %s",
        emb.model,
        device,
        input_size,
        weights.describe(),
    )
    identity = model_identity(emb.model, weights, input_size)
    pool = load_datapool(output)
    repair_latest(output, pool, logger)
    process_all = config.datasource.process_all
    if not process_all:
        check_model(pool, identity, output)
    logger.info(
        "datapool: %s (%d objects, %d selected samples)%s",
        pool.version or "none yet",
        pool.size,
        len(pool.selected),
        "; ignored: process_all" if process_all else "",
    )
    workers = num_workers(config.num_workers)
    steps = {name: StepStats() for name in ("discover", "check", "dedup", "embed", "select")}

    check = check_shard.with_options(result_storage=results)
    check_videos = check_video_shard.with_options(result_storage=results)
    embed = embed_shard.with_options(result_storage=results)
    check_futures: list[PrefectFuture[CheckedShard]] = []
    embed_futures: list[PrefectFuture[EmbeddedShard]] = []
    # On a GPU, checking shard i+1 (CPU) overlaps embedding shard i. On a CPU both want
    # every core, and torch's threads slow down badly when decoding threads preempt
    # them, so there each shard's check waits for the previous shard's embedding.
    overlap = device.type == "cuda"
    found = Discovery()
    for shard in listing(config, found, None if process_all else pool.is_known):
        wait_for = [] if overlap or not embed_futures else [embed_futures[-1]]
        if shard.kind == "video":
            checked = check_videos.submit(  # type: ignore[call-overload]
                shard,
                config.input,
                config.output,
                input_size,
                config.every_nth_frame,
                config.datasource.use_frame_count_metadata,
                config.corruptness_check.keep_decodable_frames,
                config.shard_size,
                wait_for=wait_for,
            )
        else:
            checked = check.submit(  # type: ignore[call-overload]  # overload lacks wait_for
                shard,
                config.input,
                config.output,
                config.corruptness_check.max_image_pixels,
                config.enable_corruptness_check,
                input_size,
                workers,
                wait_for=wait_for,
            )
        check_futures.append(checked)
        embed_futures.append(
            embed.submit(  # type: ignore[call-overload]  # Prefect resolves the future
                checked,
                config.input,
                config.output,
                emb.model,
                weights,
                emb.checkpoint,
                input_size,
                str(device),
                emb.batch_size,
                workers,
            )
        )
    steps["discover"] = StepStats(
        seconds=found.seconds, retries=found.retries, shards=len(found.shards)
    )
    logger.info(
        "discovered %d images and %d videos in %d shards (%d other objects skipped)",
        found.discovered - found.videos,
        found.videos,
        len(found.shards),
        found.skipped,
    )
    try:
        checked_shards: list[CheckedShard] = _collect(check_futures, steps["check"])
    except UnfinishedRun:
        # On a CPU a check waits for the previous embedding: when that failed, the check
        # never ran. Raise the embedding's own error, not "check not finished".
        for future in embed_futures:
            if future.state.is_failed() or future.state.is_crashed():
                future.result()
        raise
    # What this run selects against: the datapool's picks, less the objects it redoes.
    prior_key = prior_hashes_key = None
    if not process_all:
        prior, prior_hashes = prior_for(pool, found.keys)
        if len(prior):
            prior_key = write_artifact(output, "prior", npy_bytes(prior), ".npy")
        if len(prior_hashes):
            hashes = to_parquet_bytes(prior_hashes)
            prior_hashes_key = write_artifact(output, "prior", hashes, ".parquet")

    duplicates_key = None
    if config.remove_exact_duplicates and checked_shards:
        t = time.perf_counter()
        dedup_future = dedup.with_options(result_storage=results).submit(
            checked_shards,
            config.output,
            include_frames=not config.selected_sequence_length,
            prior_key=prior_hashes_key,
        )
        duplicates_key = dedup_future.result()
        _count_single(steps["dedup"], dedup_future, time.perf_counter() - t)
    embedded: list[EmbeddedShard] = _collect(embed_futures, steps["embed"])

    picked: dict[str, Any] = {"selected": [], "sequences": []}
    if checked_shards:
        t = time.perf_counter()
        select_future = select_samples.with_options(result_storage=results).submit(
            checked_shards,
            embedded,
            duplicates_key,
            config.output,
            config.selection,
            config.stopping_condition,
            config.seed,
            str(device),
            config.selected_sequence_length,
            prior_key,
            config.input,
        )
        picked = json.loads(output.read(select_future.result()))
        _count_single(steps["select"], select_future, time.perf_counter() - t)
    for name, stats in steps.items():
        logger.info(
            "step %s: %d/%d shards from cache, %.2f s, %d bytes read",
            name,
            stats.cached_shards,
            stats.shards,
            stats.seconds,
            stats.bytes_read,
        )

    duplicates = json.loads(output.read(duplicates_key)) if duplicates_key else {}
    summary = RunSummary(
        run_id=run_id,
        config=config.model_dump(mode="json"),
        discovered=found.discovered + found.known,
        processed=found.discovered,
        skipped=found.skipped,
        dataset_bytes=found.total_bytes,
        steps=steps,
        embedding={
            "model": emb.model,
            "weights": weights.describe(),
            "input_size": input_size,
            "device": str(device),
        },
        versions=package_versions(),
    )
    source = open_storage(config.input)
    exported = export(
        output, source, summary, checked_shards, embedded, duplicates, picked, started
    )

    # The datapool, last: this run's outcome merged in, published by one atomic write.
    version = pool.version
    datapool_size = pool.size
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
    # The report first, then the commit, then LATEST: once the datapool holds this run's
    # picks, its run directory is complete, and LATEST is repaired by the next run if the
    # process dies before writing it (`repair_latest`).
    write_report(output, exported)
    if merged is not None:
        commit(output, pool, merged, run_id, config.datapool.keep_history, version)
    run_dir = point_latest(output, exported)
    logger.info("run written to %s; datapool %s holds %d objects", run_dir, version, datapool_size)
    return run_dir


def _count_single(stats: StepStats, future: PrefectFuture[Any], seconds: float) -> None:
    stats.shards = 1
    if future.state.name == "Cached":
        stats.cached_shards = 1
    else:
        stats.seconds = seconds
