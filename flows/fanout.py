"""Child flow runs on work pools, dispatched with `run_deployment` and watched until done.

The pipeline flow hands batches of shards to `Fanout`; it keeps at most
`children_in_flight` child runs per deployment submitted and unfinished (the rest wait
here, as small job objects), reads each finished child's results from the output
location, and handles what Prefect alone does not:

- a child that failed (after its own Prefect retry) fails the run, named with its error;
- a child that crashed, or whose heartbeats stopped (its worker or machine died), is
  marked crashed in the API and its job dispatched again, up to `child_attempts` times:
  the shards it had done come from the cache;
- a child not finished `child_timeout_seconds` after it was submitted fails the run;
- when the run itself fails, its unfinished children are cancelled.
"""

from __future__ import annotations

import collections
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, cast
from uuid import UUID

from pydantic import BaseModel

from tasks.config import Orchestration
from tasks.errors import CurateError
from tasks.storage import Storage

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun

FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
POLL_SECONDS = 2.0
HEARTBEAT_EVENT = "prefect.flow-run.heartbeat"


@dataclass
class Child:
    """One job and the flow run doing it now."""

    deployment: str
    job: BaseModel
    result_key: str
    label: str  # what the run's error messages call it
    on_done: Callable[[Child, dict[str, Any]], None]
    attempt: int = 0
    run_id: UUID | None = None
    run_name: str = ""
    submitted: float = 0.0
    notes: list[str] = field(default_factory=list)


