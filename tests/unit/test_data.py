"""Dataset discovery, patient-level splits, augmentation and fingerprints."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from thyrocad.models.data import (
    ImageRecord,
    Split,
    augment,
    discover,
    fingerprint,
    split_by_patient,
)
from thyrocad.models.errors import DatasetError


def _png(path: Path, value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, np.uint8)).save(path)
    return path


def _fake_dicom(path: Path) -> Path:
    """Preamble + "DICM": all discover looks at (decoding is pacs' job)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 16)
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    _png(root / "autoimmune" / "p1" / "a.png")
    _png(root / "autoimmune" / "p1" / "b.JPG")
    _fake_dicom(root / "autoimmune" / "p2" / "img.dcm")
    _fake_dicom(root / "normal" / "p3" / "1.2.840.1")  # DICOM named by its UID
    _fake_dicom(root / "normal" / "p3" / "IM0001")
    (root / "normal" / "p3" / "README").write_text("not an image")
    (root / "normal" / "p3" / "notes.txt").write_text("not an image")
    _png(root / "normal" / "p3" / ".hidden.png")
    (root / "LICENSE").write_text("ignored: not a class folder")
    return root


def test_discover_folder(folder: Path) -> None:
    records = discover(folder, classes=("autoimmune", "normal"))
    found = {(r.label, r.patient_id, r.path.name) for r in records}
    assert found == {
        ("autoimmune", "p1", "a.png"),
        ("autoimmune", "p1", "b.JPG"),
        ("autoimmune", "p2", "img.dcm"),
        ("normal", "p3", "1.2.840.1"),
        ("normal", "p3", "IM0001"),
    }
    assert all(isinstance(r, ImageRecord) and r.path.is_file() for r in records)
    assert records == discover(folder)  # sorted, deterministic


def test_discover_folder_unknown_label(folder: Path) -> None:
    with pytest.raises(DatasetError, match=r"\['normal'\] outside"):
        discover(folder, classes=("autoimmune", "benign"))


def test_discover_folder_layout_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        discover(tmp_path / "absent")
    (tmp_path / "empty" / "normal" / "p1").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no images found"):
        discover(tmp_path / "empty")
    _png(tmp_path / "flat" / "normal" / "a.png")
    with pytest.raises(DatasetError, match="directly in a class folder"):
        discover(tmp_path / "flat")
    other = tmp_path / "x.json"
    other.write_text("{}")
    with pytest.raises(DatasetError, match="neither"):
        discover(other)


def test_discover_manifest(tmp_path: Path) -> None:
    _png(tmp_path / "images" / "a.png")
    absolute = _png(tmp_path / "elsewhere" / "b.png")
    manifest = tmp_path / "set.csv"
    manifest.write_text(
        f"path,patient_id,label\nimages/a.png,p1,normal\n{absolute},p2,autoimmune\n"
    )
    records = discover(manifest, classes=("autoimmune", "normal"))
    assert records == [
        ImageRecord(absolute, "p2", "autoimmune"),
        ImageRecord(tmp_path / "images" / "a.png", "p1", "normal"),
    ]


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("path,patient_id,label\nmissing.png,p1,normal\n", "1 missing file"),
        ("path,patient\nimages/a.png,p1\n", r"lacks column.*label"),
        ("path,patient_id,label\nimages/a.png,p1,cancer\n", r"\['cancer'\] outside"),
        ("path,patient_id,label\n", "no images found"),
        ("path,patient_id,label\nimages/a.png,,normal\n", "empty path, patient or label"),
    ],
)
def test_discover_manifest_errors(tmp_path: Path, text: str, pattern: str) -> None:
    _png(tmp_path / "images" / "a.png")
    manifest = tmp_path / "set.csv"
    manifest.write_text(text)
    with pytest.raises(DatasetError, match=pattern):
        discover(manifest, classes=("autoimmune", "normal"))


def _dataset(seed: int) -> tuple[list[str], list[str]]:
    """Random patients (1-6 images each, imbalanced classes) as per-image lists."""
    rng = np.random.default_rng(seed)
    patients: list[str] = []
    labels: list[str] = []
    for i in range(int(rng.integers(8, 40))):
        label = "autoimmune" if rng.random() < 0.67 else "normal"
        for _ in range(int(rng.integers(1, 7))):
            patients.append(f"P{i:03d}")
            labels.append(label)
    order = rng.permutation(len(patients))
    return [patients[i] for i in order], [labels[i] for i in order]


