"""Train: a self-supervised embedding model learnt from the run's own samples.

Without internet there are no pretrained weights, and randomly initialised features
select no better than random. Training the backbone on the data itself (SimCLR, SimSiam
or BYOL, with lightly's losses and heads) gives an embedding worth selecting with.

The training set is the check's model inputs (each object decoded and downscaled once,
in its single read), minus duplicates. They are read once into a bounded in-memory cache
(`training.cache_bytes`); every epoch runs from it, so E epochs are not E downloads.
Parts that do not fit are read again each epoch, with a warning. Augmentations run on
batched tensors on the device (kornia), not per sample on the CPU. The result is a
backbone checkpoint (safetensors, backbone keys only) that `embedding.checkpoint` and
`training.resume_from` load.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from torch import nn

from tasks.caching import cached_step, current_step_key
from tasks.config import Training
from tasks.device import pick_device
from tasks.errors import CurateError
from tasks.formats import read_parquet_bytes
from tasks.inputs import shard_inputs
from tasks.keys import artifact_key
from tasks.models import build_model
from tasks.shards import CheckedShard
from tasks.stop import raise_if_stopped
from tasks.storage import Storage, open_storage
from tasks.weights import Weights, resolve_weights

log = logging.getLogger("curate.train")

METHODS = ("simclr", "simsiam", "byol")


# --- the training set -------------------------------------------------------------------

PartLoader = Callable[[], np.ndarray]


class TrainingSet:
    """uint8 N x H x W x 3 parts, each read once and kept in memory while they fit in
    `cache_bytes`; parts that do not fit are read again every epoch (with a warning)."""

    def __init__(self, loaders: Sequence[PartLoader], cache_bytes: int) -> None:
        self._loaders = list(loaders)
        self._cached: dict[int, np.ndarray] = {}
        self._sizes: list[int] = []
        self.shape: tuple[int, int] | None = None
        held = 0
        for index, load in enumerate(self._loaders):
            part = self._checked(load())
            self._sizes.append(len(part))
            if held + part.nbytes <= cache_bytes:
                self._cached[index] = part
                held += part.nbytes
        self.cached_bytes = held
        self.uncached_parts = len(self._loaders) - len(self._cached)
        if self.uncached_parts:
            log.warning(
                "training.cache_bytes=%d holds %d of %d samples; the other %d are read "
                "again every epoch (raise it to read each sample once)",
                cache_bytes,
                sum(len(p) for p in self._cached.values()),
                len(self),
                len(self) - sum(len(p) for p in self._cached.values()),
            )
        elif len(self._cached) > 1:  # one array: every epoch shuffles across all samples
            whole = np.concatenate([self._cached[i] for i in range(len(self._loaders))])
            self._cached = {0: whole}
            self._loaders = [lambda: whole]
            self._sizes = [len(whole)]

    @classmethod
    def from_arrays(cls, arrays: Sequence[np.ndarray], cache_bytes: int = 1 << 62) -> TrainingSet:
        return cls([lambda a=a: a for a in arrays], cache_bytes)  # type: ignore[misc]

    def _checked(self, part: np.ndarray) -> np.ndarray:
        if part.dtype != np.uint8 or part.ndim != 4 or part.shape[3] != 3:
            raise ValueError(f"training inputs must be uint8 N x H x W x 3, not {part.shape}")
        if self.shape is None:
            self.shape = (part.shape[1], part.shape[2])
        elif (part.shape[1], part.shape[2]) != self.shape:
            raise ValueError(f"training inputs of mixed sizes: {self.shape}, {part.shape[1:3]}")
        return part

    def __len__(self) -> int:
        return sum(self._sizes)

    def batches(self, batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
        """One epoch of full batches, shuffled (within and across parts when cached)."""
        pending: np.ndarray | None = None
        for index in rng.permutation(len(self._loaders)):
            part = self._cached.get(int(index))
            if part is None:
                part = self._checked(self._loaders[int(index)]())
            order = rng.permutation(len(part))
            if pending is not None and len(pending):
                part = np.concatenate([pending, part[order]])
                order = np.arange(len(part))
            full = len(part) // batch_size * batch_size
            for start in range(0, full, batch_size):
                yield part[order[start : start + batch_size]]
            pending = part[order[full:]]


# --- augmentations ----------------------------------------------------------------------


def augmentation(input_size: int, mean: Sequence[float], std: Sequence[float]) -> nn.Module:
    """SimCLR's view recipe on batched float tensors in [0, 1] (on the device): random
    resized crop, flip, colour jitter, grayscale, blur, then the model's normalisation."""
    import kornia.augmentation as K

    blur = max(3, input_size // 10 | 1)  # odd, about a tenth of the side as in SimCLR
    return nn.Sequential(
        K.RandomResizedCrop((input_size, input_size), scale=(0.2, 1.0)),
        K.RandomHorizontalFlip(),
        K.ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8),
        K.RandomGrayscale(p=0.2),
        K.RandomGaussianBlur((blur, blur), (0.1, 2.0), p=0.5),
        K.Normalize(mean=torch.tensor(mean), std=torch.tensor(std)),
    )


