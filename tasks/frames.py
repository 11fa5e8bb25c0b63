"""Check (+describe) for videos: every frame of a video decoded once, in one pass.

The pass counts the frames first (`probe`: from trusted container metadata when asked,
otherwise by demuxing packets), then decodes the whole video with threaded decoding from a
seekable stream over the storage layer (never a download to disk). Each decoded frame is
checked, hashed and described, and, when it is a sample (`every_nth_frame`), downscaled at
decode time into its model input. Model inputs are written in parts of `chunk` frames, so
memory holds one part, however long the video. A corrupt video gets its reason; its
frames are all dropped, or the decodable ones kept with `keep_decodable_frames`.
"""

from __future__ import annotations

import io
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import google_crc32c
import numpy as np
import pandas as pd
from av.video.frame import VideoFrame
from PIL import Image

from tasks.caching import cached_step, current_step_key
from tasks.describe import FrameFacts, describe_frames, metadata_frame
from tasks.formats import npy_chunks, to_parquet_bytes
from tasks.keys import artifact_key
from tasks.monitor import step_threads
from tasks.naming import frame_name
from tasks.shards import CheckedShard, Shard, read_manifest
from tasks.stop import raise_if_stopped
from tasks.storage import ObjectInfo, Storage, open_storage, unreadable_reason
from tasks.video import VideoInfo, check_video, probe, read_frames, to_rgb

# Bytes per sample in each plane of the pixel formats decoders commonly put out: a plane's
# row holds `plane.width` samples, then the decoder's padding.
SAMPLE_BYTES: dict[str, tuple[int, ...]] = {
    **dict.fromkeys(
        ("yuv420p", "yuvj420p", "yuv422p", "yuvj422p", "yuv444p", "yuvj444p", "yuv440p"),
        (1, 1, 1),
    ),
    **dict.fromkeys(
        ("yuv420p10le", "yuv422p10le", "yuv444p10le", "yuv420p12le", "yuv422p12le", "yuv444p12le"),
        (2, 2, 2),
    ),
    "gray": (1,),
    "gray10le": (2,),
    "gray12le": (2,),
    "nv12": (1, 2),  # U and V interleaved in the second plane
    "nv21": (1, 2),
    "p010le": (2, 4),
}


def frame_crc(frame: VideoFrame) -> int:
    """CRC-32C of a decoded frame's picture, as it came out of the decoder (its planes one
    after the other, without the decoder's row padding, whose bytes are undefined).

    A checksum at memory speed (hardware CRC-32C: 6 us for a 480x270 frame, where zlib's
    CRC-32 takes 29 and sha256 90, a fifth of a decode loop's time); with the sha256 of
    the downscaled frame it makes the pixel hash: two frames share it only when their
    downscaled pixels are identical and their full pictures collide in 32 bits, 1 in 4e9
    for such near-identical frames. Planes are checksummed in place (the CRC chains over
    consecutive buffers), copied only when rows are padded; converting to RGB at full size
    would cost more than decoding."""
    sample_bytes = SAMPLE_BYTES.get(frame.format.name)
    if sample_bytes is None:  # rare from video decoders: PyAV's padding-free array or RGB
        try:
            picture = frame.to_ndarray()
        except (ValueError, TypeError, AssertionError):  # no array layout, or odd width
            picture = frame.to_ndarray(format="rgb24")
        return int(google_crc32c.value(np.ascontiguousarray(picture)))
    crc = 0
    for plane, size in zip(frame.planes, sample_bytes, strict=True):
        # Buffers as such: the C extension refuses memoryviews.
        data: object = plane
        row = plane.width * size
        if plane.line_size != row:
            rows = np.frombuffer(memoryview(plane), np.uint8).reshape(-1, plane.line_size)
            data = np.ascontiguousarray(rows[:, :row])
        crc = google_crc32c.extend(crc, data)
    return int(crc)


