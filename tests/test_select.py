"""Select: budgets, stopping by distance, prior selections, and what each strategy favours."""

import numpy as np
import pytest
import torch

from tasks.config import StoppingCondition
from tasks.select import greedy_cover, select

CPU = torch.device("cpu")
STRATEGIES = ["typical_coverage", "kcenter", "random"]


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _random(n: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    return _unit(np.random.default_rng(seed).normal(size=(n, dim)))


def _clusters(centers: np.ndarray, per: int, sigma: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    points = np.repeat(centers, per, axis=0)
    return _unit(points + rng.normal(scale=sigma, size=points.shape))


def _pick(x: np.ndarray, strategy: str, seed: int = 0, **stopping: float) -> list[int]:
    return select(x, strategy, StoppingCondition(**stopping), seed, CPU)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_returns_exactly_n_samples_unique_indices(strategy: str) -> None:
    picks = _pick(_random(200), strategy, n_samples=17)
    assert len(picks) == len(set(picks)) == 17
    assert all(0 <= i < 200 for i in picks)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_proportion_samples_rounds_up(strategy: str) -> None:
    assert len(_pick(_random(10), strategy, proportion_samples=0.25)) == 3
    assert len(_pick(_random(30), strategy, proportion_samples=0.01)) == 1


def test_proportion_of_a_round_count_is_not_rounded_up_by_float_error() -> None:
    assert len(_pick(_random(100), "random", proportion_samples=0.07)) == 7


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_selection_is_deterministic_for_a_seed(strategy: str) -> None:
    x = _random(300)
    assert _pick(x, strategy, seed=5, n_samples=20) == _pick(x, strategy, seed=5, n_samples=20)


def test_random_strategy_depends_on_the_seed() -> None:
    x = _random(300)
    assert _pick(x, "random", seed=1, n_samples=20) != _pick(x, "random", seed=2, n_samples=20)


@pytest.mark.parametrize("strategy", ["typical_coverage", "kcenter"])
def test_min_distance_alone_stops_after_one_pick_per_tight_cluster(strategy: str) -> None:
    centers = _random(5, seed=1)
    x = _clusters(centers, per=40, sigma=0.01)
    picks = _pick(x, strategy, min_distance=0.5)
    assert sorted(i // 40 for i in picks) == [0, 1, 2, 3, 4]


def test_prior_selection_steers_picks_away_from_its_region() -> None:
    centers = _unit(np.eye(16)[:2])
    x = torch.from_numpy(_clusters(centers, per=30, sigma=0.02))
    prior = x[:1].clone()  # a member of cluster 0 was selected before
    picks = greedy_cover(x, 1, None, None, selected=prior)
    assert picks[0] >= 30
    assert greedy_cover(x, 5, None, 0.5, selected=prior) == picks  # cluster 0 is covered


def test_prior_selection_through_select() -> None:
    centers = _unit(np.eye(16)[:2])
    x = _clusters(centers, per=30, sigma=0.02)
    stopping = StoppingCondition(n_samples=1)
    for strategy in ("typical_coverage", "kcenter"):
        assert select(x, strategy, stopping, 0, CPU, selected=x[30:31])[0] < 30


def _clusters_and_outliers() -> tuple[np.ndarray, set[int]]:
    """Three close, dense clusters (pairwise cosine distance ~0.4) of 60 points each,
    then three outliers orthogonal to them (distance ~1 to everything)."""
    eye = np.eye(16)
    centers = _unit(eye[0] + 0.8 * eye[1:4])
    x = np.concatenate([_clusters(centers, per=60, sigma=0.02), _unit(eye[4:7])])
    return x, {180, 181, 182}


def test_kcenter_picks_the_outliers_first_after_its_start() -> None:
    x, outliers = _clusters_and_outliers()
    picks = _pick(x, "kcenter", n_samples=4)
    assert picks[0] == 0  # farthest-point selection starts at the first row
    assert set(picks[1:]) == outliers


def test_typical_coverage_picks_one_member_per_cluster_before_any_outlier() -> None:
    x, outliers = _clusters_and_outliers()
    picks = _pick(x, "typical_coverage", n_samples=3)
    assert not outliers & set(picks)
    assert sorted(i // 60 for i in picks) == [0, 1, 2]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_budget_larger_than_the_candidates_gives_all_of_them(strategy: str) -> None:
    assert sorted(_pick(_random(12), strategy, n_samples=50)) == list(range(12))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_no_candidates_gives_no_picks(strategy: str) -> None:
    assert _pick(np.empty((0, 16), np.float32), strategy, n_samples=5) == []


@pytest.mark.parametrize("strategy", ["kcenter", "random"])
def test_a_single_candidate_is_picked(strategy: str) -> None:
    assert _pick(_random(1), strategy, n_samples=5) == [0]


def test_typical_coverage_of_a_single_candidate_picks_it() -> None:
    assert _pick(_random(1), "typical_coverage", n_samples=5) == [0]


def test_select_step_writes_the_explanation_and_reads_custom_metadata_beside_the_input(
    tmp_path,
) -> None:  # type: ignore[no-untyped-def]
    import json

    import pandas as pd

    from tasks.config import Selection
    from tasks.formats import npy_bytes, to_parquet_bytes
    from tasks.select import select_samples
    from tasks.shards import CheckedShard, EmbeddedShard

    out, source = tmp_path / "out", tmp_path / "in"
    (out / "s").mkdir(parents=True)
    names = [f"p/{i:02d}.jpg" for i in range(40)]
    rows = pd.DataFrame(
        {
            "filename": names,
            "video": [None] * 40,
            "frame_index": [None] * 40,
            "pts": [None] * 40,
            "seconds": [None] * 40,
            "brightness": np.linspace(0, 1, 40),
        }
    )
    (out / "s/meta.parquet").write_bytes(to_parquet_bytes(rows))
    centres = _unit(np.eye(16)[:4])
    (out / "s/emb.npy").write_bytes(npy_bytes(_clusters(centres, per=10, sigma=0.01)))
    for i, name in enumerate(names):  # custom metadata beside the input
        target = source / ".curate/metadata" / f"{name}.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps({"metadata": {"camera": {"id": i % 2}}}))
    checked = CheckedShard(0, "s/meta.parquet", "s/c.json", (), True, 40, 0, 0, 0.0)
    embedded = EmbeddedShard(0, "s/emb.npy", 40, 0, 0.0)
    selection = Selection(
        strategies=[
            {"input": {"type": "EMBEDDINGS"}, "strategy": {"type": "DIVERSITY"}},
            {
                "input": {"type": "METADATA", "key": "camera.id"},
                "strategy": {"type": "THRESHOLD", "threshold": 1, "operation": "BIGGER_EQUAL"},
            },
            {"input": {"type": "METADATA", "key": "brightness"}, "strategy": {"type": "WEIGHTS"}},
        ]
    )
    key = select_samples.fn(
        [checked],
        [embedded],
        None,
        str(out),
        selection,
        StoppingCondition(n_samples=4),
        0,
        "cpu",
        input_url=str(source),
    )
    picked = json.loads((out / key).read_text())
    assert len(picked["selected"]) == 4
    assert all(names.index(n) % 2 == 1 for n in picked["selected"])  # camera 1 only
    table = pd.read_parquet(out / picked["explanation"])
    chosen = table[table["status"] == "selected"].sort_values("pick_order")
    assert list(chosen["filename"]) == picked["selected"]
    assert (table["status"] == "threshold").sum() == 20
    assert "2:weights:brightness" in table.columns


def test_gpu_pass_in_torch_gives_the_picks_of_the_cpu_pass() -> None:
    """The torch plain pass (used on a GPU), run here on the CPU device."""
    from tasks import kcenter
    from tasks.select import torch_greedy

    centres = _random(12, seed=4)
    x = _clusters(centres, per=30, sigma=0.05)
    weights = np.random.default_rng(0).random(len(x)).astype(np.float32) + 0.5
    for options in ({}, {"weights": weights}, {"prior": x[:3].copy(), "min_distance": 0.05}):
        on_torch = torch_greedy(CPU)(x, 40, **options)
        on_cpu = kcenter.greedy(x, 40, **options)
        assert on_torch.picks == on_cpu.picks
        assert on_torch.stopped == on_cpu.stopped
        assert np.allclose(on_torch.distances, on_cpu.distances, atol=1e-5)
