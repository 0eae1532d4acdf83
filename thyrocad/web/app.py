"""The web application: sign-in, worklist, study page with evidence, labels, models.

``create_app(settings)`` builds it (``thyrocad web`` serves it with uvicorn). Pages are
server-rendered Jinja2 templates; URLs carry opaque row ids only, never a UID, patient
id or accession number. Pages ask for a signed-in user (otherwise 303 to ``/login``),
images answer 401 instead. Every study viewed, every worklist read, every sign-in and
every label goes to the audit trail, naming the user, never the patient.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, FileSystemLoader, select_autoescape
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker
from starlette.exceptions import HTTPException as StarletteHTTPException

from thyrocad.db import repository
from thyrocad.db.errors import RepositoryError
from thyrocad.db.repository import users, worklist
from thyrocad.db.repository.audit import RESULTS_READ
from thyrocad.settings import Settings
from thyrocad.web.auth import (
    COOKIE_NAME,
    Passwords,
    SessionCookies,
    SessionData,
    same_token,
    secret_key,
)
from thyrocad.web.images import (
    DEFAULT_SIZE,
    ImageUnavailable,
    PngCache,
    model_input,
    overlay,
    png,
)
from thyrocad.web.observability import RequestObserver, WebMetrics
from thyrocad.web.reading import page_read_sessions, web_engine

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
STUDY_VIEWED = "study_viewed"
WEB_SIGN_IN = "web_sign_in"
WEB_SIGN_OUT = "web_sign_out"
#: The plots an evaluation writes (models.evaluation_report), by the name in their URL.
PLOT_NAMES = ("roc", "pr")
PAGE_SIZE = 50
LOGIN_FAILED = "Wrong user name or password"
_NOTE_MAX = 2000


class NotSignedIn(Exception):
    """No valid session: pages redirect to /login, images answer 401."""

    def __init__(self, image: bool) -> None:
        self.image = image


class Forbidden(Exception):
    def __init__(self, message: str) -> None:
        self.message = message


class NotFound(Exception):
    def __init__(self, message: str) -> None:
        self.message = message


@dataclass(frozen=True)
class Viewer:
    """The signed-in user of one request (re-read from the database) and their session."""

    user: users.WebUserRecord
    session: SessionData
    https: bool = False  # as the client sees it (behind a TLS proxy: X-Forwarded-Proto)


@dataclass
class WebContext:
    """What every route needs; made once per app."""

    settings: Settings
    sessions: sessionmaker[Session]  # sign-in bookkeeping, labels, audit events
    read_sessions: sessionmaker[Session]  # what pages show
    cookies: SessionCookies
    passwords: Passwords
    clock: Callable[[], float]
    templates: Jinja2Templates
    metrics: WebMetrics
    page_size: int = PAGE_SIZE
    cache: PngCache = field(default_factory=PngCache)

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)


# --------------------------------------------------------------------------- the app


def create_app(
    settings: Settings,
    *,
    sessions: sessionmaker[Session] | None = None,
    read_sessions: sessionmaker[Session] | None = None,
    clock: Callable[[], float] = time.time,
    passwords: Passwords | None = None,
    secret: bytes | None = None,
    page_size: int = PAGE_SIZE,
) -> FastAPI:
    """The web application for ``settings``.

    ``sessions``: the main database (default: ``settings.db_url``); ``read_sessions``:
    where pages read (default: ``THYROCAD_WEB_READ_DATABASE_URL`` when it can read what
    the pages need, else the main database); ``clock`` (seconds since the epoch) and
    ``secret`` (the cookie key, default :func:`~thyrocad.web.auth.secret_key`) for tests;
    ``page_size``: worklist rows per page.
    """
    from thyrocad.db.engine import make_session_factory

    if sessions is None:
        sessions = make_session_factory(web_engine(settings.db_url))
    if read_sessions is None:
        read_sessions = page_read_sessions(settings, sessions)
    environment = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=select_autoescape(["html"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters.update(
        person=person_name, percent=percent, when=when, day=day, finding=finding_text
    )
    metrics = WebMetrics()
    ctx = WebContext(
        settings=settings,
        sessions=sessions,
        read_sessions=read_sessions,
        cookies=SessionCookies(secret or secret_key(settings), settings.web_session_minutes),
        passwords=passwords or Passwords(),
        clock=clock,
        templates=Jinja2Templates(env=environment),
        metrics=metrics,
        page_size=page_size,
    )
    app = FastAPI(title="thyrocad", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ctx = ctx
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.add_middleware(RequestObserver, metrics=metrics)  # type: ignore[arg-type]
    _exception_handlers(app, ctx)
    _routes(app, ctx)
    return app


def _exception_handlers(app: FastAPI, ctx: WebContext) -> None:
    @app.exception_handler(NotSignedIn)
    def not_signed_in(request: Request, exc: NotSignedIn) -> Response:
        if exc.image:
            response: Response = Response("sign in first", status_code=401, media_type="text/plain")
        else:
            response = RedirectResponse("/login", status_code=303)
        if request.cookies.get(COOKIE_NAME):
            response.delete_cookie(COOKIE_NAME, path="/")
        return response

    @app.exception_handler(Forbidden)
    def forbidden(request: Request, exc: Forbidden) -> Response:
        return _error_page(ctx, request, 403, exc.message)

    @app.exception_handler(NotFound)
    def not_found(request: Request, exc: NotFound) -> Response:
        return _error_page(ctx, request, 404, exc.message)

    @app.exception_handler(RequestValidationError)
    def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        # A malformed id in a URL names no page; a malformed form is a bad request.
        if any(tuple(error.get("loc", ()))[:1] == ("path",) for error in exc.errors()):
            return _error_page(ctx, request, 404, "There is no such page.")
        return _error_page(ctx, request, 400, "The form was not filled in as expected.")

    @app.exception_handler(StarletteHTTPException)
    def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = "There is no such page." if exc.status_code == 404 else str(exc.detail)
        return _error_page(ctx, request, exc.status_code, message)


def _error_page(ctx: WebContext, request: Request, status: int, message: str) -> Response:
    viewer = getattr(request.state, "viewer", None)
    response = ctx.templates.TemplateResponse(
        request,
        "error.html",
        {"viewer": viewer, "status": status, "message": message},
        status_code=status,
    )
    if viewer is not None:
        _keep_session(ctx, response, viewer)
    return response


# --------------------------------------------------------------------------- sessions


def _viewer(ctx: WebContext, request: Request, *, image: bool = False) -> Viewer:
    """The signed-in user of this request, re-read from the database, or NotSignedIn."""
    data = ctx.cookies.load(request.cookies.get(COOKIE_NAME), ctx.clock())
    if data is None:
        raise NotSignedIn(image)
    with ctx.sessions() as session:
        user = users.get_user(session, data.user_id)
    if user is None or user.disabled:
        raise NotSignedIn(image)
    viewer = Viewer(user, data, request.url.scheme == "https")
    request.state.viewer = viewer
    return viewer


def _keep_session(ctx: WebContext, response: Response, viewer: Viewer) -> None:
    """Renew the idle timer: the cookie again, with this request's time."""
    renewed = SessionData(viewer.user.id, viewer.session.csrf_token, ctx.clock())
    _set_cookie(response, ctx.cookies.dump(renewed), secure=viewer.https)