@dataclass
class _VideoPass:
    """What one video's pass produced: rows and model inputs of its sampled frames, and
    the keys of the input parts written so far."""

    rows: list[dict[str, object]] = field(default_factory=list)
    parts: list[str] = field(default_factory=list)


# Frames measured together: in the CPU's cache still, since they were just downscaled.
FRAMES_PER_MEASURE = 64


class _Parts:
    """Model inputs of sampled frames gathered into parts of `chunk` frames, each written
    to the output when full. Every FRAMES_PER_MEASURE frames are measured as they arrive
    (on this thread: a helper thread competing with the decoder's made the pass slower)."""

    def __init__(self, output: Storage, prefix: str, chunk: int, size: int) -> None:
        self.output, self.prefix, self.chunk, self.size = output, prefix, chunk, size
        self.seen = _VideoPass()
        self.facts: list[FrameFacts] = []
        self.inputs = np.empty((chunk, size, size, 3), np.uint8)  # reused: writes are done
        self.described = 0  # frames of the current part measured so far

    def add(self, fact: FrameFacts, frame: VideoFrame) -> None:
        self.inputs[len(self.facts)] = to_rgb(frame, self.size)
        self.facts.append(fact)
        if len(self.facts) - self.described >= FRAMES_PER_MEASURE:
            self._measure()
        if len(self.facts) == self.chunk:
            self.flush()

    def _measure(self) -> None:
        block = slice(self.described, len(self.facts))
        self.seen.rows.extend(describe_frames(self.facts[block], self.inputs[block]))
        self.described = len(self.facts)

    def flush(self) -> None:
        if not self.facts:
            return
        self._measure()
        key = f"{self.prefix}-{len(self.seen.parts):05d}.npy"
        self.output.write_stream(key, npy_chunks(self.inputs[: len(self.facts)]))
        self.seen.parts.append(key)
        self.facts, self.described = [], 0


def check_one_video(
    source: Storage,
    output: Storage,
    obj: ObjectInfo,
    input_size: int,
    every_nth: int,
    use_metadata: bool,
    chunk: int,
    part_prefix: str,
) -> tuple[_VideoPass, VideoInfo | None, int, str | None]:
    """(the pass, what probe found, frames decoded, reason or None) for one video."""
    parts = _Parts(output, part_prefix, chunk, input_size)
    first_pts: list[int] = []
    try:
        opened = source.open(obj.key)
    except OSError as exc:  # made unreadable after listing: the object's, not the run's
        if isinstance(exc, FileNotFoundError) or (why := unreadable_reason(exc)) is None:
            raise
        return parts.seen, None, 0, why
    try:
        with opened as stream:
            info = probe(stream, use_metadata)
            if isinstance(info, str):
                return parts.seen, None, 0, info
            seconds_per_tick = float(info.time_base_fraction)

            def on_frame(index: int, frame: VideoFrame) -> None:
                pts = frame.pts
                if not first_pts and pts is not None:
                    first_pts.append(pts)
                if index % every_nth:
                    return
                seconds = None
                if pts is not None and first_pts:
                    seconds = (pts - first_pts[0]) * seconds_per_tick
                fact = FrameFacts(
                    frame_name(obj.key, index),
                    obj.key,
                    obj.size,
                    info.codec,
                    index,
                    pts,
                    seconds,
                    frame.width,
                    frame.height,
                    frame.format.name,
                    frame_crc(frame),
                )
                parts.add(fact, frame)

            decoded, reason = check_video(stream, info.declared_frames, on_frame)
        parts.flush()
    except BaseException:
        for key in parts.seen.parts:  # a retry or the next run writes them again
            output.delete(key)
        raise
    if reason is None and decoded != info.frame_count:
        reason = f"frame count mismatch: {info.frame_count} counted, {decoded} decode"
    return parts.seen, info, decoded, reason


