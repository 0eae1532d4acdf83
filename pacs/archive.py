"""Query/retrieve against a PACS archive: list studies with C-FIND, fetch them with C-MOVE or C-GET.

C-FIND runs at study level in date windows (archives often cap the number of
matches per query); the series level is asked only where it is needed: to keep
only the series of the wanted modality, to leave out non-image series (such as
the Structured Reports thyrocad itself sent back), or to count instances when
the archive does not. C-MOVE asks the archive to C-STORE the study to
thyrocad's own listener; C-GET brings the instances back over the same
association and spools them through the listener's own ``handle_store``.

Every retrieve ends in a :class:`RetrieveOutcome` with the sub-operation counts
of the final response and a reason whenever anything short of "every instance
sent" happened (warning 0xB000, failure statuses, no answer, refused
association). Nothing here touches the database.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import re
import threading
import time
from collections.abc import Iterator
from collections.abc import Sequence as AbcSequence
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from thyrocad.pacs.errors import PacsError
from thyrocad.pacs.listener import ACCEPTED_TRANSFER_SYNTAXES, Intake, handle_store
from thyrocad.pacs.meta import ULTRASOUND_SOP_CLASSES
from thyrocad.pacs.sender import Peer, associate
from thyrocad.pacs.spool import Spool

logger = logging.getLogger(__name__)

#: Series of these modalities hold no image thyrocad could classify; never retrieved.
NON_IMAGE_MODALITIES = frozenset({"SR", "KO", "PR", "DOC", "REG", "SEG", "RWV", "PLAN", "AU"})
#: One C-FIND per window of this many days; a window with FIND_SPLIT_AT matches or more
#: is asked again in halves, because archives often cap the matches of one C-FIND
#: (typically at 500 or 1000) without saying so.
FIND_WINDOW_DAYS = 366
FIND_SPLIT_AT = 500

_PENDING = (0xFF00, 0xFF01)
_WARNING = 0xB000
_STATUS_TEXT = {
    0xFE00: "cancelled",
    0xA701: "archive out of resources: unable to calculate the number of matches",
    0xA702: "archive out of resources: unable to perform sub-operations",
    0xA700: "archive out of resources",
    0xA801: "move destination unknown to the archive",
    0xA900: "identifier does not match the SOP class",
    0x0122: "query/retrieve model not supported by the archive",
    0x0124: "not authorised",
    0x0210: "duplicate invocation",
    0x0211: "unrecognised operation",
    0x0212: "mistyped argument",
}


class ArchiveError(PacsError):
    """The archive could not be queried at all (refused, unreachable, failed C-FIND)."""


@dataclass(frozen=True)
class StudyFilter:
    """Which studies a backfill asks for; ``description`` uses DICOM wildcards ``*`` and ``?``."""

    since: dt.date
    until: dt.date | None = None
    modality: str | None = None
    description: str | None = None


@dataclass(frozen=True)
class FoundSeries:
    series_instance_uid: str
    modality: str
    instance_count: int | None


@dataclass(frozen=True)
class FoundStudy:
    """A study to retrieve. ``series`` is None when the whole study is retrieved,
    otherwise the only series to retrieve; ``instance_count`` counts what is
    retrieved (None when the archive does not say)."""

    study_instance_uid: str
    study_date: dt.date | None
    modalities: tuple[str, ...]
    instance_count: int | None
    series: tuple[FoundSeries, ...] | None = None


@dataclass(frozen=True)
class RetrieveOutcome:
    """The final response of a C-MOVE/C-GET (summed over series when per series).

    ``reason`` is None only when every sub-operation completed; ``status`` is
    the final DIMSE status (None when none came).
    """

    study_instance_uid: str
    completed: int = 0
    failed: int = 0
    warning: int = 0
    status: int | None = None
    reason: str | None = None
    #: What may be wrong on our side, when nothing at all was sent.
    hint: str | None = None

    @property
    def explained(self) -> str | None:
        """The reason with its hint, if any."""
        return None if self.reason is None else "; ".join(filter(None, [self.reason, self.hint]))

    @property
    def ok(self) -> bool:
        return self.reason is None

    @property
    def partial(self) -> bool:
        """Some instances were sent, not all."""
        return self.reason is not None and self.completed > 0


# --------------------------------------------------------------------------- pure helpers


def date_windows(
    since: dt.date, until: dt.date, days: int = FIND_WINDOW_DAYS
) -> Iterator[tuple[dt.date, dt.date]]:
    """Consecutive inclusive (start, end) windows covering ``since``..``until``."""
    start = since
    while start <= until:
        end = min(until, start + dt.timedelta(days=days - 1))
        yield start, end
        start = end + dt.timedelta(days=1)


def wildcard_match(pattern: str, text: str) -> bool:
    """DICOM wildcard matching (``*`` any run, ``?`` one character), case-insensitive."""
    regex = "".join(
        ".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern.strip()
    )
    return re.fullmatch(regex, text.strip(), flags=re.IGNORECASE | re.DOTALL) is not None


def _date(value: object) -> dt.date | None:
    text = str(value or "").strip()
    try:
        return dt.datetime.strptime(text, "%Y%m%d").date() if len(text) == 8 else None
    except ValueError:
        return None


def _count(value: object) -> int | None:
    try:
        return int(str(value).strip()) if str(value or "").strip() else None
    except ValueError:
        return None


def _values(value: object) -> tuple[str, ...]:
    """A DICOM multi-valued string (MultiValue, list or backslash-joined) as upper-case values."""
    if value is None:
        return ()
    if isinstance(value, str):
        items: list[object] = list(value.split("\\"))
    elif isinstance(value, AbcSequence):
        items = list(value)
    else:
        items = [value]
    return tuple(str(v).strip().upper() for v in items if str(v).strip())


def status_reason(
    operation: str,
    status: int | None,
    completed: int,
    failed: int,
    warning: int,
    *,
    comment: str | None = None,
    destination: str | None = None,
    timeout: float | None = None,
) -> str | None:
    """Why a retrieve's final response is not "every instance sent", or None when it is."""
    counts = f"{completed} sent, {failed} failed, {warning} with warnings"
    detail = f" ({comment})" if comment else ""
    if status is None:
        waited = f" within {timeout:.0f} s" if timeout else ""
        return (
            f"{operation}: no final response from the archive{waited} "
            f"(association lost or timed out; {counts})"
        )
    if status == 0x0000:
        if failed or warning:
            return f"{operation} partial: {counts}{detail}"
        if completed == 0:
            return f"{operation}: the archive sent no instance (0 sub-operations){detail}"
        return None
    if status == _WARNING:
        return f"{operation} warning 0xB000, sub-operations incomplete: {counts}{detail}"
    if status == 0xA801:
        return (
            f"{operation} failed 0xA801: the archive does not know the move destination "
            f"{destination!r}; add it (with our host and port) to the archive's DICOM nodes, "
            f"or use --get{detail}"
        )
    text = _STATUS_TEXT.get(status)
    if text is None and 0xC000 <= status <= 0xCFFF:
        text = "archive unable to process"
    text = text or "failure"
    return f"{operation} failed 0x{status:04X}: {text}; {counts}{detail}"


