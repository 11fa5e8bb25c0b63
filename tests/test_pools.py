"""Pooled runs end to end: a real server (`infra/start-server.sh`), the deployments of
`deployments/prefect.yaml`, workers started by `infra/start-workers.sh` (two on
curate-cpu, one on curate-gpu, on the CPU here) and one on the pipeline's pool."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from deploys import PREFECT, REPO, api, deploy, digits, reports, stop, tail, wait_for_runs

# Small shards and children, so that a few hundred images make several of each.
SETTINGS = {
    "shard_size": 40,
    "embedding": {"input_size": 32},
    "stopping_condition": {"n_samples": 15},
}
# Two heartbeats (every 30 s, Prefect's least) before a child is taken for lost: a loaded
# machine may delay one, and a child waits for its shards' checks.
POOLED = {"mode": "pools", "samples_per_child": 80, "child_lost_after_seconds": 65}


@pytest.fixture
def start_workers(server: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., list[int]]]:
    """`infra/start-workers.sh POOL N`; returns the workers' pids."""
    started: list[subprocess.Popen[bytes]] = []
    logs = tmp_path / "workers"

    def start(pool: str, count: int) -> list[int]:
        out = logs / f"{pool}.out"
        logs.mkdir(exist_ok=True)
        process = subprocess.Popen(
            [str(REPO / "infra/start-workers.sh"), pool, str(count)],
            env=server | {"PREFECT_WORKER_QUERY_SECONDS": "2", "CURATE_WORKER_LOGS": str(logs)},
            stdout=out.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        started.append(process)
        deadline = time.monotonic() + 30
        while len(pids := re.findall(r"\(pid (\d+)\)", out.read_text())) < count:
            assert time.monotonic() < deadline, tail(out)
            time.sleep(0.2)
        return [int(p) for p in pids]

    try:
        yield start
    finally:
        for process in started:
            stop(process)


def _run(env: dict[str, str], deployment: str, parameters: dict) -> str:
    found = api(env, "GET", f"/deployments/name/{deployment}")
    run = api(
        env, "POST", f"/deployments/{found['id']}/create_flow_run", {"parameters": parameters}
    )
    return str(run["id"])


def _children(env: dict[str, str], deployment: str) -> list[dict]:
    found = api(env, "GET", f"/deployments/name/{deployment}")
    return list(
        api(
            env,
            "POST",
            "/flow_runs/filter",
            {"flow_runs": {"deployment_id": {"any_": [found["id"]]}}},
        )
    )


CURATE = str(Path(PREFECT).parent / "curate")


def _curate(env: dict[str, str], *args: str) -> str:
    result = subprocess.run([CURATE, *args], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout


def _in_process(env: dict[str, str], folder: Path, out: Path) -> Path:
    """The same input curated by `curate run` in one process: what pools must equal."""
    args = [
        f"input={folder}",
        f"output={out}",
        f"shard_size={SETTINGS['shard_size']}",
        "embedding.input_size=32",
        "stopping_condition.n_samples=15",
    ]
    printed = _curate(env, "run", *args)
    return Path(printed.strip().splitlines()[-1].removeprefix("run: "))


def _same_result(pooled: Path, local: Path) -> None:
    for name in ("filenames/selected_filenames.txt", "filenames/corrupt_filenames.txt"):
        assert (pooled / name).read_text() == (local / name).read_text(), name
    a = pd.read_csv(pooled / "data/embeddings.csv")
    b = pd.read_csv(local / "data/embeddings.csv")
    assert list(a["filenames"]) == list(b["filenames"])
    np.testing.assert_allclose(
        a.filter(like="embedding_").to_numpy(), b.filter(like="embedding_").to_numpy(), atol=1e-5
    )


def _workers_of(logs: Path, run_ids: list[str]) -> dict[str, set[str]]:
    """Which worker log names each flow run (a worker logs each run it submits)."""
    taken: dict[str, set[str]] = {}
    for log in logs.glob("*.log"):
        text = log.read_text(errors="replace")
        for run_id in run_ids:
            if run_id in text:
                taken.setdefault(run_id, set()).add(log.stem)
    return taken


def _pooled_run(
    server: dict[str, str], start_workers: Callable[..., list[int]], tmp_path: Path
) -> tuple[Path, Path, dict[str, str], list[int], str]:
    """321 images, the deployments, 2 CPU workers and 1 on curate-gpu, and a run of
    `curate/pools` into `out`: (input, out, env, the CPU workers' pids, the run's id)."""
    folder = digits(tmp_path / "in", 320)
    out = tmp_path / "out"
    # The deployments' own output is elsewhere: `incremental`'s hourly cron may fire.
    env = deploy(server, folder, tmp_path / "scheduled-out")
    cpu = start_workers("curate-cpu", 2)
    start_workers("curate-gpu", 1)
    run_id = _run(env, "curate/pools", SETTINGS | {"output": str(out), "orchestration": POOLED})
    return folder, out, env, cpu, run_id


@pytest.mark.slow
def test_a_pooled_run_checks_on_two_cpu_workers_embeds_on_the_gpu_pool_and_equals_one_process(
    server, worker, start_workers, tmp_path
):
    folder, out, env, _, run_id = _pooled_run(server, start_workers, tmp_path)
    (run,) = wait_for_runs(env, [run_id], timeout=600)
    assert run["state"]["type"] == "COMPLETED", tail(tmp_path / "worker.log", 6000)

    checks, embeds = _children(env, "check/curate-cpu"), _children(env, "embed/curate-gpu")
    (report,) = reports(out)
    shards = report["steps"]["check"]["shards"]
    # Jobs, not runs: on a loaded machine a child its worker did not start within
    # child_lost_after_seconds is re-dispatched, as a second run of the same name.
    check_jobs, embed_jobs = {r["name"] for r in checks}, {r["name"] for r in embeds}
    assert len(check_jobs) == len(embed_jobs) and 2 < len(check_jobs) < shards  # batches
    assert {r["work_pool_name"] for r in checks} == {"curate-cpu"}
    assert {r["work_pool_name"] for r in embeds} == {"curate-gpu"}
    completed = {r["name"] for r in checks + embeds if r["state"]["type"] == "COMPLETED"}
    assert completed == check_jobs | embed_jobs
    taken = _workers_of(tmp_path / "workers", [r["id"] for r in checks])
    assert {w for names in taken.values() for w in names} == {"curate-cpu-0", "curate-cpu-1"}
    assert all(r["parent_task_run_id"] for r in checks), "children show under the pipeline"
    # Each job's embed child is dispatched with its check child, not after it: it starts
    # its process while the shards are checked and embeds each one as soon as it is.
    checked_at = {r["name"].split(" ", 1)[1]: r["end_time"] for r in checks if r["end_time"]}
    dispatched: dict[str, str] = {}
    for r in embeds:  # the first run of each job (a lost one is dispatched again later)
        job = r["name"].split(" ", 1)[1]
        dispatched[job] = min(dispatched.get(job, r["created"]), r["created"])
    late = {job: at for job, at in dispatched.items() if _when(at) >= _when(checked_at[job])}
    assert not late, (late, checked_at)
    # The GPU worker takes two children, but the device embeds one at a time (its slot).
    embedding = api(env, "POST", "/task_runs/filter", {
        "task_runs": {"name": {"like_": "embed "}, "state": {"type": {"any_": ["COMPLETED"]}}},
        "limit": 200,
    })  # fmt: skip
    spans = sorted((r["start_time"], r["end_time"]) for r in embedding if r["start_time"])
    assert len(spans) >= len(embed_jobs)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False)), spans

    dataset = sum(p.stat().st_size for p in folder.iterdir())
    assert report["steps"]["check"]["bytes_read"] == dataset  # one read of the input
    assert report["steps"]["embed"]["bytes_read"] == 0  # from the CPU pool's model inputs
    assert "curate-gpu" not in report["embedding"]["device"]  # the device, and the host
    assert report["embedding"]["device"].startswith("cpu (")
    local = _in_process(env, folder, tmp_path / "local")
    _same_result(_run_dir(out), local)

    # Each pool's worker imports everything, sees its device, reaches the output.
    for pool in ("curate-local", "curate-cpu", "curate-gpu"):
        printed = _curate(env, "sanity-check", "--pool", pool, "--output", str(out))
        assert f"pool {pool}: a worker ran the checks and reached {out}" in printed
        assert "embedding: resnet18 on cpu, dim 512" in printed and "av: " in printed
    refused = subprocess.run(
        [CURATE, "sanity-check", "--pool", "nowhere", "--output", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 1 and "no deployment sanity/nowhere" in refused.stderr


def _when(timestamp: str) -> datetime:
    return datetime.fromisoformat(timestamp)


def _run_dir(out: Path) -> Path:
    (run,) = sorted((out / "runs").glob("*/report.json"))
    return run.parent


def _descendants(pid: int) -> list[int]:
    """A process's children, grandchildren, ... (from /proc)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        current = frontier.pop()
        children = [p for p, parent in parents.items() if parent == current]
        found += children
        frontier += children
    return found


@pytest.mark.slow
def test_a_cpu_worker_killed_mid_run_loses_nothing_the_run_completes_with_the_same_result(
    server, worker, start_workers, tmp_path
):
    folder, out, env, cpu, run_id = _pooled_run(server, start_workers, tmp_path)

    # Kill the worker that took the first check, with its flow run's process, as soon as
    # it took it (a check of 80 tiny images is over in a second): a machine lost.
    deadline, victim = time.monotonic() + 300, None
    while victim is None:
        assert time.monotonic() < deadline, tail(tmp_path / "worker.log")
        taken_now = ("PENDING", "RUNNING")
        running = [r for r in _children(env, "check/curate-cpu") if r["state_type"] in taken_now]
        for r in running:
            taken = _workers_of(tmp_path / "workers", [r["id"]]).get(r["id"], set())
            if taken:
                victim = (r, int(next(iter(taken)).rsplit("-", 1)[1]))
                break
        time.sleep(0.5)
    lost_run, index = victim
    pid = cpu[index]
    for p in [pid, *_descendants(pid)]:
        os.kill(p, signal.SIGKILL)

    (run,) = wait_for_runs(env, [run_id], timeout=600)
    assert run["state"]["type"] == "COMPLETED", tail(tmp_path / "worker.log", 6000)
    lost = api(env, "GET", f"/flow_runs/{lost_run['id']}")
    assert lost["state"]["type"] == "CRASHED", lost["state"]
    assert "its worker is gone" in lost["state"]["message"]
    logs = api(env, "POST", "/logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}})
    assert any("dispatching it again" in log["message"] for log in logs)

    from tasks.datapool import load_datapool
    from tasks.storage import open_storage

    objects = load_datapool(open_storage(str(out))).objects
    assert objects["key"].is_unique and len(objects) == 321
    _same_result(_run_dir(out), _in_process(env, folder, tmp_path / "local"))


def test_an_embed_job_takes_each_checked_shard_the_moment_its_check_child_writes_it(tmp_path):
    import dataclasses
    import json
    import threading

    from flows.steps import EmbedJob, EmbedSettings, _checked_as_they_come, shard_result_key
    from tasks.shards import CheckedShard, Shard

    shards = [Shard(i, f"id{i}", f"m{i}", 10, 100) for i in (4, 5, 6)]
    key = "cache/check-job/abc.json"
    job = EmbedJob.model_construct(
        shards=shards,
        checked=[],
        check_results=key,
        settings=EmbedSettings.model_construct(output=str(tmp_path)),
    )
    written: dict[int, float] = {}

    def check_child() -> None:  # writes each shard's result a little after the last
        for position, shard in enumerate(shards):
            time.sleep(0.3)
            result = CheckedShard(shard.index, "meta", "bad", ("in",), True, 9, 1, 100, 0.1)
            path = tmp_path / shard_result_key(key, position)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(dataclasses.asdict(result)))
            written[position] = time.monotonic()

    writer = threading.Thread(target=check_child)
    writer.start()
    taken = []
    for checked in _checked_as_they_come(job):
        taken.append((checked.shard_index, time.monotonic()))
        assert checked.inputs == ("in",)
    writer.join()
    assert [index for index, _ in taken] == [4, 5, 6]
    # Each one is taken as it is written (within a poll or two), not once all are.
    for position, (_, at) in enumerate(taken):
        assert written[position] <= at < written[position] + 1.0
