"""Curating from and to S3, GCS and Azure, against real emulators on loopback.

The same dataset (with planted corrupt files and duplicates) is uploaded to each store;
a run reading from and writing to the bucket must select, flag and drop exactly what the
local run does, and read each object once.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tasks.storage import Storage, open_storage


def _upload(folder: Path, url: str) -> None:
    target = open_storage(url)
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            target.write(path.relative_to(folder).as_posix(), path.read_bytes())


def _bucket(kind: str, server: Any) -> str:
    """A fresh bucket (container) on the emulator; returns its URL."""
    name = f"curate-{uuid.uuid4().hex[:10]}"
    if kind == "s3":
        from servers import make_bucket

        make_bucket(server, name)
        return f"s3://{name}"
    if kind == "gs":
        from servers import gcsfs_filesystem

        gcsfs_filesystem(server).mkdir(name)
        return f"gs://{name}"
    from servers import adlfs_filesystem

    adlfs_filesystem(server).mkdir(name)
    return f"az://{name}"


def _use(server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point the cloud clients at an emulator for one test."""
    for key, value in server.env.items():
        monkeypatch.setenv(key, value)


@pytest.fixture
def s3_demo(s3, demo_folder, monkeypatch) -> str:
    """A fresh S3 bucket holding the demo dataset under raw/; returns the bucket URL."""
    _use(s3, monkeypatch)
    bucket = _bucket("s3", s3)
    _upload(demo_folder[0], f"{bucket}/raw")
    return bucket


def _outcome(output: Storage) -> dict[str, Any]:
    """What a run decided, read from its output through the storage layer."""
    run = "runs/" + output.read_text("LATEST").strip()
    lists = {
        which: output.read_text(f"{run}/filenames/{which}_filenames.txt").split()
        for which in ("selected", "corrupt", "duplicate")
    }
    info = json.loads(output.read_text(f"{run}/corruptness_check_information.json"))
    report = json.loads(output.read_text(f"{run}/report.json"))
    return {"lists": lists, "reasons": info["corrupt_samples"], "report": report}


@pytest.fixture(scope="module")
def local_outcome(demo_folder, tmp_path_factory, prefect_server) -> dict[str, Any]:
    from flows.curate import curate
    from tasks.config import load_config

    folder, _ = demo_folder
    output = tmp_path_factory.mktemp("local-out")
    curate(
        **load_config(
            None, [f"input={folder}", f"output={output}", "stopping_condition.n_samples=30"]
        ).sections()
    )
    return _outcome(open_storage(str(output)))


@pytest.mark.parametrize("kind", ["s3", "gs", "az"])
def test_a_bucket_run_decides_exactly_what_the_local_run_does(
    kind: str, request, demo_folder, local_outcome, run_curate, monkeypatch
):
    server = request.getfixturevalue({"s3": "s3", "gs": "gcs", "az": "azure"}[kind])
    _use(server, monkeypatch)
    bucket = _bucket(kind, server)
    folder, _ = demo_folder
    _upload(folder, f"{bucket}/raw")

    run_curate(f"input={bucket}/raw", f"output={bucket}/curated", "stopping_condition.n_samples=30")

    cloud = _outcome(open_storage(f"{bucket}/curated"))
    assert cloud["lists"] == local_outcome["lists"]
    assert cloud["reasons"] == local_outcome["reasons"]
    traffic = cloud["report"]["bytes_read"]
    assert abs(traffic["total"] / traffic["dataset"] - 1) <= 0.05  # one read per object
    # The datapool lives in the bucket: a plain rerun finds nothing new to process.
    args = (f"input={bucket}/raw", f"output={bucket}/curated", "stopping_condition.n_samples=30")
    run_curate(*args)
    rerun = _outcome(open_storage(f"{bucket}/curated"))["report"]
    assert rerun["counts"]["processed"] == 0
    assert rerun["counts"]["datapool_size"] == cloud["report"]["counts"]["discovered"]
    # Prefect's cache records live in the bucket too: processing everything again takes
    # every shard from them.
    run_curate(*args, "datasource.process_all=true")
    steps = _outcome(open_storage(f"{bucket}/curated"))["report"]["steps"]
    assert all(steps[s]["cached_shards"] == steps[s]["shards"] > 0 for s in ("check", "embed"))


def test_input_and_output_may_be_different_stores(s3_demo, local_outcome, run_curate, tmp_path):
    bucket = s3_demo
    run_curate(f"input={bucket}/raw", f"output={tmp_path}", "stopping_condition.n_samples=30")
    assert _outcome(open_storage(str(tmp_path)))["lists"] == local_outcome["lists"]


def test_a_fifth_of_requests_failing_changes_nothing_but_the_retry_count(
    s3, s3_demo, local_outcome, run_curate, monkeypatch, tmp_path
):
    from servers import faulty_proxy

    bucket = s3_demo
    with faulty_proxy(s3.endpoint_url, failure_rate=0.2, delay_seconds=0.002, seed=7) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        run_curate(f"input={bucket}/raw", f"output={tmp_path}", "stopping_condition.n_samples=30")
        failed = proxy.counts.failed
    outcome = _outcome(open_storage(str(tmp_path)))
    assert outcome["lists"] == local_outcome["lists"]
    assert outcome["reasons"] == local_outcome["reasons"]
    assert failed > 10
    # Every failed request was retried, and the report says how many times (the report's
    # thumbnail reads apart).
    report = outcome["report"]
    assert report["retries"] + report["report_reads"]["retries"] == failed


