"""Evidence maps end to end: one Grad-CAM PNG per prediction, stored with it, or none.

A real site (listener, Celery workers on Redis, PostgreSQL) with the tiny VGG-19 of the
integration suite (32 px: ``block5_conv4`` is a 2 x 2 grid) stores one map per
prediction in the prediction's own transaction, the very map the registered model
computes on the spooled image; with ``THYROCAD_EVIDENCE_MAPS=false`` none. In-process,
a failure to compute the maps costs no prediction: it is logged with the prediction
ids and counted.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import keras
import numpy as np
import pytest
import sqlalchemy as sa
from PIL import Image
from sqlalchemy.orm import Session

from tests.db_fixtures import instance_rec, migrated_engine, register_all
from tests.integration.conftest import cli
from tests.integration.site import Pipeline
from tests.procs import free_port, redis_server, wait_for
from thyrocad.db import repository
from thyrocad.db.engine import make_session_factory
from thyrocad.db.repository.evidence import evidence_for
from thyrocad.metrics import metrics
from thyrocad.models.architectures import build_model
from thyrocad.models.classifier import Classifier
from thyrocad.models.gradcam import grad_cam
from thyrocad.models.registry import Registry
from thyrocad.pacs.pixels import FrameImage, FramePolicy, images_from_file
from thyrocad.pacs.sender import send_files
from thyrocad.pacs.spool import Spool
from thyrocad.settings import load_settings
from thyrocad.synthetic import write_synthetic_set
from thyrocad.worker.claims import ClaimBook
from thyrocad.worker.context import WorkerContext
from thyrocad.worker.inference import DecodedBatch, predict_and_store
from thyrocad.worker.model_holder import ModelHolder

pytestmark = pytest.mark.integration

WITHOUT_EVIDENCE = (
    "SELECT count(*) FROM predictions p LEFT JOIN evidence_maps e ON e.prediction_id = p.id "
    "WHERE e.id IS NULL"
)


@contextmanager
def _site(
    tmp_path: Path, pg_url: str, tiny_model: tuple[Path, str], **extra: str
) -> Iterator[Pipeline]:
    registry, version = tiny_model
    with redis_server(tmp_path) as (redis_port, _, _):
        env = {
            "THYROCAD_DATA_DIR": str(tmp_path / "data"),
            "DATABASE_URL": pg_url,
            "CELERY_BROKER_URL": f"redis://127.0.0.1:{redis_port}/0",
            "THYROCAD_PORT": str(free_port()),
            "THYROCAD_STUDY_IDLE_SECONDS": "1",
            "THYROCAD_BATCH_MAX": "4",
            **extra,
        }
        cli("db", "upgrade", env=env)
        cli("models", "promote", version, "--registry", str(registry), env=env)
        site = Pipeline(env, int(env["THYROCAD_PORT"]), tmp_path, sa.create_engine(pg_url))
        try:
            yield site
        finally:
            for name in list(site.procs):
                site.kill(name)
            site.engine.dispose()


def _studies(tmp_path: Path, patients: int, seed: int) -> list[Path]:
    studies = write_synthetic_set(
        tmp_path / f"s{seed}", patients, seed=seed, size=64, id_prefix=f"EV{seed}"
    )
    return [path for study in studies for path in study.paths]


def _maps(classifier: Classifier, paths: list[Path], class_name: str) -> np.ndarray:
    """What the worker should store: the map of ``class_name`` on each image, 0-255."""
    pixels = np.stack([images_from_file(path, classifier.input_size)[0].pixels for path in paths])
    index = classifier.classes.index(class_name)
    return np.rint(grad_cam(classifier.model, pixels, "block5_conv4", index) * 255)


def test_each_prediction_is_stored_with_its_evidence_map(
    tmp_path: Path, pg_url: str, tiny_model: tuple[Path, str]
) -> None:
    registry, version = tiny_model
    files = _studies(tmp_path, 3, seed=41)
    classifier = Registry(registry).load(version)
    # The tiny model barely learned: one class's logit falls with every activation, so
    # its maps are blank. Explain the class whose maps are drawn, so that the maps
    # compared below are not all black.
    drawn = {
        c: int((_maps(classifier, files, c).max(axis=(1, 2)) > 0).sum()) for c in classifier.classes
    }
    positive = max(drawn, key=lambda c: drawn[c])
    assert drawn[positive] >= 1, drawn

    with _site(tmp_path, pg_url, tiny_model, THYROCAD_POSITIVE_CLASS=positive) as site:
        site.start("listener", "inference")
        assert send_files(files, site.peer(), "MODALITY1").ok
        unexplained: list[object] = []

        def all_predicted() -> bool:
            # Read while batches land: a prediction is never visible without its map.
            unexplained.append(site.scalar(WITHOUT_EVIDENCE))
            return site.states().get("predicted", 0) == len(files)

        wait_for(all_predicted, 180, lambda: f"{len(files)} predicted\n{site.logs()}")
        assert set(unexplained) == {0}, unexplained
        with site.engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT p.id, p.model_version, i.spool_path, e.method, e.layer "
                    "FROM predictions p JOIN instances i ON i.id = p.instance_id "
                    "JOIN evidence_maps e ON e.prediction_id = p.id ORDER BY p.id"
                )
            ).all()
    assert len(rows) == len(files)
    assert {(r.model_version, r.method, r.layer) for r in rows} == {
        (version, "grad-cam", "block5_conv4")
    }
    with Session(sa.create_engine(pg_url)) as session:
        stored = evidence_for(session, [r.id for r in rows])
    assert sorted(stored) == [r.id for r in rows]

    # The stored map is the one the registered model computes on the spooled image.
    expected = _maps(classifier, [Path(r.spool_path) for r in rows], positive)
    for row, want in zip(rows, expected, strict=True):
        png = Image.open(io.BytesIO(stored[row.id].png))
        assert (png.format, png.mode, png.size) == ("PNG", "L", (2, 2))  # the layer's grid
        got = np.asarray(png).astype(float)
        assert np.abs(got - want).max() <= 2, (row.id, got, want)
    assert (
        sum(int(np.asarray(Image.open(io.BytesIO(e.png))).max() == 255) for e in stored.values())
        == drawn[positive]
    )


def test_no_evidence_maps_when_switched_off(
    tmp_path: Path, pg_url: str, tiny_model: tuple[Path, str]
) -> None:
    with _site(tmp_path, pg_url, tiny_model, THYROCAD_EVIDENCE_MAPS="false") as site:
        site.start("listener", "inference")
        files = _studies(tmp_path, 2, seed=42)
        assert send_files(files, site.peer(), "MODALITY1").ok
        total = len(files)
        wait_for(
            lambda: site.states().get("predicted", 0) == total,
            180,
            lambda: f"{total} predicted\n{site.logs()}",
        )
        assert site.scalar("SELECT count(*) FROM predictions") == total
        assert site.scalar("SELECT count(*) FROM evidence_maps") == 0


# --------------------------------------------------------------------------- in process


def _batch(ctx: WorkerContext, ids: list[int], images: np.ndarray) -> DecodedBatch:
    token = ctx.claims.open()
    with ctx.sessions.begin() as session:
        claimed = repository.claim_instances(session, len(ids), token, only_ids=ids)
    by_id = {c.instance_id: c for c in claimed}
    frames = [(by_id[i], FrameImage(0, image)) for i, image in zip(ids, images, strict=True)]
    return DecodedBatch(token, frames, [], time.monotonic())


def _failures() -> float:
    metrics()
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("thyrocad_evidence_failures_total") or 0.0


def test_a_failure_to_compute_evidence_costs_no_prediction(
    tmp_path: Path, pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    keras.utils.set_random_seed(3)
    classes = ("autoimmune", "normal")
    good = Classifier.from_model(
        build_model("vgg19", classes, input_size=32, weights=None), "v-good", "vgg19", classes, 32
    )
    # A model that says it is a VGG-19 but has no block5_conv4: Grad-CAM cannot run.
    image = keras.Input((32, 32, 1))
    x = keras.layers.Conv2D(4, 3, activation="relu")(image)
    out = keras.layers.Dense(2, activation="softmax")(keras.layers.GlobalAveragePooling2D()(x))
    odd = Classifier.from_model(keras.Model(image, out), "v-good", "vgg19", classes, 32)
    images = np.random.default_rng(8).integers(0, 256, (3, 32, 32), dtype=np.uint8)

    with migrated_engine(pg_url) as engine:
        settings = load_settings(data_dir=tmp_path, evidence_maps=True)
        ctx = WorkerContext(
            settings=settings,
            engine=engine,
            sessions=make_session_factory(engine),
            spool=Spool(settings.spool_dir),
            frame_policy=FramePolicy.parse("middle"),
            models=ModelHolder(),
            claims=ClaimBook("test/0"),
        )
        ids = register_all(ctx.sessions, [instance_rec(f"1.2.3.{i}") for i in range(3)])
        assert predict_and_store(ctx, _batch(ctx, ids, images), good) == 3
        predictions = sa.text("SELECT id FROM predictions ORDER BY id")
        with ctx.sessions() as session:
            prediction_ids = list(session.execute(predictions).scalars())
            assert sorted(evidence_for(session, prediction_ids)) == prediction_ids

        # The same instances predicted again (their bytes replaced) by a model whose maps
        # cannot be made: predictions stored, the earlier maps gone (they showed the old
        # computation), the failure logged with the prediction ids and counted.
        with ctx.sessions.begin() as session:
            session.execute(sa.text("UPDATE instances SET state = 'received'"))
        before = _failures()
        with caplog.at_level(logging.WARNING, logger="thyrocad.worker.evidence"):
            assert predict_and_store(ctx, _batch(ctx, ids, images), odd) == 3
        with ctx.sessions() as session:
            again = list(session.execute(predictions).scalars())
            assert again == prediction_ids  # upserted in place, one per instance
            assert evidence_for(session, again) == {}
            states = session.execute(sa.text("SELECT DISTINCT state FROM instances")).scalars()
            assert list(states) == ["predicted"]
        assert _failures() - before == 3
        (warning,) = [r for r in caplog.records if r.name == "thyrocad.worker.evidence"]
        assert warning.prediction_ids == prediction_ids  # type: ignore[attr-defined]
        assert "no layer 'block5_conv4'" in warning.getMessage()
        assert "Doe" not in warning.getMessage() and "PAT-1" not in warning.getMessage()
