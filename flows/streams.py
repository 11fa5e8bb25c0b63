"""Shards from discovery to checked and embedded, in this process or on work pools.

Discovery yields shards while the input is still being listed; each is handed on at
once. `LocalStreams` submits its check and embed as task runs of the pipeline flow
(`orchestration.mode=local`); `PooledStreams` batches shards into `check` flow runs on
the CPU pool and, as each finishes, `embed` flow runs on the GPU pool
(`orchestration.mode=pools`). Either way the pipeline then collects the results in
shard order, with each step's cost, and the progress artifact moves as shards finish.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from prefect.futures import PrefectConcurrentFuture, PrefectFuture

from flows.artifacts import RunProgress
from flows.fanout import Child, Fanout
from flows.steps import (
    CheckJob,
    CheckSettings,
    EmbedJob,
    EmbedSettings,
    checked_shard,
    job_result_key,
    shard_results_folder,
    submit_check,
    submit_embed,
)
from tasks.caching import result_storage
from tasks.config import CurateConfig
from tasks.datapool import Datapool
from tasks.discover import Discovery, discover_shards, load_patterns
from tasks.errors import CurateError
from tasks.monitor import monitored
from tasks.resources import StepPlan, asks_of, run_plan, this_machine
from tasks.shards import CheckedShard, EmbeddedShard, Shard, StepStats
from tasks.storage import Storage, open_storage
from tasks.weights import Weights, resolve_weights

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class EmbeddingPlan:
    """How this run embeds. Decided when the first shard arrives, so that a run with
    nothing new never imports torch or timm."""

    device: torch.device  # where this process computes (selection; embedding when local)
    embed_device: str  # what embeds get: a device here, or the setting for the GPU pool
    input_size: int
    weights: Weights
    checkpoint: str | None  # the local weights file, when weights come from one
    identity: dict[str, Any]  # what makes embeddings comparable (the datapool's model)

    def embed_settings(self, config: CurateConfig, num_proc: int | None) -> EmbedSettings:
        """`num_proc`: this machine's plan; None: the embedding machine plans."""
        ask = asks_of(config)["embed"]
        return EmbedSettings(
            input=config.input,
            output=config.output,
            model=config.embedding.model,
            weights=self.weights,
            checkpoint=self.checkpoint,
            input_size=self.input_size,
            device=self.embed_device,
            batch_size=config.embedding.batch_size,
            num_workers=num_proc or ask.num_proc or -1,
            ask=ask,
            per_device=config.orchestration.embeds_per_device,
        )


def plan_embedding(config: CurateConfig) -> EmbeddingPlan:
    """With pools, `embedding.device` is the GPU workers' setting and the input size
    defaults to a GPU's; this process selects on whatever it has."""
    import torch

    from tasks.device import default_input_size, pick_device
    from tasks.models import check_model_name

    emb = config.embedding
    pooled = config.orchestration.mode == "pools"
    device = pick_device("auto" if pooled else emb.device)
    check_model_name(emb.model)
    input_size = emb.input_size or default_input_size(torch.device("cuda") if pooled else device)
    weights = resolve_weights(emb.checkpoint, emb.pretrained, config.seed)
    identity = {
        "model": emb.model,
        "weights": weights.source,
        "weights_identity": weights.identity,
        "input_size": input_size,
    }
    embed_device = emb.device if pooled else str(device)
    return EmbeddingPlan(device, embed_device, input_size, weights, emb.checkpoint, identity)


def check_model(pool: Datapool, identity: dict[str, Any], output: Storage) -> None:
    """Embeddings of another model cannot be compared with the datapool's: refuse, and
    say how to go on (re-embedding them would mean re-reading every selected sample)."""
    if pool.model is not None and len(pool.selected) and pool.model != identity:
        raise CurateError(
            f"datapool {output.join('datapool')}: its {len(pool.selected)} selected "
            f"samples were embedded with {pool.model}, this run uses {identity}; run with "
            "datasource.process_all=true to rebuild it with this model, or use another output"
        )