class Fanout:
    def __init__(self, settings: Orchestration, output: Storage, logger: logging.Logger) -> None:
        from prefect.client.orchestration import get_client

        self.settings = settings
        self.output = output
        self.logger = logger
        self.client = get_client(sync_client=True)
        self.client.__enter__()
        self.queued: dict[str, collections.deque[Child]] = collections.defaultdict(
            collections.deque
        )
        self.running: dict[UUID, Child] = {}
        self._last_poll = 0.0
        self._last_heartbeat_check = 0.0

    # The pipeline's side.

    def submit(self, child: Child) -> None:
        self.queued[child.deployment].append(child)
        self._start_queued()

    def poll_now_and_then(self) -> None:
        """Between shards being listed: look at the children at most every poll period."""
        if time.monotonic() - self._last_poll >= POLL_SECONDS:
            self.poll()

    def wait_until(self, done: Callable[[], bool]) -> None:
        """Watch the children until `done()` (their results are handed on as they come)."""
        while True:
            self.poll()
            if done():
                return
            time.sleep(POLL_SECONDS)

    def drain(self) -> None:
        """Wait until every child (and every child their results submit) is done."""
        self.wait_until(lambda: not self.running and not any(self.queued.values()))

    def close(self, failed: bool) -> None:
        """Cancel what is still running when the run failed; release the client."""
        if failed:
            self._cancel_running()
        self.client.__exit__(None, None, None)

    # Dispatch.

    def _start_queued(self) -> None:
        limit = self.settings.children_in_flight
        for deployment, queue in self.queued.items():
            in_flight = sum(1 for c in self.running.values() if c.deployment == deployment)
            while queue and in_flight < limit:
                self._start(queue.popleft())
                in_flight += 1

    def _start(self, child: Child) -> None:
        from prefect.deployments import run_deployment

        child.attempt += 1
        # as_subflow: the UI shows each child under the pipeline run that made it.
        run = cast(
            "FlowRun",
            run_deployment(
                name=child.deployment,
                parameters={"job": child.job.model_dump(mode="json")},
                timeout=0,
                as_subflow=True,
            ),
        )
        child.run_id, child.run_name = run.id, run.name
        child.submitted = time.monotonic()
        self.running[run.id] = child

    # Watching.

    def poll(self) -> None:
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        self._last_poll = time.monotonic()
        if not self.running:
            self._start_queued()
            return
        runs = self.client.read_flow_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(self.running)))
        )
        now = time.monotonic()
        lost = self._lost_children(runs) if now - self._last_heartbeat_check > 10 else set()
        for run in runs:
            child = self.running[run.id]
            state = run.state.type.value if run.state else "SCHEDULED"
            if state == "COMPLETED":
                del self.running[run.id]
                child.on_done(child, json.loads(self.output.read(child.result_key)))
            elif state in ("CRASHED", "CANCELLED") or run.id in lost:
                del self.running[run.id]
                message = run.state.message if run.state else ""
                if run.id in lost:
                    message = self._mark_lost(run.id)
                self._again(child, f"{state.lower()}: {message}")
            elif state == "FAILED":
                del self.running[run.id]
                self._cancel_running()
                raise CurateError(
                    f"{child.label} failed in flow run {child.run_name!r} ({run.id}) of "
                    f"{child.deployment}: {run.state.message if run.state else ''}"
                )
            elif now - child.submitted > self.settings.child_timeout_seconds:
                self._cancel_running()
                raise CurateError(
                    f"{child.label}: flow run {child.run_name!r} of {child.deployment} not "
                    f"finished after orchestration.child_timeout_seconds="
                    f"{self.settings.child_timeout_seconds:g} (state {state}); is a worker "
                    f"polling its pool? (`prefect worker start --pool ...`)"
                )
        self._start_queued()

    def _again(self, child: Child, why: str) -> None:
        child.notes.append(f"attempt {child.attempt} ({child.run_name}): {why}")
        if child.attempt >= self.settings.child_attempts:
            self._cancel_running()
            raise CurateError(
                f"{child.label} did not finish in {child.attempt} attempts "
                f"(orchestration.child_attempts): " + "; ".join(child.notes)
            )
        self.logger.warning(
            "%s: flow run %r %s; dispatching it again", child.label, child.run_name, why
        )
        self.queued[child.deployment].appendleft(child)

    def _lost_children(self, runs: list[Any]) -> set[UUID]:
        """Running children whose last heartbeat is older than
        `child_lost_after_seconds`, and pending ones that never started in that time. A
        running child that never sent one is never judged lost here (its worker may not
        send heartbeats): the timeout covers it."""
        from prefect.events.filters import (
            EventFilter,
            EventNameFilter,
            EventOccurredFilter,
            EventResourceFilter,
        )

        self._last_heartbeat_check = time.monotonic()
        limit = timedelta(seconds=self.settings.child_lost_after_seconds)
        now = datetime.now(UTC)
        # Pending: a worker took it and is starting its process (seconds); far longer,
        # the worker died in between.
        lost = {
            r.id
            for r in runs
            if r.state and r.state.type.value == "PENDING" and now - r.state.timestamp > limit
        }
        running = [r for r in runs if r.state and r.state.type.value == "RUNNING"]
        if not running:
            return lost
        # The newest heartbeat of each (`distinct`, newest first), from a recent window.
        horizon = datetime.now(UTC) - 3 * timedelta(seconds=self.settings.child_lost_after_seconds)
        page = self.client.read_events(
            EventFilter(
                occurred=EventOccurredFilter(since=horizon),
                event=EventNameFilter(name=[HEARTBEAT_EVENT]),
                resource=EventResourceFilter(
                    id=[f"prefect.flow-run.{r.id}" for r in running], distinct=True
                ),
            ),
            limit=50,  # the API's most; children in flight are fewer
        )
        last: dict[str, datetime] = {}
        for event in page.events:
            rid = event.resource.id
            last[rid] = max(last.get(rid, event.occurred), event.occurred)
        for run in running:
            beat = last.get(f"prefect.flow-run.{run.id}")
            if beat is not None and now - beat > limit:
                lost.add(run.id)
        return lost

    def _mark_lost(self, run_id: UUID) -> str:
        from prefect.states import Crashed

        message = (
            f"no heartbeat, or not started, for {self.settings.child_lost_after_seconds:g} s "
            "(orchestration.child_lost_after_seconds): its worker is gone"
        )
        self.client.set_flow_run_state(run_id, Crashed(message=message), force=True)
        return message

    def _cancel_running(self) -> None:
        from prefect.states import Cancelling

        for run_id, child in list(self.running.items()):
            try:
                self.client.set_flow_run_state(
                    run_id, Cancelling(message="the pipeline run failed"), force=True
                )
            except Exception as exc:  # the run's own error matters more
                self.logger.warning("could not cancel %s: %s", child.run_name, exc)
        self.running.clear()
