"""Embed: seeded random or checkpoint weights, unit-norm float32 rows, errors naming the key."""

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tasks.errors import CurateError
from tasks.models import Embedder, build_model
from tasks.weights import Weights, resolve_weights

CPU = torch.device("cpu")
StateDict = dict[str, torch.Tensor]


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny batches run faster (and steadier on a busy 2-core machine) on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _images(n: int = 4) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def _embed(model: torch.nn.Module) -> np.ndarray:
    return Embedder(model, CPU).embed(_images(), batch_size=3)


def _random_model(seed: int, name: str = "resnet18") -> torch.nn.Module:
    return build_model(name, Weights("random", str(seed)), None, CPU)


def _from_checkpoint(path: Path, name: str = "resnet18") -> torch.nn.Module:
    return build_model(name, resolve_weights(str(path), False, 0), str(path), CPU)


@pytest.fixture(scope="module")
def source() -> tuple[StateDict, np.ndarray]:
    """A resnet18 that differs from the default (seed 0) initialisation, and its output."""
    model = _random_model(7)
    return {k: v.clone() for k, v in model.state_dict().items()}, _embed(model)


def test_embeddings_are_unit_norm_float32_rows_and_deterministic_for_a_seed() -> None:
    first, second = _embed(_random_model(0)), _embed(_random_model(0))
    assert first.dtype == np.float32
    assert first.shape == (4, 512)
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(first, second)


def test_batches_do_not_change_the_embeddings() -> None:
    model = _random_model(0)
    one = Embedder(model, CPU).embed(_images(), batch_size=4)
    np.testing.assert_allclose(one, Embedder(model, CPU).embed(_images(), batch_size=1), atol=1e-5)


