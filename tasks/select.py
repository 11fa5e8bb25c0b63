"""Select: the most valuable subset of the embeddings under a budget, with the reasons.

Pure k-center (coreset) covers the embedding space but picks outliers first, which can
be worse than random for training at small budgets. `typical_coverage` picks greedily by
(distance to the selected set) x (typicality), where typicality is the inverse mean
distance to a point's nearest neighbours (as in TypiClust): each pick opens a new region
of the space, but through its most representative member. The default, `auto`, uses it
at small budgets and plain coverage at large ones (see `tasks.strategies`). Any
Lightly-style list of strategies runs through `tasks.strategies.run_strategies`; the
greedy pass is `tasks.kcenter.greedy` on a CPU (exact, pruned) and the plain pass in
torch on a GPU. Deterministic for a seed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from tasks import kcenter
from tasks.caching import cached_step, current_step_key
from tasks.config import Selection, StoppingCondition
from tasks.device import pick_device
from tasks.errors import CurateError
from tasks.formats import npy_bytes, read_npy, read_parquet_bytes, to_parquet_bytes
from tasks.keys import artifact_key
from tasks.shards import CheckedShard, EmbeddedShard
from tasks.storage import Storage, open_storage
from tasks.strategies import Inputs, Selected, budget, read_custom_metadata, run_strategies

_CHUNK = 1024  # prior rows per distance block


def greedy_cover(
    x: torch.Tensor,
    k: int,
    weights: torch.Tensor | None,
    min_distance: float | None,
    selected: torch.Tensor | None = None,
    explain: bool = False,
) -> Any:
    """Farthest-point selection in torch; with `weights`, a pick maximises distance x
    weight. The plain pass (all distances per pick), for GPUs.

    `selected` holds embeddings chosen before (e.g. the datapool's): distances start
    from them so new picks fill gaps. Stops after k picks, or when the best pick is
    closer than `min_distance` to the selected set. With `explain`, returns (picks,
    distance of each when picked, its score); else the picks.
    """
    n = len(x)
    distance = torch.full((n,), 2.0, device=x.device)  # cosine distance is at most 2
    if selected is not None and len(selected):
        for start in range(0, len(selected), _CHUNK):
            nearest = (1 - x @ selected[start : start + _CHUNK].T).min(dim=1).values
            distance = torch.minimum(distance, nearest.clamp_(min=0))
    picks: list[int] = []
    distances: list[float] = []
    scores: list[float] = []
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
        distances.append(float(distance[best]))
        scores.append(float(score[best]))
        taken[best] = True
        distance = torch.minimum(distance, (1 - x @ x[best]).clamp_(min=0))
    return (picks, distances, scores) if explain else picks


def torch_greedy(device: torch.device) -> kcenter.GreedyFn:
    """The plain greedy pass in torch on `device` (a GPU: a full pass per pick is cheap
    there), with `kcenter.greedy`'s signature; BALANCE and tracking go to kcenter."""

    def run(
        x: np.ndarray,
        k: int,
        weights: np.ndarray | None = None,
        min_distance: float | None = None,
        prior: np.ndarray | None = None,
        balance: kcenter.Balance | None = None,
        track: bool = False,
    ) -> kcenter.Greedy:
        if balance is not None or track:
            return kcenter.greedy(x, k, weights, min_distance, prior, balance, track)
        rows = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)
        w = None if weights is None else torch.from_numpy(weights).to(device)
        before = None if prior is None else torch.from_numpy(prior).float().to(device)
        picks, distances, scores = greedy_cover(rows, k, w, min_distance, before, explain=True)
        stopped = "budget" if len(picks) == k else "exhausted"
        if len(picks) < k and min_distance is not None and len(picks) < len(x):
            stopped = "min_distance"
        factors = [1.0] * len(picks)
        return kcenter.Greedy(picks, distances, scores, factors, stopped)

    return run


def greedy_for(device: torch.device) -> kcenter.GreedyFn:
    return kcenter.greedy if device.type == "cpu" else torch_greedy(device)


def choose(
    inputs: Inputs,
    selection: Selection,
    stopping: StoppingCondition,
    seed: int,
    device: torch.device,
) -> Selected:
    """Picks among `inputs` (indices in pick order) and the explanation table."""
    n = len(inputs.names)
    k = budget(stopping, n)
    entries = selection.entries(k, n)
    return run_strategies(entries, inputs, k, stopping.min_distance, seed, greedy_for(device))


def select(
    embeddings: np.ndarray,
    strategy: str | Selection,
    stopping: StoppingCondition,
    seed: int,
    device: torch.device,
    selected: np.ndarray | None = None,
) -> list[int]:
    """Indices into `embeddings` (L2-normalised rows), in pick order."""
    selection = strategy if isinstance(strategy, Selection) else Selection(strategy=strategy)
    names = [str(i) for i in range(len(embeddings))]
    inputs = Inputs(names, np.asarray(embeddings, dtype=np.float32), prior=selected)
    return choose(inputs, selection, stopping, seed, device).picks


