"""The paper's two networks: VGG-19 and Inception v3 with new heads, in pure Keras 3.

A full model is ``image (S, S, 1) raw 0-255 grey -> BackbonePreprocessing -> base -> head``.
The preprocessing layer sits inside the model so a saved model takes raw pixels, and the
base and head are separate sub-models so training can cache what the frozen part computes
and fit only what learns (see ``models.training``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import keras
from keras import ops

from thyrocad.models.errors import ModelsError, WeightsNotAvailable

logger = logging.getLogger(__name__)

ARCHITECTURES = ("vgg19", "inception_v3")
DEFAULT_CLASSES = ("autoimmune", "normal")

# ImageNet channel means in BGR order, as Keras' "caffe" preprocessing subtracts them.
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
PREPROCESSING_MODES = ("caffe", "tf")


@dataclass(frozen=True)
class ArchSpec:
    """Everything the paper fixes about one architecture: one table, one home.

    ``frozen_layers`` counts layers of the base (its InputLayer included, as in the
    Keras guide the paper follows); ``None`` freezes the whole base. ``evidence_layer``
    names the base's last convolutional block, whose activations Grad-CAM weighs
    (``models.gradcam``).
    """

    name: str
    head_units: int
    optimizer: str
    learning_rate: float
    frozen_layers: int | None
    pooling: str
    preprocessing: str
    min_input_size: int
    weights_file: str
    evidence_layer: str

    def base_factory(self) -> Any:
        """Return the ``keras.applications`` constructor of this architecture's base."""
        if self.name == "vgg19":
            return keras.applications.VGG19
        return keras.applications.InceptionV3


ARCH_SPECS: Mapping[str, ArchSpec] = MappingProxyType(
    {
        "vgg19": ArchSpec(
            name="vgg19",
            head_units=512,
            optimizer="adam",
            learning_rate=1e-4,
            frozen_layers=None,
            pooling="flatten",
            preprocessing="caffe",
            min_input_size=32,
            weights_file="vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
            evidence_layer="block5_conv4",  # the input of block5_pool
        ),
        "inception_v3": ArchSpec(
            name="inception_v3",
            head_units=256,
            optimizer="rmsprop",
            learning_rate=1e-3,
            frozen_layers=249,
            pooling="avg",
            preprocessing="tf",
            min_input_size=75,
            weights_file="inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
            evidence_layer="mixed10",
        ),
    }
)


def get_spec(arch: str) -> ArchSpec:
    """Return the :class:`ArchSpec` of ``arch``; ModelsError names the known ones."""
    try:
        return ARCH_SPECS[arch]
    except KeyError:
        raise ModelsError(
            f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}"
        ) from None


@keras.saving.register_keras_serializable(package="thyrocad")
class BackbonePreprocessing(keras.layers.Layer):
    """Raw grey 0-255 ``(..., 1)`` in, the backbone's expected 3-channel input out.

    ``mode="caffe"`` (VGG): RGB->BGR and ImageNet mean subtraction, no scaling.
    ``mode="tf"`` (Inception): scale to [-1, 1]. Grey is replicated to 3 channels first.
    """

    def __init__(self, mode: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if mode not in PREPROCESSING_MODES:
            raise ValueError(f"mode must be one of {PREPROCESSING_MODES}, not {mode!r}")
        self.mode = mode

    def call(self, inputs: Any) -> Any:
        x = ops.cast(inputs, self.compute_dtype)
        x = ops.concatenate([x, x, x], axis=-1)
        if self.mode == "caffe":
            # The channel flip RGB->BGR is a no-op on replicated grey; the means are not.
            mean = ops.convert_to_tensor(_CAFFE_MEAN_BGR, dtype=self.compute_dtype)
            return x - mean
        return x / 127.5 - 1.0

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return (*input_shape[:-1], 3)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "mode": self.mode}


def _normalise_weights(weights: str | Path | None) -> str | Path | None:
    """Map the accepted spellings to ``"imagenet"``, ``None`` or a local :class:`Path`."""
    if weights is None:
        return None
    if isinstance(weights, str):
        if weights.lower() == "none":
            return None
        if weights.lower() == "imagenet":
            return "imagenet"
    return Path(weights).expanduser()