def add_result(
    stats: StepStats, result: Any, cached: bool, batch_sizes: list[int] | None = None
) -> None:
    """One shard's cost of a step: nothing when it came from the cache."""
    stats.shards += 1
    if cached:
        stats.cached_shards += 1
    else:
        stats.seconds += result.seconds
        stats.bytes_read += result.bytes_read
        stats.retries += result.retries
        batch_size: int = getattr(result, "batch_size", 0)  # embeddings have one
        if batch_sizes is not None and batch_size:
            batch_sizes.append(batch_size)


class Streams:
    """What both ways of running share: the shards, the plan, the step results."""

    def __init__(
        self, config: CurateConfig, found: Discovery, progress: RunProgress, output: Storage
    ) -> None:
        self.config = config
        self.found = found
        self.progress = progress
        self.output = output
        self.results = result_storage(output)
        self.plan: EmbeddingPlan | None = None
        self.shards: list[Shard] = []
        self.trained: Any = None  # tasks.train.TrainedModel when training ran
        self.embed_devices: set[str] = set()
        self.batch_sizes: list[int] = []  # of the shards embedded by this run
        self.resources: dict[str, StepPlan] = {}  # the steps planned on this machine
        self.machine: dict[str, Any] = {}

    def plan_resources(self, logger: logging.Logger) -> None:
        """Each step's resources on this machine (validated: `auto` never over-asks,
        and explicit asks were checked before the run), logged and reported."""
        assert self.plan is not None
        on_gpu = self.plan.device.type == "cuda"
        machine = this_machine(with_gpus=on_gpu)
        here = self.config.orchestration.mode != "pools"
        self.resources = run_plan(self.config, on_gpu, machine, on_this_machine=here)
        self.machine = machine.describe()
        for step, p in self.resources.items():
            logger.info(
                "resources: %s: %g CPUs, %g GPUs, %d workers (%.1f GiB each%s)",
                step,
                p.num_cpus,
                p.num_gpus,
                p.num_proc,
                p.memory / (1 << 30),
                "" if p.memory_asked else ", estimated",
            )

    def workers(self, step: str) -> int | None:
        """The step's planned worker count here; None where another machine plans it."""
        planned = self.resources.get(step)
        return planned.num_proc if planned else None

    def resources_report(self) -> dict[str, Any]:
        steps = {step: dataclasses.asdict(p) for step, p in self.resources.items()}
        return {"machine": self.machine, "steps": steps}

    @property
    def deferred(self) -> bool:
        """Embeddings wait for all checks when training or pretagging comes first."""
        return self.config.enable_training or self.config.pretagging.checkpoint is not None

    def discover_stats(self) -> StepStats:
        found = self.found
        return StepStats(seconds=found.seconds, retries=found.retries, shards=len(found.shards))

    def embedding_report(self) -> dict[str, Any]:
        config = self.config
        if self.plan is None:
            return {"model": config.embedding.model, "weights": None, "device": None}
        return {
            "model": config.embedding.model,
            "weights": self.plan.weights.describe(),
            "input_size": self.plan.input_size,
            "device": ", ".join(sorted(self.embed_devices)) or self.plan.embed_device,
            # the smallest any shard ran with: below embedding.batch_size after a CUDA
            # out-of-memory (cached shards ran earlier and say nothing)
            "batch_size": min(self.batch_sizes, default=config.embedding.batch_size),
        }

    def embed_settings(self) -> EmbedSettings:
        assert self.plan is not None
        return self.plan.embed_settings(self.config, self.workers("embed"))

    # What each way of running does.

    def add(self, shard: Shard) -> None:
        raise NotImplementedError

    def listed(self) -> None:
        """Discovery is done."""

    def collect_checks(self, steps: dict[str, StepStats]) -> list[CheckedShard]:
        raise NotImplementedError

    def embed_deferred(self, checked: list[CheckedShard], before: list[PrefectFuture[Any]]) -> None:
        """Embed every shard once `before` (pretagging) is done, with `self.plan`."""
        raise NotImplementedError

    def collect_embeddings(self, steps: dict[str, StepStats]) -> list[EmbeddedShard]:
        raise NotImplementedError

    def close(self, failed: bool) -> None:
        """The run is over (or failed)."""

    def __enter__(self) -> Streams:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        self.close(failed=kind is not None)


