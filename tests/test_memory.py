"""Memory: a 20,000-image run streams (its peak stays under 2 GB plus the model), and a
folder of near-limit images is decoded within the pixel budget, whatever the threads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flows.demo import encode

# Runs the flow in a fresh process (ephemeral Prefect server in its own subprocess) and
# reports the process's own peak resident memory and the model's size.
RUN = """
import json, resource, sys
from flows.curate import curate
from tasks.config import load_config
from tasks.models import _embedders
run_dir = curate(**load_config(None, sys.argv[1:]).sections())
model_bytes = sum(p.numel() * p.element_size() for e in _embedders.values()
                  for p in e.model.parameters())
print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "model_mb": model_bytes / 2**20, "run_dir": run_dir}))
"""


def _write_images(folder: Path, count: int) -> None:
    def write(i: int) -> None:
        rng = np.random.default_rng(i)
        pixels = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)  # smooth, distinct images
        image = Image.fromarray(pixels).resize((64, 64), Image.Resampling.BILINEAR)
        (folder / f"{i // 1000:02d}" / f"img_{i:05d}.jpg").write_bytes(encode(image, "JPEG"))

    for sub in range(count // 1000 + 1):
        (folder / f"{sub:02d}").mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(write, range(count)))


@pytest.mark.slow
def test_peak_memory_of_a_20k_image_run_stays_under_2_gb_plus_the_model(tmp_path):
    folder = tmp_path / "images"
    _write_images(folder, 20_000)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            RUN,
            f"input={folder}",
            f"output={tmp_path / 'out'}",
            "stopping_condition.n_samples=500",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"peak {measured['peak_mb']:.0f} MB, model {measured['model_mb']:.0f} MB")
    report = json.loads((Path(measured["run_dir"]) / "report.json").read_text())
    assert report["counts"]["valid"] == 20_000
    assert report["counts"]["selected"] == 500
    assert measured["peak_mb"] < 2048 + measured["model_mb"]


# One run in a fresh process (against the session's Prefect server); prints its peak.
ONE_RUN = """
import resource, sys
from flows.curate import curate
from tasks.config import load_config
curate(**load_config(None, sys.argv[1:]).sections())
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def _peak_of_a_run(*args: str) -> int:
    from prefect.settings import PREFECT_API_URL

    result = subprocess.run(
        [sys.executable, "-c", ONE_RUN, *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=os.environ | {"PREFECT_API_URL": str(PREFECT_API_URL.value())},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return int(result.stdout.strip().splitlines()[-1])


def _near_limit_pngs(folder: Path, count: int, width: int, height: int) -> None:
    """Distinct, compressible (about 200 KB) RGB PNGs of width x height."""
    folder.mkdir(parents=True)
    ramp = np.arange(width, dtype=np.uint8)
    for i in range(count):
        pixels = np.empty((height, width, 3), np.uint8)
        pixels[...] = ramp[None, :, None]
        pixels[:: 7 + i] = 255 - 20 * i
        Image.fromarray(pixels).save(folder / f"big_{i}.png", compress_level=1)


@pytest.mark.slow
@pytest.mark.reliability
def test_near_limit_images_decode_within_the_pixel_budget_whatever_the_threads(
    prefect_server, tmp_path
):
    """Six 16 Mpx PNGs on six decode threads: before the budget they all decoded at once
    (+1.5 GB); now the run's peak exceeds a run over tiny images by less than the stated
    bound of the default budget (max_image_pixels x DECODE_BYTES_PER_PIXEL)."""
    from tasks.inputs import DECODE_BYTES_PER_PIXEL

    limit, count = 16_000_000, 6
    _near_limit_pngs(tmp_path / "big", count, 4000, 3990)
    small = tmp_path / "small"
    small.mkdir()
    for i in range(count):
        Image.new("RGB", (64, 64), (40 * i, 0, 0)).save(small / f"small_{i}.png")
    common = [
        f"corruptness_check.max_image_pixels={limit}",
        f"num_workers={count}",  # every image decoding at once, were it not for the budget
        "stopping_condition.n_samples=2",
    ]
    peaks = {
        folder.name: _peak_of_a_run(
            f"input={folder}", f"output={tmp_path / folder.name}-out", *common
        )
        for folder in (small, tmp_path / "big")
    }
    growth = peaks["big"] - peaks["small"]
    print(f"baseline {peaks['small'] / 2**20:.0f} MB, decoding {growth / 2**20:.0f} MB")
    assert growth < limit * DECODE_BYTES_PER_PIXEL
