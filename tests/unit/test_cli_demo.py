"""``thyrocad demo`` picks its base weights without trying a download it was not asked for."""

from __future__ import annotations

from pathlib import Path

import pytest

from thyrocad.demo import choose_weights, local_imagenet_weights


@pytest.fixture
def keras_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path / "keras"


def test_no_local_weights_means_a_random_base_at_once(keras_home: Path) -> None:
    said: list[str] = []
    assert local_imagenet_weights("vgg19") is None
    assert choose_weights("auto", said.append) == "none"
    assert len(said) == 1 and "ImageNet weights are not installed here" in said[0]


def test_local_weights_are_used(keras_home: Path) -> None:
    weights = keras_home / "models" / "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"h5")
    said: list[str] = []
    assert local_imagenet_weights("vgg19") == weights
    assert choose_weights("auto", said.append) == "imagenet" and not said


def test_an_explicit_choice_is_kept(keras_home: Path) -> None:
    for asked in ("imagenet", "none", "/weights/vgg19.h5"):
        assert choose_weights(asked, lambda _: None) == asked
