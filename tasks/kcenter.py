"""Exact greedy farthest-point (k-center) selection on millions of embeddings.

The greedy pass picks, again and again, the candidate whose score is highest: its
cosine distance to the nearest already-selected sample (the datapool's selection
included) times a fixed per-sample weight, times a per-class factor that BALANCE updates
after each pick. The plain pass recomputes all N distances per pick; `greedy` gives
exactly its picks for far less work:

- Between L2-normalised vectors cosine distance is half the squared Euclidean distance,
  so the triangle inequality applies. Every candidate p remembers its nearest selected
  sample c_p (its Voronoi cell) and its distance to it. A new pick q can bring p closer
  only if |q - c_p| < 2 |p - c_p|: one distance per selected sample, gathered per row,
  says which rows to recompute (bounds rounded outward by more than float32 rounding).
- On data with clusters most rows are skipped after the first picks; when the bound
  admits most rows (uniform data in high dimension, or the first picks), one full pass on
  two threads replaces it, and the bound is tested again only after a few passes: never
  slower than the plain pass.

Arithmetic and ties: a distance is `max(0, 1 - x . q)` in float32. BLAS's matrix-vector
product rounds a row bitwise the same in any single-threaded call whose start and length
are multiples of 4 rows (not so at a thread split or a ragged tail: checked by hand with
OpenBLAS), so every call here is 4-aligned and single-threaded under threadpoolctl.
The score is `distance * weight` in float32, times the class factor in float64 (so that
the factor can never turn two different scores into a tie). Among equal scores the lowest
index wins. `plain_greedy` is the plain pass on that arithmetic: the reference the tests
compare with; the bench also checks the picks against a bare numpy loop.

Nothing here builds an N x N matrix: the input is read in blocks (a memory-mapped `.npy`
works) and copied once into one float32 array; the rest is O(N) per pick at worst.
On a GPU, `tasks.select` runs the plain pass in torch instead (a full pass per pick is
cheap there).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from threadpoolctl import threadpool_limits

__all__ = [
    "Balance",
    "Greedy",
    "GreedyFn",
    "greedy",
    "knn_typicality",
    "plain_greedy",
    "prior_distances",
]

START_DISTANCE = 2.0  # no sample selected yet: the largest cosine distance
BLOCK_ROWS = 16384  # rows per block when reading the input or computing distances
PRIOR_BLOCK = 2048  # prior rows per block: BLOCK_ROWS x PRIOR_BLOCK floats, 128 MB
_ALIGN = 4  # BLAS row grouping: blocks starting and ending on it round identically
_FLOOR = 1e-6  # BALANCE factor of a class at or above its target share


@dataclass(frozen=True)
class Balance:
    """BALANCE: each candidate's class (`groups`, 0..G-1) and each class's target share.

    After t picks, n_g of them in class g, class g's factor is
    `max(target_g * (t + 1) - n_g, 1e-6) ** strength`: a class at or above its target
    waits until the others catch up, so no class runs more than one pick ahead."""

    groups: np.ndarray
    target: np.ndarray
    strength: float = 1.0

    def factors(self, counts: np.ndarray, picked: int) -> np.ndarray:
        deficit = np.maximum(self.target * (picked + 1) - counts, _FLOOR)
        return np.power(deficit, self.strength)


@dataclass
class Greedy:
    """Picks in order, with what each pick was chosen by, and why the pass stopped."""

    picks: list[int] = field(default_factory=list)
    distances: list[float] = field(default_factory=list)  # to the nearest selected
    scores: list[float] = field(default_factory=list)  # distance x weight x class factor
    factors: list[float] = field(default_factory=list)  # the class factor (1 if none)
    stopped: str = "budget"  # budget | min_distance | exhausted
    # Per candidate: final distance to the selected set and, when asked for, the nearest
    # selected sample (pick order t >= 0, or -1 - j for prior row j; a pick: itself).
    distance: np.ndarray | None = None
    nearest: np.ndarray | None = None


GreedyFn = Callable[
    ..., Greedy
]  # greedy's signature: (x, k, weights, min_distance, prior, balance, track)


def _unit_check(x: np.ndarray) -> None:
    if x.ndim != 2:
        raise ValueError(f"embeddings must be 2-D, got shape {x.shape}")


def _distances_into(block: np.ndarray, q: np.ndarray, out: np.ndarray) -> np.ndarray:
    np.matmul(block, q, out=out)
    np.subtract(1.0, out, out=out)
    np.maximum(out, 0.0, out=out)
    return out


def prior_distances(
    x: np.ndarray, prior: np.ndarray | None, track: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """Each row's cosine distance to its nearest `prior` row (START_DISTANCE without a
    prior), and with `track`, which prior row that is (-1 - j), in blocks."""
    n = len(x)
    distance = np.full(n, START_DISTANCE, np.float32)
    nearest = np.full(n, np.iinfo(np.int32).min, np.int32) if track else None
    if prior is None or not len(prior):
        return distance, nearest
    p = np.ascontiguousarray(prior, dtype=np.float32)
    for start in range(0, n, BLOCK_ROWS):
        block = np.asarray(x[start : start + BLOCK_ROWS], dtype=np.float32)
        for pstart in range(0, len(p), PRIOR_BLOCK):
            d = 1.0 - block @ p[pstart : pstart + PRIOR_BLOCK].T
            np.maximum(d, 0.0, out=d)
            arg = d.argmin(axis=1)
            best = d[np.arange(len(d)), arg]
            mine = distance[start : start + len(block)]
            closer = best < mine
            mine[closer] = best[closer]
            if nearest is not None:
                nearest[start : start + len(block)][closer] = -1 - (pstart + arg[closer])
    return distance, nearest


def _padded(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def plain_greedy(
    x: np.ndarray,
    k: int,
    weights: np.ndarray | None = None,
    min_distance: float | None = None,
    prior: np.ndarray | None = None,
    balance: Balance | None = None,
    track: bool = False,
) -> Greedy:
    """The plain greedy pass (all N distances per pick) on this module's arithmetic."""
    _unit_check(x)
    n = len(x)
    result = Greedy()
    distance, nearest = prior_distances(x, prior, track)
    if n == 0 or k <= 0:
        result.distance, result.nearest = distance, nearest
        return result
    rows = np.zeros((_padded(n), x.shape[1]), np.float32)
    rows[:n] = x
    taken = np.zeros(n, bool)
    d = np.empty(len(rows), np.float32)
    counts = None if balance is None else np.zeros(len(balance.target))
    has_prior = prior is not None and len(prior) > 0
    with threadpool_limits(1):
        while len(result.picks) < k:
            score = distance * weights if weights is not None else distance.copy()
            score[taken] = -1
            factors = (
                None
                if counts is None or balance is None
                else balance.factors(counts, len(result.picks))
            )
            if balance is not None and factors is not None:
                full = score.astype(np.float64) * factors[balance.groups]
                full[taken] = -1
                best = int(np.argmax(full))
                top, factor = float(full[best]), float(factors[balance.groups[best]])
            else:
                best = int(np.argmax(score))
                top, factor = float(score[best]), 1.0
            if top < 0:
                result.stopped = "exhausted"
                break
            close = min_distance is not None and distance[best] < min_distance
            if close and (result.picks or has_prior):
                result.stopped = "min_distance"
                break
            result.picks.append(best)
            result.distances.append(float(distance[best]))
            result.scores.append(top)
            result.factors.append(factor)
            taken[best] = True
            if counts is not None and balance is not None:
                counts[balance.groups[best]] += 1
            _distances_into(rows, rows[best], d)
            if nearest is not None:
                nearest[d[:n] < distance] = len(result.picks) - 1
            np.minimum(distance, d[:n], out=distance)
    if nearest is not None:
        nearest[result.picks] = np.arange(len(result.picks))  # a selected sample: itself
    result.distance, result.nearest = distance, nearest
    return result


