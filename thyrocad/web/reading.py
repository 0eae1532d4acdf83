"""Where the web page reads: through ``THYROCAD_WEB_READ_DATABASE_URL`` when it can.

The page's reads (worklist, study page, images, models) go through that URL, meant
for a read-only PostgreSQL role; sign-ins, labels and audit events always go through
``DATABASE_URL``. The role ``thyrocad db reader-role`` makes can read the result
views only, and those carry no row ids (the page links studies and images by id) nor
spool paths, SR dispatches or evidence maps. So at start-up each table the page
reads is probed; if the role cannot read one, the page says so in one warning and
reads through ``DATABASE_URL`` instead (grant that role SELECT on the tables named
to read through it).
"""

from __future__ import annotations

import logging

from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from thyrocad.errors import safe_url
from thyrocad.settings import Settings

logger = logging.getLogger(__name__)

#: Every table a page reads (never written through the read URL).
READ_TABLES: tuple[str, ...] = (
    "patients",
    "studies",
    "series",
    "instances",
    "predictions",
    "evidence_maps",
    "study_results",
    "patient_results",
    "sr_dispatches",
    "labels",
    "model_versions",
)


def web_engine(url: str) -> Engine:
    """An engine for the web page. On PostgreSQL its sessions run without JIT
    compilation: the worklist's queries are short, and the planner's cost estimates for
    them (an anti-join per result) cross ``jit_above_cost``, where compiling alone took
    20 ms of a 70 ms query in ``bench/bench_worklist.py``."""
    from thyrocad.db.engine import is_sqlite, make_engine

    if is_sqlite(url):
        return make_engine(url)
    return make_engine(url, connect_args={"options": "-c jit=off"})


def unreadable_tables(engine: Engine) -> list[str]:
    """The tables of :data:`READ_TABLES` this engine's role may not SELECT."""
    missing = []
    with engine.connect() as connection:
        for table in READ_TABLES:
            try:
                with connection.begin():
                    connection.execute(text(f"SELECT 1 FROM {table} LIMIT 0"))  # noqa: S608
            except DBAPIError as exc:
                if "permission denied" not in str(exc.orig).lower():
                    raise
                missing.append(table)
    return missing


def page_read_sessions(settings: Settings, main: sessionmaker[Session]) -> sessionmaker[Session]:
    """The session factory pages read through (see the module docstring)."""
    from thyrocad.db.engine import make_session_factory

    url = settings.web_read_database_url
    if not url:
        return main
    engine = web_engine(url)
    missing = unreadable_tables(engine)
    if missing:
        engine.dispose()
        logger.warning(
            "THYROCAD_WEB_READ_DATABASE_URL (%s) cannot read %s: the result views it may "
            "read carry no row ids for the page to link by, so the page reads through "
            "DATABASE_URL; grant that role SELECT on these tables to read through it",
            safe_url(url),
            ", ".join(missing),
        )
        return main
    logger.info("web pages read through THYROCAD_WEB_READ_DATABASE_URL (%s)", safe_url(url))
    return make_session_factory(engine)
