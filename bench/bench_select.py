"""Greedy selection at scale: the pruned pass (tasks/kcenter.py) vs a bare numpy k-center
loop, same data, same run of this script, same picks checked.

- 200,000 x 128, k=1,000, clustered (like real embeddings) and uniform on the sphere:
  targets >= 5x faster than numpy on clustered data, never slower on uniform data.
- 1,000,000 x 128, k=10,000, clustered: time and peak memory (targets: under two minutes
  and 8 GB). The numpy loop is timed on its first picks and extrapolated (it costs the
  same per pick throughout); its picks are checked against ours over those picks.
- 1,000,000 x 512, k=10,000, clustered: the same.

The input is a memory-mapped `.npy` in a temporary folder, as `curate select` reads it.
Peak memory is the largest resident size of this process (`ru_maxrss`) during the pass
minus before it, and tracemalloc's peak of what numpy allocated.

    python -m bench.bench_select [--quick] [--big] [--only-big]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from tasks.kcenter import greedy


def clustered(n: int, dim: int, seed: int = 0, spread: float = 1.0) -> np.ndarray:
    """Clusters within clusters: 100 well-separated groups of 10 subgroups of uneven
    size (subgroup centres 0.3 x `spread` from their group's), each subgroup spread over
    8 local directions (0.05 x `spread` each), a little noise in every dimension;
    L2-normalised. spread=1: tight clusters (near-duplicates and classes, like
    embeddings of real photos); spread=4: broad ones."""
    rng = np.random.default_rng(seed)
    groups, subgroups, local = 100, 10, 8
    tops = rng.normal(size=(groups, dim))
    tops /= np.linalg.norm(tops, axis=1, keepdims=True)
    offsets = rng.normal(size=(groups, subgroups, dim)) * (0.3 * spread / np.sqrt(dim))
    centres = (tops[:, None, :] + offsets).reshape(-1, dim).astype(np.float32)
    directions = rng.normal(size=(len(centres), local, dim)) * (0.05 * spread / np.sqrt(dim))
    directions = directions.astype(np.float32)
    weights = rng.dirichlet(np.full(len(centres), 0.5))
    labels = rng.choice(len(centres), n, p=weights)
    x = np.empty((n, dim), np.float32)
    for start in range(0, n, 65536):
        part = labels[start : start + 65536]
        z = rng.normal(size=(len(part), 1, local)).astype(np.float32)
        block = centres[part] + (z @ directions[part])[:, 0, :]
        block += rng.normal(scale=0.01 / np.sqrt(dim), size=block.shape).astype(np.float32)
        x[start : start + len(part)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return x


def uniform(n: int, dim: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def numpy_kcenter(x: np.ndarray, k: int) -> list[int]:
    """The bare baseline: argmax, matrix-vector product, minimum."""
    distance = np.full(len(x), 2.0, np.float32)
    picks = []
    for _ in range(k):
        best = int(np.argmax(distance))
        picks.append(best)
        np.minimum(distance, 1 - x @ x[best], out=distance)
    return picks


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def on_disk(x: np.ndarray, folder: Path, name: str) -> np.ndarray:
    path = folder / f"{name}.npy"
    np.save(path, x)
    return np.load(path, mmap_mode="r")


def compare(name: str, x: np.ndarray, k: int, baseline_picks: int | None = None) -> None:
    """Time ours on all k picks and numpy on `baseline_picks` (default all k)."""
    counted = baseline_picks or k
    started = time.perf_counter()
    reference = numpy_kcenter(np.asarray(x), counted)
    numpy_s = time.perf_counter() - started
    numpy_full = numpy_s * k / counted

    rss_before = _maxrss_mb()
    tracemalloc.start()
    started = time.perf_counter()
    ours = greedy(x, k)
    ours_s = time.perf_counter() - started
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss_peak = _maxrss_mb() - rss_before
    assert ours.picks[:counted] == reference, f"{name}: picks differ from numpy's"
    estimated = "" if counted == k else f" (extrapolated from {counted} picks)"
    print(
        f"{name}: numpy {numpy_full:7.2f} s{estimated}, ours {ours_s:7.2f} s, "
        f"speed-up {numpy_full / ours_s:5.1f}x; same picks over {counted}; "
        f"peak memory +{rss_peak:.0f} MB RSS, {traced_peak / 2**20:.0f} MB allocated "
        f"(data {x.nbytes / 2**20:.0f} MB)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20,000 rows, k=500 only")
    parser.add_argument("--big", action="store_true", help="also the 1,000,000-row runs")
    parser.add_argument("--only-big", action="store_true", help="only the 1,000,000-row runs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if args.quick:
            compare("20,000 x 128 clustered, k=500", clustered(20000, 128), 500)
            compare("20,000 x 128 uniform, k=500", uniform(20000, 128), 500)
            return
        if not args.only_big:
            x = on_disk(clustered(200_000, 128), folder, "c200k")
            compare("200,000 x 128 clustered, k=1,000", x, 1000)
            x = on_disk(uniform(200_000, 128), folder, "u200k")
            compare("200,000 x 128 uniform,   k=1,000", x, 1000)
        if args.big or args.only_big:
            x = on_disk(clustered(1_000_000, 128), folder, "c1m128")
            compare("1,000,000 x 128 clustered, k=10,000", x, 10_000, baseline_picks=300)
            del x
            x = on_disk(clustered(1_000_000, 512), folder, "c1m512")
            compare("1,000,000 x 512 clustered, k=10,000", x, 10_000, baseline_picks=100)


if __name__ == "__main__":
    main()
