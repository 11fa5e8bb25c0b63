"""`orchestration.mode=ray`: the check and embed shard tasks on a local Ray started by the
run (prefect-ray's RayTaskRunner) give the in-process run's selection, lists and
embeddings, and no Ray process outlives the run."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ARGS = ("shard_size=60", "embedding.input_size=32", "stopping_condition.n_samples=12")


def _descendants(pid: int) -> dict[int, str]:
    """Every process below `pid`, with its title (Ray names a busy worker `ray::<task>`)."""
    parents: dict[int, int] = {}
    titles: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
        titles[int(entry.name)] = title.strip()
    found, todo = {}, [pid]
    while todo:
        parent = todo.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in found:
                found[child] = titles[child]
                todo.append(child)
    return found


def _same_result(a: Path, b: Path) -> None:
    for name in ("filenames/selected_filenames.txt", "filenames/corrupt_filenames.txt"):
        assert (a / name).read_text() == (b / name).read_text(), name
    x, y = pd.read_csv(a / "data/embeddings.csv"), pd.read_csv(b / "data/embeddings.csv")
    assert list(x["filenames"]) == list(y["filenames"])
    np.testing.assert_allclose(
        x.filter(like="embedding_").to_numpy(), y.filter(like="embedding_").to_numpy(), atol=1e-5
    )


@pytest.mark.slow
def test_a_ray_run_equals_the_in_process_run_and_leaves_no_ray_process(
    demo_folder, run_curate, tmp_path
) -> None:
    import ray

    folder, _ = demo_folder
    local = run_curate(f"input={folder}", f"output={tmp_path / 'local'}", *ARGS)

    done: dict[str, object] = {}

    def ray_run() -> None:
        try:
            done["run"] = run_curate(
                f"input={folder}",
                f"output={tmp_path / 'ray'}",
                "orchestration.mode=ray",
                "resources.embed.num_cpus=0.5",  # Ray requests: a fraction of a CPU,
                "resources.check.memory=100MB",  # and memory (times the decode threads)
                *ARGS,
            )
        except BaseException as exc:
            done["error"] = exc

    worker = threading.Thread(target=ray_run)
    worker.start()
    seen: set[str] = set()
    while worker.is_alive():  # which tasks Ray's workers run, as they run them
        seen.update(t for t in _descendants(os.getpid()).values() if t.startswith("ray::"))
        time.sleep(0.2)
    worker.join()
    if "error" in done:
        raise done["error"]  # type: ignore[misc]
    run = done["run"]

    _same_result(run.path, local.path)  # type: ignore[attr-defined]
    assert {"ray::check", "ray::embed"} <= seen, seen
    report = run.report  # type: ignore[attr-defined]
    assert report["resources"]["ray"]["address"] == "local"
    assert report["resources"]["ray"]["start_seconds"] > 0
    asks = report["resources"]["steps"]
    # embedding on this CPU: check and embed take turns, the check's auto is every CPU
    assert asks["check"]["num_cpus"] == report["resources"]["machine"]["cpus"]
    assert asks["embed"]["num_cpus"] == 0.5
    assert (asks["check"]["memory"], asks["check"]["memory_asked"]) == (100_000_000, True)
    assert report["counts"] == local.report["counts"]
    # Ray stopped with the run: no raylet, GCS or worker left below this process
    left = [t for t in _descendants(os.getpid()).values() if "ray" in t]
    assert not left, left
    assert not ray.is_initialized()


def test_ray_asks_that_cannot_fit_fail_before_ray_starts(demo_folder, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from flows.cli import main

    folder, _ = demo_folder
    code = main(
        [
            "run",
            f"input={folder}",
            f"output={tmp_path}",
            "stopping_condition.n_samples=2",
            "orchestration.mode=ray",
            "resources.check.num_cpus=1000",
        ]
    )
    assert code == 2
    assert "resources.check asks for 1000 CPUs, this machine has" in capsys.readouterr().err


def test_step_tasks_survive_the_pickling_that_sends_them_to_ray_workers(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Ray pickles a task's function by value (a step's wrapper is a closure): nothing
    in it may be a ContextVar or a lock; the copy still names its artifacts by its key."""
    import cloudpickle

    from flows.steps import step_options
    from tasks.caching import cached_step, current_step_key
    from tasks.check import check_shard
    from tasks.embed import embed_shard
    from tasks.frames import check_video_shard

    for task in (check_shard, embed_shard, check_video_shard):
        copy = cloudpickle.loads(
            cloudpickle.dumps(task.with_options(**step_options("x", "y", tmp_path)))
        )
        assert copy.name == task.name

    @cached_step("probe")
    def probe(value: int) -> str:
        return current_step_key()

    travelled = cloudpickle.loads(cloudpickle.dumps(probe))
    assert travelled.fn(3) == probe.fn(3) != probe.fn(4)
