"""Passwords, the signing key and the session cookie of the web page.

Passwords are hashed with argon2id (argon2-cffi's defaults, salted per user) and
never stored or logged. A session is a signed cookie (itsdangerous) holding the user's
row id, a CSRF token and when the session was last used; it is HttpOnly and
SameSite=Lax. It ends after ``THYROCAD_WEB_SESSION_MINUTES`` without a request, and the
user's role and disabled flag are read from the database on every request, so a
disabled user is signed out at once.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from itsdangerous import BadSignature, URLSafeSerializer

from thyrocad.errors import UserError
from thyrocad.settings import Settings

logger = logging.getLogger(__name__)

COOKIE_NAME = "thyrocad_session"
MIN_PASSWORD_LENGTH = 8
SECRET_FILE_NAME = "web-secret"
_SECRET_BYTES = 32
_SALT = "thyrocad-web-session"


class PasswordRefused(UserError):
    """A password that may not be used (empty, or too short)."""


def check_new_password(password: str) -> str:
    """Return ``password`` if it may be set, else raise :class:`PasswordRefused`."""
    if not password:
        raise PasswordRefused("the password is empty")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise PasswordRefused(
            f"the password is too weak: it has {len(password)} characters, "
            f"give at least {MIN_PASSWORD_LENGTH}"
        )
    return password


class Passwords:
    """argon2id hashing, and a check that takes as long for an unknown user."""

    def __init__(self, hasher: PasswordHasher | None = None) -> None:
        self.hasher = hasher or PasswordHasher()
        # Verified against when there is no user to check: an unknown name costs what a
        # wrong password costs, so response times do not tell names apart.
        self._dummy = self.hasher.hash(secrets.token_urlsafe(16))

    def hash(self, password: str) -> str:
        return self.hasher.hash(check_new_password(password))

    def matcher(self, password: str) -> Callable[[str], bool]:
        """A function telling whether a stored hash is that of ``password`` (an empty
        hash: no such user; it checks the dummy hash and answers False)."""

        def matches(stored: str) -> bool:
            try:
                return bool(self.hasher.verify(stored or self._dummy, password)) and bool(stored)
            except (VerifyMismatchError, VerificationError, InvalidHashError):
                return False

        return matches

    def rehasher(self, password: str) -> Callable[[str], str | None]:
        """After a match: a new hash of ``password`` when the stored one was made with
        other parameters than today's, else None."""

        def rehash(stored: str) -> str | None:
            try:
                stale = self.hasher.check_needs_rehash(stored)
            except InvalidHashError:
                return None
            return self.hasher.hash(password) if stale else None

        return rehash


def secret_key(settings: Settings) -> bytes:
    """The key that signs session cookies.

    ``THYROCAD_WEB_SECRET_FILE`` when set (it must exist and hold at least 32 bytes);
    otherwise ``THYROCAD_DATA_DIR/web-secret``, created with a random key (mode 0600)
    the first time. Changing the key signs everyone out.
    """
    if settings.web_secret_file is not None:
        path = Path(settings.web_secret_file)
        try:
            key = path.read_bytes().strip()
        except OSError as exc:
            raise UserError(
                f"cannot read THYROCAD_WEB_SECRET_FILE={path}: {exc.strerror or exc}"
            ) from exc
        if len(key) < _SECRET_BYTES:
            raise UserError(
                f"THYROCAD_WEB_SECRET_FILE={path} holds {len(key)} bytes: a signing key needs "
                f"at least {_SECRET_BYTES} (e.g. 'openssl rand -hex 32 > {path}')"
            )
        return key
    path = settings.data_dir / SECRET_FILE_NAME
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        key = secrets.token_hex(_SECRET_BYTES).encode()
        # O_EXCL: two processes starting at once keep the first key written.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "wb") as handle:
                handle.write(key)
                handle.flush()
                os.fsync(handle.fileno())
            logger.info("made a new key for web sessions", extra={"path": str(path)})
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning(
            "the web session key is readable by other users: chmod 600 it",
            extra={"path": str(path)},
        )
    key = path.read_bytes().strip()
    if len(key) < _SECRET_BYTES:
        raise UserError(f"{path} holds {len(key)} bytes: delete it and a new key is made")
    return key


@dataclass(frozen=True)
class SessionData:
    """What the cookie says: whose session, its CSRF token, when it was last used
    (seconds since the epoch)."""

    user_id: int
    csrf_token: str
    last_seen: float


class SessionCookies:
    """Signs and reads the session cookie, and decides whether a session has lapsed."""

    def __init__(self, key: bytes, idle_minutes: float) -> None:
        self._serializer = URLSafeSerializer(key, salt=_SALT)
        self.idle_seconds = idle_minutes * 60.0

    def new(self, user_id: int, now: float) -> SessionData:
        return SessionData(user_id, secrets.token_urlsafe(24), now)

    def dump(self, data: SessionData) -> str:
        return str(
            self._serializer.dumps({"u": data.user_id, "c": data.csrf_token, "t": data.last_seen})
        )

    def load(self, cookie: str | None, now: float) -> SessionData | None:
        """The session in ``cookie``, or None: absent, forged, malformed, or idle for
        longer than the session lasts (or from the future: a clock set back)."""
        if not cookie:
            return None
        try:
            raw: Any = self._serializer.loads(cookie)
        except BadSignature:
            return None
        if not isinstance(raw, dict):
            return None
        user_id, csrf, last_seen = raw.get("u"), raw.get("c"), raw.get("t")
        if not isinstance(user_id, int) or not isinstance(csrf, str):
            return None
        if not isinstance(last_seen, int | float):
            return None
        if now - last_seen > self.idle_seconds or last_seen - now > 60:
            return None
        return SessionData(user_id, csrf, float(last_seen))


def same_token(expected: str, given: str | None) -> bool:
    """Constant-time comparison of a CSRF token."""
    return bool(given) and secrets.compare_digest(expected.encode(), str(given).encode())
