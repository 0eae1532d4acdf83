"""Training registers a version with its hold-out evaluation beside it: the metrics in
its metadata and the report with its ROC and PR plots (the web page's models page
shows them) in its evaluation folder, written before the version appears."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from thyrocad.models.evaluation_report import EVALUATION_FOLDER
from thyrocad.models.registration import train_and_register
from thyrocad.models.registry import Registry


@pytest.mark.slow
def test_a_trained_version_holds_its_evaluation_report(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n, size = 40, 32
    images = rng.integers(0, 60, size=(n, size, size), dtype=np.uint8)
    labels = ["autoimmune" if i % 2 else "normal" for i in range(n)]
    images[1::2, 8:24, 8:24] += 150  # the positive class is brighter in the middle
    trained = train_and_register(
        images,
        labels,
        [f"p{i}" for i in range(n)],
        classes=("autoimmune", "normal"),
        positive_class="autoimmune",
        arch="vgg19",
        epochs=1,
        batch_size=8,
        input_size=size,
        weights="none",
        seed=0,
        registry_dir=tmp_path / "models",
        test_fraction=0.5,
    )
    assert trained.metrics is not None
    saved = Registry(tmp_path / "models").get(trained.version)
    report = saved.path.parent / EVALUATION_FOLDER  # path is the version's model.keras
    assert json.loads((report / "report.json").read_text()) == trained.metrics
    for plot in ("roc.png", "pr.png"):
        assert (report / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "models").glob(".tmp-*"))  # staged, then renamed whole
