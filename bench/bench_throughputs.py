"""Measure the throughputs `curate recommend` estimates from; writes tasks/throughputs.json.

What it measures, on this machine:
- check: decode + full check + metadata + model input of JPEGs on one thread, at two image
  sizes (a fixed cost per image and a cost per megapixel); H.264 video frames checked
  (FFmpeg's own threads on every core), per megapixel and core;
- embed: images/s per model and input size on the CPU (all cores), and on the GPU when
  there is one (with the memory a batch takes per image);
- train: SimCLR samples/s on the CPU (32 px views) and the GPU;
- select: seconds per sample and pick of the default strategy;
- run: the rest of a whole pipeline run (discover, dedup, export, report, Prefect) as a
  fixed cost plus a cost per sample, from two runs of different sizes.

A run on a CPU-only machine keeps the GPU figures already in the file and vice versa.

    python -m bench.bench_throughputs [--quick] [--out tasks/throughputs.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")  # busy machines

import numpy as np  # noqa: E402
import torch  # noqa: E402

from tasks.recommend import THROUGHPUTS, cpu_share  # noqa: E402

CPU = torch.device("cpu")


def _jpegs(folder: Path, n: int, side: int) -> list[Any]:
    from flows.demo import encode, photo_crops
    from tasks.storage import open_storage

    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(photo_crops(n, seed=2, size=side)):
        (folder / f"img_{i:05d}.jpg").write_bytes(encode(image, "JPEG", quality=90))
    return list(open_storage(str(folder)).list())


def check_per_core(tmp: Path, quick: bool) -> dict[str, float]:
    """Seconds per image and per megapixel of the image check on one thread."""
    from tasks.check import check_images
    from tasks.storage import open_storage

    timings = []
    for side, n in ((128, 150 if quick else 600), (1024, 12 if quick else 48)):
        objects = _jpegs(tmp / f"jpeg{side}", n, side)
        storage = open_storage(str(tmp / f"jpeg{side}"))
        check_images(storage, objects[:4], 10**9, True, 64, 1)  # warm caches
        best = float("inf")
        for _ in range(2):  # best of two: the machine is shared
            started = time.perf_counter()
            check_images(storage, objects, 10**9, True, 64, 1)
            best = min(best, (time.perf_counter() - started) / n)
        timings.append((side * side / 1e6, best))
    (mp_small, t_small), (mp_large, t_large) = timings
    per_mp = max(0.0, (t_large - t_small) / (mp_large - mp_small))
    return {
        "seconds_per_image": max(1e-5, t_small - per_mp * mp_small),
        "seconds_per_megapixel": per_mp,
    }


def video_per_core(tmp: Path, quick: bool) -> float:
    """Megapixels of H.264 frames checked per second and core."""
    import av

    from tasks.frames import check_one_video
    from tasks.storage import ObjectInfo, open_storage

    frames, width, height = (60 if quick else 240), 640, 360
    path = tmp / "video" / "clip.mp4"
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            picture = np.roll(base, 4 * i, axis=1)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
        container.mux(stream.encode())
    source, output = open_storage(str(path.parent)), open_storage(str(tmp / "video-out"))
    obj = ObjectInfo("clip.mp4", path.stat().st_size, "1")
    best = float("inf")
    for attempt in range(2):
        started = time.perf_counter()
        check_one_video(source, output, obj, 64, 1, False, 2000, f"parts/{attempt}")
        best = min(best, time.perf_counter() - started)
    cores = torch.get_num_threads()
    return frames * width * height / 1e6 / best / cores


def embed_rates(device: torch.device, combos: list[tuple[str, int]], quick: bool) -> dict:
    from tasks.models import Embedder, build_model
    from tasks.weights import Weights

    rates: dict[str, Any] = {}
    for model, size in combos:
        embedder = Embedder(build_model(model, Weights("random", "0"), None, device), device)
        batch = 256 if device.type == "cuda" else 64
        images = np.random.default_rng(0).integers(0, 255, (batch, size, size, 3), np.uint8)
        embedder.embed(images[: min(8, batch)], batch)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        # Repeat until ~2 s (1 s quick) of work, then images/s.
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < (1.0 if quick else 2.0) or done < batch:
            embedder.embed(images, batch)
            done += batch
        if device.type == "cuda":
            torch.cuda.synchronize()
        rate = done / (time.perf_counter() - started)
        entry: dict[str, Any] = {"images_per_second": round(rate, 1)}
        if device.type == "cpu":
            entry["cores"] = torch.get_num_threads()
        else:
            peak = torch.cuda.max_memory_allocated(device)
            entry["bytes_per_image"] = int(peak / batch)
        rates[f"{model}@{size}"] = entry
        print(f"  embed {model}@{size} on {device}: {rate:.1f} img/s")
    return rates


def train_rates(device: torch.device, quick: bool) -> dict[str, Any]:
    from tasks.config import Training
    from tasks.train import TrainingSet, train

    size = 224 if device.type == "cuda" else 64
    view = size if device.type == "cuda" else 32
    n = 256 if quick else 512  # two epochs of two or four batches: enough for a rate
    inputs = np.random.default_rng(0).integers(0, 255, (n, size, size, 3), np.uint8)
    settings = Training(max_epochs=2, batch_size=128 if device.type == "cpu" else 256)
    trained = train(TrainingSet.from_arrays([inputs]), "resnet18", settings, 0, device)
    rate = trained.samples_per_second[-1]  # the second epoch: kernels and allocators warm
    print(f"  train resnet18 simclr {view} px views on {device}: {rate:.1f} samples/s")
    entry: dict[str, Any] = {"samples_per_second": round(rate, 1)}
    if device.type == "cpu":
        entry["cores"] = torch.get_num_threads()
    return {f"resnet18@{view}": entry}


def select_rate(quick: bool) -> float:
    from tasks.config import StoppingCondition
    from tasks.select import select

    n, k = (5000, 50) if quick else (20000, 200)
    x = np.random.default_rng(0).normal(size=(n, 512)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    started = time.perf_counter()
    select(x, "auto", StoppingCondition(n_samples=k), 0, CPU)
    return (time.perf_counter() - started) / (n * k)


def run_costs(tmp: Path, quick: bool) -> dict[str, float]:
    """What a whole run costs besides check, embed and select, from two runs: discover,
    dedup and export per sample; the report's drawing (bounded: it draws from a sample)
    and Prefect's bookkeeping as a fixed cost."""
    from prefect import flow

    from bench.runs import timed_curate

    flow(name="warm-up")(lambda: None)()  # the Prefect server starts outside the timing
    per_sample, fixed, drawing = [], [], []
    for n in (60, 240) if quick else (100, 400):
        folder = tmp / f"run{n}"
        _jpegs(folder, n, 160)
        overrides = [
            f"input={folder}",
            f"output={tmp / f'out{n}'}",
            "stopping_condition.n_samples=10",
        ]
        timed_curate(overrides)  # the first run of a size pays imports and model builds
        seconds, report = timed_curate([*overrides, "datasource.process_all=true", "seed=1"])
        steps = {name: step["seconds"] for name, step in report["steps"].items()}
        report_seconds = report["report_reads"]["seconds"]
        other = sum(steps.get(name, 0.0) for name in ("discover", "dedup", "export"))
        per_sample.append(other / n)
        drawing.append(report_seconds)
        fixed.append(seconds - sum(steps.values()) - report_seconds)
        print(
            f"  run of {n} images: {seconds:.1f} s; discover+dedup+export {other:.1f} s, "
            f"report {report_seconds:.1f} s, the rest {fixed[-1]:.1f} s"
        )
    return {
        "fixed_seconds": round(sum(fixed) / len(fixed) + max(drawing), 2),
        "seconds_per_sample": sum(per_sample) / len(per_sample),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer images: a rough table")
    parser.add_argument("--out", type=Path, default=THROUGHPUTS)
    args = parser.parse_args()
    table: dict[str, Any] = json.loads(args.out.read_text()) if args.out.exists() else {}
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        gpu_name = f" + {torch.cuda.get_device_name()}" if cuda else ""
        print(f"measuring on {torch.get_num_threads()} cores{gpu_name}")
        shares = [cpu_share()]  # how busy the machine is, before, between and after
        check = check_per_core(tmp, args.quick)
        check["video_megapixels_per_second"] = video_per_core(tmp, args.quick)
        print(f"  check: {check}")
        table["check"] = check
        cpu_combos = [("resnet18", 64), ("resnet18", 128), ("resnet50", 64)]
        embed = table.setdefault("embed", {})
        embed["cpu"] = embed_rates(CPU, cpu_combos, args.quick)
        shares.append(cpu_share())
        train = table.setdefault("train", {})
        train["cpu"] = train_rates(CPU, args.quick)
        measured = table.setdefault("measured_on", {})
        measured["cpu"] = (
            f"{torch.get_num_threads()} cores ({platform.processor() or platform.machine()}), "
            f"{today}"
        )
        if cuda:
            gpu = torch.device("cuda")
            embed["cuda"] = embed_rates(gpu, [("resnet18", 224), ("resnet50", 224)], args.quick)
            train["cuda"] = train_rates(gpu, args.quick)
            measured["gpu"] = f"{torch.cuda.get_device_name()}, {today}"
        table["select"] = {"seconds_per_sample_and_pick": select_rate(args.quick)}
        table["run"] = run_costs(tmp, args.quick)
        shares.append(cpu_share())
        measured["cpu_share"] = round(sum(shares) / len(shares), 3)
        print(f"  a busy thread got {measured['cpu_share']:.0%} of a core (shared machine)")
    args.out.write_text(json.dumps(table, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
