"""Accounts of the web page: creating, listing and disabling users, and signing in.

Passwords never reach this module: callers hash them (``thyrocad.web.auth``) and pass
the hash in, and a sign-in passes a function that checks a stored hash. A user is
disabled, never deleted, so that the audit trail's names keep meaning someone.
Creating and disabling a user are audited (``web_user_added``, ``web_user_disabled``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from thyrocad.db.errors import RepositoryError
from thyrocad.db.repository._common import _insert, _no_sync, _now
from thyrocad.db.repository.audit import default_actor, record_audit_event
from thyrocad.db.schema import WEB_ROLES, WebUser

WEB_USER_ADDED = "web_user_added"
WEB_USER_DISABLED = "web_user_disabled"

# A user name is shown in the page header and written into labels and the audit trail:
# letters, digits and . _ @ - only, so it needs no quoting anywhere.
_USERNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


@dataclass(frozen=True)
class WebUserRecord:
    """A web user as the page and the CLI see one (never the password hash)."""

    id: int
    username: str
    role: str
    disabled: bool
    created_at: datetime
    last_login_at: datetime | None

    @property
    def can_label(self) -> bool:
        return self.role == "labeller" and not self.disabled


def _record(row: WebUser) -> WebUserRecord:
    return WebUserRecord(
        id=row.id,
        username=row.username,
        role=row.role,
        disabled=bool(row.disabled),
        created_at=row.created_at,
        last_login_at=row.last_login_at,
    )


def check_username(username: str) -> str:
    """Return ``username`` if it is a valid user name, else raise ``RepositoryError``."""
    if not _USERNAME.match(username or ""):
        raise RepositoryError(
            f"{username!r} is not a user name: use 1 to 64 letters, digits and . _ @ -, "
            "starting with a letter or digit"
        )
    return username


def create_user(
    session: Session,
    username: str,
    password_hash: str,
    role: str,
    *,
    actor: str | None = None,
    now: datetime | None = None,
) -> WebUserRecord:
    """Add a user with an already hashed password; return it.

    Raises ``RepositoryError`` for an invalid name, an unknown role, an empty hash
    or a name that is taken (disabled users keep their names). Audited as done by
    ``actor`` (default: this process's OS user).
    """
    check_username(username)
    if role not in WEB_ROLES:
        raise RepositoryError(f"unknown role {role!r}: choose one of {', '.join(WEB_ROLES)}")
    if not password_hash:
        raise RepositoryError("a user needs a password hash")
    now = _now(now)
    user_id = session.execute(
        _insert(session, WebUser)
        .values(
            username=username,
            password_hash=password_hash,
            role=role,
            disabled=False,
            created_at=now,
            last_login_at=None,
        )
        .on_conflict_do_nothing(index_elements=[WebUser.username])
        .returning(WebUser.id)
    ).scalar_one_or_none()
    if user_id is None:
        raise RepositoryError(f"a user named {username!r} exists already")
    record_audit_event(
        session,
        WEB_USER_ADDED,
        actor=actor or default_actor(),
        details={"user_id": user_id, "username": username, "role": role},
        now=now,
    )
    return WebUserRecord(user_id, username, role, False, now, None)


def list_users(session: Session) -> list[WebUserRecord]:
    """Every user, disabled ones included, by name."""
    rows = session.execute(select(WebUser).order_by(WebUser.username)).scalars()
    return [_record(row) for row in rows]


def get_user(session: Session, user_id: int) -> WebUserRecord | None:
    """The user with this id, or None (the page re-reads it on every request)."""
    row = session.get(WebUser, user_id, populate_existing=True)
    return None if row is None else _record(row)


def disable_user(
    session: Session, username: str, *, actor: str | None = None, now: datetime | None = None
) -> WebUserRecord:
    """Disable a user: they can no longer sign in, and a signed-in session of theirs
    ends at its next request. Idempotent; audited. ``RepositoryError`` for an
    unknown user."""
    row = session.execute(
        select(WebUser).where(WebUser.username == username).with_for_update()
    ).scalar_one_or_none()
    if row is None:
        raise RepositoryError(f"no user named {username!r}")
    was_disabled = bool(row.disabled)
    session.execute(
        update(WebUser)
        .where(WebUser.id == row.id)
        .values(disabled=True)
        .execution_options(**_no_sync())
    )
    record_audit_event(
        session,
        WEB_USER_DISABLED,
        actor=actor or default_actor(),
        details={"user_id": row.id, "username": username, "changed": not was_disabled},
        now=now,
    )
    return WebUserRecord(row.id, row.username, row.role, True, row.created_at, row.last_login_at)


@dataclass(frozen=True)
class SignIn:
    """How a sign-in went: the user on success; otherwise why not (for the audit trail
    only: the person signing in is told the same for every reason)."""

    user: WebUserRecord | None
    reason: str | None  # "no such user", "disabled", "wrong password"


def verify_login(
    session: Session,
    username: str,
    password_matches: Callable[[str], bool],
    *,
    rehash: Callable[[str], str | None] | None = None,
    now: datetime | None = None,
) -> SignIn:
    """Sign a user in: succeeds when ``username`` names an enabled user and
    ``password_matches(stored_hash)`` is true; records the sign-in time then.

    ``password_matches`` is also called once when there is no such user or the user
    is disabled, with an empty string, so that the time taken does not tell a valid
    name from an unknown one; it must answer False for it. ``rehash(stored_hash)``,
    after a match, may return a new hash to store (one made with newer parameters).
    """
    row = session.execute(select(WebUser).where(WebUser.username == username)).scalar_one_or_none()
    if row is None or row.disabled:
        password_matches("")
        return SignIn(None, "no such user" if row is None else "disabled")
    if not password_matches(row.password_hash):
        return SignIn(None, "wrong password")
    now = _now(now)
    values: dict[str, object] = {"last_login_at": now}
    renewed = rehash(row.password_hash) if rehash is not None else None
    if renewed:
        values["password_hash"] = renewed
    session.execute(
        update(WebUser).where(WebUser.id == row.id).values(**values).execution_options(**_no_sync())
    )
    return SignIn(WebUserRecord(row.id, row.username, row.role, False, row.created_at, now), None)
