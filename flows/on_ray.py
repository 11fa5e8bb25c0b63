"""`orchestration.mode=ray`: the check and embed shard tasks on Ray, through Prefect's own
`RayTaskRunner` (prefect-ray), each asking Ray for its step's declared resources
(`num_cpus`, fractional `num_gpus`, `memory`) with prefect-ray's `remote_options`.

Ray is started when the first shard arrives (a run with nothing new never pays for it):
a local Ray sized by this machine's facts, on loopback, stopped after the run; or an
existing cluster (`orchestration.ray_address`), whose totals the asks are validated
against once connected. The tasks are the in-process run's, with the same cache keys, so
the results are the same. Training and pretagging stay in the pipeline's process.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from typing import Any

from prefect.futures import PrefectFuture

from flows.steps import submit_check, submit_embed
from flows.streams import LocalStreams
from tasks.resources import Gpu, Machine, run_plan, this_machine
from tasks.shards import CheckedShard, Shard

# Ray's shared-memory object store holds only the tasks' small results (keys, counts):
# its minimum, not Ray's default of 30% of the RAM.
OBJECT_STORE_BYTES = 96 << 20


def ray_machine(resources: dict[str, float], where: str) -> Machine:
    """A Ray cluster's totals as a machine: what its tasks' asks must fit."""
    gpus = tuple(Gpu("ray", 0, 0) for _ in range(int(resources.get("GPU", 0))))
    memory = int(resources.get("memory", 0))
    return Machine(resources.get("CPU", 0.0), memory, memory, gpus, where)


class RayStreams(LocalStreams):
    """Check and embed as Ray tasks of this flow run."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.runner: Any = None  # prefect_ray.RayTaskRunner, once started
        self.ray: dict[str, Any] = {}

    def plan_resources(self, logger: logging.Logger) -> None:
        """Start Ray, then plan: check and embed on Ray's resources (this machine's, for a
        local Ray), training and pretagging on this machine."""
        assert self.plan is not None
        on_gpu = self.plan.device.type == "cuda"
        here = this_machine(with_gpus=on_gpu)
        address = self.config.orchestration.ray_address
        self.runner = start_ray(address, here)
        if address:
            import ray

            cluster = ray_machine(ray.cluster_resources(), f"the Ray cluster at {address}")
            local = run_plan(self.config, on_gpu, here, on_this_machine=False)
            self.resources = local | run_plan(self.config, on_gpu, cluster, only=("check", "embed"))
            self.machine = here.describe() | {"ray": cluster.describe()}
        else:
            self.resources = run_plan(self.config, on_gpu, here)
            self.machine = here.describe()
        self.ray = {"address": address or "local", "start_seconds": self.runner.start_seconds}
        logger.info(
            "ray: %s Ray ready in %.1f s", "connected to the" if address else "started a local",
            self.runner.start_seconds,
        )  # fmt: skip

    def resources_report(self) -> dict[str, Any]:
        return super().resources_report() | {"ray": self.ray}

    def _asks(self, step: str) -> dict[str, Any]:
        return self.resources[step].ray_options()

    def check_waits_for(self) -> list[PrefectFuture[Any]]:
        # Ray schedules by the asks: on a CPU, check and embed each ask for the CPUs, so
        # Ray runs them one after the other without being told.
        return []

    def submit_check(self, shard: Shard, settings: Any, wait_for: list[PrefectFuture[Any]]) -> Any:
        from prefect_ray.context import remote_options

        with remote_options(**self._asks("check")):
            return submit_check(shard, settings, self.results, wait_for, runner=self.runner)

    def submit_embed(
        self, shard: Shard, checked: Any, settings: Any, wait_for: list[PrefectFuture[Any]]
    ) -> Any:
        from prefect_ray.context import remote_options

        with remote_options(**self._asks("embed")):
            return submit_embed(
                shard, checked, settings, self.results, wait_for, runner=self.runner
            )

    def embed_deferred(self, checked: list[CheckedShard], before: list[PrefectFuture[Any]]) -> None:
        # Pretagging ran in this process (thread futures do not travel to Ray): wait for
        # it, since it reads the model inputs that embedding deletes.
        for future in before:
            future.result()
        super().embed_deferred(checked, [])

    def _finished(self) -> int:
        import ray

        futures: list[Any] = [*self.checks, *self.embeds]  # PrefectRayFutures
        refs = [f.wrapped_future for f in futures]
        if not refs:
            return 0
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        return len(ready)

    def close(self, failed: bool) -> None:
        if self.runner is None:
            return
        import ray

        if failed:  # a remote cluster would go on with the run's tasks
            futures: list[Any] = [*self.checks, *self.embeds]
            for future in futures:
                with contextlib.suppress(Exception):
                    ray.cancel(future.wrapped_future, force=True)
        self.runner.__exit__(None, None, None)
        self.runner = None


def start_ray(address: str | None, machine: Machine) -> Any:
    """prefect-ray's task runner, entered: on an existing cluster, or on a local Ray of
    this machine's usable CPUs and GPUs, on loopback, without dashboard, stopped by the
    runner's exit."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no reports to Ray's servers
    from prefect.client.orchestration import get_client
    from prefect_ray import RayTaskRunner

    # Ray's workers talk to this run's Prefect API; in ephemeral mode (`curate run` with
    # no server) they would each start a server of their own.
    api_url = str(get_client(sync_client=True).api_url)
    init: dict[str, Any] = {
        "runtime_env": {"env_vars": {"PREFECT_API_URL": api_url}},
        "include_dashboard": False,
        "log_to_driver": False,  # the tasks' logs go to Prefect's API, as in-process
    }
    if not address:
        init |= {
            "num_cpus": max(1, math.ceil(machine.cpus)),
            "num_gpus": len(machine.gpus or ()),
            "object_store_memory": OBJECT_STORE_BYTES,
            # Ray's memory resource is what the asks were validated against (Ray's own
            # default, a share of the RAM, would leave a fitting ask waiting forever)
            "_memory": machine.available,
            "_node_ip_address": "127.0.0.1",
        }
    started = time.perf_counter()
    runner = RayTaskRunner(address=address, init_kwargs=init)
    runner.__enter__()
    runner.start_seconds = time.perf_counter() - started  # type: ignore[attr-defined]
    return runner
