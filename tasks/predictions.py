"""Predictions: per-sample class probabilities and the active-learning scores made from
them, written and read back here (`data/predictions.parquet`, a selection input).

One row per sample: `filename`, `predicted_class`, `probabilities` (a list of float32 in
the order of the class names) and one column per score. The class names travel in the
Parquet schema's metadata (`class_names`, a JSON list). Scores follow Lightly's
classification scorers: each lies in [0, 1] and is higher for a more uncertain
prediction, so "select the most uncertain" means "maximise the score".
"""

from __future__ import annotations

import io
import json
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

PREDICTIONS_FILE = "data/predictions.parquet"  # in the run directory
SCORE_COLUMNS = (
    "uncertainty_entropy",  # entropy of the probabilities / log(classes)
    "uncertainty_margin",  # 1 - (top probability - second probability)
    "uncertainty_least_confidence",  # (1 - top probability) * classes / (classes - 1)
)
PREDICTION_COLUMNS = ("filename", "predicted_class", "probabilities", *SCORE_COLUMNS)
_CLASS_NAMES_KEY = b"class_names"


def active_learning_scores(probabilities: np.ndarray) -> dict[str, np.ndarray]:
    """Entropy, margin and least-confidence scores of N x C probability rows."""
    p = np.asarray(probabilities, dtype=np.float64)
    classes = p.shape[1]
    if classes < 2:
        raise ValueError("active-learning scores need at least two classes")
    top = np.sort(p, axis=1)[:, ::-1]
    entropy = -(p * np.log(np.clip(p, 1e-12, 1.0))).sum(axis=1) / np.log(classes)
    scores = {
        "uncertainty_entropy": entropy,
        "uncertainty_margin": 1.0 - (top[:, 0] - top[:, 1]),
        "uncertainty_least_confidence": (1.0 - top[:, 0]) * classes / (classes - 1),
    }
    return {name: np.clip(v, 0.0, 1.0).astype(np.float32) for name, v in scores.items()}


def predictions_frame(
    filenames: list[str], probabilities: np.ndarray, class_names: list[str]
) -> pd.DataFrame:
    import pandas as pd

    if probabilities.shape != (len(filenames), len(class_names)):
        raise ValueError(
            f"{probabilities.shape} probabilities for {len(filenames)} samples and "
            f"{len(class_names)} classes"
        )
    frame = pd.DataFrame(
        {
            "filename": filenames,
            "predicted_class": [class_names[i] for i in probabilities.argmax(axis=1)]
            if len(filenames)
            else [],
            "probabilities": list(probabilities.astype(np.float32)),
        }
    )
    for name, values in active_learning_scores(probabilities.reshape(-1, len(class_names))).items():
        frame[name] = values
    return frame


def predictions_bytes(frame: pd.DataFrame, class_names: list[str]) -> bytes:
    """Parquet content of a predictions frame, the class names in its schema metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(frame[list(PREDICTION_COLUMNS)], preserve_index=False)
    metadata = {**(table.schema.metadata or {}), _CLASS_NAMES_KEY: json.dumps(class_names)}
    buffer = io.BytesIO()
    pq.write_table(table.replace_schema_metadata(metadata), buffer)
    return buffer.getvalue()


def read_predictions(data: bytes) -> tuple[pd.DataFrame, list[str]]:
    """A predictions file's rows and its class names (the order of `probabilities`)."""
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(data))
    missing = set(PREDICTION_COLUMNS) - set(table.column_names)
    raw = (table.schema.metadata or {}).get(_CLASS_NAMES_KEY)
    if missing or raw is None:
        raise ValueError(f"not a predictions file (missing {sorted(missing) or 'class names'})")
    return table.to_pandas(), list(json.loads(raw))
