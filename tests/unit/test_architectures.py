"""The paper's two networks: shapes, freezing, heads, optimizers, weights loading."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest

from thyrocad.models.architectures import (
    ARCH_SPECS,
    ARCHITECTURES,
    DEFAULT_CLASSES,
    BackbonePreprocessing,
    build_base,
    build_head,
    build_model,
    split_frozen,
)
from thyrocad.models.errors import ModelsError, WeightsNotAvailable

VGG_SIZE = 32
INCEPTION_SIZE = 75


@pytest.fixture(scope="module")
def vgg() -> Any:
    keras.utils.set_random_seed(0)
    return build_model("vgg19", input_size=VGG_SIZE, weights=None)


@pytest.fixture(scope="module")
def inception() -> Any:
    keras.utils.set_random_seed(0)
    return build_model("inception_v3", input_size=INCEPTION_SIZE, weights=None)


def _grey(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 1)).astype(np.float32)


def test_constants() -> None:
    assert ARCHITECTURES == ("vgg19", "inception_v3")
    assert DEFAULT_CLASSES == ("autoimmune", "normal")
    assert set(ARCH_SPECS) == set(ARCHITECTURES)


@pytest.mark.parametrize(
    ("mode", "reference"),
    [
        ("caffe", keras.applications.vgg19.preprocess_input),
        ("tf", keras.applications.inception_v3.preprocess_input),
    ],
)
def test_preprocessing_matches_keras_on_replicated_grey(mode: str, reference: Any) -> None:
    grey = _grey(2, 8)
    ours = keras.ops.convert_to_numpy(BackbonePreprocessing(mode)(grey))
    expected = reference(np.repeat(grey, 3, axis=-1).copy())
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-4)


def test_preprocessing_layer_serialises() -> None:
    layer = BackbonePreprocessing("caffe", name="preprocess")
    config = keras.saving.serialize_keras_object(layer)
    assert config["registered_name"] == "thyrocad>BackbonePreprocessing"
    again = keras.saving.deserialize_keras_object(config)
    assert isinstance(again, BackbonePreprocessing)
    assert again.mode == "caffe"
    with pytest.raises(ValueError, match="mode"):
        BackbonePreprocessing("torch")


def test_vgg19_structure_matches_paper(vgg: Any) -> None:
    assert vgg.input_shape == (None, VGG_SIZE, VGG_SIZE, 1)
    assert vgg.output_shape == (None, 2)
    assert not any(isinstance(layer, keras.layers.Lambda) for layer in vgg.layers)
    base = vgg.get_layer("vgg19")
    assert not base.trainable
    assert base.trainable_weights == []
    assert all(not layer.trainable for layer in base.layers)
    head = vgg.get_layer("head")
    dense = [layer for layer in head.layers if isinstance(layer, keras.layers.Dense)]
    assert [(d.units, d.activation.__name__) for d in dense] == [(512, "relu"), (2, "softmax")]
    assert any(isinstance(layer, keras.layers.Flatten) for layer in head.layers)
    # Only the head learns: two Dense kernels and biases.
    assert len(vgg.trainable_weights) == 4
    assert isinstance(vgg.optimizer, keras.optimizers.Adam)
    assert float(vgg.optimizer.learning_rate) == pytest.approx(1e-4)
    assert vgg.loss == "categorical_crossentropy"


@pytest.mark.slow
def test_inception_structure_matches_paper(inception: Any) -> None:
    assert inception.input_shape == (None, INCEPTION_SIZE, INCEPTION_SIZE, 1)
    assert inception.output_shape == (None, 2)
    base = inception.get_layer("inception_v3")
    assert [layer.trainable for layer in base.layers[:249]] == [False] * 249
    assert all(layer.trainable for layer in base.layers[249:])
    assert base.layers[248].name == "mixed8"  # the top two inception blocks train
    frozen_weights = sum(len(layer.weights) for layer in base.layers[:249])
    assert frozen_weights > 0
    assert all(not w.trainable for layer in base.layers[:249] for w in layer.weights)
    head = inception.get_layer("head")
    dense = [layer for layer in head.layers if isinstance(layer, keras.layers.Dense)]
    assert [(d.units, d.activation.__name__) for d in dense] == [(256, "relu"), (2, "softmax")]
    assert any(isinstance(layer, keras.layers.GlobalAveragePooling2D) for layer in head.layers)
    assert isinstance(inception.optimizer, keras.optimizers.RMSprop)
    assert float(inception.optimizer.learning_rate) == pytest.approx(1e-3)


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "size"), [("vgg19", VGG_SIZE), ("inception_v3", INCEPTION_SIZE)])
def test_frozen_split_computes_the_same_as_the_full_model(
    arch: str, size: int, vgg: Any, inception: Any
) -> None:
    model = vgg if arch == "vgg19" else inception
    extractor, trainable_base = split_frozen(model.get_layer(arch), arch, size)
    x = _grey(3, size, seed=1)
    features = extractor(x, training=False)
    if trainable_base is not None:
        features = trainable_base(features, training=False)
    rebuilt = model.get_layer("head")(features)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(rebuilt), keras.ops.convert_to_numpy(model(x)), atol=1e-6
    )
    if arch == "vgg19":
        assert trainable_base is None
    else:
        assert trainable_base is not None and trainable_base.input_shape[-1] == 1280


def test_configured_classes_set_the_output_width() -> None:
    keras.utils.set_random_seed(0)
    head = build_head("vgg19", (1, 1, 512), 3, seed=0)
    assert head.output_shape == (None, 3)
    again = build_head("vgg19", (1, 1, 512), 3, seed=0)
    for a, b in zip(head.get_weights(), again.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ModelsError, match="at least 2"):
        build_head("vgg19", (1, 1, 512), 1)


@pytest.mark.parametrize(
    ("arch", "size", "pattern"),
    [("inception_v3", 74, ">= 75"), ("vgg19", 31, ">= 32"), ("resnet50", 224, "unknown")],
)
def test_bad_configuration_is_a_clear_error(arch: str, size: int, pattern: str) -> None:
    with pytest.raises(ModelsError, match=pattern):
        build_base(arch, size, weights=None)


def test_missing_local_weights_say_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(WeightsNotAvailable, match=r"does not exist.*~/.keras/models"):
        build_base("vgg19", VGG_SIZE, weights=tmp_path / "absent.h5")


def test_wrong_weights_file_is_a_clear_error(tmp_path: Path) -> None:
    garbage = tmp_path / "vgg.h5"
    garbage.write_bytes(b"not an hdf5 file")
    with pytest.raises(WeightsNotAvailable, match="could not load"):
        build_base("vgg19", VGG_SIZE, weights=garbage)
    text = tmp_path / "vgg.txt"
    text.write_text("x")
    with pytest.raises(WeightsNotAvailable, match=r"\.h5"):
        build_base("vgg19", VGG_SIZE, weights=str(text))


def test_failed_imagenet_download_never_falls_back_to_random(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def offline(*args: Any, **kwargs: Any) -> Any:
        raise Exception("URL fetch failure: no route to host")

    monkeypatch.setattr(keras.applications, "VGG19", offline)
    with pytest.raises(WeightsNotAvailable, match=r"vgg19_weights_tf_dim_ordering.*notop"):
        build_base("vgg19", VGG_SIZE, weights="imagenet")


def test_local_weights_file_is_loaded(tmp_path: Path, vgg: Any) -> None:
    source = vgg.get_layer("vgg19")
    new_path = tmp_path / "base.weights.h5"
    source.save_weights(new_path)
    # The notop files Keras downloads are legacy .h5: write one the same way.
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    legacy_path = tmp_path / "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"
    with h5py.File(legacy_path, "w") as handle:
        legacy_h5_format.save_weights_to_hdf5_group(handle, source)
    for path in (new_path, str(legacy_path)):
        keras.utils.set_random_seed(123)  # a different random init, then overwritten
        loaded = build_base("vgg19", VGG_SIZE, weights=path)
        for a, b in zip(loaded.get_weights(), source.get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)
        assert not loaded.trainable


def test_none_spellings_give_random_init() -> None:
    keras.utils.set_random_seed(0)
    a = build_base("vgg19", VGG_SIZE, weights="none")
    keras.utils.set_random_seed(0)
    b = build_base("vgg19", VGG_SIZE, weights=None)
    np.testing.assert_array_equal(a.get_weights()[0], b.get_weights()[0])