@pytest.mark.parametrize("seed", range(12))
def test_split_never_leaks_a_patient(seed: int) -> None:
    patients, labels = _dataset(seed)
    split = split_by_patient(patients, labels, 0.2, 0.15, seed=seed)
    train, val, test = set(split.train), set(split.validation), set(split.test)
    assert not train & val and not train & test and not val & test
    assert train | val | test == set(patients)
    by_patient = dict(zip(patients, labels, strict=True))
    for label in set(labels):
        members = [p for p in by_patient if by_patient[p] == label]
        in_train = [p for p in members if p in train]
        assert in_train, "every class keeps at least one training patient"
        if len(members) >= 2:
            n_test = sum(p in test for p in members)
            assert n_test >= 1, "every class with two or more patients is tested"
            assert abs(n_test - 0.2 * len(members)) <= 1


def test_split_is_deterministic_and_order_free() -> None:
    patients, labels = _dataset(99)
    first = split_by_patient(patients, labels, seed=5)
    reverse = split_by_patient(patients[::-1], labels[::-1], seed=5)
    assert first == reverse
    assert isinstance(first, Split)
    assert first.validation == ()
    assert first.train == tuple(sorted(first.train))
    others = {split_by_patient(patients, labels, seed=s).test for s in range(6)}
    assert len(others) > 1, "the seed changes the split"


def test_split_stratifies() -> None:
    patients = [f"a{i}" for i in range(40)] + [f"n{i}" for i in range(20)]
    labels = ["autoimmune"] * 40 + ["normal"] * 20
    split = split_by_patient(patients, labels, test_fraction=0.25, seed=3)
    counts = Counter(p[0] for p in split.test)
    assert counts == {"a": 10, "n": 5}


def test_split_refuses_mixed_labels_and_bad_input() -> None:
    with pytest.raises(DatasetError, match=r"\['p1'\] have images with different labels"):
        split_by_patient(["p1", "p1", "p2"], ["normal", "autoimmune", "normal"])
    with pytest.raises(DatasetError, match="empty"):
        split_by_patient([], [])
    with pytest.raises(DatasetError, match="one of each"):
        split_by_patient(["p1"], [])
    with pytest.raises(DatasetError, match="below 1"):
        split_by_patient(["p1", "p2"], ["a", "b"], test_fraction=0.6, validation_fraction=0.4)


def test_augment_shifts_and_zooms() -> None:
    images = np.zeros((3, 40, 40), np.uint8)
    images[:, 15:25, 15:25] = 200
    out = augment(images, np.random.default_rng(0))
    assert out.shape == images.shape and out.dtype == np.uint8
    assert not np.array_equal(out, images)
    # Same generator state, same result; the bright square survives a 10 % move.
    np.testing.assert_array_equal(out, augment(images, np.random.default_rng(0)))
    assert (out > 100).sum(axis=(1, 2)).min() > 50
    identity = augment(images, np.random.default_rng(0), max_shift=0.0, max_zoom=0.0)
    np.testing.assert_array_equal(identity, images)
    channel = augment(images[..., None], np.random.default_rng(0))
    np.testing.assert_array_equal(channel[..., 0], out)
    with pytest.raises(DatasetError, match="uint8"):
        augment(images.astype(np.float32), np.random.default_rng(0))


def test_augment_moves_content_by_the_drawn_shift() -> None:
    image = np.zeros((1, 50, 50), np.uint8)
    image[0, 20:30, 20:30] = 255
    out = augment(image, np.random.default_rng(1), max_shift=0.1, max_zoom=0.0)
    before = np.argwhere(image[0] > 127).mean(axis=0)
    after = np.argwhere(out[0] > 127).mean(axis=0)
    moved = after - before
    assert 0 < np.abs(moved).max() <= 5.01


def test_fingerprint_tracks_pixels_labels_and_patients() -> None:
    images = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4)
    base = fingerprint(images, ["a", "b"], ["p1", "p2"])
    assert len(base) == 64 and base == fingerprint(images.copy(), ["a", "b"], ["p1", "p2"])
    changed = images.copy()
    changed[0, 0, 0] += 1
    assert fingerprint(changed, ["a", "b"], ["p1", "p2"]) != base
    assert fingerprint(images, ["b", "a"], ["p1", "p2"]) != base
    assert fingerprint(images, ["a", "b"], ["p1", "p3"]) != base
    assert fingerprint(images.reshape(2, 2, 8), ["a", "b"], ["p1", "p2"]) != base
