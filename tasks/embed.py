"""Embed: one L2-normalised float32 vector per valid image or video frame, from timm.

The model's inputs were made by the check in its single read of each object (squashed to
input_size x input_size); when they are gone (deleted after use to keep the disk bounded,
or a cached check from an earlier run) the images are read and decoded again. Weights
come from a local checkpoint, timm's hub (`pretrained`, needs internet) or a seeded
random initialisation, and the report says which.
"""

from __future__ import annotations

import difflib
import math
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch

from tasks.caching import cached_step, current_step_key
from tasks.check import decode_image, model_input
from tasks.device import pick_device
from tasks.errors import ConfigError, CurateError
from tasks.formats import npy_bytes, read_npy, read_parquet_bytes
from tasks.keys import artifact_key
from tasks.shards import CheckedShard, EmbeddedShard
from tasks.storage import Storage, open_storage, process_objects
from tasks.video import VideoError, decode_frames
from tasks.weights import Weights

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


def check_model_name(name: str) -> None:
    if not timm.is_model(name.split(".")[0]):
        close = difflib.get_close_matches(name.split(".")[0], timm.list_models(), n=3)
        hint = f"; similar: {', '.join(close)}" if close else ""
        raise ConfigError(f"embedding.model: unknown timm model '{name}'{hint}")


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

    @torch.inference_mode()
    def embed(self, images: np.ndarray, batch_size: int) -> np.ndarray:
        out = np.empty((len(images), self.dim), dtype=np.float32)
        use_amp = self.device.type == "cuda"
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(images[start : start + batch_size]).to(
                self.device, non_blocking=True
            )
            x = (batch.permute(0, 3, 1, 2).float() - self.mean) / self.std
            if use_amp:
                x = x.contiguous(memory_format=torch.channels_last)
            with self.lock, torch.autocast(self.device.type, enabled=use_amp):
                features = self.model(x).float()
            features = torch.nn.functional.normalize(features, dim=1)
            out[start : start + len(batch)] = features.cpu().numpy()
        return out


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


def load_model_inputs(
    source: Storage, names: list[str], draft_size: int | None, input_size: int, workers: int
) -> np.ndarray:
    """Read and decode images that passed the check, for the model only."""

    def load(name: str, data: bytes) -> np.ndarray:
        decoded = decode_image(data, 2**62, full_check=False, draft_size=draft_size)
        if isinstance(decoded, str):  # it passed the check earlier in this run
            raise CurateError(f"{source.join(name)}: changed during the run ({decoded})")
        return model_input(decoded.image, input_size)

    inputs = np.empty((len(names), input_size, input_size, 3), dtype=np.uint8)
    for i, (name, pixels) in enumerate(process_objects(source, names, load, workers)):
        if isinstance(pixels, FileNotFoundError):
            raise CurateError(f"{source.join(name)}: deleted during the run")
        if isinstance(pixels, Exception):
            raise pixels
        inputs[i] = pixels
    return inputs


def shard_inputs(
    checked: CheckedShard, source: Storage, output: Storage, input_size: int, workers: int
) -> Iterator[np.ndarray]:
    """The shard's model inputs, one part at a time: the check's parts while they all
    exist, else made again from the input (a cached check from an earlier run)."""
    if all(output.exists(part) for part in checked.inputs):
        for part in checked.inputs:
            yield read_npy(output, part)
        return
    metadata = read_parquet_bytes(output.read(checked.metadata))
    if checked.videos is not None:
        yield from frame_inputs(source, metadata, input_size)
        return
    # The same pixels as the check made: JPEGs at reduced size only when it did.
    draft_size = None if checked.full_check else input_size
    names = metadata["filename"].tolist()
    yield load_model_inputs(source, names, draft_size, input_size, workers)


# Frames per part when a video's frames are decoded again for the model.
FRAME_PART = 1024


def frame_inputs(source: Storage, metadata: Any, input_size: int) -> Iterator[np.ndarray]:
    """Decode the frames listed in `metadata` again, downscaled, in its row order."""
    part: list[np.ndarray] = []
    for video, rows in metadata.groupby("video", sort=False):
        wanted = [int(i) for i in rows["frame_index"]]
        # The sampled frames are multiples of every_nth_frame: only frames whose index is a
        # multiple of their gcd are converted (the others are decoded and dropped).
        step = math.gcd(*wanted)
        try:
            with (
                source.open(str(video)) as stream,
                closing(decode_frames(stream, input_size, every_nth=max(step, 1))) as frames,
            ):
                for index in wanted:
                    # Stop at the last wanted frame: a kept corrupt video fails just after.
                    frame = next(f for f in frames if f.index == index)
                    part.append(frame.rgb)
                    if len(part) == FRAME_PART:
                        yield np.stack(part)
                        part = []
        except (VideoError, FileNotFoundError, StopIteration) as exc:
            where = source.join(str(video))
            raise CurateError(f"{where}: changed during the run ({exc})") from None
    if part:
        yield np.stack(part)


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
    )