def _video_summary(info: VideoInfo | None, decoded: int, reason: str | None) -> dict[str, Any]:
    summary: dict[str, Any] = {"decoded_frames": decoded, "reason": reason}
    if info is not None:
        summary |= {
            "frame_count": info.frame_count,
            "frame_count_source": info.frame_count_source,
            "declared_frames": info.declared_frames,
            "width": info.width,
            "height": info.height,
            "codec": info.codec,
            "fps": info.fps,
            "duration_seconds": info.duration_seconds,
            "time_base": info.time_base,
        }
    return summary


@cached_step("check_video", monitor_as="check")  # one "check" step in report.json
def check_video_shard(
    shard: Shard,
    input_url: str,
    output_url: str,
    input_size: int,
    every_nth_frame: int,
    use_frame_count_metadata: bool,
    keep_decodable_frames: bool,
    chunk: int,
) -> CheckedShard:
    """Check, describe and prepare model inputs for the frames of a shard's videos."""
    key = current_step_key()
    started = time.perf_counter()
    output, source = open_storage(output_url), open_storage(input_url)
    rows: list[dict[str, object]] = []
    parts: list[str] = []
    corrupt: dict[str, str] = {}
    videos: dict[str, dict[str, Any]] = {}
    for number, obj in enumerate(read_manifest(output, shard.manifest)):
        try:
            seen, info, decoded, reason = check_one_video(
                source,
                output,
                obj,
                input_size,
                every_nth_frame,
                use_frame_count_metadata,
                chunk,
                artifact_key("inputs", key, f"-{number:04d}"),
            )
        except FileNotFoundError:
            seen, info, decoded, reason = _VideoPass(), None, 0, "missing: deleted after listing"
        videos[obj.key] = _video_summary(info, decoded, reason)
        if reason is not None:
            corrupt[obj.key] = reason
            if not keep_decodable_frames:
                for part in seen.parts:
                    output.delete(part)
                continue
        rows.extend(seen.rows)
        parts.extend(seen.parts)
    metadata_key = artifact_key("check_video", key, ".parquet")
    corrupt_key = artifact_key("check_video", key, ".corrupt.json")
    videos_key = artifact_key("check_video", key, ".videos.json")
    output.write(corrupt_key, json.dumps(corrupt, sort_keys=True).encode())
    output.write(videos_key, json.dumps(videos, sort_keys=True).encode())
    output.write(metadata_key, to_parquet_bytes(metadata_frame(rows)))
    return CheckedShard(
        shard_index=shard.index,
        metadata=metadata_key,
        corrupt=corrupt_key,
        inputs=tuple(parts),
        full_check=True,
        valid=len(rows),
        corrupt_count=len(corrupt),
        bytes_read=source.bytes_read,
        seconds=time.perf_counter() - started,
        retries=source.retries + output.retries,
        videos=videos_key,
    )


def export_frames(
    source: Storage, output: Storage, prefix: str, frames: pd.DataFrame, workers: int = 4
) -> int:
    """Write the given video frames (`filename`, `video`, `frame_index` rows) as PNGs under
    `prefix`, each pixel-identical to the frame a plain decode loop yields. Only those
    frames are decoded, from the keyframe before each (`read_frames`); videos in parallel.
    Returns the bytes read from the input."""
    before = source.bytes_read

    def export_video(video: str, rows: pd.DataFrame) -> None:
        names = dict(zip(rows["frame_index"].astype(int), rows["filename"], strict=True))
        with source.open(video) as stream:
            for index, rgb in read_frames(stream, names):
                raise_if_stopped()
                output.write(f"{prefix}/{names[index]}", png_bytes(rgb))

    with ThreadPoolExecutor(max_workers=workers, initializer=step_threads()) as pool:
        jobs = [
            pool.submit(export_video, str(video), rows)
            for video, rows in frames.groupby("video", sort=True)
        ]
        for job in jobs:
            job.result()
    return source.bytes_read - before


def png_bytes(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    # Lossless, and level 1: a 1080p frame in ~30 ms instead of ~300 ms at the default.
    Image.fromarray(rgb).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
