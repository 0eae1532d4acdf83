"""Synthetic ultrasound: deterministic, fast, shaped as the paper's studies, classes differ."""

import time

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from thyrocad.models.synth import VIEWS, SynthImage, synth_patient

SIZE = 64


@pytest.fixture(scope="module")
def cohort():
    """40 patients (20 per class) at 64 px: labels and their five images each."""
    labels, studies = [], []
    for i in range(40):
        label = "autoimmune" if i % 2 else "normal"
        labels.append(label == "autoimmune")
        studies.append(synth_patient(np.random.default_rng(1000 + i), label, SIZE))
    return np.array(labels), studies


def test_five_views_per_patient_as_the_paper():
    assert VIEWS == (
        "right_transverse",
        "right_longitudinal",
        "left_transverse",
        "left_longitudinal",
        "isthmus_transverse",
    )
    images = synth_patient(np.random.default_rng(0), "normal", SIZE)
    assert [image.view for image in images] == list(VIEWS)
    for image in images:
        assert isinstance(image, SynthImage)
        assert image.pixels.dtype == np.uint8
        assert image.pixels.shape == (SIZE, SIZE)
        # A B-mode image: dark shadows and lumens, bright interfaces, speckle in between.
        assert image.pixels.min() < 40 and image.pixels.max() > 200
        assert image.pixels.std() > 15


@pytest.mark.parametrize("label", ["autoimmune", "normal"])
def test_same_seed_same_pixels(label):
    first = synth_patient(np.random.default_rng(42), label, SIZE)
    again = synth_patient(np.random.default_rng(42), label, SIZE)
    other = synth_patient(np.random.default_rng(43), label, SIZE)
    for a, b, c in zip(first, again, other, strict=True):
        np.testing.assert_array_equal(a.pixels, b.pixels)
        assert not np.array_equal(a.pixels, c.pixels)


def test_global_numpy_seed_plays_no_part():
    np.random.seed(1)
    first = synth_patient(np.random.default_rng(5), "autoimmune", SIZE)
    np.random.seed(2)
    again = synth_patient(np.random.default_rng(5), "autoimmune", SIZE)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a.pixels, b.pixels)


def test_other_sizes_work():
    for size in (32, 100):
        images = synth_patient(np.random.default_rng(0), "autoimmune", size)
        assert all(image.pixels.shape == (size, size) for image in images)


@pytest.mark.parametrize(("label", "size"), [("hashimoto", 64), ("normal", 16), ("normal", 64.0)])
def test_bad_arguments_raise(label, size):
    with pytest.raises(ValueError):
        synth_patient(np.random.default_rng(0), label, size)


def test_fast():
    rng = np.random.default_rng(0)
    synth_patient(rng, "autoimmune", SIZE)  # warm-up: imports and FFT plans
    timings = []
    for _ in range(3):
        start = time.perf_counter()
        synth_patient(rng, "autoimmune", SIZE)
        timings.append((time.perf_counter() - start) / len(VIEWS))
    # About 7 ms per 64 px image and 40 ms per 224 px image on one core; the bound leaves
    # room for a busy machine.
    assert np.median(timings) < 0.05


def test_speckle_is_elongated_laterally():
    # The point-spread function is wider laterally than axially, so the speckle grain is
    # too: neighbouring pixels in a row correlate more than neighbours in a column.
    image = synth_patient(np.random.default_rng(3), "normal", 128)[1].pixels.astype(float)
    speckle = image - ndimage.gaussian_filter(image, 3.0)
    lateral = np.corrcoef(speckle[:, :-1].ravel(), speckle[:, 1:].ravel())[0, 1]
    axial = np.corrcoef(speckle[:-1].ravel(), speckle[1:].ravel())[0, 1]
    assert lateral > axial + 0.1


def test_mean_brightness_alone_does_not_separate_the_classes(cohort):
    labels, studies = cohort
    image_means = np.array([[image.pixels.mean() for image in study] for study in studies])
    # Darker means autoimmune; the AUC of either direction must stay far from perfect.
    for scores, truth in (
        (-image_means.ravel(), np.repeat(labels, len(VIEWS))),
        (-image_means.mean(axis=1), labels),
    ):
        auc = roc_auc_score(truth, scores)
        assert max(auc, 1 - auc) < 0.95


def test_gland_heterogeneity_separates_the_classes(cohort):
    # A simple texture feature: the coefficient of variation of the smoothed image inside
    # the gland (the middle of the longitudinal views), where micronodules, patchy
    # hypoechogenicity and septa make autoimmune glands coarse.
    labels, studies = cohort
    rows, cols = slice(int(0.32 * SIZE), int(0.48 * SIZE)), slice(int(0.3 * SIZE), int(0.7 * SIZE))
    scores = []
    for study in studies:
        values = []
        for image in study:
            if image.view.endswith("longitudinal"):
                smooth = ndimage.gaussian_filter(image.pixels[rows, cols].astype(float), 1.5)
                values.append(smooth.std() / (smooth.mean() + 1.0))
        scores.append(np.mean(values))
    assert roc_auc_score(labels, scores) > 0.75
