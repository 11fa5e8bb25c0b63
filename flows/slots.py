"""Prefect global concurrency limits that the flows hold while they work: one deployment
run per output (the pipeline), one embedding at a time per device (the `embed` flow).

A limit is created on first use. Its slot is a lease the holding process renews, so a
process that died gives its slot back when the lease expires; `infra/start-server.sh`
keeps the leases on disk, so a restarted server still knows them.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import re
import time
from collections.abc import Iterator
from typing import Any

# A dead holder's slot comes back when its lease expires.
SLOT_LEASE_SECONDS = 60


def output_limit_name(output_url: str) -> str:
    """The global concurrency limit that keeps deployment runs on one output apart."""
    return f"curate-output-{hashlib.sha256(output_url.encode()).hexdigest()[:16]}"


def device_limit_name(device: str) -> str:
    """The limit of one device of this machine: its host, the GPUs the process may see
    (`CUDA_VISIBLE_DEVICES`, set per worker) and the device (`cuda:0`, `cpu`)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "all")
    name = f"curate-embed-{platform.node()}-{visible}-{device}"
    return re.sub(r"[^A-Za-z0-9._-]", "-", name)[:120]


@contextlib.contextmanager
def global_slot(
    name: str, limit: int, logger: logging.Logger | logging.LoggerAdapter[Any], why: str
) -> Iterator[None]:
    """Hold one slot of the global concurrency limit `name` (made with `limit` slots if
    it does not exist; an existing one is set to `limit`). Logs how long it waited, and
    for what (`why`)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import (
        GlobalConcurrencyLimitCreate,
        GlobalConcurrencyLimitUpdate,
    )
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            found = client.read_global_concurrency_limit_by_name(name)
            if found.limit != limit:
                client.update_global_concurrency_limit(
                    name, GlobalConcurrencyLimitUpdate(limit=limit)
                )
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):  # another run made it just now
                client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=name, limit=limit)
                )
    waited = time.monotonic()
    with concurrency(
        name,
        occupy=1,
        strict=True,
        lease_duration=SLOT_LEASE_SECONDS,
        raise_on_lease_renewal_failure=False,
    ):
        if time.monotonic() - waited > 1:
            logger.info(
                "waited %.0f s for %s (concurrency limit %s)",
                time.monotonic() - waited,
                why,
                name,
            )
        yield
