"""Training the paper's recipe on a patient-level split, fast on a CPU.

The frozen front of a network gives the same output every epoch, so with
``cache_features`` it runs once per image (and once per cached augmented variant), and
only what learns trains on the cached tensors: the head for VGG-19 (whole base frozen),
the top two inception blocks plus the head for Inception v3 (first 249 layers frozen,
which end in the single tensor ``mixed8``). Both paths use the same batches in the same
order, so the cached result equals full-model training up to float rounding.
"""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from thyrocad.models.architectures import (
    ARCHITECTURES,
    DEFAULT_CLASSES,
    assemble_model,
    build_base,
    build_head,
    compile_for,
    describe_weights,
    get_spec,
    split_frozen,
)
from thyrocad.models.classifier import compiled_call
from thyrocad.models.data import Split, augment, class_counts, fingerprint, split_by_patient
from thyrocad.models.errors import DatasetError, ModelsError

logger = logging.getLogger(__name__)

AUGMENT_MAX_SHIFT = 0.1
AUGMENT_MAX_ZOOM = 0.1
# Feature extraction batch: large enough to keep both cores busy, small enough that
# VGG-19's activations at 224 px (about 13 MB per image) stay well under 1 GB.
EXTRACT_BATCH = 32

# Below about a million weights a head step is cheap and XLA's compile would dominate.
XLA_MIN_HEAD_PARAMS = 1_000_000

EpochCallback = Callable[[int, dict[str, float]], None]


@dataclass(frozen=True)
class TrainConfig:
    """How to train: the paper's defaults (100 epochs, batches of 32, 224 px, ImageNet)."""

    arch: str
    classes: tuple[str, ...] = DEFAULT_CLASSES
    input_size: int = 224
    epochs: int = 100
    batch_size: int = 32
    weights: str | Path | None = "imagenet"
    seed: int = 0
    test_fraction: float = 0.2
    validation_fraction: float = 0.0
    early_stopping_patience: int | None = None
    augment_variants: int = 0
    cache_features: bool = True

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ModelsError(f"unknown architecture {self.arch!r}; choose {ARCHITECTURES}")
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise ModelsError(f"need at least two distinct classes, got {self.classes}")
        if self.epochs < 1 or self.batch_size < 1 or self.augment_variants < 0:
            raise ModelsError("epochs and batch_size must be >= 1, augment_variants >= 0")
        if self.early_stopping_patience is not None:
            if self.early_stopping_patience < 1:
                raise ModelsError("early_stopping_patience must be >= 1")
            if self.validation_fraction <= 0:
                raise ModelsError("early stopping needs a validation split (validation_fraction)")


@dataclass
class TrainResult:
    """A trained full model, its split, history, held-out predictions and metadata."""

    model: Any
    split: Split
    history: dict[str, list[float]]
    test_probabilities: np.ndarray
    test_labels: list[str]
    test_patients: list[str]
    fingerprint: str
    seconds: float
    metadata: dict[str, Any] = field(default_factory=dict)


def _check_inputs(
    images: np.ndarray, labels: Sequence[str], patient_ids: Sequence[str], config: TrainConfig
) -> np.ndarray:
    """Return images as uint8 ``(N, S, S, 1)``; DatasetError on anything unusable."""
    array = np.asarray(images)
    if array.ndim == 4 and array.shape[-1] == 1:
        array = array[..., 0]
    size = config.input_size
    if array.ndim != 3 or array.shape[1:] != (size, size):
        raise DatasetError(f"images must be (N, {size}, {size}) grey, got {images.shape}")
    if array.dtype != np.uint8:
        raise DatasetError(f"images must be uint8, got {array.dtype}")
    if not len(array) == len(labels) == len(patient_ids):
        raise DatasetError(
            f"{len(array)} images, {len(labels)} labels, {len(patient_ids)} patient ids"
        )
    if len(array) == 0:
        raise DatasetError("no images to train on")
    unknown = sorted(set(labels) - set(config.classes))
    if unknown:
        raise DatasetError(f"labels {unknown} are not among the classes {config.classes}")
    return array[..., None]


