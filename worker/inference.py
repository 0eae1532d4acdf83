"""Batched inference: claim pending instances, decode them, one forward pass, persist.

A single call drains the backlog in batches: while the model runs on one batch,
a thread pool already claims and decodes the next, so pixel decoding overlaps
the forward pass. Every step is idempotent: a batch that dies half-way is
claimed again after its lease, and predictions are upserted per
(instance, frame, model version), so an instance is predicted exactly once.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from db import repository
from db.records import ClaimedInstance, PredictionRecord
from pacs.errors import PixelError, SpoolError
from pacs.pixels import FrameImage, images_from_file
from worker.context import WorkerContext

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
                now=utcnow(),
                lease_seconds=settings.claim_lease_seconds,
            )
        if len(claimed) >= limit or time.monotonic() >= deadline:
            return claimed
        if not claimed and settings.batch_wait_seconds <= 0:
            return claimed
        time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))


def decode(
    ctx: WorkerContext, pool: ThreadPoolExecutor, claimed: list[ClaimedInstance], size: int
) -> tuple[list[tuple[ClaimedInstance, FrameImage]], list[tuple[ClaimedInstance, str]]]:
    """Decode claimed instances in parallel; undecodable ones come back with a reason."""

    def one(item: ClaimedInstance) -> list[FrameImage]:
        return images_from_file(item.spool_path, size, ctx.frame_policy)

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
    token = uuid.uuid4().hex
    claimed = claim(ctx, limit, token)
    if not claimed:
        return None
    frames, failed = decode(ctx, pool, claimed, size)
    return DecodedBatch(token, frames, failed, time.monotonic())


def predict_and_store(ctx: WorkerContext, batch: DecodedBatch, classes: tuple[str, ...]) -> int:
    """Run the active model on a decoded batch and upsert its predictions."""
    settings = ctx.settings
    with ctx.sessions.begin() as session:
        for item, reason in batch.failed:
            repository.mark_rejected(session, item.instance_id, reason, utcnow())
    if not batch.frames:
        return 0
    with ctx.sessions() as session:
        active = repository.active_model(session)
    classifier = ctx.models.get(active)
    pixels = np.stack([frame.pixels for _, frame in batch.frames])
    started = time.perf_counter()
    probabilities = classifier.predict(pixels)
    latency_ms = (time.perf_counter() - started) * 1000.0 / len(pixels)
    positive = classifier.classes.index(settings.positive_class)
    records = []
    for (item, frame), probs in zip(batch.frames, probabilities, strict=True):
        records.append(
            PredictionRecord(
                instance_id=item.instance_id,
                frame_index=frame.frame_index,
                model_version=classifier.version,
                label=classifier.classes[int(np.argmax(probs))],
                probability=float(probs[positive]),
                probabilities={c: float(p) for c, p in zip(classifier.classes, probs, strict=True)},
                latency_ms=latency_ms,
            )
        )
    with ctx.sessions.begin() as session:
        applied = repository.save_predictions(session, records, batch.token, utcnow())
    ctx.observe(
        "batch",
        {"size": len(pixels), "seconds": latency_ms * len(pixels) / 1000.0, "records": records},
    )
    return applied


def run_inference(ctx: WorkerContext, max_batches: int | None = None) -> BatchOutcome:
    """Drain pending instances batch by batch, decoding the next while predicting this one."""
    with ctx.sessions() as session:
        active = repository.active_model(session)
    classifier = ctx.models.get(active)
    size, limit = classifier.input_size, ctx.settings.batch_max
    predicted = rejected = batches = 0
    with ThreadPoolExecutor(max_workers=max(1, ctx.settings.decode_threads)) as pool:
        prefetch = ThreadPoolExecutor(max_workers=1)
        try:
            nxt: Future[DecodedBatch | None] = prefetch.submit(
                _claim_and_decode, ctx, pool, size, limit
            )
            while True:
                batch = nxt.result()
                if batch is None:
                    break
                batches += 1
                if max_batches is None or batches < max_batches:
                    nxt = prefetch.submit(_claim_and_decode, ctx, pool, size, limit)
                else:
                    nxt = _done(None)
                predicted += predict_and_store(ctx, batch, classifier.classes)
                rejected += len(batch.failed)
        finally:
            prefetch.shutdown(wait=True)
    return BatchOutcome(predicted=predicted, rejected=rejected, batches=batches)


def _done(value: DecodedBatch | None) -> Future[DecodedBatch | None]:
    future: Future[DecodedBatch | None] = Future()
    future.set_result(value)
    return future
