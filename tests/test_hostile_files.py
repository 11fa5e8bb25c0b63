"""The hostile image and video corpus (`hostile_files.py`) through one real curate run:
every input is processed or listed with its reason, the run completes, and nothing is
written outside the output."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from hostile_files import EXIF_ROTATED, EXIF_ROTATED_SIZE, make_file_cases

from tasks.naming import is_image


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under `root`: (size, mtime in ns) by relative path."""
    return {
        str(path.relative_to(root)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in root.rglob("*")
        if path.is_file()
    }


# One run of about 70 inputs, one of them a 179 Mpx image (a minute of CPU): slow.
pytestmark = [pytest.mark.slow, pytest.mark.reliability]


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory: pytest.TempPathFactory, prefect_server: None):
    from flows.curate import curate
    from tasks.config import load_config

    root = tmp_path_factory.mktemp("hostile")
    expected = make_file_cases(root / "input")
    before = _tree(root)
    output = root / "output"
    config = load_config(
        None,
        [
            f"input={root / 'input'}",
            f"output={output}",
            "num_workers=2",
            "stopping_condition.n_samples=5",
        ],
    )
    run = Path(curate(**config.sections()))
    outside = {k: v for k, v in _tree(root).items() if not k.startswith("output/")}
    return expected, run, before, outside


def _reasons(run: Path) -> dict[str, str]:
    info = json.loads((run / "corruptness_check_information.json").read_text())
    return info["corrupt_samples"] | info["corrupt_videos"]


def test_the_corpus_has_at_least_thirty_kinds_of_images_and_videos(hostile_run) -> None:
    expected = hostile_run[0]
    assert len(expected) >= 30
    assert sum(is_image(name) for name in expected) >= 15
    assert sum(not is_image(name) for name in expected) >= 15


def test_every_hostile_input_is_processed_or_listed_with_its_reason(hostile_run) -> None:
    expected, run, _, _ = hostile_run
    reasons = _reasons(run)
    metadata = pd.read_parquet(run / "data/metadata.parquet")
    samples, videos = set(metadata["filename"]), set(metadata["video"].dropna())
    wrong = {}
    for name, outcome in expected.items():
        if outcome == "ok":
            processed = name in samples if is_image(name) else name in videos
            if name in reasons or not processed:
                wrong[name] = reasons.get(name, "not processed")
        elif outcome not in reasons.get(name, ""):
            wrong[name] = reasons.get(name, "not listed")
    assert not wrong, wrong
    assert set(reasons) == {name for name, outcome in expected.items() if outcome != "ok"}


def test_the_run_completes_and_counts_every_input(hostile_run, reliability) -> None:
    expected, run, _, _ = hostile_run
    counts = json.loads((run / "report.json").read_text())["counts"]
    corrupt = {name for name, outcome in expected.items() if outcome != "ok"}
    reliability.add(inputs=len(expected), lost=len(expected) - counts["processed"])
    assert counts["discovered"] == counts["processed"] == len(expected)
    assert counts["corrupt"] == len(corrupt)  # videos included
    assert counts["corrupt_videos"] == sum(not is_image(name) for name in corrupt)
    assert counts["selected"] == 5


def test_nothing_is_written_outside_the_output(hostile_run) -> None:
    _, _, before, outside = hostile_run
    assert outside == before


def test_an_exif_rotated_image_is_described_as_stored(hostile_run) -> None:
    run = hostile_run[1]
    metadata = pd.read_parquet(run / "data/metadata.parquet").set_index("filename")
    row = metadata.loc[EXIF_ROTATED]
    assert (row["width"], row["height"]) == EXIF_ROTATED_SIZE
