"""The refit: radiologists' labels → a candidate model → a fair comparison → promotion.

:func:`refit` does one attempt, start to end:

1. **Decide** (one short transaction, serialised across processes): close runs whose
   process died, skip if a refit is running, skip unless enough patients got new
   labels since the last refit (``force`` overrides), snapshot the labelled images,
   decide hold-out membership for new patients, record a ``running`` training run.
2. **Train** a candidate with the active model's architecture and training settings
   on the labelled studies' spooled images outside the hold-out, decoded by
   ``pacs.pixels`` exactly as inference decodes them (``pacs.datasets``).
3. **Compare** candidate and active model on the fixed patient-level hold-out with
   ``models.evaluation``; promote only if the candidate's patient AUC is at least the
   active one's minus a tolerance and its patient sensitivity reaches a floor.
4. **Record**: the version enters ``model_versions`` (active, or candidate with the
   reason) in the same transaction that closes the run — only after the registry
   wrote the artifact atomically. A process killed at any point leaves at most an
   unregistered artifact folder and a ``running`` row that the next attempt closes.

Patients are pseudonymised (a hash of the patient key) before anything reaches the
training code, so neither the registry metadata nor ``training_runs`` hold PatientIDs.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError

from thyrocad.db import repository
from thyrocad.db.engine import make_session_factory
from thyrocad.db.records import ModelVersionRecord
from thyrocad.settings import Settings
from thyrocad.worker import learning_store as store
from thyrocad.worker.learning_store import LabelledImage
from thyrocad.worker.model_selection import (
    Decision,
    PromotionRule,
    decide,
    in_holdout,
    patient_metric,
    pseudonym,
)
from thyrocad.worker.versions import version_record

logger = logging.getLogger(__name__)

EpochCallback = Callable[[int, dict[str, float]], None]
PREDICT_BATCH = 32


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# --------------------------------------------------------------------------- outcome


@dataclass(frozen=True)
class RefitOutcome:
    """What one refit attempt did.

    ``outcome``: ``skipped`` (nothing recorded: already running, too few new labels,
    no active model), or the run's outcome ``promoted``, ``candidate`` or ``failed``.
    ``metrics``: patient-level hold-out AUC and sensitivity of both models, when known.
    """

    outcome: str
    reason: str
    run_id: int | None = None
    candidate_version: str | None = None
    active_version: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome,
            "reason": self.reason,
            "run_id": self.run_id,
            "candidate_version": self.candidate_version,
            "active_version": self.active_version,
            "metrics": self.metrics,
        }


class RefitFailed(Exception):
    """A refit that cannot produce a candidate (no usable data, unreadable model)."""


@dataclass(frozen=True)
class _Claimed:
    run_id: int
    active: ModelVersionRecord
    train: tuple[LabelledImage, ...]
    holdout: tuple[LabelledImage, ...]
    parameters: dict[str, Any]
    # PostgreSQL: the connection holding this run's owner lock; closing it ends the run's claim.
    owner: Any = None


# --------------------------------------------------------------------------- step 1: decide


def _decide_holdout(
    session: Any, keys: Sequence[str], fraction: float, now: dt.datetime
) -> set[str]:
    """Hold-out keys among ``keys``, deciding (once, for good) the patients still undecided."""
    decided = store.holdout_decisions(session)
    for key in keys:
        if key not in decided:
            decided[key] = repository.decide_holdout(session, key, in_holdout(key, fraction), now)
    return {key for key in keys if decided[key]}


def _usable(
    images: Sequence[LabelledImage], classes: Sequence[str]
) -> tuple[list[LabelledImage], dict[str, int]]:
    """Drop studies with a diagnosis outside the classes and patients whose studies disagree."""
    known = [img for img in images if img.diagnosis in classes]
    by_patient: dict[str, set[str]] = {}
    for img in known:
        by_patient.setdefault(img.patient_key, set()).add(img.diagnosis)
    conflicting = {key for key, found in by_patient.items() if len(found) > 1}
    usable = [img for img in known if img.patient_key not in conflicting]
    dropped = {
        "images_with_unknown_diagnosis": len(images) - len(known),
        "patients_with_conflicting_labels": len(conflicting),
    }
    return usable, dropped


def _training_parameters(s: Settings, active: ModelVersionRecord) -> dict[str, Any]:
    """The active model's architecture and training settings, read from its registry metadata."""
    from thyrocad.models.errors import RegistryError
    from thyrocad.models.registry import Registry

    try:
        metadata = Registry(Path(active.artifact_path).parent.parent).get(active.version).metadata
    except RegistryError as exc:
        raise RefitFailed(f"cannot read the active model {active.version}: {exc}") from exc
    hyper = metadata.get("hyperparameters") or {}
    # The configured epochs, not epochs_run: early stopping, if set, stops the refit too.
    epochs = s.retrain_epochs or int(hyper.get("epochs") or hyper.get("epochs_run") or 1)
    return {
        "architecture": active.architecture,
        "input_size": active.input_size,
        "epochs": epochs,
        "batch_size": int(hyper.get("batch_size", 32)),
        "seed": int(metadata.get("seed", hyper.get("seed", 0))),
        "weights": str(metadata.get("base_weights", "imagenet")),
        "augment_variants": int(hyper.get("augment_variants", 0)),
        "validation_fraction": float(hyper.get("validation_fraction", 0.0)),
        "early_stopping": hyper.get("early_stopping_patience"),
    }


