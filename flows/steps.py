"""The per-shard steps, run in the pipeline's own process or as flows on work pools.

`submit_check` and `submit_embed` start one shard's cached task in the current flow run;
the pipeline flow uses them directly (`orchestration.mode=local`). The `check` and
`embed` flows run the same tasks for a batch of shards on a worker of the CPU or GPU pool
(`orchestration.mode=pools`): each takes one small typed job, writes its results to the
output location (never a worker's disk or Prefect's result storage) and returns their
key. Done shards come from the cache, so a job dispatched again after a crash redoes
only what was lost. The GPU pool reads the model inputs the CPU pool wrote, not the input.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import platform
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import Task, flow, get_run_logger
from prefect.futures import PrefectFuture
from prefect.task_runners import TaskRunner
from pydantic import BaseModel

from flows.slots import device_limit_name, global_slot
from tasks.caching import OutputResults, result_storage
from tasks.config import CurateConfig
from tasks.errors import CurateError
from tasks.keys import artifact_key, content_key
from tasks.resources import Ask, asks_of, step_plan
from tasks.shards import CheckedShard, EmbeddedShard, Shard
from tasks.stop import stop_threads_on_sigterm
from tasks.storage import open_storage
from tasks.weights import Weights


def step_options(step: str, title: str, results: Path | OutputResults) -> dict[str, Any]:
    """A task run named by step and what it works on (`check shard 3 (a.jpg .. k.jpg,
    2000 images)`, `dedup 7 shards`). No tags: Prefect asks the server for a concurrency
    slot per tag on every task run, and on SQLite two such requests at once fail with
    "database is locked" (a deferred transaction upgraded to a write), which the client
    retries after 2 s, each time."""
    return {"task_run_name": f"{step} {title}", "result_storage": results}


class CheckSettings(BaseModel):
    """What checking a shard needs besides the shard."""

    input: str
    output: str
    input_size: int
    max_image_pixels: int
    pixels_in_flight: int
    full_check: bool
    every_nth_frame: int
    use_frame_count_metadata: bool
    keep_decodable_frames: bool
    chunk: int
    num_workers: int  # decode threads; -1: planned by the machine that checks
    ask: Ask = Ask()  # resources.check, for that plan

    @classmethod
    def of(
        cls, config: CurateConfig, input_size: int, num_proc: int | None = None
    ) -> CheckSettings:
        """`num_proc`: this machine's plan; None: the checking machine plans."""
        ask = asks_of(config)["check"]
        return cls(
            input=config.input,
            output=config.output,
            input_size=input_size,
            max_image_pixels=config.corruptness_check.max_image_pixels,
            pixels_in_flight=config.corruptness_check.pixels_in_flight
            or config.corruptness_check.max_image_pixels,
            full_check=config.enable_corruptness_check,
            every_nth_frame=config.every_nth_frame,
            use_frame_count_metadata=config.datasource.use_frame_count_metadata,
            keep_decodable_frames=config.corruptness_check.keep_decodable_frames,
            chunk=config.shard_size,
            num_workers=num_proc or ask.num_proc or -1,
            ask=ask,
        )

    def planned(self) -> CheckSettings:
        """With the worker count planned on this machine, validated (a step flow on a
        pool's worker checks its own step against its own machine)."""
        if self.num_workers > 0 and not self.ask.explicit:
            return self
        workers = step_plan("check", self.ask, on_gpu=False).num_proc
        return self.model_copy(update={"num_workers": workers})


class EmbedSettings(BaseModel):
    """What embedding a checked shard needs besides it. `device` is a setting (`auto`,
    `cuda:1`) that the machine which embeds resolves."""

    input: str
    output: str
    model: str
    weights: Weights
    checkpoint: str | None
    input_size: int
    device: str
    batch_size: int
    num_workers: int  # loader threads; -1: planned by the machine that embeds
    ask: Ask = Ask()  # resources.embed, for that plan
    per_device: int = 1  # orchestration.embeds_per_device

    def planned(self, on_gpu: bool) -> EmbedSettings:
        """As `CheckSettings.planned`, for the embedding machine."""
        if self.num_workers > 0 and not self.ask.explicit:
            return self
        workers = step_plan("embed", self.ask, on_gpu).num_proc
        return self.model_copy(update={"num_workers": workers})