class LocalStreams(Streams):
    """Check and embed as task runs of this flow run, in this process."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.checks: list[PrefectFuture[CheckedShard]] = []
        self.embeds: list[PrefectFuture[EmbeddedShard]] = []

    def add(self, shard: Shard) -> None:
        plan = self.plan
        assert plan is not None
        settings = CheckSettings.of(self.config, plan.input_size, self.workers("check"))
        checked = self.submit_check(shard, settings, self.check_waits_for())
        self.checks.append(checked)
        self.shards.append(shard)
        if not self.deferred:
            self.embeds.append(self.submit_embed(shard, checked, self.embed_settings(), []))

    def check_waits_for(self) -> list[PrefectFuture[Any]]:
        """On a GPU, checking shard i+1 (CPU) overlaps embedding shard i. On a CPU both
        want every core, and torch's threads slow down badly when decoding threads
        preempt them, so there each shard's check waits for the previous embedding."""
        assert self.plan is not None
        return [] if self.plan.device.type == "cuda" else self.embeds[-1:]

    def submit_check(
        self, shard: Shard, settings: CheckSettings, wait_for: list[PrefectFuture[Any]]
    ) -> PrefectFuture[CheckedShard]:
        return submit_check(shard, settings, self.results, wait_for)

    def submit_embed(
        self,
        shard: Shard,
        checked: Any,
        settings: EmbedSettings,
        wait_for: list[PrefectFuture[Any]],
    ) -> PrefectFuture[EmbeddedShard]:
        return submit_embed(shard, checked, settings, self.results, wait_for)

    def _finished(self) -> int:
        """Step runs finished so far (asked without an API call)."""
        futures = [*self.checks, *self.embeds]
        return sum(
            1 for f in futures if cast(PrefectConcurrentFuture[Any], f).wrapped_future.done()
        )

    def collect_checks(self, steps: dict[str, StepStats]) -> list[CheckedShard]:
        from prefect.exceptions import UnfinishedRun

        try:
            checked = self._collect("check", self.checks, steps.setdefault("check", StepStats()))
        except UnfinishedRun:
            # On a CPU a check waits for the previous embedding: when that failed, the
            # check never ran. Raise the embedding's own error, not "check not finished".
            for future in self.embeds:
                if future.state.is_failed() or future.state.is_crashed():
                    future.result()
            raise
        self.progress.terminal.add_step("embed", total_samples=sum(c.valid for c in checked))
        return checked

    def embed_deferred(self, checked: list[CheckedShard], before: list[PrefectFuture[Any]]) -> None:
        settings = self.embed_settings()
        for i, (shard, check) in enumerate(zip(self.shards, checked, strict=True)):
            wait = before[i : i + 1]  # the shard's pretagging reads the inputs embed deletes
            self.embeds.append(self.submit_embed(shard, check, settings, wait))

    def collect_embeddings(self, steps: dict[str, StepStats]) -> list[EmbeddedShard]:
        return self._collect("embed", self.embeds, steps.setdefault("embed", StepStats()))

    def _collect(self, step: str, futures: list[PrefectFuture[Any]], stats: StepStats) -> list[Any]:
        """Results in order, with this run's cost of the step added to `stats`."""
        results = []
        for future in futures:
            result = future.result()
            add_result(stats, result, future.state.name == "Cached", self.batch_sizes)
            results.append(result)
            # check counts objects (a video is one), embed counts samples (its frames)
            samples = self.found.shards[len(results) - 1].count if step == "check" else result.count
            self.progress.finished(step, samples, self._finished())
        return results


