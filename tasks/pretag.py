"""Pretag: class probabilities from a user's classifier, and the active-learning scores
from them, for every valid sample (`data/predictions.parquet`, see tasks/predictions.py).

The classifier is a timm model file with its class names. Names come from, first found:
`pretagging.class_names` (inline, or a file: one name a line or a JSON list); the
checkpoint itself (safetensors metadata `class_names`, a JSON list; or `class_names` in a
.pth dict next to `state_dict`); a sidecar JSON beside it (`model.safetensors` ->
`model.json`, `{"class_names": [...], "architecture": "..."}`). The architecture comes
from `pretagging.model`, else the checkpoint's or sidecar's `architecture`, else
`embedding.model`. The model sees the check's model inputs, normalised as timm says.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch

from tasks.caching import cached_step, current_step_key
from tasks.config import Pretagging
from tasks.device import pick_device
from tasks.errors import CurateError
from tasks.formats import read_parquet_bytes
from tasks.inputs import shard_inputs
from tasks.keys import artifact_key
from tasks.models import check_model_name, halving_on_oom
from tasks.predictions import predictions_bytes, predictions_frame, read_predictions
from tasks.shards import CheckedShard
from tasks.stop import raise_if_stopped
from tasks.storage import Storage, open_storage
from tasks.weights import resolve_weights

_KEY = "pretagging.checkpoint"


@dataclass
class ClassifierFile:
    """What a classifier checkpoint holds: weights, and what it says about itself."""

    state_dict: dict[str, torch.Tensor]
    class_names: list[str] | None
    architecture: str | None


def _names(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise CurateError(f"{where}: class names must be a non-empty list of strings")
    if len(set(value)) != len(value):
        raise CurateError(f"{where}: class names must be unique")
    return value


def read_classifier(checkpoint: str) -> ClassifierFile:
    """Weights, class names and architecture from a checkpoint (and its sidecar JSON)."""
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise CurateError(f"{_KEY}: {checkpoint} is not a file")
    meta: dict[str, Any] = {}
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
            if "class_names" in meta:
                meta["class_names"] = json.loads(meta["class_names"])
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
            state = loaded
            if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
                state = loaded["state_dict"]
                meta = {k: loaded[k] for k in ("class_names", "architecture") if k in loaded}
            if not isinstance(state, dict):
                raise ValueError(f"holds a {type(state).__name__}, not a state dict")
            state = {k.removeprefix("module."): v for k, v in state.items()}
        if not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError("not a state dict of tensors")
    except Exception as exc:  # unpickling, safetensors and JSON errors alike
        message = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc)
        raise CurateError(f"{_KEY}: cannot read {checkpoint} ({message})") from None
    sidecar = path.with_suffix(".json")
    if sidecar.is_file():
        try:
            extra = json.loads(sidecar.read_text())
        except (OSError, ValueError) as exc:
            raise CurateError(f"{_KEY}: sidecar {sidecar} is not valid JSON ({exc})") from None
        meta = {**extra, **meta}
    names = meta.get("class_names")
    return ClassifierFile(
        state_dict=state,
        class_names=_names(names, f"{_KEY}: {checkpoint}") if names is not None else None,
        architecture=meta.get("architecture"),
    )


def configured_class_names(value: list[str] | str | None) -> list[str] | None:
    """`pretagging.class_names`: inline, or a file of one name a line or a JSON list."""
    if value is None or isinstance(value, list):
        return None if value is None else _names(value, "pretagging.class_names")
    path = Path(value).expanduser()
    try:
        text = path.read_text()
    except OSError as exc:
        raise CurateError(f"pretagging.class_names: cannot read {value} ({exc.strerror})") from None
    if text.lstrip().startswith("["):
        try:
            return _names(json.loads(text), f"pretagging.class_names: {value}")
        except ValueError:
            raise CurateError(f"pretagging.class_names: {value} is not a JSON list") from None
    return _names([line.strip() for line in text.splitlines() if line.strip()], str(value))


class Classifier:
    """A timm classifier and its class names; `predict` takes uint8 HxWx3 batches."""

    def __init__(self, model: torch.nn.Module, class_names: list[str], device: torch.device):
        config = timm.data.resolve_data_config({}, model=model)
        self.model = model.eval().to(device)
        self.class_names = class_names
        self.device = device
        self.mean = torch.tensor(config["mean"], device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(config["std"], device=device).view(1, 3, 1, 1) * 255

    @torch.inference_mode()
    def predict(self, images: np.ndarray, batch_size: int) -> np.ndarray:
        out = np.empty((len(images), len(self.class_names)), dtype=np.float32)
        use_amp = self.device.type == "cuda"

        def run(start: int, stop: int) -> None:
            raise_if_stopped()
            batch = torch.from_numpy(images[start:stop]).to(self.device)
            x = (batch.permute(0, 3, 1, 2).float() - self.mean) / self.std
            with torch.autocast(self.device.type, enabled=use_amp):
                logits = self.model(x).float()
            out[start:stop] = logits.softmax(dim=1).cpu().numpy()

        halving_on_oom(len(images), batch_size, run, "pretagging")
        return out


def load_classifier(settings: Pretagging, default_model: str, device: torch.device) -> Classifier:
    """The configured classifier, its head checked against its class names."""
    assert settings.checkpoint is not None
    found = read_classifier(settings.checkpoint)
    names = configured_class_names(settings.class_names) or found.class_names
    if names is None:
        raise CurateError(
            f"{_KEY}: {settings.checkpoint} has no class names (no `class_names` in it or "
            "in a sidecar .json); set pretagging.class_names"
        )
    architecture = settings.model or found.architecture or default_model
    try:
        check_model_name(architecture)
    except CurateError as exc:  # it names embedding.model
        raise CurateError(str(exc).replace("embedding.model", "pretagging.model")) from None
    model = timm.create_model(architecture, pretrained=False, num_classes=len(names))
    pretrained_cfg: dict[str, Any] = getattr(model, "pretrained_cfg", None) or {}
    head = str(pretrained_cfg.get("classifier", "fc"))
    outputs = found.state_dict.get(f"{head}.weight")
    if outputs is not None and outputs.ndim >= 1 and outputs.shape[0] != len(names):
        raise CurateError(
            f"{_KEY}: {settings.checkpoint} has a head of {outputs.shape[0]} classes but "
            f"{len(names)} class names are given"
        )
    try:
        model.load_state_dict(found.state_dict, strict=True)
    except RuntimeError as exc:
        message = " ".join(str(exc).split())[:160]
        raise CurateError(
            f"{_KEY}: {settings.checkpoint} is not a {architecture} classifier ({message})"
        ) from None
    return Classifier(model, names, device)


def pretag_identity(settings: Pretagging) -> str:
    """The checkpoint's content hash (plus its sidecar's), for the step's cache key."""
    assert settings.checkpoint is not None
    identity = resolve_weights(settings.checkpoint, False, 0).identity
    sidecar = Path(settings.checkpoint).expanduser().with_suffix(".json")
    if sidecar.is_file():
        identity += "+" + resolve_weights(str(sidecar), False, 0).identity
    return identity


