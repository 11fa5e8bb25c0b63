"""Cache keys: a step's identity from the content it reads and the settings it uses.

A step's key is the identity of the objects it reads (key, size, version), its own
settings and `PIPELINE_VERSION`; it also names the step's artifacts in the output
location, so the two never disagree. No Prefect here: discovery and the datapool use it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from pydantic import BaseModel

PIPELINE_VERSION = "3"  # 2: frames in metadata (video columns), input parts, select output;
# 3: frames' pixel hashes take CRC-32C

CACHE_PREFIX = "cache"


# Fields of step results that measure a run rather than name content: an upstream shard
# recomputed to the same artifacts must not invalidate what was built on it.
# A shard's position in a run's listing is not content either: a new object listed
# earlier must not invalidate every shard after it.
MEASUREMENTS = frozenset({"seconds", "bytes_read", "retries", "index", "shard_index"})


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = dataclasses.asdict(value)
        return {k: v for k, v in fields.items() if k not in MEASUREMENTS}
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"cannot hash {type(value).__name__} into a cache key")


def content_key(step: str, **parts: Any) -> str:
    """A stable hex digest of a step name, the pipeline version and JSON-able parts."""
    payload = json.dumps(
        {"step": step, "version": PIPELINE_VERSION, **parts}, sort_keys=True, default=_plain
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def artifact_key(step: str, key: str, suffix: str) -> str:
    """Where a step keeps the artifact for a cache key, relative to the output root."""
    return f"{CACHE_PREFIX}/{step}/{key}{suffix}"


# Parameters that change how fast a step runs, not what it computes.
NOT_IDENTITY = frozenset({"num_workers", "batch_size", "chunk"})


def step_key(step: str, parameters: dict[str, Any]) -> str:
    """The cache key of a step run: also names its artifacts."""
    return content_key(step, **{k: v for k, v in parameters.items() if k not in NOT_IDENTITY})
