"""The pruned greedy pass gives exactly the plain pass's picks, far cheaper, at scale."""

import numpy as np
import pytest

from tasks.kcenter import Balance, greedy, knn_typicality, plain_greedy


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _uniform(n: int, dim: int, seed: int = 0) -> np.ndarray:
    return _unit(np.random.default_rng(seed).normal(size=(n, dim)))


def _clustered(n: int, dim: int, seed: int = 0, clusters: int = 30) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = _unit(rng.normal(size=(clusters, dim)))
    return _unit(centres[rng.integers(0, clusters, n)] + rng.normal(scale=0.03, size=(n, dim)))


def _same(a, b) -> None:  # type: ignore[no-untyped-def]
    assert a.picks == b.picks
    assert a.distances == b.distances
    assert a.scores == b.scores
    assert a.factors == b.factors
    assert a.stopped == b.stopped


DATA = {
    "uniform": lambda: _uniform(3001, 24),
    "clustered": lambda: _clustered(6002, 32),
    "clustered-high-dim": lambda: _clustered(4003, 128, seed=3),
}


@pytest.mark.parametrize("data", list(DATA))
def test_pruned_pass_gives_exactly_the_plain_picks(data: str) -> None:
    x = DATA[data]()
    _same(greedy(x, 400), plain_greedy(x, 400))


@pytest.mark.parametrize("data", list(DATA))
def test_pruned_pass_with_weights_prior_balance_and_min_distance_matches_plain(
    data: str,
) -> None:
    x = DATA[data]()
    rng = np.random.default_rng(1)
    options = {
        "weights": rng.random(len(x)).astype(np.float32),
        "prior": x[:7].copy(),
        "balance": Balance(rng.integers(0, 3, len(x)), np.array([0.5, 0.3, 0.2])),
        "min_distance": 0.02,
        "track": True,
    }
    a, b = greedy(x, 500, **options), plain_greedy(x, 500, **options)
    _same(a, b)
    assert b.nearest is not None and a.nearest is not None
    assert np.array_equal(a.nearest, b.nearest)


def test_pruned_pass_skips_most_rows_on_clustered_data() -> None:
    """After one pick per cluster, a pick recomputes its own cluster, not the others."""
    x = _clustered(20000, 32, clusters=40)
    computed = []
    from tasks import kcenter

    original = kcenter._distances_into

    def counting(block, q, out):  # type: ignore[no-untyped-def]
        computed.append(len(block))
        return original(block, q, out)

    kcenter._distances_into = counting  # type: ignore[assignment]
    try:
        picks = greedy(x, 400).picks
    finally:
        kcenter._distances_into = original  # type: ignore[assignment]
    assert picks == plain_greedy(x, 400).picks
    assert sum(computed) < 0.2 * 400 * len(x)


def test_ties_go_to_the_lowest_index() -> None:
    x = np.tile(_uniform(5, 8), (3, 1))  # every point three times
    assert greedy(x, 5).picks == plain_greedy(x, 5).picks
    assert all(p < 5 for p in greedy(x, 5).picks)


def test_min_distance_stops_at_the_right_pick() -> None:
    centres = _unit(np.eye(16)[:4])
    x = _unit(
        np.repeat(centres, 25, axis=0) + np.random.default_rng(0).normal(scale=0.01, size=(100, 16))
    )
    result = greedy(x, 100, min_distance=0.3, track=True)
    assert sorted(p // 25 for p in result.picks) == [0, 1, 2, 3]
    assert result.stopped == "min_distance"
    assert result.nearest is not None
    for i in range(100):  # every cut sample's nearest pick is in its own cluster
        assert result.picks[result.nearest[i]] // 25 == i // 25


def test_reads_a_memory_mapped_npy(tmp_path) -> None:  # type: ignore[no-untyped-def]
    x = _clustered(3000, 16)
    np.save(tmp_path / "x.npy", x)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    assert greedy(mapped, 50).picks == plain_greedy(x, 50).picks


def test_empty_input_and_zero_budget_give_no_picks() -> None:
    assert greedy(np.empty((0, 8), np.float32), 5).picks == []
    assert greedy(_uniform(10, 8), 0).picks == []


def test_budget_beyond_the_candidates_picks_all_then_stops() -> None:
    result = greedy(_uniform(9, 8), 20)
    assert sorted(result.picks) == list(range(9))
    assert result.stopped == "exhausted"


def test_typicality_is_highest_in_the_dense_cluster() -> None:
    rng = np.random.default_rng(0)
    dense = _unit(np.eye(8)[0] + rng.normal(scale=0.01, size=(50, 8)))
    sparse = _unit(np.eye(8)[1] + rng.normal(scale=0.3, size=(50, 8)))
    scores = knn_typicality(np.concatenate([dense, sparse]), seed=0, k=5)
    assert scores[:50].min() > scores[50:].max()
    assert scores.max() == pytest.approx(1.0)
