"""What every command module shares: consoles, settings, errors, progress, sessions."""

from __future__ import annotations

import logging
import ssl
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from thyrocad.errors import DatabaseMissing, database_name, database_unreachable, explain
from thyrocad.settings import Settings, load_settings

console = Console()
err = Console(stderr=True)
logger = logging.getLogger(__name__)


class State:
    """The settings of this invocation, set once by the app callback."""

    settings: Settings | None = None
    debug: bool = False


def settings() -> Settings:
    if State.settings is None:
        State.settings = load_settings()
    return State.settings


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print a clear error (one line, the message taken literally) and return the Exit to
    raise."""
    err.print(Text.assemble(("error:", "bold red"), " ", message), soft_wrap=True)
    return typer.Exit(code)


def note(message: str) -> None:
    """One informational line on stderr (stdout stays the command's answer)."""
    err.print(Text(message, style="dim"), soft_wrap=True)


def progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=err,
    )


def ensure_schema(s: Settings, *, service: bool = False) -> None:
    """The embedded default migrates itself; production runs 'thyrocad db upgrade'.

    ``service``: a long-running process, which starts even when the database is
    unreachable (see :func:`check_database`).
    """
    from thyrocad.db.engine import upgrade

    if not s.database_url:
        s.data_dir.mkdir(parents=True, exist_ok=True)
        upgrade(s.db_url)
    elif service:
        check_database(s)


def sessions(s: Settings) -> Any:
    """A session factory for the configured database (migrated first when embedded)."""
    from thyrocad.db.engine import make_engine, make_session_factory

    ensure_schema(s)
    return make_session_factory(make_engine(s.db_url))


def check_database(s: Settings) -> None:
    """At the start of a service: UserError for a database that is not there or has no
    schema; one warning when it is unreachable (the service waits for it: a listener
    spools meanwhile, workers retry)."""
    from thyrocad.db.engine import current_revision

    try:
        revision = current_revision(s.db_url)
    except Exception as exc:
        if not database_unreachable(exc):
            raise
        logger.warning("%s; starting anyway", explain(exc, s))
        return
    if revision is None:
        raise DatabaseMissing(
            f"the database {database_name(s)} has no thyrocad schema: run 'thyrocad db upgrade'"
        )


def read_sessions(s: Settings) -> Any:
    """A session factory for a command that only reads: it never creates or migrates a
    database. DatabaseMissing (naming the place looked at) when there is none there."""
    from sqlalchemy.engine import make_url

    from thyrocad.db.engine import current_revision, is_sqlite, make_engine, make_session_factory

    where = database_name(s)
    if is_sqlite(s.db_url):
        path = make_url(s.db_url).database or ""
        if path and path != ":memory:" and not Path(path).is_file():
            raise DatabaseMissing(
                f"no database at {where}: create it with 'thyrocad db upgrade', or point "
                "THYROCAD_DATA_DIR (or DATABASE_URL) at the existing one"
            )
    if current_revision(s.db_url) is None:
        raise DatabaseMissing(
            f"the database {where} has no thyrocad schema: run 'thyrocad db upgrade'"
        )
    return make_session_factory(make_engine(s.db_url))


def say_database(s: Settings) -> None:
    """Tell which database a read command answered from."""
    note(f"database: {database_name(s)}")


def peer_tls(s: Settings, enabled: bool) -> ssl.SSLContext | None:
    """The TLS context of an association thyrocad opens with ``--tls``, else None."""
    if not enabled:
        return None
    from thyrocad.pacs.tls import TlsConfig, client_context

    return client_context(TlsConfig(*s.tls_files))


TLS_HELP = (
    "DICOM over TLS: the peer's certificate is verified against THYROCAD_TLS_CA; "
    "THYROCAD_TLS_CERT/_KEY identify us."
)
