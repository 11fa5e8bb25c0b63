"""`curate sanity-check`: does this machine, or a worker of a pool, have what a run needs?

On this machine it prints package versions, the device and a tiny embedding, the cloud
clients and a Prefect flow run. With `--pool NAME --output URL` the same checks run as a
`sanity` flow run on a worker of that pool (`sanity/NAME`, deployed by prefect.yaml),
which also writes and reads back an object in the output location; the CLI prints what
the worker found, or why no worker answered.
"""

from __future__ import annotations

import json
import platform
import time
import uuid
from typing import Any

from prefect import flow, get_run_logger

from tasks.errors import CurateError
from tasks.keys import CACHE_PREFIX

CLIENTS = ("boto3", "gcsfs", "adlfs", "av")


def machine_checks() -> list[tuple[str, str, bool]]:
    """(what, found, ok) for the packages, the device with a tiny embedding, the clients."""
    import numpy as np

    from flows.curate import package_versions
    from tasks.device import pick_device
    from tasks.models import Embedder, build_model
    from tasks.weights import resolve_weights

    found = [(name, value, True) for name, value in package_versions().items()]
    device = pick_device("auto")
    started = time.perf_counter()
    model = build_model("resnet18", resolve_weights(None, False, 0), None, device)
    vectors = Embedder(model, device).embed(np.zeros((2, 32, 32, 3), np.uint8), 2)
    seconds = time.perf_counter() - started
    found.append(
        ("embedding", f"resnet18 on {device}, dim {vectors.shape[1]}, {seconds:.2f} s", True)
    )
    for client in CLIENTS:
        try:
            module = __import__(client)
            found.append((client, getattr(module, "__version__", "ok"), True))
        except ImportError as exc:
            found.append((client, f"missing ({exc})", False))
    return found


def _key(token: str) -> str:
    return f"{CACHE_PREFIX}/sanity/{token}.json"


@flow(name="sanity", persist_result=False)
def sanity(output: str, token: str) -> None:
    """The machine's checks on a pool's worker; the output location is reached by
    writing them there (and reading them back)."""
    from tasks.storage import open_storage

    checks: list[Any] = [("host", platform.node(), True), *machine_checks()]
    storage = open_storage(output)
    data = json.dumps(checks).encode()
    storage.write(_key(token), data)
    if storage.read(_key(token)) != data:
        raise CurateError(f"output {output}: what was written reads back differently")
    for what, found, ok in checks:
        get_run_logger().info("%s: %s%s", what, found, "" if ok else " (PROBLEM)")


def on_pool(pool: str, output: str, timeout: float) -> list[tuple[str, str, bool]]:
    """Run `sanity` on a worker of `pool`; what it found, or a CurateError saying why not."""
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    from tasks.storage import open_storage

    token = uuid.uuid4().hex
    try:
        run: Any = run_deployment(
            name=f"sanity/{pool}", parameters={"output": output, "token": token}, timeout=timeout
        )
    except ObjectNotFound:
        raise CurateError(
            f"no deployment sanity/{pool}: deploy deployments/prefect.yaml "
            "(`prefect --no-prompt deploy --all --prefect-file deployments/prefect.yaml`), "
            "or name a pool it deploys to"
        ) from None
    state = run.state.type.value if run.state else "unknown"
    if state in ("SCHEDULED", "PENDING"):
        raise CurateError(
            f"pool {pool}: no worker took the check within {timeout:g} s; start one "
            f"(`infra/start-workers.sh {pool}`) and check PREFECT_API_URL on its machine"
        )
    storage = open_storage(output)
    if state != "COMPLETED" or not storage.exists(_key(token)):
        message = run.state.message if run.state else ""
        raise CurateError(f"pool {pool}: flow run {run.name} ended {state}: {message}")
    checks = [tuple(c) for c in json.loads(storage.read(_key(token)))]
    storage.delete(_key(token))
    return checks  # type: ignore[return-value]