_classifiers: dict[tuple[str, str, str], Classifier] = {}


@cached_step("pretag")
def pretag_shard(
    checked: CheckedShard,
    input_url: str,
    output_url: str,
    pretagging: Pretagging,
    checkpoint_identity: str,
    default_model: str,
    input_size: int,
    device: str,
    num_workers: int,
) -> str:
    """Predict class probabilities for one checked shard's valid samples; returns the key
    of its predictions (Parquet, rows in the check's metadata order). Run it before the
    shard's embedding, which deletes the model inputs it reads."""
    key = current_step_key()
    output, source = open_storage(output_url), open_storage(input_url)
    cache_key = (checkpoint_identity, pretagging.model_dump_json(), device)
    if cache_key not in _classifiers:
        _classifiers[cache_key] = load_classifier(pretagging, default_model, pick_device(device))
    classifier = _classifiers[cache_key]
    blocks = [
        classifier.predict(inputs, pretagging.batch_size)
        for inputs in shard_inputs(checked, source, output, input_size, num_workers)
    ]
    classes = len(classifier.class_names)
    probabilities = np.concatenate(blocks) if blocks else np.empty((0, classes), np.float32)
    names = read_parquet_bytes(output.read(checked.metadata))["filename"].tolist()
    frame = predictions_frame(names, probabilities, classifier.class_names)
    result = artifact_key("pretag", key, ".parquet")
    output.write(result, predictions_bytes(frame, classifier.class_names))
    return result


def merge_predictions(output: Storage, keys: list[str]) -> bytes:
    """One predictions file (`data/predictions.parquet`) from the shards' predictions."""
    import pandas as pd

    frames, names = [], None
    for key in keys:
        frame, names = read_predictions(output.read(key))
        frames.append(frame)
    if names is None:
        raise ValueError("no predictions to merge")
    return predictions_bytes(pd.concat(frames, ignore_index=True), names)
