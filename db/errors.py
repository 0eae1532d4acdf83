"""The exceptions of ``db``: one small hierarchy, each with a clear message.

Messages never carry patient data (patient keys, names, birth dates), as
callers may log them; they may carry what an operator needs to act on (a
model version, a Study Instance UID, a row id).
"""


class DbError(Exception):
    """Base class of every error raised by ``db``."""


class RepositoryError(DbError):
    """A repository call that cannot be carried out: an unknown study, patient or
    model version, or arguments that contradict each other."""


class UnsupportedDatabase(DbError):
    """An operation asked of a database backend that cannot do it
    (for example a read-only login role on SQLite)."""
