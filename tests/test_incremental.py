"""Incremental runs over a datapool: only new and changed objects are processed, selection
builds on what was selected before, the datapool survives SIGKILL at any point."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from videos import VALID, write_video

from flows.demo import digit_images, encode
from tasks.datapool import DatapoolLock, load_datapool
from tasks.errors import CurateError
from tasks.storage import open_storage

CURATE = str(Path(sys.executable).parent / "curate")


def _write_digits(folder: Path, indices: range, prefix: str = "d") -> list[str]:
    images, _ = digit_images()
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in indices:
        name = f"{prefix}{i:04d}.png"
        (folder / name).write_bytes(encode(images[i], "PNG"))
        names.append(name)
    return names


def _report(run_dir: str) -> dict:
    return json.loads((Path(run_dir) / "report.json").read_text())


def _selected(run_dir: str) -> list[str]:
    return (Path(run_dir) / "filenames/selected_filenames.txt").read_text().split()


def test_three_runs_process_only_what_is_new_and_select_around_the_datapool(
    tmp_path, run_curate
) -> None:
    folder, out = tmp_path / "in", tmp_path / "out"
    first_names = _write_digits(folder, range(60))
    args = (f"input={folder}", f"output={out}", "num_workers=2", "shard_size=20")

    first = run_curate(*args, "stopping_condition.n_samples=10")
    first_selected = first.names("selected")
    assert first.report["counts"]["processed"] == 60
    assert first.report["counts"]["datapool_size"] == 60

    # M new objects: 8 new digits and a near-copy of an already selected one; and one
    # object changed in place (same name, other content).
    new_names = _write_digits(folder, range(100, 108))
    original = np.asarray(digit_images()[0][int(first_selected[0][1:5])])
    near = original.copy()
    near[0, 0] = 255 - near[0, 0]  # one pixel: not an exact copy, the same picture
    (folder / "near-copy.png").write_bytes(encode(Image.fromarray(near), "PNG"))
    changed = next(n for n in first_names if n not in first_selected)
    (folder / changed).write_bytes(encode(digit_images()[0][1500], "PNG"))
    os.utime(folder / changed, (time.time() + 5, time.time() + 5))

    second = run_curate(*args, "stopping_condition.n_samples=4")
    counts = second.report["counts"]
    assert counts["processed"] == len(new_names) + 1 + 1
    assert counts["already_in_datapool"] == 59
    second_selected = second.names("selected")
    assert len(second_selected) == 4
    assert set(second_selected) <= {*new_names, "near-copy.png", changed}
    assert "near-copy.png" not in second_selected

    pool = load_datapool(open_storage(str(out)))
    assert pool.size == 60 + 9 and pool.objects["key"].is_unique
    assert counts["datapool_size"] == pool.size
    assert sorted(pool.selected["name"]) == sorted(
        [n for n in first_selected if n != changed] + second_selected
    )
    assert pool.embeddings.shape[0] == len(pool.selected)
    statuses = dict(zip(pool.objects["key"], pool.objects["status"], strict=True))
    assert all(statuses[n] == "selected" for n in second_selected)
    assert statuses["near-copy.png"] == "not_selected"
    runs = dict(zip(pool.objects["key"], pool.objects["run_id"], strict=True))
    assert runs[changed] == second.report["run_id"]

    third = run_curate(*args, "stopping_condition.n_samples=4")
    assert third.report["counts"]["processed"] == 0
    assert third.names("selected") == []
    assert third.report["datapool"]["version"] == second.report["datapool"]["version"]
    # Fast because it does nothing: no shard, no byte of the input read, no commit (its
    # time against a full run is measured in bench/bench_incremental.py).
    steps = third.report["steps"]
    assert steps["check"]["shards"] == steps["embed"]["shards"] == 0
    assert third.report["bytes_read"]["total"] == 0


def test_an_exact_copy_of_a_selected_image_is_a_duplicate_of_it(tmp_path, run_curate) -> None:
    folder, out = tmp_path / "in", tmp_path / "out"
    _write_digits(folder, range(30))
    args = (f"input={folder}", f"output={out}", "stopping_condition.n_samples=5")
    first = run_curate(*args).names("selected")
    (folder / "copy.png").write_bytes((folder / first[0]).read_bytes())
    second = run_curate(*args)
    assert second.names("duplicate") == ["copy.png"]
    assert second.names("selected") == []


def test_frames_of_a_copied_video_are_duplicates_of_the_frames_selected_before(
    tmp_path, run_curate
) -> None:
    folder, out = tmp_path / "in", tmp_path / "out"
    write_video(folder / "clips/street.mp4", VALID["clips/street.mp4"])
    args = (f"input={folder}", f"output={out}", "stopping_condition.n_samples=5")
    first = run_curate(*args).names("selected")
    (folder / "copies").mkdir()
    shutil.copy(folder / "clips/street.mp4", folder / "copies/street.mp4")
    second = run_curate(*args)
    metadata = pd.read_parquet(second.path / "data/metadata.parquet").set_index("filename")
    for name in first:
        assert metadata.loc[name.replace("clips/", "copies/", 1), "duplicate_of"] == name
    assert not set(second.names("selected")) & {n.replace("clips/", "copies/") for n in first}
    assert len(load_datapool(open_storage(str(out))).selected) == len(first) + len(
        second.names("selected")
    )


def test_process_all_processes_everything_and_replaces_the_datapool(tmp_path, run_curate) -> None:
    folder, out = tmp_path / "in", tmp_path / "out"
    _write_digits(folder, range(30))
    args = (f"input={folder}", f"output={out}", "stopping_condition.n_samples=5")
    run_curate(*args)
    again = run_curate(*args, "datasource.process_all=true")
    assert again.report["counts"]["processed"] == 30
    assert len(again.names("selected")) == 5
    pool = load_datapool(open_storage(str(out)))
    assert sorted(pool.selected["name"]) == sorted(again.names("selected"))
    assert set(pool.objects["run_id"]) == {again.report["run_id"]}


def test_a_changed_model_is_refused_with_a_way_out(tmp_path, run_curate) -> None:
    folder, out = tmp_path / "in", tmp_path / "out"
    _write_digits(folder, range(20))
    args = (f"input={folder}", f"output={out}", "stopping_condition.n_samples=5")
    run_curate(*args)
    _write_digits(folder, range(20, 25))
    with pytest.raises(CurateError, match="process_all=true"):
        run_curate(*args, "seed=7")  # other random weights: other embeddings
    assert (
        run_curate(*args, "seed=7", "datasource.process_all=true").report["counts"]["processed"]
        == 25
    )


def test_a_run_outside_prefect_fails_on_a_held_lock_naming_its_owner(tmp_path, run_curate) -> None:
    folder, out = tmp_path / "in", tmp_path / "out"
    _write_digits(folder, range(10))
    with (
        DatapoolLock(open_storage(str(out)), "another run"),
        pytest.raises(CurateError, match="locked by another run"),
    ):
        run_curate(f"input={folder}", f"output={out}", "stopping_condition.n_samples=2")


def _start(folder: Path, out: Path, n: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            CURATE,
            "run",
            f"input={folder}",
            f"output={out}",
            f"stopping_condition.n_samples={n}",
            "shard_size=15",
            "num_workers=1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _kill_when(
    process: subprocess.Popen[bytes], ready: Callable[[], bool], timeout: float = 240
) -> bool:
    """SIGKILL the run as soon as `ready()`; False if it finished first."""
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        if ready():
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.005)
    process.wait(timeout=30)
    return False


def _assert_whole(out: Path, keys: set[str]) -> pd.DataFrame:
    pool = load_datapool(open_storage(str(out)))
    assert set(pool.objects["key"]) <= keys and pool.objects["key"].is_unique
    assert pool.selected["name"].is_unique
    assert len(pool.embeddings) == len(pool.selected)
    return pool.selected


@pytest.mark.slow
def test_sigkill_during_embedding_or_commit_then_an_immediate_rerun_loses_and_doubles_nothing(
    tmp_path,
) -> None:
    folder, out = tmp_path / "in", tmp_path / "out"
    keys = set(_write_digits(folder, range(90)))

    # Killed while embedding: nothing is published; the rerun does everything once.
    embed_dir = out / "cache" / "embed"
    run = _start(folder, out, 6)
    killed = _kill_when(run, lambda: embed_dir.exists() and any(embed_dir.iterdir()))
    assert killed, "the run finished before it could be killed"
    assert load_datapool(open_storage(str(out))).version is None
    # At once: the lock's holder was a process on this machine, and it is gone.
    run = _start(folder, out, 6)
    assert run.wait(timeout=300) == 0, run.stderr.read().decode()[-2000:] if run.stderr else ""
    first = _assert_whole(out, keys)
    assert len(first) == 6

    # Killed while committing the next version: the datapool is the old one or the new one,
    # whole; the rerun completes it, with every selection once.
    keys |= set(_write_digits(folder, range(100, 130)))
    datapool = out / "datapool"
    run = _start(folder, out, 4)
    _kill_when(run, lambda: any(datapool.glob("v000002/*")))
    middle = _assert_whole(out, keys)
    assert len(middle) in (6, 10)
    run = _start(folder, out, 4)
    assert run.wait(timeout=300) == 0
    final = _assert_whole(out, keys)
    pool = load_datapool(open_storage(str(out)))
    assert set(pool.objects["key"]) == keys
    assert set(first["name"]) <= set(final["name"])
    assert len(final) == 10


def test_latest_is_repaired_when_a_run_died_between_its_commit_and_latest(
    tmp_path, run_curate
) -> None:
    import logging

    from flows.curate import repair_latest

    folder, out = tmp_path / "in", tmp_path / "out"
    _write_digits(folder, range(10))
    run = run_curate(f"input={folder}", f"output={out}", "stopping_condition.n_samples=2")
    output = open_storage(str(out))
    output.write_text("LATEST", "20000101T000000Z-dead00\n")  # as if LATEST lagged behind
    repair_latest(output, load_datapool(output), logging.getLogger("test"))
    assert output.read_text("LATEST").strip() == run.report["run_id"]
