"""`curate select`: selection alone on a user's embeddings, end to end through main()."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flows.select_only import main


def _clusters(k: int = 4, per: int = 25, dim: int = 16) -> np.ndarray:
    rng = np.random.default_rng(0)
    centres = np.eye(dim)[:k]
    x = np.repeat(centres, per, axis=0) + rng.normal(scale=0.01, size=(k * per, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _run(output: Path) -> Path:
    return output / "runs" / (output / "LATEST").read_text().strip()


def test_select_on_a_npy_writes_a_run_folder(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    np.save(tmp_path / "vectors.npy", _clusters() * 3)  # not normalised: fine
    code = main(
        [
            f"embeddings={tmp_path / 'vectors.npy'}",
            f"output={tmp_path / 'out'}",
            "stopping_condition.n_samples=4",
            "selection.strategy=kcenter",
        ]
    )
    assert code == 0
    run = _run(tmp_path / "out")
    assert capsys.readouterr().out.strip() == f"run: {run}"
    selected = (run / "filenames/selected_filenames.txt").read_text().split()
    assert sorted(int(s) // 25 for s in selected) == [0, 1, 2, 3]
    table = pd.read_parquet(run / "data/selection.parquet")
    assert list(table["filename"]) == selected
    report = json.loads((run / "report.json").read_text())
    assert report["counts"]["selected"] == 4 and report["counts"]["processed"] == 100


def test_names_file_and_strategies_with_custom_metadata(tmp_path: Path) -> None:
    names = [f"img/{i:03d}.png" for i in range(100)]
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n")
    np.save(tmp_path / "v.npy", _clusters())
    pd.DataFrame({"filename": names, "sharpness": np.arange(100.0)}).to_parquet(
        tmp_path / "meta.parquet"
    )
    strategies = (
        "[{input: {type: EMBEDDINGS}, strategy: {type: DIVERSITY}},"
        " {input: {type: METADATA, key: sharpness},"
        "  strategy: {type: THRESHOLD, threshold: 50, operation: BIGGER}}]"
    )
    code = main(
        [
            f"embeddings={tmp_path / 'v.npy'}",
            f"names={tmp_path / 'names.txt'}",
            f"output={tmp_path / 'out'}",
            "stopping_condition.n_samples=2",
            f"selection.custom_metadata={tmp_path / 'meta.parquet'}",
            f"selection.strategies={strategies}",
        ]
    )
    assert code == 0
    run = _run(tmp_path / "out")
    selected = (run / "filenames/selected_filenames.txt").read_text().split()
    assert len(selected) == 2 and all(int(s[4:7]) > 50 for s in selected)
    table = pd.read_parquet(run / "data/selection.parquet")
    assert (table["status"] == "threshold").sum() == 51


def test_lightly_embeddings_csv(tmp_path: Path) -> None:
    x = _clusters()
    frame = pd.DataFrame(x, columns=[f"embedding_{i}" for i in range(16)])
    frame.insert(0, "filenames", [f"a/{i}.jpg" for i in range(100)])
    frame["labels"] = 0
    frame.to_csv(tmp_path / "embeddings.csv", index=False)
    code = main(
        [
            f"embeddings={tmp_path / 'embeddings.csv'}",
            f"output={tmp_path / 'out'}",
            "stopping_condition.min_distance=0.3",
        ]
    )
    assert code == 0
    run = _run(tmp_path / "out")
    selected = (run / "filenames/selected_filenames.txt").read_text().split()
    assert sorted(int(s[2:-4]) // 25 for s in selected) == [0, 1, 2, 3]
    table = pd.read_parquet(run / "data/selection.parquet")
    cut = table[table["status"] == "min_distance"]
    assert len(cut) == 96
    assert all(
        int(a[2:-4]) // 25 == int(b[2:-4]) // 25
        for a, b in zip(cut["filename"], cut["closest_selected"], strict=True)
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["output=o", "stopping_condition.n_samples=2"], "error: embeddings: required"),
        (
            ["embeddings=missing.npy", "output=o", "stopping_condition.n_samples=2"],
            "error: embeddings=missing.npy: no such file",
        ),
        (["embeddings=E", "output=o"], "stopping_condition: set n_samples"),
        (
            [
                "embeddings=E",
                "output=o",
                "stopping_condition.n_samples=2",
                "selection.strategies=[{input: {type: EMBEDDINGS}, strategy: {type: THRESHOLD}}]",
            ],
            "error: config: selection.strategies[0].input.type: THRESHOLD takes",
        ),
        (
            ["embeddings=E", "output=o", "stopping_condition.n_sample=2"],
            "did you mean 'stopping_condition.n_samples'",
        ),
    ],
)
def test_user_errors_are_one_line_and_exit_2(  # type: ignore[no-untyped-def]
    tmp_path: Path, capsys, args: list[str], message: str
) -> None:
    np.save(tmp_path / "E.npy", _clusters())
    args = [a.replace("embeddings=E", f"embeddings={tmp_path / 'E.npy'}") for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
