"""Alembic environment for thyrocad, driven from ``db.engine`` (no alembic.ini).

The database comes from ``config.attributes["connection"]`` (an open
connection, e.g. from a test) or ``config.attributes["url"]``. Only online
migrations are supported: offline SQL scripts would need per-dialect output
and nobody asked for them.
"""

from __future__ import annotations

from typing import Any

from alembic import context
from sqlalchemy import Connection, event, pool, text

from thyrocad.db.engine import make_engine
from thyrocad.db.schema import Base

# Any constant works; it only has to be the same in every process that migrates.
_PG_MIGRATION_LOCK = 0x7479726F  # "tyro"

config = context.config
target_metadata = Base.metadata


def _sqlite_for_migrations(dbapi_connection: Any, connection_record: Any) -> None:
    # Take transaction control away from pysqlite so that DDL runs inside the
    # BEGIN below (pysqlite would autocommit each CREATE, leaving a half-built
    # schema after a failure), and turn foreign keys off because batch mode
    # rebuilds tables that others reference. The pragma is a no-op inside a
    # transaction, so it is set here, before BEGIN.
    dbapi_connection.isolation_level = None
    dbapi_connection.execute("PRAGMA foreign_keys = OFF")


def _sqlite_begin_immediate(connection: Connection) -> None:
    # IMMEDIATE takes the write lock before Alembic reads the current revision,
    # so concurrent upgrades queue up (busy_timeout) instead of racing.
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def _run(connection: Connection, *, sqlite_owned: bool = False) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        # With BEGIN issued by us (see _sqlite_for_migrations) SQLite runs DDL
        # transactionally, so all migrations of one upgrade commit together.
        transactional_ddl=True if sqlite_owned else None,
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            # Released at commit; serialises processes migrating at start-up.
            connection.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK}
            )
        context.run_migrations()


def run_migrations_online() -> None:
    """Run the migrations on the configured connection or URL."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = config.attributes.get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no database URL given to the thyrocad migrations")
    engine = make_engine(url, poolclass=pool.NullPool)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_for_migrations)
        event.listen(engine, "begin", _sqlite_begin_immediate)
    try:
        with engine.connect() as connection:
            _run(connection, sqlite_owned=engine.dialect.name == "sqlite")
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise RuntimeError("offline (--sql) migrations are not supported by thyrocad")
run_migrations_online()