def _extract(model: Any, images: np.ndarray) -> np.ndarray:
    """Run ``model`` on uint8 ``(N, S, S, 1)`` images in batches of one compiled call.

    One trace serves every batch size, where ``model.predict`` retraces per new shape.
    """
    size = images.shape[1]
    if len(images) == 0:
        return np.zeros((0, *model.output_shape[1:]), dtype=np.float32)
    call = compiled_call(model, size)
    return np.concatenate(
        [
            call(images[start : start + EXTRACT_BATCH])
            for start in range(0, len(images), EXTRACT_BATCH)
        ]
    )


def _predict_features(learner: Any, features: np.ndarray) -> np.ndarray:
    """Class probabilities of the learner on cached features (one ``predict`` call)."""
    if len(features) == 0:
        return np.zeros((0, *learner.output_shape[1:]), dtype=np.float32)
    return np.asarray(learner.predict(features, batch_size=EXTRACT_BATCH, verbose=0))


def _mean_logs(batches: list[tuple[int, dict[str, Any]]], prefix: str = "") -> dict[str, float]:
    """Average per-batch logs weighted by batch size, as ``fit`` reports an epoch."""
    total = sum(size for size, _ in batches)
    keys = batches[0][1].keys() if batches else ()
    return {
        f"{prefix}{key}": float(sum(size * float(logs[key]) for size, logs in batches) / total)
        for key in keys
    }


def _evaluate(model: Any, x: np.ndarray, y: np.ndarray, batch_size: int) -> dict[str, float]:
    batches = [
        (
            len(x[start : start + batch_size]),
            model.test_on_batch(
                np.asarray(x[start : start + batch_size], dtype=np.float32),
                y[start : start + batch_size],
                return_dict=True,
            ),
        )
        for start in range(0, len(x), batch_size)
    ]
    return _mean_logs(batches, "val_")


def _fit(
    model: Any,
    variants: Sequence[np.ndarray],
    y: np.ndarray,
    validation: tuple[np.ndarray, np.ndarray] | None,
    config: TrainConfig,
    on_epoch: EpochCallback | None,
) -> tuple[dict[str, list[float]], int]:
    """Train ``model`` epoch by epoch on ``variants`` (one array per variant of x).

    Each epoch draws a permutation and, per image, one variant from a numpy generator
    seeded by ``config.seed``: the order depends on the seed and the number of images
    only, so the cached and uncached paths see the very same batches. Returns the
    history and the number of epochs run; with early stopping, the best weights by
    validation loss are restored.
    """
    rng = np.random.default_rng([config.seed, 1])
    n = len(y)
    history: dict[str, list[float]] = {}
    best_loss = np.inf
    best_weights: list[np.ndarray] | None = None
    since_best = 0
    epochs_run = 0
    for epoch in range(config.epochs):
        order = rng.permutation(n)
        pick = rng.integers(0, len(variants), size=n) if len(variants) > 1 else None
        batches: list[tuple[int, dict[str, Any]]] = []
        for start in range(0, n, config.batch_size):
            idx = order[start : start + config.batch_size]
            if pick is None:
                xb = variants[0][idx]
            else:
                xb = np.stack([variants[v][i] for v, i in zip(pick[idx], idx, strict=True)])
            # uint8 images are cast per batch, so k variants cost k uint8 copies, not float.
            xb = np.asarray(xb, dtype=np.float32)
            batches.append((len(idx), model.train_on_batch(xb, y[idx], return_dict=True)))
        metrics = _mean_logs(batches)
        if validation is not None:
            metrics.update(_evaluate(model, validation[0], validation[1], config.batch_size))
        for key, value in metrics.items():
            history.setdefault(key, []).append(value)
        epochs_run = epoch + 1
        logger.debug("epoch done", extra={"epoch": epochs_run, **metrics})
        if on_epoch is not None:
            on_epoch(epochs_run, metrics)
        if config.early_stopping_patience is not None:
            if metrics["val_loss"] < best_loss:
                best_loss = metrics["val_loss"]
                best_weights = [w.copy() for w in model.get_weights()]
                since_best = 0
            else:
                since_best += 1
                if since_best >= config.early_stopping_patience:
                    logger.info("early stopping", extra={"epoch": epochs_run})
                    break
    if best_weights is not None:
        model.set_weights(best_weights)
    return history, epochs_run


