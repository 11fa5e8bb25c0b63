"""Train: self-supervised training lowers the loss, checkpoints load where embeddings are
made, every epoch runs from one read of the inputs, bad settings name their key."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from flows.demo import digit_images
from tasks.config import Training
from tasks.errors import CurateError
from tasks.models import Embedder, build_model
from tasks.train import TrainingSet, checkpoint_bytes, initial_backbone, train
from tasks.weights import resolve_weights

CPU = torch.device("cpu")
MODEL = "test_resnet"  # timm's tiny ResNet: seconds per epoch on two cores at 32 px


@pytest.fixture(autouse=True, scope="module")
def two_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, threads))
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    """256 of scikit-learn's digits as 32 px RGB model inputs."""
    images, _ = digit_images(32)
    return np.stack([np.asarray(image) for image in images[:256]])


def _settings(**changes: object) -> Training:
    return Training(**{"max_epochs": 1, "batch_size": 32, "learning_rate": 0.4, **changes})


@pytest.mark.parametrize("method", ["simclr", "simsiam", "byol"])
def test_a_few_epochs_on_a_few_hundred_images_lower_the_loss(
    digits: np.ndarray, method: str
) -> None:
    epochs = []
    trained = train(
        TrainingSet.from_arrays([digits]),
        MODEL,
        _settings(method=method, max_epochs=3),
        0,
        CPU,
        epochs.append,
    )
    print(f"{method}: loss per epoch {trained.loss}")
    assert trained.loss[-1] < trained.loss[0]
    assert [p.epoch for p in epochs] == [1, 2, 3]
    assert all(s > 0 for s in trained.samples_per_second)
    summary = trained.summary()
    assert summary["method"] == method and len(summary["loss"]) == 3


def test_training_is_deterministic_for_a_seed(digits: np.ndarray) -> None:
    data = TrainingSet.from_arrays([digits[:128]])
    first = train(data, MODEL, _settings(), 3, CPU)
    second = train(data, MODEL, _settings(), 3, CPU)
    assert first.loss == second.loss
    for key, value in first.state_dict.items():
        torch.testing.assert_close(value, second.state_dict[key])


def test_checkpoint_gives_the_trained_embeddings_through_the_embedding_loader(
    digits: np.ndarray, tmp_path: Path
) -> None:
    trained = train(TrainingSet.from_arrays([digits[:128]]), MODEL, _settings(), 0, CPU)
    path = tmp_path / "test_resnet-simclr.safetensors"
    path.write_bytes(checkpoint_bytes(trained))

    loaded = build_model(MODEL, resolve_weights(str(path), False, 0), str(path), CPU)
    expected = build_model(MODEL, resolve_weights(None, False, 0), None, CPU)
    untrained = Embedder(expected, CPU).embed(digits[:16], 8)
    expected.load_state_dict(trained.state_dict)
    embeddings = Embedder(loaded, CPU).embed(digits[:16], 8)
    np.testing.assert_allclose(embeddings, Embedder(expected, CPU).embed(digits[:16], 8))
    assert not np.allclose(embeddings, untrained, atol=1e-3)

    resumed = initial_backbone(MODEL, str(path), seed=0)
    for key, value in resumed.state_dict().items():
        torch.testing.assert_close(value, trained.state_dict[key])


def test_resume_from_a_checkpoint_of_another_architecture_names_the_key(
    digits: np.ndarray, tmp_path: Path
) -> None:
    trained = train(TrainingSet.from_arrays([digits[:128]]), MODEL, _settings(), 0, CPU)
    path = tmp_path / "ckpt.safetensors"
    path.write_bytes(checkpoint_bytes(trained))
    with pytest.raises(CurateError, match=r"^training\.resume_from: .* into resnet10t"):
        initial_backbone("resnet10t", str(path), seed=0)
    with pytest.raises(CurateError, match=r"^training\.resume_from: .* is not a file"):
        initial_backbone(MODEL, str(tmp_path / "absent.safetensors"), seed=0)


def test_a_training_set_smaller_than_a_batch_names_training_batch_size(
    digits: np.ndarray,
) -> None:
    with pytest.raises(CurateError, match=r"^training\.batch_size=32 is larger .* \(20 samples\)"):
        train(TrainingSet.from_arrays([digits[:20]]), MODEL, _settings(), 0, CPU)


def test_a_nan_loss_stops_training_naming_the_learning_rate(digits: np.ndarray) -> None:
    with pytest.raises(CurateError, match=r"^training\.learning_rate=1e\+30: .* loss became nan"):
        train(
            TrainingSet.from_arrays([digits[:128]]),
            MODEL,
            _settings(learning_rate=1e30, max_epochs=2),
            0,
            CPU,
        )


