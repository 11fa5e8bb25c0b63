"""`curate select embeddings=FILE output=DIR stopping_condition.n_samples=K [KEY=VALUE ...]`:
selection alone, on embeddings a team brings from its own model.

`embeddings` is a `.npy` (N x D; row i is named `i` unless `names=FILE.txt` gives one
name a line) or Lightly's `embeddings.csv` (`filenames,embedding_0,...,labels`). Other
keys are the config's own: `stopping_condition.*`, `selection.*` (strategies, custom
metadata, predictions) and `seed`. It writes a run folder as `curate run` does:
`runs/<run_id>/filenames/selected_filenames.txt`, `data/selection.parquet`,
`report.json`, and `LATEST` last. No Prefect: this is one pure step.

A user error is one line `error: ...` on stderr and exit 2.
"""

from __future__ import annotations

import io
import json
import sys
import time
import uuid
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

from tasks.errors import CurateError

USAGE = (
    "usage: curate select embeddings=FILE output=DIR stopping_condition.n_samples=K "
    "[names=FILE.txt] [selection.KEY=VALUE ...] [seed=N]"
)
_OWN_KEYS = ("embeddings", "names")


def load_embeddings(path: str, names_file: str | None) -> tuple[list[str], np.ndarray]:
    """Names and L2-normalised float32 rows; a `.npy` stays memory-mapped when its rows
    are unit vectors already."""
    file = Path(path)
    if not file.is_file():
        raise CurateError(f"embeddings={path}: no such file")
    if file.suffix == ".csv":
        from tasks.formats import read_embedding_csv

        try:
            names, vectors = read_embedding_csv(file.read_bytes())
        except ValueError as exc:
            raise CurateError(f"embeddings={path}: {exc}") from None
    elif file.suffix == ".npy":
        try:
            vectors = np.load(file, mmap_mode="r", allow_pickle=False)
        except ValueError as exc:
            raise CurateError(f"embeddings={path}: not a plain .npy array ({exc})") from None
        if vectors.ndim != 2 or not np.issubdtype(vectors.dtype, np.number):
            raise CurateError(f"embeddings={path}: expected an N x D array of numbers")
        names = [str(i) for i in range(len(vectors))]
    else:
        raise CurateError(f"embeddings={path}: expected a .npy or Lightly's embeddings.csv")
    if names_file is not None:
        try:
            names = [line for line in Path(names_file).read_text().splitlines() if line]
        except OSError as exc:
            raise CurateError(f"names={names_file}: {exc.strerror}") from None
        if len(names) != len(vectors):
            raise CurateError(
                f"names={names_file}: {len(names)} names for {len(vectors)} embeddings"
            )
    if len(set(names)) != len(names):
        raise CurateError(f"embeddings={path}: names are not unique")
    return names, _unit_rows(vectors)


def _unit_rows(vectors: np.ndarray) -> np.ndarray:
    norms = np.empty(len(vectors))
    for start in range(0, len(vectors), 65536):
        block = np.asarray(vectors[start : start + 65536], np.float64)
        norms[start : start + len(block)] = np.sqrt((block * block).sum(axis=1))
    if vectors.dtype == np.float32 and np.all(np.abs(norms - 1) < 1e-4):
        return vectors
    if np.any(norms == 0):
        raise CurateError(f"embeddings: row {int(np.argmax(norms == 0))} is all zeros")
    return (np.asarray(vectors, np.float32) / norms[:, None].astype(np.float32)).astype(np.float32)


def _parse(args: list[str]) -> tuple[dict[str, str], list[str]]:
    own: dict[str, str] = {}
    rest: list[str] = []
    for item in args:
        key, sep, value = item.partition("=")
        if not sep:
            raise CurateError(f"argument '{item}': expected KEY=VALUE ({USAGE})")
        if key in _OWN_KEYS:
            own[key] = value
        else:
            rest.append(item)
    if "embeddings" not in own:
        raise CurateError(f"embeddings: required, e.g. embeddings=vectors.npy ({USAGE})")
    return own, rest


def run_select(args: list[str]) -> str:
    """Run selection and write the run folder; returns its location."""
    from tasks.config import load_config
    from tasks.formats import text_lines, to_parquet_bytes
    from tasks.storage import open_storage
    from tasks.strategies import Inputs, budget, read_custom_metadata, run_strategies

    own, rest = _parse(args)
    config = load_config(None, [f"input={Path(own['embeddings']).parent}", *rest])
    names, vectors = load_embeddings(own["embeddings"], own.get("names"))
    started = time.perf_counter()
    selection = config.selection
    table = None
    if selection.custom_metadata or selection.predictions:
        import pandas as pd

        table = pd.DataFrame({"filename": names})
        for source in (selection.custom_metadata, selection.predictions):
            if source is None:
                continue
            more = _read_table(source, read_custom_metadata)
            new = [c for c in more.columns if c == "filename" or c not in table.columns]
            table = table.merge(more[new], on="filename", how="left")
    inputs = Inputs(names, vectors, table, read_file=lambda p: Path(p).read_bytes())
    k = budget(config.stopping_condition, len(names))
    entries = selection.entries(k, len(names))
    chosen = run_strategies(entries, inputs, k, config.stopping_condition.min_distance, config.seed)
    seconds = time.perf_counter() - started

    output = open_storage(config.output)
    run_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
    run = f"runs/{run_id}"
    selected = [names[i] for i in chosen.picks]
    output.write(f"{run}/filenames/selected_filenames.txt", text_lines(selected))
    output.write(f"{run}/data/selection.parquet", to_parquet_bytes(chosen.explanation))
    report: dict[str, Any] = {
        "run_id": run_id,
        "command": "select",
        "counts": {
            "discovered": len(names),
            "processed": len(names),
            "embedded": len(names),
            "selected": len(selected),
            "dropped_by_threshold": int((chosen.explanation["status"] == "threshold").sum()),
            "cut_by_min_distance": int((chosen.explanation["status"] == "min_distance").sum()),
        },
        "stopped": chosen.stopped,
        "strategies": [entry.model_dump(mode="json", exclude_none=True) for entry in entries],
        "steps": {"select": {"seconds": round(seconds, 3), "bytes_read": vectors.nbytes}},
        "embeddings": {"file": own["embeddings"], "rows": len(names), "dim": vectors.shape[1]},
        "config": config.model_dump(mode="json"),
        "versions": {name: version(name) for name in ("numpy", "pandas", "pydantic")},
    }
    output.write_text(f"{run}/report.json", json.dumps(report, indent=2))
    output.write_text("LATEST", run_id + "\n")
    return output.join(run)


def _read_table(source: str, read_custom_metadata: Any) -> Any:
    """A Parquet file, or a folder of `<name>.json` custom metadata files."""
    from tasks.formats import read_parquet_bytes

    path = Path(source)
    if path.is_dir():
        keys = [p.relative_to(path).as_posix() for p in sorted(path.rglob("*.json"))]
        return read_custom_metadata(lambda key: (path / key).read_bytes(), keys, "")
    try:
        return read_parquet_bytes(io.BytesIO(path.read_bytes()).getvalue())
    except OSError as exc:
        raise CurateError(f"{source}: {exc.strerror}") from None


def main(args: list[str]) -> int:
    """`curate select KEY=VALUE ...`; 0 on success, 2 with one line for a user error."""
    try:
        run = run_select(args)
    except CurateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"run: {run}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