def submit_check(
    shard: Shard,
    settings: CheckSettings,
    results: Path | OutputResults,
    wait_for: list[PrefectFuture[Any]] | None = None,
    runner: TaskRunner[Any] | None = None,
) -> PrefectFuture[CheckedShard]:
    """The check step (with metadata and model inputs) of one shard, on the flow's task
    runner or on `runner` (a RayTaskRunner)."""
    from tasks.check import check_shard
    from tasks.frames import check_video_shard
    from tasks.inputs import PIXELS_IN_FLIGHT

    s = settings
    # The budget is the process's (its decode threads and its model-input path): set here,
    # where every shard passes, cached or not.
    PIXELS_IN_FLIGHT.set_limit(s.pixels_in_flight)
    options = step_options("check", shard.title, results)
    if shard.kind == "video":
        video = check_video_shard.with_options(**options)
        frames = (s.every_nth_frame, s.use_frame_count_metadata, s.keep_decodable_frames, s.chunk)
        return _submit(video, (shard, s.input, s.output, s.input_size, *frames), wait_for, runner)
    images = (s.max_image_pixels, s.full_check, s.input_size, s.num_workers)
    return _submit(
        check_shard.with_options(**options), (shard, s.input, s.output, *images), wait_for, runner
    )


def submit_embed(
    shard: Shard,
    checked: Any,
    settings: EmbedSettings,
    results: Path | OutputResults,
    wait_for: list[PrefectFuture[Any]] | None = None,
    runner: TaskRunner[Any] | None = None,
) -> PrefectFuture[EmbeddedShard]:
    """The embed step of one shard (`checked`: its check's future or result);
    `settings.device` is resolved here, so the cache key names the device used."""
    from tasks.device import pick_device
    from tasks.embed import embed_shard

    s = settings
    task = embed_shard.with_options(**step_options("embed", shard.title, results))
    args = (checked, s.input, s.output, s.model, s.weights, s.checkpoint, s.input_size)
    more = (str(pick_device(s.device)), s.batch_size, s.num_workers)
    return _submit(task, (*args, *more), wait_for, runner)


def _submit(
    task: Task[Any, Any],
    args: tuple[Any, ...],
    wait_for: list[PrefectFuture[Any]] | None,
    runner: TaskRunner[Any] | None,
) -> PrefectFuture[Any]:
    """`task.submit(*args)` on the flow's task runner, or on `runner`, which Prefect
    offers the same way (`Task.submit` hands its parameters to the flow's runner)."""
    if runner is None:
        return task.submit(*args, wait_for=wait_for or [])
    from prefect.utilities.callables import get_call_parameters

    return runner.submit(task, get_call_parameters(task.fn, args, {}), wait_for or [])


class CheckJob(BaseModel):
    """A batch of shards for the CPU pool."""

    shards: list[Shard]
    settings: CheckSettings


class EmbedJob(BaseModel):
    """A batch of shards for the GPU pool: checked already (`checked`), or being checked
    by the check job whose results are at `check_results` (its shards, in order), each
    embedded as soon as its check is done."""

    shards: list[Shard]
    checked: list[CheckedShard] = []
    check_results: str | None = None
    settings: EmbedSettings


def job_result_key(step: str, job: BaseModel) -> str:
    """Where a step flow leaves its results: named by the job, so that the pipeline
    knows it without asking Prefect for a result."""
    return artifact_key(f"{step}-job", content_key(step, job=job.model_dump(mode="json")), ".json")


def shard_results_folder(job_key: str) -> str:
    """Where a check flow leaves each shard's result the moment it has it, for the embed
    child that waits for them (see `shard_result_key`)."""
    return job_key.removesuffix(".json")


def shard_result_key(job_key: str, position: int) -> str:
    """The result of the job's `position`th shard (`0.json`, `1.json`, ... in its order)."""
    return f"{shard_results_folder(job_key)}/{position}.json"


def checked_shard(raw: dict[str, Any]) -> CheckedShard:
    """A CheckedShard from its JSON."""
    return CheckedShard(**{**raw, "inputs": tuple(raw["inputs"])})


def _finish(
    step: str, job: BaseModel, output_url: str, futures: list[PrefectFuture[Any]], device: str
) -> str:
    """Wait for the shards' task runs in order, each shard's result written as it comes;
    then write what they returned, which came from the cache, and where it ran."""
    output = open_storage(output_url)
    key = job_result_key(step, job)
    results, cached = [], []
    for position, future in enumerate(futures):
        results.append(dataclasses.asdict(future.result()))
        cached.append(future.state.name == "Cached")
        if step == "check":
            output.write(shard_result_key(key, position), json.dumps(results[-1]).encode())
    report = {"shards": results, "cached": cached, "host": platform.node(), "device": device}
    output.write(key, json.dumps(report).encode())
    return key


