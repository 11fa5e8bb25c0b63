"""Shards and what each step returns for one: small references to files in the output.

A shard is the unit of Prefect work: a few thousand objects whose identities are written
to a manifest in the output location. Step results name their artifacts by key and carry
counts and costs; they are what Prefect stores and passes on, never the data itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from tasks.storage import ObjectInfo, Storage


@dataclass(frozen=True)
class Shard:
    """A reference to a manifest of objects; `identity` changes when any object does."""

    index: int
    identity: str
    manifest: str  # key in the output storage
    count: int
    total_bytes: int
    kind: str = "images"  # or "video": one video whose frames are the samples
    first: str = ""  # its first and last keys, to name its task runs
    last: str = ""

    @property
    def title(self) -> str:
        """What a task run on it is called after its step: `shard 3 (a.jpg .. k.jpg)`."""
        if self.kind == "video":
            return f"video {self.index} ({self.first})"
        return f"shard {self.index} ({self.first} .. {self.last}, {self.count} images)"


def manifest_bytes(objects: list[ObjectInfo]) -> bytes:
    return "".join(
        json.dumps([o.key, o.size, o.version], separators=(",", ":")) + "\n" for o in objects
    ).encode()


def read_manifest(storage: Storage, key: str) -> list[ObjectInfo]:
    lines = storage.read_text(key).splitlines()
    return [ObjectInfo(*json.loads(line)) for line in lines if line]


@dataclass(frozen=True)
class CheckedShard:
    """What a check run wrote: metadata rows of valid samples (Parquet), reasons for the
    corrupt objects (JSON), and the samples' model inputs (.npy parts whose rows, in
    order, align with the Parquet's). Video shards also say what each video is."""

    shard_index: int
    metadata: str
    corrupt: str
    inputs: tuple[str, ...]
    full_check: bool
    valid: int
    corrupt_count: int
    bytes_read: int
    seconds: float
    retries: int = 0
    videos: str | None = None  # JSON {video key: frame counts, codec, fps, reason...}

    @property
    def summary(self) -> str:
        return (
            f"checked: {self.valid} valid samples, {self.corrupt_count} corrupt; "
            f"{self.bytes_read / 1e6:.1f} MB read in {self.seconds:.2f} s"
            + (f", {self.retries} retries" if self.retries else "")
        )


@dataclass(frozen=True)
class EmbeddedShard:
    shard_index: int
    embeddings: str  # .npy, rows aligned with the check's metadata rows
    count: int
    bytes_read: int
    seconds: float
    retries: int = 0
    batch_size: int = 0  # what the forward passes ran with (halved after an out-of-memory)

    @property
    def summary(self) -> str:
        rate = self.count / self.seconds if self.seconds else 0.0
        batch = f", batch {self.batch_size}" if self.batch_size else ""
        return f"embedded {self.count} samples in {self.seconds:.2f} s ({rate:.0f}/s{batch})"


@dataclass
class StepStats:
    """What a step cost in this run; cached shards cost nothing and are counted."""

    seconds: float = 0.0
    bytes_read: int = 0
    retries: int = 0
    shards: int = 0
    cached_shards: int = 0
