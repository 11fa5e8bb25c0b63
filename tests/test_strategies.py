"""Each strategy alone and combined, on data where the answer is known; config errors
name the entry and the key; the explanation table agrees with the picks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_digits

from tasks import kcenter
from tasks.config import Selection, load_config
from tasks.errors import CurateError
from tasks.strategies import Inputs, parse_strategies, read_custom_metadata, run_strategies


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _clusters(k: int, per: int, sigma: float = 0.02, dim: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = _unit(np.eye(dim)[:k] + 0.05 * rng.normal(size=(k, dim)))
    return _unit(np.repeat(centres, per, axis=0) + rng.normal(scale=sigma, size=(k * per, dim)))


def _inputs(x: np.ndarray, **columns: object) -> Inputs:
    names = [f"s{i:04d}.jpg" for i in range(len(x))]
    table = pd.DataFrame({"filename": names, **columns})
    return Inputs(names, x, table)


def _run(inputs: Inputs, strategies: list[dict], k: int, min_distance: float | None = None):  # type: ignore[no-untyped-def]
    return run_strategies(parse_strategies(strategies), inputs, k, min_distance, seed=0)


DIVERSITY = {"input": {"type": "EMBEDDINGS"}, "strategy": {"type": "DIVERSITY"}}


def _weights(key: str, strength: float = 1.0) -> dict:
    return {
        "input": {"type": "METADATA", "key": key},
        "strategy": {"type": "WEIGHTS", "strength": strength},
    }


def test_threshold_excludes_every_sample_below_it() -> None:
    x = _clusters(4, 25)
    sharpness = np.arange(100, dtype=float)
    threshold = {
        "input": {"type": "METADATA", "key": "lightly.sharpness"},
        "strategy": {"type": "THRESHOLD", "threshold": 60, "operation": "BIGGER_EQUAL"},
    }
    chosen = _run(_inputs(x, sharpness=sharpness), [DIVERSITY, threshold], 30)
    assert len(chosen.picks) == 30 and min(chosen.picks) >= 60
    dropped = chosen.explanation[chosen.explanation["status"] == "threshold"]
    assert len(dropped) == 60
    assert set(dropped["threshold"]) == {"lightly.sharpness >= 60"}


def test_weights_alone_prefer_the_heavy() -> None:
    x = _clusters(4, 25)
    weight = np.random.default_rng(0).random(100)
    chosen = _run(_inputs(x, w=weight), [_weights("w")], 10)
    assert chosen.picks == list(np.argsort(-weight)[:10])


def test_weights_with_diversity_pick_the_heaviest_of_each_cluster() -> None:
    x = _clusters(4, 25, sigma=0.01)
    weight = 0.5 + 0.1 * np.random.default_rng(0).random(100)
    heaviest = {3, 31, 60, 99}
    weight[list(heaviest)] = 1.0
    chosen = _run(_inputs(x, w=weight), [DIVERSITY, _weights("w", 1.0)], 4)
    assert set(chosen.picks) == heaviest


def test_strength_moves_the_trade_off_from_coverage_to_weight() -> None:
    """Cluster 0 is heavy: a strong WEIGHTS entry keeps picking there."""
    x = _clusters(3, 30, sigma=0.05)
    weight = np.where(np.arange(90) < 30, 1.0, 0.3)
    in_heavy = []
    for strength in (0.1, 1.0, 10.0):
        picks = _run(_inputs(x, w=weight), [DIVERSITY, _weights("w", strength)], 12).picks
        in_heavy.append(sum(p < 30 for p in picks))
    assert in_heavy[0] <= in_heavy[1] <= in_heavy[2]
    assert in_heavy[0] < in_heavy[2]


def test_balance_reaches_the_target_within_one_sample_per_class() -> None:
    x = _clusters(3, 60, sigma=0.05)
    classes = np.array(["car"] * 120 + ["bus"] * 60)  # cars are two of the three clusters
    balance = {
        "input": {"type": "PREDICTIONS", "task": "vehicles", "name": "CATEGORY"},
        "strategy": {"type": "BALANCE", "target": {"car": 0.2, "bus": 0.8}},
    }
    inputs = _inputs(x, **{"vehicles:category": classes})
    for k in (5, 10, 23):
        chosen = _run(inputs, [DIVERSITY, balance], k)
        counts = pd.Series(classes[chosen.picks]).value_counts()
        assert abs(counts.get("bus", 0) - 0.8 * k) <= 1
        assert abs(counts.get("car", 0) - 0.2 * k) <= 1
        assert list(chosen.explanation["class"].dropna()) == list(classes[chosen.picks])


def test_balance_on_a_metadata_column_without_diversity() -> None:
    x = _clusters(2, 20)
    kind = np.array(["day"] * 30 + ["night"] * 10)
    balance = {
        "input": {"type": "METADATA", "key": "time_of_day"},
        "strategy": {"type": "BALANCE", "target": {"day": 0.5, "night": 0.5}},
    }
    chosen = _run(_inputs(x, time_of_day=kind), [balance], 10)
    assert sorted(kind[chosen.picks]).count("night") == 5


def test_similarity_picks_the_query_neighbours_first() -> None:
    x = _clusters(4, 25, sigma=0.02)
    names = [f"s{i:04d}.jpg" for i in range(100)]
    similarity = {
        "input": {"type": "EMBEDDINGS"},
        "strategy": {"type": "SIMILARITY", "query": {"names": [names[60]]}},
    }
    chosen = _run(_inputs(x), [similarity], 20)
    assert all(50 <= p < 75 for p in chosen.picks)


def test_similarity_with_diversity_stays_near_the_query() -> None:
    x = _clusters(4, 25, sigma=0.05)
    query = x[[10]]
    np_query = {"embeddings": "query.npy"}
    similarity = {
        "input": {"type": "EMBEDDINGS"},
        "strategy": {"type": "SIMILARITY", "strength": 20, "query": np_query},
    }
    import io

    buffer = io.BytesIO()
    np.save(buffer, query)
    inputs = Inputs([str(i) for i in range(100)], x, read_file=lambda _: buffer.getvalue())
    picks = run_strategies(parse_strategies([DIVERSITY, similarity]), inputs, 6, None, 0).picks
    assert sum(p < 25 for p in picks) >= 4


def test_typicality_alone_picks_the_dense_cluster_first() -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [
            _unit(np.eye(8)[0] + rng.normal(scale=0.01, size=(40, 8))),
            _unit(np.eye(8)[1] + rng.normal(scale=0.3, size=(40, 8))),
        ]
    )
    typicality = {"input": {"type": "EMBEDDINGS"}, "strategy": {"type": "TYPICALITY"}}
    chosen = _run(Inputs([str(i) for i in range(80)], x), [typicality], 10)
    assert all(p < 40 for p in chosen.picks)


def test_diversity_min_distance_stops_at_the_right_pick_and_names_the_closest() -> None:
    x = _clusters(5, 20, sigma=0.005)
    entry = {
        "input": {"type": "EMBEDDINGS"},
        "strategy": {"type": "DIVERSITY", "stopping_condition_minimum_distance": 0.2},
    }
    chosen = _run(_inputs(x), [entry], 100)
    assert sorted(p // 20 for p in chosen.picks) == [0, 1, 2, 3, 4]
    assert chosen.stopped == "min_distance"
    table = chosen.explanation
    cut = table[table["status"] == "min_distance"]
    assert len(cut) == 95
    for name, closest in zip(cut["filename"], cut["closest_selected"], strict=True):
        assert int(name[1:5]) // 20 == int(closest[1:5]) // 20


def test_explanation_agrees_with_the_picks() -> None:
    x = _clusters(4, 25, sigma=0.05)
    weight = np.random.default_rng(2).random(100) + 0.5
    chosen = _run(_inputs(x, w=weight), [DIVERSITY, _weights("w")], 8)
    table = chosen.explanation
    picked = table[table["status"] == "selected"].sort_values("pick_order")
    assert list(picked["filename"]) == [f"s{i:04d}.jpg" for i in chosen.picks]
    assert list(picked["pick_order"]) == list(range(8))
    assert np.isnan(picked["distance"].iloc[0])  # nothing selected before the first
    objective = picked["1:weights:w"].to_numpy()
    assert np.allclose(objective, weight[chosen.picks] / weight.max())
    # the score is the distance when picked times the weight objective
    assert np.allclose(
        picked["score"].iloc[1:], (picked["distance"] * objective).iloc[1:], rtol=1e-5
    )
    # each pick's distance is its distance to the nearest earlier pick
    for j in range(1, 8):
        earlier = x[chosen.picks[:j]]
        expected = (1 - earlier @ x[chosen.picks[j]]).min()
        assert picked["distance"].iloc[j] == pytest.approx(expected, abs=1e-5)


def test_random_input_is_a_seeded_random_subset() -> None:
    x = _clusters(2, 50)
    entry = {"input": {"type": "RANDOM", "random_seed": 3}, "strategy": {"type": "WEIGHTS"}}
    a = _run(Inputs([str(i) for i in range(100)], x), [entry], 10).picks
    b = _run(Inputs([str(i) for i in range(100)], x), [entry], 10).picks
    assert a == b and len(set(a)) == 10


def test_custom_metadata_json_files_become_dotted_columns() -> None:
    files = {
        ".curate/metadata/a.jpg.json": b'{"metadata": {"weather": {"temperature": 23}}}',
        ".curate/metadata/dir/b.jpg.json": b'{"weather": {"temperature": 5}}',
    }
    table = read_custom_metadata(files.__getitem__, list(files), ".curate/metadata/")
    assert dict(zip(table["filename"], table["weather.temperature"], strict=True)) == {
        "a.jpg": 23,
        "dir/b.jpg": 5,
    }


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        (
            [
                {"input": {"type": "EMBEDDINGS"}, "strategy": {"type": "DIVERSITY"}},
                {
                    "input": {"type": "METADATA", "key": "sharpness"},
                    "strategy": {"type": "THRESHOLD", "operation": "BIGGER"},
                },
            ],
            "selection.strategies[1].strategy.threshold: required for THRESHOLD",
        ),
        (
            [
                {
                    "input": {"type": "METADATA", "key": "x"},
                    "strategy": {"type": "THRESHOLD", "treshold": 1, "operation": "BIGGER"},
                }
            ],
            "selection.strategies[0].strategy.treshold: unknown key; did you mean 'threshold'?",
        ),
        (
            [{"input": {"type": "METADATA"}, "strategy": {"type": "WEIGHTS"}}],
            "selection.strategies[0].input.key: required for METADATA input",
        ),
        (
            [{"input": {"type": "EMBEDDINGS"}, "strategy": {"type": "WEIGHTS"}}],
            "selection.strategies[0].input.type: WEIGHTS takes METADATA or RANDOM or SCORES",
        ),
        (
            [{"input": {"type": "IMAGES"}, "strategy": {"type": "WEIGHTS"}}],
            "selection.strategies[0].input.type: Input should be",
        ),
        (
            [
                {
                    "input": {"type": "METADATA", "key": "k"},
                    "strategy": {"type": "BALANCE", "target": {"a": 0.7, "b": 0.7}},
                }
            ],
            "selection.strategies[0].strategy.target: shares must be",
        ),
    ],
)
def test_config_errors_name_the_entry_and_the_key(entries: list, message: str) -> None:
    with pytest.raises(CurateError) as info:
        Selection(strategies=entries)
    assert message in str(info.value)


def test_strategies_come_through_the_config_and_its_yaml(tmp_path) -> None:  # type: ignore[no-untyped-def]
    config_file = tmp_path / "c.yaml"
    config_file.write_text(
        "input: ./in\noutput: ./out\nstopping_condition: {n_samples: 5}\n"
        "selection:\n  strategies:\n"
        "    - input: {type: EMBEDDINGS}\n      strategy: {type: DIVERSITY, strength: 0.6}\n"
        "    - input: {type: METADATA, key: lightly.sharpness}\n"
        "      strategy: {type: WEIGHTS, strength: 0.4}\n"
    )
    config = load_config(config_file, [])
    assert config.selection.strategies is not None
    assert [e.strategy.type for e in config.selection.strategies] == ["DIVERSITY", "WEIGHTS"]
    with pytest.raises(CurateError, match=r"selection\.strategies\[0\]\.strategy\.type"):
        load_config(
            None,
            [
                "input=a",
                "output=b",
                "stopping_condition.n_samples=2",
                "selection.strategies=[{input: {type: EMBEDDINGS}, strategy: {type: DIVERSE}}]",
            ],
        )
    with pytest.raises(ValueError, match="not both"):
        Selection(strategy="kcenter", strategies=[DIVERSITY])


def test_a_config_with_strategies_survives_a_json_round_trip() -> None:
    """Prefect sends the flow's parameters as JSON and validates them again."""
    config = load_config(None, ["input=a", "output=b", "stopping_condition.n_samples=2"])
    with_strategies = config.model_copy(
        update={"selection": Selection(strategies=[DIVERSITY, _weights("sharpness")])}
    )
    again = type(config).model_validate(with_strategies.model_dump(mode="json"))
    assert again.selection == with_strategies.selection


