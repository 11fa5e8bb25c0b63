"""Ray's cost: the same images curated in one process (`orchestration.mode=local`) and on
a local Ray started by the run (`orchestration.mode=ray`), same machine, same run of this
script; printed with Ray's start-up seconds (from the report) and the ratio.

    python -m bench.bench_ray [--images 2000]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# The temporary Prefect server starts slowly on a busy small machine (as the CLI allows).
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")

from bench.runs import timed_curate  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    args = parser.parse_args()

    from prefect import flow

    from flows.demo import encode, photo_crops

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        for i, image in enumerate(photo_crops(args.images, seed=1, size=96)):
            (folder / f"img_{i:06d}.jpg").write_bytes(encode(image, "JPEG", quality=90))
        flow(name="warm-up")(lambda: None)()  # the ephemeral server, outside the timing
        common = [f"input={folder}", "stopping_condition.proportion_samples=0.01"]
        common += ["embedding.input_size=64", "shard_size=500"]
        local, _ = timed_curate([*common, f"output={Path(tmp) / 'local'}"])
        ray, report = timed_curate(
            [*common, f"output={Path(tmp) / 'ray'}", "orchestration.mode=ray"]
        )
    start = report["resources"]["ray"]["start_seconds"]
    print(f"{args.images} images, {report['resources']['machine']['cpus']} CPUs")
    print(f"in one process: {local:.1f} s")
    print(f"on a local Ray: {ray:.1f} s (Ray's start {start:.1f} s)")
    print(f"ray / local: {ray / local:.2f}; without Ray's start: {(ray - start) / local:.2f}")


if __name__ == "__main__":
    main()
