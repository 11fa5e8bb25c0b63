"""Hostile names and file-system entries: each processed under its escaped name or listed
with a reason, the run completes, nothing is written outside the output (issue 15)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pandas as pd
import pytest
from hostile_names import (
    NEVER_LISTED,
    OUTPUT_FOLDER,
    can_read_past_modes,
    make_name_and_fs_cases,
)
from hypothesis import given
from hypothesis import strategies as st

from flows.demo import digit_images, encode
from tasks.discover import discover
from tasks.errors import ConfigError
from tasks.formats import text_lines
from tasks.naming import (
    MAX_NAME_BYTES,
    MAX_SEGMENT_BYTES,
    escape_name,
    frame_name,
    name_problem,
    unescape_name,
)
from tasks.shards import read_manifest
from tasks.storage import LocalStorage, NotRegularFile, Unreadable, open_storage

pytestmark = pytest.mark.reliability  # make test-reliability

CURATE = str(Path(sys.executable).parent / "curate")
PNGS = [encode(image, "PNG") for image in digit_images()[0][:8]]

# Names as the OS gives them: any text, plus the surrogates that stand for bytes that are
# not UTF-8 (os.fsdecode).
raw_names = st.text(
    st.one_of(st.characters(), st.sampled_from([chr(c) for c in range(0xDC80, 0xDD00)]))
)


# --- the escaping rule -------------------------------------------------------------------


@given(raw_names)
def test_an_escaped_name_is_one_line_of_utf8_and_unescapes_to_the_file_name(raw: str) -> None:
    name = escape_name(raw)
    assert unescape_name(name) == raw  # one-to-one: two files never share a name
    name.encode("utf-8")  # no surrogates: valid in JSON, Parquet, CSV
    assert name.splitlines() == ([name] if name else [])
    assert text_lines([name, "next"]).decode().splitlines() == [name, "next"]


@given(st.text())
def test_a_bucket_key_round_trips_and_a_plain_name_is_left_as_it_is(key: str) -> None:
    assert unescape_name(escape_name(key), raw_bytes=False) == key
    plain = "".join(c for c in key if c.isprintable() and c not in "\\\u2028\u2029")
    assert escape_name(plain) == plain


def test_the_escapes_are_the_documented_ones() -> None:
    raw = "a\\b\nc\rd\te\x01f\u2028g\udcffh é"
    assert escape_name(raw) == "a\\\\b\\nc\\rd\\te\\u0001f\\u2028g\\xffh é"
    # Only what escape_name writes is undone: no escape makes a `/` or a `.`.
    assert unescape_name("\\u002e\\u002e/x\\u002f") == "\\u002e\\u002e/x\\u002f"
    assert unescape_name("bad\\xff", raw_bytes=False) == "bad\\xff"


def test_bucket_keys_that_are_not_clean_relative_paths_have_a_problem() -> None:
    for key in ["/abs.png", "a//b.png", "../up.png", "a/../b.png", "./a.png", "a\\u0000b.png"]:
        assert name_problem(key), key
    for key in ["a.png", "a/b.png", "..a.png", "a../b.png", ".hidden.png", "x\\u0001.png"]:
        assert name_problem(key) is None, key


# --- derived names and temporary files ---------------------------------------------------


@pytest.mark.parametrize(
    "stem",
    [
        "w" * 246,
        "clips/" + "é" * 200,
        "a" * 200 + "\\n" * 40,  # escapes are never cut in half
        "k" * 250 + "/" + "x" * 250,  # a bucket key's folders can be long too
        "f/" * 450 + "video",
    ],
)
def test_frame_names_of_long_video_names_fit_any_file_system_and_stay_unique(stem: str) -> None:
    names = {frame_name(f"{stem}.mp4", i) for i in (0, 1, 1_000_000)}
    assert len(names) == 3
    for name in names:
        assert len(name.encode()) <= MAX_NAME_BYTES
        assert all(len(s.encode()) <= MAX_SEGMENT_BYTES for s in name.split("/"))
        assert name.endswith("-mp4.png") and "~" in name
        assert unescape_name(escape_name(unescape_name(name))) == unescape_name(name)
    assert frame_name(f"{stem}.mp4", 7) == frame_name(f"{stem}.mp4", 7)  # stable
    assert frame_name(f"{stem}x.mp4", 7) != frame_name(f"{stem}.mp4", 7)
    assert frame_name("video/street.mp4", 40) == "video/street-000040-mp4.png"  # short: as is


def test_a_file_with_a_255_byte_name_is_written_atomically(tmp_path: Path) -> None:
    storage = LocalStorage(str(tmp_path))
    for name in ["n" * 255, "é" * 127 + "x", "d/" + "z" * 255]:
        storage.write(name, b"data")
        assert storage.read(name) == b"data"
    assert sorted(p.name for p in tmp_path.rglob("*") if p.name.endswith(".tmp")) == []


# --- local listings ----------------------------------------------------------------------


def test_file_names_that_are_not_utf8_or_hold_newlines_are_discovered_and_read_back(
    tmp_path: Path,
) -> None:
    source, out = tmp_path / "in", tmp_path / "out"
    source.mkdir()
    raw = [b"caf\xe9.png", b"new\nline.png", b"back\\slash.png", b"plain.png"]
    for name, data in zip(raw, PNGS, strict=False):
        (Path(os.fsdecode(os.fsencode(source) + b"/" + name))).write_bytes(data)
    storage, output = open_storage(str(source)), open_storage(str(out))
    found = discover(storage, output, shard_size=2)
    keys = [o.key for shard in found.shards for o in read_manifest(output, shard.manifest)]
    assert sorted(keys) == ["back\\\\slash.png", "caf\\xe9.png", "new\\nline.png", "plain.png"]
    for key in keys:
        assert storage.read(key) == PNGS[[escape_name(os.fsdecode(r)) for r in raw].index(key)]
    assert len(text_lines(keys).splitlines()) == len(keys)


def _fs_kinds(folder: Path) -> dict[str, str]:
    """Entries a listing cannot offer as objects, planted; {key: piece of the reason}."""
    folder.mkdir()
    (folder / "real").mkdir()
    (folder / "real" / "a.png").write_bytes(PNGS[0])
    os.symlink("real/a.png", folder / "link-in.png")
    os.symlink("gone.png", folder / "dangling.png")
    os.symlink("loop2.png", folder / "loop1.png")
    os.symlink("loop1.png", folder / "loop2.png")
    os.symlink("/etc", folder / "out-folder")
    os.symlink(folder.parent / "elsewhere.png", folder / "out-file.png")
    (folder.parent / "elsewhere.png").write_bytes(PNGS[1])
    os.symlink("real", folder / "in-folder")
    os.mkfifo(folder / "pipe.png")
    return {
        "dangling.png": "broken symlink",
        "loop1.png": "symlink loop",
        "loop2.png": "symlink loop",
        "out-folder/": "symlink leads outside",
        "out-file.png": "symlink leads outside",
        "in-folder/": "symlink to a folder",
        "pipe.png": "not a regular file (FIFO)",
    }


def test_a_scan_says_what_it_leaves_out_and_discovery_lists_it(tmp_path: Path) -> None:
    expected = _fs_kinds(tmp_path / "in")
    storage = open_storage(str(tmp_path / "in"))
    entries = list(storage.scan())
    left_out = {e.key: e.reason for e in entries if isinstance(e, Unreadable)}
    assert set(left_out) == set(expected)
    for key, piece in expected.items():
        assert piece in left_out[key], key
    assert sorted(o.key for o in storage.list()) == ["link-in.png", "real/a.png"]
    found = discover(storage, open_storage(str(tmp_path / "out")), shard_size=10)
    assert found.unreadable == left_out
    assert found.discovered == 2


def test_a_fifo_is_never_read_even_when_it_replaced_a_listed_file(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "was-a-file.png")
    storage = LocalStorage(str(tmp_path))
    outcome: list[BaseException] = []

    def read() -> None:
        try:
            storage.read("was-a-file.png")
        except BaseException as exc:
            outcome.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(10)  # an open for reading would wait for a writer forever
    assert not reader.is_alive()
    assert isinstance(outcome[0], NotRegularFile)

    from tasks.check import check_images
    from tasks.storage import ObjectInfo

    _, corrupt, _ = check_images(
        storage, [ObjectInfo("was-a-file.png", 1, "v")], 10**8, True, 32, 1
    )
    assert corrupt == {"was-a-file.png": "not a regular file"}


def test_the_output_inside_the_input_is_never_listed_and_the_input_itself_is_refused(
    tmp_path: Path,
) -> None:
    source = tmp_path / "in"
    (source / "out" / "runs" / "r1" / "selected").mkdir(parents=True)
    (source / "out" / "runs" / "r1" / "selected" / "v-000000-mp4.png").write_bytes(PNGS[0])
    (source / "out-not-the-output.png").write_bytes(PNGS[1])
    found = discover(open_storage(str(source)), open_storage(str(source / "out")), 10)
    listed = [
        o.key
        for s in found.shards
        for o in read_manifest(open_storage(str(source / "out")), s.manifest)
    ]
    assert listed == ["out-not-the-output.png"]
    with pytest.raises(ConfigError, match="output .*is the input itself"):
        discover(open_storage(str(source)), open_storage(f"file://{source}/"), 10)


def test_a_bucket_output_inside_the_input_prefix_is_found_by_prefix_not_by_text() -> None:
    inside = open_storage("s3://bucket/data").prefix_of
    assert inside(open_storage("s3://bucket/data/curate/out")) == "curate/out/"
    assert inside(open_storage("s3://bucket/data/")) == ""
    assert inside(open_storage("s3://bucket/database")) is None
    assert inside(open_storage("s3://other/data/out")) is None
    assert open_storage("s3://bucket").prefix_of(open_storage("s3://bucket/out")) == "out/"


# --- buckets -----------------------------------------------------------------------------


def test_bucket_keys_with_dot_segments_slashes_and_odd_text_are_processed_or_listed(
    s3, monkeypatch
) -> None:
    import boto3
    from servers import make_bucket

    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    bucket = f"curate-{uuid.uuid4().hex[:10]}"
    make_bucket(s3, bucket)
    client = boto3.client("s3", endpoint_url=s3.endpoint_url)
    keys = {
        "raw/../escape.png": "unsafe name",
        "raw/a/../b.png": "unsafe name",
        "raw//double.png": "unsafe name",
        "raw/./dot.png": "unsafe name",
        "raw/nul\x00.png": "unsafe name: a NUL",
        # (moto's server refuses a newline in a key: a CR and a control character instead)
        "raw/cr\rx.png": "ok",
        "raw/ctl\x01x.png": "ok",
        "raw/line\u2028separator.png": "ok",
        "raw/%41-q?x#y.png": "ok",
        "raw/back\\slash.png": "ok",
        "raw/caf\u00e9.png": "ok",
        "raw/cafe\u0301.png": "ok",
        "raw/" + "k" * 1000 + ".png": "ok",  # S3 keys hold 1024 bytes
        "raw/..not-a-segment.png": "ok",
    }
    for i, key in enumerate(keys):
        try:
            client.put_object(Bucket=bucket, Key=key, Body=PNGS[i % len(PNGS)])
        except Exception as exc:  # noqa: BLE001 - a key the server itself refuses
            pytest.fail(f"the S3 server refused {key!r}: {exc}")
    # The output is a prefix inside the input's, holding an earlier run's exported frame.
    client.put_object(Bucket=bucket, Key=f"raw/out/{NEVER_LISTED}", Body=PNGS[0])
    output = open_storage(f"s3://{bucket}/raw/out")
    source = open_storage(f"s3://{bucket}/raw")
    found = discover(source, output, shard_size=4)
    listed = {o.key for s in found.shards for o in read_manifest(output, s.manifest)}
    for key, outcome in keys.items():
        name = escape_name(key[len("raw/") :])
        if outcome == "ok":
            assert name in listed, name
            assert source.read(name) == PNGS[list(keys).index(key) % len(PNGS)]
        else:
            assert outcome in found.unreadable[name], (name, found.unreadable)
    assert len(listed) + len(found.unreadable) == len(keys)


# --- permissions (root reads everything: the pipeline runs without that power) ----------


def _unprivileged() -> list[str]:
    """A command prefix that runs a program without the power to read past file modes:
    none for an ordinary user; for root, `setpriv` dropping CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH from its bounding set, so the program gets EACCES like anyone."""
    if not can_read_past_modes():
        return []
    setpriv = shutil.which("setpriv")
    prefix = [setpriv or "setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]
    if setpriv is None or subprocess.run([*prefix, "true"], check=False).returncode != 0:
        pytest.skip("root without a working setpriv (util-linux): no way to be refused a read")
    return prefix


def _curate(
    *args: str, prefix: list[str] | None = None, api: str | None = None
) -> subprocess.CompletedProcess[str]:
    """The CLI as a user runs it; on the tests' Prefect server when given its `api`, else
    with a temporary one."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    if api:
        env["PREFECT_API_URL"] = api
    return subprocess.run(
        [*(prefix or []), CURATE, *args], capture_output=True, text=True, timeout=400, env=env
    )


