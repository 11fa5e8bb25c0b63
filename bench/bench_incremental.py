"""Incremental cost: a run that finds 1% new objects next to a 20k-object datapool vs the
full run that built the datapool, same machine, same run of this script.

The full run processes every image into a fresh output (check, metadata, embedding,
selection, export, datapool commit). Then 1% new images arrive and the next run lists the
input, diffs it against the datapool, processes the new ones only, selects against the
datapool's selection and commits a new datapool version. Target: incremental / full
<= 0.05. Before the new ones arrive, a `datasource.process_all=true` rerun processes
every object again, each step from the cache. Target: cached rerun / full <= 0.25.

    python -m bench.bench_incremental [--images 20000] [--new 200]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from bench.runs import timed_curate  # noqa: E402


def make_images(folder: Path, start: int, n: int, prefix: str) -> None:
    from flows.demo import encode, photo_crops

    for i, image in enumerate(photo_crops(n, seed=start + 1, size=96)):
        (folder / f"{prefix}_{start + i:06d}.jpg").write_bytes(encode(image, "JPEG", quality=90))


def run(folder: Path, output: Path, *extra: str) -> tuple[float, dict]:
    overrides = [
        *extra,
        f"input={folder}",
        f"output={output}",
        "stopping_condition.proportion_samples=0.01",
        f"num_workers={os.cpu_count()}",
    ]
    return timed_curate(overrides)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--new", type=int, default=200)
    args = parser.parse_args()

    from prefect import flow

    with tempfile.TemporaryDirectory() as tmp:
        folder, output = Path(tmp) / "images", Path(tmp) / "out"
        folder.mkdir()
        make_images(folder, 0, args.images, "img")
        flow(name="warm-up")(lambda: None)()  # start the ephemeral server outside the timing
        full, full_report = run(folder, output)
        rerun, rerun_report = run(folder, output, "datasource.process_all=true")
        for name in ("check", "embed", "select"):
            step = rerun_report["steps"][name]
            assert step["cached_shards"] == step["shards"], (name, step)
        # New objects spread through the key space (not one block at the end).
        for i in range(args.new):
            make_images(folder, 10_000_000 + i, 1, f"img_{i * args.images // args.new:06d}")
        incremental, report = run(folder, output)
        counts = report["counts"]
        assert counts["processed"] == args.new, counts
        assert counts["datapool_size"] == args.images + args.new, counts

        def steps(report: dict) -> str:
            return ", ".join(f"{k} {v['seconds']:.2f}" for k, v in report["steps"].items())

        print(f"datapool: {args.images} images (96 px JPEG); then {args.new} new ones")
        print(f"full run (builds the datapool):   {full:7.2f} s  ({steps(full_report)})")
        print(f"incremental run ({args.new} new):    {incremental:7.2f} s  ({steps(report)})")
        print(f"process_all rerun (all cached):  {rerun:7.2f} s  ({steps(rerun_report)})")
        print(f"ratio incremental/full: {incremental / full:.3f} (target <= 0.05)")
        print(f"ratio cached rerun/full: {rerun / full:.3f} (target <= 0.25)")


if __name__ == "__main__":
    main()