# --- methods: lightly's heads and losses on a timm backbone -----------------------------


class Method(nn.Module):
    """A backbone and a self-supervised objective over two views of a batch."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.dim = int(backbone.num_features)  # type: ignore[arg-type]

    def loss(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def after_step(self, progress: float) -> None:
        """Called after each optimiser step with the fraction of training done."""


class SimCLR(Method):
    def __init__(self, backbone: nn.Module) -> None:
        from lightly.loss import NTXentLoss
        from lightly.models.modules import SimCLRProjectionHead

        super().__init__(backbone)
        self.head = SimCLRProjectionHead(self.dim, 512, 128)
        self.criterion = NTXentLoss(temperature=0.2)

    def loss(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        z = self.head(self.backbone(torch.cat([x0, x1])))
        z0, z1 = z.chunk(2)
        return self.criterion(z0.float(), z1.float())


class SimSiam(Method):
    def __init__(self, backbone: nn.Module) -> None:
        from lightly.loss import NegativeCosineSimilarity
        from lightly.models.modules import SimSiamPredictionHead, SimSiamProjectionHead

        super().__init__(backbone)
        self.projection = SimSiamProjectionHead(self.dim, 512, 128)
        self.prediction = SimSiamPredictionHead(128, 64, 128)
        self.criterion = NegativeCosineSimilarity()

    def loss(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        z = self.projection(self.backbone(torch.cat([x0, x1])))
        p0, p1 = self.prediction(z).float().chunk(2)
        z0, z1 = z.detach().float().chunk(2)
        return 0.5 * (self.criterion(z0, p1) + self.criterion(z1, p0))


class BYOL(Method):
    def __init__(self, backbone: nn.Module) -> None:
        from lightly.loss import NegativeCosineSimilarity
        from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
        from lightly.models.utils import deactivate_requires_grad

        super().__init__(backbone)
        self.projection = BYOLProjectionHead(self.dim, 1024, 256)
        self.prediction = BYOLPredictionHead(256, 1024, 256)
        self.backbone_momentum = copy.deepcopy(backbone)
        self.projection_momentum = copy.deepcopy(self.projection)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_momentum)
        self.criterion = NegativeCosineSimilarity()

    def loss(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x0, x1])
        p0, p1 = self.prediction(self.projection(self.backbone(x))).float().chunk(2)
        with torch.no_grad():
            z = self.projection_momentum(self.backbone_momentum(x))
        z0, z1 = z.float().chunk(2)
        return 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0))

    def after_step(self, progress: float) -> None:
        from lightly.models.utils import update_momentum

        # The target network's momentum rises from 0.99 to 1 (BYOL's cosine schedule).
        momentum = 1 - 0.01 * (math.cos(math.pi * progress) + 1) / 2
        update_momentum(self.backbone, self.backbone_momentum, m=momentum)
        update_momentum(self.projection, self.projection_momentum, m=momentum)


_METHODS: dict[str, type[Method]] = {"simclr": SimCLR, "simsiam": SimSiam, "byol": BYOL}


# --- the loop ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Progress:
    epoch: int  # 1-based
    epochs: int
    loss: float
    samples_per_second: float


@dataclass
class Trained:
    """A trained backbone and how its training went."""

    model: str
    method: str
    state_dict: dict[str, torch.Tensor]
    loss: list[float] = field(default_factory=list)
    samples_per_second: list[float] = field(default_factory=list)
    samples: int = 0
    seconds: float = 0.0
    precision: str = "fp32"
    input_size: int = 0

    def summary(self) -> dict[str, Any]:
        """`data/training.json`: the loss curve and speed per epoch."""
        return {
            "model": self.model,
            "method": self.method,
            "samples": self.samples,
            "epochs": len(self.loss),
            "input_size": self.input_size,
            "precision": self.precision,
            "seconds": round(self.seconds, 3),
            "loss": [round(v, 6) for v in self.loss],
            "samples_per_second": [round(v, 2) for v in self.samples_per_second],
        }


def _amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32: AMP on CUDA by default, never on a CPU."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if device.type != "cuda":
        raise CurateError(f"training.precision=amp needs a CUDA device; {device} has none")
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def default_view_size(input_size: int, device: torch.device) -> int:
    """The model inputs' size on a GPU; on a CPU at most 32 px, where resnet18 trains about
    4x faster than at 64 px and its features still embed 64 px inputs well."""
    return input_size if device.type == "cuda" else min(input_size, 32)


def epochs(settings: Training, device: torch.device) -> int:
    """`training.max_epochs`, or its default: 5 on a CPU, 100 on a GPU."""
    return settings.max_epochs or (100 if device.type == "cuda" else 5)


def initial_backbone(model: str, resume_from: str | None, seed: int) -> nn.Module:
    """A seeded random backbone, or the weights of `resume_from` (a backbone checkpoint:
    one this step wrote, or any that `embedding.checkpoint` takes)."""
    cpu = torch.device("cpu")
    if not resume_from:
        return build_model(model, Weights("random", str(seed)), None, cpu)
    try:
        weights = resolve_weights(resume_from, False, seed)
        return build_model(model, weights, resume_from, cpu)
    except CurateError as exc:  # the loader names its own key
        raise CurateError(
            str(exc).replace("embedding.checkpoint", "training.resume_from")
        ) from None


def train(
    data: TrainingSet,
    model: str,
    settings: Training,
    seed: int,
    device: torch.device,
    progress: Callable[[Progress], None] | None = None,
) -> Trained:
    """Train `model`'s backbone on `data` with `settings.method`; returns its weights and
    per-epoch loss and samples/s. Deterministic for a seed on one device."""
    if len(data) < settings.batch_size:
        raise CurateError(
            f"training.batch_size={settings.batch_size} is larger than the training set "
            f"({len(data)} samples); lower it or add data"
        )
    assert data.shape is not None
    torch.manual_seed(seed)
    backbone = initial_backbone(model, settings.resume_from, seed)
    config = timm.data.resolve_data_config({}, model=backbone)
    size = settings.input_size or default_view_size(data.shape[0], device)
    augment = augmentation(size, config["mean"], config["std"]).to(device)
    method = _METHODS[settings.method](backbone).to(device).train()
    amp = _amp_dtype(settings.precision, device)
    if device.type == "cuda":
        method = method.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        [p for p in method.parameters() if p.requires_grad],
        lr=settings.learning_rate * settings.batch_size / 256,  # the linear scaling rule
        momentum=0.9,
        weight_decay=settings.weight_decay,
    )
    max_epochs = epochs(settings, device)
    steps_per_epoch = len(data) // settings.batch_size
    total_steps = steps_per_epoch * max_epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total_steps))
    )
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    rng = np.random.default_rng(seed)
    result = Trained(
        model=model,
        method=settings.method,
        state_dict={},
        samples=len(data),
        precision="fp32" if amp is None else f"amp ({str(amp).removeprefix('torch.')})",
        input_size=size,
    )
    started = time.perf_counter()
    step = 0
    for epoch in range(1, max_epochs + 1):
        epoch_started = time.perf_counter()
        total = torch.zeros((), device=device)
        seen = 0
        for batch in data.batches(settings.batch_size, rng):
            raise_if_stopped()
            images = torch.from_numpy(batch).to(device, non_blocking=True)
            images = images.permute(0, 3, 1, 2).float().div_(255)
            with torch.no_grad():
                x0, x1 = augment(images), augment(images)
            if device.type == "cuda":
                x0 = x0.contiguous(memory_format=torch.channels_last)
                x1 = x1.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss = method.loss(x0, x1)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            schedule.step()
            step += 1
            method.after_step(step / total_steps)
            total += loss.detach()
            seen += len(batch)
            if step % 10 == 0 or seen == steps_per_epoch * settings.batch_size:
                _stop_if_diverged(total, settings, epoch)
        seconds = time.perf_counter() - epoch_started
        result.loss.append(float(total) / steps_per_epoch)
        result.samples_per_second.append(seen / seconds)
        if progress is not None:
            progress(Progress(epoch, max_epochs, result.loss[-1], seen / seconds))
    result.seconds = time.perf_counter() - started
    backbone.eval()
    result.state_dict = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    return result


def _stop_if_diverged(total: torch.Tensor, settings: Training, epoch: int) -> None:
    if not torch.isfinite(total):
        raise CurateError(
            f"training.learning_rate={settings.learning_rate:g}: the {settings.method} loss "
            f"became {float(total)} in epoch {epoch}; lower it (e.g. "
            f"{settings.learning_rate / 10:g}) and run again"
        )


# --- checkpoints ------------------------------------------------------------------------


def checkpoint_bytes(trained: Trained) -> bytes:
    """safetensors with the backbone's keys only (what `embedding.checkpoint` loads), and
    what made it in the metadata."""
    from safetensors.torch import save

    metadata = {
        "format": "curate-backbone",
        "architecture": trained.model,
        "method": trained.method,
        "epochs": str(len(trained.loss)),
    }
    return save(trained.state_dict, metadata=metadata)


def checkpoint_name(model: str, method: str) -> str:
    """Where a run keeps its trained backbone, relative to the run directory."""
    return f"checkpoints/{model}-{method}.safetensors"


# --- the pipeline step ------------------------------------------------------------------


def training_loaders(
    checked: Sequence[CheckedShard],
    source: Storage,
    output: Storage,
    exclude: set[str],
    input_size: int,
    workers: int,
) -> list[PartLoader]:
    """One loader per checked shard: its model inputs less the `exclude`d samples
    (duplicates), read from the check's parts (or decoded again when they are gone)."""

    def loader(shard: CheckedShard) -> PartLoader:
        def load() -> np.ndarray:
            parts = list(shard_inputs(shard, source, output, input_size, workers))
            inputs = np.concatenate(parts) if parts else np.empty((0, input_size, input_size, 3))
            if exclude:
                names = read_parquet_bytes(output.read(shard.metadata))["filename"]
                inputs = inputs[~names.isin(exclude).to_numpy()]
            return inputs.astype(np.uint8, copy=False)

        return load

    return [loader(shard) for shard in checked if shard.valid]


