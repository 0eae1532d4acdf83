"""Registry versions on disk, the active pointer, and the Classifier they load."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest

from thyrocad.models.architectures import BackbonePreprocessing, build_model
from thyrocad.models.classifier import Classifier, load_classifier
from thyrocad.models.errors import ModelsError, RegistryError
from thyrocad.models.registry import ModelVersion, Registry

SIZE = 32


def _tiny_model(seed: int = 0) -> Any:
    """A small model with the custom layer, for registry mechanics (VGG files are 80 MB)."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((SIZE, SIZE, 1))
    x = BackbonePreprocessing("tf")(inputs)
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(2, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="adam", loss="categorical_crossentropy")
    return model


def _metadata(**extra: Any) -> dict[str, Any]:
    return {
        "architecture": "vgg19",
        "classes": ["autoimmune", "normal"],
        "input_size": SIZE,
        **extra,
    }


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE), dtype=np.uint8)


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "registry")


def test_save_get_list(registry: Registry) -> None:
    first = registry.save(_tiny_model(), _metadata(seed=1))
    second = registry.save(_tiny_model(), _metadata(seed=2))
    assert re.fullmatch(r"vgg19-\d{8}-\d{6}-[0-9a-f]{6}", first.version)
    assert isinstance(first, ModelVersion)
    assert first.path == registry.root / first.version / "model.keras"
    assert first.classes == ("autoimmune", "normal") and first.input_size == SIZE
    stored = json.loads((registry.root / first.version / "metadata.json").read_text())
    assert stored["seed"] == 1 and stored["version"] == first.version
    assert registry.get(first.version) == first
    assert [v.version for v in registry.list()] == [first.version, second.version]
    assert not [p for p in registry.root.iterdir() if p.name.startswith(".tmp")]


def test_save_needs_the_model_description(registry: Registry) -> None:
    with pytest.raises(RegistryError, match="input_size"):
        registry.save(_tiny_model(), {"architecture": "vgg19", "classes": ["a", "b"]})


