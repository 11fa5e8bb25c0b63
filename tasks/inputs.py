"""Model inputs: turn an object into the model's input, and read a checked shard's inputs
back, from the .npy parts the check wrote or, when they are gone, by decoding again.
"""

from __future__ import annotations

import io
import math
import struct
import zlib
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageSequence, UnidentifiedImageError

from tasks.errors import CurateError
from tasks.formats import read_npy, read_parquet_bytes
from tasks.shards import CheckedShard
from tasks.storage import Storage, process_objects
from tasks.video import VideoError, decode_frames

# We check the pixel count ourselves, against the configured limit, before decoding.
Image.MAX_IMAGE_PIXELS = None

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass
class Decoded:
    """A fully decoded image (RGB) and what the header said about it."""

    image: Image.Image
    format: str
    mode: str
    width: int
    height: int
    n_frames: int


def _not_an_image_reason(data: bytes) -> str:
    head = data[:512].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return "not an image: HTML"
    if head.startswith((b"<?xml", b"<svg")):
        return "not an image: XML/SVG"
    try:
        data[:4096].decode("utf-8")
        return "not an image: text"
    except UnicodeDecodeError:
        return "not an image: unknown format"


def png_chunk_problem(data: bytes) -> str | None:
    """Walk PNG chunks and verify each CRC and the final IEND; None when sound."""
    pos = len(PNG_MAGIC)
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        chunk_type = data[pos + 4 : pos + 8]
        end = pos + 8 + length
        if end + 4 > len(data):
            return "truncated PNG"
        (crc,) = struct.unpack(">I", data[end : end + 4])
        if zlib.crc32(data[pos + 4 : end]) != crc:
            return f"bad CRC in PNG {chunk_type.decode('latin-1')} chunk"
        if chunk_type == b"IEND":
            return None
        pos = end + 4
    return "truncated PNG"


def _decode_reason(fmt: str, exc: Exception) -> str:
    message = str(exc)
    if "truncated" in message:
        return f"truncated {fmt}"
    if "broken data stream" in message:
        return f"broken {fmt} data stream"
    return f"{fmt} decode error: {message[:120]}"


def decode_image(
    data: bytes, max_pixels: int, full_check: bool = True, draft_size: int | None = None
) -> Decoded | str:
    """Decode `data` to RGB, or return why it cannot be.

    `full_check=False` is the fast path when the corruptness check is off: JPEGs decode
    at reduced size (`draft`, to about `draft_size`), PNG CRCs and later frames of
    animations are not verified. Undecodable files are still reported.
    """
    if not data:
        return "zero bytes"
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        return _not_an_image_reason(data)
    except Exception as exc:  # Pillow raises many types for broken headers
        return f"unreadable header: {str(exc)[:120]}"
    fmt = image.format or "image"
    width, height = image.size
    if width * height > max_pixels:
        return f"decompression bomb: {width * height / 1e6:.0f} Mpx"
    if width == 0 or height == 0:
        return f"empty {fmt} ({width}x{height})"
    if full_check and fmt == "PNG":
        problem = png_chunk_problem(data)
        if problem:
            return problem
    mode = image.mode
    n_frames = getattr(image, "n_frames", 1)
    try:
        if not full_check and fmt == "JPEG" and draft_size:
            image.draft("RGB", (draft_size, draft_size))
        if full_check and n_frames > 1:
            for frame in ImageSequence.Iterator(image):
                frame.load()
            image.seek(0)
        image.load()
        rgb = _to_rgb(image)
    except Exception as exc:  # any decoder failure is the file's fault, not ours
        return _decode_reason(fmt, exc)
    return Decoded(rgb, fmt, mode, width, height, n_frames)


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB with transparent areas on white, 16-bit and float modes scaled to 8 bits."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # Integer images are 16-bit in practice: map the 16-bit range, not the image's
        # own maximum, so a dark image stays dark.
        array = np.clip(np.asarray(image, dtype=np.float64), 0, 65535)
        scale = 255.0 / 65535.0 if array.max() > 255 else 1.0
        return Image.fromarray((array * scale).round().astype(np.uint8)).convert("RGB")
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        finite = np.isfinite(array)
        lo, hi = (array[finite].min(), array[finite].max()) if finite.any() else (0.0, 0.0)
        scaled = (np.where(finite, array, lo) - lo) * (255.0 / ((hi - lo) or 1.0))
        return Image.fromarray(scaled.round().astype(np.uint8)).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def model_input(image: Image.Image, size: int) -> np.ndarray:
    """The model's view of an image: squashed to size x size RGB uint8 (no crop, so
    nothing at the borders is lost)."""
    resized = image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return np.asarray(resized, dtype=np.uint8)


def load_model_inputs(
    source: Storage, names: list[str], draft_size: int | None, input_size: int, workers: int
) -> np.ndarray:
    """Read and decode images that passed the check, for the model only."""

    def load(name: str, data: bytes) -> np.ndarray:
        decoded = decode_image(data, 2**62, full_check=False, draft_size=draft_size)
        if isinstance(decoded, str):  # it passed the check earlier in this run
            raise CurateError(f"{source.join(name)}: changed during the run ({decoded})")
        return model_input(decoded.image, input_size)

    inputs = np.empty((len(names), input_size, input_size, 3), dtype=np.uint8)
    for i, (name, pixels) in enumerate(process_objects(source, names, load, workers)):
        if isinstance(pixels, FileNotFoundError):
            raise CurateError(f"{source.join(name)}: deleted during the run")
        if isinstance(pixels, Exception):
            raise pixels
        inputs[i] = pixels
    return inputs


def shard_inputs(
    checked: CheckedShard, source: Storage, output: Storage, input_size: int, workers: int
) -> Iterator[np.ndarray]:
    """The shard's model inputs, one part at a time: the check's parts while they all
    exist, else made again from the input (a cached check from an earlier run)."""
    if all(output.exists(part) for part in checked.inputs):
        for part in checked.inputs:
            yield read_npy(output, part)
        return
    metadata = read_parquet_bytes(output.read(checked.metadata))
    if checked.videos is not None:
        yield from frame_inputs(source, metadata, input_size)
        return
    # The same pixels as the check made: JPEGs at reduced size only when it did.
    draft_size = None if checked.full_check else input_size
    names = metadata["filename"].tolist()
    yield load_model_inputs(source, names, draft_size, input_size, workers)


# Frames per part when a video's frames are decoded again for the model.
FRAME_PART = 1024


def frame_inputs(source: Storage, metadata: Any, input_size: int) -> Iterator[np.ndarray]:
    """Decode the frames listed in `metadata` again, downscaled, in its row order."""
    part: list[np.ndarray] = []
    for video, rows in metadata.groupby("video", sort=False):
        wanted = [int(i) for i in rows["frame_index"]]
        # The sampled frames are multiples of every_nth_frame: only frames whose index is a
        # multiple of their gcd are converted (the others are decoded and dropped).
        step = math.gcd(*wanted)
        try:
            with (
                source.open(str(video)) as stream,
                closing(decode_frames(stream, input_size, every_nth=max(step, 1))) as frames,
            ):
                for index in wanted:
                    # Stop at the last wanted frame: a kept corrupt video fails just after.
                    frame = next(f for f in frames if f.index == index)
                    part.append(frame.rgb)
                    if len(part) == FRAME_PART:
                        yield np.stack(part)
                        part = []
        except (VideoError, FileNotFoundError, StopIteration) as exc:
            where = source.join(str(video))
            raise CurateError(f"{where}: changed during the run ({exc})") from None
    if part:
        yield np.stack(part)
