"""Fixtures for integration tests: real PostgreSQL, Redis, DICOM peers and processes."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.procs import ROOT

PG_ADMIN_URL = os.environ.get(
    "THYROCAD_TEST_PG", "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
)


def _pg_available() -> str | None:
    try:
        with sa.create_engine(PG_ADMIN_URL).connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - any failure means "not reachable"
        return str(exc).splitlines()[0]
    return None


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A throwaway PostgreSQL database, dropped after the test."""
    problem = _pg_available()
    if problem:
        pytest.fail(f"PostgreSQL at {PG_ADMIN_URL} is required: {problem}")
    name = f"thyrocad_t_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def cli(
    *args: str, env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m thyrocad`` to completion and return its output."""
    result = subprocess.run(
        [sys.executable, "-m", "thyrocad", *args],
        env={**os.environ, **(env or {})},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"thyrocad {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A real, tiny VGG-19 version (32 px, random base, 2 epochs) in a registry folder."""
    root = tmp_path_factory.mktemp("tiny-model")
    env = {"THYROCAD_DATA_DIR": str(root)}
    cli(
        "synth",
        "--out",
        str(root / "train"),
        "--patients",
        "8",
        "--size",
        "64",
        "--seed",
        "5",
        env=env,
    )
    out = cli(
        "train",
        "--data",
        str(root / "train"),
        "--arch",
        "vgg19",
        "--epochs",
        "2",
        "--input-size",
        "32",
        "--weights",
        "none",
        "--batch-size",
        "8",
        env=env,
    )
    version = out.stdout.strip().splitlines()[-1].strip()
    assert (root / "models" / version / "metadata.json").exists(), out.stdout
    return root / "models", version
