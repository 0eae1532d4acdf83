"""One ``.keras`` artifact, two Keras backends: TensorFlow (the default) and JAX.

Each backend runs in its own process (Keras picks its backend once, at import), loads
the same registry version, preprocesses the same real ultrasound files through
``pacs.pixels`` and predicts through the inference path (``Classifier``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from tests.dicom_data import ultrasound_test_files
from tests.integration.conftest import cli
from tests.integration.site import Pipeline
from tests.procs import ROOT, free_port, redis_server, wait_for
from thyrocad.pacs.sender import send_files
from thyrocad.synthetic import write_synthetic_set

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Real files in the encodings ultrasound machines send (uncompressed RGB, palette,
# RLE, JPEG baseline multi-frame, JPEG lossless, JPEG 2000).
FILES = (
    "US1_UNCR.dcm",
    "US1_J2KR.dcm",
    "OBXXXX1A.dcm",
    "OBXXXX1A_rle.dcm",
    "color3d_jpeg_baseline.dcm",
    "JPGLosslessP14SV1_1s_1f_8b.dcm",
)

PREDICT = r"""
import json, sys
import keras, numpy as np
from thyrocad.models.registry import Registry
from thyrocad.pacs.pixels import images_from_file

registry, version, *paths = sys.argv[1:]
classifier = Registry(registry).load(version)
size = classifier.input_size
images = np.stack([images_from_file(p, size)[0].pixels for p in paths])
probabilities = classifier.predict(images)
# The base's output: a wide range of values, so a preprocessing difference shows.
model = classifier.model
preprocess, base = model.get_layer("preprocess"), model.layers[2]
features = base(preprocess(images[..., None].astype("float32")), training=False)
print(json.dumps({
    "backend": keras.backend.backend(),
    "probabilities": np.asarray(probabilities).tolist(),
    "features": np.asarray(keras.ops.convert_to_numpy(features)).reshape(len(paths), -1).tolist(),
}))
"""


def _predict(backend: str, registry: Path, version: str, paths: list[Path]) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", PREDICT, str(registry), version, *map(str, paths)],
        env={**os.environ, "KERAS_BACKEND": backend},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["backend"] == backend
    return result


def test_the_same_artifact_predicts_the_same_under_tensorflow_and_jax(
    tiny_model: tuple[Path, str],
) -> None:
    registry, version = tiny_model
    by_name = {p.name: p for p in ultrasound_test_files()}
    paths = [by_name[name] for name in FILES]

    tf = _predict("tensorflow", registry, version, paths)
    jax = _predict("jax", registry, version, paths)

    tf_p, jax_p = np.asarray(tf["probabilities"]), np.asarray(jax["probabilities"])
    assert tf_p.shape == (len(paths), 2)
    assert np.abs(tf_p - jax_p).max() <= 1e-4, (tf_p, jax_p)
    tf_f, jax_f = np.asarray(tf["features"]), np.asarray(jax["features"])
    # Different images give different features: the comparison is not of constants.
    scale = np.abs(tf_f).max()
    assert np.ptp(tf_f, axis=0).max() > 0.1 * scale
    assert np.abs(tf_f - jax_f).max() <= 1e-4 * scale, np.abs(tf_f - jax_f).max() / scale


@pytest.fixture
def jax_pipeline(tmp_path: Path, pg_url: str, tiny_model: tuple[Path, str]) -> Iterator[Pipeline]:
    registry, version = tiny_model
    with redis_server(tmp_path) as (redis_port, _, _):
        port = free_port()
        env = {
            "THYROCAD_DATA_DIR": str(tmp_path / "data"),
            "DATABASE_URL": pg_url,
            "CELERY_BROKER_URL": f"redis://127.0.0.1:{redis_port}/0",
            "THYROCAD_PORT": str(port),
            "THYROCAD_STUDY_IDLE_SECONDS": "1",
            "THYROCAD_BATCH_MAX": "8",
            "KERAS_BACKEND": "jax",
        }
        cli("db", "upgrade", env=env)
        cli("models", "promote", version, "--registry", str(registry), env=env)
        p = Pipeline(env, port, tmp_path, sa.create_engine(pg_url))
        try:
            yield p
        finally:
            for name in list(p.procs):
                p.kill(name)
            p.engine.dispose()


def test_a_pipeline_under_jax_stores_predictions(jax_pipeline: Pipeline, tmp_path: Path) -> None:
    jax_pipeline.start()
    studies = write_synthetic_set(tmp_path / "s", 2, seed=81, size=64, id_prefix="JAX")
    files = [path for study in studies for path in study.paths]
    assert send_files(files, jax_pipeline.peer(), "MODALITY1").ok
    wait_for(
        lambda: jax_pipeline.scalar("SELECT count(*) FROM study_results") == len(studies),
        180,
        lambda: f"study results under JAX:\n{jax_pipeline.logs()}",
    )
    assert jax_pipeline.states() == {"predicted": len(files)}
    assert jax_pipeline.scalar("SELECT count(*) FROM predictions") == len(files)
    assert "classifier loaded on the jax backend" in (tmp_path / "inference.log").read_text()