class PooledStreams(Streams):
    """Check and embed as child flow runs on the CPU and GPU pools."""

    def __init__(self, *args: Any, logger: logging.Logger) -> None:
        super().__init__(*args)
        self.settings = self.config.orchestration
        self.fanout = Fanout(self.settings, self.output, logger)
        self.batch: list[Shard] = []
        self.checked: dict[int, tuple[CheckedShard, bool]] = {}  # by shard index
        self.embedded: dict[int, tuple[EmbeddedShard, bool]] = {}
        self.done = 0

    def add(self, shard: Shard) -> None:
        self.shards.append(shard)
        self.batch.append(shard)
        if sum(s.count for s in self.batch) >= self.settings.samples_per_child:
            self._dispatch_checks()
        self.fanout.poll_now_and_then()

    def listed(self) -> None:
        if self.batch:
            self._dispatch_checks()

    def _dispatch_checks(self) -> None:
        """A check child for the batch and, unless embedding waits for the whole
        dataset, its embed child at once: it starts its process and builds its model
        while the shards are checked, and embeds each the moment it is."""
        assert self.plan is not None
        job = CheckJob(
            shards=self.batch, settings=CheckSettings.of(self.config, self.plan.input_size)
        )
        self.batch = []
        key = job_result_key("check", job)
        # Another run's results for the same job would point to model inputs since deleted.
        self.output.delete(key)
        self.output.delete_folder(shard_results_folder(key))
        self._submit("check", f"check/{self.settings.cpu_pool}", job, self._checks_done)
        if not self.deferred:
            self._dispatch_embeds(job.shards, check_results=key)

    def _submit(self, step: str, deployment: str, job: Any, on_done: Any) -> None:
        shards = job.shards
        label = f"{step} of shards {shards[0].index}-{shards[-1].index}"
        child = Child(deployment, job, job_result_key(step, job), label, on_done)
        self.fanout.submit(child)

    def _checks_done(self, child: Child, report: dict[str, Any]) -> None:
        job = cast(CheckJob, child.job)
        for shard, raw, cached in zip(job.shards, report["shards"], report["cached"], strict=True):
            self.checked[shard.index] = (checked_shard(raw), cached)
            self._finished("check", shard.count)

    def _dispatch_embeds(
        self,
        shards: list[Shard],
        checked: list[CheckedShard] | None = None,
        check_results: str | None = None,
    ) -> None:
        job = EmbedJob(
            shards=shards,
            checked=checked or [],
            check_results=check_results,
            settings=self.embed_settings(),
        )
        self._submit("embed", f"embed/{self.settings.gpu_pool}", job, self._embeds_done)

    def _embeds_done(self, child: Child, report: dict[str, Any]) -> None:
        job = cast(EmbedJob, child.job)
        for shard, raw, cached in zip(job.shards, report["shards"], report["cached"], strict=True):
            result = EmbeddedShard(**raw)
            self.embedded[shard.index] = (result, cached)
            self._finished("embed", result.count)
        self.embed_devices.add(f"{report['device']} ({report['host']})")

    def _finished(self, step: str, samples: int) -> None:
        self.done += 1
        self.progress.finished(step, samples, self.done)

    def _ordered(self, results: dict[int, tuple[Any, bool]], stats: StepStats) -> list[Any]:
        ordered = []
        for shard in self.shards:
            result, cached = results[shard.index]
            add_result(stats, result, cached, self.batch_sizes)
            ordered.append(result)
        return ordered

    def collect_checks(self, steps: dict[str, StepStats]) -> list[CheckedShard]:
        # Checks first: embeds they started go on while dedup runs.
        self.fanout.wait_until(lambda: len(self.checked) == len(self.shards))
        checked = self._ordered(self.checked, steps.setdefault("check", StepStats()))
        self.progress.terminal.add_step("embed", total_samples=sum(c.valid for c in checked))
        return checked

    def embed_deferred(self, checked: list[CheckedShard], before: list[PrefectFuture[Any]]) -> None:
        for future in before:  # pretagging reads the model inputs that embedding deletes
            future.result()
        batch: list[tuple[Shard, CheckedShard]] = []
        for shard, check in zip(self.shards, checked, strict=True):
            batch.append((shard, check))
            if sum(s.count for s, _ in batch) >= self.settings.samples_per_child:
                self._dispatch_embeds([s for s, _ in batch], [c for _, c in batch])
                batch = []
        if batch:
            self._dispatch_embeds([s for s, _ in batch], [c for _, c in batch])

    def collect_embeddings(self, steps: dict[str, StepStats]) -> list[EmbeddedShard]:
        self.fanout.drain()
        return self._ordered(self.embedded, steps.setdefault("embed", StepStats()))

    def close(self, failed: bool) -> None:
        self.fanout.close(failed)


