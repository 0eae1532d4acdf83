"""A backfill: list studies in an archive, retrieve those thyrocad lacks, follow them to a result.

Resumable and idempotent through ``backfill_items`` (one row per archive and
study) and what the database already holds: a study whose expected instances
are all registered is never asked for again, and one that also has its study
result is complete and skipped. A run interrupted anywhere (Ctrl-C, a crash)
leaves rows that the next run with the same filter simply re-examines.

The database tells when a study has arrived (registered instances ≥ what the
archive said it would send) and when it is classified (every instance settled,
a study result over the latest predictions). The retrieve itself runs in a
small thread pool under a rate limit; each study's failure is recorded with
its reason and the others go on.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from thyrocad.db import repository
from thyrocad.db.records import AuditOutcome
from thyrocad.db.repository import StudyProgress
from thyrocad.db.repository.audit import BACKFILL_FINISHED, BACKFILL_STARTED
from thyrocad.pacs.archive import (
    ArchiveClient,
    FoundStudy,
    RateLimiter,
    RetrieveOutcome,
    StudyFilter,
)
from thyrocad.pacs.listener import Intake
from thyrocad.pacs.spool import Spool

logger = logging.getLogger(__name__)

#: Seconds a failed retrieve is still watched for instances that did arrive (the
#: listener registers what it acknowledged a moment later): if any, it is partial.
FAILED_GRACE_SECONDS = 2.0


@dataclass(frozen=True)
class BackfillOptions:
    """How a backfill runs. ``spool``/``intake`` are needed with ``use_get`` only."""

    destination_aet: str
    rate: float = 1.0
    concurrency: int = 2
    use_get: bool = False
    wait_classified: bool = True
    wait_seconds: float = 3600.0
    poll_seconds: float = 1.0
    dry_run: bool = False


@dataclass
class StudyLine:
    """One study of the run, as reported: no patient data."""

    study_instance_uid: str
    study_date: dt.date | None
    modalities: tuple[str, ...]
    expected: int | None
    action: str = "pending"  # skipped (complete), present (all here), requested, pending
    state: str = "found"
    reason: str | None = None
    registered: int = 0
    classified: bool = False
    # After a retrieve: how many instances must be registered to call it received.
    threshold: int | None = None
    retrieved: bool = False
    before: int = 0  # registered when it was requested
    failed_at: float | None = None
    bare_reason: str | None = None  # the failure without its hint


@dataclass
class BackfillCounts:
    """``skipped``: complete before this run; ``present``: every instance already here,
    not asked for; ``requested``: asked for by this run."""

    found: int = 0
    skipped: int = 0
    present: int = 0
    requested: int = 0
    received: int = 0
    classified: int = 0
    failed: int = 0


@dataclass
class BackfillReport:
    source: str
    counts: BackfillCounts
    studies: list[StudyLine] = field(default_factory=list)
    interrupted: bool = False
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return not self.interrupted and all(s.state == "classified" for s in self.studies)


Progress = Callable[[BackfillCounts], None]


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Backfill:
    """One backfill run against one archive; :meth:`stop` may be called from another thread."""

    def __init__(
        self,
        client: ArchiveClient,
        sessions: sessionmaker[Session],
        options: BackfillOptions,
        *,
        spool: Spool | None = None,
        intake: Intake | None = None,
        on_progress: Progress | None = None,
    ) -> None:
        if options.use_get and (spool is None or intake is None):
            raise ValueError("C-GET needs the spool and the intake to store what arrives")
        self.client = client
        self.sessions = sessions
        self.options = options
        self.spool = spool
        self.intake = intake
        self._progress = on_progress or (lambda counts: None)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._lines: dict[str, StudyLine] = {}
        self._requested = 0
        self._timed_out = False
        self._limiter = RateLimiter(options.rate)

    @property
    def source(self) -> str:
        return self.client.peer.ae_title

    def stop(self) -> None:
        """Stop asking, abort retrieves in flight; the run returns soon after."""
        self._stop.set()
        self.client.abort_all()

    # --- the run -----------------------------------------------------------
    def run(self, flt: StudyFilter) -> BackfillReport:
        """List, retrieve and follow every study matching ``flt`` (see the module)."""
        found = self.client.find_studies(flt)
        logger.info("archive listed %d studies", len(found), extra={"archive": self.client.name})
        uids = [s.study_instance_uid for s in found]
        if self.options.dry_run:  # a dry run writes nothing
            with self.sessions() as session:
                known = {
                    i.study_instance_uid: i
                    for i in repository.backfill_items(session, self.source, uids)
                }
        else:
            with self.sessions.begin() as session:
                known = {
                    s.study_instance_uid: repository.upsert_backfill_item(
                        session, self.source, s.study_instance_uid, s.instance_count
                    )
                    for s in found
                }
        for study in found:
            item = known.get(study.study_instance_uid)
            self._lines[study.study_instance_uid] = StudyLine(
                study.study_instance_uid,
                study.study_date,
                study.modalities,
                item.expected_count
                if item and item.expected_count is not None
                else study.instance_count,
                state=item.state if item else "found",
                reason=item.reason if item else None,
            )
        progress = self._progress_of(list(self._lines))
        todo = [s for s in found if not self._settle_known(s, progress)]
        self._report()
        if self.options.dry_run:
            return self._result()
        self._audit(BACKFILL_STARTED, "success", {"found": len(found), "to_retrieve": len(todo)})
        try:
            self._retrieve_all(todo)
            self._follow()
        except BaseException:
            self.stop()  # Ctrl-C: abort what is in flight; rows stay for the next run
            self._audit(BACKFILL_FINISHED, "failure", {**asdict(self._counts()), "stopped": True})
            raise
        report = self._result()
        self._audit(
            BACKFILL_FINISHED,
            "success" if report.ok else "failure",
            {
                **asdict(report.counts),
                "interrupted": report.interrupted,
                "timed_out": report.timed_out,
            },
        )
        return report

    def _audit(self, kind: str, outcome: AuditOutcome, details: dict[str, Any]) -> None:
        """Record the run's start or end (counts only: no study or patient named)."""
        with self.sessions.begin() as session:
            repository.record_audit_event(
                session,
                kind,
                actor=repository.default_actor(),
                outcome=outcome,
                details={"source_aet": self.source, **details},
            )

    def _settle_known(self, study: FoundStudy, progress: dict[str, StudyProgress]) -> bool:
        """Decide from the database alone; True when the study needs no retrieve."""
        line = self._lines[study.study_instance_uid]
        p = progress.get(study.study_instance_uid)
        line.registered = p.registered if p else 0
        if p is None or line.expected is None or p.registered < line.expected:
            return False
        line.threshold = line.expected
        line.retrieved = True
        if p.classified:
            line.action, line.classified = "skipped", True
            self._set(line, "classified", None)
        else:
            line.action = "present"
            self._set(line, "received", None)
        return True

    def _retrieve_all(self, todo: list[FoundStudy]) -> None:
        if not todo:
            return
        pool = ThreadPoolExecutor(self.options.concurrency, thread_name_prefix="thyrocad-backfill")
        futures: list[Future[None]] = [pool.submit(self._retrieve_one, s) for s in todo]
        try:
            while not all(f.done() for f in futures):
                if self._stop.wait(self.options.poll_seconds):
                    break
                self._poll()
        except BaseException:
            self.stop()  # before joining: in-flight associations are aborted, not awaited
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        for f in futures:
            if f.done() and not f.cancelled() and f.exception() is not None:
                logger.error("retrieve thread failed: %s", f.exception())
        self._poll()

    def _retrieve_one(self, study: FoundStudy) -> None:
        line = self._lines[study.study_instance_uid]
        if not self._limiter.wait(self._stop):
            return
        with self._lock:
            self._requested += 1
            line.action = "requested"
            line.before = line.registered
        self._set(line, "requested", None, requested_at=_now())
        self._report()
        try:
            if self.options.use_get:
                assert self.spool is not None and self.intake is not None
                outcome = self.client.get_study(study, self.spool, self.intake)
            else:
                outcome = self.client.move_study(study, self.options.destination_aet)
        except Exception as exc:  # recorded per study; the others go on
            logger.exception(
                "retrieve failed", extra={"study_instance_uid": line.study_instance_uid}
            )
            outcome = RetrieveOutcome(study.study_instance_uid, reason=f"retrieve failed: {exc}")
        if self._stop.is_set() and not outcome.ok:
            return  # aborted by the user: leave it 'requested' for the next run
        self._record(line, outcome)

    def _record(self, line: StudyLine, outcome: RetrieveOutcome) -> None:
        if outcome.ok:
            # Everything the archive has was sent: that is what to expect from now on.
            line.threshold = outcome.completed
            if line.expected is None or outcome.completed < line.expected:
                line.expected = outcome.completed
            self._set(line, "requested", None, expected_count=line.expected)
        elif outcome.partial:
            line.threshold = outcome.completed
            self._set(line, "partial", outcome.reason)
        else:
            line.failed_at, line.bare_reason = time.monotonic(), outcome.reason
            self._set(line, "failed", outcome.explained)
        line.retrieved = True  # last: the polling thread now watches it
        self._report()

    def _follow(self) -> None:
        """Wait until every retrieved study is received (and classified, if asked)."""
        deadline = time.monotonic() + self.options.wait_seconds
        while not self._stop.is_set():
            self._poll()
            if all(self._done(line) for line in self._lines.values()):
                return
            if time.monotonic() >= deadline:
                self._give_up()
                return
            self._stop.wait(self.options.poll_seconds)

    def _done(self, line: StudyLine) -> bool:
        """Nothing more to wait for in this run."""
        if line.action == "pending":
            return True  # never asked for (stopped)
        if line.state == "failed":
            return line.failed_at is None or (
                time.monotonic() - line.failed_at > FAILED_GRACE_SECONDS
            )
        if line.state == "requested" or line.threshold is None:
            return False
        if line.registered < line.threshold:
            return False  # partial: what was sent has not all arrived yet
        return line.classified or not self.options.wait_classified

    def _give_up(self) -> None:
        waited = f"{self.options.wait_seconds:.0f} s"
        self._timed_out = True
        for line in self._lines.values():
            if line.state == "requested" and line.retrieved:
                reason = (
                    f"only {line.registered} of {line.threshold} instances arrived within "
                    f"{waited} (is the listener running and reachable from the archive?)"
                )
                self._set(line, "requested", reason)
            elif line.state == "received" and self.options.wait_classified:
                self._set(
                    line,
                    "received",
                    f"not classified within {waited} (are the workers running?)",
                )

    # --- watching the database -------------------------------------------
    def _progress_of(self, uids: list[str]) -> dict[str, StudyProgress]:
        with self.sessions() as session:
            return repository.study_progress(session, uids)

    def _poll(self) -> None:
        watched = [line for line in self._lines.values() if line.retrieved and not line.classified]
        if not watched:
            self._report()
            return
        progress = self._progress_of([line.study_instance_uid for line in watched])
        for line in watched:
            p = progress.get(line.study_instance_uid)
            if p is None:
                continue
            changed = p.registered != line.registered
            line.registered = p.registered
            if line.state == "failed":
                if line.failed_at is not None and p.registered > line.before:
                    # The archive failed after sending some: what came is classified.
                    line.threshold, line.failed_at = p.registered, None
                    reason = f"{line.bare_reason} (after {p.registered - line.before} arrived)"
                    self._set(line, "partial", reason, received_count=p.registered)
                continue
            arrived = line.threshold is not None and p.registered >= line.threshold
            if line.state == "requested" and arrived:
                self._set(line, "received", None, received_count=p.registered)
                continue
            if line.state not in ("received", "partial") or not arrived:
                if changed:
                    self._set(line, line.state, line.reason, received_count=p.registered)
                continue
            if p.classified:
                line.classified = True
                # A partial study stays 'partial' (asked again next run) with its reason.
                state = "partial" if line.state == "partial" else "classified"
                self._set(line, state, line.reason, received_count=p.registered)
            elif p.unclassifiable:
                self._set(
                    line,
                    "failed",
                    f"none of its {p.registered} instances could be classified: "
                    f"{p.reason or 'rejected'}",
                    received_count=p.registered,
                )
        self._report()

    # --- bookkeeping -------------------------------------------------------
    def _set(
        self,
        line: StudyLine,
        state: str,
        reason: str | None,
        *,
        requested_at: dt.datetime | None = None,
        received_count: int | None = None,
        expected_count: int | None = None,
    ) -> None:
        line.state, line.reason = state, reason
        if self.options.dry_run:
            return
        with self.sessions.begin() as session:
            repository.set_backfill_state(
                session,
                self.source,
                line.study_instance_uid,
                state,
                reason=reason,
                requested_at=requested_at,
                received_count=received_count,
                expected_count=expected_count,
            )

    def _counts(self) -> BackfillCounts:
        lines = list(self._lines.values())
        return BackfillCounts(
            found=len(lines),
            skipped=sum(line.action == "skipped" for line in lines),
            present=sum(line.action == "present" for line in lines),
            requested=self._requested,
            received=sum(
                line.retrieved
                and line.threshold is not None
                and line.registered >= line.threshold
                and line.state != "failed"
                for line in lines
            ),
            classified=sum(line.classified for line in lines),
            failed=sum(line.state in ("failed", "partial") for line in lines),
        )

    def _report(self) -> None:
        self._progress(self._counts())

    def _result(self) -> BackfillReport:
        return BackfillReport(
            source=self.client.name,
            counts=self._counts(),
            studies=sorted(
                self._lines.values(),
                key=lambda s: (s.study_date or dt.date.min, s.study_instance_uid),
            ),
            interrupted=self._stop.is_set(),
            timed_out=self._timed_out,
        )