def _claim(
    s: Settings, engine: Engine, force: bool, trigger: str, now: dt.datetime
) -> _Claimed | RefitOutcome:
    sessions = make_session_factory(engine)
    owner = None
    try:
        with sessions.begin() as session:
            store.lock_refit_decisions(session)
            for run in store.close_stale_runs(session, now, s.retrain_stale_seconds):
                logger.warning("stale training run closed as failed", extra={"run_id": run.id})
            running = store.running_runs(session)
            if running:
                run = running[0]
                return RefitOutcome(
                    "skipped",
                    f"training run #{run.id} is already running "
                    f"(since {run.started_at:%Y-%m-%d %H:%M:%S} UTC)",
                    run_id=run.id,
                )
            active = repository.active_model(session)
            if active is None:
                return RefitOutcome(
                    "skipped",
                    "no active model to refit: train one and promote it first "
                    "('thyrocad train --promote' or 'thyrocad models promote')",
                )
            if list(active.classes) != list(s.classes):
                return RefitOutcome(
                    "skipped",
                    f"the active model's classes {list(active.classes)} differ from "
                    f"THYROCAD_CLASSES {list(s.classes)}",
                    active_version=active.version,
                )
            watermark = store.label_watermark(session)
            images, dropped = _usable(store.labelled_images(session), s.classes)
            keys = sorted({img.patient_key for img in images})
            holdout = _decide_holdout(session, keys, s.holdout_fraction, now)
            since = store.last_completed_watermark(session)
            new = (store.patients_labelled_after(session, since) & set(keys)) - holdout
            if not force and len(new) < s.retrain_min_new_patients:
                return RefitOutcome(
                    "skipped",
                    f"{len(new)} patient(s) outside the hold-out got new labels since the last "
                    f"refit; {s.retrain_min_new_patients} needed (force to refit anyway)",
                    active_version=active.version,
                )
            train = tuple(img for img in images if img.patient_key not in holdout)
            held = tuple(img for img in images if img.patient_key in holdout)
            try:
                training = _training_parameters(s, active)
            except RefitFailed as exc:
                # Recorded, so that an operator sees why refits stopped happening.
                run_id = store.start_run(session, {"trigger": trigger, "force": force}, now)
                store.finish_run(session, run_id, "failed", str(exc), now, duration_s=0.0)
                return RefitOutcome(
                    "failed", str(exc), run_id=run_id, active_version=active.version
                )
            parameters = {
                "trigger": trigger,
                "force": force,
                "base_version": active.version,
                **training,
                "holdout_fraction": s.holdout_fraction,
                "promote_auc_tolerance": s.promote_auc_tolerance,
                "promote_min_sensitivity": s.promote_min_sensitivity,
                "patient_rule": s.aggregation_rule,
                "threshold": s.threshold,
                "frame_policy": s.frame_policy,
                "label_watermark": watermark,
                "previous_label_watermark": since,
                "new_patients": len(new),
                "train": {
                    "patients": len({img.patient_key for img in train}),
                    "instances": len(train),
                },
                "holdout": {
                    "patients": len({img.patient_key for img in held}),
                    "instances": len(held),
                },
                "excluded": dropped,
            }
            run_id = store.start_run(session, parameters, now)
            # Take the owner lock before committing: a trigger waiting for the
            # decision lock must never find this fresh run without an owner.
            owner = store.hold_run_lock(engine, run_id)
    except IntegrityError:
        # SQLite, or two deciders racing past the lock: the one-running index said no.
        if owner is not None:
            owner.close()
        return RefitOutcome("skipped", "another training run started at the same moment")
    except BaseException:
        if owner is not None:
            owner.close()
        raise
    return _Claimed(run_id, active, train, held, parameters, owner)


