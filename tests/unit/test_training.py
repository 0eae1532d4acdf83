"""Training: cached features equal full-model training, patient split, learning, stopping."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from thyrocad.models.architectures import build_head
from thyrocad.models.data import split_by_patient
from thyrocad.models.errors import DatasetError, ModelsError
from thyrocad.models.training import XLA_MIN_HEAD_PARAMS, TrainConfig, TrainResult, train

SIZE = 32


def _textures(
    n_patients: int, per_patient: int, size: int = SIZE, seed: int = 0
) -> tuple[np.ndarray, list[str], list[str]]:
    """Dark (autoimmune: hypoechoic) vs bright (normal) Rayleigh speckle, per patient."""
    rng = np.random.default_rng(seed)
    images, labels, patients = [], [], []
    for p in range(n_patients):
        label = "autoimmune" if p % 2 else "normal"
        level = rng.uniform(55, 85) if label == "autoimmune" else rng.uniform(125, 165)
        for _ in range(per_patient):
            speckle = rng.rayleigh(level / 1.25, (size, size))
            images.append(np.clip(speckle, 0, 255).astype(np.uint8))
            labels.append(label)
            patients.append(f"P{p:02d}")
    return np.stack(images), labels, patients


def _config(**overrides: Any) -> TrainConfig:
    base = TrainConfig(arch="vgg19", input_size=SIZE, epochs=2, batch_size=4, weights=None)
    return replace(base, **overrides)


def _assert_same_training(a: TrainResult, b: TrainResult) -> None:
    for x, y in zip(
        a.model.get_layer("head").get_weights(),
        b.model.get_layer("head").get_weights(),
        strict=True,
    ):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.test_probabilities, b.test_probabilities, rtol=1e-5, atol=1e-6)
    assert a.history.keys() == b.history.keys()
    for key in a.history:
        np.testing.assert_allclose(a.history[key], b.history[key], rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("variants", "size", "xla"),
    [(0, SIZE, False), (2, 64, True)],  # at 64 px the head passes XLA's size threshold
)
def test_cached_features_equal_full_model_training(variants: int, size: int, xla: bool) -> None:
    images, labels, patients = _textures(6, 2, size=size)
    config = _config(augment_variants=variants, validation_fraction=0.2, input_size=size)
    head_params = (size // 32) ** 2 * 512 * 513 + 513 * 2
    assert (head_params >= XLA_MIN_HEAD_PARAMS) == xla
    cached = train(images, labels, patients, config)
    full = train(images, labels, patients, replace(config, cache_features=False))
    _assert_same_training(cached, full)
    assert set(cached.history) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    # Training moved the head: the comparison is not between two untouched models.
    features = (size // 32, size // 32, 512)
    initial = build_head("vgg19", features, 2, seed=config.seed).get_weights()
    trained = cached.model.get_layer("head").get_weights()
    assert not np.allclose(initial[0], trained[0])


@pytest.mark.slow
def test_learns_to_separate_held_out_patients() -> None:
    images, labels, patients = _textures(20, 3, seed=7)
    result = train(
        images, labels, patients, _config(epochs=15, batch_size=8, test_fraction=0.3, seed=1)
    )
    assert len(set(result.test_patients)) == 6
    truth = [label == "autoimmune" for label in result.test_labels]
    auc = roc_auc_score(truth, result.test_probabilities[:, 0])
    # Seen: 1.0 with random (weights=None) VGG-19 features on these textures.
    assert auc >= 0.9, auc


def test_split_result_and_metadata() -> None:
    images, labels, patients = _textures(10, 2)
    epochs: list[tuple[int, dict[str, float]]] = []
    result = train(
        images,
        labels,
        patients,
        _config(epochs=3, validation_fraction=0.2),
        on_epoch=lambda epoch, logs: epochs.append((epoch, logs)),
    )
    split = result.split
    assert not set(split.train) & set(split.test)
    assert not set(split.validation) & (set(split.train) | set(split.test))
    assert split == split_by_patient(patients, labels, 0.2, 0.2, seed=0)
    assert set(result.test_patients) == set(split.test)
    assert result.test_probabilities.shape == (len(result.test_labels), 2)
    assert result.test_probabilities.dtype == np.float32
    np.testing.assert_allclose(result.test_probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert [e for e, _ in epochs] == [1, 2, 3]
    assert set(epochs[0][1]) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert result.history["loss"] == [logs["loss"] for _, logs in epochs]
    meta = result.metadata
    assert meta["architecture"] == "vgg19" and meta["input_size"] == SIZE
    assert meta["classes"] == ["autoimmune", "normal"]
    assert meta["base_weights"] == "none"
    assert meta["data_fingerprint"] == result.fingerprint
    assert meta["split"]["test"] == list(split.test)
    assert meta["hyperparameters"]["optimizer"] == "adam"
    assert meta["hyperparameters"]["learning_rate"] == pytest.approx(1e-4)
    assert meta["hyperparameters"]["epochs_run"] == 3
    assert "keras" in meta["library_versions"]
    json.dumps(meta)  # the registry writes it as JSON


@pytest.mark.slow
def test_same_seed_same_model() -> None:
    images, labels, patients = _textures(6, 2)
    first = train(images, labels, patients, _config(seed=3))
    again = train(images, labels, patients, _config(seed=3))
    np.testing.assert_array_equal(first.test_probabilities, again.test_probabilities)


@pytest.mark.slow
def test_early_stopping_restores_the_best_weights() -> None:
    """Validation patients look like the other class, so validation loss climbs."""
    images, labels, patients = _textures(12, 2)
    config = _config(epochs=30, validation_fraction=0.2, early_stopping_patience=2, seed=2)
    split = split_by_patient(patients, labels, 0.2, 0.2, seed=2)
    flipped = images.copy()
    for i, patient in enumerate(patients):
        if patient in split.validation:
            flipped[i] = 255 - images[i]
    result = train(flipped, labels, patients, config)
    val_loss = result.history["val_loss"]
    assert len(val_loss) < config.epochs, "stopped early"
    best = int(np.argmin(val_loss))
    assert len(val_loss) == best + 1 + config.early_stopping_patience
    assert result.metadata["hyperparameters"]["epochs_run"] == len(val_loss)
    assert result.metadata["hyperparameters"]["best_epoch"] == best + 1
    val_idx = [i for i, p in enumerate(patients) if p in split.validation]
    y = np.eye(2, dtype=np.float32)[[0 if labels[i] == "autoimmune" else 1 for i in val_idx]]
    restored = result.model.evaluate(
        flipped[val_idx, ..., None].astype(np.float32), y, verbose=0, return_dict=True
    )
    assert restored["loss"] == pytest.approx(val_loss[best], rel=1e-4)


def test_config_and_input_errors() -> None:
    with pytest.raises(ModelsError, match="validation split"):
        _config(early_stopping_patience=3)
    with pytest.raises(ModelsError, match="unknown architecture"):
        TrainConfig(arch="resnet")
    with pytest.raises(ModelsError, match="two distinct classes"):
        _config(classes=("a", "a"))
    images, labels, patients = _textures(4, 1)
    with pytest.raises(DatasetError, match="uint8"):
        train(images.astype(np.float32), labels, patients, _config())
    with pytest.raises(DatasetError, match=r"\(N, 48, 48\)"):
        train(images, labels, patients, _config(input_size=48))
    with pytest.raises(DatasetError, match=r"\['benign'\]"):
        train(images, ["benign"] * 4, patients, _config())
    with pytest.raises(DatasetError, match="3 labels"):
        train(images, labels[:3], patients, _config())