@dataclass(frozen=True)
class TrainedModel:
    """What the train step returns: where its checkpoint and report data are."""

    checkpoint: str  # key in the output storage (safetensors, backbone keys only)
    summary: str  # key of the `data/training.json` content
    model: str
    method: str
    samples: int
    bytes_read: int
    seconds: float

    def weights(self, local_path: str) -> Weights:
        """The embed step's weights identity for this checkpoint (its file hash)."""
        return resolve_weights(local_path, False, 0)


@cached_step("train")
def train_step(
    checked: list[CheckedShard],
    duplicates_key: str | None,
    input_url: str,
    output_url: str,
    model: str,
    training: Training,
    resume_identity: str | None,
    input_size: int,
    seed: int,
    device: str,
    num_workers: int,
) -> TrainedModel:
    """Train the backbone on the run's non-corrupt, deduplicated samples (a cached task:
    the same shards, duplicates, settings and model take training from the cache).
    `resume_identity` is `training.resume_from`'s content hash (`resume_weights`)."""
    key = current_step_key()
    from prefect import get_run_logger
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    logger = get_run_logger()
    output, source = open_storage(output_url), open_storage(input_url)
    duplicates = set(json.loads(output.read(duplicates_key))) if duplicates_key else set()
    loaders = training_loaders(checked, source, output, duplicates, input_size, num_workers)
    data = TrainingSet(loaders, training.cache_bytes)
    artifact = create_progress_artifact(
        0.0, key="training-progress", description=f"{training.method} on {model}"
    )
    logger.info(
        "training %s with %s on %d samples for %d epochs",
        model,
        training.method,
        len(data),
        epochs(training, pick_device(device)),
    )

    def report(p: Progress) -> None:
        logger.info(
            "training epoch %d/%d: loss %.4f, %.1f samples/s",
            p.epoch,
            p.epochs,
            p.loss,
            p.samples_per_second,
        )
        if artifact is not None:
            update_progress_artifact(artifact, 100.0 * p.epoch / p.epochs)  # type: ignore[arg-type]

    try:
        trained = train(data, model, training, seed, pick_device(device), report)
    except torch.cuda.OutOfMemoryError:
        # Not halved and retried as embedding is: the batch size is a training
        # hyperparameter (the learning rate scales with it), the user's to change.
        raise CurateError(
            f"training: CUDA out of memory at training.batch_size={training.batch_size}; "
            "set a smaller training.batch_size or training.input_size"
        ) from None
    checkpoint_key = artifact_key("train", key, ".safetensors")
    summary_key = artifact_key("train", key, ".json")
    output.write(checkpoint_key, checkpoint_bytes(trained))
    output.write(summary_key, json.dumps(trained.summary(), indent=1).encode())
    return TrainedModel(
        checkpoint=checkpoint_key,
        summary=summary_key,
        model=model,
        method=training.method,
        samples=len(data),
        bytes_read=source.bytes_read + output.bytes_read,
        seconds=trained.seconds,
    )