def _one_line_error(result: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_an_output_that_is_a_file_unwritable_or_the_input_is_a_config_error(tmp_path) -> None:
    source = tmp_path / "in"
    source.mkdir()
    (source / "a.png").write_bytes(PNGS[0])
    (tmp_path / "a-file").write_text("not a folder")
    base = (f"input={source}", "stopping_condition.n_samples=1")
    _one_line_error(
        _curate("run", *base, f"output={tmp_path / 'a-file'}"), 2, "output", "is a file"
    )
    _one_line_error(_curate("run", *base, f"output={source}"), 2, "output", "input itself")
    locked = tmp_path / "read-only"
    locked.mkdir(mode=0o555)
    result = _curate("run", *base, f"output={locked / 'out'}", prefix=_unprivileged())
    _one_line_error(result, 2, "output", "cannot write there", "ermission denied")


@pytest.mark.slow
def test_unreadable_files_and_folders_are_listed_and_processed_once_readable(
    tmp_path, run_curate
) -> None:
    source, out = tmp_path / "in", tmp_path / "out"
    (source / "locked-folder").mkdir(parents=True)
    for i in range(3):
        (source / f"ok-{i}.png").write_bytes(PNGS[i])
    (source / "locked.png").write_bytes(PNGS[3])
    (source / "locked-folder" / "inside.png").write_bytes(PNGS[4])
    (source / "locked.png").chmod(0)
    (source / "locked-folder").chmod(0)
    from prefect.settings import PREFECT_API_URL

    result = _curate(
        "run",
        f"input={source}",
        f"output={out}",
        "stopping_condition.n_samples=2",
        prefix=_unprivileged(),
        api=PREFECT_API_URL.value(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    run = Path(result.stdout.strip().splitlines()[-1].removeprefix("run: "))
    info = json.loads((run / "corruptness_check_information.json").read_text())
    assert info["corrupt_samples"] == {
        "locked.png": "unreadable: permission denied",
        "locked-folder/": "unreadable folder: permission denied",
    }
    report = json.loads((run / "report.json").read_text())
    assert report["counts"]["unreadable"] == 2
    assert (report["counts"]["processed"], report["counts"]["discovered"]) == (3, 5)
    # Not a verdict on their content: once readable, the next run processes them.
    (source / "locked.png").chmod(0o644)
    (source / "locked-folder").chmod(0o755)
    again = run_curate(f"input={source}", f"output={out}", "stopping_condition.n_samples=2")
    assert again.report["counts"]["processed"] == 2
    assert again.corrupt == {}


def test_a_file_made_unreadable_after_listing_is_listed_by_the_check(tmp_path) -> None:
    (tmp_path / "locked.png").write_bytes(PNGS[0])
    (tmp_path / "locked.png").chmod(0)
    script = (
        "import json, sys\n"
        "from tasks.check import check_images\n"
        "from tasks.storage import ObjectInfo, open_storage\n"
        "objects = [ObjectInfo('locked.png', 1, 'v')]\n"
        "_, corrupt, _ = check_images(open_storage(sys.argv[1]), objects, 10**8, True, 32, 1)\n"
        "print(json.dumps(corrupt))\n"
    )
    result = subprocess.run(
        [*_unprivileged(), sys.executable, "-c", script, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"locked.png": "unreadable: permission denied"}


# --- end to end ----------------------------------------------------------------------------


def _outputs(run: Path) -> dict[str, object]:
    """A run folder read back strictly: every list line by line, every JSON as UTF-8."""
    lists = {
        which: (run / "filenames" / f"{which}_filenames.txt").read_bytes().decode("utf-8")
        for which in ("selected", "corrupt", "duplicate")
    }
    documents = {}
    for path in [*run.glob("*.json"), *run.glob("data/*.json")]:
        text = path.read_bytes().decode("utf-8")
        assert "\\ud8" not in text.lower() and "\\udc" not in text.lower(), path  # surrogates
        documents[path.name] = json.loads(text)
    info = documents["corruptness_check_information.json"]
    return {
        "lists": {k: v.splitlines() for k, v in lists.items()},
        "reasons": info["corrupt_samples"] | info["corrupt_videos"],
        "report": documents["report.json"],
        "metadata": pd.read_parquet(run / "data" / "metadata.parquet"),
    }


def _tree(folder: Path, skip: Path) -> dict[bytes, tuple[int, int]]:
    """Every entry under `folder` but `skip`, with its size and mtime (links as links)."""
    entries = {}
    for root, dirs, files in os.walk(os.fsencode(folder)):
        dirs[:] = [d for d in dirs if os.path.join(root, d) != os.fsencode(skip)]
        for name in files + dirs:
            info = os.lstat(os.path.join(root, name))
            entries[os.path.join(root, name)] = (info.st_size, info.st_mtime_ns)
    return entries


@pytest.mark.slow
def test_hostile_names_and_entries_end_to_end_then_a_rerun_sees_nothing_new(
    tmp_path, run_curate, reliability
) -> None:
    source = tmp_path / "in"
    expected = make_name_and_fs_cases(source)
    reliability.add(inputs=len(expected))
    output = source / OUTPUT_FOLDER
    before = _tree(tmp_path, output)
    args = (f"input={source}", f"output={output}", "stopping_condition.proportion_samples=1")
    first = run_curate(*args)
    seen = _outputs(first.path)
    metadata = seen["metadata"]
    processed = set(metadata["filename"][metadata["video"].isna()]) | set(
        metadata["video"].dropna()
    )
    ok = {name for name, outcome in expected.items() if outcome == "ok"}
    assert processed == ok  # and nothing from the output folder
    assert set(seen["reasons"]) == set(expected) - ok
    for name in set(expected) - ok:
        assert expected[name] in seen["reasons"][name], (name, seen["reasons"][name])
    assert seen["lists"]["corrupt"] == sorted(seen["reasons"])
    assert set(seen["lists"]["selected"]) <= set(metadata["filename"])
    assert not any(n.startswith(OUTPUT_FOLDER) for lst in seen["lists"].values() for n in lst)
    assert NEVER_LISTED not in set(metadata["filename"])
    counts = seen["report"]["counts"]
    assert counts["unreadable"] == len(set(expected) - ok)
    embeddings = pd.read_csv(first.path / "data" / "embeddings.csv", keep_default_na=False)
    assert set(embeddings["filenames"]) == set(metadata["filename"]) - set(
        seen["lists"]["duplicate"]
    )
    # Every selected frame is a file under its listed name, however long its video's name.
    frames = [n for n in seen["lists"]["selected"] if n.endswith("-mp4.png")]
    assert any("~" in name for name in frames)  # the shortened names of the longer video
    for name in frames:
        assert (first.path / "selected" / name).is_file()
        assert len(name.encode()) <= MAX_SEGMENT_BYTES
    # The report draws names as text (a `$` would start math, `<b>` markup).
    assert (first.path / "report.pdf").is_file() and (first.path / "report.html").is_file()
    assert "&lt;b&gt;html&lt;/b&gt;" in (first.path / "report.html").read_text()
    datapool = pd.read_parquet(output / "datapool" / "v000001" / "objects.parquet")
    assert set(datapool["key"]) == ok

    second = run_curate(*args)
    again = _outputs(second.path)
    assert again["report"]["counts"]["processed"] == 0  # the exported frames are not new inputs
    assert again["lists"]["selected"] == []
    assert again["reasons"] == seen["reasons"]  # still listed, each run

    # A run that fails (a video whose bytes changed under an unchanged size and mtime, so
    # the cached check passes it and the export cannot decode it) leaves no run folder.
    video = next(source.glob("vvv*.mp4"))
    stat = video.stat()
    video.write_bytes(os.urandom(stat.st_size))
    os.utime(video, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(Exception):  # noqa: B017 - whatever the decoder says
        run_curate(*args, "datasource.process_all=true")
    runs = sorted(p.name for p in (output / "runs").iterdir() if (p / "report.json").exists())
    assert runs == sorted([first.path.name, second.path.name])
    assert sorted(p.name for p in (output / "runs").iterdir()) == sorted([*runs, "earlier"])
    assert (output / "LATEST").read_text().strip() == second.path.name
    after = _tree(tmp_path, output)
    assert after == before  # nothing written outside the output (the video kept its mtime)
