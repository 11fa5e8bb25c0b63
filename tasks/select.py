"""Select: the most valuable subset of the embeddings under a budget.

Pure k-center (coreset) covers the embedding space but picks outliers first, which can
be worse than random for training at small budgets. The default, `typical_coverage`,
picks greedily by (distance to the selected set) x (typicality), where typicality is
the inverse mean distance to a point's nearest neighbours (as in TypiClust): each pick
opens a new region of the space, but through its most representative member.
Everything is vectorised in torch (GPU when present) and deterministic for a seed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import torch

from tasks.caching import artifact_key, cached_step, step_key
from tasks.check import CheckedShard, read_npy
from tasks.config import StoppingCondition
from tasks.describe import read_parquet_bytes
from tasks.device import pick_device
from tasks.embed import EmbeddedShard
from tasks.storage import Storage, open_storage

# Typicality is measured against a seeded sample of this many reference points, which
# keeps it O(n) in the dataset size.
TYPICALITY_REFERENCES = 5000
TYPICALITY_NEIGHBOURS = 20
_CHUNK = 1024  # rows per distance block: 1024 x 5000 floats, 20 MB


def budget(stopping: StoppingCondition, n_candidates: int) -> int:
    """How many samples to pick at most."""
    if stopping.n_samples is not None:
        return min(stopping.n_samples, n_candidates)
    if stopping.proportion_samples is not None:
        # round away float noise first: 0.07 * 100 is 7.000000000000001, not 8 samples
        wanted = math.ceil(round(stopping.proportion_samples * n_candidates, 6))
        return min(wanted, n_candidates)
    return n_candidates  # min_distance alone decides


def typicality(x: torch.Tensor, seed: int, k: int = TYPICALITY_NEIGHBOURS) -> torch.Tensor:
    """1 / mean cosine distance to the k nearest reference points, scaled to max 1."""
    n = len(x)
    if n < 2:
        return torch.ones(n, device=x.device)
    generator = torch.Generator().manual_seed(seed)
    if n > TYPICALITY_REFERENCES:
        refs = x[torch.randperm(n, generator=generator)[:TYPICALITY_REFERENCES].to(x.device)]
    else:
        refs = x
    k = max(1, min(k, len(refs) - 1))
    scores = torch.empty(n, device=x.device)
    for start in range(0, n, _CHUNK):
        distances = (1 - x[start : start + _CHUNK] @ refs.T).clamp_(min=0)
        # k+1 smallest: a point's distance to itself (0) is among them when it is a ref
        nearest = distances.topk(k + 1, dim=1, largest=False).values[:, 1:]
        scores[start : start + _CHUNK] = 1 / (nearest.mean(dim=1) + 1e-6)
    return scores / scores.max()


def greedy_cover(
    x: torch.Tensor,
    k: int,
    weights: torch.Tensor | None,
    min_distance: float | None,
    selected: torch.Tensor | None = None,
) -> list[int]:
    """Farthest-point selection; with `weights`, a pick maximises distance x weight.

    `selected` holds embeddings chosen before (e.g. the datapool's): distances start
    from them so new picks fill gaps. Stops after k picks, or when the best pick is
    closer than `min_distance` to the selected set.
    """
    n = len(x)
    distance = torch.full((n,), 2.0, device=x.device)  # cosine distance is at most 2
    if selected is not None and len(selected):
        for start in range(0, len(selected), _CHUNK):
            nearest = (1 - x @ selected[start : start + _CHUNK].T).min(dim=1).values
            distance = torch.minimum(distance, nearest)
    picks: list[int] = []
    taken = torch.zeros(n, dtype=torch.bool, device=x.device)
    while len(picks) < k:
        score = distance.clone() if weights is None else distance * weights
        score[taken] = -1
        best = int(torch.argmax(score))
        if score[best] < 0:
            break
        if (
            min_distance is not None
            and float(distance[best]) < min_distance
            and (picks or (selected is not None and len(selected)))
        ):
            break
        picks.append(best)
        taken[best] = True
        distance = torch.minimum(distance, (1 - x @ x[best]).clamp_(min=0))
    return picks


def select(
    embeddings: np.ndarray,
    strategy: str,
    stopping: StoppingCondition,
    seed: int,
    device: torch.device,
    selected: np.ndarray | None = None,
) -> list[int]:
    """Indices into `embeddings` (L2-normalised rows), in pick order."""
    n = len(embeddings)
    k = budget(stopping, n)
    if n == 0 or k == 0:
        return []
    if strategy == "random":
        order = np.random.default_rng(seed).permutation(n)
        return [int(i) for i in order[:k]]
    x = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32)).to(device)
    prior = None if selected is None else torch.from_numpy(selected).float().to(device)
    weights = typicality(x, seed) if strategy == "typical_coverage" else None
    return greedy_cover(x, k, weights, stopping.min_distance, prior)


@dataclass(frozen=True)
class Candidates:
    """Everything selection may pick from, in shard order."""

    names: list[str]
    embeddings: np.ndarray


def load_candidates(
    storage: Storage,
    checked: list[CheckedShard],
    embedded: list[EmbeddedShard],
    excluded: set[str],
) -> Candidates:
    names: list[str] = []
    blocks = []
    for check, embed in zip(checked, embedded, strict=True):
        shard_names = read_parquet_bytes(storage.read(check.metadata))["filename"].tolist()
        vectors = read_npy(storage, embed.embeddings)
        keep = [i for i, name in enumerate(shard_names) if name not in excluded]
        names.extend(shard_names[i] for i in keep)
        blocks.append(vectors[keep])
    dim = blocks[0].shape[1] if blocks else 0
    matrix = np.concatenate(blocks) if blocks else np.empty((0, dim), np.float32)
    return Candidates(names, matrix)


@cached_step("select")
def select_samples(
    checked: list[CheckedShard],
    embedded: list[EmbeddedShard],
    duplicates_key: str | None,
    output_url: str,
    strategy: str,
    stopping: StoppingCondition,
    seed: int,
    device: str,
) -> str:
    """Pick samples among the embedded, non-duplicate ones; returns the key of a JSON
    list of names in pick order."""
    key = step_key("select", dict(locals()))
    output = open_storage(output_url)
    duplicates = json.loads(output.read(duplicates_key)) if duplicates_key else {}
    candidates = load_candidates(output, checked, embedded, set(duplicates))
    picks = select(candidates.embeddings, strategy, stopping, seed, pick_device(device))
    result_key = artifact_key("select", key, ".json")
    output.write(result_key, json.dumps([candidates.names[i] for i in picks]).encode())
    return result_key