# How often an embed child looks for its next checked shard, and for its pipeline's state.
CHECKED_POLL_SECONDS = 0.5
PIPELINE_POLL_SECONDS = 15.0


def _checked_as_they_come(job: EmbedJob) -> Iterator[CheckedShard]:
    """The job's checked shards in order: given, or each read once its check child has
    written it. Waits as long as the pipeline run that dispatched both is running (its
    check child may queue behind others); a pipeline that ended leaves nothing to wait for."""
    if job.check_results is None:
        yield from job.checked
        return
    from prefect.runtime import flow_run

    output = open_storage(job.settings.output)
    pipeline = flow_run.get_parent_flow_run_id()
    looked = time.monotonic()
    for position, shard in enumerate(job.shards):
        part = shard_result_key(job.check_results, position)
        while not output.exists(part):
            if pipeline and time.monotonic() - looked > PIPELINE_POLL_SECONDS:
                looked = time.monotonic()
                _stop_unless_running(pipeline)
            time.sleep(CHECKED_POLL_SECONDS)
        checked = checked_shard(json.loads(output.read(part)))
        assert checked.shard_index == shard.index, (checked.shard_index, shard.index)
        yield checked


def _stop_unless_running(flow_run_id: str) -> None:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        state = client.read_flow_run(UUID(flow_run_id)).state
    if state is not None and state.is_final():
        raise CurateError(
            f"the pipeline run {flow_run_id} ended ({state.name}) before this job's shards "
            "were checked"
        )


def job_run_name() -> str:
    """A step flow run is named after its step and shards: `check shards 0-4 (a.jpg ..
    z.jpg, 10000 samples)`, `embed video 7 (cam1/a.mp4)`."""
    from prefect.runtime import flow_run

    job = flow_run.parameters["job"]  # the validated job, or its JSON before validation
    shards = (
        job.shards if isinstance(job, (CheckJob, EmbedJob)) else [Shard(**s) for s in job["shards"]]
    )
    step = flow_run.flow_name
    if len(shards) == 1:
        return f"{step} {shards[0].title}"
    first, last = shards[0], shards[-1]
    samples = sum(s.count for s in shards)
    return (
        f"{step} shards {first.index}-{last.index} ({first.first} .. {last.last or last.first}, "
        f"{samples} objects)"
    )


@flow(name="check", flow_run_name=job_run_name, persist_result=False, retries=1)
def check(job: CheckJob) -> str:
    """Check a batch of shards (corruptness, metadata, model inputs) on this machine;
    returns the key of their results in the output location."""
    results = result_storage(open_storage(job.settings.output))
    settings = job.settings.planned()
    # One shard at a time: each check already decodes on every core it is given.
    futures: list[PrefectFuture[Any]] = []
    with stop_threads_on_sigterm():  # a cancelled child stops within one image
        for shard in job.shards:
            futures.append(submit_check(shard, settings, results, wait_for=futures[-1:]))
        get_run_logger().info("checking %d shards on %s", len(job.shards), platform.node())
        return _finish("check", job, job.settings.output, futures, "cpu")


@flow(name="embed", flow_run_name=job_run_name, persist_result=False, retries=1)
def embed(job: EmbedJob) -> str:
    """Embed a batch of checked shards from their model inputs on this machine's device;
    returns the key of their results in the output location."""
    from tasks.device import pick_device
    from tasks.models import get_embedder

    device = pick_device(job.settings.device)
    settings = job.settings.planned(on_gpu=device.type == "cuda")
    logger = get_run_logger()
    results = result_storage(open_storage(settings.output))
    futures: list[PrefectFuture[Any]] = []
    with stop_threads_on_sigterm():  # a cancelled child stops within one batch
        # The model is built before the device's slot is taken: while one child embeds,
        # the next starts its process, imports torch and builds its model.
        get_embedder(settings.model, settings.weights, settings.checkpoint, device)
        # Nor is the device held while this job's first shard is being checked.
        coming = _checked_as_they_come(job)
        first = next(coming)
        why = f"the other embeddings on {device}"
        with global_slot(device_limit_name(str(device)), settings.per_device, logger, why):
            logger.info(
                "embedding %d shards with %s on %s (%s)",
                len(job.shards),
                settings.model,
                device,
                platform.node(),
            )
            for shard, checked in zip(job.shards, itertools.chain([first], coming), strict=True):
                futures.append(
                    submit_embed(shard, checked, settings, results, wait_for=futures[-1:])
                )
            return _finish("embed", job, settings.output, futures, str(device))