def _head_jit(learner: Any, head_only: bool) -> bool | str:
    """XLA for a large head trained alone on TensorFlow, Keras' own choice otherwise.

    A step on cached VGG-19 features at 224 px is mostly Adam updating the 25088 x 512
    kernel: memory-bound elementwise work that XLA fuses, 2-3 x faster on this CPU. A
    small head does not repay XLA's compile time, and convolutions (Inception's
    trainable blocks) stay on oneDNN, faster there than XLA.
    """
    large = learner.count_params() >= XLA_MIN_HEAD_PARAMS
    return True if head_only and large and keras.backend.backend() == "tensorflow" else "auto"


def _library_versions() -> dict[str, str]:
    versions = {
        "python": platform.python_version(),
        "keras": keras.__version__,
        "backend": keras.backend.backend(),
        "numpy": np.__version__,
    }
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        versions["tensorflow"] = tf.__version__
    return versions


def _metadata(
    config: TrainConfig,
    split: Split,
    history: dict[str, list[float]],
    epochs_run: int,
    data: dict[str, Any],
    seconds: float,
) -> dict[str, Any]:
    """Everything a registry version records about how its model was trained."""
    spec = get_spec(config.arch)
    excluded = {"arch", "classes", "weights"}
    return {
        "architecture": config.arch,
        "classes": list(config.classes),
        "input_size": config.input_size,
        "preprocessing": {
            "input": "grey uint8 0-255, shape (S, S, 1), already resized to input_size",
            "channels": "grey replicated to 3 channels inside the model",
            "mode": spec.preprocessing,
            "layer": "thyrocad>BackbonePreprocessing",
        },
        "base_weights": describe_weights(config.weights),
        "hyperparameters": {
            **{k: v for k, v in asdict(config).items() if k not in excluded},
            "epochs_run": epochs_run,
            # With early stopping the kept weights are those of the best validation epoch.
            "best_epoch": (
                int(np.argmin(history["val_loss"])) + 1
                if config.early_stopping_patience is not None
                else epochs_run
            ),
            "optimizer": spec.optimizer,
            "learning_rate": spec.learning_rate,
            "head_units": spec.head_units,
            "frozen_layers": "all" if spec.frozen_layers is None else spec.frozen_layers,
            "pooling": spec.pooling,
            "loss": "categorical_crossentropy",
            "augmentation": {"max_shift": AUGMENT_MAX_SHIFT, "max_zoom": AUGMENT_MAX_ZOOM},
        },
        "seed": config.seed,
        "data_fingerprint": data["fingerprint"],
        "data": {key: value for key, value in data.items() if key != "fingerprint"},
        "split": {
            "by": "patient",
            "train": list(split.train),
            "validation": list(split.validation),
            "test": list(split.test),
        },
        "library_versions": _library_versions(),
        "training_seconds": round(seconds, 3),
    }


def _train_cached(
    config: TrainConfig,
    base: Any,
    head: Any,
    variants: list[np.ndarray],
    validation: tuple[np.ndarray, np.ndarray] | None,
    y_train: np.ndarray,
    x_test: np.ndarray,
    on_epoch: EpochCallback | None,
) -> tuple[dict[str, list[float]], int, np.ndarray]:
    """Run the frozen front once per image, then train what learns on its output."""
    extractor, trainable_base = split_frozen(base, config.arch, config.input_size)
    tick = time.perf_counter()
    features = [_extract(extractor, v) for v in variants]
    if validation is not None:
        validation = (_extract(extractor, validation[0]), validation[1])
    features_test = _extract(extractor, x_test)
    logger.info(
        "features cached",
        extra={"seconds": round(time.perf_counter() - tick, 2), "shape": features[0].shape[1:]},
    )
    inputs = keras.Input(shape=features[0].shape[1:], name="cached")
    x = inputs if trainable_base is None else trainable_base(inputs, training=False)
    learner = keras.Model(inputs, head(x), name="learner")
    compile_for(learner, config.arch, jit_compile=_head_jit(learner, trainable_base is None))
    history, epochs_run = _fit(learner, features, y_train, validation, config, on_epoch)
    return history, epochs_run, _predict_features(learner, features_test)


