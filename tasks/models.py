"""The embedding backbone: timm backbones without classifier, their weights (hub,
checkpoint or seeded random), and a per-process cache of embedders.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch

from tasks.errors import CurateError
from tasks.stop import raise_if_stopped

# check_model_name lives with the weights (no torch there: the CLI checks at once).
from tasks.weights import Weights, check_model_name

# Classifier weights a backbone checkpoint may carry; the embedding model has no head.
_HEAD_PREFIXES = ("fc.", "head.", "classifier.", "head.fc.", "last_linear.")


def _load_state_dict(path: Path) -> dict[str, Any]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise ValueError(f"holds a {type(state).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_checkpoint(model: torch.nn.Module, name: str, checkpoint: str) -> None:
    """Load backbone weights strictly (a classifier head may be present and is dropped)."""
    try:
        state = _load_state_dict(Path(checkpoint).expanduser())
        if not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError("not a state dict of tensors")
        state = {k: v for k, v in state.items() if not k.startswith(_HEAD_PREFIXES)}
        result = model.load_state_dict(state, strict=False)
    except Exception as exc:  # unpickling, safetensors and shape errors alike
        message = str(exc).strip().splitlines()[0][:160]
        raise CurateError(
            f"embedding.checkpoint: cannot load {checkpoint} into {name} ({message})"
        ) from None
    problems = result.missing_keys or result.unexpected_keys
    if problems:
        raise CurateError(
            f"embedding.checkpoint: {checkpoint} does not fit {name}: "
            f"{len(result.missing_keys)} weights missing, {len(result.unexpected_keys)} "
            f"unexpected (e.g. {problems[0]})"
        )


def build_model(
    name: str, weights: Weights, checkpoint: str | None, device: torch.device
) -> torch.nn.Module:
    """A timm backbone without classifier, in eval mode on `device`."""
    check_model_name(name)
    if weights.source == "random":
        torch.manual_seed(int(weights.identity))
    try:
        model = timm.create_model(name, pretrained=weights.source == "pretrained", num_classes=0)
    except Exception as exc:  # hub or network errors from timm/huggingface_hub
        raise CurateError(
            f"embedding.pretrained: cannot get weights for '{name}' ({type(exc).__name__}); "
            "offline, pass embedding.checkpoint=PATH instead"
        ) from None
    if weights.source == "checkpoint":
        assert checkpoint is not None
        _load_checkpoint(model, name, checkpoint)
    model.eval().to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def halving_on_oom(count: int, batch_size: int, run: Callable[[int, int], None], what: str) -> int:
    """`run(start, stop)` over `[0, count)` in batches of `batch_size`. A CUDA
    out-of-memory halves the batch and runs it again (down to 1) instead of failing
    the run: a GPU shared with other work, or a larger model than the batch was sized
    for, still finishes. Returns the batch size that fit."""
    start = 0
    while start < count:
        stop = min(count, start + batch_size)
        try:
            run(start, stop)
        except torch.cuda.OutOfMemoryError:
            if stop - start == 1:
                raise CurateError(
                    f"{what}: CUDA out of memory with a batch of 1; use a smaller model or "
                    "input size, another GPU, or embedding.device=cpu"
                ) from None
            batch_size = (stop - start) // 2
            torch.cuda.empty_cache()
            continue
        start = stop
    return batch_size


class Embedder:
    """A model plus its input normalisation; `embed` takes uint8 HxWx3 batches."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        config = timm.data.resolve_data_config({}, model=model)
        self.model = model
        self.device = device
        self.mean = torch.tensor(config["mean"], device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(config["std"], device=device).view(1, 3, 1, 1) * 255
        self.dim = int(model.num_features)  # type: ignore[arg-type]
        # One forward at a time per process: concurrent shards share the model and the
        # cores/GPU instead of fighting over them.
        self.lock = threading.Lock()
        # The largest batch known to fit after a CUDA out-of-memory (None: none seen):
        # later shards start there instead of running out of memory again.
        self.batch_size: int | None = None

    @torch.inference_mode()
    def embed(self, images: np.ndarray, batch_size: int) -> np.ndarray:
        out = np.empty((len(images), self.dim), dtype=np.float32)
        use_amp = self.device.type == "cuda"

        def run(start: int, stop: int) -> None:
            raise_if_stopped()
            batch = torch.from_numpy(images[start:stop]).to(self.device, non_blocking=True)
            x = (batch.permute(0, 3, 1, 2).float() - self.mean) / self.std
            if use_amp:
                x = x.contiguous(memory_format=torch.channels_last)
            with self.lock, torch.autocast(self.device.type, enabled=use_amp):
                features = self.model(x).float()
            features = torch.nn.functional.normalize(features, dim=1)
            out[start:stop] = features.cpu().numpy()

        size = min(batch_size, self.batch_size or batch_size)
        fitted = halving_on_oom(len(images), size, run, "embedding")
        if fitted < size:
            self.batch_size = fitted
        return out

    def batch_size_used(self, batch_size: int) -> int:
        """The batch size embeddings run with: the configured one, or what fitted."""
        return min(batch_size, self.batch_size or batch_size)


_embedders: dict[tuple[str, str, str], Embedder] = {}
_embedders_lock = threading.Lock()


def get_embedder(
    name: str, weights: Weights, checkpoint: str | None, device: torch.device
) -> Embedder:
    """One model per process and configuration, shared by every shard."""
    key = (name, weights.identity, str(device))
    with _embedders_lock:
        if key not in _embedders:
            _embedders[key] = Embedder(build_model(name, weights, checkpoint, device), device)
        return _embedders[key]
