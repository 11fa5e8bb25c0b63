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
import pandas as pd
import torch

from tasks.caching import cached_step
from tasks.config import StoppingCondition
from tasks.device import pick_device
from tasks.formats import npy_bytes, read_npy, read_parquet_bytes
from tasks.keys import artifact_key, step_key
from tasks.shards import CheckedShard, EmbeddedShard
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
    """Everything selection may pick from, in shard order, with where each frame is from
    (`rows`: filename, video, frame_index, pts, seconds; video is null for images)."""

    names: list[str]
    embeddings: np.ndarray
    rows: pd.DataFrame


FRAME_COLUMNS = ["filename", "video", "frame_index", "pts", "seconds"]


def load_candidates(
    storage: Storage,
    checked: list[CheckedShard],
    embedded: list[EmbeddedShard],
    excluded: set[str],
) -> Candidates:
    frames = []
    blocks = []
    for check, embed in zip(checked, embedded, strict=True):
        metadata = read_parquet_bytes(storage.read(check.metadata))[FRAME_COLUMNS]
        vectors = read_npy(storage, embed.embeddings)
        keep = ~metadata["filename"].isin(excluded).to_numpy()
        frames.append(metadata[keep])
        blocks.append(vectors[keep])
    dim = blocks[0].shape[1] if blocks else 0
    matrix = np.concatenate(blocks) if blocks else np.empty((0, dim), np.float32)
    rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=FRAME_COLUMNS)
    return Candidates(rows["filename"].tolist(), matrix, rows)


def sequences(candidates: Candidates, length: int) -> list[list[int]]:
    """Candidate rows cut into runs of `length` consecutive sampled frames per video, in
    frame order; a video's last, shorter run is left out. Images are in none."""
    runs: list[list[int]] = []
    frames = candidates.rows.dropna(subset=["video"])
    for _, rows in frames.groupby("video", sort=False):
        order = rows.sort_values("frame_index").index.tolist()
        runs.extend(order[i : i + length] for i in range(0, len(order) - length + 1, length))
    return runs


def sequence_information(candidates: Candidates, run: list[int]) -> dict[str, object]:
    """One selected sequence as Lightly's `sequence_information.json` describes it."""
    rows = candidates.rows.loc[run]
    return {
        "video_name": rows["video"].iloc[0],
        "frame_names": rows["filename"].tolist(),
        "frame_indices": [int(i) for i in rows["frame_index"]],
        "frame_timestamps_pts": [None if pd.isna(p) else int(p) for p in rows["pts"]],
        "frame_timestamps_sec": [None if pd.isna(t) else float(t) for t in rows["seconds"]],
    }


def select_sequences(
    candidates: Candidates,
    length: int,
    strategy: str,
    stopping: StoppingCondition,
    seed: int,
    device: torch.device,
    prior: np.ndarray | None = None,
) -> tuple[list[int], list[dict[str, object]]]:
    """Select whole sequences by their mean frame embedding; (candidate indices of their
    frames, sequences)."""
    runs = sequences(candidates, length)
    if not runs:
        return [], []
    means = np.stack([candidates.embeddings[run].mean(axis=0) for run in runs])
    means /= np.linalg.norm(means, axis=1, keepdims=True).clip(min=1e-12)
    picks = select(means, strategy, stopping, seed, device, prior)
    frames = [i for pick in picks for i in runs[pick]]
    return frames, [sequence_information(candidates, runs[pick]) for pick in picks]


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
    sequence_length: int | None = None,
    prior_key: str | None = None,
) -> str:
    """Pick samples among the embedded, non-duplicate ones (or, with `sequence_length`,
    sequences of video frames); returns the key of a JSON object: `selected`, names in
    pick order, `embeddings`, the key of their vectors (.npy, same order, for the
    datapool), and `sequences`, what each picked sequence holds. `prior_key` (.npy) holds
    the embeddings selected by earlier runs: new picks keep their distance from them."""
    key = step_key("select", dict(locals()))
    output = open_storage(output_url)
    duplicates = json.loads(output.read(duplicates_key)) if duplicates_key else {}
    candidates = load_candidates(output, checked, embedded, set(duplicates))
    on = pick_device(device)
    prior = read_npy(output, prior_key) if prior_key else None
    runs: list[dict[str, object]] = []
    if sequence_length:
        picks, runs = select_sequences(
            candidates, sequence_length, strategy, stopping, seed, on, prior
        )
    else:
        picks = select(candidates.embeddings, strategy, stopping, seed, on, prior)
    vectors_key = artifact_key("select", key, ".npy")
    output.write(vectors_key, npy_bytes(candidates.embeddings[picks]))
    picked = {
        "selected": [candidates.names[i] for i in picks],
        "embeddings": vectors_key,
        "sequences": runs,
    }
    result_key = artifact_key("select", key, ".json")
    output.write(result_key, json.dumps(picked).encode())
    return result_key