def resume_weights(training: Training) -> str | None:
    """`training.resume_from`'s content identity, for the train step's cache key."""
    if not training.resume_from:
        return None
    path = Path(training.resume_from).expanduser()
    if not path.is_file():
        raise CurateError(f"training.resume_from: {training.resume_from} is not a file")
    return resolve_weights(str(path), False, 0).identity


def run_files(output: Storage, trained: TrainedModel) -> dict[str, bytes]:
    """What a run directory gets from training, by path relative to it: the checkpoint
    and `data/training.json`."""
    return {
        checkpoint_name(trained.model, trained.method): output.read(trained.checkpoint),
        "data/training.json": output.read(trained.summary),
    }


_downloaded: dict[tuple[str, str], str] = {}


def local_checkpoint(output_url: str, key: str) -> str:
    """A local path of a checkpoint in the output, for `embedding.checkpoint`: the file
    itself on a local output, else a copy in a temporary folder (once per process)."""
    from tasks.storage import LocalStorage

    storage = open_storage(output_url)
    if isinstance(storage, LocalStorage):
        return str(storage.root / key)
    if (output_url, key) not in _downloaded:
        import tempfile

        folder = Path(tempfile.mkdtemp(prefix="curate-checkpoint-"))
        path = folder / Path(key).name
        path.write_bytes(storage.read(key))
        _downloaded[(output_url, key)] = str(path)
    return _downloaded[(output_url, key)]
