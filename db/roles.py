"""A read-only PostgreSQL login role for radiologists: SELECT on the views only.

PostgreSQL checks a view's underlying tables with the privileges of the view's
owner, so the role can read every view without any grant on the base tables
(which hold spool paths, claim tokens and full patient rows it does not need).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from sqlalchemy import Engine, text

from thyrocad.db.errors import UnsupportedDatabase
from thyrocad.db.views import VIEW_NAMES

_ROLE_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def create_readonly_role(
    engine: Engine,
    role: str = "thyrocad_reader",
    password: str | None = None,
    tables: Sequence[str] = (),
) -> list[str]:
    """Create (or bring up to date) a LOGIN role that may only SELECT the views.

    Idempotent: an existing role keeps its other attributes, gets the new
    password if one is given, loses any privilege on the base tables of the
    current schema, and is granted CONNECT on the current database, USAGE on
    the current schema and SELECT on each view of ``db.views``.

    Returns the statements executed, with the password shown as ``'***'``.
    Raises ``UnsupportedDatabase`` on anything but PostgreSQL (SQLite has no
    roles: give radiologists a copy of the file instead) and ``ValueError`` for
    a role name that is not a plain lower-case identifier.
    """
    if engine.dialect.name != "postgresql":
        raise UnsupportedDatabase(
            f"read-only roles need PostgreSQL; this database is {engine.dialect.name}"
        )
    if not _ROLE_NAME.match(role):
        raise ValueError(f"role name {role!r} must match {_ROLE_NAME.pattern}")
    unknown = [t for t in tables if not _ROLE_NAME.match(t)]
    if unknown:
        raise ValueError(f"not table names: {', '.join(map(repr, unknown))}")
    quote = engine.dialect.identifier_preparer.quote
    executed: list[str] = []
    with engine.begin() as connection:
        database = connection.execute(text("SELECT current_database()")).scalar_one()
        schema = connection.execute(text("SELECT current_schema()")).scalar_one()
        exists = connection.execute(
            text("SELECT 1 FROM pg_roles WHERE rolname = :role"), {"role": role}
        ).first()
        if exists is None:
            statement = f"CREATE ROLE {quote(role)} LOGIN"
        else:
            statement = f"ALTER ROLE {quote(role)} LOGIN"
        if password is not None:
            # psycopg2 interpolates parameters on the client, so a bound value is
            # safe even in DDL, and the password never appears in the returned SQL.
            connection.exec_driver_sql(statement + " PASSWORD %(password)s", {"password": password})
            executed.append(statement + " PASSWORD '***'")
        else:
            connection.exec_driver_sql(statement)
            executed.append(statement)
        statements = [
            f"REVOKE ALL ON ALL TABLES IN SCHEMA {quote(schema)} FROM {quote(role)}",
            f"GRANT CONNECT ON DATABASE {quote(database)} TO {quote(role)}",
            f"GRANT USAGE ON SCHEMA {quote(schema)} TO {quote(role)}",
            *(
                f"GRANT SELECT ON {quote(schema)}.{quote(view)} TO {quote(role)}"
                for view in (*VIEW_NAMES, *tables)
            ),
        ]
        for statement in statements:
            connection.exec_driver_sql(statement)
            executed.append(statement)
    return executed