def test_amp_on_a_cpu_names_training_precision(digits: np.ndarray) -> None:
    with pytest.raises(CurateError, match=r"^training\.precision=amp needs a CUDA device"):
        train(TrainingSet.from_arrays([digits[:128]]), MODEL, _settings(precision="amp"), 0, CPU)


class _Counted:
    """A part loader that counts how often the part is read."""

    def __init__(self, part: np.ndarray) -> None:
        self.part, self.reads = part, 0

    def __call__(self) -> np.ndarray:
        self.reads += 1
        return self.part


def _epochs(data: TrainingSet, epochs: int, batch_size: int = 16) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [np.concatenate(list(data.batches(batch_size, rng))) for _ in range(epochs)]


def test_every_epoch_runs_from_one_read_of_each_part_when_they_fit(digits: np.ndarray) -> None:
    loaders = [_Counted(digits[i : i + 64]) for i in range(0, 256, 64)]
    data = TrainingSet(loaders, cache_bytes=digits.nbytes)
    seen = _epochs(data, 3)
    assert [loader.reads for loader in loaders] == [1, 1, 1, 1]
    assert len(data) == 256 and all(len(epoch) == 256 for epoch in seen)
    # Shuffled anew each epoch.
    assert not np.array_equal(seen[0], seen[1])


def test_parts_beyond_the_cache_are_read_again_each_epoch_with_a_warning(
    digits: np.ndarray, caplog: pytest.LogCaptureFixture
) -> None:
    loaders = [_Counted(digits[i : i + 64]) for i in range(0, 256, 64)]
    with caplog.at_level(logging.WARNING, logger="curate.train"):
        data = TrainingSet(loaders, cache_bytes=2 * digits[:64].nbytes)
    assert "training.cache_bytes" in caplog.text and "read again every epoch" in caplog.text
    seen = _epochs(data, 3)
    assert sorted(loader.reads for loader in loaders) == [1, 1, 4, 4]
    # Every sample once per epoch (full batches of 16 divide 256), cached or not.
    for epoch in seen:
        assert sorted(map(bytes, epoch)) == sorted(map(bytes, digits))


def test_inputs_that_are_not_uint8_rgb_are_refused() -> None:
    with pytest.raises(ValueError, match="uint8 N x H x W x 3"):
        TrainingSet.from_arrays([np.zeros((4, 8, 8), np.uint8)])


def test_the_train_step_runs_once_per_data_and_settings_and_reads_inputs_once(
    prefect_server: None, tmp_path: Path
) -> None:
    from prefect import flow

    from flows.demo import encode
    from tasks.check import check_shard
    from tasks.shards import Shard, manifest_bytes
    from tasks.storage import open_storage
    from tasks.train import local_checkpoint, run_files, train_step

    images, _ = digit_images(32)
    folder = tmp_path / "input"
    folder.mkdir()
    for i, image in enumerate(images[:160]):
        (folder / f"{i:03d}.png").write_bytes(encode(image, "PNG"))
    out = tmp_path / "output"
    output = open_storage(str(out))
    objects = sorted(open_storage(str(folder)).list(), key=lambda o: o.key)
    output.write("manifests/0.jsonl", manifest_bytes(objects))
    output.write("dups.json", b'{"001.png": "000.png"}')
    shard = Shard(0, "digits", "manifests/0.jsonl", len(objects), sum(o.size for o in objects))
    settings = _settings(max_epochs=3)

    @flow
    def run(settings: Training) -> object:
        checked = check_shard(shard, str(folder), str(out), 2**30, True, 32, 1)
        return train_step(
            [checked],
            "dups.json",
            str(folder),
            str(out),
            MODEL,
            settings,
            None,
            32,
            0,
            "cpu",
            1,
            return_state=True,
        )

    first, second = run(settings), run(settings)
    assert first.name == "Completed" and second.name == "Cached"
    trained = second.result()
    assert trained == first.result() and trained.samples == 159  # the duplicate is left out
    # Three epochs read the check's model inputs once (plus the metadata and duplicates).
    inputs_bytes = 160 * 32 * 32 * 3
    assert inputs_bytes <= trained.bytes_read <= 1.1 * inputs_bytes
    summary = json.loads(output.read(trained.summary))
    assert summary["method"] == "simclr" and len(summary["loss"]) == 3
    path = Path(local_checkpoint(str(out), trained.checkpoint))
    assert path == out / trained.checkpoint
    files = run_files(output, trained)
    assert set(files) == {"checkpoints/test_resnet-simclr.safetensors", "data/training.json"}
    embedder = Embedder(
        build_model(MODEL, resolve_weights(str(path), False, 0), str(path), CPU), CPU
    )
    assert embedder.embed(digits_of(images[:4]), 4).shape == (4, embedder.dim)
    assert run(settings.model_copy(update={"max_epochs": 2})).name == "Completed"  # retrained


def digits_of(images: list) -> np.ndarray:
    return np.stack([np.asarray(image) for image in images])