def test_min_distance_cannot_exceed_two() -> None:
    with pytest.raises(CurateError, match="stopping_condition.min_distance"):
        load_config(None, ["input=a", "output=b", "stopping_condition.min_distance=2.5"])


def _digits() -> tuple[np.ndarray, np.ndarray]:
    digits = load_digits()
    x = digits.data - digits.data.mean(axis=0)
    return _unit(x), digits.target


def _one_nn(x: np.ndarray, labels: np.ndarray, chosen: list[int]) -> float:
    nearest = (x @ x[chosen].T).argmax(axis=1)
    return float((labels[chosen][nearest] == labels).mean())


@pytest.mark.parametrize(("budget", "expected"), [(50, "typical_coverage"), (500, "kcenter")])
def test_auto_default_takes_the_strategy_that_wins_at_its_budget(
    budget: int, expected: str
) -> None:
    """The measured switch (README): typicality helps at small budgets, hurts at large."""
    x, labels = _digits()
    auto = Selection().entries(budget, len(x))
    assert [e.strategy.type for e in auto] == [
        e.strategy.type
        for e in Selection(strategy=expected).entries(budget, len(x))  # type: ignore[arg-type]
    ]
    typical = kcenter.greedy(x, budget, weights=kcenter.knn_typicality(x, 0)).picks
    plain = kcenter.greedy(x, budget).picks
    winner = (
        "typical_coverage" if _one_nn(x, labels, typical) > _one_nn(x, labels, plain) else "kcenter"
    )
    assert winner == expected
