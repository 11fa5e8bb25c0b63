"""Check: decode every image fully and flag the ones that fail, with a reason.

An image is corrupt when it cannot be fully decoded: zero bytes, not an image (text,
HTML, random bytes, wrong magic), truncated, broken data, bad PNG chunk CRCs (which
Pillow does not verify for pixel data), or more pixels than the configured limit (a
decompression bomb, caught from the header before any pixel is decoded). A corrupt
image is data: it gets a reason and the run goes on.
"""

from __future__ import annotations

import io
import json
import struct
import time
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageSequence, UnidentifiedImageError

from tasks.caching import cached_step, current_step_key
from tasks.describe import describe, metadata_frame
from tasks.formats import npy_bytes, to_parquet_bytes
from tasks.keys import artifact_key
from tasks.shards import CheckedShard, Shard, read_manifest
from tasks.storage import ObjectInfo, Storage, open_storage, process_objects

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


Inspection = tuple[dict[str, object], np.ndarray] | str  # (metadata, model input) or why not


def check_images(
    input_storage: Storage,
    objects: list[ObjectInfo],
    max_pixels: int,
    full_check: bool,
    input_size: int,
    num_workers: int,
) -> tuple[list[dict[str, object]], dict[str, str], np.ndarray]:
    """Read each object once; return metadata rows, corrupt reasons and model inputs."""

    def inspect(key: str, data: bytes) -> Inspection:
        decoded = decode_image(data, max_pixels, full_check, draft_size=input_size)
        if isinstance(decoded, str):
            return decoded
        return describe(key, data, decoded), model_input(decoded.image, input_size)

    rows: list[dict[str, object]] = []
    corrupt: dict[str, str] = {}
    inputs = np.empty((len(objects), input_size, input_size, 3), dtype=np.uint8)
    keys = [obj.key for obj in objects]
    for key, outcome in process_objects(input_storage, keys, inspect, num_workers):
        if isinstance(outcome, FileNotFoundError):
            corrupt[key] = "missing: deleted after listing"
        elif isinstance(outcome, Exception):
            raise outcome  # unreachable storage or a bug: not the object's fault
        elif isinstance(outcome, str):
            corrupt[key] = outcome
        else:
            inputs[len(rows)] = outcome[1]
            rows.append(outcome[0])
    return rows, corrupt, inputs[: len(rows)]


@cached_step("check")
def check_shard(
    shard: Shard,
    input_url: str,
    output_url: str,
    max_pixels: int,
    full_check: bool,
    input_size: int,
    num_workers: int,
) -> CheckedShard:
    """Check, describe and prepare model inputs for one shard, reading each object once."""
    key = current_step_key()
    started = time.perf_counter()
    output, source = open_storage(output_url), open_storage(input_url)
    objects = read_manifest(output, shard.manifest)
    rows, corrupt, inputs = check_images(
        source, objects, max_pixels, full_check, input_size, num_workers
    )
    metadata_key = artifact_key("check", key, ".parquet")
    corrupt_key = artifact_key("check", key, ".corrupt.json")
    inputs_key = artifact_key("inputs", key, ".npy")
    output.write(inputs_key, npy_bytes(inputs))
    output.write(corrupt_key, json.dumps(corrupt, sort_keys=True).encode())
    output.write(metadata_key, to_parquet_bytes(metadata_frame(rows)))
    return CheckedShard(
        shard_index=shard.index,
        metadata=metadata_key,
        corrupt=corrupt_key,
        inputs=(inputs_key,),
        full_check=full_check,
        valid=len(rows),
        corrupt_count=len(corrupt),
        bytes_read=source.bytes_read,
        seconds=time.perf_counter() - started,
        retries=source.retries + output.retries,
    )
