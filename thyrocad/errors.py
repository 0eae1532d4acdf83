"""What the command line answers to an ordinary mistake: one line, no traceback.

Commands raise :class:`UserError` where they know what went wrong, or let a known
library error through (an unreachable database, a port in use, a bad broker URL);
:func:`explain` turns either into the sentence ``thyrocad`` prints after ``error:``.
Anything it does not know is a bug and keeps its traceback. No message carries a
password.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from thyrocad.settings import Settings


class UserError(Exception):
    """A mistake the person running thyrocad can fix; the message says how."""


class DatabaseMissing(UserError):
    """No thyrocad database where the settings point (a read command creates none)."""


class PortInUse(UserError):
    """A port this process must listen on is taken by another process."""


def safe_url(url: str) -> str:
    """``url`` with any password replaced by ``***``."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL at all: show only its scheme
        scheme = url.split("://", 1)[0] if "://" in url else ""
        return f"{scheme}://…" if scheme else "(not a URL)"


def database_name(settings: Settings) -> str:
    """How a message names the configured database (a path for SQLite, else the URL)."""
    from sqlalchemy.engine import make_url

    if not settings.database_url:
        return f"{make_url(settings.db_url).database} (THYROCAD_DATA_DIR={settings.data_dir})"
    return f"{safe_url(settings.database_url)} (DATABASE_URL)"


def settings_message(exc: Exception) -> str:
    """One line for a pydantic ValidationError of :class:`Settings`: each bad variable,
    its value and what is wrong."""
    from thyrocad.settings import Settings

    parts = []
    for problem in exc.errors():  # type: ignore[attr-defined]
        where = [str(part) for part in problem.get("loc") or ()]
        field = Settings.model_fields.get(where[0]) if where else None
        if field is not None:
            alias = field.validation_alias
            name = alias if isinstance(alias, str) else f"THYROCAD_{where[0].upper()}"
            value = problem.get("input")
            shown = "***" if "url" in name.lower() else value
            parts.append(f"{name}={shown}: {str(problem['msg']).removeprefix('Value error, ')}")
        else:
            parts.append(str(problem["msg"]).removeprefix("Value error, "))
    return "invalid settings: " + "; ".join(parts)


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _database_message(exc: BaseException, settings: Settings | None) -> str:
    orig = getattr(exc, "orig", None) or exc
    reason = _first_line(orig)
    where = database_name(settings) if settings is not None else "the configured database"
    lowered = reason.lower()
    if "no such table" in lowered or "no such column" in lowered or "relation" in lowered:
        return (
            f"the database {where} has no thyrocad schema, or an old one: run 'thyrocad db upgrade'"
        )
    if "database" in lowered and "does not exist" in lowered:
        return (
            f"the database {where} does not exist: create it (createdb) and run "
            "'thyrocad db upgrade', or fix DATABASE_URL"
        )
    if "password authentication failed" in lowered or "role" in lowered:
        return f"the database server refused the login to {where}: check the user and password"
    if "unable to open database file" in lowered:
        return f"cannot open the SQLite database {where}: check that the folder is writable"
    reason = _unreachable_reason(exc)
    return f"cannot reach the database {where}: {reason}; check DATABASE_URL and that it runs"


def _unreachable_reason(exc: BaseException) -> str:
    # psycopg2: 'connection to server at "h", port p failed: Connection refused'
    return _first_line(getattr(exc, "orig", None) or exc).split(" failed: ", 1)[-1]


def database_unreachable(exc: BaseException) -> bool:
    """True when ``exc`` says the database server cannot be reached now (it may come
    back), False for a database that is not there or not ours (a setting to fix)."""
    import sqlalchemy.exc as sa

    return isinstance(exc, sa.OperationalError) and _database_message(exc, None).startswith(
        "cannot reach"
    )


def _broker_message(exc: BaseException, settings: Settings | None) -> str:
    where = safe_url(settings.broker_url) if settings is not None else "the configured broker"
    return (
        f"cannot reach the broker {where} (CELERY_BROKER_URL): {_first_line(exc)}; "
        "check the URL and that the server runs"
    )


def explain(exc: BaseException, settings: Settings | None) -> str | None:
    """The one-line answer to ``exc``, or None when it is not an ordinary mistake."""
    import sqlalchemy.exc as sa
    from kombu.exceptions import OperationalError as BrokerError
    from pydantic import ValidationError

    from thyrocad.db.errors import DbError
    from thyrocad.models.errors import ModelsError
    from thyrocad.pacs.errors import PacsError

    if isinstance(exc, UserError | DbError | PacsError | ModelsError):
        return str(exc)
    if isinstance(exc, ValidationError):
        return settings_message(exc)
    if isinstance(exc, sa.ArgumentError | sa.NoSuchModuleError):
        return (
            f"DATABASE_URL is not a database URL we can use ({_first_line(exc)}): write "
            "postgresql+psycopg2://USER@HOST:PORT/NAME, or leave it empty for SQLite"
        )
    if isinstance(exc, sa.OperationalError | sa.InterfaceError | sa.ProgrammingError):
        return _database_message(exc, settings)
    if isinstance(exc, BrokerError) or type(exc).__module__.startswith("redis"):
        return _broker_message(exc, settings)
    if isinstance(exc, OSError):
        if exc.errno == errno.EADDRINUSE:
            return f"an address this command listens on is in use ({exc.strerror})"
        if exc.filename is not None and exc.strerror:
            return f"{exc.filename}: {exc.strerror}"
    return None