def test_an_object_deleted_after_listing_is_recorded_not_fatal(s3_demo):
    from tasks.check import check_images
    from tasks.storage import ObjectInfo

    storage = open_storage(f"{s3_demo}/raw")
    objects = [o for o in storage.list() if o.key.startswith("photos/")][:5]
    storage.delete(objects[2].key)
    rows, corrupt, _ = check_images(
        storage, objects + [ObjectInfo("nope.jpg", 1, "x")], 10**9, True, 32, 2
    )
    assert len(rows) == 4
    assert corrupt == {
        objects[2].key: "missing: deleted after listing",
        "nope.jpg": "missing: deleted after listing",
    }


def test_listing_is_lazy_and_in_key_order(s3, monkeypatch):
    _use(s3, monkeypatch)
    bucket = _bucket("s3", s3)
    storage = open_storage(f"{bucket}/many")
    keys = [f"k{i:05d}.jpg" for i in range(2500)]
    for key in keys:
        storage.write(key, b"x")
    listing = storage.list()
    first = next(listing)  # one page fetched, not all three
    assert first.key == keys[0] and first.size == 1 and first.version
    assert [first.key] + [o.key for o in listing] == keys


@pytest.mark.parametrize("kind", ["s3", "gs", "az"])
def test_ranged_reads_and_seekable_streams(kind: str, request, monkeypatch):
    server = request.getfixturevalue({"s3": "s3", "gs": "gcs", "az": "azure"}[kind])
    _use(server, monkeypatch)
    storage = open_storage(_bucket(kind, server) + "/p")
    data = bytes(range(256)) * 40_000  # 10 MB: spans several read buffers
    storage.write("big.bin", data)
    assert storage.read_range("big.bin", 1_000_000, 1_000_100) == data[1_000_000:1_000_100]
    with storage.open("big.bin") as stream:
        stream.seek(5_000_000)
        assert stream.read(10) == data[5_000_000:5_000_010]
        stream.seek(-4, 2)
        assert stream.read() == data[-4:]
    storage.write_stream(
        "streamed.bin", (data[i : i + 3_000_000] for i in range(0, len(data), 3_000_000))
    )
    assert storage.read("streamed.bin") == data
    assert storage.exists("streamed.bin")
    storage.delete("streamed.bin")
    assert not storage.exists("streamed.bin")
    with pytest.raises(FileNotFoundError):
        storage.read("streamed.bin")


def _cli(env: dict[str, str], *args: str) -> Callable[[], Any]:
    import os
    import subprocess
    import sys

    full = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | env
    return subprocess.run(
        [str(Path(sys.executable).parent / "curate"), "run", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=full,
    )


@pytest.mark.parametrize(
    ("kind", "make_url", "env_change", "expected"),
    [
        ("s3", lambda b: "s3://no-such-bucket-xyz/raw", {}, "s3://no-such-bucket-xyz"),
        ("s3", lambda b: f"{b}/nothing-here", {}, "no images or videos found"),
        (
            "s3",
            lambda b: f"{b}/raw",
            {
                "AWS_ACCESS_KEY_ID": "",
                "AWS_SECRET_ACCESS_KEY": "",
                "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
                "AWS_CONFIG_FILE": "/nonexistent",
            },
            "credentials",
        ),
        ("gs", lambda b: "gs://no-such-bucket-xyz/raw", {}, "gs://no-such-bucket-xyz"),
        ("az", lambda b: "az://no-such-container/raw", {}, "az://no-such-container"),
        ("az", lambda b: f"{b}/raw", {"AZURE_STORAGE_CONNECTION_STRING": ""}, "credentials"),
    ],
)
def test_bad_cloud_input_is_a_one_line_error_naming_the_url(
    kind, make_url, env_change, expected, request, tmp_path
):
    server = request.getfixturevalue({"s3": "s3", "gs": "gcs", "az": "azure"}[kind])
    bucket = _bucket(kind, server)
    env = dict(server.env) | env_change
    result = _cli(
        env, f"input={make_url(bucket)}", f"output={tmp_path}", "stopping_condition.n_samples=3"
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr
    for secret in ("testing", "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq"):
        assert f"={secret}" not in result.stderr and secret not in lines[0].split(":", 1)[-1]


def test_credentials_from_a_prefect_secret_never_reach_the_report(
    s3, demo_folder, run_curate, monkeypatch, tmp_path
):
    from prefect.blocks.system import Secret

    bucket = _bucket("s3", s3)
    _use(s3, monkeypatch)
    folder, _ = demo_folder
    _upload(folder / "scenes", f"{bucket}/raw")
    secret = {"AWS_ACCESS_KEY_ID": "curate-key-id", "AWS_SECRET_ACCESS_KEY": "curate-s3cr3t"}
    Secret(value=secret).save("curate-test-s3", overwrite=True)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")

    run = run_curate(
        f"input={bucket}/raw",
        f"output={tmp_path}",
        "storage.credentials_secret=curate-test-s3",
        "stopping_condition.n_samples=5",
    )
    assert len(run.names("selected")) == 5
    written = "".join(p.read_text(errors="ignore") for p in tmp_path.rglob("*.json"))
    assert "curate-test-s3" in written  # the secret's name, in the config
    assert "curate-s3cr3t" not in written and "curate-key-id" not in written


def test_a_missing_credentials_secret_names_the_key(run_curate, tmp_path, demo_folder):
    from tasks.errors import CurateError

    folder, _ = demo_folder
    with pytest.raises(CurateError, match="storage.credentials_secret"):
        run_curate(
            f"input={folder}",
            f"output={tmp_path}",
            "stopping_condition.n_samples=5",
            "storage.credentials_secret=no-such-secret",
        )