def train(
    images: np.ndarray,
    labels: Sequence[str],
    patient_ids: Sequence[str],
    config: TrainConfig,
    on_epoch: EpochCallback | None = None,
) -> TrainResult:
    """Train ``config.arch`` on grey images and evaluate it on held-out patients.

    In: uint8 ``(N, S, S)`` images already at ``config.input_size``, one label (among
    ``config.classes``) and one patient id per image. Patients are split first
    (stratified, seeded); augmentation touches the training side only. ``on_epoch(done,
    metrics)`` is called after each epoch (``done`` epochs so far, from 1) with
    ``loss``/``accuracy``; with a validation split, ``val_loss``/``val_accuracy``. Out:
    the compiled full model, history, test-set probabilities and the metadata a
    registry version needs.
    """
    started = time.perf_counter()
    x_all = _check_inputs(images, labels, patient_ids, config)
    labels = [str(label) for label in labels]
    patient_ids = [str(patient) for patient in patient_ids]
    keras.utils.set_random_seed(config.seed)
    split = split_by_patient(
        patient_ids, labels, config.test_fraction, config.validation_fraction, config.seed
    )
    side = dict.fromkeys(split.train, "train")
    side.update(dict.fromkeys(split.validation, "validation"))
    side.update(dict.fromkeys(split.test, "test"))
    sides = np.array([side[p] for p in patient_ids])
    train_idx, val_idx, test_idx = (
        np.flatnonzero(sides == s) for s in ("train", "validation", "test")
    )
    class_index = {name: i for i, name in enumerate(config.classes)}
    y_all = keras.utils.to_categorical(
        [class_index[label] for label in labels], num_classes=len(config.classes)
    ).astype(np.float32)

    base = build_base(config.arch, config.input_size, config.weights)
    head = build_head(config.arch, base.output.shape[1:], len(config.classes), config.seed)
    model = assemble_model(config.arch, base, head, config.input_size)

    variants = [x_all[train_idx]]
    if config.augment_variants:
        aug_rng = np.random.default_rng([config.seed, 2])
        variants = [
            augment(variants[0], aug_rng, AUGMENT_MAX_SHIFT, AUGMENT_MAX_ZOOM)
            for _ in range(config.augment_variants)
        ]
    validation = (x_all[val_idx], y_all[val_idx]) if len(val_idx) else None
    if config.cache_features:
        history, epochs_run, test_probabilities = _train_cached(
            config, base, head, variants, validation, y_all[train_idx], x_all[test_idx], on_epoch
        )
    else:
        history, epochs_run = _fit(model, variants, y_all[train_idx], validation, config, on_epoch)
        test_probabilities = _extract(model, x_all[test_idx])
    # A fresh compile so the returned model is ready to fit again (its optimizer state
    # is not the learner's); the weights are shared and already trained.
    compile_for(model, config.arch)
    seconds = time.perf_counter() - started
    data: dict[str, Any] = {
        "fingerprint": fingerprint(x_all[..., 0], labels, patient_ids),
        "images": len(labels),
        "patients": len(set(patient_ids)),
        "images_per_class": class_counts(labels),
        "images_per_side": {
            "train": len(train_idx),
            "validation": len(val_idx),
            "test": len(test_idx),
        },
    }
    logger.info("training done", extra={"arch": config.arch, "seconds": round(seconds, 1)})
    return TrainResult(
        model=model,
        split=split,
        history=history,
        test_probabilities=test_probabilities.astype(np.float32),
        test_labels=[labels[i] for i in test_idx],
        test_patients=[patient_ids[i] for i in test_idx],
        fingerprint=data["fingerprint"],
        seconds=seconds,
        metadata=_metadata(config, split, history, epochs_run, data, seconds),
    )
