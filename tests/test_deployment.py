"""The curate deployment through a real Prefect server, process work pool and worker."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).parent / "prefect")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL: an idle worker may ignore the first signal."""
    for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGKILL):
        if process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture
def server(tmp_path: Path) -> Iterator[dict[str, str]]:
    """`prefect server start` on loopback with its own SQLite database and home."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp_path}/prefect.db",
    }
    process = subprocess.Popen(
        [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{env['PREFECT_API_URL']}/health", timeout=2):
                break
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                _stop(process)
                pytest.fail("prefect server did not start")
            time.sleep(0.5)
    try:
        yield env
    finally:
        _stop(process)


def _prefect(env: dict[str, str], *args: str, timeout: int = 300) -> str:
    result = subprocess.run(
        [PREFECT, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout


@pytest.mark.slow
def test_deployment_runs_on_a_process_worker_from_the_cli(server, demo_folder, tmp_path):
    folder, expected = demo_folder
    _prefect(server, "work-pool", "create", "curate-local", "--type", "process")
    _prefect(server, "--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml")
    worker = subprocess.Popen(
        [PREFECT, "worker", "start", "--pool", "curate-local"],
        env=server,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        config = {
            "input": str(folder),
            "output": str(tmp_path / "out"),
            "stopping_condition": {"n_samples": 6},
        }
        out = _prefect(
            server,
            "deployment",
            "run",
            "curate/local",
            "--param",
            f"config={json.dumps(config)}",
            "--watch",
            "--watch-timeout",
            "400",
            timeout=450,
        )
        assert "Completed" in out, out
    finally:
        _stop(worker)
    run_id = (tmp_path / "out/LATEST").read_text().strip()
    run_dir = tmp_path / "out/runs" / run_id
    assert len((run_dir / "filenames/selected_filenames.txt").read_text().split()) == 6
    report = json.loads((run_dir / "report.json").read_text())
    assert report["counts"]["corrupt"] == len(expected)


@pytest.mark.slow
def test_the_server_rejects_an_invalid_config_before_creating_a_run(server):
    _prefect(server, "work-pool", "create", "curate-local", "--type", "process")
    _prefect(server, "--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml")
    result = subprocess.run(
        [
            PREFECT,
            "deployment",
            "run",
            "curate/local",
            "--param",
            'config={"input": "x", "output": "y", "stopping_condition": {"n_samples": -1}}',
        ],
        env=server,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "n_samples" in result.stdout + result.stderr


def _api(env: dict[str, str], method: str, path: str, body: object | None = None) -> object:
    """One call to the server's REST API. A 503 is retried, as Prefect's own client does:
    the server answers it while SQLite is locked by another writer (a worker, the CLI)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        env["PREFECT_API_URL"] + path,
        data=data,
        method=method,
        headers={"Content-Type": "application/json"},
    )
    for attempt in range(6):
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            if error.code != 503 or attempt == 5:
                raise
            time.sleep(0.5 * 2**attempt)
    raise AssertionError("unreachable")


@pytest.mark.slow
def test_incremental_deployment_is_scheduled_and_its_runs_never_overlap(server, tmp_path):
    from flows.demo import digit_images, encode

    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    images, _ = digit_images()
    for i in range(40):
        (folder / f"d{i:03d}.png").write_bytes(encode(images[i], "PNG"))
    env = server | {"CURATE_INPUT": str(folder), "CURATE_OUTPUT": str(out)}
    _prefect(env, "work-pool", "create", "curate-local", "--type", "process")
    _prefect(env, "--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml")

    deployment = _api(env, "GET", "/deployments/name/curate/incremental")
    assert isinstance(deployment, dict)
    crons = [s["schedule"].get("cron") for s in deployment["schedules"]]
    assert crons == ["0 * * * *"] and all(s["active"] for s in deployment["schedules"])
    assert deployment["parameters"]["config"]["input"] == str(folder)
    full = _api(env, "GET", "/deployments/name/curate/full")
    assert isinstance(full, dict) and not full["schedules"]
    assert full["parameters"]["config"]["datasource"]["process_all"] is True

    worker = subprocess.Popen(
        [PREFECT, "worker", "start", "--pool", "curate-local"],
        env=env | {"PREFECT_WORKER_QUERY_SECONDS": "2"},
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # One trigger through the CLI, one through the API, back to back.
        printed = _prefect(env, "deployment", "run", "curate/incremental")
        from_cli = printed.split("UUID:")[1].split()[0]
        from_api = _api(env, "POST", f"/deployments/{deployment['id']}/create_flow_run", {})
        assert isinstance(from_api, dict)
        runs: dict[str, dict] = {}
        deadline = time.monotonic() + 500
        while time.monotonic() < deadline:
            runs = {
                rid: _api(env, "GET", f"/flow_runs/{rid}") for rid in (from_cli, from_api["id"])
            }  # type: ignore[misc]
            if all(
                run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED") for run in runs.values()
            ):
                break
            time.sleep(2)
    finally:
        _stop(worker)
    assert [run["state"]["type"] for run in runs.values()] == ["COMPLETED", "COMPLETED"]
    first, second = sorted(runs.values(), key=lambda run: run["start_time"])
    assert first["end_time"] <= second["start_time"], "the two runs overlapped"
    reports = [
        json.loads(path.read_text()) for path in sorted((out / "runs").glob("*/report.json"))
    ]
    assert [r["counts"]["processed"] for r in reports] == [40, 0]
