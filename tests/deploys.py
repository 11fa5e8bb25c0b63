"""A real Prefect deployment for tests: `infra/start-server.sh` on a free loopback port,
`prefect deploy` from `deployments/prefect.yaml`, process workers, the REST API. The
`server` and `worker` fixtures are registered by conftest.py."""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).parent / "prefect")
FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to its process group, again, then SIGKILL: an idle worker may ignore the
    first signal."""
    for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGKILL):
        if process.poll() is not None:
            return
        os.killpg(process.pid, sig)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture
def server(tmp_path: Path) -> Iterator[dict[str, str]]:
    """`infra/start-server.sh` on a free loopback port, with its own SQLite database and
    home; the scheduler loops every 5 s instead of 60 so a test sees its runs soon."""
    with start_server(tmp_path) as env:
        yield env


@functools.cache
def _migrated_database() -> Path:
    """An empty SQLite database with Prefect's schema, made once per test process: a
    fresh server spends 10-30 s of CPU on the migrations, every time."""
    database = Path(tempfile.mkdtemp(prefix="curate-tests-db-")) / "prefect.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")} | {
        "PREFECT_HOME": str(database.parent / "home"),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{database}",
    }
    subprocess.run(
        [PREFECT, "server", "database", "upgrade", "-y"],
        env=env,
        check=True,
        capture_output=True,
        timeout=600,
    )
    return database


@contextlib.contextmanager
def start_server(
    tmp_path: Path,
    extra: dict[str, str] | None = None,
    without: tuple[str, ...] = (),
    port: int | None = None,
) -> Iterator[dict[str, str]]:
    """The `server` fixture's server, with `extra` environment for the script (e.g. an
    auth string) and `without` some; yields the environment its clients use. The same
    `tmp_path` and `port` again start the same server anew (its database, its home)."""
    port = port or free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_PORT": str(port),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp_path}/prefect.db",
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5",
        "PREFECT": PREFECT,
        "PWD": str(REPO),  # prefect.yaml's pull step: the worker runs this checkout
    } | (extra or {})
    env = {k: v for k, v in env.items() if k not in without}
    if not (tmp_path / "prefect.db").exists():  # a restart keeps its database
        shutil.copyfile(_migrated_database(), tmp_path / "prefect.db")
    log = (tmp_path / "server.log").open("wb")
    process = subprocess.Popen(
        [str(REPO / "infra/start-server.sh")],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300  # minutes on a loaded two-core machine
    while "Prefect UI:" not in (tmp_path / "server.log").read_text(errors="replace"):
        if time.monotonic() > deadline or process.poll() is not None:
            stop(process)
            pytest.fail("infra/start-server.sh did not start: " + tail(tmp_path / "server.log"))
        time.sleep(0.5)
    try:
        yield env
    finally:
        stop(process)
        server_log = (tmp_path / "server.log").read_text(errors="replace")
        assert "InvalidRequestError" not in server_log, (
            "the scheduler failed: " + server_log[-3000:]
        )


def tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


def prefect_cli(env: dict[str, str], *args: str, timeout: int = 300) -> str:
    result = subprocess.run(
        [PREFECT, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout


def api(env: dict[str, str], method: str, path: str, body: object | None = None) -> Any:
    """One call to the server's REST API. A 503 is retried, as Prefect's own client does:
    the server answers it while SQLite is locked by another writer (a worker, the CLI);
    so is a read that timed out on a loaded machine (reads change nothing), and a write
    with an idempotency key (the server makes it once)."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if env.get("PREFECT_API_AUTH_STRING"):  # as Prefect's client does
        token = base64.b64encode(env["PREFECT_API_AUTH_STRING"].encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    request = urllib.request.Request(
        env["PREFECT_API_URL"] + path, data=data, method=method, headers=headers
    )
    for attempt in range(6):
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            if error.code != 503 or attempt == 5:
                raise
            time.sleep(0.5 * 2**attempt)
        except TimeoutError:
            reads = method == "GET" or path.endswith("/filter")
            once = isinstance(body, dict) and "idempotency_key" in body  # Prefect dedupes
            if not (reads or once) or attempt == 5:
                raise
    raise AssertionError("unreachable")


def deploy(server: dict[str, str], folder: Path, out: Path) -> dict[str, str]:
    """`prefect deploy --all` exactly as the README writes it: no prompt answered."""
    env = server | {"CURATE_INPUT": str(folder), "CURATE_OUTPUT": str(out)}
    result = subprocess.run(
        [PREFECT, "--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return env


@contextlib.contextmanager
def pipeline_workers(
    env: dict[str, str], tmp_path: Path, count: int = 1
) -> Iterator[subprocess.Popen[bytes]]:
    """`infra/start-workers.sh curate-local COUNT`, as the README starts them: each worker
    runs one pipeline at a time. Their lines go to `tmp_path/worker.log` (appended: workers
    started again keep the first ones' lines)."""
    process = subprocess.Popen(
        [str(REPO / "infra/start-workers.sh"), "curate-local", str(count)],
        env=env | {"PREFECT_WORKER_QUERY_SECONDS": "2"},
        cwd=tmp_path,
        stdout=(tmp_path / "worker.log").open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield process
    finally:
        stop(process)


@pytest.fixture
def worker(server: dict[str, str], tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A process worker on the pipeline's pool, started after the deployments."""
    with pipeline_workers(server, tmp_path) as process:
        yield process


def digits(folder: Path, n: int = 40) -> Path:
    from flows.demo import digit_images, encode

    folder.mkdir(parents=True, exist_ok=True)
    images, _ = digit_images()
    for i in range(n):
        (folder / f"d{i:03d}.png").write_bytes(encode(images[i], "PNG"))
    (folder / "zz_truncated.png").write_bytes(encode(images[0], "PNG")[:100])
    return folder


def wait_for_runs(env: dict[str, str], run_ids: list[str], timeout: float = 400) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        runs = [api(env, "GET", f"/flow_runs/{rid}") for rid in run_ids]
        if all(run["state"]["type"] in FINAL for run in runs) or time.monotonic() > deadline:
            return runs
        time.sleep(2)


def reports(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/report.json"))]
