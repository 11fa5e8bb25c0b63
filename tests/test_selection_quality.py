"""The default selection teaches a 1-nearest-neighbour classifier more than random does.

On scikit-learn's labeled digits (upscaled to images and run through the whole
pipeline), a classifier that knows only the selected samples' labels is evaluated on
every sample, in the pipeline's own embedding space, against the mean of 20 random
subsets of the same size.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest


def one_nn_accuracy(vectors: np.ndarray, labels: np.ndarray, chosen: np.ndarray) -> float:
    nearest = (vectors @ vectors[chosen].T).argmax(axis=1)
    return float((labels[chosen][nearest] == labels).mean())


@pytest.mark.parametrize("budget", [20, 50, 100])
def test_default_selection_beats_the_mean_of_20_random_subsets(
    digits_folder, run_curate, tmp_path_factory, budget
):
    output = tmp_path_factory.getbasetemp() / "digits-output"  # shared: embeddings cached
    run = run_curate(
        f"input={digits_folder}",
        f"output={output}",
        f"stopping_condition.n_samples={budget}",
        "datasource.process_all=true",  # each budget from scratch, not on the last's picks
    )
    table = pd.read_csv(run.path / "data/embeddings.csv")
    names = table["filenames"].tolist()
    vectors = table.filter(like="embedding_").to_numpy(dtype=np.float32)
    labels = np.array([int(re.search(r"label(\d)", n).group(1)) for n in names])
    index = {name: i for i, name in enumerate(names)}
    selected = np.array([index[name] for name in run.names("selected")])
    assert len(selected) == budget
    explained = pd.read_parquet(run.path / "data/selection.parquet")
    picked = explained[explained["status"] == "selected"].sort_values("pick_order")
    assert list(picked["filename"]) == run.names("selected")

    ours = one_nn_accuracy(vectors, labels, selected)
    random = np.mean(
        [
            one_nn_accuracy(
                vectors,
                labels,
                np.random.default_rng(seed).choice(len(names), budget, replace=False),
            )
            for seed in range(20)
        ]
    )
    print(f"budget {budget}: default {ours:.3f} vs random mean {random:.3f}")
    assert ours > random