def _save(path: Path, state: StateDict, wrap: str | None, prefix: str) -> None:
    state = {prefix + k: v for k, v in state.items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({wrap: state} if wrap else state, path)


@pytest.mark.parametrize(
    ("name", "wrap", "prefix"),
    [
        ("weights.safetensors", None, ""),
        ("weights.pth", None, ""),
        ("wrapped.pth", "state_dict", "module."),
        ("model.pth", "model", ""),
    ],
)
def test_checkpoint_gives_the_embeddings_of_the_model_it_came_from(
    tmp_path: Path, source: tuple[StateDict, np.ndarray], name: str, wrap: str | None, prefix: str
) -> None:
    state, expected = source
    path = tmp_path / name
    _save(path, state, wrap, prefix)
    embeddings = _embed(_from_checkpoint(path))
    np.testing.assert_allclose(embeddings, expected, atol=1e-5)
    assert not np.allclose(embeddings, _embed(_random_model(0)), atol=1e-3)


def test_classifier_head_in_a_checkpoint_is_ignored(
    tmp_path: Path, source: tuple[StateDict, np.ndarray]
) -> None:
    state, expected = source
    head = {"fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}
    torch.save({**state, **head}, tmp_path / "classifier.pth")
    np.testing.assert_allclose(
        _embed(_from_checkpoint(tmp_path / "classifier.pth")), expected, atol=1e-5
    )


def test_checkpoint_weights_are_identified_by_the_file_hash(tmp_path: Path) -> None:
    path = tmp_path / "w.pth"
    path.write_bytes(b"some bytes")
    weights = resolve_weights(str(path), pretrained=False, seed=3)
    assert weights == Weights("checkpoint", hashlib.sha256(b"some bytes").hexdigest())
    assert weights.identity[:12] in weights.describe()


def test_checkpoint_missing_backbone_weights_is_an_error(
    tmp_path: Path, source: tuple[StateDict, np.ndarray]
) -> None:
    torch.save({"unrelated": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(CurateError, match=r"embedding\.checkpoint: .* does not fit resnet18"):
        _from_checkpoint(tmp_path / "other.pth")
    torch.save(source[0], tmp_path / "resnet18.pth")
    with pytest.raises(CurateError, match=r"embedding\.checkpoint: .* does not fit resnet34"):
        _from_checkpoint(tmp_path / "resnet18.pth", "resnet34")


def _resnet34_state() -> StateDict:
    return _random_model(1, "resnet34").state_dict()


def _mismatched_shape_state() -> StateDict:
    return {**_random_model(1).state_dict(), "conv1.weight": torch.zeros(64, 3, 3, 3)}


def _not_a_state_dict() -> torch.Tensor:
    return torch.zeros(3)


@pytest.mark.parametrize("make", [_resnet34_state, _mismatched_shape_state, _not_a_state_dict])
def test_checkpoint_of_another_architecture_is_an_error(
    tmp_path: Path, make: Callable[[], object]
) -> None:
    torch.save(make(), tmp_path / "other.pth")
    with pytest.raises(CurateError, match=r"embedding\.checkpoint"):
        _from_checkpoint(tmp_path / "other.pth")


def test_unknown_model_name_is_an_error_naming_embedding_model() -> None:
    with pytest.raises(CurateError, match=r"embedding\.model: unknown timm model 'resnot18'"):
        _random_model(0, "resnot18")


def test_missing_checkpoint_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(CurateError, match=r"embedding\.checkpoint: .* is not a file"):
        resolve_weights(str(tmp_path / "absent.safetensors"), pretrained=False, seed=0)
    with pytest.raises(CurateError, match=r"is not a file"):
        resolve_weights(str(tmp_path), pretrained=False, seed=0)


def test_weights_source_follows_the_config_and_random_names_its_seed() -> None:
    assert resolve_weights(None, pretrained=True, seed=0).source == "pretrained"
    weights = resolve_weights(None, pretrained=False, seed=42)
    assert weights == Weights("random", "42")
    assert "seed 42" in weights.describe()


def test_timm_model_names_read_from_source_are_timms_own_list() -> None:
    """The CLI checks `embedding.model` against timm's source, not its import."""
    import timm

    from tasks.weights import timm_model_names

    assert timm_model_names() == set(timm.list_models())


class OutOfMemoryAbove(torch.nn.Module):
    """A real model that runs out of CUDA memory above `limit` images a batch, as a GPU
    shared with other work would; it records the batch sizes it was given."""

    def __init__(self, model: torch.nn.Module, limit: int) -> None:
        super().__init__()
        self.model, self.limit, self.sizes = model, limit, []
        self.num_features = model.num_features
        self.pretrained_cfg = model.pretrained_cfg  # the normalisation Embedder reads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(len(x))
        if len(x) > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.model(x)


def test_cuda_out_of_memory_halves_the_batch_and_gives_the_unwrapped_models_embeddings() -> None:
    model = _random_model(0)
    images = _images(11)
    wrapped = OutOfMemoryAbove(model, limit=3)
    embedder = Embedder(wrapped, CPU)
    embeddings = embedder.embed(images, batch_size=8)
    np.testing.assert_allclose(embeddings, Embedder(model, CPU).embed(images, 8), atol=1e-5)
    # 8 ran out, 4 ran out, then batches of 2 (and the last image alone)
    assert wrapped.sizes == [8, 4, 2, 2, 2, 2, 2, 1]
    assert embedder.batch_size_used(8) == 2
    wrapped.sizes.clear()
    embedder.embed(images[:4], batch_size=8)  # the next shard starts at what fitted
    assert wrapped.sizes == [2, 2]


def test_out_of_memory_with_a_batch_of_one_is_a_clear_error() -> None:
    embedder = Embedder(OutOfMemoryAbove(_random_model(0), limit=0), CPU)
    with pytest.raises(CurateError, match="embedding: CUDA out of memory with a batch of 1"):
        embedder.embed(_images(3), batch_size=2)


def test_a_run_that_runs_out_of_gpu_memory_finishes_and_reports_the_batch_it_used(
    demo_folder, run_curate, tmp_path
) -> None:
    from tasks.models import _embedders

    # The run's own embedder (resnet18, seed 11, CPU), its model wrapped.
    seed = 11
    model = build_model("resnet18", Weights("random", str(seed)), None, CPU)
    _embedders[("resnet18", str(seed), "cpu")] = Embedder(OutOfMemoryAbove(model, 5), CPU)
    folder, _ = demo_folder
    args = (f"input={folder}", "stopping_condition.n_samples=3", "embedding.input_size=32")
    try:
        run = run_curate(
            *args, f"output={tmp_path / 'oom'}", f"seed={seed}", "embedding.batch_size=16"
        )
    finally:
        del _embedders[("resnet18", str(seed), "cpu")]
    assert run.report["embedding"]["batch_size"] == 4
    plain = run_curate(
        *args, f"output={tmp_path / 'plain'}", f"seed={seed}", "embedding.batch_size=16"
    )
    assert plain.report["embedding"]["batch_size"] == 16
    assert run.names("selected") == plain.names("selected")
    a = (run.path / "data/embeddings.csv").read_text().splitlines()
    b = (plain.path / "data/embeddings.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in a] == [row.split(",")[0] for row in b]
    np.testing.assert_allclose(
        np.loadtxt(a[1:], delimiter=",", usecols=range(1, 513), dtype=np.float32),
        np.loadtxt(b[1:], delimiter=",", usecols=range(1, 513), dtype=np.float32),
        atol=1e-4,
    )
