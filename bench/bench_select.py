"""Greedy selection at scale: the pruned pass (tasks/kcenter.py) vs a bare numpy k-center
loop, same data, same run of this script, same picks checked.

- 200,000 x 128, k=1,000: tight clusters (like embeddings of real photos: classes and
  near-duplicates), broad clusters, and uniform on the sphere. Targets: >= 5x faster than
  numpy on clustered data, never slower on uniform data.
- 1,000,000 x 128, k=10,000, tight clusters: time and peak memory (targets: under two
  minutes and 8 GB). The numpy loop is timed on its first picks and extrapolated (it
  costs the same per pick throughout); the picks are checked over those picks.
- 1,000,000 x 512, k=10,000: the same.

Each case runs in a child process on a memory-mapped `.npy` (as `curate select` reads
it), so its peak resident memory (`ru_maxrss`) is the selection's own: the mapped file's
pages, our float32 copy, and the per-row state.

    python -m bench.bench_select [--quick] [--no-big] [--only-big]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
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


def case(path: str, name: str, k: int, baseline_picks: int) -> None:
    """One comparison, in this (child) process."""
    x = np.load(path, mmap_mode="r")
    started = time.perf_counter()
    ours = greedy(x, k)
    ours_s = time.perf_counter() - started
    rss = _maxrss_mb()
    counted = min(baseline_picks, k)
    started = time.perf_counter()
    reference = numpy_kcenter(np.asarray(x), counted)
    numpy_s = (time.perf_counter() - started) * k / counted
    assert ours.picks[:counted] == reference, f"{name}: picks differ from numpy's"
    estimated = "" if counted == k else f" (extrapolated from {counted} picks)"
    print(
        f"{name}: numpy {numpy_s:7.2f} s{estimated}, ours {ours_s:7.2f} s, "
        f"speed-up {numpy_s / ours_s:5.1f}x; same picks over {counted}; "
        f"peak memory {rss / 1024:.2f} GB (data {x.nbytes / 2**30:.2f} GB)",
        flush=True,
    )


def compare(
    folder: Path, name: str, x: np.ndarray, k: int, baseline_picks: int | None = None
) -> None:
    path = folder / "x.npy"
    np.save(path, x)
    del x
    command = [sys.executable, "-m", "bench.bench_select", "--case", str(path), name, str(k)]
    command.append(str(baseline_picks or k))
    subprocess.run(command, check=True)
    path.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20,000 rows, k=500 only")
    parser.add_argument("--no-big", action="store_true", help="skip the 1,000,000-row runs")
    parser.add_argument("--only-big", action="store_true", help="only the 1,000,000-row runs")
    parser.add_argument("--case", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        path, name, k, baseline = args.case
        case(path, name, int(k), int(baseline))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if args.quick:
            compare(folder, "20,000 x 128 tight clusters, k=500", clustered(20000, 128), 500)
            compare(folder, "20,000 x 128 uniform,        k=500", uniform(20000, 128), 500)
            return
        if not args.only_big:
            n = 200_000
            compare(folder, "200,000 x 128 tight clusters, k=1,000", clustered(n, 128), 1000)
            compare(
                folder, "200,000 x 128 broad clusters, k=1,000", clustered(n, 128, spread=4), 1000
            )
            compare(folder, "200,000 x 128 uniform,        k=1,000", uniform(n, 128), 1000)
        if not args.no_big:
            x = clustered(1_000_000, 128)
            compare(folder, "1,000,000 x 128 tight clusters, k=10,000", x, 10_000, 300)
            del x
            x = clustered(1_000_000, 512)
            compare(folder, "1,000,000 x 512 tight clusters, k=10,000", x, 10_000, 100)


if __name__ == "__main__":
    main()