def destination_hint(
    status: int | None, completed: int, failed: int, destination: str | None
) -> str | None:
    """For a C-MOVE refused before any sub-operation: the usual cause, or None."""
    if not destination or status in (None, 0x0000, _WARNING, 0xA801) or completed or failed:
        return None
    # Some archives (Orthanc among them) answer an unknown destination with 0xC000.
    return (
        f"if the archive does not know the move destination {destination!r}, "
        "add it to its DICOM nodes or use --get"
    )


class RateLimiter:
    """At most ``per_second`` acquisitions per second across threads (0 = no limit)."""

    def __init__(self, per_second: float) -> None:
        self._interval = 1.0 / per_second if per_second > 0 else 0.0
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self, stop: threading.Event) -> bool:
        """Block until the next slot; False when ``stop`` was set meanwhile."""
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._next)
            self._next = slot + self._interval
        return not stop.wait(max(0.0, slot - now)) and not stop.is_set()


# --------------------------------------------------------------------------- the SCU


class ArchiveClient:
    """A Study Root query/retrieve SCU for one archive.

    ``timeout`` bounds every wait for the archive: association set-up and each
    response (a C-MOVE answers a pending response per sub-operation, so a long
    study is fine as long as the archive keeps making progress).
    Every method may be called from several threads; each opens its own association.
    """

    def __init__(
        self, peer: Peer, calling_aet: str, *, timeout: float = 300.0, max_pdu: int = 131072
    ) -> None:
        self.peer = peer
        self.calling_aet = calling_aet
        self.timeout = timeout
        self.max_pdu = max_pdu
        self._active: set[Association] = set()
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.peer.name

    # --- associations ------------------------------------------------------
    def _ae(self) -> AE:
        ae = AE(ae_title=self.calling_aet)
        ae.maximum_pdu_size = self.max_pdu
        ae.acse_timeout = self.timeout
        ae.dimse_timeout = self.timeout
        ae.network_timeout = self.timeout
        ae.connection_timeout = min(self.timeout, 30.0)
        return ae

    @contextlib.contextmanager
    def _associate(
        self, ae: AE, *, ext_neg: list[Any] | None = None, handlers: list[Any] | None = None
    ) -> Iterator[Association]:
        assoc = associate(ae, self.peer, ext_neg=ext_neg, handlers=handlers or ())
        if not assoc.is_established:
            if assoc.is_rejected:
                raise ArchiveError(
                    f"association rejected by {self.name} (does it know our AE title "
                    f"{self.calling_aet!r} and allow it to query/retrieve?)"
                )
            raise ArchiveError(f"could not associate with {self.name} (unreachable or aborted)")
        with self._lock:
            self._active.add(assoc)
        try:
            yield assoc
        finally:
            with self._lock:
                self._active.discard(assoc)
            if assoc.is_established:
                assoc.release()

    def abort_all(self) -> None:
        """Abort every association in progress (Ctrl-C)."""
        with self._lock:
            active = list(self._active)
        for assoc in active:
            with contextlib.suppress(Exception):
                assoc.abort()

    # --- C-FIND ------------------------------------------------------------
    def _find(self, assoc: Association, query: Dataset) -> list[Dataset]:
        matches: list[Dataset] = []
        final: int | None = None
        comment = None
        for status, identifier in assoc.send_c_find(
            query, StudyRootQueryRetrieveInformationModelFind
        ):
            if not status or "Status" not in status:
                break
            code = int(status.Status)
            if code in _PENDING:
                if identifier is not None:
                    matches.append(identifier)
                continue
            final, comment = code, status.get("ErrorComment")
        if final != 0x0000:
            reason = (
                "no answer (association lost or timed out)"
                if final is None
                else f"status 0x{final:04X}{f' ({comment})' if comment else ''}"
            )
            raise ArchiveError(f"C-FIND at {self.name} failed: {reason}")
        return matches

    def find_studies(self, flt: StudyFilter, today: dt.date | None = None) -> list[FoundStudy]:
        """Every study matching ``flt``, oldest first, each with what to retrieve of it.

        The archive's matching is trusted for nothing: dates, modality and
        description are checked again here. Raises :class:`ArchiveError` when
        the archive cannot be queried.
        """
        until = flt.until or today or dt.date.today()
        wanted = flt.modality.strip().upper() if flt.modality else None
        found: dict[str, FoundStudy] = {}
        with self._associate(self._ae_for_find()) as assoc:
            for start, end in date_windows(flt.since, until):
                for match in self._find_window(assoc, start, end, wanted, flt.description):
                    study = self._study_from(assoc, match, flt, until, wanted)
                    if study is not None:
                        found.setdefault(study.study_instance_uid, study)
        return sorted(
            found.values(), key=lambda s: (s.study_date or dt.date.min, s.study_instance_uid)
        )

    def _find_window(
        self,
        assoc: Association,
        start: dt.date,
        end: dt.date,
        modality: str | None,
        description: str | None,
    ) -> list[Dataset]:
        matches = self._find(assoc, _study_query(start, end, modality, description))
        if len(matches) < FIND_SPLIT_AT or start == end:
            return matches
        middle = start + (end - start) // 2
        return self._find_window(assoc, start, middle, modality, description) + self._find_window(
            assoc, middle + dt.timedelta(days=1), end, modality, description
        )

    def _ae_for_find(self) -> AE:
        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        return ae

    def _study_from(
        self,
        assoc: Association,
        match: Dataset,
        flt: StudyFilter,
        until: dt.date,
        wanted: str | None,
    ) -> FoundStudy | None:
        uid = str(match.get("StudyInstanceUID", "") or "").strip()
        if not uid:
            return None
        date = _date(match.get("StudyDate"))
        if date is not None and not flt.since <= date <= until:
            return None
        description = str(match.get("StudyDescription", "") or "")
        if flt.description and not wildcard_match(flt.description, description):
            return None
        modalities = _values(match.get("ModalitiesInStudy"))
        count = _count(match.get("NumberOfStudyRelatedInstances"))
        if wanted and modalities and wanted not in modalities:
            return None
        needs_series = (
            count is None
            or not modalities
            or bool(NON_IMAGE_MODALITIES & set(modalities))
            or (wanted is not None and set(modalities) != {wanted})
        )
        if not needs_series:
            return FoundStudy(uid, date, modalities, count)
        series = self._find(assoc, _series_query(uid))
        kept = []
        for s in series:
            modality = str(s.get("Modality", "") or "").strip().upper()
            series_uid = str(s.get("SeriesInstanceUID", "") or "").strip()
            if not series_uid or modality in NON_IMAGE_MODALITIES:
                continue
            if wanted and modality != wanted:
                continue
            kept.append(
                FoundSeries(series_uid, modality, _count(s.get("NumberOfSeriesRelatedInstances")))
            )
        if not kept:
            return None
        all_modalities = modalities or tuple(
            sorted({str(s.get("Modality", "")).upper() for s in series})
        )
        counts = [s.instance_count for s in kept]
        total = None if any(c is None for c in counts) else sum(c for c in counts if c)
        every_series = len(kept) == len(series)
        return FoundStudy(uid, date, all_modalities, total, None if every_series else tuple(kept))

    # --- C-MOVE / C-GET ----------------------------------------------------
    def move_study(self, study: FoundStudy, destination_aet: str) -> RetrieveOutcome:
        """C-MOVE the study (or its selected series) to ``destination_aet``."""
        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)

        def send(assoc: Association, query: Dataset) -> Iterator[tuple[Dataset, Any]]:
            return assoc.send_c_move(  # type: ignore[no-any-return]
                query, destination_aet, StudyRootQueryRetrieveInformationModelMove
            )

        return self._retrieve("C-MOVE", ae, study, send, destination=destination_aet)

    def get_study(self, study: FoundStudy, spool: Spool, intake: Intake) -> RetrieveOutcome:
        """C-GET the study over one association; instances go through ``handle_store``."""
        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        roles = []
        for sop_class in ULTRASOUND_SOP_CLASSES:
            # One context per syntax: the archive then sends each instance as stored,
            # instead of having to transcode it into the one syntax it would pick.
            for syntax in ACCEPTED_TRANSFER_SYNTAXES:
                ae.add_requested_context(sop_class, syntax)
            roles.append(build_role(sop_class, scp_role=True))

        def send(assoc: Association, query: Dataset) -> Iterator[tuple[Dataset, Any]]:
            return assoc.send_c_get(  # type: ignore[no-any-return]
                query, StudyRootQueryRetrieveInformationModelGet
            )

        return self._retrieve(
            "C-GET",
            ae,
            study,
            send,
            ext_neg=roles,
            handlers=[(evt.EVT_C_STORE, handle_store, [spool, intake])],
        )

    def _retrieve(
        self,
        operation: str,
        ae: AE,
        study: FoundStudy,
        send: Any,
        *,
        destination: str | None = None,
        ext_neg: list[Any] | None = None,
        handlers: list[Any] | None = None,
    ) -> RetrieveOutcome:
        queries = (
            [_retrieve_query(study.study_instance_uid)]
            if study.series is None
            else [
                _retrieve_query(study.study_instance_uid, s.series_instance_uid)
                for s in study.series
            ]
        )
        answers: list[tuple[int | None, tuple[int, int, int], str | None]] = []
        try:
            with self._associate(ae, ext_neg=ext_neg, handlers=handlers) as assoc:
                for query in queries:
                    status, counts, comment = _final_response(send(assoc, query))
                    reason = status_reason(
                        operation,
                        status,
                        *counts,
                        comment=comment,
                        destination=destination,
                        timeout=self.timeout,
                    )
                    answers.append((status, counts, reason))
                    if status is None or not assoc.is_established:
                        break
        except ArchiveError as exc:
            return RetrieveOutcome(study.study_instance_uid, reason=f"{operation}: {exc}")
        bad = [(n, a) for n, a in enumerate(answers, start=1) if a[2] is not None]
        reasons = [
            str(reason) if len(queries) == 1 else f"series {n} of {len(queries)}: {reason}"
            for n, (_, _, reason) in bad
        ]
        if len(answers) < len(queries):
            reasons.append(f"{len(queries) - len(answers)} series not requested (association lost)")
        completed = sum(a[1][0] for a in answers)
        failed = sum(a[1][1] for a in answers)
        status = bad[0][1][0] if bad else 0x0000
        outcome = RetrieveOutcome(
            study.study_instance_uid,
            completed=completed,
            failed=failed,
            warning=sum(a[1][2] for a in answers),
            status=status,
            reason="; ".join(reasons) if reasons else None,
            hint=destination_hint(status, completed, failed, destination) if reasons else None,
        )
        if outcome.reason:
            logger.warning(
                "retrieve incomplete: %s",
                outcome.explained,
                extra={"study_instance_uid": study.study_instance_uid, "archive": self.name},
            )
        return outcome


