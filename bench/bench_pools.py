"""Work pools: what a second CPU worker buys, and what pools cost against one process.

Everything real and on loopback: `infra/start-server.sh`, `prefect deploy` of
deployments/prefect.yaml, workers from `infra/start-workers.sh`.

A. Check + metadata of the same images as `check` flow runs on curate-cpu, dispatched by
   the pipeline's own fan-out, with 1 worker and then 2 (one decode thread per child, so
   each worker is one core's worth). Target: 1 worker / 2 workers >= 1.6.
B. A whole run of the same images in one process (`curate run`) vs through the pools
   (the `pools` deployment: 2 CPU workers with one decode thread each, 1 worker on
   curate-gpu, children of orchestration.samples_per_child samples, 10000 by default: one
   check child and one embed child that embeds each shard as it is checked). Target:
   pooled / in-process <= 1.15.

    python -m bench.bench_pools [--images 10000]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tasks.config import Orchestration

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def api(env: dict[str, str], method: str, path: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        env["PREFECT_API_URL"] + path, data=data, method=method,
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    for attempt in range(6):  # a 503 while SQLite is locked by another writer, as the client
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            if error.code != 503 or attempt == 5:
                raise
            time.sleep(0.5 * 2**attempt)
    raise AssertionError("unreachable")


class Deployment:
    """A server, the deployments, and the workers started so far."""

    def __init__(self, tmp: Path, folder: Path, output: Path) -> None:
        port = free_port()
        self.tmp = tmp
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        self.env |= {
            "PREFECT_HOME": str(tmp / "prefect-home"),
            "PREFECT_PORT": str(port),
            "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp}/prefect.db",
            "PREFECT_LOGGING_LEVEL": "WARNING",
            "PREFECT_WORKER_QUERY_SECONDS": "2",
            "PREFECT": str(BIN / "prefect"),
            "PWD": str(REPO),
            "CURATE_INPUT": str(folder),
            "CURATE_OUTPUT": str(output),
        }
        self.processes: list[subprocess.Popen[bytes]] = []
        log = tmp / "server.log"
        self._start([str(REPO / "infra/start-server.sh")], log)
        while "Prefect UI:" not in log.read_text(errors="replace"):
            time.sleep(0.5)
        subprocess.run(
            [str(BIN / "prefect"), "--no-prompt", "deploy", "--all", "--prefect-file",
             "deployments/prefect.yaml"],
            env=self.env, cwd=REPO, check=True, capture_output=True, stdin=subprocess.DEVNULL,
        )  # fmt: skip

    def _start(self, command: list[str], log: Path) -> None:
        self.processes.append(
            subprocess.Popen(
                command,
                env=self.env,
                cwd=REPO,
                stdout=log.open("ab"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        )

    def workers(self, pool: str, count: int) -> None:
        self._start([str(REPO / "infra/start-workers.sh"), pool, str(count)],
                    self.tmp / f"{pool}.log")  # fmt: skip
        time.sleep(8)  # the workers' first poll

    def stop_workers(self) -> None:
        import signal

        for process in self.processes[1:]:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=60)
        del self.processes[1:]

    def close(self) -> None:
        import signal

        for process in reversed(self.processes):
            for sig in (signal.SIGTERM, signal.SIGKILL):
                if process.poll() is None:
                    os.killpg(process.pid, sig)
                    try:
                        process.wait(timeout=20)
                    except subprocess.TimeoutExpired:
                        continue

    def run(self, name: str, parameters: dict[str, Any]) -> dict[str, Any]:
        found = api(self.env, "GET", f"/deployments/name/{name}")
        run = api(self.env, "POST", f"/deployments/{found['id']}/create_flow_run",
                  {"parameters": parameters})  # fmt: skip
        while run["state"]["type"] not in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            time.sleep(1)
            run = api(self.env, "GET", f"/flow_runs/{run['id']}")
        assert run["state"]["type"] == "COMPLETED", run["state"]
        return dict(run)


def make_images(folder: Path, n: int) -> None:
    from flows.demo import encode, photo_crops

    folder.mkdir(parents=True)
    for i, image in enumerate(photo_crops(n, seed=1, size=96)):
        (folder / f"img_{i:06d}.jpg").write_bytes(encode(image, "JPEG", quality=90))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--cpu-workers", type=int, default=2, help="B's CPU workers [2]")
    parser.add_argument("--threads", type=int, default=1, help="B's decode threads per check [1]")
    parser.add_argument(
        "--samples-per-child", type=int, default=Orchestration().samples_per_child,
        help="B's children [the config's default]",
    )  # fmt: skip
    parser.add_argument("--repeat", type=int, default=3, help="B's turns of each [3]")
    parser.add_argument("--skip-a", action="store_true", help="run B only")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        folder = tmp / "images"
        make_images(folder, args.images)
        deployment = Deployment(tmp, folder, tmp / "unused")
        try:
            # A: the check step alone (a run's embeddings would share the cores).
            spans = {}
            for workers in () if args.skip_a else (1, 2):
                deployment.workers("curate-cpu", workers)
                spans[workers] = check_only(deployment, folder, tmp / f"a{workers}", 2000)
                deployment.stop_workers()
            deployment.workers("curate-local", 1)
            deployment.workers("curate-cpu", args.cpu_workers)
            deployment.workers("curate-gpu", 1)
            # B: one process vs the pools, same images, fresh outputs, in turns (idle
            # workers poll during both).
            local, pooled = [], []
            for i in range(args.repeat):
                started = time.perf_counter()
                subprocess.run(
                    [str(BIN / "curate"), "run", f"input={folder}", f"output={tmp / f'b-local{i}'}",
                     "stopping_condition.proportion_samples=0.05", "embedding.input_size=64"],
                    env=deployment.env, check=True, capture_output=True,
                )  # fmt: skip
                local.append(time.perf_counter() - started)
                started = time.perf_counter()
                pipeline = deployment.run("curate/pools", {
                    "input": str(folder), "output": str(tmp / f"b-pools{i}"),
                    "stopping_condition": {"proportion_samples": 0.05},
                    "embedding": {"input_size": 64}, "num_workers": args.threads,
                    "orchestration": {"mode": "pools", "samples_per_child": args.samples_per_child},
                })  # fmt: skip
                pooled.append(time.perf_counter() - started)
                timeline = children_timeline(deployment, pipeline)
        finally:
            deployment.close()
    print(f"{args.images} images (96 px JPEG) on {cores} cores")
    if spans:
        print(f"A. checks on curate-cpu: 1 worker {spans[1]:.1f} s, 2 workers {spans[2]:.1f} s")
        print(f"   ratio 1 worker / 2 workers: {spans[1] / spans[2]:.2f} (target >= 1.6)")
    ratios = sorted(p / q for p, q in zip(pooled, local, strict=True))
    print(
        f"B. whole run ({args.cpu_workers} CPU workers x {args.threads} threads, 1 curate-gpu "
        f"worker, children of {args.samples_per_child} samples), {args.repeat} turns:"
    )
    for i, (q, p) in enumerate(zip(local, pooled, strict=True)):
        print(f"   {i + 1}: in one process {q:.1f} s, through the pools {p:.1f} s ({p / q:.2f})")
    print(f"   ratio pooled / in-process, median: {ratios[len(ratios) // 2]:.2f} (target <= 1.15)")
    print("   the last pooled run:")
    print(timeline)


def children_timeline(deployment: Deployment, pipeline: dict[str, Any]) -> str:
    """Where the pooled run's time went: per child, seconds from the pipeline's start to
    its creation, its start (the worker's poll and the process start until the flow runs)
    and its end."""
    from datetime import datetime

    # run_deployment's children: runs whose parent task run is in the pipeline's run.
    children = api(deployment.env, "POST", "/flow_runs/filter", {
        "flow_runs": {"parent_flow_run_id": {"any_": [pipeline["id"]]}}, "limit": 200,
    })  # fmt: skip
    zero = datetime.fromisoformat(pipeline["start_time"])

    def at(value: str | None) -> float:
        return (datetime.fromisoformat(value) - zero).total_seconds() if value else float("nan")

    lines = [
        f"   pipeline: created {at(pipeline['created']):.1f}, ended {at(pipeline['end_time']):.1f} "
        f"({pipeline['total_run_time']:.1f} s of flow run time); children:"
    ]
    for run in sorted(children, key=lambda r: r["created"]):
        lines.append(
            f"   {run['name'][:40]:40s} created {at(run['created']):6.1f}  "
            f"started {at(run['start_time']):6.1f}  ended {at(run['end_time']):6.1f}  "
            f"(ran {run['total_run_time']:.1f} s)"
        )
    return "\n".join(lines)


def check_only(deployment: Deployment, folder: Path, output: Path, batch: int) -> float:
    """The check step alone on the workers now on curate-cpu: the input's shards in
    `check` flow runs of `batch` images, all created at once, as the pipeline would;
    seconds from the first one's start to the last one's end."""
    from datetime import datetime

    from flows.steps import CheckJob, CheckSettings
    from tasks.config import load_config
    from tasks.discover import Discovery, discover_shards
    from tasks.storage import open_storage

    config = load_config(None, [f"input={folder}", f"output={output}",
                                "stopping_condition.n_samples=1", "num_workers=1"])  # fmt: skip
    settings = CheckSettings.of(config, input_size=64)
    shards = list(discover_shards(open_storage(str(folder)), open_storage(str(output)),
                                  config.shard_size, None, Discovery()))  # fmt: skip
    per_job = max(1, batch // config.shard_size)
    found = api(deployment.env, "GET", "/deployments/name/check/curate-cpu")
    runs = [
        api(
            deployment.env,
            "POST",
            f"/deployments/{found['id']}/create_flow_run",
            {
                "parameters": {
                    "job": CheckJob(shards=shards[i : i + per_job], settings=settings).model_dump(
                        mode="json"
                    )
                }
            },
        )["id"]  # fmt: skip
        for i in range(0, len(shards), per_job)
    ]
    while True:
        time.sleep(2)
        done = [api(deployment.env, "GET", f"/flow_runs/{r}") for r in runs]
        states = {d["state"]["type"] for d in done}
        if states - {"COMPLETED", "SCHEDULED", "PENDING", "RUNNING"}:
            raise SystemExit(f"check runs ended {states}")
        if states == {"COMPLETED"}:
            break
    starts = [datetime.fromisoformat(d["start_time"]) for d in done]
    ends = [datetime.fromisoformat(d["end_time"]) for d in done]
    return (max(ends) - min(starts)).total_seconds()


if __name__ == "__main__":
    main()
