"""Monitoring and the bottleneck verdict: real threads, real /proc, real runs.

A step that keeps every core busy reads as CPU-bound; one that waits on reads as
I/O-bound, also while the other runs beside it (each thread's CPU goes to its own step).
A pipeline run carries figures and a verdict for every step; behind a slow storage (the
fault proxy's delay in front of the S3 server) its check is I/O-bound, on local files
its check or embed is CPU-bound.
"""

from __future__ import annotations

import hashlib
import html
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tasks.monitor import (
    Monitor,
    monitoring,
    reading,
    step_activity,
    step_threads,
    verdict,
)


def _burn(seconds: float) -> None:
    """CPU work that releases the GIL (hashing a large buffer), so threads use cores."""
    data = b"x" * (8 << 20)
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        hashlib.sha256(data).digest()


def _cpu_step(seconds: float, cores: int) -> None:
    """A step whose pool threads (one per core) burn CPU."""
    with step_activity("crunch"), ThreadPoolExecutor(cores, initializer=step_threads()) as pool:
        list(pool.map(_burn, [seconds] * cores))


def _io_step(seconds: float) -> None:
    """A step that waits on a slow read most of the time."""
    with step_activity("fetch"):
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            with reading():
                time.sleep(0.05)


def test_a_step_busy_on_every_core_is_cpu_bound_and_one_waiting_on_reads_io_bound():
    with monitoring(interval=0.1) as monitor:
        cores = monitor.cores
        _cpu_step(1.0, cores)
        _io_step(1.0)
    crunch, fetch = monitor.figures("crunch"), monitor.figures("fetch")
    assert crunch is not None and fetch is not None
    assert verdict(crunch)[0] == "CPU-bound", (crunch, verdict(crunch))
    assert verdict(fetch)[0] == "I/O-bound", (fetch, verdict(fetch))
    assert fetch["reads_busy_percent"] > 90
    assert fetch["cpu_percent"] < 20
    assert crunch["samples"] >= 5 and 0.9 < crunch["active_seconds"] < 3


def test_overlapping_steps_each_get_their_own_threads_cpu():
    """The check-beside-embed case: one step burns every core while another waits on
    reads at the same time; the reads do not make the burner I/O-bound, the burning
    does not make the reader CPU-bound."""
    with monitoring(interval=0.1) as monitor:
        cores = monitor.cores
        reader = threading.Thread(target=_io_step, args=(1.5,))
        reader.start()
        _cpu_step(1.5, cores)
        reader.join()
    crunch, fetch = monitor.figures("crunch"), monitor.figures("fetch")
    assert verdict(crunch)[0] == "CPU-bound", crunch
    assert verdict(fetch)[0] == "I/O-bound", fetch
    assert crunch["reads_busy_percent"] == 0
    assert fetch["cpu_percent"] < 30, fetch  # the burner's CPU stayed with the burner


def test_nothing_is_recorded_outside_a_monitored_run_or_when_disabled():
    with monitoring(enabled=False) as off:
        _io_step(0.2)
    assert off.figures("fetch") is None
    _io_step(0.1)  # no monitor at all: a no-op
    assert verdict(None, cached=True)[0] == "cached"
    assert verdict(None, idle=True)[0] == "idle"
    assert verdict(None)[0] == "not measured"


def test_the_sampler_costs_well_under_two_percent_of_the_run():
    """At the default rate, with as many threads as a run has (Prefect's, the decode and
    read pools), the sampler's own CPU is a small share of the wall time."""
    with ThreadPoolExecutor(30) as pool:
        for _ in range(30):
            pool.submit(time.sleep, 2.5)
        monitor = Monitor().start()
        time.sleep(2.0)
        monitor.stop()
    assert monitor.stopped is not None
    elapsed = monitor.stopped - monitor.started
    assert monitor.samples >= 6
    assert monitor.overhead / elapsed < 0.02, (monitor.overhead, elapsed)


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from flows.demo import encode, photo_crops

    folder = tmp_path_factory.mktemp("photos")
    for i, image in enumerate(photo_crops(400, seed=3, size=160)):
        (folder / f"img_{i:04d}.jpg").write_bytes(encode(image, "JPEG", quality=90))
    return folder


def test_a_run_reports_a_verdict_per_step_and_a_local_run_is_cpu_bound(
    run_curate, photo_folder, tmp_path
):
    run = run_curate(
        f"input={photo_folder}", f"output={tmp_path}", "stopping_condition.n_samples=20"
    )
    report = run.report
    steps = report["steps"]
    for name in ("discover", "check", "dedup", "embed", "select", "export"):
        assert steps[name]["verdict"] in ("CPU-bound", "I/O-bound", "GPU-bound"), name
        assert steps[name]["why"]
        figures = steps[name]["monitor"]
        assert figures["active_seconds"] > 0 and figures["rss_peak_bytes"] > 0
        assert "gpu_util_percent" not in figures  # no GPU here: no GPU fields
    assert "CPU-bound" in (steps["check"]["verdict"], steps["embed"]["verdict"]), {
        n: (s["verdict"], s["why"]) for n, s in steps.items()
    }
    monitoring_facts = report["monitoring"]
    assert monitoring_facts["overhead_percent"] < 2
    assert report["report_reads"]["verdict"]
    # The report a person reads and the Prefect summary show the verdicts too.
    page = (run.path / "report.html").read_text()
    assert "<h2>Bottlenecks</h2>" in page and html.escape(steps["check"]["why"]) in page
    from prefect.artifacts import Artifact

    from flows.artifacts import artifact_key

    summary = Artifact.get(artifact_key("summary", str(tmp_path)))
    assert summary is not None and report["run_id"] in summary.data
    assert f"| {steps['check']['verdict']} | {steps['check']['why']} |" in summary.data
    # A rerun takes every shard from the cache, and says so.
    rerun = run_curate(
        f"input={photo_folder}",
        f"output={tmp_path}",
        "stopping_condition.n_samples=20",
        "datasource.process_all=true",
    ).report
    assert rerun["steps"]["check"]["verdict"] == "cached"
    assert rerun["steps"]["embed"]["verdict"] == "cached"
    assert "monitor" not in rerun["steps"]["check"]


def test_behind_a_slow_storage_the_check_is_io_bound(s3, monkeypatch, run_curate, tmp_path):
    from servers import faulty_proxy, make_bucket

    from tasks.storage import open_storage

    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    make_bucket(s3, "slow-photos")
    bucket = open_storage("s3://slow-photos/raw")
    from flows.demo import encode, photo_crops

    for i, image in enumerate(photo_crops(120, seed=4, size=96)):
        bucket.write(f"img_{i:04d}.jpg", encode(image, "JPEG", quality=90))
    with faulty_proxy(s3.endpoint_url, failure_rate=0.0, delay_seconds=0.4) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        run = run_curate(
            "input=s3://slow-photos/raw", f"output={tmp_path}", "stopping_condition.n_samples=10"
        )
    check = run.report["steps"]["check"]
    assert check["verdict"] == "I/O-bound", json.dumps(check, indent=1)
    assert check["monitor"]["reads_busy_percent"] > 50
