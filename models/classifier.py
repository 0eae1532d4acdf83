"""A loaded model that turns batches of grey uint8 images into class probabilities.

The model is compiled once; a call costs about what a direct compiled call costs, at
batch 1 as at batch 32 (``model.predict`` adds 65-110 ms per call on this project's CPU).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np

import thyrocad.models.architectures  # noqa: F401  registers BackbonePreprocessing for loading
from thyrocad.models.errors import ModelsError, RegistryError

logger = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 32
MIXED_POLICY = "mixed_float16"


def _output_layers(model: Any) -> list[Any]:
    """The layers that compute ``model``'s outputs, looking inside nested sub-models."""
    found = []
    for tensor in model.outputs:
        operation = tensor._keras_history.operation
        if isinstance(operation, keras.Model):
            found += _output_layers(operation)
        else:
            found.append(operation)
    return found


def use_mixed_precision(model: Any) -> None:
    """Make a built ``model`` compute in ``mixed_float16``, its output layers in float32.

    A model saved in float32 keeps float32 in every layer's config, so a global
    ``mixed_float16`` policy set before loading changes nothing; the policy is set on
    the loaded layers instead (variables stay float32, computation is float16). The
    layers that make the outputs (the softmax classifier) stay float32, as Keras'
    mixed precision guide asks, so probabilities come out in float32.
    """
    keep = {id(layer) for layer in _output_layers(model)}
    for layer in model._flatten_layers(include_self=True):
        if id(layer) not in keep:
            layer.dtype_policy = MIXED_POLICY


def compiled_call(model: Any, input_size: int) -> Callable[[np.ndarray], np.ndarray]:
    """Return ``f(uint8 (N, S, S, 1)) -> float32 (N, n_classes)`` running ``model`` compiled.

    The only backend-specific code of ``models``: TensorFlow gets a ``tf.function`` with a
    ``[None, S, S, 1]`` signature (one trace for every batch size), JAX a ``jax.jit`` of
    the stateless call, torch a ``no_grad`` call.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        @tf.function(input_signature=[tf.TensorSpec([None, input_size, input_size, 1], tf.uint8)])
        def tf_call(images: Any) -> Any:
            return model(tf.cast(images, tf.float32), training=False)

        return lambda images: tf_call(tf.constant(images)).numpy().astype(np.float32)
    if backend == "jax":
        import jax

        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]

        @jax.jit
        def jax_call(images: Any) -> Any:
            outputs, _ = model.stateless_call(
                trainable, non_trainable, images.astype("float32"), training=False
            )
            return outputs

        return lambda images: np.asarray(jax_call(images), dtype=np.float32)
    if backend == "torch":
        import torch

        def torch_call(images: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                outputs = model(torch.from_numpy(images.astype(np.float32)), training=False)
            return np.asarray(keras.ops.convert_to_numpy(outputs), dtype=np.float32)

        return torch_call
    return lambda images: np.asarray(
        keras.ops.convert_to_numpy(model(images.astype(np.float32), training=False)),
        dtype=np.float32,
    )


class Classifier:
    """A model version ready for inference.

    ``predict`` takes uint8 ``(N, H, W)`` or ``(N, H, W, 1)`` images at ``input_size``
    and returns float32 ``(N, len(classes))`` probabilities in the order of ``classes``.
    """

    def __init__(
        self,
        model: Any,
        version: str,
        architecture: str,
        classes: Sequence[str],
        input_size: int,
        max_batch: int = DEFAULT_MAX_BATCH,
    ) -> None:
        self.model = model
        self.version = version
        self.architecture = architecture
        self.classes = tuple(classes)
        self.input_size = int(input_size)
        # Large batches are cut so activations stay bounded (VGG-19 at 224 px needs
        # about 13 MB per image); the signature's None batch avoids retracing per size.
        self.max_batch = max_batch
        self.precision = "float32"
        expected_in = (None, self.input_size, self.input_size, 1)
        if tuple(model.input_shape) != expected_in:
            raise ModelsError(f"model takes {model.input_shape}, expected {expected_in}")
        if model.output_shape[-1] != len(self.classes):
            raise ModelsError(
                f"model has {model.output_shape[-1]} outputs for {len(self.classes)} classes"
            )
        self._call = compiled_call(model, self.input_size)

    @classmethod
    def from_model(
        cls,
        model: Any,
        version: str,
        architecture: str,
        classes: Sequence[str],
        input_size: int,
    ) -> Classifier:
        """Wrap an in-memory Keras model (e.g. just trained) as a Classifier."""
        return cls(model, version, architecture, classes, input_size)

    def use_mixed_precision(self) -> None:
        """Compute in ``mixed_float16`` from now on (on a GPU; see :func:`use_mixed_precision`)."""
        use_mixed_precision(self.model)
        self.precision = MIXED_POLICY
        self._call = compiled_call(self.model, self.input_size)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Return float32 ``(N, n_classes)`` probabilities for uint8 ``(N, H, W[, 1])``."""
        array = np.asarray(images)
        if array.dtype != np.uint8:
            raise ModelsError(f"Classifier.predict takes uint8 images, got {array.dtype}")
        if array.ndim == 3:
            array = array[..., None]
        size = self.input_size
        if array.ndim != 4 or array.shape[1:] != (size, size, 1):
            raise ModelsError(
                f"Classifier.predict takes (N, {size}, {size}) or (N, {size}, {size}, 1) "
                f"images, got {np.asarray(images).shape}"
            )
        if len(array) == 0:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        array = np.ascontiguousarray(array)
        if len(array) <= self.max_batch:
            return self._call(array)
        parts = [
            self._call(array[start : start + self.max_batch])
            for start in range(0, len(array), self.max_batch)
        ]
        return np.concatenate(parts)

    def __repr__(self) -> str:
        return (
            f"Classifier(version={self.version!r}, architecture={self.architecture!r}, "
            f"classes={self.classes!r}, input_size={self.input_size}, "
            f"precision={self.precision!r}, max_batch={self.max_batch})"
        )


def load_classifier(path: Path, version: str, metadata: dict[str, Any]) -> Classifier:
    """Load the ``.keras`` file at ``path`` as a Classifier described by ``metadata``.

    ``metadata`` must hold ``architecture``, ``classes`` and ``input_size``. Raises
    RegistryError when the file cannot be loaded or does not match the metadata.
    """
    try:
        architecture = str(metadata["architecture"])
        classes = tuple(str(c) for c in metadata["classes"])
        input_size = int(metadata["input_size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise RegistryError(f"metadata of {version} lacks architecture/classes/input_size") from exc
    try:
        model = keras.saving.load_model(Path(path), compile=False)
    except Exception as exc:  # Keras raises many types for a damaged archive
        raise RegistryError(f"cannot load model {version} from {path}: {exc}") from exc
    try:
        classifier = Classifier(model, version, architecture, classes, input_size)
    except ModelsError as exc:
        raise RegistryError(f"model {version} does not match its metadata: {exc}") from exc
    backend = keras.backend.backend()
    logger.info(
        "classifier loaded on the %s backend",
        backend,
        extra={"version": version, "architecture": architecture, "backend": backend},
    )
    return classifier
