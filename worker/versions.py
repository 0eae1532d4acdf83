"""Registry versions in the database the workers read: their rows, and promotion.

A version is saved in the registry (``models.registry``) first; only then does its
row enter ``model_versions``, so a row always names an artifact that exists.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from thyrocad.db import repository
from thyrocad.db.engine import make_engine, make_session_factory, upgrade
from thyrocad.db.records import ModelVersionRecord
from thyrocad.settings import Settings


def version_record(
    saved: Any, now: dt.datetime, status_reason: str | None = None
) -> ModelVersionRecord:
    """The database's candidate row for a registry version (``models.registry.ModelVersion``).

    The artifact path is recorded absolute but with its symbolic links kept: workers on
    other machines mount the registry at the path the settings name (``/data/models``),
    not at wherever a link on this machine points (``Path.resolve`` would record that).
    """
    return ModelVersionRecord(
        version=saved.version,
        architecture=saved.architecture,
        classes=tuple(saved.classes),
        input_size=saved.input_size,
        artifact_path=str(saved.path.absolute()),
        status="candidate",
        status_reason=status_reason,
        metrics=saved.metadata.get("metrics") or {},
        data_fingerprint=saved.metadata.get("data_fingerprint"),
        created_at=now,
    )


def promote_version(s: Settings, version: str, registry_dir: Path) -> None:
    """Make a registry version active on disk and in the database the workers read."""
    from thyrocad.models.registry import Registry  # imports Keras

    v = Registry(registry_dir).promote(version)
    now = dt.datetime.now(dt.UTC)
    if not s.database_url:
        upgrade(s.db_url)
    with make_session_factory(make_engine(s.db_url)).begin() as session:
        repository.upsert_model_version(session, version_record(v, now), now)
        repository.set_active_model(session, v.version, now)
