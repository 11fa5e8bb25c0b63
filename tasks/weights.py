"""Which weights the embedding model gets, and their identity for cache keys and the
datapool: a local checkpoint (by content hash), timm's pretrained weights, or a seeded
random initialisation. No torch here: the CLI checks a checkpoint path at once.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from tasks.errors import CurateError


@dataclass(frozen=True)
class Weights:
    """Which weights a model gets, and an identity for cache keys."""

    source: str  # "checkpoint", "pretrained" or "random"
    identity: str  # checkpoint content hash, timm tag, or the seed

    def describe(self) -> str:
        if self.source == "random":
            return f"random initialisation (seed {self.identity}): no checkpoint given"
        if self.source == "pretrained":
            return "timm pretrained weights (downloaded from the hub)"
        return f"checkpoint (sha256 {self.identity[:12]})"


def resolve_weights(checkpoint: str | None, pretrained: bool, seed: int) -> Weights:
    if checkpoint:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise CurateError(f"embedding.checkpoint: {checkpoint} is not a file")
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return Weights("checkpoint", digest.hexdigest())
    if pretrained:
        return Weights("pretrained", "timm-default")
    return Weights("random", str(seed))
