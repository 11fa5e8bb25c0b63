"""Which weights the embedding model gets, and their identity for cache keys and the
datapool: a local checkpoint (by content hash), timm's pretrained weights, or a seeded
random initialisation. No torch here: the CLI checks a checkpoint path at once.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

from tasks.errors import ConfigError, CurateError


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


@functools.cache
def timm_model_names() -> frozenset[str]:
    """timm's registered model names, read from its source instead of imported: importing
    timm imports torch (seconds), and a typo in `embedding.model` should cost none.
    Every model is a `@register_model` function in `timm/models/` (tests compare this
    with `timm.list_models()`)."""
    spec = importlib.util.find_spec("timm")
    if spec is None or spec.origin is None:
        return frozenset()
    pattern = re.compile(r"^@register_model\s*\ndef\s+(\w+)\s*\(", re.MULTILINE)
    names: set[str] = set()
    for source in (Path(spec.origin).parent / "models").glob("*.py"):
        names.update(pattern.findall(source.read_text(encoding="utf-8")))
    return frozenset(names)


def check_model_name(name: str, key: str = "embedding.model") -> None:
    """A ConfigError naming `key` unless `name` (optionally with a `.tag` of pretrained
    weights, `resnet50.a1_in1k`) is a timm model."""
    architecture = name.split(".")[0]
    if architecture not in timm_model_names():
        close = difflib.get_close_matches(architecture, sorted(timm_model_names()), n=3)
        hint = f"; similar: {', '.join(close)}" if close else ""
        raise ConfigError(f"{key}: unknown timm model '{name}'{hint}")