# --------------------------------------------------------------------------- step 2-3


def _load(
    images: Sequence[LabelledImage], size: int, frame_policy: str
) -> tuple[np.ndarray, list[str], list[str], int]:
    """Decode with ``pacs.pixels`` through ``pacs.datasets`` (the inference preprocessing)."""
    from thyrocad.models.data import ImageRecord
    from thyrocad.pacs.datasets import load_images
    from thyrocad.pacs.pixels import FramePolicy

    records = [
        ImageRecord(Path(img.spool_path), pseudonym(img.patient_key), img.diagnosis)
        for img in images
    ]
    loaded = load_images(records, size, FramePolicy.parse(frame_policy))
    return loaded.images, loaded.labels, loaded.patient_ids, len(loaded.skipped)


def _predict(classifier: Any, images: np.ndarray) -> np.ndarray:
    return np.concatenate(
        [
            classifier.predict(images[start : start + PREDICT_BATCH])
            for start in range(0, len(images), PREDICT_BATCH)
        ]
    )


def _summary(report: dict[str, Any] | None) -> dict[str, float] | None:
    if report is None:
        return None
    return {
        name: patient_metric(report, name)
        for name in ("auc", "sensitivity", "specificity", "accuracy")
    }


def _train_and_compare(
    s: Settings, claimed: _Claimed, on_epoch: EpochCallback | None
) -> tuple[str, dict[str, Any], Decision, dict[str, Any]]:
    """Train, save, evaluate both models. Returns (version, metrics, decision, extra params)."""
    from thyrocad.models.errors import ModelsError
    from thyrocad.models.evaluation import evaluate
    from thyrocad.models.evaluation_report import report_to_json
    from thyrocad.models.registration import train_and_register
    from thyrocad.models.registry import Registry
    from thyrocad.worker.model_holder import load_version

    p = claimed.parameters
    size = int(p["input_size"])
    if not claimed.train:
        raise RefitFailed("no labelled images outside the hold-out to train on")
    x, labels, patients, skipped = _load(claimed.train, size, s.frame_policy)
    if len(set(labels)) < 2:
        raise RefitFailed(f"the training images hold one class only ({labels[0]})")
    extra: dict[str, Any] = {"undecodable_instances": skipped}
    registry_dir = Path(claimed.active.artifact_path).parent.parent
    trained = train_and_register(
        x,
        labels,
        patients,
        classes=tuple(s.classes),
        positive_class=s.positive_class,
        arch=str(p["architecture"]),
        epochs=int(p["epochs"]),
        batch_size=int(p["batch_size"]),
        input_size=size,
        weights=str(p["weights"]),
        seed=int(p["seed"]),
        registry_dir=registry_dir,
        # Training patients are all for training: the comparison uses the hold-out.
        test_fraction=0.0,
        validation_fraction=float(p["validation_fraction"]),
        early_stopping=p["early_stopping"],
        augment_variants=int(p["augment_variants"]),
        source=f"refit run #{claimed.run_id} on labelled studies",
        on_epoch=on_epoch,
    )
    registry = Registry(registry_dir)
    version = trained.version
    metrics: dict[str, Any] = {"candidate": None, "active": None}
    try:
        if not claimed.holdout:
            raise RefitFailed("the hold-out is empty")
        hx, hlabels, hpatients, hskipped = _load(claimed.holdout, size, s.frame_policy)
        extra["undecodable_instances"] += hskipped
        reports = {}
        for role, classifier in (
            ("candidate", registry.load(version)),
            ("active", load_version(claimed.active)),
        ):
            report = evaluate(
                hlabels,
                _predict(classifier, hx),
                hpatients,
                tuple(s.classes),
                positive_class=s.positive_class,
                threshold=s.threshold,
                patient_rule=s.aggregation_rule,
                seed=int(p["seed"]),
            )
            reports[role] = report_to_json(report)
        metrics = reports
        decision = decide(
            reports["candidate"],
            reports["active"],
            PromotionRule(s.promote_auc_tolerance, s.promote_min_sensitivity),
        )
    except (ModelsError, RefitFailed) as exc:
        # The candidate exists but cannot be compared fairly: keep it, never promote it.
        decision = Decision(False, f"not promoted: the hold-out cannot be evaluated ({exc})")
    registry.update_metadata(
        version,
        metrics=metrics["candidate"],
        evaluation={
            "on": "patient-level hold-out",
            "training_run": claimed.run_id,
            "active_model": metrics["active"],
            "compared_with": claimed.active.version,
            "decision": decision.reason,
        },
        label_watermark=p["label_watermark"],
    )
    return version, metrics, decision, extra