@dataclass(frozen=True)
class Candidates:
    """Everything selection may pick from, in shard order, with their metadata rows
    (`rows`: every metadata column, among them where each frame is from: filename,
    video, frame_index, pts, seconds; video is null for images)."""

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
        metadata = read_parquet_bytes(storage.read(check.metadata))
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
    selection: Selection,
    stopping: StoppingCondition,
    seed: int,
    device: torch.device,
    prior: np.ndarray | None = None,
) -> tuple[list[int], list[dict[str, object]], pd.DataFrame]:
    """Select whole sequences by their mean frame embedding; (candidate indices of their
    frames, sequences, the explanation with a sequence's first frame as its name)."""
    runs = sequences(candidates, length)
    if not runs:
        return [], [], pd.DataFrame()
    means = np.stack([candidates.embeddings[run].mean(axis=0) for run in runs])
    means /= np.linalg.norm(means, axis=1, keepdims=True).clip(min=1e-12)
    names = [candidates.names[run[0]] for run in runs]
    chosen = choose(Inputs(names, means, prior=prior), selection, stopping, seed, device)
    frames = [i for pick in chosen.picks for i in runs[pick]]
    information = [sequence_information(candidates, runs[pick]) for pick in chosen.picks]
    return frames, information, chosen.explanation


def _file_reader(url: str) -> tuple[Storage, str]:
    """The storage holding a file's folder, and the file's key in it."""
    folder, _, name = url.rstrip("/").rpartition("/")
    return open_storage(folder or "."), name


def read_file(url: str) -> bytes:
    storage, name = _file_reader(url)
    return storage.read(name)


def sample_table(
    candidates: Candidates,
    input_url: str | None,
    custom_metadata: str | None,
    predictions: str | None,
) -> pd.DataFrame:
    """What METADATA, SCORES and PREDICTIONS inputs read: the run's metadata columns,
    custom metadata (a Parquet file or a folder of `<name>.json`; by default
    `<input>/.curate/metadata/` when it holds any), and a predictions file."""
    table = candidates.rows
    extra = []
    if custom_metadata is not None:
        if custom_metadata.endswith(".parquet"):
            extra.append(read_custom_metadata(read_file, [custom_metadata], custom_metadata))
        else:
            folder = open_storage(custom_metadata)
            keys = [o.key for o in folder.list()]
            extra.append(read_custom_metadata(folder.read, keys, ""))
    elif input_url is not None:
        source = open_storage(input_url)
        try:
            keys = [o.key for o in source.list(CUSTOM_METADATA)]
        except CurateError:  # no such folder
            keys = []
        if keys:
            extra.append(read_custom_metadata(source.read, keys, CUSTOM_METADATA))
    if predictions is not None:
        extra.append(read_parquet_bytes(read_file(predictions)))
    for more in extra:
        new = [c for c in more.columns if c == "filename" or c not in table.columns]
        table = table.merge(more[new], on="filename", how="left")
    return table


CUSTOM_METADATA = ".curate/metadata/"  # beside the input: <name>.json per sample


@cached_step("select")
def select_samples(
    checked: list[CheckedShard],
    embedded: list[EmbeddedShard],
    duplicates_key: str | None,
    output_url: str,
    selection: Selection,
    stopping: StoppingCondition,
    seed: int,
    device: str,
    sequence_length: int | None = None,
    prior_key: str | None = None,
    input_url: str | None = None,
) -> str:
    """Pick samples among the embedded, non-duplicate ones (or, with `sequence_length`,
    sequences of video frames); returns the key of a JSON object: `selected`, names in
    pick order, `embeddings`, the key of their vectors (.npy, same order, for the
    datapool), `sequences`, what each picked sequence holds, and `explanation`, the key
    of the table saying why (Parquet, `tasks.strategies.EXPLANATION_COLUMNS`).
    `prior_key` (.npy) holds the embeddings selected by earlier runs: new picks keep
    their distance from them. `input_url` is where custom metadata may lie beside the
    input."""
    key = current_step_key()
    output = open_storage(output_url)
    duplicates = json.loads(output.read(duplicates_key)) if duplicates_key else {}
    candidates = load_candidates(output, checked, embedded, set(duplicates))
    on = pick_device(device)
    prior = read_npy(output, prior_key) if prior_key else None
    runs: list[dict[str, object]] = []
    if sequence_length:
        picks, runs, explanation = select_sequences(
            candidates, sequence_length, selection, stopping, seed, on, prior
        )
    else:
        # Look beside the input only for a METADATA key the run's metadata lacks.
        custom = any(
            e.input.type == "METADATA"
            and str(e.input.key).removeprefix("lightly.") not in candidates.rows.columns
            for e in selection.strategies or []
        )
        table = sample_table(
            candidates,
            input_url if custom else None,
            selection.custom_metadata,
            selection.predictions,
        )
        inputs = Inputs(candidates.names, candidates.embeddings, table, prior, read_file=read_file)
        chosen = choose(inputs, selection, stopping, seed, on)
        picks, explanation = chosen.picks, chosen.explanation
    vectors_key = artifact_key("select", key, ".npy")
    output.write(vectors_key, npy_bytes(candidates.embeddings[picks]))
    explanation_key = artifact_key("select", key, ".parquet")
    output.write(explanation_key, to_parquet_bytes(explanation))
    picked = {
        "selected": [candidates.names[i] for i in picks],
        "embeddings": vectors_key,
        "sequences": runs,
        "explanation": explanation_key,
    }
    result_key = artifact_key("select", key, ".json")
    output.write(result_key, json.dumps(picked).encode())
    return result_key