def describe_weights(weights: str | Path | None) -> str:
    """Return how base weights are recorded in metadata: ``imagenet``, ``none`` or a path."""
    normalised = _normalise_weights(weights)
    if normalised is None:
        return "none"
    return str(normalised)


def _install_hint(spec: ArchSpec) -> str:
    return (
        f"To install them offline, copy Keras' notop weights file {spec.weights_file!r} "
        f"to ~/.keras/models/ (or $KERAS_HOME/models/) on this machine, or pass the path "
        f"of a local .h5 / .weights.h5 file as weights; use weights='none' only for tests."
    )


def build_base(arch: str, input_size: int = 224, weights: str | Path | None = "imagenet") -> Any:
    """Build the convolutional base of ``arch`` with the paper's freezing applied.

    Takes an ``(input_size, input_size, 3)`` preprocessed tensor; returns a Keras
    functional model named after ``arch`` whose output is the last feature map.
    ``weights``: ``"imagenet"`` (Keras' own download or its cache), a local ``.h5`` /
    ``.weights.h5`` file, or ``None``/``"none"`` (random init, tests only). Raises
    WeightsNotAvailable rather than silently falling back to random weights.
    """
    spec = get_spec(arch)
    if input_size < spec.min_input_size:
        raise ModelsError(f"{arch} needs input_size >= {spec.min_input_size} px, got {input_size}")
    source = _normalise_weights(weights)
    if isinstance(source, Path):
        if not source.is_file():
            raise WeightsNotAvailable(
                f"base weights file {source} does not exist. {_install_hint(spec)}"
            )
        if not source.name.endswith(".h5"):
            raise WeightsNotAvailable(
                f"base weights file {source} is not a .h5 or .weights.h5 file. "
                f"{_install_hint(spec)}"
            )
    factory = spec.base_factory()
    shape = (input_size, input_size, 3)
    if source == "imagenet":
        try:
            base = factory(include_top=False, weights="imagenet", input_shape=shape)
        except Exception as exc:  # Keras raises bare Exception on a failed download
            raise WeightsNotAvailable(
                f"ImageNet weights for {arch} could not be downloaded or read ({exc}). "
                f"{_install_hint(spec)}"
            ) from exc
    else:
        base = factory(include_top=False, weights=None, input_shape=shape)
        if isinstance(source, Path):
            try:
                base.load_weights(str(source))
            except Exception as exc:  # h5py, ValueError on layer mismatch, ...
                raise WeightsNotAvailable(
                    f"could not load {arch} base weights from {source}: {exc}. "
                    f"{_install_hint(spec)}"
                ) from exc
            logger.info("loaded base weights", extra={"arch": arch, "weights": str(source)})
    freeze_base(base, spec)
    return base


def freeze_base(base: Any, spec: ArchSpec) -> None:
    """Apply the paper's freezing: all of VGG-19; the first 249 layers of Inception v3."""
    if spec.frozen_layers is None:
        base.trainable = False
        return
    base.trainable = True
    for index, layer in enumerate(base.layers):
        layer.trainable = index >= spec.frozen_layers


def build_head(
    arch: str, feature_shape: Sequence[int | None], n_classes: int, seed: int = 0
) -> Any:
    """Build the new classifier of ``arch`` on base features of ``feature_shape``.

    Returns a functional model ``features -> pooling -> Dense(units, relu) ->
    Dense(n_classes, softmax)`` named ``head``, with seeded initialisers so the same
    seed gives the same initial weights.
    """
    spec = get_spec(arch)
    if n_classes < 2:
        raise ModelsError(f"a classifier needs at least 2 classes, got {n_classes}")
    inputs = keras.Input(shape=tuple(feature_shape), name="features")
    if spec.pooling == "flatten":
        x = keras.layers.Flatten(name="flatten")(inputs)
    else:
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(inputs)
    x = keras.layers.Dense(
        spec.head_units,
        activation="relu",
        kernel_initializer=keras.initializers.GlorotUniform(seed=seed),
        name="fc",
    )(x)
    outputs = keras.layers.Dense(
        n_classes,
        activation="softmax",
        kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 1),
        name="predictions",
    )(x)
    return keras.Model(inputs, outputs, name="head")