def _set_cookie(response: Response, value: str, *, secure: bool) -> None:
    """The session cookie; Secure when the page is reached over HTTPS (a TLS proxy in
    front, whose X-Forwarded-Proto uvicorn trusts from 127.0.0.1)."""
    response.set_cookie(
        COOKIE_NAME,
        value,
        httponly=True,
        samesite="lax",
        secure=secure,
        path="/",
    )


def _page(
    ctx: WebContext,
    request: Request,
    viewer: Viewer,
    template: str,
    context: dict[str, Any],
    status: int = 200,
) -> Response:
    response = ctx.templates.TemplateResponse(
        request, template, {"viewer": viewer, **context}, status_code=status
    )
    _keep_session(ctx, response, viewer)
    return response


def _audit(ctx: WebContext, kind: str, actor: str, outcome: str, details: dict[str, Any]) -> None:
    with ctx.sessions.begin() as session:
        repository.record_audit_event(
            session,
            kind,
            actor=actor,
            outcome=outcome,  # type: ignore[arg-type]
            details=details,
            now=ctx.now(),
        )


# --------------------------------------------------------------------------- routes


def _routes(app: FastAPI, ctx: WebContext) -> None:
    @app.get("/healthz")
    def healthz() -> JSONResponse:
        return JSONResponse({"status": "alive", "role": "web"})

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        try:
            with ctx.sessions() as session:
                session.execute(text("SELECT 1"))
        except Exception as exc:  # any failure: not ready, the reason goes to the log
            logger.warning("readiness: database unreachable", extra={"reason": type(exc).__name__})
            body = {"ready": False, "checks": {"database": {"ok": False, "detail": "unreachable"}}}
            return JSONResponse(body, status_code=503)
        return JSONResponse({"ready": True, "checks": {"database": {"ok": True, "detail": ""}}})

    @app.get("/metrics")
    def metrics_endpoint() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(ctx.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/login", response_class=HTMLResponse)
    def login_form(request: Request) -> Response:
        return ctx.templates.TemplateResponse(request, "login.html", {"error": None})

    @app.post("/login")
    async def login(request: Request) -> Response:
        form = await request.form()
        username = str(form.get("username") or "").strip()
        password = str(form.get("password") or "")
        return await _run_sync(sign_in, request, username, password)

    def sign_in(request: Request, username: str, password: str) -> Response:
        now = ctx.now()
        with ctx.sessions.begin() as session:
            outcome = users.verify_login(
                session,
                username,
                ctx.passwords.matcher(password),
                rehash=ctx.passwords.rehasher(password),
                now=now,
            )
            user = outcome.user
            # Only a name that exists is written down: a password typed into the name
            # field must not land in the audit trail.
            repository.record_audit_event(
                session,
                WEB_SIGN_IN,
                actor=username if outcome.reason != "no such user" else "unknown user",
                outcome="success" if user is not None else "refused",
                details={
                    **({"user_id": user.id} if user is not None else {"reason": outcome.reason}),
                    "address": _client(request),
                },
                now=now,
            )
        if user is None:
            ctx.metrics.sign_ins.labels("refused").inc()
            logger.info("web sign-in refused", extra={"address": _client(request)})
            return ctx.templates.TemplateResponse(
                request, "login.html", {"error": LOGIN_FAILED}, status_code=401
            )
        ctx.metrics.sign_ins.labels("success").inc()
        logger.info("web sign-in", extra={"user": user.username, "role": user.role})
        response = RedirectResponse("/", status_code=303)
        _set_cookie(
            response,
            ctx.cookies.dump(ctx.cookies.new(user.id, ctx.clock())),
            secure=request.url.scheme == "https",
        )
        return response

    @app.post("/logout")
    def logout(request: Request) -> Response:
        data = ctx.cookies.load(request.cookies.get(COOKIE_NAME), ctx.clock())
        if data is not None:
            with ctx.sessions() as session:
                user = users.get_user(session, data.user_id)
            if user is not None:
                _audit(ctx, WEB_SIGN_OUT, user.username, "success", {"user_id": user.id})
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE_NAME, path="/")
        return response

    @app.get("/", response_class=HTMLResponse)
    def worklist_page(request: Request) -> Response:
        viewer = _viewer(ctx, request)
        params = request.query_params
        problems: list[str] = []
        filters = worklist.WorklistFilters(
            date_from=_date_param(params.get("from"), "from", problems),
            date_to=_date_param(params.get("to"), "to", problems),
            finding=(params.get("finding") or "").strip() or None,
            model_version=(params.get("model") or "").strip() or None,
            labelled={"yes": True, "no": False}.get(params.get("labelled") or ""),
        )
        older = _int_param(params.get("older_than"), "older_than", problems)
        newer = _int_param(params.get("newer_than"), "newer_than", problems)
        with ctx.read_sessions() as session:
            page = worklist.worklist_page(
                session, filters, limit=ctx.page_size, older_than=older, newer_than=newer
            )
            total = worklist.worklist_count(session, filters, cap=worklist.COUNT_CAP)
            versions = worklist.result_model_versions(session)
            classes = _classes(ctx, session)
        _audit(
            ctx,
            RESULTS_READ,
            viewer.user.username,
            "success",
            {
                "query": "web worklist",
                "rows": len(page.rows),
                "filters": {
                    "from": filters.date_from.isoformat() if filters.date_from else None,
                    "to": filters.date_to.isoformat() if filters.date_to else None,
                    "finding": filters.finding,
                    "model": filters.model_version,
                    "labelled": filters.labelled,
                },
            },
        )
        keep = {
            key: value
            for key in ("from", "to", "finding", "model", "labelled")
            if (value := params.get(key))
        }
        return _page(
            ctx,
            request,
            viewer,
            "worklist.html",
            {
                "page": page,
                "total": total,
                "count_cap": worklist.COUNT_CAP,
                "filters": filters,
                "form": keep,
                "versions": versions,
                "classes": classes,
                "no_finding": worklist.NO_FINDING,
                "next_url": _query_url(keep, older_than=page.older_than)
                if page.older_than
                else None,
                "prev_url": _query_url(keep, newer_than=page.newer_than)
                if page.newer_than
                else None,
                "problems": problems,
            },
            status=400 if problems else 200,
        )

    @app.get("/studies/{study_id}", response_class=HTMLResponse)
    def study(request: Request, study_id: int) -> Response:
        viewer = _viewer(ctx, request)
        return _study_response(ctx, request, viewer, study_id)

    @app.post("/studies/{study_id}/label")
    async def label(request: Request, study_id: int) -> Response:
        form = await request.form()
        return await _run_sync(
            record_label,
            request,
            study_id,
            str(form.get("diagnosis") or "").strip(),
            str(form.get("note") or "").strip(),
            str(form.get("csrf_token") or ""),
        )

    def record_label(
        request: Request, study_id: int, diagnosis: str, note: str, token: str
    ) -> Response:
        viewer = _viewer(ctx, request)
        if not viewer.user.can_label:
            raise Forbidden(
                f"{viewer.user.username} is a {viewer.user.role}: only labellers record labels"
            )
        if not same_token(viewer.session.csrf_token, token):
            raise Forbidden("this form has expired or did not come from this page: reload it")
        problem = None
        with ctx.sessions() as session:
            uid = worklist.study_uid(session, study_id)
            if uid is None:
                raise NotFound(f"there is no study {study_id}")
            classes = _classes(ctx, session)
        if not diagnosis:
            problem = "Choose a diagnosis."
        elif diagnosis not in classes:
            problem = f"Unknown diagnosis {diagnosis!r}: choose one of {', '.join(classes)}."
        elif len(note) > _NOTE_MAX:
            problem = f"The note is {len(note)} characters long: keep it under {_NOTE_MAX}."
        if problem is None:
            try:
                with ctx.sessions.begin() as session:
                    label_id = repository.add_label(
                        session,
                        study_uid=uid,
                        diagnosis=diagnosis,
                        labelled_by=viewer.user.username,
                        source="web",
                        note=note or None,
                        now=ctx.now(),
                        allowed_diagnoses=classes,
                    )
            except RepositoryError as exc:
                problem = str(exc)
            else:
                ctx.metrics.labels.inc()
                logger.info(
                    "label recorded from the web page",
                    extra={"label_id": label_id, "user": viewer.user.username},
                )
                response = RedirectResponse(f"/studies/{study_id}", status_code=303)
                _keep_session(ctx, response, viewer)
                return response
        return _study_response(
            ctx, request, viewer, study_id, problem=problem, status=400, audit=False
        )

    @app.get("/images/{prediction_id}/thumbnail.png")
    def thumbnail(request: Request, prediction_id: int) -> Response:
        viewer = _viewer(ctx, request, image=True)
        return _image_response(ctx, viewer, prediction_id, evidence=False)

    @app.get("/images/{prediction_id}/evidence.png")
    def evidence(request: Request, prediction_id: int) -> Response:
        viewer = _viewer(ctx, request, image=True)
        return _image_response(ctx, viewer, prediction_id, evidence=True)

    @app.get("/models", response_class=HTMLResponse)
    def models_page(request: Request) -> Response:
        viewer = _viewer(ctx, request)
        with ctx.read_sessions() as session:
            active = repository.active_model(session)
            versions = repository.list_model_versions(session)
        with ctx.sessions() as session:  # the audit trail: no view holds it
            promotions = [
                *repository.audit_events(session, kind="model_promoted", limit=200),
                *repository.audit_events(session, kind="model_rolled_back", limit=200),
            ]
        promotions.sort(key=lambda e: (e.at, e.id), reverse=True)
        plots = (
            [name for name in PLOT_NAMES if _plot_path(active.artifact_path, name)]
            if active is not None
            else []
        )
        return _page(
            ctx,
            request,
            viewer,
            "models.html",
            {
                "active": active,
                "metrics": _metric_table(active.metrics if active else {}),
                "versions": versions,
                "promotions": promotions,
                "plots": plots,
            },
        )

    @app.get("/models/{version}/plots/{name}.png")
    def plot(request: Request, version: str, name: str) -> Response:
        viewer = _viewer(ctx, request, image=True)
        if name not in PLOT_NAMES:
            return Response("no such plot", status_code=404, media_type="text/plain")
        with ctx.read_sessions() as session:
            known = {v.version: v for v in repository.list_model_versions(session)}
        found = known.get(version)
        path = _plot_path(found.artifact_path, name) if found is not None else None
        if path is None:
            return Response("no such plot", status_code=404, media_type="text/plain")
        response = Response(path.read_bytes(), media_type="image/png")
        response.headers["Cache-Control"] = "private, max-age=300"
        _keep_session(ctx, response, viewer)
        return response


