"""Check: decode every image fully and flag the ones that fail, with a reason.

An image is corrupt when it cannot be fully decoded: zero bytes, not an image (text,
HTML, random bytes, wrong magic), truncated, broken data, bad PNG chunk CRCs (which
Pillow does not verify for pixel data), or more pixels than the configured limit (a
decompression bomb, caught from the header before any pixel is decoded). A corrupt
image is data: it gets a reason and the run goes on.
"""

from __future__ import annotations

import json
import time

import numpy as np

from tasks.caching import cached_step, current_step_key
from tasks.describe import describe, metadata_frame
from tasks.formats import npy_bytes, to_parquet_bytes
from tasks.inputs import decode_then, model_input
from tasks.keys import artifact_key
from tasks.shards import CheckedShard, Shard, read_manifest
from tasks.storage import (
    ObjectInfo,
    Storage,
    open_storage,
    process_objects,
    unreadable_reason,
)

Inspection = tuple[dict[str, object], np.ndarray] | str  # (metadata, model input) or why not


def inspect_image(
    key: str, data: bytes, max_pixels: int, full_check: bool, input_size: int
) -> Inspection:
    """One object's metadata row and model input, or why it is corrupt. Never raises for
    anything in `data`; the decoded image is held in the process's pixel budget."""
    return decode_then(
        data,
        max_pixels,
        lambda decoded: (describe(key, data, decoded), model_input(decoded.image, input_size)),
        full_check,
        draft_size=input_size,
    )


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
        return inspect_image(key, data, max_pixels, full_check, input_size)

    rows: list[dict[str, object]] = []
    corrupt: dict[str, str] = {}
    inputs = np.empty((len(objects), input_size, input_size, 3), dtype=np.uint8)
    keys = [obj.key for obj in objects]
    for key, outcome in process_objects(input_storage, keys, inspect, num_workers):
        if isinstance(outcome, FileNotFoundError):
            corrupt[key] = "missing: deleted after listing"
        elif isinstance(outcome, Exception) and (reason := unreadable_reason(outcome)):
            corrupt[key] = reason  # made unreadable after listing (or root-squashed)
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
    """Check, describe and prepare model inputs for one shard, reading each object once.
    Decoding holds the process's pixel budget (`inputs.PIXELS_IN_FLIGHT`)."""
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
