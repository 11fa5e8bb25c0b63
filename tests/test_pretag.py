"""Pretag: a timm classifier with its class names gives probabilities and uncertainty
scores per sample; a classifier that does not fit its names or architecture names the key."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from tasks.config import Pretagging
from tasks.errors import CurateError
from tasks.predictions import (
    PREDICTION_COLUMNS,
    active_learning_scores,
    predictions_bytes,
    predictions_frame,
    read_predictions,
)
from tasks.pretag import load_classifier, merge_predictions, pretag_identity
from tasks.storage import open_storage

CPU = torch.device("cpu")
MODEL = "test_resnet"
NAMES = ["cat", "dog", "bird"]


def _classifier_state(classes: int = 3, name: str = MODEL) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=classes)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def _images(n: int = 6) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


@pytest.fixture
def safetensors_classifier(tmp_path: Path) -> Path:
    path = tmp_path / "classifier.safetensors"
    metadata = {"class_names": json.dumps(NAMES), "architecture": MODEL}
    save_file(_classifier_state(), str(path), metadata=metadata)
    return path


def test_probabilities_sum_to_one_in_the_order_of_the_class_names(
    safetensors_classifier: Path,
) -> None:
    classifier = load_classifier(
        Pretagging(checkpoint=str(safetensors_classifier)), "resnet18", CPU
    )
    assert classifier.class_names == NAMES
    probabilities = classifier.predict(_images(), batch_size=4)
    assert probabilities.shape == (6, 3) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(classifier.predict(_images(), 6), probabilities, atol=1e-6)


def test_pth_with_a_sidecar_json_and_inline_class_names(tmp_path: Path) -> None:
    torch.save(_classifier_state(), tmp_path / "model.pth")
    (tmp_path / "model.json").write_text(json.dumps({"class_names": NAMES, "architecture": MODEL}))
    classifier = load_classifier(Pretagging(checkpoint=str(tmp_path / "model.pth")), "x", CPU)
    assert classifier.class_names == NAMES
    torch.save({"state_dict": _classifier_state(), "class_names": NAMES}, tmp_path / "b.pth")
    inline = Pretagging(
        checkpoint=str(tmp_path / "b.pth"), model=MODEL, class_names=["a", "b", "c"]
    )
    assert load_classifier(inline, "resnet18", CPU).class_names == ["a", "b", "c"]
    (tmp_path / "names.txt").write_text("x\ny\nz\n")
    from_file = Pretagging(
        checkpoint=str(tmp_path / "b.pth"), model=MODEL, class_names=str(tmp_path / "names.txt")
    )
    assert load_classifier(from_file, "resnet18", CPU).class_names == ["x", "y", "z"]


def test_class_names_that_do_not_match_the_head_name_the_checkpoint(
    safetensors_classifier: Path,
) -> None:
    settings = Pretagging(checkpoint=str(safetensors_classifier), class_names=["a", "b"])
    with pytest.raises(
        CurateError,
        match=r"^pretagging\.checkpoint: .* has a head of 3 classes but 2 class names",
    ):
        load_classifier(settings, MODEL, CPU)


def test_a_checkpoint_of_another_architecture_names_the_checkpoint(
    safetensors_classifier: Path, tmp_path: Path
) -> None:
    settings = Pretagging(checkpoint=str(safetensors_classifier), model="resnet10t")
    with pytest.raises(
        CurateError, match=r"^pretagging\.checkpoint: .* is not a resnet10t classifier"
    ):
        load_classifier(settings, MODEL, CPU)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CurateError, match=r"^pretagging\.checkpoint: cannot read"):
        load_classifier(Pretagging(checkpoint=str(tmp_path / "junk.pth")), MODEL, CPU)
    torch.save(_classifier_state(), tmp_path / "nameless.pth")
    with pytest.raises(CurateError, match=r"^pretagging\.checkpoint: .* has no class names"):
        load_classifier(Pretagging(checkpoint=str(tmp_path / "nameless.pth")), MODEL, CPU)


def test_scores_rank_uncertain_predictions_first() -> None:
    p = np.array([[1.0, 0.0, 0.0], [0.6, 0.3, 0.1], [1 / 3, 1 / 3, 1 / 3]])
    scores = active_learning_scores(p)
    for name, values in scores.items():
        assert values[0] == pytest.approx(0.0, abs=1e-6), name
        assert values[2] == pytest.approx(1.0, abs=1e-6), name
        assert 0 < values[1] < 1
    assert scores["uncertainty_margin"][1] == pytest.approx(0.7)
    assert scores["uncertainty_least_confidence"][1] == pytest.approx(0.6)


def test_predictions_file_round_trips_with_its_class_names(tmp_path: Path) -> None:
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], dtype=np.float32)
    frame = predictions_frame(["a.png", "b.png"], p, NAMES)
    data = predictions_bytes(frame, NAMES)
    read, names = read_predictions(data)
    assert names == NAMES and tuple(read.columns) == PREDICTION_COLUMNS
    assert read["predicted_class"].tolist() == ["cat", "bird"]
    np.testing.assert_allclose(np.stack(read["probabilities"].to_numpy()), p)
    storage = open_storage(str(tmp_path))
    storage.write("one.parquet", data)
    storage.write("two.parquet", data)
    merged, _ = read_predictions(merge_predictions(storage, ["one.parquet", "two.parquet"]))
    assert merged["filename"].tolist() == ["a.png", "b.png", "a.png", "b.png"]


def test_the_identity_changes_with_the_sidecar(tmp_path: Path) -> None:
    torch.save(_classifier_state(), tmp_path / "m.pth")
    settings = Pretagging(checkpoint=str(tmp_path / "m.pth"))
    before = pretag_identity(settings)
    (tmp_path / "m.json").write_text(json.dumps({"class_names": NAMES}))
    assert pretag_identity(settings) != before
