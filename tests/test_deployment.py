"""The curate deployments as a Prefect user drives them: a real server started by
`infra/start-server.sh`, `prefect deploy` from `deployments/prefect.yaml`, a process
worker, runs made by the scheduler, the CLI and the API, and what the API then shows."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from deploys import (
    FINAL,
    PREFECT,
    REPO,
    api,
    deploy,
    digits,
    pipeline_workers,
    prefect_cli,
    reports,
    tail,
    wait_for_runs,
)


@pytest.mark.slow
def test_a_run_made_by_the_scheduler_completes_and_the_api_shows_what_it_did(
    server, tmp_path, worker
):
    folder, out = digits(tmp_path / "in"), tmp_path / "out"
    env = deploy(server, folder, out)
    deployment = api(env, "GET", "/deployments/name/curate/incremental")
    assert [s["schedule"].get("cron") for s in deployment["schedules"]] == ["0 * * * *"]
    assert deployment["parameters"]["input"] == str(folder)
    # A schedule that fires within a minute, added the way a user would.
    prefect_cli(
        env, "deployment", "schedule", "create", "curate/incremental", "--cron", "* * * * *"
    )

    deadline, made = time.monotonic() + 240, None
    while time.monotonic() < deadline:
        runs = api(
            env,
            "POST",
            "/flow_runs/filter",
            {
                "flow_runs": {"deployment_id": {"any_": [deployment["id"]]}},
                "sort": "START_TIME_ASC",
            },
        )
        done = [r for r in runs if r["auto_scheduled"] and r["state"]["type"] in FINAL]
        if done:
            made = done[0]
            break
        time.sleep(3)
    assert made is not None, "no scheduler-made run finished: " + tail(tmp_path / "worker.log")
    assert made["state"]["type"] == "COMPLETED", tail(tmp_path / "worker.log")
    assert made["name"].startswith("incremental ") and str(folder) in made["name"]
    report = reports(out)[0]
    assert report["counts"]["processed"] == 41 and report["counts"]["corrupt"] == 1

    # Task runs named by step and shard.
    task_runs = api(env, "POST", "/task_runs/filter", {"flow_runs": {"id": {"any_": [made["id"]]}}})
    names = {run["name"] for run in task_runs}
    assert any(n.startswith("check shard 0 (d000.png .. ") for n in names), names
    assert any(n.startswith("embed shard 0 (") for n in names), names
    # Artifacts: progress at 100 %, the counts of report.json, corrupt files, a summary.
    artifacts = api(
        env, "POST", "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [made["id"]]}}}
    )
    by_type: dict[str, list[dict]] = {}
    for artifact in artifacts:
        by_type.setdefault(artifact["type"], []).append(artifact)
    assert [a["data"] for a in by_type["progress"]] == [100.0]
    tables = {a["key"].split("-")[1]: a for a in by_type["table"]}
    counts = {row["count"]: row["value"] for row in _table(tables["counts"])}
    assert counts == report["counts"]
    assert [row["file"] for row in _table(tables["corrupt"])] == ["zz_truncated.png"]
    (summary,) = by_type["markdown"]
    assert "processed 41 objects" in summary["data"] and report["run_id"] in summary["data"]
    wanted = {
        "summary": lambda m: m.startswith("processed 41 objects"),
        "corrupt": lambda m: "corrupt: zz_truncated.png: truncated PNG" in m,
        "task run's own line": lambda m: m.startswith("checked: "),
    }
    messages = _run_logs(env, made["id"], wanted.values())
    for what, found in wanted.items():
        assert any(found(m) for m in messages), (what, messages[-20:])
    _screenshots(env, made["id"], [summary["id"], tables["counts"]["id"]], tmp_path)


def _run_logs(env: dict[str, str], run_id: str, wanted: Any, wait: float = 60) -> list[str]:
    """All of a flow run's log messages, read page by page (the API returns at most 200
    at a time). The run's last lines can reach the server after its state does (logs
    are sent in batches), so it reads again until each of `wanted` matches or `wait`
    has passed."""
    deadline = time.monotonic() + wait
    while True:
        messages: list[str] = []
        while True:
            page = api(
                env,
                "POST",
                "/logs/filter",
                {
                    "logs": {"flow_run_id": {"any_": [run_id]}},
                    "sort": "TIMESTAMP_ASC",
                    "offset": len(messages),
                    "limit": 200,
                },
            )
            messages += [log["message"] for log in page]
            if len(page) < 200:
                break
        if all(any(found(m) for m in messages) for found in wanted):
            return messages
        if time.monotonic() > deadline:
            return messages
        time.sleep(2)


def _table(artifact: dict) -> list[dict]:
    data = artifact["data"]
    return json.loads(data) if isinstance(data, str) else data


def _screenshots(env: dict[str, str], run_id: str, artifacts: list[str], folder: Path) -> None:
    """The flow run page and its summary and counts artifacts in headless Chromium, when
    installed (`CURATE_SCREENSHOTS=DIR` keeps copies). The run page's Artifacts tab
    cannot be opened by URL (the UI ignores `?tab=`); each artifact's own page shows it."""
    chromium = shutil.which("chromium")
    if chromium is None:
        print("no chromium: UI screenshots skipped (apt-get install chromium)")
        return
    ui = env["PREFECT_API_URL"].removesuffix("/api")
    pages = [("flow-run.png", f"{ui}/runs/flow-run/{run_id}")]
    pages += [
        (f"artifact-{i}.png", f"{ui}/artifacts/artifact/{a}") for i, a in enumerate(artifacts)
    ]
    for name, url in pages:
        path = folder / name
        subprocess.run(
            [
                chromium,
                *("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"),
                *("--disable-background-networking", "--disable-component-update"),
                f"--user-data-dir={folder / 'chromium-profile'}",
                f"--screenshot={path}",
                "--window-size=1400,1000",
                "--virtual-time-budget=15000",
                url,
            ],
            capture_output=True,
            timeout=120,
        )
        print(f"UI screenshot: {path}")
        if os.environ.get("CURATE_SCREENSHOTS") and path.exists():
            shutil.copy(path, Path(os.environ["CURATE_SCREENSHOTS"]) / name)