async def _run_sync(function: Callable[..., Response], *args: Any) -> Response:
    """Run blocking database work off the event loop."""
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(function, *args)


def _study_response(
    ctx: WebContext,
    request: Request,
    viewer: Viewer,
    study_id: int,
    *,
    problem: str | None = None,
    status: int = 200,
    audit: bool = True,
) -> Response:
    with ctx.read_sessions() as session:
        page = worklist.study_page(session, study_id)
        classes = _classes(ctx, session)
    if page is None:
        raise NotFound(f"there is no study {study_id}")
    if audit:
        _audit(
            ctx,
            STUDY_VIEWED,
            viewer.user.username,
            "success",
            {
                "study_id": study_id,
                "result_id": page.latest.result_id if page.latest else None,
                "images": len(page.images),
            },
        )
    return _page(
        ctx,
        request,
        viewer,
        "study.html",
        {
            "study": page,
            "classes": classes,
            "can_label": viewer.user.can_label,
            "problem": problem,
        },
        status=status,
    )


def _image_response(
    ctx: WebContext, viewer: Viewer, prediction_id: int, *, evidence: bool
) -> Response:
    with ctx.read_sessions() as session:
        source = worklist.image_source(session, prediction_id)
        evidence_png = None
        if source is not None and evidence:
            evidence_png = worklist.evidence_png(session, prediction_id)
    if source is None:
        return Response("no such image", status_code=404, media_type="text/plain")
    if evidence and evidence_png is None:
        return Response("no evidence map for this image", status_code=404, media_type="text/plain")
    size = source.input_size or DEFAULT_SIZE
    key = (prediction_id, source.sha256, size, evidence)
    body = ctx.cache.get(key)
    if body is None:
        try:
            grey = model_input(source.spool_path, size, source.frame_index)
            body = png(overlay(grey, evidence_png) if evidence_png is not None else grey)
        except ImageUnavailable as exc:
            logger.warning(
                "image cannot be shown",
                extra={"prediction_id": prediction_id, "reason": str(exc)},
            )
            return Response(str(exc), status_code=404, media_type="text/plain")
        ctx.cache.put(key, body)
    response = Response(body, media_type="image/png")
    response.headers["Cache-Control"] = "private, max-age=300"
    _keep_session(ctx, response, viewer)
    return response


