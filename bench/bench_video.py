"""Video throughput and memory: the pipeline's video path vs a bare PyAV loop, same run.

One long video (10,000 frames by default, H.264 MP4). Two bare loops, as a competent
script would write them with PyAV and torch alone: (1) decode with FFmpeg's threads and
convert each frame to the model's input size (the least a loop does to use its frames);
(2) the same, batched through the model. The pipeline's video check step does (1) and
more (frame counting by demux, the check's truncation and decode checks, a hash of every
full frame, metadata, Parquet, input parts on disk, Prefect); check + embed steps do (2)
and that. Interleaved, best of each (this VM's speed drifts). Target: check step / bare
loop (1) >= 0.8. For scale, a loop that decodes and discards every frame is printed too.

Memory: peak RSS of a fresh process running the video's check step (what a CPU-pool
worker holds for it; target under 1 GB) and of whole curate runs on the long video and on
a 100-frame one: what the long video costs is their difference; the rest is the runtime
(importing CUDA torch, torchvision and timm is most of it).

    python -m bench.bench_video [--frames 10000] [--input-size 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import av  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from av.video.reformatter import VideoReformatter  # noqa: E402

from bench.runs import timed_curate  # noqa: E402


def make_video(path: Path, frames: int, width: int = 480, height: int = 270) -> None:
    """H.264 with a scene cut every 200 frames, motion in every frame and sensor-like
    noise (so decoding costs what a camera's video does, not what a cartoon does)."""
    yy, xx = np.mgrid[0:height, 0:width]
    noise = np.random.default_rng(0).integers(0, 24, (16, height, width, 1), dtype=np.uint8)
    with av.open(str(path), "w", format="mp4", options={"movflags": "+faststart"}) as out:
        stream = out.add_stream("libx264", rate=30, options={"preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 30)
        for i in range(frames):
            scene = i // 200
            image = np.empty((height, width, 3), np.uint8)
            image[:] = ((scene * 70) % 256, (scene * 130 + 40) % 256, (scene * 200 + 90) % 256)
            cx, cy = (i * 3) % width, height // 2 + int(height / 4 * np.sin(i / 9))
            image[(xx - cx) ** 2 + (yy - cy) ** 2 < (height // 6) ** 2] = 255 - image[0, 0]
            image[:, :8] = (i * 5) % 256
            image += noise[i % 16]
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode())


def decode_only(path: Path) -> float:
    """Seconds for a plain threaded PyAV loop that decodes every frame and uses none."""
    started = time.perf_counter()
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_type = "AUTO"
        for _ in container.decode(stream):
            pass
    return time.perf_counter() - started


def bare_decode(path: Path, size: int, embed: object | None = None, batch: int = 64) -> float:
    """Seconds for a plain threaded PyAV loop to decode and downscale every frame (and,
    given an embedder, to embed them in batches)."""
    started = time.perf_counter()
    pending: list[np.ndarray] = []
    # One reformatter for the loop: frame.to_ndarray(width=...) would make a new swscale
    # context per frame, ten times slower; a competent loop does not.
    reformatter = VideoReformatter()
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_type = "AUTO"
        for frame in container.decode(stream):
            small = reformatter.reformat(frame, size, size, "rgb24", interpolation="BILINEAR")
            pending.append(small.to_ndarray())
            if embed is not None and len(pending) == batch:
                embed.embed(np.stack(pending), batch)  # type: ignore[attr-defined]
                pending = []
            elif embed is None:
                pending = []
    if embed is not None and pending:
        embed.embed(np.stack(pending), batch)  # type: ignore[attr-defined]
    return time.perf_counter() - started


def embedder() -> object:
    from tasks.models import Embedder, build_model
    from tasks.weights import resolve_weights

    device = torch.device("cpu")
    model = build_model("resnet18", resolve_weights(None, False, 0), None, device)
    return Embedder(model, device)


def pipeline(folder: Path, output: Path, args: argparse.Namespace, seed: int) -> dict:
    """A whole curate run's report (the Prefect server already started); a fresh output
    each time, so nothing comes from the cache."""
    overrides = [
        f"input={folder}",
        f"output={output}",
        "stopping_condition.n_samples=50",
        f"embedding.input_size={args.input_size}",
        f"num_workers={os.cpu_count()}",
        f"seed={seed}",
    ]
    return timed_curate(overrides)[1]


# This process's own peak RSS: VmHWM, not ru_maxrss, which a child inherits from the
# (large) parent it was forked from.
PEAK = """
def peak():
    status = open("/proc/self/status").read()
    return int(status.split("VmHWM:")[1].split()[0]) // 1024
"""

CHECK_ONLY = (
    PEAK
    + """
import sys
from tasks.frames import check_one_video
from tasks.storage import ObjectInfo, open_storage
folder, output, size, chunk = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
source, out = open_storage(folder), open_storage(output)
obj = next(iter(source.list()))
seen, info, decoded, reason = check_one_video(source, out, obj, size, 1, False, chunk, "p")
assert reason is None and decoded == info.frame_count, (decoded, reason)
print(decoded, peak())
"""
)

WHOLE_RUN = (
    PEAK
    + """
import json, os, sys
os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
from flows.curate import curate
from tasks.config import load_config
args = [f"input={sys.argv[1]}", f"output={sys.argv[2]}", "stopping_condition.n_samples=50",
        f"embedding.input_size={sys.argv[3]}"]
run = curate(**load_config(None, args).sections())
print(json.load(open(run + "/report.json"))["counts"]["frames"], peak())
"""
)


def peak_mb(script: str, *argv: str) -> tuple[int, int]:
    """(frames, peak RSS in MB) of `script` run in a fresh Python."""
    done = subprocess.run(
        [sys.executable, "-c", script, *argv], capture_output=True, text=True, check=True
    )
    frames, peak = done.stdout.split()[-2:]
    return int(frames), int(peak)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=10000)
    parser.add_argument("--input-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from prefect import flow

    with tempfile.TemporaryDirectory() as tmp:
        folder, output = Path(tmp) / "videos", Path(tmp) / "out"
        folder.mkdir()
        video = folder / "long.mp4"
        started = time.perf_counter()
        make_video(video, args.frames)
        print(
            f"video: {args.frames} frames 480x270 H.264, {video.stat().st_size / 1e6:.1f} MB "
            f"(made in {time.perf_counter() - started:.0f} s); input {args.input_size} px"
        )
        flow(name="warm-up")(lambda: None)()  # start the ephemeral server outside the timing
        model = embedder()
        discard_times, decode_times, embed_times, reports = [], [], [], []
        for rep in range(args.repeats):
            discard_times.append(decode_only(video))
            decode_times.append(bare_decode(video, args.input_size))
            embed_times.append(bare_decode(video, args.input_size, model))
            reports.append(pipeline(folder, output / str(rep), args, seed=rep))
        n = args.frames
        check = min(r["steps"]["check"]["seconds"] for r in reports)
        both = min(r["steps"]["check"]["seconds"] + r["steps"]["embed"]["seconds"] for r in reports)
        assert all(r["counts"]["frames"] == n for r in reports)

        def line(label: str, seconds: float) -> str:
            return f"{label:44s} {n / seconds:7.1f} frames/s ({seconds:.1f} s)"

        print(line("PyAV loop decoding, frames unused:", min(discard_times)))
        print(line("bare PyAV loop (decode+downscale):", min(decode_times)))
        print(line("pipeline video check step:", check))
        print(f"ratio check-step/bare-decode: {min(decode_times) / check:.2f} (target >= 0.8)")
        print(f"ratio check-step/decode-only: {min(discard_times) / check:.2f}")
        print(line("bare PyAV loop + model forward:", min(embed_times)))
        print(line("pipeline check + embed steps:", both))
        print(f"ratio pipeline/bare (decode+embed): {min(embed_times) / both:.2f}")

        frames, check_peak = peak_mb(
            CHECK_ONLY, str(folder), str(output / "mem"), str(args.input_size), "2000"
        )
        print(
            f"peak RSS, video check step alone ({frames} frames): {check_peak} MB (target < 1024)"
        )
        frames, run_peak = peak_mb(
            WHOLE_RUN, str(folder), str(output / "mem-run"), str(args.input_size)
        )
        short = Path(tmp) / "short"
        short.mkdir()
        make_video(short / "short.mp4", 100)
        short_frames, short_peak = peak_mb(
            WHOLE_RUN, str(short), str(output / "mem-short"), str(args.input_size)
        )
        _, baseline = peak_mb(PEAK + "import flows.curate\nprint(0, peak())")
        print(
            f"peak RSS, whole curate run: {run_peak} MB ({frames} frames), "
            f"{short_peak} MB ({short_frames} frames); the long video costs "
            f"{run_peak - short_peak} MB more; importing the pipeline alone: {baseline} MB"
        )


if __name__ == "__main__":
    main()
