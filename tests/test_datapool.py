"""The datapool: versions that load back whole, merges that keep samples and vectors
aligned, commits that survive SIGKILL, and a lock that one run at a time holds."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from tasks.datapool import (
    CURRENT,
    LOCK,
    OBJECTS_SCHEMA,
    SELECTED_SCHEMA,
    Datapool,
    DatapoolLock,
    commit,
    load_datapool,
    merge,
)
from tasks.errors import CurateError
from tasks.formats import to_parquet_bytes
from tasks.storage import LocalStorage, ObjectInfo, Storage, open_storage

pytestmark = pytest.mark.reliability  # make test-reliability

MODEL = {"name": "resnet18", "weights": "ssl-run-1"}


def _objects(rows: dict[str, str], version: str = "1", run_id: str = "r1") -> pd.DataFrame:
    """Rows of the objects table: {key: status}, every object of size 10."""
    return pd.DataFrame(
        [
            {
                "key": key,
                "size": 10,
                "version": version,
                "status": status,
                "reason": "truncated" if status == "corrupt" else None,
                "duplicate_of": None,
                "content_hash": "ab" * 32,
                "pixel_hash": None,
                "run_id": run_id,
            }
            for key, status in rows.items()
        ]
    )


def _vector(name: str, dim: int = 4) -> np.ndarray:
    """A vector that says which sample it belongs to."""
    return np.random.default_rng(zlib.crc32(name.encode())).random(dim, dtype=np.float32)


def _picks(samples: dict[str, str], run_id: str = "r1") -> tuple[pd.DataFrame, np.ndarray]:
    """Selected rows ({name: key}) and their vectors."""
    frame = pd.DataFrame(
        [{"name": n, "key": k, "run_id": run_id, "pixel_hash": None} for n, k in samples.items()],
        columns=["name", "key", "run_id", "pixel_hash"],
    )
    vectors = np.array([_vector(n) for n in samples], dtype=np.float32).reshape(-1, 4)
    return frame, vectors


def _first_run(storage: Storage) -> Datapool:
    previous = load_datapool(storage)
    new = merge(
        previous,
        _objects({"a.jpg": "selected", "b.jpg": "not_selected", "c.jpg": "corrupt"}),
        *_picks({"a.jpg": "a.jpg"}),
        MODEL,
    )
    commit(storage, previous, new, "r1", keep_history=3)
    return new


def _assert_same(loaded: Datapool, expected: Datapool) -> None:
    pd.testing.assert_frame_equal(loaded.objects, expected.objects)
    pd.testing.assert_frame_equal(loaded.selected, expected.selected)
    np.testing.assert_array_equal(loaded.embeddings, expected.embeddings)
    assert loaded.embeddings.dtype == np.float32
    assert loaded.model == expected.model


def _folders(path: Path) -> set[str]:
    return {p.name for p in (path / "datapool").iterdir() if p.is_dir()}


def test_an_output_without_a_datapool_loads_an_empty_one(tmp_path: Path) -> None:
    pool = load_datapool(open_storage(str(tmp_path)))
    assert pool.version is None and pool.size == 0 and pool.model is None
    assert pool.embeddings.shape == (0, 0) and pool.embeddings.dtype == np.float32
    assert list(pool.objects.columns)[:4] == ["key", "size", "version", "status"]
    assert list(pool.selected.columns) == ["name", "key", "run_id", "pixel_hash"]
    assert not pool.is_known(ObjectInfo("a.jpg", 10, "1"))


def test_a_datapool_written_before_frames_hashes_were_kept_still_loads(tmp_path: Path) -> None:
    storage = open_storage(str(tmp_path))
    _first_run(storage)
    folder = tmp_path / "datapool" / (tmp_path / "datapool/CURRENT").read_text().strip()
    old = pd.read_parquet(folder / "selected.parquet").drop(columns="pixel_hash")
    data = to_parquet_bytes(old)
    (folder / "selected.parquet").write_bytes(data)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["selected.parquet"] = {
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    pool = load_datapool(storage)
    assert pool.selected["name"].tolist() == ["a.jpg"]
    assert pool.selected["pixel_hash"].isna().all()


def test_a_committed_datapool_loads_back_equal_and_is_plain_parquet(tmp_path: Path) -> None:
    storage = open_storage(str(tmp_path))
    new = _first_run(storage)

    loaded = load_datapool(storage)
    assert loaded.version == "v000001" == storage.read_text(CURRENT).strip()
    _assert_same(loaded, new)
    direct = pd.read_parquet(tmp_path / "datapool" / "v000001" / "objects.parquet")
    assert direct["key"].tolist() == ["a.jpg", "b.jpg", "c.jpg"]
    assert direct["reason"].isna().tolist() == [True, True, False]
    manifest = json.loads((tmp_path / "datapool" / "v000001" / "manifest.json").read_text())
    assert manifest["parent"] is None and manifest["run_id"] == "r1"
    assert manifest["counts"] == {
        "objects": 3,
        "selected_samples": 1,
        "selected": 1,
        "not_selected": 1,
        "corrupt": 1,
        "duplicate": 0,
    }
    assert loaded.is_known(ObjectInfo("a.jpg", 10, "1"))
    assert not loaded.is_known(ObjectInfo("a.jpg", 11, "1"))
    assert not loaded.is_known(ObjectInfo("a.jpg", 10, "2"))
    assert loaded.known_keys() == {"a.jpg", "b.jpg", "c.jpg"}


def test_merge_replaces_a_changed_object_and_drops_its_samples_with_their_vectors() -> None:
    frames = {"video/street-000040-mp4.png": "video/street.mp4"}
    frames["video/street-000080-mp4.png"] = "video/street.mp4"
    first = merge(
        Datapool.empty(),
        _objects({"a.jpg": "selected", "b.jpg": "not_selected", "video/street.mp4": "selected"}),
        *_picks({"a.jpg": "a.jpg", **frames}),
        MODEL,
    )
    # The video changed (new version): judged anew, one frame picked; c.jpg is new.
    second = merge(
        first,
        _objects({"video/street.mp4": "selected", "c.jpg": "selected"}, "2", "r2"),
        *_picks({"video/street-000120-mp4.png": "video/street.mp4", "c.jpg": "c.jpg"}, "r2"),
        {"name": "resnet18", "weights": "ssl-run-2"},
    )

    assert second.objects["key"].tolist() == ["a.jpg", "b.jpg", "c.jpg", "video/street.mp4"]
    assert second.objects["version"].tolist() == ["1", "1", "2", "2"]
    names = second.selected["name"].tolist()
    assert names == ["a.jpg", "video/street-000120-mp4.png", "c.jpg"]
    assert second.selected["run_id"].tolist() == ["r1", "r2", "r2"]
    for name, vector in zip(names, second.embeddings, strict=True):
        np.testing.assert_array_equal(vector, _vector(name))
    assert second.model == {"name": "resnet18", "weights": "ssl-run-2"}


def test_merge_refuses_vectors_of_another_dimension_or_count() -> None:
    first = merge(
        Datapool.empty(), _objects({"a.jpg": "selected"}), *_picks({"a.jpg": "a.jpg"}), MODEL
    )
    selected, _ = _picks({"b.jpg": "b.jpg"})
    with pytest.raises(ValueError, match="dimension 8"):
        merge(first, _objects({"b.jpg": "selected"}), selected, np.ones((1, 8)), MODEL)
    two, _ = _picks({"b.jpg": "b.jpg", "b2.jpg": "b.jpg"})
    with pytest.raises(ValueError, match="2 selected samples"):
        merge(first, _objects({"b.jpg": "selected"}), two, np.ones((1, 4)), MODEL)


def test_a_run_that_selects_nothing_keeps_the_dimension(tmp_path: Path) -> None:
    storage = open_storage(str(tmp_path))
    empty = pd.DataFrame(columns=["name", "key", "run_id", "pixel_hash"])
    new = merge(
        Datapool.empty(), _objects({"a.jpg": "not_selected"}), empty, np.zeros((0, 4)), MODEL
    )
    commit(storage, Datapool.empty(), new, "r1", keep_history=1)
    assert load_datapool(storage).embeddings.shape == (0, 4)


def test_history_keeps_the_newest_versions_only(tmp_path: Path) -> None:
    storage = open_storage(str(tmp_path))
    for i in range(1, 5):
        previous = load_datapool(storage)
        new = merge(previous, _objects({f"{i}.jpg": "not_selected"}), *_picks({}), MODEL)
        assert commit(storage, previous, new, f"r{i}", keep_history=2) == f"v{i:06d}"
    assert _folders(tmp_path) == {"v000003", "v000004"}
    assert load_datapool(storage).size == 4


def test_a_crashed_commit_folder_is_never_reused_and_is_pruned(tmp_path: Path) -> None:
    storage = open_storage(str(tmp_path))
    _first_run(storage)
    # A commit that died after writing files but before CURRENT.
    storage.write("datapool/v000002/objects.parquet", b"half")
    storage.write("datapool/v000002/.embeddings.npy.123.tmp", b"half")

    previous = load_datapool(storage)
    assert previous.version == "v000001"
    new = merge(previous, _objects({"d.jpg": "duplicate"}), *_picks({}), MODEL)
    assert commit(storage, previous, new, "r2", keep_history=2) == "v000003"
    assert _folders(tmp_path) == {"v000001", "v000003"}
    _assert_same(load_datapool(storage), new)


def test_a_commit_on_top_of_another_runs_commit_is_refused(tmp_path: Path) -> None:
    storage = open_storage(str(tmp_path))
    _first_run(storage)
    stale = load_datapool(storage)
    other = merge(stale, _objects({"x.jpg": "not_selected"}), *_picks({}), MODEL)
    commit(storage, stale, other, "other", keep_history=3)
    mine = merge(stale, _objects({"y.jpg": "not_selected"}), *_picks({}), MODEL)
    with pytest.raises(CurateError, match="moved to v000002 .* another run committed"):
        commit(storage, stale, mine, "mine", keep_history=3)
    _assert_same(load_datapool(storage), other)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda v: (v / "embeddings.npy").unlink(), "embeddings.npy is missing"),
        (lambda v: (v / "objects.parquet").write_bytes(b"PAR1 junk"), "objects.parquet is corrupt"),
        (lambda v: (v / "manifest.json").write_text("{"), "manifest.json is not a format-1"),
        (lambda v: (v.parent / "CURRENT").write_text("v000009"), "manifest.json is missing"),
    ],
)
def test_a_damaged_datapool_is_an_error_naming_the_file(
    tmp_path: Path, damage: Any, message: str
) -> None:
    storage = open_storage(str(tmp_path))
    _first_run(storage)
    damage(tmp_path / "datapool" / "v000001")
    with pytest.raises(CurateError, match=message) as error:
        load_datapool(storage)
    assert "delete" in str(error.value) and "\n" not in str(error.value)


def _state(n: int) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray]:
    """What `n` commits of `_commit_forever` hold: objects k1..kn, each selected, with the
    vector of sample j filled with j."""
    keys = [f"k{j:04d}" for j in range(1, n + 1)]
    objects = _objects(dict.fromkeys(keys, "selected"))
    selected = pd.DataFrame({"name": keys, "key": keys, "run_id": "r1", "pixel_hash": None})
    vectors = np.repeat(np.arange(1, n + 1, dtype=np.float32)[:, None], 4, axis=1)
    return objects, selected, vectors


class _SlowStorage(LocalStorage):
    """Writes that take most of a commit's time, in small pieces, so that a kill at a
    random moment lands inside one (or between two) more often than not."""

    def write_stream(self, key: str, chunks: Iterable[bytes]) -> None:
        def slowly() -> Iterator[bytes]:
            for chunk in chunks:
                for start in range(0, len(chunk), 1024):
                    time.sleep(0.002)
                    yield chunk[start : start + 1024]

        super().write_stream(key, slowly())


def _commit_forever(url: str) -> None:
    """The child of the crash test: commit one object more, again and again; says when
    its first commit is done."""
    storage = _SlowStorage(url)
    first = True
    while True:
        previous = load_datapool(storage)
        objects, selected, vectors = _state(previous.size + 1)
        new = merge(previous, objects.tail(1), selected.tail(1), vectors[-1:], MODEL)
        commit(storage, previous, new, "r1", keep_history=2)
        if first:
            print("committed", flush=True)
            first = False


def test_a_commit_killed_at_any_moment_leaves_a_whole_version(tmp_path: Path) -> None:
    storage = open_storage(str(tmp_path))
    env = os.environ | {"PYTHONPATH": str(Path(__file__).parent)}
    code = f"import test_datapool; test_datapool._commit_forever({str(tmp_path)!r})"
    rng = random.Random(5)
    sizes = []
    for _ in range(6):
        child = subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, env=env, text=True
        )
        # The kill lands at a random moment of a later commit (a loaded machine may take
        # longer than the sleep for the child's start and first commit).
        assert child.stdout is not None and child.stdout.readline() == "committed\n"
        time.sleep(rng.uniform(0.05, 0.6))
        child.send_signal(signal.SIGKILL)
        child.wait()
        # Whatever moment the kill hit, the datapool is one of the committed states whole.
        pool = load_datapool(storage)
        objects, selected, vectors = _state(pool.size)
        pd.testing.assert_frame_equal(pool.objects, OBJECTS_SCHEMA.validate(objects))
        pd.testing.assert_frame_equal(pool.selected, SELECTED_SCHEMA.validate(selected))
        np.testing.assert_array_equal(pool.embeddings, vectors)
        sizes.append(pool.size)
    assert sizes == sorted(sizes) and sizes[-1] >= 3
    # The next commit prunes every folder the killed commits left behind.
    previous = load_datapool(storage)
    new = merge(previous, _objects({"last.jpg": "not_selected"}), *_picks({}), MODEL)
    version = commit(storage, previous, new, "r2", keep_history=2)
    assert _folders(tmp_path) == {previous.version, version}


def test_a_second_lock_fails_naming_the_holder(tmp_path: Path) -> None:
    storage = open_storage(str(tmp_path))
    with DatapoolLock(storage, "flow-run-a"):
        with (
            pytest.raises(
                CurateError,
                match=r"locked by flow-run-a \(.+, pid \d+\) since .* stale after 90 s",
            ),
            DatapoolLock(storage, "flow-run-b"),
        ):
            pass  # pragma: no cover
        assert json.loads(storage.read(LOCK))["owner"] == "flow-run-a"
    assert not storage.exists(LOCK)


def test_a_stale_lock_is_taken_over_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    storage = open_storage(str(tmp_path))
    dead = {
        "owner": "crashed",
        "token": "t",
        "host": "h",
        "pid": 1,
        "acquired": 0,
        "heartbeat": time.time() - 100,
    }
    storage.write(LOCK, json.dumps(dead).encode())
    with DatapoolLock(storage, "flow-run-b", stale_after=60):
        assert json.loads(storage.read(LOCK))["owner"] == "flow-run-b"
    assert "taking over the lock of crashed" in caplog.text
    assert not storage.exists(LOCK)


def _lock_of_a_process(pid: int, **where: str) -> dict:
    from tasks.datapool import _this_machine

    return {
        "owner": "killed run",
        "token": "t",
        **_this_machine(),
        "pid": pid,
        "acquired": time.time(),
        "heartbeat": time.time(),  # fresh: only its dead process makes it takeable
    } | where


def _dead_pid() -> int:
    import subprocess

    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_a_fresh_lock_of_a_dead_process_on_this_machine_is_taken_over_at_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    storage = open_storage(str(tmp_path))
    storage.write(LOCK, json.dumps(_lock_of_a_process(_dead_pid())).encode())
    with DatapoolLock(storage, "next run"):
        assert json.loads(storage.read(LOCK))["owner"] == "next run"
    assert "is gone" in caplog.text


def test_a_lock_written_before_this_machine_rebooted_is_taken_over_at_once(
    tmp_path: Path,
) -> None:
    storage = open_storage(str(tmp_path))
    lock = _lock_of_a_process(os.getpid(), boot="an-earlier-boot")
    storage.write(LOCK, json.dumps(lock).encode())
    with DatapoolLock(storage, "next run"):
        assert json.loads(storage.read(LOCK))["owner"] == "next run"


@pytest.mark.parametrize(
    "where",
    [{"machine": "another-machine"}, {}],
    ids=["a dead pid on another machine", "a live process on this machine"],
)
def test_a_fresh_lock_is_respected_unless_its_holder_is_provably_dead(
    tmp_path: Path, where: dict
) -> None:
    storage = open_storage(str(tmp_path))
    pid = _dead_pid() if where else os.getpid()
    storage.write(LOCK, json.dumps(_lock_of_a_process(pid, **where)).encode())
    with pytest.raises(CurateError, match="locked by killed run"):
        DatapoolLock(storage, "next run").__enter__()


def test_a_reused_pid_is_not_taken_for_the_holder(tmp_path: Path) -> None:
    storage = open_storage(str(tmp_path))
    lock = _lock_of_a_process(os.getpid(), pid_start="1")  # this pid, but a newer process
    storage.write(LOCK, json.dumps(lock).encode())
    with DatapoolLock(storage, "next run"):
        assert json.loads(storage.read(LOCK))["owner"] == "next run"


def test_the_heartbeat_keeps_a_long_run_fresh(tmp_path: Path) -> None:
    storage = open_storage(str(tmp_path))
    with DatapoolLock(storage, "flow-run-a", stale_after=0.5, heartbeat=0.05):
        first = json.loads(storage.read(LOCK))["heartbeat"]
        time.sleep(0.8)  # longer than stale_after: only the heartbeat keeps it held
        assert json.loads(storage.read(LOCK))["heartbeat"] > first
        with pytest.raises(CurateError, match="locked by flow-run-a"):
            DatapoolLock(storage, "flow-run-b", stale_after=0.5).__enter__()
    assert not storage.exists(LOCK)


def test_exit_leaves_a_lock_that_another_run_took(tmp_path: Path) -> None:
    storage = open_storage(str(tmp_path))
    with DatapoolLock(storage, "flow-run-a"):
        storage.write(LOCK, json.dumps({"owner": "flow-run-b", "token": "other"}).encode())
    assert json.loads(storage.read(LOCK))["owner"] == "flow-run-b"


def test_create_exclusive_on_a_folder_never_replaces_and_leaves_no_temp_files(
    tmp_path: Path,
) -> None:
    storage = open_storage(str(tmp_path))
    assert storage.create_exclusive("d/x", b"first")
    assert not storage.create_exclusive("d/x", b"second")
    assert storage.read("d/x") == b"first"
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["x"]


def _bucket(kind: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket on the emulator (from test_cloud), or a folder."""
    if kind == "local":
        return str(request.getfixturevalue("tmp_path"))
    from test_cloud import _bucket as make
    from test_cloud import _use

    server = request.getfixturevalue({"s3": "s3", "gs": "gcs", "az": "azure"}[kind])
    _use(server, monkeypatch)
    return make(kind, server) + "/out"


