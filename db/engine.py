"""Engines, sessions and migrations, each made by a function and never at import.

PostgreSQL (``postgresql+psycopg2://…``) is the production database; SQLite
(``sqlite:///path``) is the embedded default, where several processes
(listener, workers, beat) share one file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from thyrocad.db.errors import DbError

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

#: How long a SQLite connection waits for another process's write lock.
SQLITE_BUSY_TIMEOUT_MS = 30_000


def is_sqlite(url: str) -> bool:
    """Tell whether a database URL names SQLite."""
    return make_url(url).get_backend_name() == "sqlite"


def make_engine(url: str, **kwargs: Any) -> Engine:
    """Create an engine for ``url``; extra keyword arguments go to ``create_engine``.

    SQLite connections get WAL journaling (readers do not block the writer),
    enforced foreign keys, and a 30 s busy timeout so that a second process
    waits for the write lock instead of failing at once. PostgreSQL pools
    check connections before use, so a restarted server costs no failed task.
    """
    if is_sqlite(url):
        database = make_url(url).database
        if database and database != ":memory:" and not database.startswith("file:"):
            # The embedded default lives under a data folder that may not exist yet.
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, **kwargs)
        event.listen(engine, "connect", _sqlite_on_connect)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(url, **kwargs)


def _sqlite_on_connect(dbapi_connection: Any, connection_record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        # busy_timeout first: switching to WAL itself may need to wait for a lock.
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Return a session factory bound to ``engine``.

    Objects are not expired on commit: the repository hands out plain records,
    and a caller that commits then reads a record must not trigger a reload.
    """
    return sessionmaker(bind=engine, expire_on_commit=False)


def dispose_after_fork(engine: Engine) -> None:
    """Forget the pooled connections inherited from a parent process.

    Call it in a forked child before its first query, e.g. from Celery's
    ``worker_process_init`` signal. ``close=False`` leaves the parent's
    sockets alone (closing them from the child would break the parent) and
    lets the child open its own connections.
    """
    engine.dispose(close=False)


def alembic_config(url: str | None = None) -> Config:
    """Build the Alembic configuration in code: no ``alembic.ini`` is needed.

    The URL travels in ``Config.attributes`` rather than the ini options, so
    a password containing ``%`` is not mangled by configparser interpolation.
    """
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        config.attributes["url"] = url
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database at ``url`` up to ``revision``.

    Safe to call from several processes at start-up: on PostgreSQL an
    advisory lock and on SQLite an immediate write transaction serialise
    them, and the later ones find the database already at ``revision``.
    """
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    """Migrate the database at ``url`` down to ``revision`` (``"base"`` empties it)."""
    command.downgrade(alembic_config(url), revision)


def current_revision(url: str) -> str | None:
    """Return the migration revision the database is at, or None if never migrated."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def head_revision() -> str:
    """Return the newest migration revision shipped with this code."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:  # pragma: no cover - the package always ships migrations
        raise DbError(f"no Alembic migrations found in {MIGRATIONS_DIR}")
    return head
