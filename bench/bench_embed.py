"""Embedding throughput: the curate pipeline vs a bare loop, same run, same machine.

The bare loop is what a competent script does without any of our machinery: read each
file, decode with Pillow in a thread pool, squash to the model's input size, batch,
forward, L2-normalise. The pipeline does that and more (full corruptness check, metadata,
two hashes, Parquet, dedup, selection, export, Prefect bookkeeping). Same images, model,
batch size, input size and threads. Target: pipeline / bare >= 0.9.

    python -m bench.bench_embed [--images 3000] [--input-size 64] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402


def make_images(folder: Path, n: int) -> None:
    from flows.demo import encode, photo_crops

    for i, image in enumerate(photo_crops(n, seed=1, size=160)):
        (folder / f"img_{i:05d}.jpg").write_bytes(encode(image, "JPEG", quality=90))


def bare_loop(folder: Path, input_size: int, batch_size: int, workers: int) -> float:
    """Seconds to embed every image with plain Pillow + timm + torch."""
    from tasks.embed import Embedder, build_model, resolve_weights

    started = time.perf_counter()
    device = torch.device("cpu")
    embedder = Embedder(
        build_model("resnet18", resolve_weights(None, False, 0), None, device), device
    )
    paths = sorted(folder.glob("*.jpg"))

    def load(path: Path) -> np.ndarray:
        with Image.open(path) as image:
            rgb = image.convert("RGB").resize((input_size, input_size), Image.Resampling.BILINEAR)
            return np.asarray(rgb)

    with ThreadPoolExecutor(workers) as pool:
        for start in range(0, len(paths), batch_size):
            batch = np.stack(list(pool.map(load, paths[start : start + batch_size])))
            embedder.embed(batch, batch_size)
    return time.perf_counter() - started


def pipeline(
    folder: Path, output: Path, input_size: int, batch_size: int, workers: int, shard_size: int
) -> tuple[float, dict]:
    """Seconds for a whole curate flow run (the Prefect server already started)."""
    import json

    from flows.curate import curate
    from tasks.config import load_config

    config = load_config(
        None,
        [
            f"input={folder}",
            f"output={output}",
            "stopping_condition.n_samples=100",
            f"embedding.input_size={input_size}",
            f"embedding.batch_size={batch_size}",
            f"num_workers={workers}",
            f"shard_size={shard_size}",
        ],
    )
    started = time.perf_counter()
    run_dir = curate(config)
    seconds = time.perf_counter() - started
    return seconds, json.loads((Path(run_dir) / "report.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--input-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    from prefect import flow

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        make_images(folder, args.images)
        flow(name="warm-up")(lambda: None)()  # start the ephemeral server outside the timing
        bare = bare_loop(folder, args.input_size, args.batch_size, args.workers)
        seconds, report = pipeline(
            folder,
            Path(tmp) / "out",
            args.input_size,
            args.batch_size,
            args.workers,
            args.shard_size,
        )
        bare_rate, pipe_rate = args.images / bare, args.images / seconds
        embed_seconds = report["steps"]["embed"]["seconds"]
        print(
            f"images: {args.images}, input {args.input_size} px, batch {args.batch_size}, "
            f"{args.workers} threads, shards of {args.shard_size}"
        )
        print(f"bare loop (read+decode+resize+forward): {bare_rate:8.1f} img/s ({bare:.1f} s)")
        print(f"pipeline (whole curate run):            {pipe_rate:8.1f} img/s ({seconds:.1f} s)")
        print(
            f"  of which check+describe {report['steps']['check']['seconds']:.1f} s, "
            f"embed {embed_seconds:.1f} s (summed over shards)"
        )
        print(f"ratio pipeline/bare: {pipe_rate / bare_rate:.2f} (target >= 0.9)")


if __name__ == "__main__":
    main()