def _classes(ctx: WebContext, session: Session) -> tuple[str, ...]:
    """The diagnoses a label may take: the active model's classes, else the configured."""
    active = repository.active_model(session)
    return tuple(active.classes) if active is not None else tuple(ctx.settings.classes)


def _plot_path(artifact_path: str, name: str) -> Path | None:
    """The evaluation plot ``name`` of the version whose artifact is ``artifact_path``:
    in its folder's ``evaluation/`` (or the folder itself), None when not written."""
    if name not in PLOT_NAMES:
        return None
    folder = Path(artifact_path).parent
    for candidate in (folder / "evaluation" / f"{name}.png", folder / f"{name}.png"):
        if candidate.is_file():
            return candidate
    return None


_METRIC_ROWS = ("auc", "accuracy", "sensitivity", "specificity", "precision", "f1")


def _metric_table(metrics: dict[str, Any]) -> dict[str, Any] | None:
    """Rows ``(name, image cell, patient cell)`` from an evaluation's JSON, None if absent."""
    levels = [level for level in ("image", "patient") if isinstance(metrics.get(level), dict)]
    if not levels:
        return None
    rows = []
    for name in _METRIC_ROWS:
        cells = []
        for level in levels:
            metric = metrics[level].get(name) or {}
            value, interval = metric.get("value"), metric.get("ci95") or [None, None]
            cells.append((value, interval[0], interval[1]))
        rows.append((name, cells))
    return {
        "levels": [(level, metrics[level].get("n")) for level in levels],
        "rows": rows,
        "positive_class": metrics.get("positive_class"),
        "rule": metrics.get("patient_rule"),
    }


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _date_param(value: str | None, name: str, problems: list[str]) -> date | None:
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        problems.append(f"The {name} date is not a date (write YYYY-MM-DD): ignored.")
        return None


def _int_param(value: str | None, name: str, problems: list[str]) -> int | None:
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        problems.append(
            f"The page link is broken ({name} is not a number): showing the first page."
        )
        return None


def _query_url(keep: dict[str, str], **extra: int | None) -> str:
    from urllib.parse import urlencode

    params = {**keep, **{k: str(v) for k, v in extra.items() if v is not None}}
    return "/?" + urlencode(params)


# --------------------------------------------------------------------------- filters


def person_name(value: str | None) -> str:
    """A DICOM person name (``Family^Given^Middle``) as people write it."""
    if not value:
        return ""
    parts = [p.strip() for p in str(value).split("=")[0].split("^")]
    family, given = parts[0], " ".join(p for p in parts[1:] if p)
    return f"{family}, {given}" if family and given else family or given


def percent(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{100.0 * float(value):.1f} %"


def when(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC") if value else ""


def day(value: date | None) -> str:
    return value.isoformat() if value else "unknown"


def finding_text(value: str | None) -> str:
    return value if value else "no finding"
