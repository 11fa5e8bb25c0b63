"""Embed: one L2-normalised float32 vector per valid image or video frame, from timm.

The model's inputs were made by the check in its single read of each object (squashed to
input_size x input_size); when they are gone (deleted after use to keep the disk bounded,
or a cached check from an earlier run) the images are read and decoded again. Weights
come from a local checkpoint, timm's hub (`pretrained`, needs internet) or a seeded
random initialisation, and the report says which.
"""

from __future__ import annotations

import time

import numpy as np

from tasks.caching import cached_step, current_step_key
from tasks.device import pick_device
from tasks.errors import CurateError
from tasks.formats import npy_bytes
from tasks.inputs import shard_inputs
from tasks.keys import artifact_key
from tasks.models import get_embedder
from tasks.shards import CheckedShard, EmbeddedShard
from tasks.storage import open_storage
from tasks.weights import Weights


@cached_step("embed")
def embed_shard(
    checked: CheckedShard,
    input_url: str,
    output_url: str,
    model: str,
    weights: Weights,
    checkpoint: str | None,
    input_size: int,
    device: str,
    batch_size: int,
    num_workers: int,
) -> EmbeddedShard:
    """Embed the valid images of one checked shard."""
    key = current_step_key()
    started = time.perf_counter()
    output, source = open_storage(output_url), open_storage(input_url)
    embedder = get_embedder(model, weights, checkpoint, pick_device(device))
    blocks = [
        embedder.embed(inputs, batch_size)
        for inputs in shard_inputs(checked, source, output, input_size, num_workers)
    ]
    embeddings = np.concatenate(blocks) if blocks else np.empty((0, embedder.dim), np.float32)
    if len(embeddings) != checked.valid:
        raise CurateError(
            f"shard {checked.shard_index}: {checked.valid} samples checked but "
            f"{len(embeddings)} model inputs found; the input changed during the run"
        )
    embeddings_key = artifact_key("embed", key, ".npy")
    output.write(embeddings_key, npy_bytes(embeddings))
    for part in checked.inputs:
        output.delete(part)  # keep the disk cache bounded to shards in flight
    return EmbeddedShard(
        shard_index=checked.shard_index,
        embeddings=embeddings_key,
        count=len(embeddings),
        bytes_read=source.bytes_read,
        seconds=time.perf_counter() - started,
        retries=source.retries + output.retries,
        batch_size=embedder.batch_size_used(batch_size),
    )