# --------------------------------------------------------------------------- step 4


def _record(
    engine: Engine,
    claimed: _Claimed,
    version: str,
    metrics: dict[str, Any],
    decision: Decision,
    extra: dict[str, Any],
    started: float,
) -> tuple[str, Decision]:
    """Register the version and close the run in one transaction; return the outcome
    and the decision (a promotion is withdrawn if the active model changed meanwhile)."""
    from thyrocad.models.registry import Registry

    registry = Registry(Path(claimed.active.artifact_path).parent.parent)
    saved = registry.get(version)
    now = utcnow()
    sessions = make_session_factory(engine)
    with sessions.begin() as session:
        current = repository.active_model(session)
        if decision.promote and (current is None or current.version != claimed.active.version):
            # Someone promoted or rolled back by hand meanwhile: that choice stands.
            decision = Decision(
                False,
                f"not promoted: the active model changed to "
                f"{current.version if current else 'none'} during the refit "
                f"(compared with {claimed.active.version})",
            )
        outcome = "promoted" if decision.promote else "candidate"
        closed = store.finish_run(
            session,
            claimed.run_id,
            outcome,
            decision.reason,
            now,
            duration_s=time.monotonic() - started,
            candidate_version=version,
            data_fingerprint=saved.metadata.get("data_fingerprint"),
            metrics=metrics,
            parameters={**claimed.parameters, **extra},
        )
        if not closed:
            # Declared dead meanwhile (timeout): another refit may own the field now.
            raise RefitFailed(
                f"training run #{claimed.run_id} was closed as stale while it trained; "
                f"version {version} stays unregistered"
            )
        repository.upsert_model_version(
            session,
            version_record(saved, now, None if decision.promote else decision.reason),
            now,
        )
        if decision.promote:
            repository.set_active_model(session, version, now)
    if decision.promote:
        # The database is what workers serve from; the registry's own pointer follows.
        registry.promote(version)
    return outcome, decision


def _fail(engine: Engine, claimed: _Claimed, reason: str, started: float) -> None:
    with make_session_factory(engine).begin() as session:
        store.finish_run(
            session,
            claimed.run_id,
            "failed",
            reason,
            utcnow(),
            duration_s=time.monotonic() - started,
        )


def refit(
    s: Settings,
    engine: Engine,
    *,
    force: bool = False,
    trigger: str = "manual",
    on_epoch: EpochCallback | None = None,
    now: dt.datetime | None = None,
) -> RefitOutcome:
    """One refit attempt (see the module docstring); every run it starts is recorded.

    ``force`` refits whatever the number of newly labelled patients. Returns what
    happened; a refit that could not produce a candidate is recorded as ``failed``
    with its reason and returned, anything unexpected is recorded and raised.
    """
    from thyrocad.models.errors import ModelsError

    started = time.monotonic()
    claimed = _claim(s, engine, force, trigger, now or utcnow())
    if isinstance(claimed, RefitOutcome):
        logger.info("refit skipped: %s", claimed.reason)
        return claimed
    logger.info(
        "refit started",
        extra={"run_id": claimed.run_id, "base_version": claimed.active.version},
    )
    base: dict[str, Any] = {"run_id": claimed.run_id, "active_version": claimed.active.version}
    try:
        version, metrics, decision, extra = _train_and_compare(s, claimed, on_epoch)
        outcome, decision = _record(engine, claimed, version, metrics, decision, extra, started)
    except (RefitFailed, ModelsError) as exc:
        # No usable data, an unreadable model: recorded with the reason, not retried.
        _fail(engine, claimed, str(exc), started)
        logger.error("refit failed: %s", exc, extra={"run_id": claimed.run_id})
        return RefitOutcome("failed", str(exc), **base)
    except BaseException as exc:
        _fail(engine, claimed, f"{type(exc).__name__}: {exc}", started)
        raise
    finally:
        if claimed.owner is not None:
            claimed.owner.close()
    logger.info(
        "refit done",
        extra={"run_id": claimed.run_id, "outcome": outcome, "version": version},
    )
    return RefitOutcome(
        outcome,
        decision.reason,
        candidate_version=version,
        metrics={role: _summary(report) for role, report in metrics.items()},
        **base,
    )