def make_optimizer(arch: str) -> Any:
    """Return a fresh optimizer of ``arch`` as the paper sets it (Adam 1e-4 / RMSprop 1e-3)."""
    spec = get_spec(arch)
    if spec.optimizer == "adam":
        return keras.optimizers.Adam(learning_rate=spec.learning_rate)
    return keras.optimizers.RMSprop(learning_rate=spec.learning_rate)


def compile_for(model: Any, arch: str, jit_compile: bool | str = "auto") -> Any:
    """Compile ``model`` with ``arch``'s optimizer, categorical cross-entropy and accuracy.

    ``jit_compile`` is passed to Keras (``"auto"``: its default, no XLA on a CPU).
    """
    model.compile(
        optimizer=make_optimizer(arch),
        loss="categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=jit_compile,
    )
    return model


def assemble_model(arch: str, base: Any, head: Any, input_size: int) -> Any:
    """Join ``image -> BackbonePreprocessing -> base -> head`` into one compiled model.

    ``base`` and ``head`` are reused, not copied: weights trained on either show in the
    full model. The base runs with ``training=False`` so batch normalisation keeps its
    ImageNet statistics, as the Keras transfer-learning guide recommends for small data.
    """
    spec = get_spec(arch)
    inputs = keras.Input(shape=(input_size, input_size, 1), name="image")
    x = BackbonePreprocessing(spec.preprocessing, name="preprocess")(inputs)
    x = base(x, training=False)
    outputs = head(x)
    model = keras.Model(inputs, outputs, name=f"thyrocad_{arch}")
    return compile_for(model, arch)


def build_model(
    arch: str,
    classes: Sequence[str] = DEFAULT_CLASSES,
    input_size: int = 224,
    weights: str | Path | None = "imagenet",
    seed: int = 0,
) -> Any:
    """Build the paper's compiled model for ``arch``, ready to fit.

    In: raw grey images ``(N, input_size, input_size, 1)`` with values 0-255. Out:
    ``(N, len(classes))`` softmax probabilities in the order of ``classes``.
    ``seed`` fixes the head's initial weights; call ``keras.utils.set_random_seed``
    beforehand to fix a randomly initialised base as well.
    """
    if len(set(classes)) != len(classes):
        raise ModelsError(f"class names must be unique, got {list(classes)}")
    base = build_base(arch, input_size, weights)
    head = build_head(arch, base.output.shape[1:], len(classes), seed)
    return assemble_model(arch, base, head, input_size)


def frozen_boundary(base: Any, spec: ArchSpec) -> str | None:
    """Name the layer whose output is all the trainable part of ``base`` reads, if any.

    ``None`` means the whole base is frozen. Raises ModelsError when the trainable part
    reads several tensors of the frozen part, since then no single cache can feed it.
    """
    if spec.frozen_layers is None:
        return None
    frozen = {layer.name for layer in base.layers[: spec.frozen_layers]}
    read: set[str] = set()
    for layer in base.layers[spec.frozen_layers :]:
        for node in layer._inbound_nodes:
            for tensor in node.input_tensors:
                source = tensor._keras_history.operation.name
                if source in frozen:
                    read.add(source)
    if len(read) != 1:
        raise ModelsError(
            f"the trainable part of {spec.name} reads {sorted(read)} from the frozen part; "
            "its features cannot be cached as one tensor"
        )
    return read.pop()


def split_frozen(base: Any, arch: str, input_size: int) -> tuple[Any, Any | None]:
    """Split a full pipeline into its frozen front and its trainable rest.

    Returns ``(extractor, trainable_base)``: ``extractor`` maps raw grey images
    ``(N, S, S, 1)`` to the last frozen tensor (preprocessing included);
    ``trainable_base`` maps that tensor to the base output, or is ``None`` when the
    whole base is frozen. Both share ``base``'s layers and weights.
    """
    spec = get_spec(arch)
    inputs = keras.Input(shape=(input_size, input_size, 1), name="image")
    x = BackbonePreprocessing(spec.preprocessing, name="preprocess")(inputs)
    boundary = frozen_boundary(base, spec)
    if boundary is None:
        return keras.Model(inputs, base(x, training=False), name="extractor"), None
    front = keras.Model(base.inputs, base.get_layer(boundary).output, name="frozen_front")
    rest = keras.Model(base.get_layer(boundary).output, base.output, name="trainable_base")
    extractor = keras.Model(inputs, front(x, training=False), name="extractor")
    return extractor, rest