def greedy(
    x: np.ndarray,
    k: int,
    weights: np.ndarray | None = None,
    min_distance: float | None = None,
    prior: np.ndarray | None = None,
    balance: Balance | None = None,
    track: bool = False,
) -> Greedy:
    """The picks of `plain_greedy` on the same input, by the pruned pass.

    Every candidate p keeps its nearest selected sample c_p (a prior row or a pick) and
    its distance to it. A new pick q can only bring p closer when |q - c_p| < 2 |p - c_p|,
    so one distance per selected sample, gathered per row, says which rows to recompute.
    While that bound admits most rows (the first picks; uniform data in high dimension),
    a full pass on two threads is cheaper, and the bound is tested again after 1, 2, 4,
    ... up to 16 such passes.

    Args:
        x: L2-normalised float32 rows (a memory-mapped `.npy` is read in blocks).
        k: at most this many picks.
        weights: per-row multiplicative weight (>= 0), or None.
        min_distance: stop when the best pick's distance is below it (after a first pick
            or a prior selection).
        prior: rows selected before (the datapool's); distances start from them.
        balance: classes and target shares (BALANCE).
        track: also return each row's nearest selected sample.
    """
    _unit_check(x)
    n = len(x)
    has_prior = prior is not None and len(prior) > 0
    start_distance, start_nearest = prior_distances(x, prior, track or has_prior)
    if n == 0 or k <= 0:
        return Greedy(distance=start_distance, nearest=start_nearest if track else None)
    state = _Pass(x, k, weights, prior, balance, start_distance, start_nearest, track)
    return state.run(k, min_distance)


_FULL_SHARE = 0.5  # a pick that may move more of the candidates than this: a full pass
_MAX_SKIP = 16  # full passes in a row before the bound is tested again, at most