def test_a_crash_while_saving_leaves_no_version(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _tiny_model()

    def crash(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(model, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        registry.save(model, _metadata())
    assert [p.name for p in registry.root.iterdir() if p.name != ".lock"] == []
    assert registry.list() == []


@pytest.mark.parametrize(
    ("damage", "pattern"),
    [
        (lambda d: (d / "metadata.json").write_text("{not json"), "corrupt"),
        (lambda d: (d / "metadata.json").write_text("[1, 2]"), "not a JSON object"),
        (lambda d: (d / "metadata.json").write_text('{"architecture": "vgg19"}'), "lacks"),
        (lambda d: (d / "metadata.json").unlink(), "no metadata.json"),
        (lambda d: (d / "model.keras").unlink(), "no model.keras"),
        (lambda d: (d / "model.keras").write_bytes(b"truncated"), "not a .keras archive"),
    ],
)
def test_corrupt_version_is_a_clear_error(registry: Registry, damage: Any, pattern: str) -> None:
    good = registry.save(_tiny_model(), _metadata())
    bad = registry.save(_tiny_model(), _metadata())
    damage(registry.root / bad.version)
    with pytest.raises(RegistryError, match=pattern):
        registry.get(bad.version)
    assert [v.version for v in registry.list()] == [good.version]


def test_unknown_or_unsafe_version(registry: Registry) -> None:
    with pytest.raises(RegistryError, match="no model version"):
        registry.get("vgg19-20260101-000000-abcdef")
    with pytest.raises(RegistryError, match="not a valid version"):
        registry.get("../etc")
    assert registry.list() == []


def test_promote_active_rollback(registry: Registry) -> None:
    assert registry.active() is None
    with pytest.raises(RegistryError, match="roll back"):
        registry.rollback()
    a = registry.save(_tiny_model(), _metadata())
    b = registry.save(_tiny_model(), _metadata())
    assert registry.promote(a.version) == a
    assert registry.active() == a
    with pytest.raises(RegistryError, match="roll back"):
        registry.rollback()
    registry.promote(b.version)
    registry.promote(b.version)  # idempotent: no duplicate history entry
    assert registry.active() == b
    assert registry.rollback() == a
    assert registry.active() == a
    state = json.loads((registry.root / "active.json").read_text())
    assert state["active"] == a.version and state["history"] == [a.version]
    assert [entry["action"] for entry in state["log"]] == ["promote", "promote", "rollback"]
    with pytest.raises(RegistryError, match="no model version"):
        registry.promote("vgg19-20260101-000000-abcdef")


def test_corrupt_active_file(registry: Registry) -> None:
    registry.root.mkdir(parents=True)
    (registry.root / "active.json").write_text("{")
    with pytest.raises(RegistryError, match="active.json is corrupt"):
        registry.active()


def test_update_metadata(registry: Registry) -> None:
    saved = registry.save(_tiny_model(), _metadata())
    updated = registry.update_metadata(saved.version, metrics={"auc": 0.91})
    assert updated.metadata["metrics"] == {"auc": 0.91}
    assert registry.get(saved.version).metadata["metrics"]["auc"] == 0.91
    assert updated.created_at == saved.created_at
    with pytest.raises(RegistryError, match="cannot be changed"):
        registry.update_metadata(saved.version, version="other")


@pytest.mark.slow
def test_saved_vgg19_reloads_and_predicts_identically(registry: Registry) -> None:
    keras.utils.set_random_seed(0)
    model = build_model("vgg19", input_size=SIZE, weights=None)
    saved = registry.save(model, _metadata())
    # compile=False as the registry loads: the optimizer is not part of a version.
    reloaded = keras.saving.load_model(saved.path, compile=False)
    x = _images(4).astype(np.float32)[..., None]
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(reloaded(x)), model(x).numpy())
    classifier = registry.load(saved.version)
    assert classifier.version == saved.version and classifier.architecture == "vgg19"
    np.testing.assert_allclose(classifier.predict(_images(4)), model(x).numpy(), atol=1e-6)


def test_classifier_predict_shapes_and_values() -> None:
    model = _tiny_model()
    classifier = Classifier.from_model(model, "v1", "vgg19", ("autoimmune", "normal"), SIZE)
    images = _images(5)
    direct = keras.ops.convert_to_numpy(model(images[..., None].astype(np.float32)))
    for batch in (images, images[..., None]):
        out = classifier.predict(batch)
        assert out.shape == (5, 2) and out.dtype == np.float32
        np.testing.assert_allclose(out, direct, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(classifier.predict(images[:1]), direct[:1], atol=1e-7)
    assert classifier.predict(images[:0]).shape == (0, 2)
    classifier.max_batch = 2  # chunked calls give the same answer
    np.testing.assert_allclose(classifier.predict(images), direct, rtol=1e-6, atol=1e-7)
    with pytest.raises(ModelsError, match="uint8"):
        classifier.predict(images.astype(np.float32))
    with pytest.raises(ModelsError, match=r"\(N, 32, 32\)"):
        classifier.predict(_images(2)[:, :16])
    with pytest.raises(ModelsError, match="3 classes"):
        Classifier.from_model(model, "v1", "vgg19", ("a", "b", "c"), SIZE)


def test_classifier_compiles_once() -> None:
    pytest.importorskip("tensorflow")
    if keras.backend.backend() != "tensorflow":
        pytest.skip("tracing count is a TensorFlow notion")
    classifier = Classifier.from_model(_tiny_model(), "v1", "vgg19", ("a", "b"), SIZE)
    for n in (1, 3, 7, 1):
        classifier.predict(_images(n))
    # The tf.function sits in the closure of the returned callable.
    cells = [cell.cell_contents for cell in classifier._call.__closure__ or ()]
    traced = [c for c in cells if hasattr(c, "experimental_get_tracing_count")]
    assert len(traced) == 1 and traced[0].experimental_get_tracing_count() == 1


def test_load_classifier_checks_metadata(registry: Registry) -> None:
    saved = registry.save(_tiny_model(), _metadata())
    with pytest.raises(RegistryError, match="does not match"):
        load_classifier(saved.path, saved.version, _metadata(classes=["a", "b", "c"]))
    with pytest.raises(RegistryError, match="lacks"):
        load_classifier(saved.path, saved.version, {})
    broken = registry.root / "broken.keras"
    broken.write_bytes(b"PK\x05\x06" + b"\0" * 18)  # an empty zip
    with pytest.raises(RegistryError, match="cannot load"):
        load_classifier(broken, "x", _metadata())