@pytest.mark.slow
def test_deployments_on_one_output_queue_behind_each_other_and_take_one_section_per_run(
    server, tmp_path
):
    folder, out = digits(tmp_path / "in"), tmp_path / "out"
    env = deploy(server, folder, out)
    full = api(env, "GET", "/deployments/name/curate/full")
    incremental = api(env, "GET", "/deployments/name/curate/incremental")
    # Two workers, so that runs of two deployments start at once and meet the output's slot.
    with pipeline_workers(env, tmp_path, 2):
        # Back to back through the API, then one section overridden through the CLI.
        first = api(env, "POST", f"/deployments/{full['id']}/create_flow_run", {})
        second = api(env, "POST", f"/deployments/{incremental['id']}/create_flow_run", {})
        printed = prefect_cli(
            env,
            "deployment",
            "run",
            "curate/full",
            "--param",
            'stopping_condition={"n_samples": 2}',
        )
        third = printed.split("UUID:")[1].split()[0]
        runs = wait_for_runs(env, [first["id"], second["id"], third])
    assert [r["state"]["type"] for r in runs] == ["COMPLETED"] * 3, tail(tmp_path / "worker.log")
    done = reports(out)
    # Their work never overlapped (a run waiting for the output's slot is Running too).
    spans = sorted((r["started_at"], r["finished_at"]) for r in done)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False)), spans
    # The queue admits waiting runs in any order: a full run processes everything, the
    # incremental one only what no earlier run processed.
    for i, report in enumerate(done):
        everything = report["config"]["datasource"]["process_all"] or i == 0
        assert report["counts"]["processed"] == (41 if everything else 0), report["run_id"]
    (last,) = [r for r in done if r["config"]["stopping_condition"]["n_samples"] == 2]
    assert last["counts"]["selected"] == 2  # the section given at run time ...
    assert last["config"]["input"] == str(folder)  # ... and the deployment's other keys
    assert last["config"]["datasource"]["process_all"] is True


@pytest.mark.slow
def test_impossible_combinations_fail_before_the_run_or_in_its_first_second(
    server, tmp_path, worker
):
    folder, out = digits(tmp_path / "in", 5), tmp_path / "out"
    env = deploy(server, folder, out)
    # The schema states the rule: the server refuses to create the run.
    refused = subprocess.run(
        [
            PREFECT,
            "deployment",
            "run",
            "curate/incremental",
            "--param",
            'stopping_condition={"n_samples": 2, "proportion_samples": 0.5}',
        ],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode != 0
    assert "n_samples" in refused.stdout + refused.stderr
    # A rule JSON schema cannot state fails as the run starts, before torch is imported.
    printed = prefect_cli(
        env, "deployment", "run", "curate/incremental", "--param", "stopping_condition={}"
    )
    (run,) = wait_for_runs(env, [printed.split("UUID:")[1].split()[0]], timeout=120)
    assert run["state"]["type"] == "FAILED"
    assert "stopping_condition" in run["state"]["message"]
    assert run["total_run_time"] < 1.0, run["total_run_time"]
    assert not (out / "runs").exists()
