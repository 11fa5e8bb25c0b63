"""Dedup: drop exact copies before selection.

Two samples are exact duplicates when their bytes are identical or their decoded pixels
are (the same picture saved twice as PNG with other compression settings). The first
by name is kept, so the result does not depend on listing order or sharding.
"""

from __future__ import annotations

import json

import pandas as pd

from tasks.caching import cached_step, current_step_key
from tasks.formats import read_parquet_bytes
from tasks.keys import artifact_key
from tasks.shards import CheckedShard
from tasks.storage import Storage, open_storage


def find_duplicates(metadata: pd.DataFrame, prior: pd.DataFrame | None = None) -> dict[str, str]:
    """Map each duplicate's name to the name of the copy that is kept. `prior` (filename
    and hashes of samples selected by earlier runs) come first, so a copy of one of them
    is a duplicate of it; they are never duplicates themselves."""
    duplicates: dict[str, str] = {}
    ordered = metadata.sort_values("filename", kind="stable")
    if prior is not None and len(prior):
        earlier = prior.sort_values("filename", kind="stable")
        ordered = pd.concat([earlier, ordered[earlier.columns]], ignore_index=True)
    for column in ("content_hash", "pixel_hash"):
        remaining = ordered[~ordered["filename"].isin(duplicates.keys())]
        kept = remaining.drop_duplicates(column, keep="first").set_index(column)["filename"]
        for name, digest in zip(remaining["filename"], remaining[column], strict=True):
            original = kept[digest]
            if original != name:
                duplicates[name] = original
    # A copy by bytes of a copy by pixels points at the one that is kept.
    for name, original in duplicates.items():
        while original in duplicates:
            original = duplicates[original]
        duplicates[name] = original
    if prior is not None:
        for name in prior["filename"]:
            duplicates.pop(name, None)
    return duplicates


def load_metadata(storage: Storage, shards: list[CheckedShard]) -> pd.DataFrame:
    frames = [read_parquet_bytes(storage.read(s.metadata)) for s in shards]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


@cached_step("dedup")
def dedup(
    shards: list[CheckedShard],
    output_url: str,
    include_frames: bool = True,
    prior_key: str | None = None,
) -> str:
    """Find exact duplicates across all shards, and of the datapool's selected images and
    frames (`prior_key`: their names and hashes, Parquet); returns the key of a JSON map
    {duplicate: kept}. Without `include_frames` video frames are never duplicates (a
    selected sequence keeps every frame, repeated ones too)."""
    key = current_step_key()
    output = open_storage(output_url)
    metadata = load_metadata(output, shards)
    if not include_frames and len(metadata):
        metadata = metadata[metadata["video"].isna()]
    prior = read_parquet_bytes(output.read(prior_key)) if prior_key else None
    duplicates = find_duplicates(metadata, prior)
    result_key = artifact_key("dedup", key, ".json")
    output.write(result_key, json.dumps(duplicates, sort_keys=True, indent=0).encode())
    return result_key
