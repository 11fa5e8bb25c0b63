"""Faults, as an unattended user meets them: SIGINT (a terminal's Ctrl-C, to the whole
process group) and SIGTERM at random points of a `curate run`, the Prefect server
restarted under a deployment run, 20 runs triggered at once on one deployment, 5
datapools filled in parallel. After each: the process ends within
seconds and cleanly, a rerun completes, and the datapool holds every object exactly once."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import pytest
from deploys import (
    api,
    deploy,
    digits,
    pipeline_workers,
    reports,
    start_server,
    tail,
    wait_for_runs,
)

from tasks.datapool import load_datapool
from tasks.storage import open_storage

pytestmark = pytest.mark.reliability  # make test-reliability

if TYPE_CHECKING:
    from conftest import Reliability

CURATE = str(Path(sys.executable).parent / "curate")
SEED = int(os.environ.get("CURATE_FAULT_SEED", "15"))


def _run_args(folder: Path, out: Path) -> list[str]:
    return [
        CURATE,
        "run",
        f"input={folder}",
        f"output={out}",
        "stopping_condition.n_samples=6",
        "shard_size=40",
        "num_workers=1",
    ]


def _whole(out: Path, keys: set[str], reliability: Reliability) -> pd.DataFrame:
    """The datapool holds each of `keys` exactly once (and nothing else); its selection."""
    pool = load_datapool(open_storage(str(out)))
    objects = pool.objects["key"]
    reliability.add(lost=len(keys - set(objects)), doubled=int(objects.duplicated().sum()))
    assert objects.is_unique, objects[objects.duplicated()].tolist()
    assert set(objects) == keys, sorted(keys ^ set(objects))[:10]
    assert pool.selected["name"].is_unique
    return pool.selected


def _keys(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


@pytest.mark.slow
def test_sigint_and_sigterm_at_random_points_exit_within_seconds_and_a_rerun_completes(
    tmp_path, reliability
) -> None:
    folder = digits(tmp_path / "in", 120)
    keys = _keys(folder)
    rng = random.Random(SEED)
    selections = []
    for i, sig in enumerate([signal.SIGINT, signal.SIGTERM]):
        out = tmp_path / f"out{i}"
        at = rng.uniform(1, 15)  # from the command's start: imports, server, check, embed
        run = subprocess.Popen(
            _run_args(folder, out),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # a terminal: its Ctrl-C reaches the whole group
        )
        time.sleep(at)
        if run.poll() is None:
            os.killpg(run.pid, sig)
            sent = time.monotonic()
            _, err = run.communicate(timeout=60)
            took = time.monotonic() - sent
            reliability.add(faults=1)
            said = err.decode(errors="replace")
            where = f"{sig.name} at {at:.1f} s (CURATE_FAULT_SEED={SEED})"
            assert run.returncode in (0, 128 + sig), f"{where}: exit {run.returncode}\n{said}"
            if run.returncode:
                assert took < 15, f"{where}: the process took {took:.1f} s to end"
                assert "Traceback" not in said, f"{where}:\n{said}"
                assert said.strip().splitlines()[-1].startswith("interrupted:"), said
                assert len(said.strip().splitlines()) <= 3, said
        else:
            run.communicate()
        # Whatever the point, the next run starts at once and completes the datapool.
        rerun = subprocess.run(_run_args(folder, out), capture_output=True, timeout=600)
        assert rerun.returncode == 0, rerun.stderr.decode()[-2000:]
        selections.append(set(_whole(out, keys, reliability)["name"]))
    assert selections[0] == selections[1]  # and the result does not depend on the point


def _trigger(env: dict[str, str], deployment: str, n: int = 1) -> list[str]:
    found = api(env, "GET", f"/deployments/name/{deployment}")
    path = f"/deployments/{found['id']}/create_flow_run"
    # Keyed, so that a creation that timed out on a loaded server can be sent again.
    keys = [uuid.uuid4().hex for _ in range(n)]
    return [api(env, "POST", path, {"idempotency_key": key})["id"] for key in keys]


@pytest.mark.slow
def test_the_server_restarted_under_a_deployment_run_then_a_rerun_completes(
    tmp_path, reliability
) -> None:
    # The run holds its output's concurrency slot (a lease on the server) when the server
    # goes away. Before leases were kept on disk, the restarted server had forgotten the
    # lease, the slot was never given back and every later run waited for it forever.
    folder, out = digits(tmp_path / "in", 300), tmp_path / "out"
    with contextlib.ExitStack() as stack:  # the worker outlives the first server
        with start_server(tmp_path) as env:
            port = int(env["PREFECT_PORT"])
            deploy(env, folder, out)
            worker = stack.enter_context(pipeline_workers(env, tmp_path))
            (first_id,) = _trigger(env, "curate/full")
            deadline = time.monotonic() + 300
            while not any((out / "cache").glob("check*/*")):  # the run is at work
                assert time.monotonic() < deadline, tail(tmp_path / "worker.log")
                assert worker.poll() is None, tail(tmp_path / "worker.log")
                time.sleep(0.2)
        reliability.add(faults=1)  # the server is gone for a few seconds
        time.sleep(3)
        with start_server(tmp_path, port=port) as env:
            (first,) = wait_for_runs(env, [first_id], timeout=600)
            # It resumed and completed, or ended as failed or crashed: it never hangs.
            assert first["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED"), first["state"]
            (second,) = wait_for_runs(env, _trigger(env, "curate/full"), timeout=600)
            assert second["state"]["type"] == "COMPLETED", (
                second["state"],
                tail(tmp_path / "worker.log"),
            )
            _whole(out, _keys(folder), reliability)


@pytest.mark.slow
def test_twenty_runs_at_once_on_one_deployment_are_serialised_and_all_complete(
    server, tmp_path, reliability
) -> None:
    folder, out = digits(tmp_path / "in", 60), tmp_path / "out"
    env = deploy(server, folder, out)
    # Two workers: one runs a run, the other's runs are refused by the deployment's limit.
    with pipeline_workers(env, tmp_path, 2):
        run_ids = _trigger(env, "curate/incremental", 20)
        reliability.add(faults=20)
        runs = wait_for_runs(env, run_ids, timeout=900)
    states = [r["state"]["type"] for r in runs]
    assert states == ["COMPLETED"] * 20, (states, tail(tmp_path / "worker.log"))
    done = reports(out)
    assert len(done) >= 20  # the deployment's hourly schedule may have added one
    spans = sorted((r["started_at"], r["finished_at"]) for r in done)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False)), spans
    assert sorted(r["counts"]["processed"] for r in done) == [0] * (len(done) - 1) + [61]
    _whole(out, _keys(folder), reliability)


@pytest.mark.slow
def test_five_datapools_filled_in_parallel_do_not_interfere(server, tmp_path, reliability) -> None:
    # Five inputs overlapping in content (the same digits, other names and subsets), one
    # server, five outputs, all at once.
    folders = []
    for i in range(5):
        folder = digits(tmp_path / f"in{i}", 30 + 10 * i)
        for path in folder.iterdir():
            path.rename(path.with_name(f"p{i}_{path.name}"))
        folders.append(folder)
    runs = [
        subprocess.Popen(
            _run_args(folder, tmp_path / f"out{i}"),
            env=server,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for i, folder in enumerate(folders)
    ]
    for run in runs:
        _, err = run.communicate(timeout=900)
        assert run.returncode == 0, err.decode()[-2000:]
    reliability.add(faults=5)
    for i, folder in enumerate(folders):
        _whole(tmp_path / f"out{i}", _keys(folder), reliability)
        (report,) = reports(tmp_path / f"out{i}")
        assert report["counts"]["processed"] == 31 + 10 * i