@pytest.mark.parametrize("kind", ["local", "s3", "gs", "az"])
def test_racing_creates_have_exactly_one_winner(
    kind: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = open_storage(_bucket(kind, request, monkeypatch))
    start = threading.Barrier(8)
    results: dict[int, bool] = {}

    def race(i: int) -> None:
        start.wait()
        results[i] = storage.create_exclusive("race/LOCK", f"writer {i} {uuid.uuid4()}".encode())

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [i for i, won in results.items() if won]
    assert len(results) == 8 and len(winners) == 1
    assert storage.read("race/LOCK").startswith(f"writer {winners[0]} ".encode())


@pytest.mark.parametrize("kind", ["s3", "gs", "az"])
def test_the_datapool_commits_loads_and_locks_on_a_bucket(
    kind: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = open_storage(_bucket(kind, request, monkeypatch))
    # What a create retried after its first attempt landed meets: its own bytes.
    storage.write("mine", b"token-1")
    assert storage.create_exclusive("mine", b"token-1")
    assert not storage.create_exclusive("mine", b"token-2")
    with DatapoolLock(storage, "flow-run-a"):
        with pytest.raises(CurateError, match="locked by flow-run-a"):
            DatapoolLock(storage, "flow-run-b").__enter__()
        _first_run(storage)
        previous = load_datapool(storage)
        new = merge(previous, _objects({"a.jpg": "not_selected"}, "2"), *_picks({}), MODEL)
        assert commit(storage, previous, new, "r2", keep_history=1) == "v000002"
    assert not storage.exists(LOCK)
    _assert_same(load_datapool(storage), new)
    assert {o.key.split("/")[1] for o in storage.list("datapool/")} == {"CURRENT", "v000002"}


def test_a_retried_s3_create_whose_first_attempt_landed_is_ours(
    s3: Any, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    from botocore.exceptions import ConnectionClosedError

    storage = open_storage(_bucket("s3", request, monkeypatch))
    put = storage.client.put_object  # type: ignore[attr-defined]
    calls = []

    def lands_then_resets(**kwargs: Any) -> Any:
        calls.append(kwargs["Key"])
        response = put(**kwargs)
        if len(calls) == 1:
            raise ConnectionClosedError(endpoint_url="http://s3")
        return response

    monkeypatch.setattr(storage.client, "put_object", lands_then_resets)  # type: ignore[attr-defined]
    assert storage.create_exclusive("LOCK", b"token-1")
    assert len(calls) == 2  # the retry met the object its first attempt wrote
    assert not storage.create_exclusive("LOCK", b"token-2")
