"""Grad-CAM (``models.gradcam``): the map points at the class evidence, and is Grad-CAM.

A tiny network with thyrocad's layout (``image -> preprocess -> base -> head``, a
Flatten head ending in softmax) is trained for a few seconds on synthetic images in
which the positive class is a bright blob somewhere in one quadrant and both classes
carry a bright bar as a distractor; the map of held-out positives must peak on the
blob, follow it when it moves, and not point there for the other class. The maps of
the paper's two architectures are checked against Grad-CAM worked out by hand in
numpy from the model's own weights, and a GAP -> Dense head against plain CAM.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
from PIL import Image

from tests.procs import ROOT
from thyrocad.models.architectures import BackbonePreprocessing, build_model, get_spec
from thyrocad.models.gradcam import EvidenceError, evidence_png, find_layer, grad_cam

SIZE = 32  # images; the evidence layer's grid is SIZE / 4 = 8 x 8
POSITIVE = 0


def _quadrant_centre(rng: np.random.Generator, quadrant: int) -> tuple[float, float]:
    """A random point of ``quadrant`` (0 top left … 3 bottom right), 4 px from its edges."""
    top, left = (quadrant // 2) * SIZE // 2, (quadrant % 2) * SIZE // 2
    return top + rng.uniform(4, 12), left + rng.uniform(4, 12)


def _background(rng: np.random.Generator) -> np.ndarray:
    """Speckle with a bright horizontal bar somewhere: in both classes, no evidence."""
    image = rng.normal(60, 12, (SIZE, SIZE))
    row, col = rng.integers(2, SIZE - 2), rng.integers(0, SIZE - 10)
    image[row, col : col + 10] += 110
    return image


def _with_blob(background: np.ndarray, centre: tuple[float, float] | None) -> np.ndarray:
    image = background.copy()
    if centre is not None:
        yy, xx = np.mgrid[:SIZE, :SIZE]
        image += 140 * np.exp(-((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) / 8.0)
    return np.clip(image, 0, 255).astype(np.uint8)


def _dataset(seed: int, n: int) -> tuple[np.ndarray, np.ndarray, list[Any]]:
    """Half positives (a blob in a random quadrant), half negatives; labels, centres."""
    rng = np.random.default_rng(seed)
    images, labels, centres = [], [], []
    for i in range(n):
        centre = _quadrant_centre(rng, int(rng.integers(4))) if i % 2 == 0 else None
        images.append(_with_blob(_background(rng), centre))
        labels.append(POSITIVE if centre is not None else 1)
        centres.append(centre)
    return np.stack(images), np.array(labels), centres


def _tiny_model(seed: int = 0) -> Any:
    def init(k: int) -> Any:
        return keras.initializers.GlorotUniform(seed=seed + k)

    base_in = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", kernel_initializer=init(1))(
        base_in
    )
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", kernel_initializer=init(2))(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(
        16, 3, padding="same", activation="relu", kernel_initializer=init(3), name="last_conv"
    )(x)
    base = keras.Model(base_in, x, name="base")
    head_in = keras.Input(tuple(x.shape[1:]))
    h = keras.layers.Flatten()(head_in)
    h = keras.layers.Dense(16, activation="relu", kernel_initializer=init(4), name="fc")(h)
    h = keras.layers.Dense(2, activation="softmax", kernel_initializer=init(5), name="predictions")(
        h
    )
    head = keras.Model(head_in, h, name="head")
    image = keras.Input((SIZE, SIZE, 1), name="image")
    out = head(base(BackbonePreprocessing("tf", name="preprocess")(image), training=False))
    model = keras.Model(image, out, name="tiny")
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    return model


@pytest.fixture(scope="module")
def trained() -> Any:
    keras.utils.set_random_seed(0)
    images, labels, _ = _dataset(seed=0, n=800)
    model = _tiny_model()
    model.fit(images[..., None].astype("float32"), labels, epochs=8, batch_size=32, verbose=0)
    return model


def _peak_quadrant(cam: np.ndarray) -> int:
    row, col = np.unravel_index(int(np.argmax(cam)), cam.shape)
    return int(row * 2 // cam.shape[0]) * 2 + int(col * 2 // cam.shape[1])


def _quadrant(centre: tuple[float, float]) -> int:
    return int(centre[0] // (SIZE // 2)) * 2 + int(centre[1] // (SIZE // 2))


def test_the_map_peaks_on_the_class_evidence_of_held_out_images(trained: Any) -> None:
    images, labels, centres = _dataset(seed=1, n=200)
    probabilities = trained.predict(images[..., None].astype("float32"), verbose=0)
    assert (probabilities.argmax(axis=1) == labels).mean() >= 0.95  # it learned the task
    positives = labels == POSITIVE
    blobs = [_quadrant(c) for c, p in zip(centres, positives, strict=True) if p]

    cams = grad_cam(trained, images[positives], "last_conv", POSITIVE)
    assert cams.shape == (int(positives.sum()), 8, 8)
    hits = np.mean([_peak_quadrant(cam) == q for cam, q in zip(cams, blobs, strict=True)])
    assert hits >= 0.95, hits
    # The peak is on the blob, not merely in its quadrant: within 6 px of its centre.
    peaks = [np.unravel_index(int(np.argmax(cam)), cam.shape) for cam in cams]
    distances = [
        np.hypot(4 * r + 2 - c[0], 4 * k + 2 - c[1])
        for (r, k), c in zip(peaks, [c for c in centres if c is not None], strict=True)
    ]
    assert np.median(distances) <= 4.0, np.median(distances)

    # The other class's map does not point at the positive class's evidence.
    others = grad_cam(trained, images[positives], "last_conv", 1)
    wrong = np.mean([_peak_quadrant(cam) == q for cam, q in zip(others, blobs, strict=True)])
    assert wrong <= 0.4, wrong


def test_the_peak_moves_with_the_blob(trained: Any) -> None:
    rng = np.random.default_rng(2)
    here, there, quadrants = [], [], []
    for k in range(24):
        background = _background(rng)
        quadrant = k % 4
        here.append(_with_blob(background, _quadrant_centre(rng, quadrant)))
        there.append(_with_blob(background, _quadrant_centre(rng, 3 - quadrant)))
        quadrants.append(quadrant)
    first = grad_cam(trained, np.stack(here), "last_conv", POSITIVE)
    second = grad_cam(trained, np.stack(there), "last_conv", POSITIVE)
    assert np.mean([_peak_quadrant(c) == q for c, q in zip(first, quadrants, strict=True)]) >= 0.9
    assert (
        np.mean([_peak_quadrant(c) == 3 - q for c, q in zip(second, quadrants, strict=True)]) >= 0.9
    )


def test_maps_are_normalised_and_batched_alike(trained: Any) -> None:
    images, _, _ = _dataset(seed=3, n=10)
    cams = grad_cam(trained, images, "last_conv", POSITIVE)
    assert cams.dtype == np.float32 and cams.shape == (10, 8, 8)
    assert cams.min() >= 0.0 and cams.max() <= 1.0
    peaks = cams.max(axis=(1, 2))
    assert np.all((peaks == 0.0) | np.isclose(peaks, 1.0))
    assert np.isclose(peaks, 1.0).sum() >= 5  # most maps are not blank
    # Batch size, the trailing channel axis and the dtype of the pixels change nothing.
    np.testing.assert_allclose(
        grad_cam(trained, images[..., None], "last_conv", POSITIVE, batch_size=3), cams, atol=1e-5
    )
    np.testing.assert_allclose(
        grad_cam(trained, images.astype(np.float32), "last_conv", POSITIVE), cams, atol=1e-5
    )
    assert grad_cam(trained, images[:0], "last_conv", POSITIVE).shape == (0, 8, 8)


def test_errors_say_what_is_wrong(trained: Any) -> None:
    images, _, _ = _dataset(seed=4, n=2)
    with pytest.raises(EvidenceError, match="no layer 'block5_conv4'"):
        grad_cam(trained, images, "block5_conv4", POSITIVE)
    with pytest.raises(EvidenceError, match="not a convolutional feature map"):
        grad_cam(trained, images, "fc", POSITIVE)
    with pytest.raises(EvidenceError, match="class_index 2 is out of range for 2 classes"):
        grad_cam(trained, images, "last_conv", 2)
    with pytest.raises(EvidenceError, match=r"takes images of shape \(N, 32, 32, 1\)"):
        grad_cam(trained, images[:, :16], "last_conv", POSITIVE)
    assert find_layer(trained, "last_conv").name == "last_conv"  # found inside "base"


def _hand_grad_cam(activations: np.ndarray, channel_gradients: np.ndarray) -> np.ndarray:
    """Grad-CAM from activations (N, h, w, C) and channel weights (N, C), in numpy."""
    cam = np.maximum(np.einsum("nhwc,nc->nhw", activations, channel_gradients), 0.0)
    peak = cam.max(axis=(1, 2), keepdims=True)
    return np.where(peak > 0, cam / np.where(peak > 0, peak, 1.0), 0.0)


@pytest.mark.parametrize(("arch", "size"), [("vgg19", 64), ("inception_v3", 139)])
def test_the_papers_architectures_give_grad_cam_worked_out_by_hand(arch: str, size: int) -> None:
    """The evidence layer of each spec, cut in the nested base, and the gradient of the
    class's log-odds.

    Both heads are ``pool -> Dense relu -> Dense softmax`` over two classes: the score is
    ``z_c - z_other``, so its gradient with respect to the pooled features is
    ``W1 @ (relu'(h) * (w2[:, c] - w2[:, other]))``. VGG's
    2 x 2 max pool hands each window's gradient to one position, Inception's average
    pool spreads it evenly, so either way the grid-averaged gradient of a channel is
    proportional to the sum of its pooled gradients — all that Grad-CAM needs.
    """
    keras.utils.set_random_seed(1)
    model = build_model(arch, input_size=size, weights=None)
    layer = get_spec(arch).evidence_layer
    images = np.random.default_rng(5).integers(0, 256, (4, size, size), dtype=np.uint8)
    preprocess, base, head = (model.get_layer(n) for n in ("preprocess", arch, "head"))
    inputs = preprocess(images[..., None].astype("float32"))
    activations = np.asarray(keras.Model(base.inputs, base.get_layer(layer).output)(inputs))
    features = np.asarray(base(inputs))
    pooled = features.reshape(len(images), -1) if arch == "vgg19" else features.mean(axis=(1, 2))
    w1, b1 = (np.asarray(v) for v in head.get_layer("fc").weights)
    w2 = np.asarray(head.get_layer("predictions").kernel)

    drawn = 0
    for class_index in (0, 1):
        relu_grad = (pooled @ w1 + b1 > 0).astype(np.float64)
        d_logits = w2[:, class_index] - w2[:, 1 - class_index]
        d_pooled = (relu_grad * d_logits) @ w1.T  # (N, pooled features)
        channels = activations.shape[-1]
        weights = d_pooled.reshape(len(images), -1, channels).sum(axis=1)
        expected = _hand_grad_cam(activations.astype(np.float64), weights)
        cams = grad_cam(model, images, layer, class_index)
        assert cams.shape == (len(images), *activations.shape[1:3])
        np.testing.assert_allclose(cams, expected, atol=2e-3)
        drawn += int((expected.max(axis=(1, 2)) > 0).sum())
    assert drawn >= 2  # not a comparison of blank maps only


def test_mixed_precision_gives_the_float32_maps() -> None:
    """A GPU worker computes in mixed_float16 (set on the loaded model's layers)."""
    from thyrocad.models.classifier import use_mixed_precision

    keras.utils.set_random_seed(1)
    model = build_model("vgg19", input_size=64, weights=None)
    images = np.random.default_rng(5).integers(0, 256, (4, 64, 64), dtype=np.uint8)
    float32 = grad_cam(model, images, "block5_conv4", 1)
    use_mixed_precision(model)  # after a first call: the cut made then is not reused
    mixed = grad_cam(model, images, "block5_conv4", 1)
    assert mixed.dtype == np.float32 and (float32.max(axis=(1, 2)) > 0).all()
    np.testing.assert_allclose(mixed, float32, atol=0.02)
    # Computed in float16 indeed (a function traced under float32 would give these exactly).
    assert not np.array_equal(mixed, float32)


def test_a_gap_dense_head_gives_plain_cam() -> None:
    """With GAP -> Dense softmax, Grad-CAM's channel weights are the Dense weights applied
    to ``e_c - q``, the gradient of the class's log-odds ``z_c - logsumexp(z_others)``
    (``q`` the softmax of the other classes' logits, 0 at c)."""
    keras.utils.set_random_seed(2)
    image = keras.Input((16, 16, 1))
    features = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="conv")(image)
    pooled = keras.layers.GlobalAveragePooling2D()(features)
    out = keras.layers.Dense(3, activation="softmax", name="out")(pooled)
    model = keras.Model(image, out)
    images = np.random.default_rng(6).random((5, 16, 16, 1)).astype("float32") * 255
    activations = np.asarray(keras.Model(image, features)(images), dtype=np.float64)
    kernel, bias = (np.asarray(v, dtype=np.float64) for v in model.get_layer("out").weights)
    logits = activations.mean(axis=(1, 2)) @ kernel + bias
    for class_index in range(3):
        others = np.exp(logits - logits.max(axis=1, keepdims=True))
        others[:, class_index] = 0.0
        others /= others.sum(axis=1, keepdims=True)
        weights = (np.eye(3)[class_index] - others) @ kernel.T  # (N, channels)
        expected = _hand_grad_cam(activations, weights)
        np.testing.assert_allclose(
            grad_cam(model, images, "conv", class_index), expected, atol=1e-4
        )  # float32 against float64


def test_the_png_is_the_map_at_its_grid_with_255_at_the_peak() -> None:
    cam = np.zeros((14, 10), dtype=np.float32)
    cam[3, 7], cam[9, 2] = 1.0, 0.5
    decoded = Image.open(io.BytesIO(evidence_png(cam)))
    assert decoded.format == "PNG" and decoded.mode == "L" and decoded.size == (10, 14)
    pixels = np.asarray(decoded)
    assert pixels[3, 7] == 255 and pixels[9, 2] == 128 and pixels.sum() == 255 + 128
    # An unnormalised map is scaled to its own peak; a blank one stays black.
    assert np.asarray(Image.open(io.BytesIO(evidence_png(cam * 0.2))))[3, 7] == 255
    assert np.asarray(Image.open(io.BytesIO(evidence_png(cam * 0)))).max() == 0
    for bad, message in (
        (np.ones((2, 2, 2)), "2-D"),
        (np.full((2, 2), np.nan), "NaN"),
        (-np.ones((2, 2)), "negative"),
    ):
        with pytest.raises(EvidenceError, match=message):
            evidence_png(bad)


JAX_MAPS = r"""
import json, sys
import keras, numpy as np
import thyrocad.models.architectures  # registers BackbonePreprocessing
from thyrocad.models.gradcam import grad_cam

path, images = sys.argv[1], np.load(sys.argv[2])
model = keras.saving.load_model(path, compile=False)
print(json.dumps({"backend": keras.backend.backend(),
                  "maps": grad_cam(model, images, "last_conv", 0).tolist()}))
"""


def test_jax_gives_the_same_maps(trained: Any, tmp_path: Path) -> None:
    images, _, _ = _dataset(seed=7, n=8)
    path = tmp_path / "tiny.keras"
    trained.save(path)
    np.save(tmp_path / "images.npy", images)
    done = subprocess.run(
        [sys.executable, "-c", JAX_MAPS, str(path), str(tmp_path / "images.npy")],
        env={**os.environ, "KERAS_BACKEND": "jax"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["backend"] == "jax"
    expected = grad_cam(trained, images, "last_conv", POSITIVE)
    assert (expected.max(axis=(1, 2)) > 0).sum() >= 4  # the maps compared are not blank
    np.testing.assert_allclose(np.asarray(result["maps"]), expected, atol=1e-4)
