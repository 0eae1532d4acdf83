"""Batched inference: claim pending instances, decode them, one forward pass, persist.

A single call drains the backlog in batches: while the model runs on one batch,
a thread pool already claims and decodes the next, so pixel decoding overlaps
the forward pass. Every step is idempotent: a batch that dies half-way is
released (at once, or by the next drain of this worker once the database
answers again, or after its lease if the worker vanished), and predictions are
upserted per (instance, frame, model version), so an instance is predicted
exactly once. Claims are renewed while the drain runs (``worker.claims``).
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from sqlalchemy.exc import SQLAlchemyError

from thyrocad.db import repository
from thyrocad.db.records import ClaimedInstance, PredictionRecord
from thyrocad.db.repository.predictions import save_predictions_with_ids
from thyrocad.metrics import observe_evidence, reason_class
from thyrocad.pacs.errors import PixelError, SpoolError
from thyrocad.pacs.pixels import FrameImage, images_from_file
from thyrocad.worker.claims import heartbeat
from thyrocad.worker.context import WorkerContext
from thyrocad.worker.evidence import compute_evidence, log_missing, store_batch_evidence

if TYPE_CHECKING:
    from thyrocad.models.classifier import Classifier

logger = logging.getLogger(__name__)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class DecodedBatch:
    """Claimed instances with their model inputs, and those that could not be decoded."""

    token: str
    frames: list[tuple[ClaimedInstance, FrameImage]]
    failed: list[tuple[ClaimedInstance, str]]
    claimed_at: float


@dataclass(frozen=True)
class BatchOutcome:
    predicted: int = 0
    rejected: int = 0
    batches: int = 0
    model_changed: bool = False


def claim(ctx: WorkerContext, limit: int, token: str) -> list[ClaimedInstance]:
    """Claim up to ``limit`` pending instances, waiting up to the configured time to fill."""
    settings = ctx.settings
    deadline = time.monotonic() + settings.batch_wait_seconds
    claimed: list[ClaimedInstance] = []
    while True:
        with ctx.sessions.begin() as session:
            claimed += repository.claim_instances(
                session,
                limit=limit - len(claimed),
                token=token,
                now=repository.database_now(session),  # the lease's clock on every host
                lease_seconds=settings.claim_lease_seconds,
                worker=ctx.claims.worker,
            )
        if len(claimed) >= limit or time.monotonic() >= deadline:
            return claimed
        if not claimed:
            # Nothing to start a batch with: other drains have it, and what arrives later
            # comes with a task of its own. Waiting would only hold this worker.
            return claimed
        time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))


def decode(
    ctx: WorkerContext, pool: ThreadPoolExecutor, claimed: list[ClaimedInstance], size: int
) -> tuple[list[tuple[ClaimedInstance, FrameImage]], list[tuple[ClaimedInstance, str]]]:
    """Decode claimed instances in parallel; undecodable ones come back with a reason."""

    def one(item: ClaimedInstance) -> list[FrameImage]:
        return images_from_file(Path(item.spool_path), size, ctx.frame_policy)

    frames: list[tuple[ClaimedInstance, FrameImage]] = []
    failed: list[tuple[ClaimedInstance, str]] = []
    for item, future in [(item, pool.submit(one, item)) for item in claimed]:
        try:
            frames += [(item, frame) for frame in future.result()]
        except PixelError as exc:
            failed.append((item, exc.reason))
        except (SpoolError, OSError) as exc:
            failed.append((item, f"spooled file unreadable: {exc}"))
    return frames, failed


def _claim_and_decode(
    ctx: WorkerContext, pool: ThreadPoolExecutor, size: int, limit: int
) -> DecodedBatch | None:
    token = ctx.claims.open()
    try:
        claimed = claim(ctx, limit, token)
        if not claimed:
            ctx.claims.close(token)
            return None
        frames, failed = decode(ctx, pool, claimed, size)
    except BaseException:
        ctx.claims.close(token)  # what it claimed goes back at this worker's next drain
        raise
    return DecodedBatch(token, frames, failed, time.monotonic())


def predict_and_store(ctx: WorkerContext, batch: DecodedBatch, classifier: Classifier) -> int:
    """Run ``classifier`` on a decoded batch and upsert its predictions (with their
    evidence maps when ``settings.evidence_maps``)."""
    applied = _predict_and_store(ctx, batch, classifier)
    ctx.claims.close(batch.token)  # on an error the caller releases the batch
    return applied


def _predict_and_store(ctx: WorkerContext, batch: DecodedBatch, classifier: Classifier) -> int:
    with ctx.sessions.begin() as session:
        for item, reason in batch.failed:
            repository.mark_rejected(session, item.instance_id, reason, utcnow(), token=batch.token)
    if batch.failed:
        ctx.observe("unreadable", {"reasons": [reason for _, reason in batch.failed]})
        for item, reason in batch.failed:
            # The row id and the reason's class: a full reason may name a spool path.
            logger.warning(
                "instance %d rejected (%s); its reason is stored with it",
                item.instance_id,
                reason_class(reason),
                extra={"instance_id": item.instance_id},
            )
    if not batch.frames:
        return 0
    pixels = np.stack([frame.pixels for _, frame in batch.frames])
    started = time.perf_counter()
    probabilities = classifier.predict(pixels)
    seconds = time.perf_counter() - started
    positive = classifier.classes.index(ctx.settings.positive_class)
    records = [
        PredictionRecord(
            instance_id=item.instance_id,
            frame_index=frame.frame_index,
            model_version=classifier.version,
            label=classifier.classes[int(np.argmax(probs))],
            probability=float(probs[positive]),
            probabilities={c: float(p) for c, p in zip(classifier.classes, probs, strict=True)},
            latency_ms=seconds * 1000.0 / len(pixels),
        )
        for (item, frame), probs in zip(batch.frames, probabilities, strict=True)
    ]
    # Evidence is computed before the transaction (it is slow) and stored in it, so with
    # THYROCAD_EVIDENCE_MAPS an instance is never "predicted" without its maps, unless
    # computing them failed: then the predictions are stored anyway, logged and counted.
    evidence = (
        compute_evidence(classifier, pixels, ctx.settings.positive_class)
        if ctx.settings.evidence_maps
        else None
    )
    missing: list[int] = []
    with ctx.sessions.begin() as session:
        stored = save_predictions_with_ids(session, records, batch.token, utcnow())
        if evidence is not None:
            missing = store_batch_evidence(session, evidence, records, stored)
    ctx.observe("batch", {"size": len(pixels), "seconds": seconds, "records": records})
    if evidence is not None:
        log_missing(evidence, missing, classifier.version)
        observe_evidence(evidence.seconds, len(missing))
    return len(stored)


def _active_classifier(ctx: WorkerContext) -> Classifier:
    with ctx.sessions() as session:
        active = repository.active_model(session)
    return ctx.models.get(active)


def _release(ctx: WorkerContext, batch: DecodedBatch | None) -> None:
    if batch is None:
        return
    ids = sorted(
        {item.instance_id for item, _ in batch.frames} | {i.instance_id for i, _ in batch.failed}
    )
    try:
        with ctx.sessions.begin() as session:
            repository.release_claim(session, ids, batch.token, utcnow())
    except SQLAlchemyError:
        # The database is gone (the error being handled, most likely): this worker's
        # next drain gives the batch back as soon as the database answers again.
        logger.warning("could not release %d claimed instances now", len(ids))
    finally:
        ctx.claims.close(batch.token)


def run_inference(ctx: WorkerContext, max_batches: int | None = None) -> BatchOutcome:
    """Drain pending instances batch by batch, decoding the next while predicting this one.

    Stops early (``model_changed``) when another version is promoted meanwhile, so
    the caller starts again with the new model; on any error the claimed but
    unpredicted instances are released for another attempt. Starts by giving back
    what this worker claimed earlier and no longer works on.
    """
    ctx.claims.release_stale(ctx.sessions)
    classifier = _active_classifier(ctx)
    size, limit = classifier.input_size, ctx.settings.batch_max
    predicted = rejected = batches = 0
    with (
        heartbeat(ctx.claims, ctx.sessions, ctx.settings.claim_lease_seconds),
        ThreadPoolExecutor(max_workers=max(1, ctx.settings.decode_threads)) as pool,
        ThreadPoolExecutor(max_workers=1) as prefetch,
    ):
        nxt: Future[DecodedBatch | None] = prefetch.submit(
            _claim_and_decode, ctx, pool, size, limit
        )
        batch: DecodedBatch | None = None
        try:
            while (batch := nxt.result()) is not None:
                batches += 1
                more = max_batches is None or batches < max_batches
                nxt = (
                    prefetch.submit(_claim_and_decode, ctx, pool, size, limit)
                    if more
                    else _done(None)
                )
                if _active_classifier(ctx).version != classifier.version:
                    _release(ctx, batch)
                    _release(ctx, nxt.result())
                    return BatchOutcome(predicted, rejected, batches, model_changed=True)
                predicted += predict_and_store(ctx, batch, classifier)
                rejected += len(batch.failed)
                batch = None
        except BaseException:
            _release(ctx, batch)
            _release(ctx, _settle(nxt))
            raise
    return BatchOutcome(predicted=predicted, rejected=rejected, batches=batches)


def _settle(future: Future[DecodedBatch | None]) -> DecodedBatch | None:
    """The prefetched batch if it was (or is being) claimed; None if it never started."""
    if not future.done() and future.cancel():
        return None
    try:
        return future.result()
    except Exception:  # its own claims expire with their lease
        logger.exception("prefetch failed while handling another error")
        return None


def _done(value: DecodedBatch | None) -> Future[DecodedBatch | None]:
    future: Future[DecodedBatch | None] = Future()
    future.set_result(value)
    return future