def stream_shards(
    config: CurateConfig,
    output: Storage,
    pool: Datapool,
    progress: RunProgress,
    logger: logging.Logger,
) -> Streams:
    """The discover step, with each shard handed on the moment its manifest is written:
    a bucket of millions of keys is worked on while it is still being listed. Discover
    runs in the flow itself, never cached: listing is how a run learns what is new; the
    storage layer retries transient listing failures."""
    source = open_storage(config.input)
    patterns = None
    if config.datasource.relevant_filenames_file:
        patterns = load_patterns(config.datasource.relevant_filenames_file, source, output)
    found = Discovery()
    streams: Streams
    if config.orchestration.mode == "pools":
        streams = PooledStreams(config, found, progress, output, logger=logger)
    elif config.orchestration.mode == "ray":
        from flows.on_ray import RayStreams  # imports Ray only when asked

        streams = RayStreams(config, found, progress, output)
    else:
        streams = LocalStreams(config, found, progress, output)
    is_known = None if config.datasource.process_all else pool.is_known
    try:
        listing = discover_shards(source, output, config.shard_size, patterns, found, is_known)
        for shard in monitored("discover", listing):
            if streams.plan is None:
                streams.plan = first_shard_plan(config, pool, output, logger)
                streams.plan_resources(logger)
            streams.add(shard)
            progress.listed_shard(shard.count)
        streams.listed()
    except BaseException:
        streams.close(failed=True)
        raise
    progress.listed = True
    progress.update()
    logger.info(
        "discovered %d new images and %d new videos in %d shards; %d unchanged objects "
        "already in the datapool, %d other objects skipped",
        found.discovered - found.videos,
        found.videos,
        len(found.shards),
        found.known,
        found.skipped,
    )
    return streams


def first_shard_plan(
    config: CurateConfig, pool: Datapool, output: Storage, logger: logging.Logger
) -> EmbeddingPlan:
    """Only a run with something new pays for torch, timm and PyAV."""
    plan = plan_embedding(config)
    # A run that trains first compares its trained model, once it has it.
    if not config.datasource.process_all and not config.enable_training:
        check_model(pool, plan.identity, output)
    where = (
        f"the {config.orchestration.gpu_pool} pool's workers ({plan.embed_device})"
        if config.orchestration.mode == "pools"
        else plan.embed_device
    )
    logger.info(
        "embedding: %s on %s at %d px, weights: %s",
        config.embedding.model,
        where,
        plan.input_size,
        plan.weights.describe(),
    )
    return plan


def replace_plan(streams: Streams, **changes: Any) -> EmbeddingPlan:
    assert streams.plan is not None
    streams.plan = dataclasses.replace(streams.plan, **changes)
    return streams.plan