def _final_response(
    responses: Iterator[tuple[Dataset, Any]],
) -> tuple[int | None, tuple[int, int, int], str | None]:
    """Drain a C-MOVE/C-GET: (final status or None, (completed, failed, warning), comment)."""
    final: int | None = None
    counts = (0, 0, 0)
    comment = None
    for status, _identifier in responses:
        if not status or "Status" not in status:
            final = None
            break
        code = int(status.Status)
        counts = (
            int(status.get("NumberOfCompletedSuboperations", counts[0]) or 0),
            int(status.get("NumberOfFailedSuboperations", counts[1]) or 0),
            int(status.get("NumberOfWarningSuboperations", counts[2]) or 0),
        )
        if code in _PENDING:
            continue
        final, comment = code, status.get("ErrorComment")
    return final, counts, str(comment) if comment else None


def _study_query(
    start: dt.date, end: dt.date, modality: str | None, description: str | None
) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = ""
    ds.StudyDate = f"{start:%Y%m%d}-{end:%Y%m%d}"
    ds.StudyTime = ""
    ds.ModalitiesInStudy = modality or ""
    ds.StudyDescription = description or ""
    ds.NumberOfStudyRelatedInstances = ""
    ds.NumberOfStudyRelatedSeries = ""
    return ds


def _series_query(study_uid: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "SERIES"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = ""
    ds.Modality = ""
    ds.NumberOfSeriesRelatedInstances = ""
    return ds


def _retrieve_query(study_uid: str, series_uid: str | None = None) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY" if series_uid is None else "SERIES"
    ds.StudyInstanceUID = study_uid
    if series_uid is not None:
        ds.SeriesInstanceUID = series_uid
    return ds