class _Pass:
    """One pruned greedy pass, rows in input order.

    Each row keeps its nearest centre c_p (a prior row or a pick) and its distance to
    it. After pick q, a row can come closer only if |q - c_p| < 2 |p - c_p| (triangle
    inequality: |q - c_p| <= |q - p| + |p - c_p|), so one distance per centre, gathered
    per row, decides which rows to recompute."""

    def __init__(
        self,
        x: np.ndarray,
        k: int,
        weights: np.ndarray | None,
        prior: np.ndarray | None,
        balance: Balance | None,
        start_distance: np.ndarray,
        start_nearest: np.ndarray | None,
        track: bool,
    ) -> None:
        n, dim = x.shape
        self.n = n
        self.rows = np.zeros((_padded(n), dim), np.float32)
        worst = 0.0
        for start in range(0, n, BLOCK_ROWS):
            block = self.rows[start : min(n, start + BLOCK_ROWS)]
            block[:] = x[start : start + BLOCK_ROWS]
            norms = np.einsum("ij,ij->i", block, block, dtype=np.float64)
            worst = max(worst, float(np.abs(norms - 1).max()))
        n_prior = 0 if prior is None else len(prior)
        self.n_prior = n_prior
        # Slot 0 stands for "no centre yet"; then prior rows, then picks.
        self.centres = np.zeros((1 + n_prior + k, dim), np.float32)
        self.centre_norms = np.zeros(1 + n_prior + k)
        if n_prior and prior is not None:
            self.centres[1 : 1 + n_prior] = prior
            p64 = self.centres[1 : 1 + n_prior].astype(np.float64)
            self.centre_norms[1 : 1 + n_prior] = (p64**2).sum(axis=1)
        self.n_centres = 1 + n_prior
        self.distance = start_distance.copy()
        self.centre_of = np.zeros(n, np.int32)
        if n_prior and start_nearest is not None:
            found = start_nearest != np.iinfo(np.int32).min
            self.centre_of[found] = -start_nearest[found]  # prior row j: -1 - j -> 1 + j
        self.near = start_nearest.copy() if track and start_nearest is not None else None
        if track and self.near is None:
            self.near = np.full(n, np.iinfo(np.int32).min, np.int32)
        self.weight = weights.astype(np.float32) if weights is not None else None
        self.score = self.distance * self.weight if self.weight is not None else self.distance
        self.taken = np.zeros(n, bool)
        self.balance = balance
        self.group = np.zeros(n, np.int64) if balance is None else balance.groups.astype(np.int64)
        self.counts = np.zeros(1 if balance is None else len(balance.target))
        self.buffer = np.empty(len(self.rows), np.float32)
        self.gathered = np.empty((0, dim), np.float32)
        # float32 rounding of one distance is ~1e-5 at d=512; rows' norms off 1 move
        # 1 - x.q away from |x - q|^2 / 2 by as much again.
        self.margin = 1e-4 + 2 * worst
        self.dot_error = 2.5e-7 * dim + 2 * worst + 1e-6
        self.reach = np.empty(n, np.float32)  # 2 |p - c_p|, an upper bound
        self.set_reach(np.arange(n))
        self.skip_bound = 0
        self.full_streak = 0
        self.pool = ThreadPoolExecutor(2)

    def set_reach(self, rows: np.ndarray) -> None:
        d = np.maximum(self.distance[rows].astype(np.float64), 0.0)
        reach = 2 * np.sqrt(2 * (d + self.margin)) * (1 + 1e-6)
        reach[self.taken[rows]] = -1.0  # never recomputed again
        self.reach[rows] = reach

    def lower_bounds(self, q: np.ndarray) -> np.ndarray:
        """|q - c| from below for every centre (float32 products less their worst
        rounding, then rounded down to float32); "no centre" gets 0."""
        count = self.n_centres
        dots = (self.centres[:count] @ q).astype(np.float64)
        square = self.centre_norms[:count] - 2 * dots + float(q.astype(np.float64) @ q)
        lower = np.sqrt(np.maximum(square - self.dot_error, 0.0)) * (1 - 1e-6)
        lower[0] = 0.0
        return lower.astype(np.float32)

    def full_pass(self, q: np.ndarray) -> np.ndarray:
        """All distances to q, the two halves (4-aligned) on two threads."""
        half = _padded(len(self.rows) // 2)
        parts = [(0, half), (half, len(self.rows))]
        list(
            self.pool.map(
                lambda p: _distances_into(self.rows[p[0] : p[1]], q, self.buffer[p[0] : p[1]]),
                parts,
            )
        )
        return self.buffer[: self.n]

    def update(self, q: np.ndarray, t: int) -> None:
        # While the bound admits most rows, test it only every few picks.
        self.skip_bound = max(self.skip_bound - 1, 0)
        candidates = np.empty(0, np.int64)
        if not self.skip_bound:
            candidates = np.flatnonzero(self.lower_bounds(q)[self.centre_of] < self.reach)
        if self.skip_bound or len(candidates) > _FULL_SHARE * self.n:
            if not self.skip_bound:
                self.full_streak += 1
                self.skip_bound = min(2**self.full_streak, _MAX_SKIP)
            d = self.full_pass(q)
            closer = d < self.distance
            if self.weight is not None:  # unweighted, a taken row's -1 is never above d
                closer &= ~self.taken
            moved = np.flatnonzero(closer)
            self.moved(moved, d[moved], t)
            return
        self.full_streak = 0
        size = len(candidates)
        if not size:
            return
        if len(self.gathered) < size + _ALIGN:
            capacity = max(size + _ALIGN, 2 * len(self.gathered))
            self.gathered = np.empty((capacity, q.shape[0]), np.float32)
        np.take(self.rows, candidates, axis=0, out=self.gathered[:size])
        rounded = -(-size // _ALIGN) * _ALIGN
        self.gathered[size:rounded] = 0  # padding rows: no stale values (NaN warnings)
        d = _distances_into(self.gathered[:rounded], q, self.buffer[:rounded])[:size]
        closer = d < self.distance[candidates]
        self.moved(candidates[closer], d[closer], t)

    def moved(self, rows: np.ndarray, d: np.ndarray, t: int) -> None:
        self.distance[rows] = d
        self.centre_of[rows] = self.n_centres - 1
        if self.near is not None:
            self.near[rows] = t
        if self.weight is not None:
            self.score[rows] = d * self.weight[rows]
        self.set_reach(rows)

    def best(self, factors: np.ndarray | None) -> tuple[int, float]:
        """The row to pick next and its score; lowest row index among ties."""
        if factors is not None:
            full = self.score.astype(np.float64) * factors[self.group]
            full[self.taken] = -1
            row = int(np.argmax(full))
            return row, float(full[row])
        row = int(np.argmax(self.score))
        return row, float(self.score[row])

    def run(self, k: int, min_distance: float | None) -> Greedy:
        result = Greedy()
        balance = self.balance
        has_prior = self.n_prior > 0
        with threadpool_limits(1), self.pool:
            while len(result.picks) < k:
                t = len(result.picks)
                factors = None if balance is None else balance.factors(self.counts, t)
                row, top = self.best(factors)
                if top < 0:
                    result.stopped = "exhausted"
                    break
                at = float(self.distance[row])
                if min_distance is not None and at < min_distance and (result.picks or has_prior):
                    result.stopped = "min_distance"
                    break
                group = int(self.group[row])
                result.picks.append(row)
                result.distances.append(at)
                result.scores.append(top)
                result.factors.append(1.0 if factors is None else float(factors[group]))
                self.counts[group] += 1
                self.taken[row] = True
                self.reach[row] = -1.0
                if self.weight is not None:
                    self.score[row] = -1.0
                else:
                    self.distance[row] = -1.0  # min() keeps it there: never picked again
                q = self.rows[row].copy()
                self.centres[self.n_centres] = q
                self.centre_norms[self.n_centres] = float(q.astype(np.float64) @ q)
                self.n_centres += 1
                self.update(q, t)
        return self.finish(result)

    def finish(self, result: Greedy) -> Greedy:
        final = self.distance.copy()
        final[result.picks] = np.maximum(final[result.picks], 0.0)  # taken rows hold -1
        result.distance = final
        if self.near is not None:
            self.near[result.picks] = np.arange(len(result.picks))
            result.nearest = self.near
        return result


def knn_typicality(x: np.ndarray, seed: int, k: int = 20, references: int = 5000) -> np.ndarray:
    """TypiClust's typicality: 1 / mean cosine distance to the k nearest of a seeded
    sample of `references` rows (all rows when fewer), scaled to max 1. Exact k-nearest
    search against the references in row blocks: O(N x references), no N x N matrix."""
    n = len(x)
    if n < 2:
        return np.ones(n, np.float32)
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(n, references, replace=False)) if n > references else None
    refs = np.asarray(x if chosen is None else x[chosen], np.float32)
    k = max(1, min(k, len(refs) - 1))
    scores = np.empty(n, np.float32)
    for start in range(0, n, 1024):
        block = np.asarray(x[start : start + 1024], np.float32)
        d = np.maximum(1.0 - block @ refs.T, 0.0)
        # k+1 smallest: a point's distance to itself (0) is among them when it is a ref
        nearest = np.sort(np.partition(d, k, axis=1)[:, : k + 1], axis=1)[:, 1:]
        scores[start : start + len(block)] = 1 / (nearest.mean(axis=1) + 1e-6)
    return scores / scores.max()
